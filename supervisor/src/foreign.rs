//! Any FastCGI program (php-cgi, a Perl `FCGI` script, a libfcgi binary, fcgiwrap) as the
//! pool's application: `fcgi-pool [flags] -- /usr/bin/php-cgi`.
//!
//! Each worker, forked as for a Rust application, starts one child running the program, the
//! way FastCGI programs expect to be started: file descriptor 0 is a listening unix socket (in
//! a directory only this user can enter) on which the program calls `accept`. The worker's
//! event loop keeps accepting nginx's connections and holding idle kept-alive ones, as for any
//! application; a request that gets the worker's one room is run by [`Foreign::respond`],
//! which relays the request's records over a connection to the child (kept open between
//! requests when the program honours `FCGI_KEEP_CONN`; params, then the body as it arrives)
//! and reads the answer back: the CGI header block becomes the response's
//! status and headers, the rest streams to nginx, stderr goes to the log. The scoreboard slot
//! is the worker's, so the status page, the pool's sizing and request timeouts see the program
//! as they see a Rust application; a worker killed for a timeout takes its child along
//! (`PR_SET_PDEATHSIG`).
//!
//! A child that exits between requests (`PHP_FCGI_MAX_REQUESTS`) is replaced before the next
//! request, or, when it was exiting just as that request was sent, replaced and the request
//! sent again: a program that exits 0 without a byte of answer did not run it. A child that
//! dies while it runs a request costs that request a `502 Bad Gateway` (or a short body once
//! the header is out); the connection from nginx stays open.

mod cgi;

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fcgi::client::{decode_event, ClientEvent};
use fcgi::record::{self, kind, ProtocolStatus};
use fcgi::Role;
use http::StatusCode;

use crate::app::body::{BodyReader, BodyWriter};
use crate::config::{Config, Program};
use crate::{status, Body, Request, Responder, Response};

/// The request id on a connection to the child: one request at a time on each.
const REQUEST_ID: u16 = 1;
/// Request bodies up to this size are read before the request is sent and sent in one write,
/// and can be sent again to a replacement if the child was exiting. With the chunk that
/// crosses it (at most a record, 64 KiB) it stays under what a unix socket buffers for a
/// connection not yet accepted (`net.core.wmem_default`, 208 KiB), so the write never waits
/// for the program. Larger bodies stream from a thread of their own.
const INLINE_BODY_MAX: usize = 64 * 1024;
/// The longest CGI header block accepted from the program: nginx's own limit is its
/// `fastcgi_buffer_size` (4 or 8 KiB), so anything longer would fail there anyway.
const HEAD_MAX: usize = 64 * 1024;
/// Bytes read from the child per `read`: four full records.
const READ_CHUNK: usize = 4 * 16 * 1024;
/// How long a newly started program has to answer its first connection: php-cgi starts in
/// tens of milliseconds, a large preload in seconds; a program that takes longer is reported
/// as failing to start.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child that closed a connection without an answer is given to finish exiting,
/// so that its exit status can say whether the request ran: process teardown takes
/// milliseconds.
const EXIT_WAIT: Duration = Duration::from_secs(1);
/// The polling step while waiting for a child to answer or exit.
const POLL_STEP: Duration = Duration::from_millis(2);
/// How many names the pool's socket directory may try before giving up: each try is a fresh
/// name, so only a broken temp directory exhausts them.
const DIR_ATTEMPTS: u32 = 16;
/// Environment variables that are the pool's business, not the program's: what systemd and a
/// previous master hand over (a program that saw `LISTEN_FDS` might try to use fds it does not
/// have). Every `SUPERVISOR_*` variable is removed too.
const POOL_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
];

