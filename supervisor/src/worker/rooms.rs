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
//! A waiting job has an age and a bound (the [`Admission`] rules): past `queue_timeout` it is
//! refused ([`Rooms::expire`], asked by one timer per worker), a job that finds `max_queue`
//! waiting is refused at once, and a job whose client is gone is dropped unrun: skipped when
//! its turn comes, and swept out whenever another job queues, so it holds no place.
//!
//! Generic over the waiting job `T`, and importing nothing of the worker, so its rules are
//! tested with `u32` jobs and time as a parameter; the worker passes what starting a job,
//! refusing one and a gone client mean as callbacks ([`Hooks`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;

/// Runs a job that got its room.
pub(crate) type Start<T> = Box<dyn Fn(T, Room<T>) + Send + Sync>;

/// Counts requests waiting for room (+1 when one queues, -1 when it gets its room): waiting
/// here is waiting for a worker, and the status page shows it.
pub(crate) type Held = Box<dyn Fn(i64) + Send + Sync>;

/// Why a job was not run: see [`crate::scoreboard::Refused`].
pub(crate) use crate::scoreboard::Refused;

/// Answers a job that will not run, and says why.
pub(crate) type Refuse<T> = Box<dyn Fn(T, Refused) + Send + Sync>;

/// Whether a waiting job's client is gone.
pub(crate) type Gone<T> = Box<dyn Fn(&T) -> bool + Send + Sync>;

/// What the worker does with jobs: start, refuse, count waiting ones, and tell a gone client.
pub(crate) struct Hooks<T> {
    pub held: Held,
    pub start: Start<T>,
    pub refuse: Refuse<T>,
    pub gone: Gone<T>,
}

/// The bounds on waiting: `max_queue` and `queue_timeout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Admission {
    /// Jobs that may wait at once; one more is refused at once.
    pub max_queue: Option<usize>,
    /// How long a job may wait before it is refused.
    pub queue_timeout: Option<Duration>,
}

/// The worker's rooms, for jobs `T`.
pub(crate) struct Rooms<T> {
    state: Mutex<State<T>>,
    /// A request on an open connection took the room the accept loop had parked: the accept
    /// loop waits for room again before it accepts, so requests already here go first.
    wanted: Notify,
    /// A job queued: the expiry timer has something to watch (a permit is kept if it is not
    /// waiting at that moment).
    queued: Notify,
    /// A room became free or was parked: a request waiting undecoded on its connection for
    /// room here looks again.
    freed: Notify,
    admission: Admission,
    hooks: Hooks<T>,
}

struct State<T> {
    /// Rooms nobody holds.
    free: usize,
    /// The accept loop holds a room while it waits for a connection.
    parked: bool,
    /// Jobs waiting for room, longest first, with when each queued; never non-empty while a
    /// room is free.
    waiting: VecDeque<(Duration, T)>,
    /// The accept loop, waiting for a free room.
    accept: Option<Waker>,
}

impl<T> Rooms<T> {
    /// `rooms` rooms, all free.
    pub(crate) fn new(rooms: usize, admission: Admission, hooks: Hooks<T>) -> Arc<Rooms<T>> {
        Arc::new(Rooms {
            state: Mutex::new(State {
                free: rooms,
                parked: false,
                waiting: VecDeque::new(),
                accept: None,
            }),
            wanted: Notify::new(),
            queued: Notify::new(),
            freed: Notify::new(),
            admission,
            hooks,
        })
    }

    /// Refuses `jobs` (outside the lock: refusing answers a client) and uncounts them.
    fn refuse_all(&self, jobs: Vec<(T, Refused)>) {
        for (job, why) in jobs {
            (self.hooks.held)(-1);
            (self.hooks.refuse)(job, why);
        }
    }

    /// Refuses, at `now`, the waiting jobs past `queue_timeout` (or whose client is gone, at
    /// the front); returns when the next one will be, if any waits. `None` as well without a
    /// `queue_timeout`: then nothing expires.
    pub(crate) fn expire(&self, now: Duration) -> Option<Duration> {
        let timeout = self.admission.queue_timeout?;
        let mut refused = Vec::new();
        let next = {
            let mut state = self.lock()?;
            loop {
                let Some((queued, job)) = state.waiting.front() else {
                    break None;
                };
                let deadline = *queued + timeout;
                let why = if (self.hooks.gone)(job) {
                    Refused::Abandoned
                } else if now >= deadline {
                    Refused::QueueTimeout
                } else {
                    break Some(deadline);
                };
                if let Some((_, job)) = state.waiting.pop_front() {
                    refused.push((job, why));
                }
            }
        };
        self.refuse_all(refused);
        next
    }

