//! Forwarding kept-alive connections: a draining worker hands its idle connections to the
//! master over its channel, and the master passes them on to a worker of the current
//! generation that stays, so a reload or a pool shrink closes no client's connection. A worker
//! without room for a request that reached it hands its connection over too, with the bytes it
//! read, and the master passes it to an idle worker (see `passing.rs`).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use bytes::Bytes;
use nix::sys::socket::{recv, MsgFlags};
use nix::unistd::Pid;

use super::Worker;
use crate::passing::{self, Inbox, Message};
use crate::scoreboard::{Scoreboard, SlotState};

/// Connections on their way from one worker to another.
#[derive(Default)]
pub(super) struct Forwarding {
    /// Each worker's channel's inbox: a message may arrive in pieces.
    inboxes: HashMap<Pid, Inbox>,
    /// Channels of reaped workers, with their inboxes, read once more for connections they
    /// handed over last.
    orphans: Vec<(UnixStream, Inbox)>,
    /// Handed-over connections, with the bytes read from them, waiting for a worker to take
    /// them (during a reload, before the new generation exists). Their requests wait in the
    /// sockets meanwhile.
    passed: Vec<(OwnedFd, Bytes, u8)>,
    /// Where the next connection with a request goes among the idle workers: a worker shows
    /// busy only once the request started there, so requests moved within that moment go to
    /// different workers instead of queueing on the one that looks idle first.
    turn: usize,
}

impl Forwarding {
    /// The channel of reaped worker `pid`, to read once more.
    pub(super) fn orphan(&mut self, pid: Pid, channel: UnixStream) {
        let inbox = self.inboxes.remove(&pid).unwrap_or_default();
        self.orphans.push((channel, inbox));
    }

    /// Whether connections wait for a worker to take them.
    pub(super) fn waiting(&self) -> bool {
        !self.passed.is_empty()
    }

    /// How many held connections have a request waiting for a worker: one carrying bytes
    /// its last owner read, or one nginx has written to since. Without this count, an
    /// `ondemand` pool whose last worker recycled would start none for the next request on
    /// a kept-alive connection that worker handed over, and nginx would time out on it.
    /// Held connections nginx has closed are dropped here.
    pub(super) fn requests_waiting(&mut self) -> usize {
        let mut waiting = 0;
        self.passed.retain(|(fd, carried, _)| {
            let peeked = if carried.is_empty() {
                peek(fd.as_fd())
            } else {
                Peeked::Bytes
            };
            waiting += usize::from(matches!(peeked, Peeked::Bytes));
            !matches!(peeked, Peeked::Closed)
        });
        waiting
    }

    /// The held connections, for the master to wake when a request arrives on one.
    pub(super) fn held(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.passed.iter().map(|(fd, _, _)| fd.as_fd())
    }

