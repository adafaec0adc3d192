//! Running an async service (`serve`: an axum `Router`, any tower `Service`) on the worker's
//! own runtime: one task per request, many at once, up to `max_requests_in_flight` (the room
//! each holds, as on the blocking path).
//!
//! A request's task waits for `poll_ready`, calls the service, sends the status line and
//! headers, then the body frames as STDOUT records as they come, through the connection's
//! bounded output channel (a slow client slows the body, memory stays bounded). A panic in any
//! poll answers 500 (or ends a response already started) and only that task ends.
//! `request_timeout` drops the future and answers 504; a handler that blocks the thread stops
//! the whole event loop instead, which the watchdog reports to the master (see [`watchdog`]),
//! whose timeout kill then replaces the worker.
//!
//! The scoreboard slot shows the oldest request in flight: its method, URI and start, so the
//! status page's request duration is the oldest one's age.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt::Display;
use std::future::{poll_fn, Future};
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fcgi::record::{stream_encoded_len, MAX_ALIGNED_CONTENT_LEN};
use fcgi::response::ResponseWriter;
use tokio::sync::mpsc;
use tower_service::Service;

use crate::app::body::Out;
use crate::app::http::{to_http, HttpRequest};
use crate::app::request::Request;
use crate::app::response::{self, encode_head};
use crate::clock;
use crate::scoreboard::Slot;
use crate::worker::output::{self, encode, TAIL_RECORDS_LEN};
use crate::worker::run::{check_recycle, Job, Waiting};
use crate::worker::{Application, Handler, Worker};

/// Body bytes gathered before they are sent as records while more are ready at once: one
/// full aligned record. Whatever is gathered goes out as soon as the body has nothing ready,
/// so a server-sent event is not held back waiting for more.
const FLUSH_AT: usize = MAX_ALIGNED_CONTENT_LEN;

/// How often the watchdog thread looks at the event loop, and how far past `request_timeout`
/// the oldest request may get before the loop counts as stuck: the loop answers 504 at the
/// timeout itself, so a request older than this means nothing polls its timer.
const WATCHDOG_EVERY: Duration = Duration::from_millis(250);

/// The application of `serve`: what the master's setup returned, and what turns it into a
/// service in each worker, on its runtime, after the fork.
pub(crate) struct ServiceApp<T, F> {
    /// Taken in the forked worker (its own copy of the master's memory); the master's stays.
    parts: Mutex<Option<(T, F)>>,
}

impl<T, F> ServiceApp<T, F> {
    pub(crate) fn new(shared: T, per_worker: F) -> ServiceApp<T, F> {
        ServiceApp {
            parts: Mutex::new(Some((shared, per_worker))),
        }
    }
}

impl<T, F, Fut, S, E, B> Application for ServiceApp<T, F>
where
    T: Send + 'static,
    F: FnOnce(T) -> Fut + Send + 'static,
    Fut: Future<Output = Result<S, E>>,
    E: Display,
    S: Service<HttpRequest, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    fn for_worker(self: Arc<Self>, runtime: &tokio::runtime::Runtime) -> Result<Handler, String> {
        let taken = self.parts.lock().ok().and_then(|mut p| p.take());
        let Some((shared, per_worker)) = taken else {
            return Err("the service was already built in this process".into());
        };
        let service = runtime
            .block_on(per_worker(shared))
            .map_err(|e| format!("per-worker service setup failed: {e}"))?;
        Ok(Handler::Service(Arc::new(Runner::new(Called(service)))))
    }

    fn answers_its_timeouts(&self) -> bool {
        true
    }
}

/// What answers one request on the worker's runtime: an async service ([`Called`]), or the
/// relay to a foreign FastCGI program (`foreign`). Cloned for each request.
pub(crate) trait Exchange: Clone + Send + 'static {
    /// Answers `request`, sending its records for request `id` on `out` and recording in
    /// `progress` how far it got. Dropped at `request_timeout`; a panic is caught.
    fn answer<'a>(
        self,
        request: Request,
        id: u16,
        out: &'a mpsc::Sender<Out>,
        progress: &'a mut Progress,
    ) -> impl Future<Output = ()> + Send + 'a;
}

/// An async service as an [`Exchange`]: the request mapped to `http`, the response streamed.
#[derive(Clone)]
struct Called<S>(S);

impl<S, B> Exchange for Called<S>
where
    S: Service<HttpRequest, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    fn answer<'a>(
        self,
        request: Request,
        id: u16,
        out: &'a mpsc::Sender<Out>,
        progress: &'a mut Progress,
    ) -> impl Future<Output = ()> + Send + 'a {
        respond(self.0, to_http(request), id, out, progress)
    }
}

