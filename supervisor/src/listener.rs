//! Listening sockets, bound once in the master before the first fork; workers inherit them.
//!
//! Unix sockets get their mode (0660 by default) and owner; a stale socket file left by a
//! crashed server is replaced, a live one is an error; the file is removed on exit only by the
//! process that created it. All sockets are close-on-exec.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, UnixAddr,
};

use crate::config::{ListenAddr, SocketOptions};

/// A std listener for a worker to hand to tokio.
#[derive(Debug)]
pub enum ListenerSocket {
    /// TCP.
    Tcp(std::net::TcpListener),
    /// A unix stream socket.
    Unix(std::os::unix::net::UnixListener),
}

/// One bound, listening socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    addr: ListenAddr,
    /// The socket file this process created, and the pid that created it: a forked worker
    /// dropping its copy must not unlink the master's socket.
    created: Option<(PathBuf, u32)>,
    /// Passed in by systemd: served whatever the configuration says, never unlinked.
    activated: bool,
}

impl Listener {
    /// Binds and listens on `addr`.
    pub fn bind(addr: &ListenAddr, backlog: i32, opts: &SocketOptions) -> io::Result<Listener> {
        let backlog = Backlog::new(backlog)
            .map_err(|e| io::Error::other(format!("backlog {backlog}: {e}")))?;
        match addr {
            ListenAddr::Tcp(sa) => {
                let family = if sa.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
                socket::setsockopt(&fd, socket::sockopt::ReuseAddr, &true)?;
                if sa.is_ipv6() {
                    // `[::]:9000` means IPv6 only; listen on `0.0.0.0:9000` too for both.
                    socket::setsockopt(&fd, socket::sockopt::Ipv6V6Only, &true)?;
                }
                socket::bind(fd.as_fd().as_raw_fd_compat(), &SockaddrStorage::from(*sa)).map_err(
                    |e| io::Error::new(io::Error::from(e).kind(), format!("bind {sa}: {e}")),
                )?;
                socket::listen(&fd, backlog)?;
                Ok(Listener {
                    fd,
                    addr: addr.clone(),
                    created: None,
                    activated: false,
                })
            }
            ListenAddr::Unix(path) => {
                remove_stale(path)?;
                let fd = socket::socket(
                    AddressFamily::Unix,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                socket::bind(
                    fd.as_fd().as_raw_fd_compat(),
                    &UnixAddr::new(path.as_path())?,
                )
                .map_err(|e| {
                    io::Error::new(
                        io::Error::from(e).kind(),
                        format!("bind {}: {e}", path.display()),
                    )
                })?;
                let listener = Listener {
                    fd,
                    addr: addr.clone(),
                    created: Some((path.clone(), std::process::id())),
                    activated: false,
                };
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(opts.mode))?;
                if opts.owner.is_some() || opts.group.is_some() {
                    nix::unistd::chown(
                        path.as_path(),
                        opts.owner.map(nix::unistd::Uid::from_raw),
                        opts.group.map(nix::unistd::Gid::from_raw),
                    )
                    .map_err(|e| io::Error::other(format!("chown {}: {e}", path.display())))?;
                }
                socket::listen(&listener.fd, backlog)?;
                Ok(listener)
            }
        }
    }

    /// Takes over a listening socket this process inherited (systemd socket activation, or
    /// the previous master of an upgrade). `created` says whether this process (same pid,
    /// before exec) created its unix socket file, so it is removed at exit; systemd's never is.
    pub(crate) fn adopt(fd: OwnedFd, created: bool, activated: bool) -> io::Result<Listener> {
        let raw = fd.as_fd().as_raw_fd_compat();
        let sa: SockaddrStorage = socket::getsockname(raw)?;
        let addr = if let Some(path) = sa.as_unix_addr().and_then(|u| u.path()) {
            ListenAddr::Unix(path.to_path_buf())
        } else if let Some(v4) = sa.as_sockaddr_in() {
            ListenAddr::Tcp(SocketAddr::from((v4.ip(), v4.port())))
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            ListenAddr::Tcp(SocketAddr::from((v6.ip(), v6.port())))
        } else {
            return Err(io::Error::other(format!(
                "inherited fd {raw} is not a unix or TCP socket"
            )));
        };
        let created = match (&addr, created) {
            (ListenAddr::Unix(path), true) => Some((path.clone(), std::process::id())),
            _ => None,
        };
        Ok(Listener {
            fd,
            addr,
            created,
            activated,
        })
    }

    /// True when systemd passed it in.
    pub(crate) fn activated(&self) -> bool {
        self.activated
    }

    /// True when this process created the socket file (it removes it at exit).
    pub(crate) fn created_file(&self) -> bool {
        self.created.is_some()
    }

    /// The address it listens on.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// A second descriptor of the same socket, as a std listener.
    pub fn try_clone_std(&self) -> io::Result<ListenerSocket> {
        let fd = self.fd.try_clone()?;
        Ok(match self.addr {
            ListenAddr::Tcp(_) => ListenerSocket::Tcp(fd.into()),
            ListenAddr::Unix(_) => ListenerSocket::Unix(fd.into()),
        })
    }

