//! Forwarding kept-alive connections: a draining worker hands its idle connections to the
//! master over its channel, and the master passes them on to a worker of the current
//! generation that stays, so a reload or a pool shrink closes no client's connection.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::unistd::Pid;

use super::Worker;
use crate::passing;
use crate::scoreboard::{Scoreboard, SlotState};

/// Connections on their way from a draining worker to a staying one.
#[derive(Default)]
pub(super) struct Forwarding {
    /// Channels of reaped workers, read once more for connections they handed over last.
    orphans: Vec<UnixStream>,
    /// Handed-over connections waiting for a worker to take them (during a reload, before the
    /// new generation exists). Their requests wait in the sockets meanwhile.
    passed: Vec<OwnedFd>,
}

impl Forwarding {
    /// The channel of a reaped worker, to read once more.
    pub(super) fn orphan(&mut self, channel: UnixStream) {
        self.orphans.push(channel);
    }

    /// Whether connections wait for a worker to take them.
    pub(super) fn waiting(&self) -> bool {
        !self.passed.is_empty()
    }

    /// Collects what the workers handed over and passes it on to the current generation's
    /// workers that stay, idle ones first. With none to take them the connections wait, unless
    /// the master is `stopping` (then they close: no worker will come).
    pub(super) fn forward(
        &mut self,
        workers: &HashMap<Pid, Worker>,
        board: &Scoreboard,
        generation: u64,
        stopping: bool,
    ) {
        let mut passed = std::mem::take(&mut self.passed);
        let channels = workers.values().filter_map(|w| w.channel.as_ref());
        for channel in channels.chain(self.orphans.iter()) {
            loop {
                match passing::recv(channel.as_fd()) {
                    Ok(Some(fd)) => passed.push(fd),
                    Ok(None) => {}
                    Err(_) => break,
                }
            }
        }
        self.orphans.clear();
        if passed.is_empty() {
            return;
        }
        let mut targets: Vec<(&UnixStream, bool)> = workers
            .values()
            .filter(|w| w.generation == generation && !w.stopping)
            .filter_map(|w| {
                let state = board.slot(w.slot).state();
                let channel = w.channel.as_ref()?;
                (state != SlotState::Draining).then_some((channel, state == SlotState::Idle))
            })
            .collect();
        // Idle workers first; the rest wait for room like any kept-alive request.
        targets.sort_by_key(|(_, idle)| !idle);
        if targets.is_empty() {
            if !stopping {
                // The next generation is about to start: keep them until it does.
                self.passed = passed;
            }
            return;
        }
        for (i, fd) in passed.into_iter().enumerate() {
            let (channel, _) = targets[i % targets.len()];
            if let Err(e) = passing::send(channel.as_fd(), fd.as_fd()) {
                tracing::debug!(error = %e, "cannot pass a kept-alive connection on; closing it");
            }
        }
    }
}