/// Runs the pool with the configured `program` as each worker's application, and exits the
/// process (as [`crate::run`] does). What `fcgi-pool` runs.
pub fn run_program() -> ! {
    std::process::exit(crate::boot::run(Foreign::new))
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
    /// the one kept from its last request if the child has not closed it, else a new one.
    fn connect(&self) -> Result<Link, String> {
        let mut child = self.lock();
        if let Some(process) = child.as_mut() {
            if let Ok(Some(status)) = process.child.try_wait() {
                tracing::info!(
                    pid = std::process::id(),
                    program_pid = process.child.id(),
                    %status,
                    served = process.served,
                    "program exited between requests; starting another"
                );
                *child = None;
            }
        }
        if child.is_none() {
            *child = Some(self.start()?);
        }
        let process = child.as_mut().ok_or("no program")?;
        process.served += 1;
        let program_pid = process.child.id();
        if let Some(conn) = process.kept.take().filter(quiet) {
            return Ok(Link {
                conn,
                program_pid,
                reused: true,
            });
        }
        let conn = UnixStream::connect(&process.socket).map_err(|e| {
            format!(
                "cannot connect to the program's socket {}: {e}",
                process.socket.display()
            )
        })?;
        Ok(Link {
            conn,
            program_pid,
            reused: false,
        })
    }

    /// Keeps `conn`, whose request is over, for the next request to the same child.
    fn keep(&self, conn: UnixStream, program_pid: u32) {
        if let Some(process) = self.lock().as_mut() {
            if process.child.id() == program_pid {
                process.kept = Some(conn);
            }
        }
    }

    /// After a connection failed: waits briefly for the child to exit, and if it did, drops it
    /// (the next request starts another) and says how it ended.
    fn reap(&self) -> Option<(u32, ExitStatus)> {
        let mut child = self.lock();
        let process = child.as_mut()?;
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            match process.child.try_wait() {
                Ok(Some(status)) => {
                    let pid = process.child.id();
                    *child = None;
                    return Some((pid, status));
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_STEP),
                _ => return None,
            }
        }
    }
}

impl Responder for Foreign {
    fn respond(&self, req: &mut Request) -> Response {
        let uri = req.uri().to_string();
        let role = req.role();
        let mut outgoing = BytesMut::new();
        // keep_conn: a program that honours it (php-cgi, libfcgi) saves an accept and a close
        // per request; one that does not closes it, and the next request opens another.
        record::encode_begin_request(REQUEST_ID, role, true, &mut outgoing);
        fcgi::client::encode_params(REQUEST_ID, req.params(), &mut outgoing);
        let (prefix, whole) = match read_prefix(req.body()) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(pid = std::process::id(), uri, error = %e, "cannot read the request body");
                return status(StatusCode::BAD_REQUEST);
            }
        };
        record::encode_stream(kind::STDIN, REQUEST_ID, &prefix, &mut outgoing);
        let mut rest_of_body = None;
        if whole {
            end_streams(role, &mut outgoing);
        } else {
            rest_of_body = Some(req.take_body());
        }
        let head_only = req.method() == http::Method::HEAD;
        // Sent again at most once on a fresh connection when a kept one was closing, and at most
        // once to a new child when the child was exiting on its own.
        let (mut fresh_retried, mut replayed) = (false, false);
        loop {
            let link = match self.connect() {
                Ok(link) => link,
                Err(why) => {
                    tracing::error!(
                        pid = std::process::id(),
                        uri,
                        error = why,
                        "no program to run the request; answered 502"
                    );
                    return status(StatusCode::BAD_GATEWAY);
                }
            };
            let mut upstream = Upstream::new(link.conn, &uri);
            let mut streamed = false;
            let failure = match upstream.conn.write_all(&outgoing) {
                Err(e) => Failure {
                    answered: false,
                    refused: None,
                    why: format!("cannot send the request: {e}"),
                },
                Ok(()) => {
                    if let Some(body) = rest_of_body.take() {
                        streamed = true;
                        if let Err(e) = pump_body(&upstream.conn, body, role) {
                            tracing::error!(pid = std::process::id(), uri, error = %e, "cannot stream the request body; answered 502");
                            return status(StatusCode::BAD_GATEWAY);
                        }
                    }
                    match upstream.read_head() {
                        Ok(head) => {
                            let (response, done) = upstream.into_response(head, head_only);
                            if let Some(conn) = done {
                                self.keep(conn, link.program_pid);
                            }
                            return response;
                        }
                        Err(failure) => failure,
                    }
                }
            };
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
                return status(code);
            }
            let unanswered = !failure.answered && !streamed;
            let exit = self.reap();
            if exit.is_none() && link.reused && unanswered && !fresh_retried {
                // The child lives and closed the kept connection as the request arrived.
                fresh_retried = true;
                continue;
            }
            if let Some((program_pid, exit_status)) = exit {
                if unanswered && !replayed && exit_status.success() {
                    replayed = true;
                    tracing::info!(
                        pid = std::process::id(),
                        program_pid,
                        status = %exit_status,
                        uri,
                        "program exited as the request arrived; sending it to a new one"
                    );
                    continue;
                }
            }
            let died = exit.map(|(_, s)| s.to_string());
            tracing::error!(
                pid = std::process::id(),
                uri,
                error = failure.why,
                program_exit = died.as_deref().unwrap_or("still running"),
                "program gave no answer; answered 502"
            );
            return status(StatusCode::BAD_GATEWAY);
        }
    }

    fn init_worker(&self) -> Result<(), String> {
        self.dir.remove_stale_sockets();
        let process = self.start()?;
        *self.lock() = Some(process);
        Ok(())
    }
}

