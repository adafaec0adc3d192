//! A worker's room for requests: at most `max_requests_in_flight` run at once, each holding a
//! [`Room`]. A request that finds no room waits in the worker's queue, and a room that frees up
//! goes straight to the request that has waited longest: no task per waiting request, no wake
//! beyond the one that starts it.
//!
//! The accept loop takes a room before accepting (so the kernel hands connections to a worker
//! with room) and parks it while it waits; a request on a connection already open takes that
//! parked room first, since it is already here.
//!
//! Free rooms, the parked one and the queue are counted under one lock, so a room cannot slip
//! past a waiting request: a request queues only while no room is free, and a room is freed
//! only when no request waits.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use tokio::sync::mpsc;

use crate::app::request::Request;
use crate::app::response::Out;
use crate::worker::connection::{schedule_busy_check, Context};
use crate::worker::run::Job;

/// The worker's rooms.
pub(crate) struct Rooms {
    state: Mutex<State>,
}

struct State {
    /// Rooms nobody holds.
    free: usize,
    /// The accept loop holds a room while it waits for a connection.
    parked: bool,
    /// Requests waiting for room, longest first; never non-empty while a room is free.
    waiting: VecDeque<Waiting>,
    /// The accept loop, waiting for a free room.
    accept: Option<Waker>,
}

impl Rooms {
    pub(crate) fn new(rooms: usize) -> Rooms {
        Rooms {
            state: Mutex::new(State {
                free: rooms,
                parked: false,
                waiting: VecDeque::new(),
                accept: None,
            }),
        }
    }

    fn lock(&self) -> Option<MutexGuard<'_, State>> {
        self.state.lock().ok()
    }
}

/// Room for one request. Dropped, it goes to the next waiting request, or back to the worker.
pub(crate) struct Room {
    /// `None` once parked: the room is then counted in [`State::parked`].
    ctx: Option<Arc<Context>>,
}

impl Room {
    fn new(ctx: &Arc<Context>) -> Room {
        Room {
            ctx: Some(Arc::clone(ctx)),
        }
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        let Some(ctx) = self.ctx.take() else { return };
        let Some(mut state) = ctx.rooms.lock() else {
            return;
        };
        match state.waiting.pop_front() {
            Some(waiting) => {
                drop(state);
                ctx.board.slot(ctx.slot).add_held(-1);
                start(&ctx, waiting.with(Room::new(&ctx)));
            }
            None => {
                state.free += 1;
                let accept = state.accept.take();
                drop(state);
                if let Some(accept) = accept {
                    accept.wake();
                }
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
    if let Some(room) = reserved.take() {
        return start(ctx, waiting.with(room));
    }
    let Some(mut state) = ctx.rooms.lock() else {
        return;
    };
    if state.free > 0 {
        state.free -= 1;
    } else if state.parked {
        state.parked = false;
        // The accept loop lost its room: it stops accepting until it has one again.
        ctx.wanted.notify_one();
    } else {
        state.waiting.push_back(waiting);
        drop(state);
        // Waiting here is waiting for a worker: the status page counts it.
        ctx.board.slot(ctx.slot).add_held(1);
        return;
    }
    drop(state);
    start(ctx, waiting.with(Room::new(ctx)));
}

/// A free room, for the accept loop; waits until one is free. Nothing is taken until it
/// returns, so dropping it loses no room.
pub(crate) async fn acquire(ctx: &Arc<Context>) -> Option<Room> {
    std::future::poll_fn(|cx| {
        let Some(mut state) = ctx.rooms.lock() else {
            return Poll::Ready(None);
        };
        if state.free > 0 {
            state.free -= 1;
            Poll::Ready(Some(Room::new(ctx)))
        } else {
            state.accept = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await
}

/// Parks the accept loop's room where a request on an open connection can take it.
pub(crate) fn park(mut room: Room) {
    if let Some(ctx) = room.ctx.take() {
        if let Some(mut state) = ctx.rooms.lock() {
            state.parked = true;
        }
    }
}

/// The room the accept loop parked, if no request took it.
pub(crate) fn unpark(ctx: &Arc<Context>) -> Option<Room> {
    let mut state = ctx.rooms.lock()?;
    if !state.parked {
        return None;
    }
    state.parked = false;
    drop(state);
    Some(Room::new(ctx))
}

/// Runs a request that has its room: on the I/O thread if it is free, else on a handler thread.
fn start(ctx: &Arc<Context>, job: Job) {
    if let Err(job) = ctx.inline.offer(job) {
        let _ = ctx.jobs.send(job);
    }
    schedule_busy_check(ctx);
}
