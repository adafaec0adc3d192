//! Any FastCGI program (php-cgi, a Perl `FCGI` script, a libfcgi binary, fcgiwrap) as the
//! pool's application: `fcgi-pool [flags] -- /usr/bin/php-cgi`.
//!
//! Each worker, forked as for a Rust application, starts one child running the program, the
//! way FastCGI programs expect to be started: file descriptor 0 is a listening unix socket (in
//! a directory only this user can enter) on which the program calls `accept`. The worker's
//! event loop keeps accepting nginx's connections and holding idle kept-alive ones, as for any
//! application; a request that gets the worker's one room is relayed to the child as a task on
//! that same event loop ([`relay`]), over a connection kept open between requests when the
//! program honours `FCGI_KEEP_CONN`: its records are sent, the body as it arrives, and the
//! answer's records go back to nginx as they come, relabelled with nginx's request id. Nothing
//! waits on the program but that task: status pages, pings, accepting and moving connections
//! go on meanwhile. The scoreboard slot is the worker's, so the status page, the pool's sizing
//! and request timeouts see the program as they see a Rust application. At `request_timeout`
//! the task is dropped: the child running the request is killed (it is stuck, and would hold
//! the next request too), the client gets a 504, and the next request starts another child.
//!
//! A child that exits between requests (`PHP_FCGI_MAX_REQUESTS`) is replaced before the next
//! request, or, when it was exiting just as that request was sent, replaced and the request
//! sent again: a program that exits 0 without a byte of answer did not run it. A child that
//! dies while it runs a request costs that request a `502 Bad Gateway` (or a short body once
//! the header is out); the connection from nginx stays open. A worker killed by the master
//! takes its child along (`PR_SET_PDEATHSIG`).

mod cgi;
mod process;
mod relay;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fcgi::record::{self, kind, ProtocolStatus};
use http::StatusCode;
use http_body::Body as _;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::app::body::Out;
use crate::config::{Config, Program};
use crate::worker::{Application, Exchange, Handler, Progress, Runner};
use crate::{Request, RequestBody};
use process::{quiet, Link, PoolDir, Process, EXIT_WAIT, POLL_STEP};
use relay::{Done, Nginx};

/// The request id on a connection to the child: one request at a time on each.
const REQUEST_ID: u16 = 1;
/// Request bodies up to this size are read before the request is sent and sent in one write,
/// and can be sent again to a replacement if the child was exiting. With the chunk that
/// crosses it (at most a record, 64 KiB) it stays under what a unix socket buffers for a
/// connection not yet accepted (`net.core.wmem_default`, 208 KiB), so the write never waits
/// for the program. Larger bodies stream alongside the answer.
const INLINE_BODY_MAX: usize = 64 * 1024;
/// Environment variables that are the pool's business, not the program's: what systemd and a
/// previous master hand over (a program that saw `LISTEN_FDS` might try to use fds it does not
/// have). Every `SUPERVISOR_*` variable is removed too.
const POOL_ENV: &[&str] = &[
    // php-cgi would fork this many children of its own, all accepting on its socket: the
    // worker sends one request at a time, so they would only sit there, and a child killed
    // at a request timeout would leave them running. The pool's `workers` is the knob.
    CHILDREN_VAR,
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
];

/// php-cgi's own process manager: how many children it forks.
const CHILDREN_VAR: &str = "PHP_FCGI_CHILDREN";

/// A `PHP_FCGI_CHILDREN` asking for children, as the workers would see it: the configured
/// `env`, else the master's environment unless `clear_env`.
fn php_children(cfg: &Config) -> Option<String> {
    let configured = cfg
        .process
        .env
        .iter()
        .find(|(name, _)| name == CHILDREN_VAR);
    let value = match configured {
        Some((_, value)) => value.clone(),
        None if cfg.process.clear_env => return None,
        None => std::env::var(CHILDREN_VAR).ok()?,
    };
    (!matches!(value.trim(), "" | "0")).then_some(value)
}

/// Runs the pool with the configured `program` as each worker's application, and exits the
/// process (as [`crate::run`] does). What `fcgi-pool` runs.
pub fn run_program() -> ! {
    std::process::exit(crate::boot::run(Foreign::new, false))
}

