//! The prefork supervisor: turns one [`Responder`] into a preforked, self-healing FastCGI
//! server behind nginx.
//!
//! ```no_run
//! use supervisor::{text, Request, Responder, Response};
//!
//! struct Hello;
//!
//! impl Responder for Hello {
//!     fn respond(&self, _req: &mut Request) -> Response {
//!         text("Hello, world!\n")
//!     }
//! }
//!
//! fn main() {
//!     supervisor::run(|| Ok::<_, std::convert::Infallible>(Hello))
//! }
//! ```
//!
//! # Layout
//! The folders are the processes. Nothing in `app`, `config` or the shared leaf modules imports
//! `master` or `worker`, and the master reaches the worker only through `worker::run` at the fork.
//! - `boot`: the command line and the file become a `Config`, listeners are bound or
//!   inherited, the application is set up, and the master takes over; every failure at start
//!   is one `StartError` mapped to an exit code.
//! - `master/`: the supervisor process. Single-threaded and synchronous, never a tokio runtime,
//!   so `fork` is safe (`scripts/test` fails if a file there imports tokio). The loop,
//!   reaping and spawning (`mod.rs`), the maintenance pass, reload generations, forwarding
//!   kept-alive connections, the USR2 upgrade and what it hands over (`inherit`), systemd
//!   notification, the signal table, and the pure policies.
//! - `worker/`: a forked worker. A current-thread tokio runtime plus handler threads; it never
//!   forks. The account, environment and limits it takes on after the fork, accepting, one
//!   FastCGI connection, the room queue, running a request, the I/O thread's inline runner,
//!   running an async service's requests (`service`), and the status page.
//! - `app/`: what the application sees: [`Request`], [`Response`], [`Body`], the body
//!   streams, and for an async service the `http::Request` mapping ([`HttpRequest`],
//!   [`RequestBody`]). No runtime, no scoreboard.
//! - `config/`: the operator's surface, each key declared once, validated once.
//! - `status_command`: `<binary> status`, a FastCGI client that prints a running pool's page.
//! - `task/`: a background task's process: the host lock, the run loop and its schedule, and
//!   (feature `postgres`) the leader lease. The master only forks it (`master/tasks.rs`).
//! - `foreign`: any FastCGI program (php-cgi, Perl, C, fcgiwrap) as the application: each
//!   worker runs one child and relays its requests to it ([`run_program`], `fcgi-pool`).
//! - Shared leaves: `scoreboard` (the shared-memory table), `listener` (bind or adopt),
//!   `passing` (SCM_RIGHTS), `logging`, `clock`, and `sys`, the only module with `unsafe`.
//!
//! # How application code runs
//! Setup (the closure given to [`run`]) runs once in the master before any fork, so what it
//! loads is shared copy-on-write by every worker. [`Responder::respond`] runs outside the
//! worker's event loop and may block: blocking code is first-class. A worker runs at most
//! `max_requests_in_flight` requests at once (default 1: classic one-request-per-process).
//! When the worker's I/O thread is free it runs the request itself, since passing it to another
//! thread and back costs more than a fast request; a standby thread drives the event loop as
//! soon as that request waits for it or runs past a few milliseconds. Other requests run on
//! handler threads. Either way bodies keep being read, responses written, and idle kept-alive
//! connections held for free. Async code runs by building a runtime inside the handler
//! (`tokio::runtime::Builder::new_current_thread()`), or by calling into one the app keeps per
//! worker.
//!
//! An async service ([`serve`], [`serve_with`]: an axum `Router`, any tower `Service`) runs on
//! the worker's runtime instead: one task per request, up to `max_requests_in_flight` at once
//! (256 by default for a service), no handler threads. A panic in it answers 500;
//! `request_timeout` drops its future and answers 504.
//!
//! A panic in `respond` is caught: the request is answered `500 Internal Server Error`, the
//! panic is logged, and the worker keeps serving (unwinding must stay enabled: with
//! `panic = "abort"` a panic costs the worker, which the master replaces). An abort or a
//! segfault costs only that worker.

mod app;
mod boot;
mod clock;
mod config;
mod foreign;
mod listener;
mod logging;
mod master;
mod passing;
mod scoreboard;
mod status_command;
mod sys;
mod task;
mod worker;

/// Not API: the checks that fork, for `tests/fork.rs` (a process of one thread).
#[doc(hidden)]
#[path = "fork_checks.rs"]
pub mod __fork_checks;

use std::fmt::Display;

