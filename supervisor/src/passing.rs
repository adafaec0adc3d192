//! Passing connections between processes. When a worker drains (reload, recycling, a smaller
//! pool), or when a request reaches a worker that has no room while another has, the worker
//! sends the connection to the master, which gives it to a worker with room. nginx may be
//! writing a request into such a connection at that very moment; closing it would reset the
//! request (a 502 for a POST, which nginx does not retry), while moving it loses nothing: the
//! bytes wait in the socket for the new owner, and the bytes the old owner had already read
//! travel with the connection.
//!
//! Each worker shares a stream socketpair with the master. (A datagram or seqpacket pair would
//! refuse an eleventh message in flight: `net.unix.max_dgram_qlen` is 10 by default, and a
//! worker may hand over dozens of connections at once.) On it travel [`Message`]s, framed as:
//!
//! | tag   | then                                                | `SCM_RIGHTS`               |
//! |-------|-----------------------------------------------------|----------------------------|
//! | `c`   | u8 moves, u32 little-endian length, those bytes     | the connection, on the tag |
//! | `w`   | nothing                                             | none                       |
//!
//! The kernel delivers the descriptors attached to a byte with the read that returns that
//! byte and never merges them across messages, so descriptors queue in frame order and each
//! `c` frame takes the next one. [`Inbox`] reassembles frames that arrive in pieces.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrLike,
};

use crate::sys;

const TAG_CONN: u8 = b'c';
const TAG_WAKE: u8 = b'w';
/// Tag, moves, and the u32 length.
const CONN_HEADER: usize = 6;

/// The most bytes a connection carries along: more than a worker's read buffer ever holds
/// unprocessed. A longer length can only come from a corrupt channel.
pub(crate) const MAX_CARRIED: usize = 1 << 20;

/// How long a sender waits for room in the channel to finish a message it started: the reader
/// (the master, or a worker's event loop) drains its channel continuously, so only a stuck
/// process makes this run out.
const FINISH_WAIT: Duration = Duration::from_secs(1);

/// Descriptors one read takes at most; further ones arrive with the next read.
const FDS_PER_READ: usize = 16;

/// Bytes one read takes at most.
const READ_CHUNK: usize = 64 * 1024;

/// What travels on a worker's channel.
#[derive(Debug)]
pub(crate) enum Message {
    /// A connection, with the bytes already read from it that its next owner must see first.
    Conn {
        /// The connection.
        conn: OwnedFd,
        /// Read by the previous owner and not yet acted upon.
        carried: Bytes,
        /// How many times the request in `carried` has moved between workers, this move
        /// included (0 for an idle connection): the receiver bounds it.
        moves: u8,
    },
    /// From a worker: requests are waiting for room it does not have; look at the pool now
    /// rather than at the next tick.
    Wake,
}