/// The first bytes of the body, up to [`INLINE_BODY_MAX`], and whether that is all of it.
fn read_prefix(body: &mut BodyReader) -> io::Result<(Vec<u8>, bool)> {
    let mut prefix = Vec::new();
    while prefix.len() < INLINE_BODY_MAX {
        match body.next_chunk() {
            Some(chunk) => prefix.extend_from_slice(&chunk),
            None => return Ok((prefix, true)),
        }
    }
    Ok((prefix, false))
}

/// The empty records that end the input streams: STDIN, and DATA for a filter.
fn end_streams(role: Role, dst: &mut BytesMut) {
    record::encode_end_of_stream(kind::STDIN, REQUEST_ID, dst);
    if role == Role::Filter {
        record::encode_end_of_stream(kind::DATA, REQUEST_ID, dst);
    }
}

/// Streams the rest of a large body to the child from a thread of its own, so that a program
/// that answers before it has read its input cannot deadlock against this one.
fn pump_body(conn: &UnixStream, mut body: BodyReader, role: Role) -> io::Result<()> {
    let mut conn = conn.try_clone()?;
    std::thread::Builder::new()
        .name("program-stdin".into())
        .spawn(move || {
            let mut out = BytesMut::new();
            while let Some(chunk) = body.next_chunk() {
                out.clear();
                record::encode_stream(kind::STDIN, REQUEST_ID, &chunk, &mut out);
                // The program stopped reading (it answered, or died): the rest is not needed.
                if conn.write_all(&out).is_err() {
                    return;
                }
            }
            out.clear();
            end_streams(role, &mut out);
            let _ = conn.write_all(&out);
        })?;
    Ok(())
}

/// Why a request got no answer from the program.
struct Failure {
    /// The program sent part of an answer: the request ran, so it is not sent again.
    answered: bool,
    /// The program turned the request down (END_REQUEST `FCGI_OVERLOADED`, ...): it is alive.
    refused: Option<ProtocolStatus>,
    why: String,
}

/// The CGI header block and what followed it.
struct Head {
    head: BytesMut,
    rest: BytesMut,
    /// The request ended with these bytes (END_REQUEST has arrived).
    ended: bool,
}

/// What the program sends, with its stderr logged.
enum Piece {
    Stdout(Bytes),
    End,
    /// END_REQUEST with a protocol status other than complete: the program turned it down.
    Refused(ProtocolStatus),
}

/// One connection to the child, read record by record.
struct Upstream {
    conn: UnixStream,
    buf: BytesMut,
    uri: String,
}

impl Upstream {
    fn new(conn: UnixStream, uri: &str) -> Upstream {
        Upstream {
            conn,
            buf: BytesMut::new(),
            uri: uri.to_string(),
        }
    }