/// Starts requests of a service; the type-erased face of [`Runner`].
pub(crate) trait Serve: Send + Sync {
    /// Starts `job` (which holds its room) as a task on the worker's runtime.
    fn start(&self, worker: &Arc<Worker>, job: Job);
    /// The requests in flight, for the watchdog.
    fn in_flight(&self) -> Arc<Mutex<InFlight>>;
}

/// Runs each request of an [`Exchange`] as a task of its own.
pub(crate) struct Runner<X> {
    /// Cloned for each request (an axum `Router` is an `Arc`): `call` takes `&mut self`.
    exchange: Mutex<X>,
    in_flight: Arc<Mutex<InFlight>>,
}

impl<X> Runner<X> {
    pub(crate) fn new(exchange: X) -> Runner<X> {
        Runner {
            exchange: Mutex::new(exchange),
            in_flight: Arc::new(Mutex::new(InFlight::default())),
        }
    }
}

impl<X: Exchange> Serve for Runner<X> {
    fn start(&self, worker: &Arc<Worker>, job: Job) {
        let Ok(exchange) = self.exchange.lock().map(|s| s.clone()) else {
            // Poisoned only by a panic in `clone`: the job (and its room) is dropped, its
            // connection sees no answer and nginx a 502.
            tracing::error!(
                pid = std::process::id(),
                "service clone panicked earlier; dropping request"
            );
            return;
        };
        let task = run_one(
            Arc::clone(worker),
            exchange,
            job,
            Arc::clone(&self.in_flight),
        );
        worker.runtime.spawn(task);
    }

    fn in_flight(&self) -> Arc<Mutex<InFlight>> {
        Arc::clone(&self.in_flight)
    }
}

/// The requests in flight, oldest first, so the slot can show the oldest.
#[derive(Default)]
pub(crate) struct InFlight {
    next: u64,
    running: BTreeMap<u64, Shown>,
}

/// What the scoreboard shows of a request.
struct Shown {
    method: http::Method,
    uri: String,
    content_length: u64,
    started: Duration,
}

impl InFlight {
    /// Counts a request in; the slot shows it if it is the only one.
    fn begin(&mut self, slot: &Slot<'_>, shown: Shown, cap: u32) -> u64 {
        let key = self.next;
        self.next += 1;
        if self.running.is_empty() {
            slot.begin_request(
                shown.method.as_str(),
                &shown.uri,
                shown.content_length,
                cap,
                shown.started,
            );
        } else {
            slot.join_request(cap);
        }
        self.running.insert(key, shown);
        key
    }

    /// Counts a request out; the slot goes on showing the oldest still running (`end_request`
    /// moved its start to now).
    fn end(
        &mut self,
        slot: &Slot<'_>,
        key: u64,
        duration: Duration,
        cap: u32,
        now: Duration,
    ) -> Option<Shown> {
        let shown = self.running.remove(&key);
        slot.end_request(duration, cap, now);
        if let Some((_, o)) = self.running.first_key_value() {
            slot.show_request(o.method.as_str(), &o.uri, o.content_length, o.started);
        }
        shown
    }

    /// The URI of request `key`, for a log line.
    fn uri(&self, key: u64) -> &str {
        self.running.get(&key).map_or("", |s| s.uri.as_str())
    }

    /// When the oldest request started.
    fn oldest(&self) -> Option<Duration> {
        self.running.first_key_value().map(|(_, s)| s.started)
    }
}

/// How far a response got before its future ended or was dropped.
#[derive(Default)]
pub(crate) struct Progress {
    /// The status line and headers are on their way: a failure now can only cut the body.
    pub head_sent: bool,
    /// The tail (END_REQUEST) is on its way: nothing more is to be sent.
    pub ended: bool,
    pub status: u16,
}

impl Progress {
    /// Answers with `code` and nothing else (nothing was sent yet).
    pub(crate) async fn answer_status(
        &mut self,
        code: http::StatusCode,
        id: u16,
        out: &mpsc::Sender<Out>,
    ) {
        self.status = code.as_u16();
        self.head_sent = true;
        self.ended = true;
        let _ = out.send(encode(id, response::status(code), out)).await;
    }

    /// Ends a response whose head is out, with what was sent of its body.
    pub(crate) async fn cut_short(&mut self, id: u16, out: &mpsc::Sender<Out>) {
        self.ended = true;
        let _ = out.send(output::cut_short(id)).await;
    }
}