/// Sends `conn` over `channel`, with `carried`, the bytes already read from it, and how many
/// times their request has `moves`d.
pub(crate) fn send_conn(
    channel: BorrowedFd<'_>,
    conn: BorrowedFd<'_>,
    carried: &[u8],
    moves: u8,
) -> io::Result<()> {
    if carried.len() > MAX_CARRIED {
        return Err(io::Error::other(format!(
            "cannot pass a connection with {} bytes read ahead; at most {MAX_CARRIED}",
            carried.len()
        )));
    }
    let len = (carried.len() as u32).to_le_bytes();
    let header = [TAG_CONN, moves, len[0], len[1], len[2], len[3]];
    let fds = [conn.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(&header), IoSlice::new(carried)];
    let sent = sendmsg::<()>(
        channel.as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    let total = CONN_HEADER + carried.len();
    if sent < total {
        // Half a message would corrupt every one after it: finish it.
        let rest: Vec<u8> = header.iter().chain(carried).skip(sent).copied().collect();
        finish(channel, &rest)?;
    }
    Ok(())
}

/// Tells the master to look at the pool now.
pub(crate) fn send_wake(channel: BorrowedFd<'_>) -> io::Result<()> {
    let iov = [IoSlice::new(&[TAG_WAKE])];
    sendmsg::<()>(
        channel.as_raw_fd(),
        &iov,
        &[],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Writes the rest of a message, waiting for room up to [`FINISH_WAIT`].
fn finish(channel: BorrowedFd<'_>, mut rest: &[u8]) -> io::Result<()> {
    while !rest.is_empty() {
        let mut fds = [PollFd::new(channel.as_fd(), PollFlags::POLLOUT)];
        let ms = FINISH_WAIT.as_millis() as u16;
        if poll(&mut fds, PollTimeout::from(ms))? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the channel's reader took no bytes for 1 s; the channel is now unusable",
            ));
        }
        let iov = [IoSlice::new(rest)];
        match sendmsg::<()>(
            channel.as_raw_fd(),
            &iov,
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => rest = &rest[n..],
            Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reassembles [`Message`]s from one channel.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    buf: BytesMut,
    fds: VecDeque<OwnedFd>,
}

impl Inbox {
    /// An empty inbox.
    pub(crate) fn new() -> Inbox {
        Inbox::default()
    }

    /// Reads everything `channel` has now and returns the complete messages, in order.
    /// `UnexpectedEof` once the other end is gone and everything it sent was returned; an
    /// error that is not `WouldBlock` means the channel is unusable.
    pub(crate) fn recv(&mut self, channel: BorrowedFd<'_>) -> io::Result<Vec<Message>> {
        let mut closed = false;
        loop {
            match self.read_once(channel) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut messages = Vec::new();
        while let Some(m) = self.decode()? {
            messages.push(m);
        }
        if closed && messages.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other end of the channel closed",
            ));
        }
        Ok(messages)
    }

    fn read_once(&mut self, channel: BorrowedFd<'_>) -> io::Result<usize> {
        let mut chunk = vec![0u8; READ_CHUNK];
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_READ]);
        let msg = recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let n = msg.bytes;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    self.fds.push_back(sys::adopt_fd(fd)?);
                }
            }
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next complete message in the buffer.
    fn decode(&mut self) -> io::Result<Option<Message>> {
        decode(&mut self.buf, &mut self.fds)
    }
}

/// One message off the front of `buf`, taking its descriptor from `fds`; `None` until it is
/// complete.
fn decode(buf: &mut BytesMut, fds: &mut VecDeque<OwnedFd>) -> io::Result<Option<Message>> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    match tag {
        TAG_WAKE => {
            buf.advance(1);
            Ok(Some(Message::Wake))
        }
        TAG_CONN => {
            if buf.len() < CONN_HEADER {
                return Ok(None);
            }
            let moves = buf[1];
            let len = u32::from_le_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
            if len > MAX_CARRIED {
                return Err(corrupt(format!(
                    "a connection carries {len} bytes; at most {MAX_CARRIED}"
                )));
            }
            if buf.len() < CONN_HEADER + len {
                return Ok(None);
            }
            let conn = fds
                .pop_front()
                .ok_or_else(|| corrupt("a connection message arrived without its descriptor"))?;
            buf.advance(CONN_HEADER);
            let carried = buf.split_to(len).freeze();
            Ok(Some(Message::Conn {
                conn,
                carried,
                moves,
            }))
        }
        other => Err(corrupt(format!(
            "unknown message tag {other:#04x}; expected 'c' or 'w'"
        ))),
    }
}

