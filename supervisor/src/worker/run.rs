//! Running a request, and the worker's handler threads.
//!
//! Application code is blocking by design (that is the point of a prefork server), so it runs
//! outside the event loop: on the I/O thread when that thread is free (`inline.rs`), else on one
//! of `max_requests_in_flight` handler threads, each running one request at a time. A panic
//! costs only its request, which is answered `500`; the thread and the worker keep serving.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::app::body::{send_out, Out};
use crate::app::request::Request;
use crate::app::response;
use crate::clock;
use crate::worker::output::encode;
use crate::worker::{rooms, Alive, Worker};

/// Room for one request: see `rooms.rs`.
pub(crate) type Room = rooms::Room<Waiting>;

/// A request waiting for room.
pub(crate) struct Waiting {
    pub id: u16,
    pub request: Request,
    pub out: mpsc::Sender<Out>,
    /// The worker lives on while a request of it runs, even if its connection has closed.
    pub alive: Alive,
    /// Set to [`clock::now`] in microseconds when it starts: its connection times it out.
    pub started: Arc<std::sync::atomic::AtomicU64>,
    /// Set by its connection when the client is gone (FCGI_ABORT_REQUEST, or the connection
    /// closed) while it waits: it is then never run.
    pub left: Arc<std::sync::atomic::AtomicBool>,
}

impl Waiting {
    /// Its client is gone: the connection said so, or closed (nothing reads the answer).
    pub(crate) fn gone(&self) -> bool {
        self.left.load(Ordering::Acquire) || self.out.is_closed()
    }

    /// The request, now that it has its room.
    pub(crate) fn with(self, room: Room) -> Job {
        Job {
            waiting: self,
            room,
        }
    }
}

/// One request to run.
pub(crate) struct Job {
    pub waiting: Waiting,
    /// Held while the request runs: the worker's cap on requests in flight.
    pub room: Room,
}

/// Runs a request that has its room: on the I/O thread if it is free, else on a handler thread.
pub(crate) fn start(worker: &Arc<Worker>, job: Job) {
    if let crate::worker::Handler::Service(service) = &worker.app {
        return service.start(worker, job);
    }
    if let Err(job) = worker.inline.offer(job) {
        let _ = worker.jobs.send(job);
    }
}

/// When this worker should stop taking requests and exit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recycle {
    /// Requests after which the worker recycles itself (`max_requests` with jitter).
    pub request_limit: Option<u64>,
    /// Resident memory above which the worker recycles itself.
    pub max_rss: Option<u64>,
}

/// The request count after which one worker recycles itself: `None` when `max_requests` is 0,
/// else `max_requests` plus a pseudo-random offset in `0..=jitter` drawn from `seed`, so the
/// workers of one pool do not all restart together.
pub(crate) fn request_limit(max_requests: u64, jitter: u64, seed: u64) -> Option<u64> {
    if max_requests == 0 {
        return None;
    }
    if jitter == 0 {
        return Some(max_requests);
    }
    // splitmix64: a fixed, well-mixed hash of the seed; no randomness source needed.
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    Some(max_requests.saturating_add(z % (jitter.saturating_add(1)).max(1)))
}

/// How often the scoreboard's RSS is refreshed when no `max_rss` asks for every request:
/// reading /proc costs a few microseconds, too much for every request of a fast handler.
const RSS_EVERY: Duration = Duration::from_secs(1);

/// Starts `n` handler threads taking jobs from `rx`.
pub(crate) fn spawn_handlers(
    n: usize,
    rx: std_mpsc::Receiver<Job>,
    worker: &Arc<Worker>,
) -> std::io::Result<()> {
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..n {
        let rx = Arc::clone(&rx);
        let worker = Arc::clone(worker);
        std::thread::Builder::new()
            .name(format!("handler-{i}"))
            .spawn(move || loop {
                // The lock is held only while waiting for the next job, never while running one.
                let job = match rx.lock() {
                    Ok(guard) => guard.recv(),
                    Err(_) => return,
                };
                match job {
                    Ok(job) => run(&worker, job),
                    Err(_) => return,
                }
            })?;
    }
    Ok(())
}

/// Runs one request to its end on a handler thread.
fn run(worker: &Worker, job: Job) {
    let done = respond(worker, job);
    let _ = send_out(&done.out, done.tail);
    done.finish.finish(worker);
}

/// A request the application has answered: the tail of its response is still to be sent to
/// the connection, then `finish` does the bookkeeping.
pub(crate) struct Answered {
    pub out: mpsc::Sender<Out>,
    pub tail: Out,
    pub finish: Finish,
}

/// What is left of a request once its response is on its way.
pub(crate) struct Finish {
    request: Request,
    status: u16,
    started: Duration,
    /// Held while the request runs: the worker's cap on requests in flight.
    room: Room,
    alive: Alive,
}