    /// The next piece of the answer already read, without waiting for more.
    fn buffered_piece(&mut self) -> io::Result<Option<Piece>> {
        loop {
            let event = decode_event(&mut self.buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            match event {
                None => return Ok(None),
                Some(ClientEvent::Stdout { data, .. }) if !data.is_empty() => {
                    return Ok(Some(Piece::Stdout(data)))
                }
                Some(ClientEvent::End {
                    protocol_status, ..
                }) => {
                    if protocol_status != ProtocolStatus::RequestComplete {
                        return Ok(Some(Piece::Refused(protocol_status)));
                    }
                    return Ok(Some(Piece::End));
                }
                Some(ClientEvent::Stderr { data, .. }) => self.log_stderr(&data),
                // The end of stdout (END_REQUEST follows), or management answers.
                Some(_) => {}
            }
        }
    }

    /// The next piece of the answer; `None` when the program closed the connection first.
    fn next_piece(&mut self) -> io::Result<Option<Piece>> {
        loop {
            if let Some(piece) = self.buffered_piece()? {
                return Ok(Some(piece));
            }
            let len = self.buf.len();
            self.buf.resize(len + READ_CHUNK, 0);
            let read = self.conn.read(&mut self.buf[len..]);
            self.buf.truncate(len + *read.as_ref().unwrap_or(&0));
            if read? == 0 {
                return Ok(None);
            }
        }
    }

    fn log_stderr(&self, data: &[u8]) {
        for line in String::from_utf8_lossy(data).lines() {
            if !line.trim().is_empty() {
                tracing::warn!(
                    pid = std::process::id(),
                    uri = self.uri,
                    line,
                    "program stderr"
                );
            }
        }
    }

    /// Reads until the CGI header block is complete.
    fn read_head(&mut self) -> Result<Head, Failure> {
        let mut head = BytesMut::new();
        let mut answered = false;
        loop {
            let fail = |answered, why: String| Failure {
                answered,
                refused: None,
                why,
            };
            match self.next_piece() {
                Ok(Some(Piece::Stdout(data))) => {
                    answered = true;
                    head.extend_from_slice(&data);
                    if let Some(end) = cgi::head_end(&head) {
                        let rest = head.split_off(end);
                        return Ok(Head {
                            head,
                            rest,
                            ended: false,
                        });
                    }
                    if head.len() > HEAD_MAX {
                        return Err(fail(
                            true,
                            format!("its CGI header block is over {HEAD_MAX} bytes"),
                        ));
                    }
                }
                Ok(Some(Piece::End)) if head.is_empty() => {
                    return Err(fail(true, "it ended the request without output".into()))
                }
                // No blank line before the end: all of it is the header block.
                Ok(Some(Piece::End)) => {
                    return Ok(Head {
                        head,
                        rest: BytesMut::new(),
                        ended: true,
                    })
                }
                Ok(Some(Piece::Refused(protocol_status))) => {
                    return Err(Failure {
                        answered: true,
                        refused: Some(protocol_status),
                        why: format!("it refused the request ({protocol_status:?})"),
                    })
                }
                Ok(None) => return Err(fail(answered, "it closed the connection".into())),
                Err(e) => return Err(fail(answered, e.to_string())),
            }
        }
    }

    /// The response: in one piece when the whole answer has already arrived, with the
    /// connection, free for another request; else streamed.
    fn into_response(mut self, mut head: Head, head_only: bool) -> (Response, Option<UnixStream>) {
        let (parts, skipped) = cgi::parse_head(&head.head);
        if !skipped.is_empty() {
            tracing::warn!(pid = std::process::id(), uri = self.uri, lines = ?skipped, "program sent header lines that are not valid HTTP; dropped them");
        }
        while !head.ended {
            match self.buffered_piece() {
                Ok(Some(Piece::Stdout(data))) => head.rest.extend_from_slice(&data),
                Ok(Some(Piece::End)) => head.ended = true,
                Ok(Some(Piece::Refused(_)) | None) | Err(_) => break,
            }
        }
        // A HEAD answer's Content-Length is the program's to give, not the empty body's.
        if head.ended && !head_only {
            let done = self.buf.is_empty().then_some(self.conn);
            return (
                http::Response::from_parts(parts, Body::Full(head.rest.freeze())),
                done,
            );
        }
        let rest = head.rest;
        let body = Body::stream(move |w: &mut BodyWriter| {
            w.write_all(&rest)?;
            if head.ended {
                return Ok(());
            }
            self.relay(w)
        });
        (http::Response::from_parts(parts, body), None)
    }

    /// Relays the rest of stdout to `w`.
    fn relay(&mut self, w: &mut BodyWriter) -> io::Result<()> {
        loop {
            let cut = match self.next_piece() {
                Ok(Some(Piece::Stdout(data))) => {
                    w.write_all(&data)?;
                    continue;
                }
                Ok(Some(Piece::End)) => return Ok(()),
                Ok(Some(Piece::Refused(refusal))) => {
                    io::Error::other(format!("it ended the request with {refusal:?}"))
                }
                Ok(None) => {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "it closed the connection")
                }
                Err(e) => e,
            };
            tracing::error!(pid = std::process::id(), uri = self.uri, error = %cut, "program stopped mid-response; the body is cut short");
            return Err(cut);
        }
    }
}