/// One request of an [`Exchange`], from its room to its END_REQUEST.
async fn run_one<X: Exchange>(
    worker: Arc<Worker>,
    exchange: X,
    job: Job,
    in_flight: Arc<Mutex<InFlight>>,
) {
    let Job {
        waiting:
            Waiting {
                id,
                request,
                out,
                alive,
                // Left at 0 ("not started"), so the connection does not time this request out
                // and drain the worker: a service's timeout drops the future and answers 504
                // here, and the worker serves on.
                started: _,
                // Checked by the room queue before the request starts; a service notices a
                // client that leaves later through its body's error.
                left: _,
            },
        room,
    } = job;
    let slot = worker.board.slot(worker.slot);
    let started = clock::now();
    // The request's method and URI live in its in-flight entry (the slot shows them from
    // there): log lines borrow them back rather than keep copies.
    let shown = Shown {
        method: request.method(),
        uri: request.uri().to_string(),
        content_length: request.content_length().unwrap_or(0),
        started,
    };
    // `None` only if a panic inside `InFlight` poisoned it: the request then runs unshown.
    let key = in_flight
        .lock()
        .ok()
        .map(|mut f| f.begin(&slot, shown, worker.cap));
    let uri_of = |key: Option<u64>| {
        key.and_then(|k| Some(in_flight.lock().ok()?.uri(k).to_string()))
            .unwrap_or_default()
    };
    worker.board.add_accepted();

    let mut progress = Progress::default();
    let outcome = {
        let answer = std::pin::pin!(exchange.answer(request, id, &out, &mut progress));
        let work = CatchUnwind(answer);
        match worker.settings.request_timeout {
            Some(limit) => tokio::time::timeout(limit, work).await.ok(),
            None => Some(work.await),
        }
    };
    let failed = match outcome {
        Some(Ok(())) => None,
        Some(Err(cause)) => {
            tracing::error!(
                pid = std::process::id(),
                uri = uri_of(key),
                panic = crate::worker::run::panic_message(&cause),
                "service panicked; answering 500"
            );
            Some(http::StatusCode::INTERNAL_SERVER_ERROR)
        }
        None => {
            tracing::warn!(
                pid = std::process::id(),
                uri = uri_of(key),
                timeout_ms = worker
                    .settings
                    .request_timeout
                    .unwrap_or_default()
                    .as_millis() as u64,
                "request timeout: abandoning the request (its future is dropped), answering 504"
            );
            Some(http::StatusCode::GATEWAY_TIMEOUT)
        }
    };
    // The future is gone (ended, panicked or dropped): what it did not send is sent here.
    if let Some(code) = failed {
        if !progress.head_sent {
            progress.answer_status(code, id, &out).await;
        } else if !progress.ended {
            progress.cut_short(id, &out).await;
        }
    }

    let now = clock::now();
    let duration = now.saturating_sub(started);
    worker.board.add_request(progress.status, duration);
    let shown = key.and_then(|k| {
        in_flight
            .lock()
            .ok()?
            .end(&slot, k, duration, worker.cap, now)
    });
    if let (true, Some(shown)) = (worker.settings.access_log, shown) {
        tracing::info!(
            pid = std::process::id(),
            method = %shown.method,
            uri = shown.uri,
            status = progress.status,
            duration_ms = duration.as_secs_f64() * 1000.0,
            "request"
        );
    }
    check_recycle(&worker, now);
    drop(room);
    drop(alive);
}