    /// Resolves once a job has queued since the last call (at once if one did meanwhile).
    pub(crate) async fn job_queued(&self) {
        self.queued.notified().await
    }

    fn lock(&self) -> Option<MutexGuard<'_, State<T>>> {
        self.state.lock().ok()
    }

    /// Resolves once a room became free or was parked: one waiter is woken for each (or the
    /// next to wait, if none waits).
    pub(crate) fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Resolves when a request took the room the accept loop parked.
    pub(crate) async fn parked_room_taken(&self) {
        self.wanted.notified().await
    }

    /// Starts `job` now if there is room (`reserved`, the connection's own, else a free one,
    /// else the one the accept loop has parked); otherwise queues it at `now`, unless
    /// `max_queue` jobs wait already: then it is refused at once. Jobs whose client is gone
    /// are swept out first, so they take no place.
    pub(crate) fn start_or_wait(
        self: &Arc<Self>,
        job: T,
        reserved: Option<Room<T>>,
        now: Duration,
    ) {
        if let Some(room) = reserved {
            return (self.hooks.start)(job, room);
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
            let mut refused = Vec::new();
            if !state.waiting.is_empty() {
                let mut kept = VecDeque::with_capacity(state.waiting.len() + 1);
                for (queued, waiting) in state.waiting.drain(..) {
                    if (self.hooks.gone)(&waiting) {
                        refused.push((waiting, Refused::Abandoned));
                    } else {
                        kept.push_back((queued, waiting));
                    }
                }
                state.waiting = kept;
            }
            let full = self
                .admission
                .max_queue
                .is_some_and(|max| state.waiting.len() >= max);
            let over = if full {
                Some(job)
            } else {
                state.waiting.push_back((now, job));
                None
            };
            drop(state);
            self.refuse_all(refused);
            match over {
                Some(job) => (self.hooks.refuse)(job, Refused::QueueFull),
                None => {
                    (self.hooks.held)(1);
                    self.queued.notify_one();
                }
            }
            return;
        }
        drop(state);
        (self.hooks.start)(job, Room::new(self));
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
            rooms.freed.notify_one();
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
        // Jobs whose client left are passed over, never run.
        let mut gone = Vec::new();
        let next = loop {
            match state.waiting.pop_front() {
                Some((_, job)) if (rooms.hooks.gone)(&job) => gone.push((job, Refused::Abandoned)),
                next => break next,
            }
        };
        match next {
            Some((_, job)) => {
                drop(state);
                rooms.refuse_all(gone);
                (rooms.hooks.held)(-1);
                (rooms.hooks.start)(job, Room::new(&rooms));
            }
            None => {
                state.free += 1;
                let accept = state.accept.take();
                drop(state);
                rooms.refuse_all(gone);
                if let Some(accept) = accept {
                    accept.wake();
                }
                rooms.freed.notify_one();
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

    const T0: Duration = Duration::from_secs(100);
    const MS: Duration = Duration::from_millis(1);

    /// What a test sees of its rooms: started jobs with their rooms, refused jobs with why,
    /// the held counter, and the jobs whose client is gone.
    struct Seen {
        started: mpsc::Receiver<(u32, Room<u32>)>,
        refused: mpsc::Receiver<(u32, Refused)>,
        held: Arc<AtomicI64>,
        gone: Arc<Mutex<Vec<u32>>>,
    }

    impl Seen {
        fn refused(&self) -> Vec<(u32, Refused)> {
            self.refused.try_iter().collect()
        }

        fn leave(&self, job: u32) {
            self.gone.lock().expect("gone").push(job);
        }
    }

    fn admitting(n: usize, admission: Admission) -> (Arc<Rooms<u32>>, Seen) {
        let (tx, started) = mpsc::channel();
        let tx = Mutex::new(tx);
        let (refused_tx, refused) = mpsc::channel();
        let refused_tx = Mutex::new(refused_tx);
        let held = Arc::new(AtomicI64::new(0));
        let counter = Arc::clone(&held);
        let gone = Arc::new(Mutex::new(Vec::new()));
        let left = Arc::clone(&gone);
        let rooms = Rooms::new(
            n,
            admission,
            Hooks {
                held: Box::new(move |d| {
                    counter.fetch_add(d, Ordering::SeqCst);
                }),
                start: Box::new(move |job, room| {
                    let _ = tx.lock().expect("sender").send((job, room));
                }),
                refuse: Box::new(move |job, why| {
                    let _ = refused_tx.lock().expect("sender").send((job, why));
                }),
                gone: Box::new(move |job| left.lock().expect("gone").contains(job)),
            },
        );
        let seen = Seen {
            started,
            refused,
            held,
            gone,
        };
        (rooms, seen)
    }

    /// Rooms without admission bounds whose started jobs arrive on the returned receiver, with
    /// the held counter.
    #[allow(clippy::type_complexity)]
    fn rooms(
        n: usize,
    ) -> (
        Arc<Rooms<u32>>,
        mpsc::Receiver<(u32, Room<u32>)>,
        Arc<AtomicI64>,
    ) {
        let (rooms, seen) = admitting(n, Admission::default());
        (rooms, seen.started, seen.held)
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
        rooms.start_or_wait(1, None, T0);
        let mut running = started(&rx);
        assert_eq!(
            running.len(),
            1,
            "the free room starts the first job at once"
        );
        for job in [2, 3, 4] {
            rooms.start_or_wait(job, None, T0);
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
    fn a_room_freed_with_nobody_queued_wakes_one_request_waiting_on_its_connection() {
        let (rooms, rx, _) = rooms(1);
        rooms.start_or_wait(1, None, T0);
        let (_, first) = started(&rx).pop().expect("job 1 runs");
        let (a, b) = (wakes(), wakes());
        let mut freed_a = pin!(rooms.freed());
        let mut freed_b = pin!(rooms.freed());
        assert!(poll(freed_a.as_mut(), &a).is_pending());
        assert!(poll(freed_b.as_mut(), &b).is_pending());
        drop(first);
        let woken = a.0.load(Ordering::SeqCst) + b.0.load(Ordering::SeqCst);
        assert_eq!(woken, 1, "one waiter for one room");
        assert!(rooms.has_room());
        // A room handed straight to a queued job wakes nobody: it is not free.
        rooms.start_or_wait(2, None, T0);
        rooms.start_or_wait(3, None, T0);
        let (_, second) = started(&rx).pop().expect("job 2 runs");
        let c = wakes();
        let mut freed_c = pin!(rooms.freed());
        assert!(poll(freed_c.as_mut(), &c).is_pending());
        drop(second);
        assert_eq!(started(&rx).len(), 1, "job 3 got the room");
        assert_eq!(c.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_freed_room_goes_to_the_waiting_job_before_the_accept_loop() {
        let (rooms, rx, _) = rooms(1);
        rooms.start_or_wait(1, None, T0);
        rooms.start_or_wait(2, None, T0);
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
        rooms.start_or_wait(1, None, T0);
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
        rooms.start_or_wait(2, None, T0);
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
        rooms.start_or_wait(1, None, T0);
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
        rooms.start_or_wait(1, None, T0);
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
        rooms.start_or_wait(1, None, T0);
        assert!(started(&rx).is_empty());
        rooms.start_or_wait(2, Some(reserved), T0);
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
        rooms.start_or_wait(1, None, T0);
        rooms.start_or_wait(2, None, T0);
        let running = started(&rx);
        assert_eq!(running.len(), 2, "the free room and the parked one");
        rooms.start_or_wait(3, None, T0);
        assert!(started(&rx).is_empty(), "no third room");
        drop(running);
        assert_eq!(started(&rx).len(), 1);
    }

    #[test]
    fn a_job_waiting_past_queue_timeout_is_refused_and_the_next_deadline_is_told() {
        let timeout = 500 * MS;
        let (rooms, seen) = admitting(
            1,
            Admission {
                max_queue: None,
                queue_timeout: Some(timeout),
            },
        );
        rooms.start_or_wait(1, None, T0);
        let running = started(&seen.started);
        rooms.start_or_wait(2, None, T0 + 100 * MS);
        rooms.start_or_wait(3, None, T0 + 300 * MS);
        assert_eq!(
            rooms.expire(T0 + 599 * MS),
            Some(T0 + 600 * MS),
            "job 2 not yet"
        );
        assert!(seen.refused().is_empty());
        assert_eq!(
            rooms.expire(T0 + 600 * MS),
            Some(T0 + 800 * MS),
            "job 2 at exactly its timeout; job 3 is next"
        );
        assert_eq!(seen.refused(), [(2, Refused::QueueTimeout)]);
        assert_eq!(seen.held.load(Ordering::SeqCst), 1);
        assert_eq!(rooms.expire(T0 + 10_000 * MS), None, "nothing waits");
        assert_eq!(seen.refused(), [(3, Refused::QueueTimeout)]);
        assert_eq!(seen.held.load(Ordering::SeqCst), 0);
        drop(running);
        rooms.start_or_wait(4, None, T0 + 10_001 * MS);
        assert_eq!(
            started(&seen.started).len(),
            1,
            "the room went back, not to a refused job"
        );
    }

    #[test]
    fn without_queue_timeout_nothing_expires() {
        let (rooms, seen) = admitting(1, Admission::default());
        rooms.start_or_wait(1, None, T0);
        rooms.start_or_wait(2, None, T0);
        assert_eq!(rooms.expire(T0 + Duration::from_secs(3600)), None);
        assert!(seen.refused().is_empty());
    }

    #[test]
    fn past_max_queue_a_job_is_refused_at_once() {
        let (rooms, seen) = admitting(
            1,
            Admission {
                max_queue: Some(2),
                queue_timeout: None,
            },
        );
        for job in 1..=4 {
            rooms.start_or_wait(job, None, T0);
        }
        let running = started(&seen.started);
        assert_eq!(running.len(), 1, "job 1 runs");
        assert_eq!(
            seen.refused(),
            [(4, Refused::QueueFull)],
            "2 and 3 wait, 4 is one too many"
        );
        assert_eq!(seen.held.load(Ordering::SeqCst), 2);
        drop(running);
        let running = started(&seen.started);
        assert_eq!(running.iter().map(|r| r.0).collect::<Vec<_>>(), [2]);
        rooms.start_or_wait(5, None, T0);
        assert!(seen.refused().is_empty(), "a place came free");
        let (rooms, seen) = admitting(
            1,
            Admission {
                max_queue: Some(0),
                queue_timeout: None,
            },
        );
        rooms.start_or_wait(1, None, T0);
        rooms.start_or_wait(2, None, T0);
        assert_eq!(
            seen.refused(),
            [(2, Refused::QueueFull)],
            "0: no waiting at all"
        );
        assert_eq!(seen.held.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_job_whose_client_left_never_runs_and_holds_no_place() {
        let (rooms, seen) = admitting(
            1,
            Admission {
                max_queue: Some(2),
                queue_timeout: Some(500 * MS),
            },
        );
        rooms.start_or_wait(1, None, T0);
        let running = started(&seen.started);
        rooms.start_or_wait(2, None, T0);
        rooms.start_or_wait(3, None, T0);
        seen.leave(2);
        // The queue is full, but job 2's place is swept free for job 4.
        rooms.start_or_wait(4, None, T0 + MS);
        assert_eq!(seen.refused(), [(2, Refused::Abandoned)]);
        assert_eq!(seen.held.load(Ordering::SeqCst), 2);
        seen.leave(3);
        drop(running);
        let running = started(&seen.started);
        assert_eq!(
            running.iter().map(|r| r.0).collect::<Vec<_>>(),
            [4],
            "job 3 is passed over when its turn comes"
        );
        assert_eq!(seen.refused(), [(3, Refused::Abandoned)]);
        assert_eq!(seen.held.load(Ordering::SeqCst), 0);
        rooms.start_or_wait(5, None, T0 + 2 * MS);
        seen.leave(5);
        assert_eq!(
            rooms.expire(T0 + 3 * MS),
            None,
            "a gone job at the front is abandoned, not timed out"
        );
        assert_eq!(seen.refused(), [(5, Refused::Abandoned)]);
        drop(running);
        rooms.start_or_wait(6, None, T0 + 4 * MS);
        assert_eq!(started(&seen.started).len(), 1);
    }
}
