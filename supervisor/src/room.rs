//! A worker's room for requests: at most `max_requests_in_flight` run at once, each holding a
//! [`Room`]. A request that finds no room waits in the worker's queue, and a room that frees up
//! goes straight to the request that has waited longest: no task per waiting request, no wake
//! beyond the one that starts it.
//!
//! The accept loop takes a room before accepting (so the kernel hands connections to a worker
//! with room) and parks it while it waits; a request on a connection already open takes that
//! parked room first, since it is already here.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::sync::OwnedSemaphorePermit;

use crate::connection::{schedule_busy_check, Context};
use crate::handler::Job;
use crate::request::Request;
use crate::response::Out;

/// Room for one request. Dropped, it goes to the next waiting request, or back to the worker.
pub(crate) struct Room {
    permit: Option<OwnedSemaphorePermit>,
    ctx: Arc<Context>,
}

impl Room {
    pub(crate) fn new(permit: OwnedSemaphorePermit, ctx: &Arc<Context>) -> Room {
        Room {
            permit: Some(permit),
            ctx: Arc::clone(ctx),
        }
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            if let Some(permit) = give_to_waiting(&self.ctx, permit, false) {
                drop(permit);
            }
        }
    }
}

/// A request waiting for room.
pub(crate) struct Waiting {
    pub id: u16,
    pub request: Request,
    pub out: mpsc::Sender<Out>,
}

impl Waiting {
    fn with(self, room: Room) -> Job {
        Job {
            id: self.id,
            request: self.request,
            out: self.out,
            room,
        }
    }
}

/// Starts `waiting` now if there is room (the connection's reserved room, a free one, or the
/// one the accept loop has parked); otherwise queues it.
pub(crate) fn start_or_wait(ctx: &Arc<Context>, waiting: Waiting, reserved: &mut Option<Room>) {
    let room = reserved
        .take()
        .or_else(|| free_room(ctx))
        .or_else(|| parked_room(ctx));
    if let Some(room) = room {
        return start(ctx, waiting.with(room));
    }
    let Ok(mut queue) = ctx.waiting.lock() else {
        return;
    };
    // Looked at again under the lock: a room freed since is either seen here or, once this
    // request is queued, given to it.
    match free_room(ctx) {
        Some(room) => {
            drop(queue);
            start(ctx, waiting.with(room));
        }
        None => {
            queue.push_back(waiting);
            // Waiting here is waiting for a worker: the status page counts it.
            ctx.board.slot(ctx.slot).add_held(1);
        }
    }
}

/// Gives `permit` to the request that has waited longest. With none waiting it is returned if
/// `keep`, else released (under the queue's lock, so no request is queued past it).
pub(crate) fn give_to_waiting(
    ctx: &Arc<Context>,
    permit: OwnedSemaphorePermit,
    keep: bool,
) -> Option<OwnedSemaphorePermit> {
    let Ok(mut queue) = ctx.waiting.lock() else {
        return Some(permit);
    };
    match queue.pop_front() {
        Some(waiting) => {
            drop(queue);
            ctx.board.slot(ctx.slot).add_held(-1);
            start(ctx, waiting.with(Room::new(permit, ctx)));
            None
        }
        None if keep => Some(permit),
        None => {
            drop(permit);
            None
        }
    }
}

/// Once the accept loop has stopped: the room it parked, or gave back to the worker as it was
/// cancelled, goes to the requests waiting for room.
pub(crate) fn settle(ctx: &Arc<Context>) {
    if let Some(permit) = ctx.parked_room.lock().ok().and_then(|mut p| p.take()) {
        drop(Room::new(permit, ctx));
    }
    while ctx.waiting.lock().is_ok_and(|queue| !queue.is_empty()) {
        match free_room(ctx) {
            // Dropped, the room goes to the request that has waited longest.
            Some(room) => drop(room),
            None => break,
        }
    }
}

fn free_room(ctx: &Arc<Context>) -> Option<Room> {
    let permit = Arc::clone(&ctx.permits).try_acquire_owned().ok()?;
    Some(Room::new(permit, ctx))
}

/// The room the accept loop holds, if it holds one; it stops accepting until it has room again.
fn parked_room(ctx: &Arc<Context>) -> Option<Room> {
    let permit = ctx.parked_room.lock().ok()?.take()?;
    ctx.wanted.notify_one();
    Some(Room::new(permit, ctx))
}

/// Runs a request that has its room: on the I/O thread if it is free, else on a handler thread.
fn start(ctx: &Arc<Context>, job: Job) {
    if let Err(job) = ctx.inline.offer(job) {
        let _ = ctx.jobs.send(job);
    }
    schedule_busy_check(ctx);
}
