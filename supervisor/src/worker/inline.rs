//! Requests run on the I/O thread itself when it is free. Handing a request to a handler thread
//! and its answer back costs two thread wake-ups, more than a fast request costs in all.
//!
//! The worker's event loop is a current-thread tokio runtime, and any thread may drive it, one
//! at a time. The I/O thread drives it until a connection offers it a request; it then leaves
//! the runtime, runs the request and comes back. While it is away nothing polls the sockets, so
//! a standby thread takes the runtime over as soon as the request would wait for the event loop
//! (its body has not all arrived, its output channel is full: see [`will_block`]) or once it has
//! run for [`TAKEOVER_AFTER`], and lets go when the request ends. A long request therefore never
//! keeps status pages, pings, accepting or moving idle connections waiting longer than that.
//! A request offered while the I/O thread is busy goes to a handler thread, as before.

use std::cell::RefCell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use tokio::sync::Notify;

use crate::clock;

/// How long a request runs on the I/O thread before the standby thread drives the event loop.
pub(crate) const TAKEOVER_AFTER: Duration = Duration::from_millis(5);

/// How long jobs run back to back on the I/O thread before the answers they produced are
/// written.
const YIELD_AFTER: Duration = Duration::from_micros(200);

/// After this long without a request the standby thread sleeps until the next one starts,
/// instead of looking every [`TAKEOVER_AFTER`].
const STANDBY_IDLE_AFTER: Duration = Duration::from_secs(1);

/// The hand-off between connections, the I/O thread and the standby thread, for jobs `T`.
pub(crate) struct Inline<T> {
    /// The request offered to the I/O thread and not yet taken.
    next: Mutex<Option<T>>,
    /// Wakes the I/O thread's wait for `next`.
    offered: Notify,
    /// From the moment a request is offered until it has run: more go to handler threads.
    busy: AtomicBool,
    /// Requests run so far; the standby thread drives for one of them at a time.
    started: AtomicU64,
    /// When the running request started (microseconds of the scoreboard clock); 0 when none.
    since: AtomicU64,
    /// Wakes the standby thread's drive when the request ends.
    ended: Notify,
    /// The standby thread sleeps without a deadline: a request starting must wake it.
    standby_asleep: AtomicBool,
    /// The standby thread is driving (or about to drive) the runtime.
    driving: AtomicBool,
    /// The I/O thread, woken when the standby thread lets go of the runtime.
    io_thread: OnceLock<Thread>,
    /// How long a request runs before the standby thread takes over.
    takeover_after: Duration,
    wake: Arc<Wake>,
}

/// How a request about to block tells the standby thread to take over.
struct Wake {
    /// The running request is about to wait for the event loop: take it over now.
    urgent: AtomicBool,
    /// The standby thread, for `unpark`.
    standby: OnceLock<Thread>,
}

impl Wake {
    fn standby(&self) {
        if let Some(t) = self.standby.get() {
            t.unpark();
        }
    }
}

thread_local! {
    /// Set on the I/O thread while it runs a request.
    static RUNNING: RefCell<Option<Arc<Wake>>> = const { RefCell::new(None) };
}