fn corrupt(why: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt connection channel: {}", why.into()),
    )
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
    use std::os::unix::net::UnixStream;

    fn channel() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        (a, b)
    }

    fn conn(m: Message) -> (UnixStream, Bytes, u8) {
        let Message::Conn {
            conn,
            carried,
            moves,
        } = m
        else {
            panic!("a connection, got {m:?}")
        };
        let Passed::Unix(s) = classify(conn).expect("classify") else {
            panic!("unix")
        };
        (s, carried, moves)
    }

    #[test]
    fn a_connection_moves_with_the_bytes_read_and_the_bytes_waiting_in_it() {
        let (a, b) = channel();
        let (mut client, server) = UnixStream::pair().expect("stream");
        client.write_all(b"still in the socket").expect("write");
        send_conn(a.as_fd(), server.as_fd(), b"read ahead", 1).expect("send");
        drop(server);
        let mut inbox = Inbox::new();
        let mut got = inbox.recv(b.as_fd()).expect("recv");
        assert_eq!(got.len(), 1);
        let (mut moved, carried, moves) = conn(got.remove(0));
        assert_eq!((&carried[..], moves), (&b"read ahead"[..], 1));
        let mut buf = [0u8; 19];
        moved.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"still in the socket");
        assert!(inbox.recv(b.as_fd()).expect("nothing more").is_empty());
    }

    #[test]
    fn many_messages_in_flight_keep_their_order_and_descriptors() {
        let (a, b) = channel();
        let mut clients = Vec::new();
        for i in 0..40u8 {
            let (mut client, server) = UnixStream::pair().expect("stream");
            client.write_all(&[i]).expect("write");
            send_conn(a.as_fd(), server.as_fd(), &vec![i; usize::from(i) * 100], i).expect("send");
            if i % 7 == 0 {
                send_wake(a.as_fd()).expect("wake");
            }
            clients.push(client);
        }
        let mut inbox = Inbox::new();
        let got = inbox.recv(b.as_fd()).expect("recv");
        let mut conns = 0u8;
        let mut wakes = 0;
        for m in got {
            match m {
                Message::Wake => wakes += 1,
                m => {
                    let (mut s, carried, moves) = conn(m);
                    assert_eq!(moves, conns);
                    let mut first = [0u8; 1];
                    s.read_exact(&mut first).expect("read");
                    assert_eq!(first[0], conns, "descriptor {conns} in order");
                    assert_eq!(carried.len(), usize::from(conns) * 100);
                    assert!(carried.iter().all(|&x| x == conns));
                    conns += 1;
                }
            }
        }
        assert_eq!((conns, wakes), (40, 6));
    }

    #[test]
    fn frames_split_anywhere_decode_the_same() {
        let (mut fds, (_c, s)) = (VecDeque::new(), UnixStream::pair().expect("stream"));
        fds.push_back(OwnedFd::from(s));
        let mut wire = vec![TAG_WAKE, TAG_CONN, 2];
        wire.extend_from_slice(&3u32.to_le_bytes());
        wire.extend_from_slice(b"abc");
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for byte in wire {
            buf.extend_from_slice(&[byte]);
            while let Some(m) = decode(&mut buf, &mut fds).expect("decode") {
                out.push(m);
            }
        }
        assert!(matches!(out[0], Message::Wake));
        assert!(
            matches!(&out[1], Message::Conn { carried, moves: 2, .. } if &carried[..] == b"abc")
        );
        assert!(buf.is_empty() && fds.is_empty());
    }

    #[test]
    fn a_corrupt_channel_is_an_error_not_a_panic() {
        let mut fds = VecDeque::new();
        let mut buf = BytesMut::from(&b"x"[..]);
        assert!(decode(&mut buf, &mut fds).is_err());
        let mut buf = BytesMut::from(&[TAG_CONN, 0, 0, 0, 0, 0][..]);
        assert!(decode(&mut buf, &mut fds).is_err(), "no descriptor");
        let mut buf = BytesMut::from(&[TAG_CONN, 0, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(decode(&mut buf, &mut fds).is_err(), "too long");
    }

    #[test]
    fn a_closed_channel_says_so_after_its_last_message() {
        let (a, b) = channel();
        send_wake(a.as_fd()).expect("wake");
        drop(a);
        let mut inbox = Inbox::new();
        assert_eq!(inbox.recv(b.as_fd()).expect("the wake").len(), 1);
        let err = inbox.recv(b.as_fd()).expect_err("closed");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
