//! Passing connections between processes: when a worker drains (reload, recycling, a smaller
//! pool), the idle kept-alive connections it holds go to the master and from there to a worker
//! that stays, instead of being closed. nginx may be writing a request into such a connection
//! at that very moment; closing it would reset the request (a 502 for a POST, which nginx does
//! not retry), while moving it loses nothing: the bytes wait in the socket for the new owner.
//!
//! Each worker shares a stream socketpair with the master; a connection travels as
//! `SCM_RIGHTS` attached to one byte. (A datagram pair would refuse an eleventh connection in
//! flight: `net.unix.max_dgram_qlen` is 10 by default, and a worker may hold dozens.)

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrLike,
};

use crate::sys;

/// Sends `conn` over `channel`.
pub(crate) fn send(channel: BorrowedFd<'_>, conn: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [conn.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let payload = [IoSlice::new(b"c")];
    sendmsg::<()>(
        channel.as_raw_fd(),
        &payload,
        &cmsg,
        MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    Ok(())
}

/// Receives one connection from `channel`: `Ok(None)` when a byte carried none,
/// `WouldBlock` when nothing is waiting, `UnexpectedEof` when the other end is gone.
pub(crate) fn recv(channel: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        channel.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT,
    )?;
    if msg.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other end of the channel closed",
        ));
    }
    let mut received = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // The first is ours; any other would be a bug, and must not leak.
                let owned = sys::adopt_fd(fd)?;
                if received.is_none() {
                    received = Some(owned);
                }
            }
        }
    }
    Ok(received)
}

/// What kind of stream a passed connection is.
pub(crate) enum Passed {
    /// TCP.
    Tcp(std::net::TcpStream),
    /// Unix.
    Unix(std::os::unix::net::UnixStream),
}

/// Wraps a received connection in the std type its address family says.
pub(crate) fn classify(fd: OwnedFd) -> io::Result<Passed> {
    let sa: nix::sys::socket::SockaddrStorage = nix::sys::socket::getsockname(fd.as_raw_fd())?;
    Ok(match sa.family() {
        Some(nix::sys::socket::AddressFamily::Unix) => Passed::Unix(fd.into()),
        _ => Passed::Tcp(fd.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_connection_moves_with_the_bytes_waiting_in_it() {
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        let (mut client, server) = UnixStream::pair().expect("stream");
        client.write_all(b"sent before the move").expect("write");
        send(a.as_fd(), server.as_fd()).expect("send");
        drop(server);
        let fd = recv(b.as_fd()).expect("recv").expect("a connection");
        let Passed::Unix(mut moved) = classify(fd).expect("classify") else {
            panic!("unix")
        };
        let mut buf = [0u8; 20];
        moved.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"sent before the move");
        let err = recv(b.as_fd()).expect_err("nothing more");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