/// Calls the service and streams its response; records in `progress` how far it got.
async fn respond<S, B>(
    mut service: S,
    request: HttpRequest,
    id: u16,
    out: &mpsc::Sender<Out>,
    progress: &mut Progress,
) where
    S: Service<HttpRequest, Response = http::Response<B>>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    // Errors become `Send` at once: the task may move to the standby thread at any await.
    let ready: Result<(), Box<dyn StdError + Send + Sync>> = poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(Into::into);
    let called = match ready {
        Ok(()) => service.call(request).await.map_err(Into::into),
        Err(e) => Err(e),
    };
    let res = match called {
        Ok(res) => res,
        Err(e) => {
            tracing::error!(pid = std::process::id(), error = %e, "service failed; answering 500");
            let code = http::StatusCode::INTERNAL_SERVER_ERROR;
            return progress.answer_status(code, id, out).await;
        }
    };
    let (parts, body) = res.into_parts();
    progress.status = parts.status.as_u16();
    let mut body = std::pin::pin!(body);
    let fcgi = ResponseWriter::new(id);
    let mut buf = BytesMut::with_capacity(256);
    // An exact length (a buffered body) is written as Content-Length, as on the blocking path;
    // a stream of unknown length has none and nginx ends it at END_REQUEST.
    let exact = body
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok());
    encode_head(&parts, exact, &mut buf);
    progress.head_sent = true;
    loop {
        let step = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Step::Frame(frame.map(|f| f.map_err(Into::into)))),
            // Nothing more is ready: what is gathered goes out now.
            Poll::Pending if !buf.is_empty() => Poll::Ready(Step::Flush),
            Poll::Pending => Poll::Pending,
        })
        .await;
        match step {
            Step::Frame(Some(Ok(frame))) => {
                // Trailers are dropped: FastCGI has none.
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() >= FLUSH_AT && !flush(&fcgi, &mut buf, out).await {
                        return;
                    }
                }
            }
            Step::Frame(Some(Err(e))) => {
                tracing::warn!(pid = std::process::id(), error = %e, "response body failed; ending it early");
                break;
            }
            Step::Frame(None) => break,
            Step::Flush => {
                if !flush(&fcgi, &mut buf, out).await {
                    return;
                }
            }
        }
    }
    let mut tail = BytesMut::with_capacity(stream_encoded_len(buf.len()) + TAIL_RECORDS_LEN);
    fcgi.stdout(&buf, &mut tail);
    fcgi.finish(&mut tail);
    progress.ended = true;
    let _ = out.send(Out::Last(id, tail)).await;
}

/// What the body's next poll gave.
enum Step {
    /// A frame, an error, or the end.
    Frame(Option<Result<http_body::Frame<Bytes>, Box<dyn StdError + Send + Sync>>>),
    /// Nothing ready now: send what is gathered.
    Flush,
}

/// Sends what is gathered as STDOUT records, waiting while the connection's channel is full;
/// false if the connection is gone.
async fn flush(fcgi: &ResponseWriter, buf: &mut BytesMut, out: &mpsc::Sender<Out>) -> bool {
    let mut records = BytesMut::with_capacity(stream_encoded_len(buf.len()));
    fcgi.stdout(buf, &mut records);
    buf.clear();
    out.send(Out::Chunk(records.freeze())).await.is_ok()
}

/// Polls a future inside `catch_unwind`: a panic becomes `Err(payload)` and the future is not
/// polled again. Unwind safety: the future is dropped right after a panic, and nothing it
/// shared is used again but the request's output channel, which a panic cannot leave half-sent.
struct CatchUnwind<'a, F>(Pin<&'a mut F>);

impl<F: Future> Future for CatchUnwind<'_, F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
        match panic::catch_unwind(AssertUnwindSafe(move || fut.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(cause) => Poll::Ready(Err(cause)),
        }
    }
}