pub use app::body::{BodyReader, BodyWriter};
pub use app::http::{BodyError, HttpRequest, RemoteAddr, RequestBody};
pub use app::request::Request;
pub use app::response::{status, text, with_type, Body, Response};
pub use fcgi::{Params, Role};
pub use foreign::run_program;
pub use http;
pub use http_body;
/// The PostgreSQL client the task lease uses, for the application's own task connections.
#[cfg(feature = "postgres")]
pub use postgres;
pub use task::{Task, TaskContext, CLOCK_OFFSET_ENV};
use tower_service::Service;

/// The application: one method, called for every request in a worker process, outside its
/// event loop. Blocking is fine: the event loop goes on without the thread that blocks.
pub trait Responder: Send + Sync + 'static {
    /// Answers one request.
    fn respond(&self, request: &mut Request) -> Response;

    /// Runs once in each worker right after it is forked, before it accepts: the place for
    /// what must not be shared across `fork` (database connections, random seeds). An error
    /// ends the worker; the master replaces it, backing off if every worker fails the same way.
    fn init_worker(&self) -> Result<(), String> {
        Ok(())
    }

    /// The application's background tasks (README, "Background tasks"): each one configured
    /// with `[tasks.NAME]` runs in its own process beside the workers, one per host (one
    /// across hosts with a lease). None by default.
    fn tasks(&self) -> Vec<Task<Self>>
    where
        Self: Sized,
    {
        Vec::new()
    }
}

/// Runs the server: parses the command line and the config file, binds the listeners, runs
/// `setup` once (before forking: its data is shared copy-on-write by the workers), then
/// supervises the pool until stopped. Exits the process: 0 after a graceful stop, 1 when the
/// setup or the listeners fail, 2 for a bad configuration.
pub fn run<R, E, F>(setup: F) -> !
where
    R: Responder,
    E: Display,
    F: FnOnce() -> Result<R, E>,
{
    std::process::exit(boot::run(
        |cfg: &config::Config| {
            if let Some(program) = &cfg.program {
                return Err(format!(
                    "program {} is for fcgi-pool; this binary is a Rust application: remove the \
                     program key (or the words after --)",
                    program.path.display()
                ));
            }
            setup().map_err(|e| e.to_string())
        },
        false,
    ))
}

/// Runs the server for an async service: an axum `Router` or any tower `Service` taking an
/// [`HttpRequest`], unchanged. `setup` runs once in the master before the fork, like
/// [`run`]'s; every worker serves a clone of the service on its own runtime, many requests at
/// once (`max_requests_in_flight`, 256 by default here). Same command line, configuration,
/// signals, reloads, upgrades, status page and logs as [`run`]. Exits the process.
///
/// ```no_run
/// use axum::{routing::get, Router};
///
/// fn main() {
///     let app = Router::new().route("/hello", get(|| async { "Hello, world!\n" }));
///     supervisor::serve(move || Ok::<_, std::convert::Infallible>(app))
/// }
/// ```
pub fn serve<S, B, E, F>(setup: F) -> !
where
    F: FnOnce() -> Result<S, E>,
    E: Display,
    S: Service<HttpRequest, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_with(setup, |service: S| async move {
        Ok::<_, std::convert::Infallible>(service)
    })
}

/// [`serve`] with a second step per worker: `setup` runs once in the master before the fork;
/// then each worker, right after it is forked, runs `per_worker` with (its copy of) what
/// `setup` returned, on its own runtime, and serves the service that returns. The place for
/// what must not cross `fork`: a database pool, a client with open connections. An error ends
/// the worker; the master replaces it, backing off if every worker fails the same way.
///
/// ```no_run
/// use axum::{extract::State, routing::get, Router};
///
/// #[derive(Clone)]
/// struct Pool; // a database pool, connected in each worker
///
/// fn main() {
///     supervisor::serve_with(
///         || Ok::<_, String>("postgres://localhost/app".to_string()),
///         |url| async move {
///             let _ = url; // connect here, on the worker's runtime
///             let pool = Pool;
///             Ok::<_, String>(Router::new().route("/", get(|State(_): State<Pool>| async { "ok" })).with_state(pool))
///         },
///     )
/// }
/// ```
pub fn serve_with<T, E, F, W, Fut, S, E2, B>(setup: F, per_worker: W) -> !
where
    F: FnOnce() -> Result<T, E>,
    E: Display,
    T: Send + 'static,
    W: FnOnce(T) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<S, E2>>,
    E2: Display,
    S: Service<HttpRequest, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let setup =
        move |_: &config::Config| setup().map(|shared| worker::ServiceApp::new(shared, per_worker));
    std::process::exit(boot::run(setup, true))
}