    /// Collects what the workers handed over and passes it on: a connection carrying a request
    /// to an idle worker, one that stays if there is one; an idle connection to any of the
    /// current generation's workers that stay, idle ones first. With none to take them the
    /// connections wait, unless the master is `stopping` (then they close: no worker will
    /// come).
    pub(super) fn forward(
        &mut self,
        workers: &HashMap<Pid, Worker>,
        board: &Scoreboard,
        generation: u64,
        stopping: bool,
    ) {
        let mut passed = std::mem::take(&mut self.passed);
        self.inboxes.retain(|pid, _| workers.contains_key(pid));
        for (pid, w) in workers {
            if let Some(channel) = &w.channel {
                let inbox = self.inboxes.entry(*pid).or_default();
                collect(pid.as_raw(), channel, inbox, &mut passed);
            }
        }
        for (channel, mut inbox) in std::mem::take(&mut self.orphans) {
            collect(0, &channel, &mut inbox, &mut passed);
        }
        if passed.is_empty() {
            return;
        }
        // Workers that stay: the current generation, not told to stop, not draining.
        let mut staying: Vec<(usize, &UnixStream, bool)> = workers
            .values()
            .filter(|w| w.generation == generation && !w.stopping)
            .filter_map(|w| {
                let state = board.slot(w.slot).state();
                let channel = w.channel.as_ref()?;
                (state != SlotState::Draining).then_some((
                    w.slot,
                    channel,
                    state == SlotState::Idle,
                ))
            })
            .collect();
        // Idle workers first; the rest wait for room like any kept-alive request.
        staying.sort_by_key(|&(slot, _, idle)| (!idle, slot));
        // Where a request starts at once: an idle worker that stays, else (while a new
        // generation starts) an idle one of the previous generation not yet told to stop.
        let mut idle: Vec<(usize, &UnixStream)> = staying
            .iter()
            .filter(|t| t.2)
            .map(|&(slot, channel, _)| (slot, channel))
            .collect();
        if idle.is_empty() {
            idle = workers
                .values()
                .filter(|w| !w.stopping && board.slot(w.slot).state() == SlotState::Idle)
                .filter_map(|w| Some((w.slot, w.channel.as_ref()?)))
                .collect();
            idle.sort_by_key(|&(slot, _)| slot);
        }
        let staying: Vec<(usize, &UnixStream)> = staying
            .into_iter()
            .map(|(slot, channel, _)| (slot, channel))
            .collect();
        let mut keep = Vec::new();
        for (i, (fd, carried, moves)) in passed.into_iter().enumerate() {
            // A request goes where it starts at once; an idle connection to any worker that
            // stays, so the connections stay spread over the pool.
            let (pool, first) = if !carried.is_empty() && !idle.is_empty() {
                self.turn = self.turn.wrapping_add(1);
                (&idle, self.turn)
            } else if !staying.is_empty() {
                (&staying, i)
            } else {
                // The next generation is about to start: keep it until it does.
                keep.push((fd, carried, moves));
                continue;
            };
            let sent = (0..pool.len()).any(|k| {
                let (slot, channel) = pool[(first + k) % pool.len()];
                match passing::send_conn(channel.as_fd(), fd.as_fd(), &carried, moves) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(slot, error = %e, carried = carried.len(), "cannot pass a connection to a worker; trying the next");
                        false
                    }
                }
            });
            if !sent {
                tracing::warn!(
                    carried = carried.len(),
                    "no worker took a passed connection; closing it"
                );
            }
        }
        // Stopping, no worker will come: they close.
        if !stopping {
            self.passed = keep;
        }
    }
}

/// What a held connection has to read.
enum Peeked {
    Nothing,
    Bytes,
    Closed,
}

/// Looks at `conn` without taking anything from it.
fn peek(conn: BorrowedFd<'_>) -> Peeked {
    let mut byte = [0u8; 1];
    match recv(
        conn.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => Peeked::Closed,
        Ok(_) => Peeked::Bytes,
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Peeked::Nothing,
        // Reset or otherwise broken: nothing will ever be read from it.
        Err(_) => Peeked::Closed,
    }
}

/// Reads the messages waiting on one worker's `channel` (`pid` 0 for a reaped one).
fn collect(
    pid: i32,
    channel: &UnixStream,
    inbox: &mut Inbox,
    passed: &mut Vec<(OwnedFd, Bytes, u8)>,
) {
    loop {
        match inbox.recv(channel.as_fd()) {
            Ok(messages) if messages.is_empty() => return,
            Ok(messages) => {
                for m in messages {
                    match m {
                        Message::Conn {
                            conn,
                            carried,
                            moves,
                        } => passed.push((conn, carried, moves)),
                        // Reserved: the pool is looked at every tick anyway.
                        // Reading it woke the loop, whose maintenance pass starts workers.
                        Message::Wake => {
                            tracing::debug!(pid, "a worker at its cap has connections waiting")
                        }
                    }
                }
            }
            // Closed (the worker is gone and reaped soon) or unusable: nothing more comes.
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::warn!(pid, error = %e, "a worker's connection channel failed; connections it hands over are lost");
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A held connection and nginx's end of it.
    fn held(carried: &'static [u8]) -> ((OwnedFd, Bytes, u8), UnixStream) {
        let (ours, nginx) = UnixStream::pair().expect("socketpair");
        ((OwnedFd::from(ours), Bytes::from_static(carried), 1), nginx)
    }

    #[test]
    fn held_connections_with_a_request_count_as_waiting_and_closed_ones_are_dropped() {
        let (idle, _idle_peer) = held(b"");
        let (carrying, _carrying_peer) = held(b"\x01\x01");
        let (written, mut written_peer) = held(b"");
        let (closed, closed_peer) = held(b"");
        let mut f = Forwarding {
            passed: vec![idle, carrying, written, closed],
            ..Forwarding::default()
        };
        assert_eq!(
            f.requests_waiting(),
            1,
            "only the one carrying bytes so far"
        );
        written_peer.write_all(b"\x01\x01").expect("nginx writes");
        drop(closed_peer);
        assert_eq!(f.requests_waiting(), 2);
        assert_eq!(f.held().count(), 3, "the closed one is gone");
        // Peeking takes nothing: the request is still there for the worker.
        assert_eq!(f.requests_waiting(), 2);
    }
}
