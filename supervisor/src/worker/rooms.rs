//! A worker's room for requests: at most `max_requests_in_flight` run at once, each holding a
//! [`Room`]. A request that finds no room waits in the worker's queue, and a room that frees up
//! goes straight to the request that has waited longest: no task per waiting request, no wake
//! beyond the one that starts it.
//!
//! The accept loop takes a room before accepting (so the kernel hands connections to a worker
//! with room) and parks it while it waits; a request on a connection already open takes that
//! parked room first, since it is already here. The connection accepted keeps the room only
//! for a few milliseconds (`connection::FIRST_REQUEST_GRACE`): a room is earned by a complete
//! request, not by an open connection.
//!
//! Free rooms, the parked one and the queue are counted under one lock, so a room cannot slip
//! past a waiting request: a request queues only while no room is free, and a room is freed
//! only when no request waits.
//!
//! Generic over the waiting job `T`, and importing nothing of the worker, so its rules are
//! tested with `u32` jobs; the worker passes what starting a job means as a callback.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use tokio::sync::Notify;

/// Runs a job that got its room.
pub(crate) type Start<T> = Box<dyn Fn(T, Room<T>) + Send + Sync>;

/// Counts requests waiting for room (+1 when one queues, -1 when it gets its room): waiting
/// here is waiting for a worker, and the status page shows it.
pub(crate) type Held = Box<dyn Fn(i64) + Send + Sync>;

/// The worker's rooms, for jobs `T`.
pub(crate) struct Rooms<T> {
    state: Mutex<State<T>>,
    /// A request on an open connection took the room the accept loop had parked: the accept
    /// loop waits for room again before it accepts, so requests already here go first.
    wanted: Notify,
    held: Held,
    start: Start<T>,
}

struct State<T> {
    /// Rooms nobody holds.
    free: usize,
    /// The accept loop holds a room while it waits for a connection.
    parked: bool,
    /// Jobs waiting for room, longest first; never non-empty while a room is free.
    waiting: VecDeque<T>,
    /// The accept loop, waiting for a free room.
    accept: Option<Waker>,
}

impl<T> Rooms<T> {
    /// `rooms` rooms, all free.
    pub(crate) fn new(rooms: usize, held: Held, start: Start<T>) -> Arc<Rooms<T>> {
        Arc::new(Rooms {
            state: Mutex::new(State {
                free: rooms,
                parked: false,
                waiting: VecDeque::new(),
                accept: None,
            }),
            wanted: Notify::new(),
            held,
            start,
        })
    }

