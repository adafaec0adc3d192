//! An unchanged axum `Router` in the pool (`supervisor::serve`, the `app-example-axum` binary):
//! every route through real nginx with `fastcgi_keep_conn` on and off, bodies byte-exact each
//! way, extractors, panics and crashes, many requests in flight per worker, request timeouts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::http::{self, Body};
use e2e::{bin_path, fetch_pid, wait_until, worker_pids, Addr, App, Nginx, TempDir, Via};
use fcgi::io::Client;
use fcgi::Params;
use sha2::{Digest, Sha256};

struct Stack {
    app: App,
    nginx: Nginx,
    _dir: TempDir,
}

fn start(dir: &TempDir, args: &[&str]) -> App {
    App::start_binary(dir, &bin_path("app-example-axum"), args, &[])
}

fn stack(keep_conn: bool, args: &[&str]) -> Stack {
    let dir = TempDir::new(if keep_conn { "axum-keep" } else { "axum-close" });
    let app = start(&dir, args);
    app.wait_for_workers(worker_count(args));
    let upstream = format!("unix:{}", app.unix_path().display());
    let nginx = Nginx::start(&dir, &upstream, keep_conn);
    Stack {
        app,
        nginx,
        _dir: dir,
    }
}

fn worker_count(args: &[&str]) -> usize {
    args.windows(2)
        .find(|w| w[0] == "--workers")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(1)
}

fn both(f: impl Fn(bool)) {
    for keep_conn in [true, false] {
        f(keep_conn);
    }
}

fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

fn json(r: &http::Response) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {} {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )
    })
}

#[test]
fn every_route_of_the_axum_example_through_nginx() {
    both(|keep| {
        let s = stack(keep, &["--workers", "2"]);
        let p = s.nginx.port();

        let r = http::get(p, "/hello").expect("/hello");
        assert_eq!(
            (r.status, &r.body[..]),
            (200, &b"Hello, world!\n"[..]),
            "keep_conn {keep}"
        );
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        assert_eq!(r.header("content-length"), Some("14"));

        let r = http::get(p, "/env?a=1").expect("/env");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let env = json(&r);
        assert_eq!(env["REQUEST_URI"], "/env?a=1");
        assert_eq!(env["QUERY_STRING"], "a=1");
        assert_eq!(env["GATEWAY_INTERFACE"], "CGI/1.1");

        let r = http::get(p, "/sleep?ms=50").expect("/sleep");
        assert_eq!((r.status, &r.body[..]), (200, &b"slept 50\n"[..]));
        let r = http::get(p, "/sleep?ms=x").expect("/sleep bad");
        assert_eq!(r.status, 400, "axum's Query rejection");

        let r = http::get(p, "/big?bytes=100000").expect("/big");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 100_000);
        assert!(r
            .body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == b'a' + (i % 65536 % 26) as u8));

        let pid = fetch_pid(Via::Nginx(&s.nginx)).expect("/pid");
        assert!(worker_pids(s.app.pid()).contains(&pid), "{pid} is a worker");

        let r = http::get(p, "/nope").expect("/nope");
        assert_eq!(r.status, 404);

        // State, Path and Json.
        let r = http::request(
            p,
            "POST",
            "/users/42",
            &[("Content-Type", "application/json")],
            Body::Bytes(br#"{"name":"ada"}"#),
        )
        .expect("/users");
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        let u = json(&r);
        assert_eq!(
            (&u["id"], &u["name"], &u["greeting"]),
            (&42.into(), &"ada".into(), &"Hello, world!".into())
        );
        let r = http::request(
            p,
            "POST",
            "/users/x",
            &[("Content-Type", "application/json")],
            Body::Bytes(b"{}"),
        )
        .expect("/users/x");
        assert_eq!(r.status, 400, "axum's Path rejection");

        // Host, ConnectInfo, OriginalUri and Query.
        let r = http::get(p, "/whoami?x=1&y=two%20words").expect("/whoami");
        assert_eq!(r.status, 200);
        let w = json(&r);
        assert_eq!(w["host"], "localhost");
        assert_eq!(w["path"], "/whoami");
        assert_eq!(w["query"]["y"], "two words");
        assert_eq!(w["uri"], "http://localhost/whoami?x=1&y=two%20words");
        let remote: std::net::SocketAddr = w["remote"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("ConnectInfo is an address");
        assert!(remote.ip().is_loopback(), "{remote}");
        assert_ne!(remote.port(), 0, "REMOTE_PORT came through");
    });
}

