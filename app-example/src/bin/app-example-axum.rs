//! The example application as an axum `Router`, served by the pool with `supervisor::serve`:
//! the routes of the blocking example (`/hello`, `/echo`, `/env`, `/sleep?ms=N`, `/big?bytes=N`,
//! `/pid`, `/panic`, `/crash`; `/block?ms=N` blocks the thread, as a handler must not), plus extractors (`/users/{id}` with `State`, `Path` and `Json`;
//! `/whoami` with `Host`, `ConnectInfo`, `OriginalUri` and `Query`) and `/count`, which consumes
//! a request body as it arrives.
//!
//! With `APP_EXAMPLE_HYPER=ADDR` the same router is served by hyper directly (`axum::serve`),
//! the rival the benchmark compares with: `APP_EXAMPLE_HYPER_THREADS` runtime threads (default
//! 1, a current-thread runtime).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, OriginalUri, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::Deserialize;
use supervisor::Params;

/// Preloaded once in the master, shared copy-on-write by every worker.
#[derive(Clone)]
struct AppState {
    greeting: Arc<str>,
}

/// The largest body `/echo` holds in memory: the tests echo 50 MB.
const ECHO_MAX: usize = 64 << 20;

/// The bytes `/big` sends per frame: one record's worth, no N-sized buffer.
const BIG_BLOCK: usize = 64 * 1024;

fn router() -> Router {
    let state = AppState {
        greeting: Arc::from("Hello, world!\n"),
    };
    Router::new()
        .route("/hello", get(hello))
        .route("/echo", any(echo))
        .route("/count", any(count))
        .route("/env", get(env))
        .route("/sleep", get(sleep))
        .route("/big", get(big))
        .route(
            "/pid",
            get(|| async { format!("{}\n", std::process::id()) }),
        )
        .route("/panic", get(panic_route))
        .route("/crash", get(crash))
        .route("/block", get(block))
        .route("/users/{id}", post(user))
        .route("/whoami", get(whoami))
        .with_state(state)
}

async fn hello(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        state.greeting.to_string(),
    )
        .into_response()
}

/// The body back, byte for byte. It is read whole (as it arrives) before the answer starts:
/// nginx does not read a response while it is still sending the request body, so streaming
/// the answer while reading would stall once the buffers between them fill.
async fn echo(headers: HeaderMap, req: Request) -> Response {
    let body = match axum::body::to_bytes(req.into_body(), ECHO_MAX).await {
        Ok(body) => body,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}\n"),
            )
                .into_response()
        }
    };
    let mut res = Response::new(Body::from(body));
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        res.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
    }
    res
}

/// Reads the body frame by frame as it arrives and answers how many bytes it had.
async fn count(req: Request) -> Response {
    let mut body = req.into_body();
    let mut n: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => n += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => {
                return (StatusCode::BAD_REQUEST, format!("body failed: {e}\n")).into_response()
            }
        }
    }
    format!("{n}\n").into_response()
}

/// Every FastCGI param as a JSON object, from the raw params extension.
async fn env(req: Request) -> Response {
    let map: serde_json::Map<String, serde_json::Value> = req
        .extensions()
        .get::<Params>()
        .map(|p| {
            p.iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(k).into_owned(),
                        serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Json(serde_json::Value::Object(map)).into_response()
}

#[derive(Deserialize)]
struct SleepQuery {
    ms: u64,
}

async fn sleep(Query(q): Query<SleepQuery>) -> String {
    tokio::time::sleep(Duration::from_millis(q.ms)).await;
    format!("slept {}\n", q.ms)
}

#[derive(Deserialize)]
struct BigQuery {
    bytes: u64,
}

/// N bytes of a repeating pattern, produced a block at a time with an exact length.
async fn big(Query(q): Query<BigQuery>) -> Response {
    let block: Bytes = (0..BIG_BLOCK).map(|i| b'a' + (i % 26) as u8).collect();
    let mut res = Response::new(Body::new(Pattern {
        block,
        left: q.bytes,
    }));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    res
}

/// A body of `left` bytes of `block` repeated.
struct Pattern {
    block: Bytes,
    left: u64,
}

impl http_body::Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let take = self.left.min(self.block.len() as u64) as usize;
        self.left -= take as u64;
        Poll::Ready(Some(Ok(http_body::Frame::data(self.block.slice(..take)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

async fn panic_route() -> &'static str {
    panic!("/panic was requested")
}

/// Blocks the worker's thread (what a handler must never do): its event loop stops, and only
/// the master's request timeout can end it.
async fn block(Query(q): Query<SleepQuery>) -> String {
    std::thread::sleep(Duration::from_millis(q.ms));
    format!("blocked {}\n", q.ms)
}

async fn crash() -> &'static str {
    std::process::abort()
}

#[derive(Deserialize, serde::Serialize)]
struct User {
    name: String,
}

/// `State`, `Path` and `Json` together.
async fn user(
    State(state): State<AppState>,
    Path(id): Path<u32>,
    Json(user): Json<User>,
) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "id": id,
        "name": user.name,
        "greeting": state.greeting.trim_end(),
    }))
}

/// What the request's extractors see: the host, the client's address, the URI and the query.
async fn whoami(
    headers: HeaderMap,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    OriginalUri(uri): OriginalUri,
    Query(query): Query<HashMap<String, String>>,
) -> Json<serde_json::Value> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    Json(serde_json::json!({
        "host": host,
        "remote": addr.to_string(),
        "uri": uri.to_string(),
        "path": uri.path(),
        "query": query,
    }))
}

fn main() {
    if let Ok(addr) = std::env::var("APP_EXAMPLE_HYPER") {
        if let Err(e) = serve_hyper(&addr) {
            eprintln!("app-example-axum: cannot serve on {addr}: {e}");
            std::process::exit(1);
        }
        return;
    }
    supervisor::serve(|| Ok::<_, Infallible>(router()))
}

/// The rival: the same router served by hyper directly, for the benchmark.
fn serve_hyper(addr: &str) -> std::io::Result<()> {
    let threads: usize = std::env::var("APP_EXAMPLE_HYPER_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("{addr} is not an address: {e}")))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(
            listener,
            router().into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    })
}
