//! The one module allowed `unsafe`: fork, shared memory, adopting inherited file descriptors,
//! one `getsockopt` that nix does not wrap, and the pre-exec setup of a foreign program. Every
//! block says why it is sound.
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use nix::fcntl::{FcntlArg, FdFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::unistd::{ForkResult, Pid};

/// Which side of a fork we are on.
pub(crate) enum Fork {
    /// The master, with the child's pid.
    Parent(Pid),
    /// The new worker.
    Child,
}

/// fork(2).
pub(crate) fn fork() -> io::Result<Fork> {
    // SAFETY: the master is single-threaded (no async runtime, no helper threads: see
    // `master.rs`), so the child is a complete copy of the only thread and may run any code,
    // not just async-signal-safe functions.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Fork::Parent(child)),
        ForkResult::Child => Ok(Fork::Child),
    }
}

/// A shared mapping of zeroed `AtomicU64` words backed by a memfd: inherited by children forked
/// after it was made, and handed to the next master across an upgrade's `exec` by its fd.
pub(crate) struct SharedWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is only ever accessed through `&[AtomicU64]`, and atomics are `Sync`;
// the pointer is valid for the life of the value in whichever process holds it.
unsafe impl Send for SharedWords {}
// SAFETY: as above: shared access is through atomics only.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// A new table of `n` words (n > 0), zeroed.
    pub(crate) fn new(n: usize) -> io::Result<SharedWords> {
        let fd = memfd_create("scoreboard", MFdFlags::MFD_CLOEXEC)?;
        let bytes = byte_len(n)?;
        nix::unistd::ftruncate(&fd, bytes.get() as libc::off_t)?;
        SharedWords::map(fd, n)
    }

    /// The table of `n` words behind an inherited memfd.
    pub(crate) fn from_fd(fd: OwnedFd, n: usize) -> io::Result<SharedWords> {
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        if (size as u64) < byte_len(n)?.get() as u64 {
            return Err(io::Error::other(format!(
                "inherited scoreboard has {size} bytes, {n} words expected"
            )));
        }
        SharedWords::map(fd, n)
    }

    fn map(fd: OwnedFd, n: usize) -> io::Result<SharedWords> {
        let bytes = byte_len(n)?;
        // SAFETY: a new mapping with no address hint cannot alias existing memory; the memfd is
        // at least `bytes` long (set by ftruncate or checked by fstat), its contents are zeroes
        // or words written by another master, and every bit pattern is a valid `AtomicU64`.
        let ptr = unsafe {
            mmap(
                None,
                bytes,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }?;
        Ok(SharedWords {
            ptr: ptr.cast(),
            len: n,
            fd,
        })
    }

    /// The memfd behind the table, to pass on across exec.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The words.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` points to `len` initialised `AtomicU64`s, page-aligned, mapped until
        // `self` is dropped; every access goes through atomics, so sharing with other processes
        // cannot produce a data race.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

fn byte_len(n: usize) -> io::Result<NonZeroUsize> {
    n.checked_mul(std::mem::size_of::<AtomicU64>())
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| io::Error::other(format!("cannot map {n} scoreboard words")))
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        let bytes = self.len * std::mem::size_of::<AtomicU64>();
        // SAFETY: this is the mapping made in `map`, with its length; no reference into it can
        // outlive `self` because `words` borrows `self`.
        let _ = unsafe { munmap(self.ptr.cast(), bytes) };
    }
}

/// Takes ownership of an inherited fd number (systemd's LISTEN_FDS, an upgrade's hand-over),
/// after checking that it is open, and marks it close-on-exec again.
pub(crate) fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: borrowed only for these calls; fcntl on a closed fd fails with EBADF and touches
    // nothing.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    nix::fcntl::fcntl(borrowed, FcntlArg::F_GETFD)
        .map_err(|e| io::Error::other(format!("inherited fd {fd} is not open: {e}")))?;
    nix::fcntl::fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    // SAFETY: the fd is open (checked above) and was handed to this process to own (by systemd
    // or the previous master, through the environment); nothing else in the process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `TCP_LISTEN` of the kernel's `enum tcp_states` (include/net/tcp_states.h).
const TCP_LISTEN: u8 = 10;

/// The accept-queue length of a listening TCP socket: for a socket in LISTEN state the kernel
/// reports it as `tcpi_unacked` of TCP_INFO (what `ss -lt` shows as Recv-Q).
pub(crate) fn tcp_accept_queue(fd: BorrowedFd<'_>) -> Option<u32> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes that outlives the call; the kernel
    // writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-initialised, then (partly) filled by the kernel: every bit pattern is a
    // valid `tcp_info` (plain integers).
    let info = unsafe { info.assume_init() };
    (info.tcpi_state == TCP_LISTEN).then_some(info.tcpi_unacked)
}

/// `close_range(2)`'s flag that marks the range close-on-exec instead of closing it
/// (linux/close_range.h).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
/// Where the fallback for kernels before 5.11 stops marking fds: well above what a worker
/// holds open (its listeners, its scoreboard, a few connections of its own).
const CLOEXEC_FALLBACK_FDS: libc::c_int = 4096;

/// Makes this thread, and the threads and processes it starts from now on, `SCHED_BATCH`
/// (`cpu_scheduling = "batch"`): the same CPU share, no wake-up preemption.
pub(crate) fn set_batch_scheduling() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised sched_param that outlives the call, which only
    // reads it; pid 0 is the calling thread.
    let done = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets up `cmd` for a foreign FastCGI program: the child gets SIGKILL when the thread that
/// spawned it dies (a worker killed for a timeout takes its program along), and no fd above 2
/// survives its exec (the worker's listeners and connections are not the program's to hold).
pub(crate) fn dies_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid().as_raw();
    // SAFETY: the closure runs in the forked child of a multi-threaded process, before exec,
    // where only async-signal-safe calls are allowed: it makes raw system calls (prctl,
    // getppid, close_range, fcntl) and builds an `io::Error` from an errno, which does not
    // allocate; it takes no lock and touches no memory shared with other threads.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died before prctl: the signal will never come, so do not start.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            let marked = libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            );
            if marked != 0 {
                for fd in 3..CLOEXEC_FALLBACK_FDS {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                    }
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering;

    // What a forked child writes is read by its parent: `fork_checks.rs`, run by
    // `tests/fork.rs`, since no test here may fork inside the multi-threaded harness.

    #[test]
    fn adopting_a_closed_fd_fails() {
        assert!(adopt_fd(987_654).is_err());
    }

    #[test]
    fn the_table_survives_being_mapped_again_from_its_fd() {
        let a = SharedWords::new(4).expect("map");
        a.words()[3].store(7, Ordering::Relaxed);
        let fd = a.fd().try_clone_to_owned().expect("dup");
        let b = SharedWords::from_fd(fd, 4).expect("map again");
        assert_eq!(b.words()[3].load(Ordering::Relaxed), 7);
        let fd = a.fd().try_clone_to_owned().expect("dup");
        assert!(SharedWords::from_fd(fd, 5000).is_err(), "too small");
    }

    #[test]
    fn tcp_accept_queue_counts_unaccepted_connections() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        assert_eq!(tcp_accept_queue(l.as_fd()), Some(0));
        let _a = std::net::TcpStream::connect(addr).expect("connect");
        let _b = std::net::TcpStream::connect(addr).expect("connect");
        assert_eq!(tcp_accept_queue(l.as_fd()), Some(2));
    }
}