#[test]
fn bodies_of_every_size_arrive_intact_each_way() {
    both(|keep| {
        let s = stack(keep, &["--workers", "2"]);
        for size in [0usize, 1, 65535, 65536, 50 << 20] {
            let body: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let r = http::request(
                s.nginx.port(),
                "POST",
                "/echo",
                &[("Content-Type", "application/x-test")],
                Body::Bytes(&body),
            )
            .expect("/echo");
            assert_eq!(r.status, 200, "size {size}");
            assert_eq!(r.header("content-type"), Some("application/x-test"));
            assert_eq!(r.body.len(), size, "size {size}, keep_conn {keep}");
            assert_eq!(sha(&r.body), sha(&body), "size {size}");

            let r = http::get(s.nginx.port(), &format!("/big?bytes={size}")).expect("/big");
            assert_eq!(r.status, 200, "size {size}");
            assert_eq!(r.body.len(), size, "size {size}, keep_conn {keep}");
            assert_eq!(r.header("content-length"), Some(size.to_string().as_str()));
            let expected: Vec<u8> = (0..size).map(|i| b'a' + (i % 65536 % 26) as u8).collect();
            assert_eq!(sha(&r.body), sha(&expected), "size {size}");
        }
        // A chunked request body: nginx buffers it and passes no CONTENT_LENGTH.
        let body: Vec<u8> = (0..300_000).map(|i| (i % 256) as u8).collect();
        let r = http::request(
            s.nginx.port(),
            "POST",
            "/echo",
            &[],
            Body::Chunked(&body, 7000),
        )
        .expect("chunked");
        assert_eq!(sha(&r.body), sha(&body));
    });
}

#[test]
fn a_panic_answers_500_and_a_crash_502_and_the_pool_serves_on() {
    both(|keep| {
        let s = stack(keep, &["--workers", "2"]);
        let before: std::collections::BTreeSet<i32> =
            worker_pids(s.app.pid()).into_iter().collect();
        for _ in 0..3 {
            let r = http::get(s.nginx.port(), "/panic").expect("/panic");
            assert_eq!(r.status, 500, "keep_conn {keep}");
        }
        let after: std::collections::BTreeSet<i32> = worker_pids(s.app.pid()).into_iter().collect();
        assert_eq!(before, after, "a panic costs no worker");
        let r = http::get(s.nginx.port(), "/hello").expect("/hello after panics");
        assert_eq!(r.status, 200);

        let r = http::get(s.nginx.port(), "/crash").expect("/crash");
        assert_eq!(
            r.status, 502,
            "an abort costs the connection: nginx answers 502"
        );
        s.app.wait_for_workers(2);
        wait_until(Duration::from_secs(10), "a replaced worker serves", || {
            http::get(s.nginx.port(), "/hello").is_ok_and(|r| r.status == 200)
        });
    });
}

/// One request over FastCGI straight to the pool's unix socket (what nginx would send).
async fn fcgi_get(addr: &Addr, uri: &str) -> Result<(u16, Vec<u8>), String> {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let params = Params::from_pairs([
        ("REQUEST_METHOD", "GET"),
        ("REQUEST_URI", uri),
        ("DOCUMENT_URI", path),
        ("QUERY_STRING", query),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
    ]);
    let r = match addr {
        Addr::Unix(p) => {
            let mut c = Client::connect_unix(p).await.map_err(|e| e.to_string())?;
            c.request_with(fcgi::Role::Responder, false, &params, b"", None)
                .await
        }
        Addr::Tcp(a) => {
            let mut c = Client::connect_tcp(a.as_str())
                .await
                .map_err(|e| e.to_string())?;
            c.request_with(fcgi::Role::Responder, false, &params, b"", None)
                .await
        }
    }
    .map_err(|e| e.to_string())?;
    Ok((r.status(), r.body().to_vec()))
}