/// A connection to the child, and which child.
struct Link {
    conn: UnixStream,
    program_pid: u32,
    /// Kept from an earlier request rather than opened for this one.
    reused: bool,
}

/// Whether a kept connection is still open and silent: the child closed it otherwise (it does
/// not keep connections, or it exited), and anything unread on it is not an answer to anything.
fn quiet(conn: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
}

/// A running child and its socket.
struct Process {
    child: Child,
    socket: PathBuf,
    /// The connection of its last request, if it kept it open.
    kept: Option<UnixStream>,
    /// Requests sent to it.
    served: u64,
}

impl Process {
    /// Waits until the program accepts a connection and answers (or closes) it: a
    /// GET_VALUES record asks it something every FastCGI library answers. A program that
    /// exits first, or is silent for [`START_TIMEOUT`], failed to start.
    fn wait_ready(&mut self, program: &str) -> Result<(), String> {
        let pid = self.child.id();
        let fail = |why: String| format!("program {program} (pid {pid}) {why}");
        let mut conn = UnixStream::connect(&self.socket).map_err(|e| {
            fail(format!(
                "cannot be reached at {}: {e}",
                self.socket.display()
            ))
        })?;
        let mut ask = BytesMut::new();
        fcgi::client::encode_get_values(&["FCGI_MPXS_CONNS"], &mut ask);
        conn.write_all(&ask)
            .map_err(|e| fail(format!("cannot be asked if it runs: {e}")))?;
        conn.set_read_timeout(Some(POLL_STEP * 10))
            .map_err(|e| fail(format!("cannot be waited for: {e}")))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut answer = [0u8; 256];
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(fail(format!(
                    "exited at start ({status}) before accepting a connection"
                )));
            }
            match conn.read(&mut answer) {
                Ok(n) if n > 0 => return Ok(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(fail(format!(
                            "did not answer within {START_TIMEOUT:?} of starting"
                        )));
                    }
                }
                // Closed: it accepted and hung up, or it died and the socket went with it.
                _ => return self.alive_after_close(&fail),
            }
        }
    }

    /// After the first connection closed: whether the program is still running.
    fn alive_after_close(&mut self, fail: &dyn Fn(String) -> String) -> Result<(), String> {
        let deadline = Instant::now() + EXIT_WAIT / 10;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(fail(format!(
                    "exited at start ({status}) before answering a connection"
                )));
            }
            std::thread::sleep(POLL_STEP);
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The directory of the workers' sockets, made by the master with mode 0700 and removed by
/// it when it stops.
struct PoolDir {
    path: PathBuf,
    /// The master's pid: workers hold a copy, which must not remove it.
    owner: u32,
}

