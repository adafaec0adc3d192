//! Issue 14, second half: who may connect (`allowed_clients`), what a request waiting for a room
//! gets (`queue_timeout`, `max_queue`, a client that leaves), and the request metrics.
//!
//! How a request comes to wait in a worker's queue: with one worker whose one room runs
//! `/sleep`, the pool is saturated, and a saturated worker keeps accepting (within its 20 ms
//! saturation check) so that status requests are answered; the application requests on those
//! connections wait in its room queue. Each waiting request below comes on its own connection,
//! accepted that way (multiplexing is refused, so a second request on one connection is not
//! an option), and the status page's `listen queue`, which counts the requests a worker holds,
//! says when they are there.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use e2e::{fcgi_request, free_port, http, openmetrics, wait_until, App, Nginx, TempDir};
use fcgi::client::Response;
use fcgi::{Params, Role};

/// Generous bound for things that are immediate, on 2 shared cores.
const DEADLINE: Duration = Duration::from_secs(10);

/// "At once" for a 503 over `max_queue`: the figure is 300 ms, measured 19-24 ms on a
/// quiet machine and up to 272 ms at a load average of 12 on the 2 shared cores, so the bound
/// allows for that while staying far from the 3 s a request waiting behind `LONG` would take.
const AT_ONCE: Duration = Duration::from_millis(1000);

/// What the long request sleeps: the 3 s.
const LONG: &str = "/sleep?ms=3000";

/// The warning a refused peer starts an episode with.
const NOT_ALLOWED: &str = "closing connections from peers not in allowed_clients";

fn params(uri: &str) -> Params {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    Params::from_pairs([
        ("REQUEST_METHOD", "GET".to_string()),
        ("REQUEST_URI", uri.to_string()),
        ("SCRIPT_NAME", path.to_string()),
        ("DOCUMENT_URI", path.to_string()),
        ("QUERY_STRING", query.to_string()),
        ("CONTENT_LENGTH", "0".to_string()),
        ("SERVER_PROTOCOL", "HTTP/1.1".to_string()),
    ])
}

/// Writes request 1 for `uri`, without waiting for the answer.
fn send(stream: &mut impl Write, uri: &str) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    fcgi::client::encode_request(1, Role::Responder, false, &params(uri), b"", &mut out);
    stream.write_all(&out)
}

