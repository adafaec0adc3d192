//! The one module allowed `unsafe`: fork, shared memory, and one `getsockopt` that nix does
//! not wrap. Every block says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
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

/// An anonymous shared mapping of zeroed `AtomicU64` words, inherited by children forked after
/// it was made: the scoreboard's memory.
pub(crate) struct SharedWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is only ever accessed through `&[AtomicU64]`, and atomics are `Sync`;
// the pointer is valid for the life of the value in whichever process holds it.
unsafe impl Send for SharedWords {}
// SAFETY: as above: shared access is through atomics only.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Maps `n` words (n > 0), zeroed by the kernel.
    pub(crate) fn new(n: usize) -> io::Result<SharedWords> {
        let bytes = n
            .checked_mul(std::mem::size_of::<AtomicU64>())
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| io::Error::other(format!("cannot map {n} scoreboard words")))?;
        // SAFETY: an anonymous mapping with no address hint cannot alias existing memory; the
        // kernel zero-fills it, and zero is a valid `AtomicU64`. MAP_SHARED keeps it shared with
        // children across fork.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                bytes,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }?;
        Ok(SharedWords {
            ptr: ptr.cast(),
            len: n,
        })
    }

    /// The words.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` points to `len` initialised (zeroed) `AtomicU64`s, page-aligned, mapped
        // until `self` is dropped; every access goes through atomics, so sharing with other
        // processes cannot produce a data race.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        let bytes = self.len * std::mem::size_of::<AtomicU64>();
        // SAFETY: this is the mapping made in `new`, with its length; no reference into it can
        // outlive `self` because `words` borrows `self`.
        let _ = unsafe { munmap(self.ptr.cast(), bytes) };
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_forked_child_writes_what_the_parent_reads() {
        let shared = SharedWords::new(4).expect("map");
        match fork().expect("fork") {
            Fork::Child => {
                shared.words()[2].store(42, Ordering::Release);
                std::process::exit(0);
            }
            Fork::Parent(child) => {
                nix::sys::wait::waitpid(child, None).expect("wait");
                assert_eq!(shared.words()[2].load(Ordering::Acquire), 42);
            }
        }
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
