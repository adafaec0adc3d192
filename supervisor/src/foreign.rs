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
mod process;
mod upstream;

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use bytes::BytesMut;
use fcgi::record::{self, kind, ProtocolStatus};
use fcgi::Role;
use http::StatusCode;

use crate::app::body::BodyReader;
use crate::config::{Config, Program};
use crate::{status, Request, Responder, Response};
use process::{quiet, Link, PoolDir, Process, EXIT_WAIT, POLL_STEP};
use upstream::{Failure, Upstream};

/// The request id on a connection to the child: one request at a time on each.
const REQUEST_ID: u16 = 1;
/// Request bodies up to this size are read before the request is sent and sent in one write,
/// and can be sent again to a replacement if the child was exiting. With the chunk that
/// crosses it (at most a record, 64 KiB) it stays under what a unix socket buffers for a
/// connection not yet accepted (`net.core.wmem_default`, 208 KiB), so the write never waits
/// for the program. Larger bodies stream from a thread of their own.
const INLINE_BODY_MAX: usize = 64 * 1024;
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

#[cfg(test)]
mod tests {
    use super::*;

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