#[test]
fn a_thousand_async_sleeps_on_two_workers_while_status_and_ping_answer() {
    let dir = TempDir::new("axum-thousand");
    let app = start(
        &dir,
        &[
            "--workers",
            "2",
            "--max-requests-in-flight",
            "1000",
            "--backlog",
            "2048",
            "--status-path",
            "/status",
            "--ping-path",
            "/ping",
        ],
    );
    app.wait_for_workers(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = app.unix();
    // The probes use the TCP listener: its accept queue is not behind the 1000 sleeps'.
    let probe = app.tcp();
    let (total, worst_probe) = rt.block_on(async {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(30), fcgi_get(&addr, "/sleep?ms=500"))
                    .await
                    .map_err(|_| "no answer in 30 s".to_string())?
            }));
        }
        // Status and ping while the sleeps are in flight.
        let mut worst = Duration::ZERO;
        tokio::time::sleep(Duration::from_millis(200)).await;
        for uri in ["/ping", "/status?json", "/ping"] {
            let t = Instant::now();
            let (status, _) = fcgi_get(&probe, uri).await.expect("status/ping");
            assert_eq!(status, 200, "{uri}");
            worst = worst.max(t.elapsed());
        }
        // The status page shows each worker's requests in flight and the oldest one.
        let (_, page) = fcgi_get(&probe, "/status?json&full").await.expect("status");
        let page: serde_json::Value = serde_json::from_slice(&page).expect("status JSON");
        let busy: Vec<&serde_json::Value> = page["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .filter(|p| p["requests in flight"].as_u64().unwrap_or(0) > 0)
            .collect();
        assert!(!busy.is_empty(), "{page}");
        for p in &busy {
            assert_eq!(p["request URI"], "/sleep?ms=500", "{p}");
            assert!(p["request duration"].as_u64().unwrap_or(0) > 100_000, "{p}");
        }
        for t in tasks {
            let (status, body) = t.await.expect("task").expect("answer");
            assert_eq!((status, &body[..]), (200, &b"slept 500\n"[..]));
        }
        (started.elapsed(), worst)
    });
    eprintln!("1000 x /sleep?ms=500 on 2 workers: {total:?}; worst status/ping {worst_probe:?}");
    assert!(total < Duration::from_secs(3), "took {total:?}");
    assert!(
        worst_probe < Duration::from_millis(500),
        "probe took {worst_probe:?}"
    );
}

#[test]
fn request_timeout_drops_the_future_answers_504_and_keeps_the_worker() {
    let dir = TempDir::new("axum-timeout");
    let app = start(&dir, &["--workers", "1", "--request-timeout", "1s"]);
    app.wait_for_workers(1);
    let addr = app.unix();
    let pid = fetch_pid(Via::Fcgi(&addr)).expect("/pid");
    let t = Instant::now();
    let r = e2e::fcgi_request(&addr, "GET", "/sleep?ms=5000", b"").expect("answer");
    let took = t.elapsed();
    eprintln!(
        "request_timeout 1s on /sleep?ms=5000: {} after {took:?}",
        r.status()
    );
    assert_eq!(r.status(), 504);
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        fetch_pid(Via::Fcgi(&addr)).expect("/pid"),
        pid,
        "same worker serves"
    );
}