/// A handler that blocks its thread stops the event loop, and with it every timer that would
/// answer 504. This thread sees it: a request older than `request_timeout` plus a margin is
/// still counted in flight. It then marks the slot Busy (its start stays the oldest request's),
/// so the master's request-timeout kill, which acts on busy workers, replaces the worker.
pub(crate) fn watchdog(worker: &Arc<Worker>, serve: &Arc<dyn Serve>) -> std::io::Result<()> {
    let Some(limit) = worker.settings.request_timeout else {
        return Ok(());
    };
    let in_flight = serve.in_flight();
    let board = Arc::clone(&worker.board);
    let slot_index = worker.slot;
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut reported = false;
            loop {
                std::thread::sleep(WATCHDOG_EVERY);
                let oldest = in_flight.lock().ok().and_then(|f| f.oldest());
                let now = clock::now();
                let stuck =
                    oldest.is_some_and(|o| now.saturating_sub(o) > limit + WATCHDOG_EVERY * 2);
                if stuck && !reported {
                    reported = true;
                    let age = oldest.map(|o| now.saturating_sub(o)).unwrap_or_default();
                    tracing::error!(
                        pid = std::process::id(),
                        age_ms = age.as_millis() as u64,
                        timeout_ms = limit.as_millis() as u64,
                        "event loop stuck: a request is past request_timeout and nothing answered it (a handler blocks the thread?); the master will replace this worker"
                    );
                    board.slot(slot_index).mark_stuck();
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoreboard::Scoreboard;
    use fcgi::client::{read_response, Response as Answer};
    use std::convert::Infallible;

    const T0: Duration = Duration::from_secs(100);

    fn shown(uri: &str, started: Duration) -> Shown {
        Shown {
            method: http::Method::GET,
            uri: uri.into(),
            content_length: 0,
            started,
        }
    }

    #[test]
    fn the_slot_shows_the_oldest_request_in_flight() {
        let board = Scoreboard::new(1).expect("map");
        let slot = board.slot(0);
        slot.reset(1, T0);
        let mut f = InFlight::default();
        let s = Duration::from_secs;
        let a = f.begin(&slot, shown("/a", T0 + s(1)), 256);
        let b = f.begin(&slot, shown("/b", T0 + s(2)), 256);
        let c = f.begin(&slot, shown("/c", T0 + s(3)), 256);
        let snap = slot.snapshot();
        assert_eq!(
            (snap.uri.as_str(), snap.since, snap.in_flight),
            ("/a", T0 + s(1), 3)
        );
        // A younger one ends: the oldest stays shown.
        f.end(&slot, b, s(1), 256, T0 + s(4));
        let snap = slot.snapshot();
        assert_eq!(
            (snap.uri.as_str(), snap.since, snap.in_flight),
            ("/a", T0 + s(1), 2)
        );
        // The oldest ends: the next oldest is shown, with its own start.
        f.end(&slot, a, s(4), 256, T0 + s(5));
        let snap = slot.snapshot();
        assert_eq!(
            (snap.uri.as_str(), snap.since, snap.in_flight),
            ("/c", T0 + s(3), 1)
        );
        assert_eq!(f.oldest(), Some(T0 + s(3)));
        f.end(&slot, c, s(3), 256, T0 + s(6));
        assert_eq!(f.oldest(), None);
        assert_eq!(slot.snapshot().in_flight, 0);
    }

    /// A service answering with a body of `frames` frames of `size` bytes each.
    #[derive(Clone)]
    struct Frames {
        frames: usize,
        size: usize,
    }

    struct FramesBody(usize, usize);

    impl http_body::Body for FramesBody {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
                b'x';
                self.1
            ])))))
        }
    }

    impl Service<HttpRequest> for Frames {
        type Response = http::Response<FramesBody>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: HttpRequest) -> Self::Future {
            if req.uri().path() == "/panic" {
                panic!("asked to");
            }
            std::future::ready(Ok(http::Response::new(FramesBody(self.frames, self.size))))
        }
    }

    /// Runs `respond` for one request and decodes what it sent as a client would.
    async fn answer(service: Frames, path: &str) -> (Result<(), ()>, Progress, Answer, usize) {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut progress = Progress::default();
        let req = http::Request::builder()
            .uri(path)
            .body(crate::app::http::RequestBody::empty())
            .expect("request");
        let done = CatchUnwind(std::pin::pin!(respond(service, req, 1, &tx, &mut progress)))
            .await
            .map_err(|_| ());
        drop(tx);
        let (mut wire, mut chunks) = (BytesMut::new(), 0);
        while let Some(out) = rx.recv().await {
            match out {
                Out::Chunk(records) => {
                    chunks += 1;
                    wire.extend_from_slice(&records);
                }
                Out::Last(_, tail) => wire.extend_from_slice(&tail),
            }
        }
        fcgi::record::encode_end_request(1, 0, fcgi::ProtocolStatus::RequestComplete, &mut wire);
        let mut answer = Answer::default();
        if done.is_ok() {
            assert!(read_response(&mut wire, 1, &mut answer).expect("well-formed"));
        }
        (done, progress, answer, chunks)
    }

    #[tokio::test]
    async fn frames_are_sent_as_records_with_the_head_first() {
        let (done, progress, answer, chunks) = answer(
            Frames {
                frames: 5,
                size: 30_000,
            },
            "/",
        )
        .await;
        assert!(done.is_ok());
        assert!(progress.head_sent && progress.ended);
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.body().len(), 150_000);
        // 90,000 bytes were ready at once: a full record's worth went ahead of the tail.
        assert!(chunks >= 1, "sent as it came, not whole: {chunks} chunks");
        assert_eq!(answer.header("content-length"), None, "no exact size hint");
    }

    #[tokio::test]
    async fn a_panic_in_call_is_caught_before_anything_is_sent() {
        let (done, progress, _, chunks) = answer(Frames { frames: 1, size: 1 }, "/panic").await;
        assert!(done.is_err(), "the panic comes back as an error");
        assert!(!progress.head_sent, "so the caller can still answer 500");
        assert_eq!(chunks, 0);
    }
}