/// The application of a pool of foreign programs: one child per worker.
pub(crate) struct Foreign {
    program: Program,
    dir: PoolDir,
    /// The worker's child, started by `init_worker`; `None` after it died and before its
    /// replacement started.
    child: Mutex<Option<Process>>,
    /// Children started by this worker, for unique socket names.
    started: AtomicU64,
}

impl Foreign {
    /// Runs in the master before any fork: checks what the configuration cannot, and makes
    /// the directory the workers' sockets live in.
    fn new(cfg: &Config) -> Result<Foreign, String> {
        let program = cfg.program.clone().ok_or_else(|| {
            "no program to run: give it after `--` (fcgi-pool --listen unix:/run/php.sock -- \
             /usr/bin/php-cgi) or as program = [\"/usr/bin/php-cgi\"] in the config file"
                .to_string()
        })?;
        if cfg.max_requests_in_flight.get() > 1 {
            return Err(format!(
                "max_requests_in_flight is {}, but a FastCGI program runs one request at a \
                 time: leave it at 1 and set workers instead",
                cfg.max_requests_in_flight
            ));
        }
        if let Some(n) = php_children(cfg) {
            tracing::warn!(
                PHP_FCGI_CHILDREN = n,
                workers = cfg.pool.workers,
                "PHP_FCGI_CHILDREN is not passed to the program: each worker runs one process of it, one request at a time; set workers for more processes"
            );
        }
        Ok(Foreign {
            program,
            dir: PoolDir::create()?,
            child: Mutex::new(None),
            started: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Process>> {
        // A panic while holding the lock left at worst a child that is checked before use.
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a child and waits until it accepts a connection.
    fn start(&self) -> Result<Process, String> {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let socket = self
            .dir
            .path
            .join(format!("{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .map_err(|e| format!("cannot make the program's socket {}: {e}", socket.display()))?;
        let mut cmd = Command::new(&self.program.path);
        cmd.args(&self.program.args)
            .stdin(Stdio::from(OwnedFd::from(listener)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own group: a Ctrl-C in the terminal reaches the pool, whose master decides,
            // not the program in the middle of a request.
            .process_group(0);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SUPERVISOR_") {
                cmd.env_remove(name);
            }
        }
        for name in POOL_ENV {
            cmd.env_remove(name);
        }
        crate::sys::dies_with_parent(&mut cmd);
        let program = self.program.path.display().to_string();
        let child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_file(&socket);
            format!("cannot start program {program}: {e}")
        })?;
        let mut process = Process {
            child,
            socket,
            kept: None,
            served: 0,
        };
        process.wait_ready(&program)?;
        tracing::info!(
            pid = std::process::id(),
            program_pid = process.child.id(),
            program,
            "program started"
        );
        Ok(process)
    }

    /// A connection to a live child, starting one first if there is none or it has exited:
    /// the one kept from its last request if the child has not closed it, else a new one. A
    /// child whose socket refuses (or resets) the connection is exiting: once it is gone, another is
    /// started and connected to. Says which child it found gone, if one was, so that the
    /// caller can tell whether that one had a request of its own.
    async fn connect(self: &Arc<Self>) -> Result<(Link, Option<Exited>), String> {
        let mut gone = self.ensure_child().await?;
        loop {
            let (socket, program_pid) = {
                let mut child = self.lock();
                let process = child.as_mut().ok_or("no program")?;
                process.served += 1;
                let program_pid = process.child.id();
                if let Some(conn) = process.kept.take() {
                    let link = Link {
                        conn,
                        program_pid,
                        reused: true,
                    };
                    return Ok((link, gone));
                }
                (process.socket.clone(), program_pid)
            };
            let error = match UnixStream::connect(&socket).await {
                Ok(conn) => {
                    let link = Link {
                        conn,
                        program_pid,
                        reused: false,
                    };
                    return Ok((link, gone));
                }
                Err(e) => e,
            };
            // Refused: the child closed its socket. Reset: it closed the socket with this
            // connection still in its queue, never accepted. Either way it is exiting, and
            // the request never reached it.
            let exiting = matches!(
                error.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
            );
            let exit = if exiting && gone.is_none() {
                self.reap(EXIT_WAIT).await
            } else {
                None
            };
            let Some(exit) = exit else {
                return Err(format!(
                    "cannot connect to the program's socket {}: {error}",
                    socket.display()
                ));
            };
            gone = Some(exit);
            self.ensure_child().await?;
        }
    }

    /// Makes sure there is a child: the one running, unless it exited (then says how), else
    /// a new one.
    async fn ensure_child(self: &Arc<Self>) -> Result<Option<Exited>, String> {
        let (missing, gone) = {
            let mut child = self.lock();
            let mut gone = None;
            if let Some(process) = child.as_mut() {
                process.kept = process.kept.take().filter(quiet);
                // Asked every time, kept connection or not: a program's descendant may hold
                // the connection open after the program itself exited.
                if let Ok(Some(status)) = process.child.try_wait() {
                    gone = Some(Exited {
                        pid: process.child.id(),
                        status,
                        served: process.served,
                    });
                    *child = None;
                }
            }
            (child.is_none(), gone)
        };
        if missing {
            // Starting waits for the program to answer (tens of milliseconds for php-cgi):
            // on a thread of its own, so the event loop goes on meanwhile.
            let me = Arc::clone(self);
            let started = tokio::task::spawn_blocking(move || me.start())
                .await
                .map_err(|e| format!("the thread starting the program failed: {e}"))??;
            *self.lock() = Some(started);
        }
        Ok(gone)
    }

    /// Keeps `conn`, whose request is over, for the next request to the same child.
    fn keep(&self, conn: UnixStream, program_pid: u32) {
        if let Some(process) = self.lock().as_mut() {
            if process.child.id() == program_pid {
                process.kept = Some(conn);
            }
        }
    }

    /// After a connection failed: waits up to `wait` for the child to exit, and if it did,
    /// drops it (the next request starts another) and says how it ended.
    async fn reap(&self, wait: Duration) -> Option<Exited> {
        let deadline = Instant::now() + wait;
        loop {
            {
                let mut child = self.lock();
                let process = child.as_mut()?;
                match process.child.try_wait() {
                    Ok(Some(status)) => {
                        let exit = Exited {
                            pid: process.child.id(),
                            status,
                            served: process.served,
                        };
                        *child = None;
                        return Some(exit);
                    }
                    Ok(None) if Instant::now() < deadline => {}
                    _ => return None,
                }
            }
            tokio::time::sleep(POLL_STEP).await;
        }
    }

    /// Relays one request to the child, sending it again where that is safe (see the module
    /// doc), and answers 502 (503 for a program that says it is overloaded) when no answer
    /// came.
    async fn relay(
        self: Arc<Self>,
        mut req: Request,
        id: u16,
        out: &mpsc::Sender<Out>,
        progress: &mut Progress,
    ) {
        let uri = req.uri().to_string();
        let role = req.role();
        let mut records = BytesMut::new();
        // keep_conn: a program that honours it (php-cgi, libfcgi) saves an accept and a close
        // per request; one that does not closes it, and the next request opens another.
        record::encode_begin_request(REQUEST_ID, role, true, &mut records);
        fcgi::client::encode_params(REQUEST_ID, req.params(), &mut records);
        let content_length = req.content_length();
        let mut body = RequestBody::new(req.take_body(), content_length);
        let whole = match read_prefix(&mut body, &mut records).await {
            Ok(whole) => whole,
            Err(e) => {
                tracing::warn!(pid = std::process::id(), uri, error = %e, "cannot read the request body");
                return progress
                    .answer_status(StatusCode::BAD_REQUEST, id, out)
                    .await;
            }
        };
        let mut rest_of_body = None;
        if whole {
            relay::end_streams(role, &mut records);
        } else {
            rest_of_body = Some(body);
        }
        let to = Nginx { id, out, uri: &uri };
        // Sent again at most once on a fresh connection when a kept one was closing, and at most
        // once to a new child when the child was exiting on its own.
        let (mut fresh_retried, mut replayed) = (false, false);
        // Why the last attempt failed, while it is not known whether its child ran the
        // request: it went out on a kept connection that failed, and the child had not exited
        // yet when that was seen.
        let mut in_doubt: Option<String> = None;
        loop {
            let (link, gone) = match self.connect().await {
                Ok(found) => found,
                Err(why) => {
                    tracing::error!(
                        pid = std::process::id(),
                        uri,
                        error = why,
                        "no program to run the request; answered 502"
                    );
                    return progress
                        .answer_status(StatusCode::BAD_GATEWAY, id, out)
                        .await;
                }
            };
            match (gone, in_doubt.take()) {
                (Some(exit), None) => exited_between_requests(&exit),
                // The child the last attempt reached has exited since.
                (Some(exit), Some(_)) if may_resend(&exit, replayed) => {
                    replayed = true;
                    sent_again(&uri, &exit);
                }
                (Some(exit), Some(why)) => {
                    return no_answer(&uri, &why, Some(&exit), id, out, progress).await
                }
                // It lives, and closed the kept connection without reading the request.
                (None, _) => {}
            }
            let streamed = rest_of_body.is_some();
            let running = Running {
                foreign: &self,
                program_pid: link.program_pid,
                uri: &uri,
            };
            let attempt = relay::attempt(
                link.conn,
                &records,
                rest_of_body.take(),
                role,
                &to,
                progress,
            )
            .await;
            running.over();
            let failure = match attempt {
                Ok(Done::Answered(conn)) => {
                    if let Some(conn) = conn {
                        self.keep(conn, link.program_pid);
                    }
                    return;
                }
                Ok(Done::ClientGone) => return,
                Err(failure) => failure,
            };
            if progress.head_sent {
                tracing::error!(
                    pid = std::process::id(),
                    uri,
                    error = failure.why,
                    "program stopped mid-response; the body is cut short"
                );
                // A child that died is replaced by the next request's `connect`.
                return progress.cut_short(id, out).await;
            }
            if let Some(refusal) = failure.refused {
                // Overloaded is the program's word for "not now": 503, as nginx answers it.
                let code = if refusal == ProtocolStatus::Overloaded {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                };
                tracing::warn!(
                    pid = std::process::id(),
                    uri,
                    error = failure.why,
                    status = code.as_u16(),
                    "program refused the request"
                );
                return progress.answer_status(code, id, out).await;
            }
            let unanswered = !failure.answered && !streamed;
            // A kept connection failing at once most often means the child closed it and
            // lives on: look without waiting, and try a fresh connection; if that finds the
            // child gone after all, the rule below applies there.
            let retry_fresh = link.reused && unanswered && !fresh_retried;
            let exit = self
                .reap(if retry_fresh {
                    Duration::ZERO
                } else {
                    EXIT_WAIT
                })
                .await;
            match exit {
                None if retry_fresh => {
                    fresh_retried = true;
                    in_doubt = Some(failure.why);
                }
                Some(exit) if unanswered && may_resend(&exit, replayed) => {
                    replayed = true;
                    sent_again(&uri, &exit);
                }
                exit => {
                    return no_answer(&uri, &failure.why, exit.as_ref(), id, out, progress).await
                }
            }
        }
    }
}

/// Logs that the child gave no answer (and how it ended, if it did), and answers 502.
async fn no_answer(
    uri: &str,
    why: &str,
    exit: Option<&Exited>,
    id: u16,
    out: &mpsc::Sender<Out>,
    progress: &mut Progress,
) {
    let died = exit.map(|e| e.status.to_string());
    tracing::error!(
        pid = std::process::id(),
        uri,
        error = why,
        program_exit = died.as_deref().unwrap_or("still running"),
        "program gave no answer; answered 502"
    );
    progress
        .answer_status(StatusCode::BAD_GATEWAY, id, out)
        .await
}

/// Whether a request that got no byte of answer from a child that then exited goes to the
/// child's replacement: only once, and only when the child exited 0, since a program that
/// exits 0 between requests did not run the one that found it exiting (one that was killed
/// or crashed may have run it).
fn may_resend(exit: &Exited, replayed: bool) -> bool {
    !replayed && exit.status.success()
}

/// Logs that the child exited 0 as the request arrived, without a byte of answer: it did not
/// run the request, which goes to its replacement.
fn sent_again(uri: &str, exit: &Exited) {
    tracing::info!(
        pid = std::process::id(),
        program_pid = exit.pid,
        status = %exit.status,
        uri,
        "program exited as the request arrived; sending it to a new one"
    );
}

/// A child that exited, as `reap` found it.
struct Exited {
    pid: u32,
    status: ExitStatus,
    /// Requests it was sent.
    served: u64,
}

/// The one line for a child that exited on its own between two requests (its
/// `PHP_FCGI_MAX_REQUESTS`, say): the next request starts another.
fn exited_between_requests(exit: &Exited) {
    tracing::info!(
        pid = std::process::id(),
        program_pid = exit.pid,
        status = %exit.status,
        served = exit.served,
        "program exited between requests; starting another"
    );
}

/// A request the child is running. Dropped before it is forgotten (the request's task was
/// dropped at `request_timeout`, or the worker is exiting), it kills the child: a program
/// stuck in a request would hold the next one too, and nothing could tell it to stop.
struct Running<'a> {
    foreign: &'a Foreign,
    program_pid: u32,
    uri: &'a str,
}

impl Running<'_> {
    /// The attempt ended (well or not): the child is not to be killed for it.
    fn over(self) {
        std::mem::forget(self);
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut child = self.foreign.lock();
        if child
            .as_ref()
            .is_some_and(|p| p.child.id() == self.program_pid)
        {
            tracing::warn!(
                pid = std::process::id(),
                program_pid = self.program_pid,
                uri = self.uri,
                "request abandoned (request timeout): killing the program running it; the next request starts another"
            );
            // Dropping the process kills it and waits for it.
            *child = None;
        }
    }
}

/// The relay as each request's [`Exchange`] on the worker's runtime.
#[derive(Clone)]
struct Relay(Arc<Foreign>);

impl Exchange for Relay {
    fn answer<'a>(
        self,
        request: Request,
        id: u16,
        out: &'a mpsc::Sender<Out>,
        progress: &'a mut Progress,
    ) -> impl std::future::Future<Output = ()> + Send + 'a {
        self.0.relay(request, id, out, progress)
    }
}