    fn lock(&self) -> Option<MutexGuard<'_, State<T>>> {
        self.state.lock().ok()
    }

    /// Resolves when a request took the room the accept loop parked.
    pub(crate) async fn parked_room_taken(&self) {
        self.wanted.notified().await
    }

    /// Starts `job` now if there is room (`reserved`, the connection's own, else a free one,
    /// else the one the accept loop has parked); otherwise queues it.
    pub(crate) fn start_or_wait(self: &Arc<Self>, job: T, reserved: Option<Room<T>>) {
        if let Some(room) = reserved {
            return (self.start)(job, room);
        }
        let Some(mut state) = self.lock() else {
            return;
        };
        if state.free > 0 {
            state.free -= 1;
        } else if state.parked {
            state.parked = false;
            // The accept loop lost its room: it stops accepting until it has one again.
            self.wanted.notify_one();
        } else {
            state.waiting.push_back(job);
            drop(state);
            (self.held)(1);
            return;
        }
        drop(state);
        (self.start)(job, Room::new(self));
    }

    /// Whether a request arriving now would start at once: a room is free, or parked by the
    /// accept loop. One lock, no wait: asked for every request that reaches an idle connection.
    pub(crate) fn has_room(&self) -> bool {
        self.lock().is_some_and(|s| s.free > 0 || s.parked)
    }

    /// A free room, for the accept loop; waits until one is free. Nothing is taken until it
    /// returns, so dropping it loses no room.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Option<Room<T>> {
        std::future::poll_fn(|cx| {
            let Some(mut state) = self.lock() else {
                return Poll::Ready(None);
            };
            if state.free > 0 {
                state.free -= 1;
                Poll::Ready(Some(Room::new(self)))
            } else {
                state.accept = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// The room the accept loop parked, if no request took it.
    pub(crate) fn unpark(self: &Arc<Self>) -> Option<Room<T>> {
        let mut state = self.lock()?;
        if !state.parked {
            return None;
        }
        state.parked = false;
        drop(state);
        Some(Room::new(self))
    }
}

/// Room for one job. Dropped, it goes to the next waiting job, or back to the worker.
pub(crate) struct Room<T> {
    /// `None` once parked: the room is then counted in [`State::parked`].
    rooms: Option<Arc<Rooms<T>>>,
}

impl<T> Room<T> {
    fn new(rooms: &Arc<Rooms<T>>) -> Room<T> {
        Room {
            rooms: Some(Arc::clone(rooms)),
        }
    }

    /// Parks the accept loop's room where a request on an open connection can take it.
    pub(crate) fn park(mut self) {
        if let Some(rooms) = self.rooms.take() {
            if let Some(mut state) = rooms.lock() {
                state.parked = true;
            }
        }
    }
}

impl<T> Drop for Room<T> {
    fn drop(&mut self) {
        let Some(rooms) = self.rooms.take() else {
            return;
        };
        let Some(mut state) = rooms.lock() else {
            return;
        };
        match state.waiting.pop_front() {
            Some(job) => {
                drop(state);
                (rooms.held)(-1);
                (rooms.start)(job, Room::new(&rooms));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::task::{Context, Wake};

    /// Rooms whose started jobs arrive on the returned receiver, with the held counter.
    #[allow(clippy::type_complexity)]
    fn rooms(
        n: usize,
    ) -> (
        Arc<Rooms<u32>>,
        mpsc::Receiver<(u32, Room<u32>)>,
        Arc<AtomicI64>,
    ) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let held = Arc::new(AtomicI64::new(0));
        let counter = Arc::clone(&held);
        let rooms = Rooms::new(
            n,
            Box::new(move |d| {
                counter.fetch_add(d, Ordering::SeqCst);
            }),
            Box::new(move |job, room| {
                let _ = tx.lock().expect("sender").send((job, room));
            }),
        );
        (rooms, rx, held)
    }

    /// Counts its wake-ups.
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll<F: Future>(f: std::pin::Pin<&mut F>, wakes: &Arc<Wakes>) -> Poll<F::Output> {
        let waker = Waker::from(Arc::clone(wakes));
        f.poll(&mut Context::from_waker(&waker))
    }

    fn wakes() -> Arc<Wakes> {
        Arc::new(Wakes(AtomicUsize::new(0)))
    }

    fn started(rx: &mpsc::Receiver<(u32, Room<u32>)>) -> Vec<(u32, Room<u32>)> {
        rx.try_iter().collect()
    }

    #[test]
    fn waiting_jobs_start_in_arrival_order_as_rooms_free_up() {
        let (rooms, rx, held) = rooms(1);
        rooms.start_or_wait(1, None);
        let mut running = started(&rx);
        assert_eq!(
            running.len(),
            1,
            "the free room starts the first job at once"
        );
        for job in [2, 3, 4] {
            rooms.start_or_wait(job, None);
        }
        assert!(started(&rx).is_empty(), "no room: the others wait");
        assert_eq!(held.load(Ordering::SeqCst), 3);
        let mut order = Vec::new();
        while let Some((_, room)) = running.pop() {
            drop(room);
            running = started(&rx);
            order.extend(running.iter().map(|(job, _)| *job));
        }
        assert_eq!(order, [2, 3, 4]);
        assert_eq!(held.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_freed_room_goes_to_the_waiting_job_before_the_accept_loop() {
        let (rooms, rx, _) = rooms(1);
        rooms.start_or_wait(1, None);
        rooms.start_or_wait(2, None);
        let wakes = wakes();
        let mut acquire = pin!(rooms.acquire());
        assert!(poll(acquire.as_mut(), &wakes).is_pending());
        let (_, first) = started(&rx).pop().expect("job 1 runs");
        drop(first);
        let (job, second) = started(&rx).pop().expect("job 2 got the room");
        assert_eq!(job, 2);
        assert!(poll(acquire.as_mut(), &wakes).is_pending());
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "the accept loop was not woken"
        );
        drop(second);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(matches!(
            poll(acquire.as_mut(), &wakes),
            Poll::Ready(Some(_))
        ));
    }

    #[test]
    fn a_cancelled_acquire_loses_no_room() {
        let (rooms, rx, _) = rooms(1);
        rooms.start_or_wait(1, None);
        let (_, room) = started(&rx).pop().expect("job 1 runs");
        let wakes = wakes();
        {
            let mut acquire = pin!(rooms.acquire());
            assert!(poll(acquire.as_mut(), &wakes).is_pending());
            drop(room);
            assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
            // Dropped once woken but before it runs again, as a `select!` that chose
            // another branch would.
        }
        rooms.start_or_wait(2, None);
        assert_eq!(
            started(&rx).len(),
            1,
            "the room is still free for the next job"
        );
    }

    #[test]
    fn a_request_takes_the_parked_room_and_the_accept_loop_hears_of_it() {
        let (rooms, rx, held) = rooms(1);
        let wakes = wakes();
        let room = match poll(pin!(rooms.acquire()), &wakes) {
            Poll::Ready(Some(room)) => room,
            _ => panic!("a free room is acquired at once"),
        };
        room.park();
        rooms.start_or_wait(1, None);
        assert_eq!(started(&rx).len(), 1, "the parked room started the job");
        assert_eq!(held.load(Ordering::SeqCst), 0);
        assert!(poll(pin!(rooms.parked_room_taken()), &wakes).is_ready());
        assert!(rooms.unpark().is_none(), "nothing is left to unpark");
    }

    #[test]
    fn an_unparked_room_is_the_accept_loops_again() {
        let (rooms, rx, _) = rooms(1);
        let wakes = wakes();
        let Poll::Ready(Some(room)) = poll(pin!(rooms.acquire()), &wakes) else {
            panic!("a free room is acquired at once");
        };
        room.park();
        let room = rooms.unpark().expect("still parked");
        assert!(rooms.unpark().is_none(), "unparked once");
        assert!(poll(pin!(rooms.parked_room_taken()), &wakes).is_pending());
        rooms.start_or_wait(1, None);
        assert!(
            started(&rx).is_empty(),
            "the accept loop holds the only room"
        );
        drop(room);
        assert_eq!(
            started(&rx).len(),
            1,
            "given back, it goes to the waiting job"
        );
    }

    #[test]
    fn a_reserved_room_starts_its_job_past_the_queue() {
        let (rooms, rx, _) = rooms(1);
        let wakes = wakes();
        let Poll::Ready(Some(reserved)) = poll(pin!(rooms.acquire()), &wakes) else {
            panic!("a free room is acquired at once");
        };
        rooms.start_or_wait(1, None);
        assert!(started(&rx).is_empty());
        rooms.start_or_wait(2, Some(reserved));
        let (job, room) = started(&rx).pop().expect("job 2 runs in its reserved room");
        assert_eq!(job, 2);
        assert!(started(&rx).is_empty(), "job 1 still waits");
        drop(room);
        let (job, _room) = started(&rx)
            .pop()
            .expect("the room went to the waiting job");
        assert_eq!(job, 1);
    }

    #[test]
    fn a_parked_room_abandoned_at_drain_still_serves_a_request() {
        // At drain the accept loop is aborted with its room parked; a request on a kept-alive
        // connection must still find it, or it would wait forever.
        let (rooms, rx, _) = rooms(2);
        let wakes = wakes();
        let Poll::Ready(Some(room)) = poll(pin!(rooms.acquire()), &wakes) else {
            panic!("a free room is acquired at once");
        };
        room.park();
        rooms.start_or_wait(1, None);
        rooms.start_or_wait(2, None);
        let running = started(&rx);
        assert_eq!(running.len(), 2, "the free room and the parked one");
        rooms.start_or_wait(3, None);
        assert!(started(&rx).is_empty(), "no third room");
        drop(running);
        assert_eq!(started(&rx).len(), 1);
    }
}