impl PoolDir {
    fn create() -> Result<PoolDir, String> {
        let owner = std::process::id();
        let base = std::env::temp_dir();
        let mut last = None;
        for attempt in 0..DIR_ATTEMPTS {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(attempt);
            let path = base.join(format!("fcgi-pool.{owner}.{nanos:08x}{attempt}"));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PoolDir { path, owner }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    return Err(format!(
                        "cannot make the programs' socket directory {}: {e}",
                        path.display()
                    ))
                }
            }
        }
        Err(format!(
            "cannot make the programs' socket directory in {}: {last:?}",
            base.display()
        ))
    }

    /// Removes the sockets of workers that are gone (killed before they could clean up), and
    /// any left by an earlier process with this worker's pid.
    fn remove_stale_sockets(&self) {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return;
        };
        let me = std::process::id();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let gone = pid as u32 == me
                || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    == Err(nix::errno::Errno::ESRCH);
            if gone {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

impl Drop for PoolDir {
    fn drop(&mut self) {
        if std::process::id() == self.owner {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_directory_is_private_and_only_its_maker_removes_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = PoolDir::create().expect("a temp dir");
        let mode = std::fs::metadata(&dir.path)
            .expect("made")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = dir.path.clone();
        let copy = PoolDir {
            path: path.clone(),
            owner: std::process::id() + 1,
        };
        drop(copy);
        assert!(path.exists(), "a worker's copy leaves it");
        std::fs::write(path.join(format!("{}-0.sock", std::process::id())), b"").expect("write");
        dir.remove_stale_sockets();
        assert_eq!(std::fs::read_dir(&path).expect("listed").count(), 0);
        drop(dir);
        assert!(!path.exists(), "the master removes it");
    }

    /// An upstream reading what `records` holds, the program's side closed after them.
    fn upstream_of(records: &[u8]) -> Upstream {
        let (ours, mut theirs) = UnixStream::pair().expect("a socket pair");
        theirs.write_all(records).expect("buffered");
        drop(theirs);
        Upstream::new(ours, "/test")
    }

    fn stdout_records(chunks: &[&[u8]], end: ProtocolStatus) -> BytesMut {
        let mut dst = BytesMut::new();
        for chunk in chunks {
            record::encode_stream(kind::STDOUT, REQUEST_ID, chunk, &mut dst);
        }
        record::encode_end_of_stream(kind::STDOUT, REQUEST_ID, &mut dst);
        record::encode_end_request(REQUEST_ID, 0, end, &mut dst);
        dst
    }

    #[test]
    fn a_head_split_across_records_is_found_and_the_rest_is_the_body() {
        let records = stdout_records(
            &[b"Status: 201 Created\r\nX-A: 1\r", b"\n\r\nbo", b"dy"],
            ProtocolStatus::RequestComplete,
        );
        let mut up = upstream_of(&records);
        let head = up.read_head().ok().expect("a head");
        assert_eq!(&head.head[..], b"Status: 201 Created\r\nX-A: 1\r\n\r\n");
        let (res, done) = up.into_response(head, false);
        assert!(done.is_some(), "the connection is free for another request");
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(res.headers()["x-a"], "1");
        match res.body() {
            Body::Full(b) => assert_eq!(&b[..], b"body"),
            other => panic!("the whole answer had arrived: {other:?}"),
        }
    }

    #[test]
    fn silence_then_close_may_be_resent_but_a_refusal_or_a_partial_answer_may_not() {
        let Err(f) = upstream_of(b"").read_head() else {
            panic!("no answer")
        };
        assert!(!f.answered && f.refused.is_none(), "{}", f.why);

        let refused = stdout_records(&[], ProtocolStatus::Overloaded);
        let Err(f) = upstream_of(&refused).read_head() else {
            panic!("refused")
        };
        assert_eq!(f.refused, Some(ProtocolStatus::Overloaded));

        let mut partial = BytesMut::new();
        record::encode_stream(kind::STDOUT, REQUEST_ID, b"Content-Type: te", &mut partial);
        let Err(f) = upstream_of(&partial).read_head() else {
            panic!("cut off")
        };
        assert!(f.answered, "part of a head was sent: the request ran");
    }

    #[test]
    fn a_small_body_is_read_whole_and_a_large_one_is_cut_at_the_inline_bound() {
        let (small, whole) =
            read_prefix(&mut BodyReader::from_bytes(vec![1u8; 10])).expect("in memory");
        assert_eq!((small.len(), whole), (10, true));
        let mut large = BodyReader::from_bytes(vec![2u8; INLINE_BODY_MAX + 1]);
        let (prefix, whole) = read_prefix(&mut large).expect("in memory");
        // One chunk in memory: it is all read, and the end is not seen yet.
        assert_eq!((prefix.len(), whole), (INLINE_BODY_MAX + 1, false));
        assert!(large.next_chunk().is_none());
    }
}