/// Called by request and response streams before they block on the I/O task (installed as
/// their hook by [`Inline::new`]): if this is the
/// I/O thread running a request, the standby thread must drive the event loop at once, or the
/// wait would never end.
fn will_block() {
    RUNNING.with(|running| {
        if let Some(wake) = running.borrow().as_ref() {
            wake.urgent.store(true, SeqCst);
            wake.standby();
        }
    });
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl<T> Inline<T> {
    /// The worker's runner; installs [`will_block`] as the body streams' hook.
    pub(crate) fn new() -> Arc<Inline<T>> {
        crate::app::body::set_before_block(will_block);
        Self::with_takeover_after(TAKEOVER_AFTER)
    }

    fn with_takeover_after(takeover_after: Duration) -> Arc<Inline<T>> {
        Arc::new(Inline {
            next: Mutex::new(None),
            offered: Notify::new(),
            busy: AtomicBool::new(false),
            started: AtomicU64::new(0),
            since: AtomicU64::new(0),
            ended: Notify::new(),
            standby_asleep: AtomicBool::new(false),
            driving: AtomicBool::new(false),
            io_thread: OnceLock::new(),
            takeover_after,
            wake: Arc::new(Wake {
                urgent: AtomicBool::new(false),
                standby: OnceLock::new(),
            }),
        })
    }

    /// Offers `job` to the I/O thread; gives it back if that thread already has one.
    pub(crate) fn offer(&self, job: T) -> Result<(), T> {
        if self.busy.swap(true, SeqCst) {
            return Err(job);
        }
        match self.next.lock() {
            Ok(mut next) => *next = Some(job),
            Err(_) => {
                self.busy.store(false, SeqCst);
                return Err(job);
            }
        }
        self.offered.notify_one();
        Ok(())
    }

    /// The next offered request; the I/O thread awaits this inside the runtime.
    pub(crate) async fn next(&self) -> T {
        loop {
            if let Some(job) = self.next.lock().ok().and_then(|mut next| next.take()) {
                return job;
            }
            self.offered.notified().await;
        }
    }

    /// The I/O thread's life: drive `runtime` until `main` ends, leaving it to `run` each job
    /// offered, and handing each answer to `deliver` back inside the runtime, where waking the
    /// connection's task costs no system call.
    pub(crate) fn drive<A, D>(
        &self,
        runtime: &tokio::runtime::Runtime,
        mut main: tokio::task::JoinHandle<D>,
        mut run: impl FnMut(T) -> A,
        mut deliver: impl FnMut(A),
    ) -> Result<D, tokio::task::JoinError> {
        let mut answered = None;
        let mut back_to_back = std::time::Instant::now();
        loop {
            let step = runtime.block_on(async {
                if let Some(answer) = answered.take() {
                    deliver(answer);
                    // Jobs waiting for this thread run back to back, and their answers are
                    // written when it next waits. Past a budget it lets the runtime write them
                    // (and read what came in) first, so a queue of jobs holds no answer back.
                    if back_to_back.elapsed() >= YIELD_AFTER {
                        tokio::task::yield_now().await;
                        back_to_back = std::time::Instant::now();
                    }
                }
                let next = async {
                    tokio::select! {
                        biased;
                        done = &mut main => Err(done),
                        job = self.next() => Ok(job),
                    }
                };
                tokio::pin!(next);
                std::future::poll_fn(|cx| {
                    let step = Future::poll(next.as_mut(), cx);
                    if step.is_pending() {
                        // Waiting: the runtime runs every task before this is polled again.
                        back_to_back = std::time::Instant::now();
                    }
                    step
                })
                .await
            });
            match step {
                Ok(job) => answered = Some(self.run(job, &mut run)),
                Err(done) => return done,
            }
        }
    }

    /// Runs `job` with `run` on the calling thread, outside the runtime, while the standby
    /// thread watches.
    pub(crate) fn run<U>(&self, job: T, run: impl FnOnce(T) -> U) -> U {
        if self.io_thread.get().is_none() {
            let _ = self.io_thread.set(std::thread::current());
        }
        self.wake.urgent.store(false, SeqCst);
        self.started.fetch_add(1, SeqCst);
        self.since.store(micros(clock::now()), SeqCst);
        if self.standby_asleep.load(SeqCst) {
            self.wake.standby();
        }
        RUNNING.with(|r| *r.borrow_mut() = Some(Arc::clone(&self.wake)));
        let result = run(job);
        RUNNING.with(|r| *r.borrow_mut() = None);
        self.since.store(0, SeqCst);
        self.busy.store(false, SeqCst);
        self.ended.notify_waiters();
        // If the standby thread drives the runtime, wait until it lets go: this thread could
        // take the next job without the runtime, leaving nobody to drive it.
        while self.driving.load(SeqCst) {
            std::thread::park();
        }
        result
    }

    /// The standby thread's life: wait until the request on the I/O thread needs the event
    /// loop driven, drive it until that request ends, and again.
    pub(crate) fn standby(&self, runtime: &tokio::runtime::Runtime) -> ! {
        let _ = self.wake.standby.set(std::thread::current());
        loop {
            let run = self.wait_for_takeover();
            self.driving.store(true, SeqCst);
            runtime.block_on(self.until_end(run));
            self.driving.store(false, SeqCst);
            if let Some(t) = self.io_thread.get() {
                t.unpark();
            }
        }
    }

    /// Blocks until the running request has been out of the event loop too long or is about to
    /// wait for it; returns its number.
    fn wait_for_takeover(&self) -> u64 {
        let mut last_seen = (self.started.load(SeqCst), clock::now());
        loop {
            let since = self.since.load(SeqCst);
            let now = clock::now();
            if since != 0 {
                // `urgent` before `started`: an urgent request is never mistaken for the one
                // before it, which would spend its wake-up on a request already over.
                let urgent = self.wake.urgent.swap(false, SeqCst);
                let run = self.started.load(SeqCst);
                let ran = now.saturating_sub(Duration::from_micros(since));
                if urgent || ran >= self.takeover_after {
                    return run;
                }
                last_seen = (run, now);
                std::thread::park_timeout(self.takeover_after - ran);
                continue;
            }
            let started = self.started.load(SeqCst);
            if started != last_seen.0 {
                last_seen = (started, now);
            }
            if now.saturating_sub(last_seen.1) < STANDBY_IDLE_AFTER {
                std::thread::park_timeout(self.takeover_after.min(STANDBY_IDLE_AFTER));
                continue;
            }
            // Quiet for a while: sleep until a request starts (it unparks us).
            self.standby_asleep.store(true, SeqCst);
            if self.since.load(SeqCst) == 0 {
                std::thread::park();
            }
            self.standby_asleep.store(false, SeqCst);
            last_seen = (self.started.load(SeqCst), clock::now());
        }
    }

    /// Resolves when request number `run` is no longer running.
    async fn until_end(&self, run: u64) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.since.load(SeqCst) == 0 || self.started.load(SeqCst) != run {
                return;
            }
            ended.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A runtime, an `Inline` and its standby thread, as a worker sets them up.
    fn setup(takeover_after: Duration) -> (Arc<tokio::runtime::Runtime>, Arc<Inline<u32>>) {
        let runtime = Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        );
        let inline = Inline::with_takeover_after(takeover_after);
        let (i, rt) = (Arc::clone(&inline), Arc::clone(&runtime));
        std::thread::spawn(move || i.standby(&rt));
        (runtime, inline)
    }

    /// Runs one job offered from inside the runtime; `job` runs on this thread, outside it,
    /// with a task spawned meanwhile that signals `ran` once the event loop polls it.
    fn run_one(
        runtime: &tokio::runtime::Runtime,
        inline: &Arc<Inline<u32>>,
        job: impl FnOnce(mpsc::Receiver<()>),
    ) {
        let offer = Arc::clone(inline);
        let got = runtime.block_on(async move {
            tokio::spawn(async move { offer.offer(7).expect("the I/O thread is free") });
            inline.next().await
        });
        assert_eq!(got, 7);
        let (ran_tx, ran_rx) = mpsc::channel();
        runtime.spawn(async move {
            let _ = ran_tx.send(());
        });
        inline.run(got, |_| job(ran_rx));
    }

    #[test]
    fn a_long_request_hands_the_event_loop_to_the_standby_thread() {
        let (runtime, inline) = setup(Duration::from_millis(5));
        run_one(&runtime, &inline, |ran| {
            // Nothing polls tasks while this thread is away, unless the standby thread took
            // over: without it this waits the full 10 s and fails.
            assert!(ran.recv_timeout(Duration::from_secs(10)).is_ok());
        });
        // Back on this thread: the event loop is ours again and the next job comes here.
        run_one(&runtime, &inline, |_| {});
    }

    #[test]
    fn a_request_about_to_block_is_taken_over_at_once() {
        // A takeover deadline longer than the test: only `will_block` can make it happen.
        let (runtime, inline) = setup(Duration::from_secs(3600));
        run_one(&runtime, &inline, |ran| {
            assert!(
                ran.try_recv().is_err(),
                "no task runs while this thread is away"
            );
            will_block();
            assert!(ran.recv_timeout(Duration::from_secs(10)).is_ok());
        });
    }

    #[test]
    fn answers_are_written_between_jobs_that_run_back_to_back() {
        // Three jobs queued for the I/O thread, each offered as the previous one's answer is
        // delivered (as a waiting request gets the room its predecessor gives back). Each runs
        // past the budget, so each answer is written (a task runs) before the next job starts.
        let (runtime, inline) = setup(Duration::from_secs(3600));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (all_written_tx, all_written) = tokio::sync::oneshot::channel::<()>();
        let all_written_tx = Arc::new(Mutex::new(Some(all_written_tx)));
        let offer = Arc::clone(&inline);
        let main = runtime.spawn(async move {
            offer.offer(1).expect("free");
            let _ = all_written.await;
        });
        let (run_log, write_log) = (Arc::clone(&log), Arc::clone(&log));
        let offer = Arc::clone(&inline);
        let done = inline.drive(
            &runtime,
            main,
            |job| {
                std::thread::sleep(Duration::from_millis(1));
                run_log.lock().expect("log").push(format!("run {job}"));
                job
            },
            |job| {
                let (log, tx) = (Arc::clone(&write_log), Arc::clone(&all_written_tx));
                tokio::spawn(async move {
                    log.lock().expect("log").push(format!("written {job}"));
                    if job == 3 {
                        if let Some(tx) = tx.lock().expect("tx").take() {
                            let _ = tx.send(());
                        }
                    }
                });
                if job < 3 {
                    offer.offer(job + 1).expect("free again once delivered");
                }
            },
        );
        assert!(done.is_ok());
        assert_eq!(
            *log.lock().expect("log"),
            [
                "run 1",
                "written 1",
                "run 2",
                "written 2",
                "run 3",
                "written 3"
            ]
        );
    }

    #[test]
    fn one_job_at_a_time() {
        let inline = Inline::<u32>::with_takeover_after(TAKEOVER_AFTER);
        assert!(inline.offer(1).is_ok());
        assert_eq!(inline.offer(2), Err(2));
        let first = inline.next.lock().expect("lock").take();
        assert_eq!(first, Some(1));
        inline.run(1, |_| {});
        assert!(inline.offer(3).is_ok(), "free again once the job has run");
    }
}
