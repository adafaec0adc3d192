//! The example application: every route the README, the tests and the benchmarks use.

mod drain;

use std::io::{Read, Write};
use std::time::Duration;

use supervisor::http::{header, HeaderValue, StatusCode};
use supervisor::{
    status, text, with_type, Body, Request, Responder, Response, Role, Task, TaskContext,
};

/// Preloaded once in the master, shared copy-on-write by every worker.
struct App {
    greeting: &'static str,
}

impl App {
    fn new() -> Result<App, String> {
        if let Ok(why) = std::env::var("APP_EXAMPLE_FAIL_SETUP") {
            return Err(format!(
                "setup refused on purpose (APP_EXAMPLE_FAIL_SETUP={why})"
            ));
        }
        Ok(App {
            greeting: "Hello, world!\n",
        })
    }
}

impl Responder for App {
    fn respond(&self, req: &mut Request) -> Response {
        match req.role() {
            Role::Authorizer => return authorize(req),
            Role::Filter => return filter(req),
            _ => {}
        }
        match req.path() {
            "/hello" => text(self.greeting),
            "/echo" => echo(req),
            "/env" => env(req),
            "/sleep" => sleep(req),
            "/big" => big(req),
            "/pid" => text(format!("{}\n", std::process::id())),
            "/panic" => panic!("/panic was requested"),
            "/crash" => std::process::abort(),
            "/enqueue" => enqueue(req),
            _ => status(StatusCode::NOT_FOUND),
        }
    }

    /// A deploy whose workers cannot start, for trying the crash-loop backoff.
    fn init_worker(&self) -> Result<(), String> {
        match std::env::var("APP_EXAMPLE_FAIL_WORKER_INIT") {
            Ok(why) => Err(format!(
                "refused on purpose (APP_EXAMPLE_FAIL_WORKER_INIT={why})"
            )),
            Err(_) => Ok(()),
        }
    }

    /// `drain`: empties the queue `/enqueue` fills (see `drain.rs`); runs once configured
    /// with `[tasks.drain]`.
    fn tasks(&self) -> Vec<Task<Self>> {
        vec![Task {
            name: "drain",
            run: |_app: &App, ctx: &TaskContext| drain::run(ctx),
        }]
    }
}

/// `/enqueue?n=N`: N rows for the `drain` task.
fn enqueue(req: &Request) -> Response {
    let n = req
        .query_param("n")
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(1);
    match drain::enqueue(n) {
        Ok(rows) => text(format!("queued {rows}\n")),
        Err(e) => {
            let mut res = text(format!("{e}\n"));
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            res
        }
    }
}

/// The body back, byte for byte. It is read whole before the answer starts: nginx does not
/// read a response while it is still sending the request body, so a handler that streams
/// output while it reads input would stall once the buffers between them fill.
fn echo(req: &mut Request) -> Response {
    let content_type = req
        .header("content-type")
        .and_then(|v| HeaderValue::from_str(v).ok());
    let body = match req.body_bytes() {
        Ok(body) => body,
        Err(e) => return text(format!("cannot read the request body: {e}\n")),
    };
    let mut res = Response::new(Body::from(body));
    if let Some(ct) = content_type {
        res.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    res
}

/// Every FastCGI param as a JSON object (binary values lossily as UTF-8; the last duplicate
/// wins); with `?process`, the worker's own environment instead (what `clear_env` and `env`
/// made it).
fn env(req: &Request) -> Response {
    let lossy = |(k, v): (&[u8], &[u8])| {
        (
            String::from_utf8_lossy(k).into_owned(),
            serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
        )
    };
    let map: serde_json::Map<String, serde_json::Value> = if req.query_param("process").is_some() {
        use std::os::unix::ffi::OsStrExt;
        std::env::vars_os()
            .map(|(k, v)| lossy((k.as_bytes(), v.as_bytes())))
            .collect()
    } else {
        req.params().iter().map(lossy).collect()
    };
    with_type(
        "application/json",
        serde_json::Value::Object(map).to_string(),
    )
}

fn sleep(req: &Request) -> Response {
    let Some(ms) = req.query_param("ms").and_then(|v| v.parse::<u64>().ok()) else {
        return bad_request("ms must be a number of milliseconds: /sleep?ms=250\n");
    };
    std::thread::sleep(Duration::from_millis(ms));
    text(format!("slept {ms}\n"))
}

/// N bytes of a repeating pattern, produced 64 KiB at a time: no N-sized buffer.
fn big(req: &Request) -> Response {
    let Some(n) = req.query_param("bytes").and_then(|v| v.parse::<u64>().ok()) else {
        return bad_request("bytes must be a number: /big?bytes=1000000\n");
    };
    let mut res = with_type(
        "application/octet-stream",
        Body::stream(move |out| {
            let block: Vec<u8> = (0..64 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
            let mut left = n;
            while left > 0 {
                let take = left.min(block.len() as u64) as usize;
                out.write_all(&block[..take])?;
                left -= take as u64;
            }
            Ok(())
        }),
    );
    // The length is exact, so the client can show progress.
    res.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    res
}

/// Authorizer role: allow requests that carry `Authorization: Bearer letmein`, and tell the web
/// server who the user is through a `Variable-` header.
fn authorize(req: &Request) -> Response {
    if req.header("authorization") == Some("Bearer letmein") {
        let mut res = text("");
        res.headers_mut()
            .insert("variable-auth-user", HeaderValue::from_static("example"));
        res
    } else {
        status(StatusCode::FORBIDDEN)
    }
}

/// Filter role: the DATA stream (the file being filtered) upper-cased.
fn filter(req: &mut Request) -> Response {
    let mut data = Vec::new();
    if let Err(e) = req.data().read_to_end(&mut data) {
        return text(format!("cannot read the data stream: {e}\n"));
    }
    text(data.to_ascii_uppercase())
}

fn bad_request(why: &'static str) -> Response {
    let mut res = text(why);
    *res.status_mut() = StatusCode::BAD_REQUEST;
    res
}

fn main() {
    supervisor::run(App::new)
}