/// Runs the application for one request, on a handler thread or on the I/O thread
/// (`inline.rs`); a streamed body is written here too.
pub(crate) fn respond(worker: &Worker, job: Job) -> Answered {
    let Job {
        waiting:
            Waiting {
                id,
                mut request,
                out,
                alive,
                started: started_at,
                left: _,
            },
        room,
    } = job;
    let slot = worker.board.slot(worker.slot);
    let started = clock::now();
    started_at.store(
        u64::try_from(started.as_micros())
            .unwrap_or(u64::MAX)
            .max(1),
        Ordering::Release,
    );
    slot.begin_request(
        request.method().as_str(),
        request.uri(),
        request.content_length().unwrap_or(0),
        worker.cap,
        started,
    );
    worker.board.add_accepted();
    tracing::debug!(pid = std::process::id(), method = %request.method(), uri = request.uri(), "request started");

    let answered = panic::catch_unwind(AssertUnwindSafe(|| match &worker.app {
        crate::worker::Handler::Blocking(app) => app.respond(&mut request),
        // A service's requests never reach here (`start`).
        crate::worker::Handler::Service(_) => {
            response::status(http::StatusCode::INTERNAL_SERVER_ERROR)
        }
    }));
    let res = answered.unwrap_or_else(|cause| {
        tracing::error!(
            pid = std::process::id(),
            uri = request.uri(),
            panic = panic_message(&cause),
            "responder panicked; answering 500"
        );
        response::status(http::StatusCode::INTERNAL_SERVER_ERROR)
    });
    let status = res.status().as_u16();
    let tail =
        panic::catch_unwind(AssertUnwindSafe(|| encode(id, res, &out))).unwrap_or_else(|_| {
            // The body stream panicked part-way: the status is already sent, so end the
            // request with what was written.
            tracing::error!(
                pid = std::process::id(),
                uri = request.uri(),
                "response stream panicked; ending it early"
            );
            crate::worker::output::cut_short(id)
        });
    // Counted before the tail goes out, so a client that has its answer (and asks the status
    // page next) finds it counted: the metrics are exact, and the duration is at most what
    // the client saw.
    worker
        .board
        .add_request(status, clock::now().saturating_sub(started));
    Answered {
        out,
        tail,
        finish: Finish {
            request,
            status,
            started,
            room,
            alive,
        },
    }
}

impl Finish {
    /// Records the request in the scoreboard and the access log, and gives its room back.
    pub(crate) fn finish(self, worker: &Worker) {
        let Finish {
            request,
            status,
            started,
            room,
            alive,
        } = self;
        let slot = worker.board.slot(worker.slot);
        let now = clock::now();
        slot.end_request(now.saturating_sub(started), worker.cap, now);
        if worker.settings.access_log {
            tracing::info!(
                pid = std::process::id(),
                method = %request.method(),
                uri = request.uri(),
                status,
                duration_ms = now.saturating_sub(started).as_secs_f64() * 1000.0,
                "request"
            );
        }
        drop(request);
        // Decide on recycling before giving the room back, so the accept loop, which needs that
        // room, already sees the drain and does not take a connection it would not serve.
        check_recycle(worker, now);
        drop(room);
        drop(alive);
    }
}

pub(crate) fn check_recycle(worker: &Worker, now: Duration) {
    let slot = worker.board.slot(worker.slot);
    let recycle = &worker.settings.recycle;
    let served = slot.requests();
    let over_requests = recycle.request_limit.is_some_and(|limit| served >= limit);
    let last = Duration::from_micros(worker.rss_measured.load(Ordering::Relaxed));
    let measure = recycle.max_rss.is_some() || now.saturating_sub(last) >= RSS_EVERY;
    let rss = if measure { clock::self_rss() } else { None };
    if measure {
        let micros = u64::try_from(now.as_micros()).unwrap_or(u64::MAX);
        worker.rss_measured.store(micros, Ordering::Relaxed);
    }
    if let Some(bytes) = rss {
        slot.set_rss(bytes);
    }
    let over_rss = matches!((rss, recycle.max_rss), (Some(r), Some(max)) if r > max);
    if (over_requests || over_rss) && !worker.recycle_now.swap(true, Ordering::AcqRel) {
        tracing::info!(
            pid = std::process::id(),
            requests = served,
            rss = rss.unwrap_or(0),
            reason = if over_requests {
                "max_requests"
            } else {
                "max_rss"
            },
            "worker recycling"
        );
        worker.drain.send_replace(true);
    }
}

pub(crate) fn panic_message(cause: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = cause.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = cause.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_limits_with_jitter() {
        assert_eq!(request_limit(0, 10, 1), None);
        assert_eq!(request_limit(500, 0, 1), Some(500));
        let limits: std::collections::BTreeSet<u64> = (0..50)
            .map(|seed| request_limit(500, 50, seed).expect("on"))
            .collect();
        assert!(limits.iter().all(|l| (500..=550).contains(l)));
        assert!(limits.len() > 10, "the seed spreads the limits: {limits:?}");
    }
}