/// Reads the answer to request 1; an error says whether the peer closed first.
fn answer(stream: &mut impl Read) -> Result<Response, String> {
    let mut buf = BytesMut::new();
    let mut response = Response::default();
    loop {
        if fcgi::client::read_response(&mut buf, 1, &mut response).map_err(|e| e.to_string())? {
            return Ok(response);
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk) {
            Ok(0) => return Err(format!("eof after {} bytes", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("{e} after {} bytes", buf.len())),
        }
    }
}

/// A TCP connection to `dst` from the local address `src` (any loopback address works as a
/// source on Linux: 127.0.0.0/8 is all local).
fn connect_from(src: &str, dst: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stream = rt.block_on(async {
        let socket = if dst.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .expect("socket");
        socket
            .bind(SocketAddr::new(src.parse().expect("a source address"), 0))
            .expect("bind the source address");
        socket.connect(dst).await.expect("connect")
    });
    let stream = stream.into_std().expect("std stream");
    stream.set_nonblocking(false).expect("blocking");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream
}

/// `/hello` from `src` to `dst`, and how long the answer took.
fn hello_from(src: &str, dst: SocketAddr) -> (Result<Response, String>, Duration) {
    let t = Instant::now();
    let mut s = connect_from(src, dst);
    let sent = send(&mut s, "/hello");
    let got = sent
        .map_err(|e| e.to_string())
        .and_then(|()| answer(&mut s));
    (got, t.elapsed())
}

/// What a refused peer sees: the connection closed with no answer, and how soon.
fn refused_from(src: &str, dst: SocketAddr) -> Duration {
    let t = Instant::now();
    let mut s = connect_from(src, dst);
    // The write may already fail: the worker may have closed the connection.
    let _ = send(&mut s, "/hello");
    let mut got = Vec::new();
    let read = s.read_to_end(&mut got);
    assert!(
        got.is_empty(),
        "a peer outside allowed_clients got {} bytes: {:?}",
        got.len(),
        String::from_utf8_lossy(&got)
    );
    // EOF (Ok) or a reset, either is a close before any answer.
    let _ = read;
    t.elapsed()
}

/// The port of the app's 127.0.0.1 listener.
fn tcp_port(app: &App) -> u16 {
    match app.tcp() {
        e2e::Addr::Tcp(a) => a.parse::<SocketAddr>().expect("an address").port(),
        e2e::Addr::Unix(p) => panic!("not TCP: {}", p.display()),
    }
}

fn tcp(port: u16, v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
    } else {
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

/// The status page as JSON, straight over the unix socket (answered without a room).
fn status(app: &App) -> serde_json::Value {
    let r = fcgi_request(&app.unix(), "GET", "/status?json", b"").expect("status page");
    serde_json::from_slice(r.body()).expect("status JSON")
}

fn counter(app: &App, key: &str) -> u64 {
    status(app)[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is a number"))
}

#[test]
fn peers_outside_allowed_clients_are_closed_before_a_byte_and_take_no_room() {
    let dir = TempDir::new("allow");
    let port6 = free_port();
    let listen6 = format!("[::1]:{port6}");
    let app = App::start(
        &dir,
        &[
            "--listen",
            &listen6,
            "--workers",
            "1",
            "--allowed-clients",
            "127.0.0.2",
            "--allowed-clients",
            "::1",
            "--status-path",
            "/status",
        ],
    );
    app.wait_for_workers(1);
    let v4 = tcp(tcp_port(&app), false);
    let mut worst_refused = Duration::ZERO;
    for _ in 0..3 {
        worst_refused = worst_refused.max(refused_from("127.0.0.1", v4));
    }
    // Right after: the one worker's room was not taken by the refused connections.
    let (allowed, took) = hello_from("127.0.0.2", v4);
    let allowed = allowed.expect("127.0.0.2 is served");
    assert_eq!(allowed.status(), 200);
    assert_eq!(allowed.body(), b"Hello, world!\n");
    let (v6, took6) = hello_from("::1", tcp(port6, true));
    assert_eq!(v6.expect("::1 is served").status(), 200);
    eprintln!(
        "refused closed within {worst_refused:?}; allowed answered in {took:?} (v6 {took6:?})"
    );
    assert!(
        worst_refused < Duration::from_secs(2),
        "closed at once: {worst_refused:?}"
    );
    assert!(took < Duration::from_secs(2), "answered at once: {took:?}");
    wait_until(DEADLINE, "the refusal is logged", || {
        app.stderr().contains(NOT_ALLOWED)
    });
    let log = app.stderr();
    assert_eq!(
        log.matches(NOT_ALLOWED).count(),
        1,
        "one line for 3 refusals: {log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains(NOT_ALLOWED))
        .expect("the line");
    assert!(line.contains("127.0.0.1"), "it names the peer: {line}");
    // Unix sockets are not filtered.
    let unix = fcgi_request(&app.unix(), "GET", "/hello", b"").expect("unix is served");
    assert_eq!(unix.status(), 200);
}

#[test]
fn fcgi_web_server_addrs_is_the_list_when_allowed_clients_is_not_set() {
    let dir = TempDir::new("allow-env");
    let app = App::start_with_env(
        &dir,
        &["--workers", "1"],
        &[("FCGI_WEB_SERVER_ADDRS", "127.0.0.2,127.0.0.3")],
    );
    app.wait_for_workers(1);
    let v4 = tcp(tcp_port(&app), false);
    refused_from("127.0.0.1", v4);
    let (got, _) = hello_from("127.0.0.3", v4);
    assert_eq!(got.expect("127.0.0.3 is served").status(), 200);
}

#[test]
fn a_cidr_range_and_ipv6_outside_it() {
    let dir = TempDir::new("allow-cidr");
    let port6 = free_port();
    let listen6 = format!("[::1]:{port6}");
    let app = App::start(
        &dir,
        &[
            "--listen",
            &listen6,
            "--workers",
            "1",
            "--allowed-clients",
            "127.0.0.0/30",
        ],
    );
    app.wait_for_workers(1);
    let v4 = tcp(tcp_port(&app), false);
    for src in ["127.0.0.1", "127.0.0.3"] {
        let (got, _) = hello_from(src, v4);
        assert_eq!(
            got.unwrap_or_else(|e| panic!("{src}: {e}")).status(),
            200,
            "{src}"
        );
    }
    refused_from("127.0.0.4", v4);
    refused_from("::1", tcp(port6, true));
    let (got, _) = hello_from("127.0.0.2", v4);
    assert_eq!(got.expect("still served").status(), 200);
}

/// Starts `LONG` through nginx on its own thread, and waits until the worker runs it. On a
/// loaded machine the long request itself can wait past a short `queue_timeout` before it
/// gets the room (it is then answered 503 and never runs): it is sent again, a few times.
fn occupy(app: &App, nginx: &Nginx) -> thread::JoinHandle<u16> {
    let port = nginx.port();
    for _ in 0..5 {
        let long = thread::spawn(move || http::get(port, LONG).map_or(0, |r| r.status));
        wait_until(DEADLINE, "the long request runs or is refused", || {
            status(app)["active processes"] == 1 || long.is_finished()
        });
        if !long.is_finished() {
            return long;
        }
        let refused = long.join().expect("long request thread");
        assert_eq!(
            refused, 503,
            "the long request ended before it ran, with {refused}"
        );
    }
    panic!("the long request was refused 5 times in a row");
}

/// Waits until the worker holds `n` requests waiting for its room.
fn wait_for_waiting(app: &App, n: u64) {
    wait_until(DEADLINE, &format!("{n} requests wait"), || {
        status(app)["listen queue"].as_u64() == Some(n)
    });
}

#[test]
fn a_request_waiting_past_queue_timeout_is_answered_503_through_nginx() {
    let dir = TempDir::new("queue-timeout");
    let app = App::start(
        &dir,
        &[
            "--workers",
            "1",
            "--queue-timeout",
            "500ms",
            "--status-path",
            "/status",
        ],
    );
    app.wait_for_workers(1);
    let nginx = Nginx::start(&dir, &format!("unix:{}", app.unix_path().display()), true);
    let long = occupy(&app, &nginx);
    let t = Instant::now();
    let r = http::get(nginx.port(), "/hello").expect("an answer");
    let waited = t.elapsed();
    eprintln!(
        "queue_timeout 500ms: answered {} after {waited:?}",
        r.status
    );
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("Retry-After"), Some("1"));
    assert!(
        waited >= Duration::from_millis(400) && waited <= Duration::from_millis(1500),
        "answered after about 0.5 s: {waited:?}"
    );
    assert_eq!(
        long.join().expect("long request"),
        200,
        "the long request is untouched"
    );
    assert_eq!(counter(&app, "queue timeouts"), 1);
    let log = app.stderr();
    assert_eq!(
        log.matches("requests waited queue_timeout for a room")
            .count(),
        1,
        "{log}"
    );
}

#[test]
fn past_max_queue_a_request_is_answered_503_at_once() {
    let dir = TempDir::new("max-queue");
    let app = App::start(
        &dir,
        &[
            "--workers",
            "1",
            "--max-queue",
            "2",
            "--status-path",
            "/status",
        ],
    );
    app.wait_for_workers(1);
    let nginx = Nginx::start(&dir, &format!("unix:{}", app.unix_path().display()), true);
    let long = occupy(&app, &nginx);
    let port = nginx.port();
    let waiting: Vec<_> = (0..2)
        .map(|_| thread::spawn(move || http::get(port, "/hello").map_or(0, |r| r.status)))
        .collect();
    wait_for_waiting(&app, 2);
    let t = Instant::now();
    let r = http::get(port, "/hello").expect("an answer");
    let took = t.elapsed();
    eprintln!(
        "max_queue 2: the third waiting request answered {} in {took:?}",
        r.status
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.header("Retry-After"), Some("1"));
    assert!(took < AT_ONCE, "at once: {took:?}");
    for w in waiting {
        assert_eq!(
            w.join().expect("waiting request"),
            200,
            "the two waiting ones run"
        );
    }
    assert_eq!(long.join().expect("long request"), 200);
    assert_eq!(counter(&app, "queue full"), 1);
}

#[test]
fn a_waiting_request_whose_client_left_never_runs() {
    let dir = TempDir::new("abandoned");
    let app = App::start(
        &dir,
        &["--workers", "1", "--status-path", "/status", "--access-log"],
    );
    app.wait_for_workers(1);
    let nginx = Nginx::start(&dir, &format!("unix:{}", app.unix_path().display()), true);
    let long = occupy(&app, &nginx);
    // One client closes its connection while its request waits...
    let mut closed = UnixStream::connect(app.unix_path()).expect("connect");
    send(&mut closed, "/hello?closed").expect("send");
    wait_for_waiting(&app, 1);
    drop(closed);
    // ...the other sends FCGI_ABORT_REQUEST and waits for its END_REQUEST. As it queues, the
    // first is swept out: it holds no place in the queue.
    let mut aborted = UnixStream::connect(app.unix_path()).expect("connect");
    aborted
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    send(&mut aborted, "/hello?aborted").expect("send");
    wait_until(
        DEADLINE,
        "the closed one is dropped as the next queues",
        || {
            let s = status(&app);
            s["abandoned in queue"] == 1 && s["listen queue"] == 1
        },
    );
    // A browser that gives up through nginx: nginx closes its upstream connection.
    let mut browser = TcpStream::connect(("127.0.0.1", nginx.port())).expect("connect to nginx");
    browser
        .write_all(b"GET /hello?via-nginx HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send");
    wait_for_waiting(&app, 2);
    drop(browser);
    // FCGI_ABORT_REQUEST for request 1: version 1, type 2, id 1, no content.
    aborted
        .write_all(&[1, 2, 0, 1, 0, 0, 0, 0])
        .expect("send the abort");
    assert_eq!(long.join().expect("long request"), 200);
    let end = answer(&mut aborted).expect("the aborted request is ended");
    assert!(
        end.stdout.is_empty(),
        "it never ran: {:?}",
        String::from_utf8_lossy(&end.stdout)
    );
    wait_until(DEADLINE, "all three are counted", || {
        counter(&app, "abandoned in queue") == 3
    });
    // The worker is free again, and the access log shows that only the long request ran.
    assert_eq!(
        fcgi_request(&app.unix(), "GET", "/hello?after", b"")
            .expect("after")
            .status(),
        200
    );
    wait_until(DEADLINE, "the access log has /hello?after", || {
        app.stderr().contains("/hello?after")
    });
    let log = app.stderr();
    assert!(log.contains(LONG), "{log}");
    for uri in ["/hello?closed", "/hello?aborted", "/hello?via-nginx"] {
        assert!(
            !log.lines()
                .any(|l| l.contains(uri) && l.contains("status=")),
            "{uri} never ran: {log}"
        );
    }
}

#[test]
fn request_metrics_count_what_was_sent() {
    let dir = TempDir::new("metrics");
    let app = App::start(&dir, &["--workers", "2", "--status-path", "/status"]);
    app.wait_for_workers(2);
    let unix = app.unix();
    // Each request's time as the client saw it, an upper bound of the worker's own.
    let mut seen = Vec::new();
    let mut get = |uri: &str| {
        let t = Instant::now();
        let status = fcgi_request(&unix, "GET", uri, b"").expect(uri).status();
        seen.push((uri.starts_with("/sleep"), t.elapsed()));
        status
    };
    for _ in 0..10 {
        assert_eq!(get("/hello"), 200);
    }
    for _ in 0..3 {
        assert_eq!(get("/no-such-route"), 404);
    }
    for _ in 0..2 {
        assert_eq!(get("/panic"), 500);
    }
    for _ in 0..2 {
        assert_eq!(get("/sleep?ms=300"), 200);
    }
    let within = |bound: u64, sleeps: bool| {
        let n = seen
            .iter()
            .filter(|(sleep, took)| *sleep == sleeps && *took <= Duration::from_millis(bound))
            .count();
        n as f64
    };
    let worst_fast = seen.iter().filter(|s| !s.0).map(|s| s.1).max();
    let sleeps: Vec<_> = seen.iter().filter(|s| s.0).map(|s| s.1).collect();
    eprintln!("slowest fast request {worst_fast:?}; the sleeps took {sleeps:?}");
    let page = fcgi_request(&unix, "GET", "/status?openmetrics", b"").expect("metrics");
    let text = String::from_utf8_lossy(page.body()).to_string();
    let samples = openmetrics::check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let value = |name: &str, label: (&str, &str)| {
        samples
            .iter()
            .find(|s| s.name == name && s.label(label.0) == Some(label.1))
            .unwrap_or_else(|| panic!("{name}{{{}={}}} in {text}", label.0, label.1))
            .value
    };
    let class = |c: &str| value("fcgi_pool_requests_total", ("class", c));
    assert_eq!(
        [
            class("1xx"),
            class("2xx"),
            class("3xx"),
            class("4xx"),
            class("5xx")
        ],
        [0.0, 12.0, 0.0, 3.0, 2.0],
        "{text}"
    );
    let bucket = |le: &str| value("fcgi_pool_request_duration_seconds_bucket", ("le", le));
    // A 300 ms sleep is never in the 250 ms bucket; every request the client saw answered
    // within a bound is within it on the worker too (a loaded machine can stretch any of them,
    // so the client's times say which buckets must hold which).
    assert_eq!(bucket("+Inf"), 17.0);
    assert!(bucket("0.25") <= 15.0, "the sleeps are past 250 ms: {text}");
    assert!(bucket("0.25") >= within(250, false), "{text}");
    assert!(
        bucket("0.5") - bucket("0.25") >= within(500, true),
        "the sleeps answered within 500 ms are in the 500 ms bucket: {text}"
    );
    assert!(
        bucket("0.5") >= within(500, false) + within(500, true),
        "{text}"
    );
    let count = value("fcgi_pool_request_duration_seconds_count", ("pool", "www"));
    let sum = value("fcgi_pool_request_duration_seconds_sum", ("pool", "www"));
    assert_eq!(count, 17.0);
    assert!(
        (0.6..5.0).contains(&sum),
        "two 300 ms sleeps and fast ones: {sum}"
    );
    let json = status(&app);
    assert_eq!(json["requests by status"]["4xx"], 3);
    assert_eq!(json["request duration"]["count"], 17);
}