    /// Connections waiting in the kernel's accept queue, where it can be read (TCP).
    pub fn queue_len(&self) -> Option<u32> {
        match self.addr {
            ListenAddr::Tcp(_) => crate::sys::tcp_accept_queue(self.fd.as_fd()),
            ListenAddr::Unix(_) => unix_accept_queue(self.fd.as_fd()),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, pid)) = &self.created {
            if *pid == std::process::id() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The accept-queue length of a listening unix socket, asked of the kernel through
/// `sock_diag` (`UNIX_DIAG_RQLEN`, what `ss -xl` shows as Recv-Q). None where the kernel has no
/// unix_diag support.
fn unix_accept_queue(fd: BorrowedFd<'_>) -> Option<u32> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const UDIAG_SHOW_RQLEN: u32 = 0x10;
    const UNIX_DIAG_RQLEN: u16 = 4;
    const TCP_LISTEN: u32 = 10;
    let ino = nix::sys::stat::fstat(fd).ok()?.st_ino as u32;
    let nl = socket::socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        socket::SockProtocol::NetlinkSockDiag,
    )
    .ok()?;
    // struct nlmsghdr (16 bytes) + struct unix_diag_req (24 bytes).
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&[0u8; 8]); // seq, pid
    req.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    req.extend_from_slice(&ino.to_ne_bytes());
    req.extend_from_slice(&UDIAG_SHOW_RQLEN.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // cookie: any
    let raw = nl.as_fd().as_raw_fd_compat();
    socket::sendto(
        raw,
        &req,
        &socket::NetlinkAddr::new(0, 0),
        socket::MsgFlags::empty(),
    )
    .ok()?;
    let mut buf = [0u8; 512];
    let n = socket::recv(raw, &mut buf, socket::MsgFlags::empty()).ok()?;
    let msg = &buf[..n];
    let u16_at = |i: usize| msg.get(i..i + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let u32_at = |i: usize| {
        msg.get(i..i + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    if u16_at(4)? == NLMSG_ERROR {
        return None;
    }
    // Attributes follow the header (16) and struct unix_diag_msg (16).
    let mut at = 32;
    while at + 4 <= msg.len() {
        let len = usize::from(u16_at(at)?);
        if len < 4 {
            return None;
        }
        if u16_at(at + 2)? == UNIX_DIAG_RQLEN {
            return u32_at(at + 4);
        }
        at += (len + 3) & !3;
    }
    None
}

/// Removes a socket file nobody answers on; refuses to touch a live socket or another file.
fn remove_stale(path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it or choose another path",
                path.display()
            ),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another server is listening on it", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// nix 0.30 takes raw fds in `bind`/`getsockname`; keep the conversion in one place.
trait RawCompat {
    fn as_raw_fd_compat(&self) -> std::os::fd::RawFd;
}

impl RawCompat for BorrowedFd<'_> {
    fn as_raw_fd_compat(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("listener-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn opts() -> SocketOptions {
        SocketOptions {
            mode: 0o660,
            owner: None,
            group: None,
        }
    }

    #[test]
    fn unix_socket_mode_stale_file_and_removal() {
        let dir = tmp("unix");
        let path = dir.join("app.sock");
        let addr = ListenAddr::Unix(path.clone());
        // A stale socket: bound once, listener dropped without unlinking (std leaves the file).
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        let l = Listener::bind(&addr, 16, &opts()).expect("replaces the stale file");
        let mode = std::fs::metadata(&path)
            .expect("socket file")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o660);
        std::os::unix::net::UnixStream::connect(&path).expect("connect");
        let live = Listener::bind(&addr, 16, &opts()).expect_err("a live socket is not replaced");
        assert_eq!(live.kind(), io::ErrorKind::AddrInUse);
        let _pending = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        // Three nobody accepted: the first connect, the live-socket probe of the second bind,
        // and this one.
        assert_eq!(l.queue_len(), Some(3));
        drop(l);
        assert!(!path.exists(), "removed by the process that created it");
        std::fs::write(&path, b"not a socket").expect("file");
        assert!(Listener::bind(&addr, 16, &opts()).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The bound address (the real port when bound to port 0).
    fn tcp_addr(l: &Listener) -> Option<SocketAddr> {
        match l.try_clone_std().ok()? {
            ListenerSocket::Tcp(t) => t.local_addr().ok(),
            ListenerSocket::Unix(_) => None,
        }
    }

    #[test]
    fn tcp_v4_and_v6_with_queue_length() {
        let l = Listener::bind(
            &ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr")),
            16,
            &opts(),
        )
        .expect("bind");
        let at = tcp_addr(&l).expect("local addr");
        let _a = std::net::TcpStream::connect(at).expect("connect");
        let _b = std::net::TcpStream::connect(at).expect("connect");
        assert_eq!(l.queue_len(), Some(2));
        match Listener::bind(
            &ListenAddr::Tcp("[::1]:0".parse().expect("addr")),
            16,
            &opts(),
        ) {
            Ok(v6) => assert!(tcp_addr(&v6).is_some_and(|a| a.is_ipv6())),
            Err(e) => eprintln!("no IPv6 loopback on this machine: {e}"),
        }
    }
}