#[test]
fn a_request_body_is_consumed_as_it_arrives() {
    // 200 MB through /count, over FastCGI straight to the pool (nginx would buffer the whole
    // body first and refuses bodies this large by default): the worker reads it as it
    // arrives, never all at once.
    let dir = TempDir::new("axum-count");
    let app = start(&dir, &["--workers", "1"]);
    app.wait_for_workers(1);
    let worker = worker_pids(app.pid())[0];
    let size = 200usize << 20;
    let body: Vec<u8> = vec![7u8; size];
    let peak = Arc::new(AtomicUsize::new(0));
    let watching = {
        let peak = Arc::clone(&peak);
        std::thread::spawn(move || {
            for _ in 0..600 {
                if let Some(kb) = rss_kb(worker) {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let r = e2e::fcgi_request(&app.unix(), "POST", "/count", &body).expect("/count");
    assert_eq!(
        (r.status(), String::from_utf8_lossy(r.body()).trim()),
        (200, size.to_string().as_str())
    );
    drop(watching);
    let peak_mb = peak.load(Ordering::Relaxed) / 1024;
    eprintln!("200 MB request body: worker peak RSS {peak_mb} MB");
    assert!(peak_mb < 64, "worker RSS peaked at {peak_mb} MB");
}

fn rss_kb(pid: i32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn a_tower_http_layer_works_unchanged() {
    both(|keep| {
        let dir = TempDir::new("axum-layer");
        let app = App::start_binary(&dir, &bin_path("axum-layered"), &["--workers", "1"], &[]);
        app.wait_for_workers(1);
        let nginx = Nginx::start(&dir, &format!("unix:{}", app.unix_path().display()), keep);
        let r = http::get(nginx.port(), "/hello").expect("/hello");
        assert_eq!((r.status, &r.body[..]), (200, &b"Hello from a layer\n"[..]));
        assert_eq!(r.header("x-layer"), Some("tower-http"), "keep_conn {keep}");
    });
}

#[test]
fn a_handler_that_blocks_its_thread_past_request_timeout_costs_its_worker() {
    let dir = TempDir::new("axum-block");
    let app = start(
        &dir,
        &[
            "--workers",
            "1",
            "--request-timeout",
            "1s",
            "--request-timeout-grace",
            "1s",
        ],
    );
    app.wait_for_workers(1);
    let addr = app.unix();
    let pid = fetch_pid(Via::Fcgi(&addr)).expect("/pid");
    let t = Instant::now();
    let answer = e2e::fcgi_request(&addr, "GET", "/block?ms=30000", b"");
    let took = t.elapsed();
    eprintln!("/block?ms=30000 with request_timeout 1s: {answer:?} after {took:?}");
    assert!(answer.is_err() || answer.is_ok_and(|r| r.status() >= 500));
    assert!(
        took < Duration::from_secs(10),
        "the worker was ended: {took:?}"
    );
    app.wait_for_workers(1);
    wait_until(Duration::from_secs(10), "a new worker serves", || {
        fetch_pid(Via::Fcgi(&addr)).is_ok_and(|p| p != pid)
    });
}

#[test]
fn a_large_response_read_slowly_keeps_the_worker_small() {
    // 200 MB (1 GB takes too long for the suite) read at a few MB a second at first.
    use std::io::{Read, Write};
    let dir = TempDir::new("axum-slow");
    let app = start(&dir, &["--workers", "1"]);
    app.wait_for_workers(1);
    let worker = worker_pids(app.pid())[0];
    let nginx = Nginx::start(&dir, &format!("unix:{}", app.unix_path().display()), true);
    let size: u64 = 200 << 20;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", nginx.port())).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "GET /big?bytes={size} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut buf = vec![0u8; 64 * 1024];
    let (mut got, mut peak_kb) = (0u64, 0usize);
    let started = Instant::now();
    loop {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        got += n as u64;
        // Slow for the first 2 seconds (about 3 MB/s), then as fast as it comes.
        if started.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(kb) = rss_kb(worker) {
            peak_kb = peak_kb.max(kb);
        }
    }
    assert!(got > size, "headers and {size} bytes: {got}");
    eprintln!(
        "200 MB response read slowly: worker peak RSS {} MB",
        peak_kb / 1024
    );
    assert!(
        peak_kb / 1024 < 64,
        "worker RSS peaked at {} MB",
        peak_kb / 1024
    );
}

#[test]
fn reloads_and_upgrades_with_async_requests_in_flight_fail_no_request() {
    let dir = TempDir::new("axum-reload");
    let app = start(&dir, &["--workers", "2"]);
    app.wait_for_workers(2);
    let nginx = Nginx::start(&dir, &format!("unix:{}", app.unix_path().display()), true);
    let master = app.pid();
    let port = nginx.port();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
            std::thread::spawn(move || {
                for _ in 0..5000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (path, body) = if c < 3 {
                        ("/sleep?ms=300", &b"slept 300\n"[..])
                    } else {
                        ("/hello", &b"Hello, world!\n"[..])
                    };
                    let r = http::get(port, path).unwrap_or_else(|e| panic!("{path}: {e}"));
                    assert_eq!(
                        (r.status, &r.body[..]),
                        (200, body),
                        "{path} during a reload"
                    );
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for (round, sig) in [
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGUSR2,
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGUSR2,
    ]
    .into_iter()
    .enumerate()
    {
        let old: std::collections::BTreeSet<i32> = worker_pids(master).into_iter().collect();
        app.signal(sig);
        wait_until(
            Duration::from_secs(30),
            &format!("round {round} ({sig:?})"),
            || {
                let now: std::collections::BTreeSet<i32> =
                    worker_pids(master).into_iter().collect();
                now.len() == 2 && now.is_disjoint(&old)
            },
        );
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join()
            .expect("every request during the reloads succeeded");
    }
    eprintln!(
        "{} requests through 2 reloads and 2 upgrades with sleeps in flight, none failed",
        sent.load(Ordering::Relaxed)
    );
}