impl Application for Foreign {
    fn for_worker(self: Arc<Self>, _: &tokio::runtime::Runtime) -> Result<Handler, String> {
        self.dir.remove_stale_sockets();
        let process = self
            .start()
            .map_err(|why| format!("worker init failed: {why}"))?;
        *self.lock() = Some(process);
        Ok(Handler::Service(Arc::new(Runner::new(Relay(self)))))
    }

    fn answers_its_timeouts(&self) -> bool {
        true
    }

    /// The child would die with the worker (`PR_SET_PDEATHSIG`), but not what it forked:
    /// dropping it kills its whole process group.
    fn worker_exiting(&self) {
        drop(self.lock().take());
    }
}

/// Reads the body into `records` as STDIN records, up to [`INLINE_BODY_MAX`]; whether that was
/// all of it.
async fn read_prefix(body: &mut RequestBody, records: &mut BytesMut) -> Result<bool, String> {
    let mut read = 0;
    while read < INLINE_BODY_MAX {
        if body.is_end_stream() {
            return Ok(true);
        }
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut *body).poll_frame(cx)).await;
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    read += data.len();
                    record::encode_stream(kind::STDIN, REQUEST_ID, &data, records);
                }
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => return Ok(true),
        }
    }
    Ok(body.is_end_stream())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BodyReader;

    #[tokio::test]
    async fn a_small_body_is_read_whole_and_a_large_one_is_cut_at_the_inline_bound() {
        let mut records = BytesMut::new();
        let mut small = RequestBody::new(BodyReader::from_bytes(vec![1u8; 10]), Some(10));
        assert_eq!(read_prefix(&mut small, &mut records).await, Ok(true));
        assert_eq!(records.len(), 8 + 10 + 6, "one record, padded to 8");

        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let len = INLINE_BODY_MAX + 1;
        let mut large = RequestBody::new(BodyReader::new(rx), Some(2 * len as u64));
        tx.send(vec![2u8; len].into()).await.expect("open");
        records.clear();
        // One chunk that crosses the bound: it is all read, and the rest is left to stream.
        assert_eq!(read_prefix(&mut large, &mut records).await, Ok(false));
        assert!(records.len() > len);
        drop(tx);
    }
}
