//! Peers that do not play by the rules (issue 12): connections that send nothing or half a
//! request, interleaved requests on one connection, params over the limit, a request past
//! `request_timeout`, and the descriptor limit. Each costs at most what the README's Limits
//! section says, and is answered the way the protocol allows.

use std::io::Read;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use e2e::{fcgi_request, wait_until, worker_pids, Addr, App, Nginx, TempDir};
use fcgi::client::ClientEvent;
use fcgi::io::Client;
use fcgi::{Params, ProtocolStatus, Role};

/// The bound asserted for a real request while hostile connections are open. The issue's
/// figure is 100 ms, and alone the worst of these requests is 2-20 ms; but with the other
/// tests of the suite sharing two cores, a scheduling stall alone reached 100 ms, so the
/// assertion allows 250 ms (before this change the request had no answer after 12 s).
const REAL_REQUEST_BOUND: Duration = Duration::from_millis(250);

/// `/hello` on a new connection: how long the answer took.
fn timed_hello(addr: &Addr) -> Duration {
    let start = Instant::now();
    let res = fcgi_request(addr, "GET", "/hello", b"").expect("a real request is answered");
    assert_eq!(res.status(), 200);
    start.elapsed()
}

/// An open connection of either kind, held as a std socket.
enum Held {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Held {
    fn connect(addr: &Addr) -> Held {
        match addr {
            Addr::Tcp(a) => Held::Tcp(std::net::TcpStream::connect(a).expect("tcp connect")),
            Addr::Unix(p) => {
                Held::Unix(std::os::unix::net::UnixStream::connect(p).expect("unix connect"))
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        match self {
            Held::Tcp(s) => s.write_all(bytes).expect("write"),
            Held::Unix(s) => s.write_all(bytes).expect("write"),
        }
    }

    /// True once the server has closed it (EOF or a reset), false while it is still open.
    fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let read = match self {
            Held::Tcp(s) => {
                s.set_nonblocking(true).expect("nonblocking");
                s.read(&mut byte)
            }
            Held::Unix(s) => {
                s.set_nonblocking(true).expect("nonblocking");
                s.read(&mut byte)
            }
        };
        match read {
            Ok(0) => true,
            Ok(_) => panic!("the server sent bytes to a connection that sent no request"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        }
    }
}

/// The first three bytes of a BEGIN_REQUEST: a record header cut short.
fn three_bytes_of_a_begin_request() -> Vec<u8> {
    let mut wire = BytesMut::new();
    fcgi::client::encode_request(1, Role::Responder, true, &Params::default(), b"", &mut wire);
    wire[..3].to_vec()
}

/// Accepting the hostile connections costs each worker at most FIRST_REQUEST_GRACE (5 ms) per
/// connection: 400 over 4 workers is 0.5 s at worst. This fixed wait (bounded, documented)
/// gives them that with room to spare before the latency is measured.
const ACCEPT_SETTLE: Duration = Duration::from_millis(1500);

/// The read timeout the hostile-connection test configures.
const READ_TIMEOUT: Duration = Duration::from_secs(6);

#[test]
fn silent_and_half_sent_connections_hold_no_room_and_are_closed_at_the_read_timeout() {
    let dir = TempDir::new("hostile-silent");
    let app = App::start(
        &dir,
        &[
            "--workers",
            "4",
            "--request-read-timeout",
            "6s",
            "--log-format",
            "json",
        ],
    );
    app.wait_for_workers(4);
    let partial = three_bytes_of_a_begin_request();
    for addr in [app.tcp(), app.unix()] {
        let opened = Instant::now();
        let mut held: Vec<Held> = (0..400).map(|_| Held::connect(&addr)).collect();
        for conn in held.iter_mut().skip(200) {
            conn.write(&partial);
        }
        std::thread::sleep(ACCEPT_SETTLE);
        let worst = (0..20).map(|_| timed_hello(&addr)).max().expect("20");
        eprintln!("{addr:?}: worst of 20 requests with 400 hostile connections open: {worst:?}");
        assert!(
            worst < REAL_REQUEST_BOUND,
            "{addr:?}: a real request took {worst:?} with 400 silent or half-sent connections open"
        );

        // 500 connect-and-close cycles in 2 s, with real requests beside them.
        let churn = {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                for i in 0..500u32 {
                    drop(Held::connect(&addr));
                    let due = Duration::from_millis(4) * i;
                    if let Some(ahead) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(ahead);
                    }
                }
                start.elapsed()
            })
        };
        let mut worst = Duration::ZERO;
        while !churn.is_finished() {
            worst = worst.max(timed_hello(&addr));
            std::thread::sleep(Duration::from_millis(20));
        }
        let churned = churn.join().expect("churn thread");
        eprintln!(
            "{addr:?}: worst request during 500 connect-and-close cycles in {churned:?}: {worst:?}"
        );
        assert!(
            worst < REAL_REQUEST_BOUND,
            "{addr:?}: a real request took {worst:?} during connect-and-close churn"
        );

        // The server closes them all after the read timeout, counted from accept.
        wait_until(
            READ_TIMEOUT + Duration::from_secs(10),
            "the server to close the silent and half-sent connections",
            || held.iter_mut().all(|c| c.closed_by_server()),
        );
        let closed_after = opened.elapsed();
        eprintln!("{addr:?}: all 400 closed by the server {closed_after:?} after they opened");
        assert!(
            closed_after >= READ_TIMEOUT - Duration::from_millis(500),
            "closed after {closed_after:?}, before the read timeout of {READ_TIMEOUT:?}"
        );
    }
    // Once per episode and worker, not once per connection.
    let log = app.stderr();
    let warnings = log
        .lines()
        .filter(|l| l.contains("sent no complete request within request_read_timeout"))
        .count();
    assert!(
        (1..=8).contains(&warnings),
        "{warnings} warnings for 800 connections closed: one per worker and episode expected"
    );
}

/// Splits an encoded stream of records into whole records.
fn records(mut wire: BytesMut) -> Vec<BytesMut> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        let content = usize::from(u16::from_be_bytes([wire[4], wire[5]]));
        let len = 8 + content + usize::from(wire[6]);
        out.push(wire.split_to(len));
    }
    out
}

/// The params of a POST to `/echo` with `len` body bytes.
fn echo_params(len: usize) -> Params {
    Params::from_pairs([
        ("REQUEST_METHOD", "POST".to_string()),
        ("REQUEST_URI", "/echo".to_string()),
        ("SCRIPT_NAME", "/echo".to_string()),
        ("CONTENT_LENGTH", len.to_string()),
        ("SERVER_PROTOCOL", "HTTP/1.1".to_string()),
    ])
}

#[test]
fn interleaved_requests_on_one_connection_get_the_honest_refusal() {
    let dir = TempDir::new("hostile-mpx");
    let app = App::start(&dir, &["--workers", "1", "--max-requests-in-flight", "1"]);
    app.wait_for_workers(1);
    const BODY: usize = 2 * 1024 * 1024;
    let bodies: Vec<Vec<u8>> = (0..3u8)
        .map(|k| (0..BODY).map(|i| (i % 251) as u8 ^ k).collect())
        .collect();
    let per_request: Vec<Vec<BytesMut>> = (0..3u16)
        .map(|i| {
            let mut wire = BytesMut::new();
            let body = &bodies[usize::from(i)];
            fcgi::client::encode_request(
                i + 1,
                Role::Responder,
                true,
                &echo_params(body.len()),
                body,
                &mut wire,
            );
            records(wire)
        })
        .collect();
    // Round-robin, record by record: BEGIN 1, BEGIN 2, BEGIN 3, PARAMS 1, ...
    let mut interleaved = Vec::new();
    let longest = per_request.iter().map(Vec::len).max().unwrap_or(0);
    for r in 0..longest {
        for request in &per_request {
            if let Some(rec) = request.get(r) {
                interleaved.extend_from_slice(rec);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let Addr::Tcp(tcp) = app.tcp() else {
        unreachable!()
    };
    let (stdout, ends) = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(tcp.as_str())
            .await
            .expect("connect");
        let (rd, mut wr) = stream.into_split();
        let send = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            wr.write_all(&interleaved).await.expect("send");
            wr
        });
        let mut rd = rd;
        let mut buf = BytesMut::new();
        let mut stdout = Vec::new();
        let mut ends = std::collections::BTreeMap::new();
        let work = async {
            while ends.len() < 3 {
                let event = match fcgi::client::decode_event(&mut buf).expect("well-formed") {
                    Some(event) => Some(event),
                    None => {
                        use tokio::io::AsyncReadExt;
                        buf.reserve(64 * 1024);
                        if rd.read_buf(&mut buf).await.expect("read") == 0 {
                            None
                        } else {
                            continue;
                        }
                    }
                };
                match event {
                    Some(ClientEvent::Stdout { id: 1, data }) => stdout.extend_from_slice(&data),
                    Some(ClientEvent::End {
                        id,
                        protocol_status,
                        ..
                    }) => {
                        ends.insert(id, protocol_status);
                    }
                    Some(other) => panic!("unexpected {other:?}"),
                    None => panic!("the server closed the connection"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), work)
            .await
            .expect("every request ended within 60 s: the worker is not wedged");
        let _ = send.await;
        (stdout, ends)
    });
    assert_eq!(ends.get(&1), Some(&ProtocolStatus::RequestComplete));
    assert_eq!(ends.get(&2), Some(&ProtocolStatus::CantMpxConn));
    assert_eq!(ends.get(&3), Some(&ProtocolStatus::CantMpxConn));
    let body_at = stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block")
        + 4;
    assert!(
        stdout[body_at..] == bodies[0][..],
        "the first request's 2 MB come back byte-exact"
    );
    // The worker serves the next request on a new connection.
    let next = fcgi_request(&app.tcp(), "GET", "/hello", b"").expect("the next request");
    assert_eq!(next.status(), 200);
}

/// Params with `extra` more pairs than nginx's usual set: over the default `max_params` (1024)
/// when `extra` is above it.
fn params_with(extra: usize) -> Params {
    let mut pairs = vec![
        ("REQUEST_METHOD".to_string(), "GET".to_string()),
        ("REQUEST_URI".to_string(), "/hello".to_string()),
        ("SCRIPT_NAME".to_string(), "/hello".to_string()),
        ("SERVER_PROTOCOL".to_string(), "HTTP/1.1".to_string()),
    ];
    pairs.extend((0..extra).map(|i| (format!("HTTP_X_H_{i}"), "v".to_string())));
    Params::from_pairs(pairs)
}

#[test]
fn params_over_the_limit_are_answered_431_and_the_connection_goes_on() {
    let dir = TempDir::new("hostile-431");
    let app = App::start(&dir, &["--workers", "1"]);
    app.wait_for_workers(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut client = Client::connect_unix(app.unix_path())
            .await
            .expect("connect");
        for _ in 0..3 {
            let refused = client
                .request(&params_with(1100), b"")
                .await
                .expect("an answer, not a reset");
            assert_eq!(refused.status(), 431);
            assert_eq!(
                refused.protocol_status,
                Some(ProtocolStatus::RequestComplete)
            );
        }
        let next = client
            .request(&params_with(0), b"")
            .await
            .expect("the same connection (FCGI_KEEP_CONN) serves the next request");
        assert_eq!((next.status(), next.body()), (200, &b"Hello, world!\n"[..]));
    });

    // Through nginx these limits cannot be reached: nginx refuses params over 64 KiB itself
    // (one FastCGI record, a 500 before it connects) and about 1,000 request headers (400),
    // so what reaches the pool through nginx is always under 256 KiB and 1,024 pairs.

    let warnings = app
        .stderr()
        .lines()
        .filter(|l| l.contains("request params over the limit"))
        .count();
    assert_eq!(
        warnings,
        1,
        "three refusals in one episode: one line\n{}",
        app.stderr()
    );
}

#[test]
fn a_request_past_request_timeout_is_answered_504_at_the_timeout() {
    let dir = TempDir::new("hostile-504");
    let app = App::start(
        &dir,
        &[
            "--workers",
            "2",
            "--request-timeout",
            "1s",
            "--request-timeout-grace",
            "1s",
        ],
    );
    app.wait_for_workers(2);
    let before = worker_pids(app.pid());
    let start = Instant::now();
    let res = fcgi_request(&app.tcp(), "GET", "/sleep?ms=5000", b"").expect("an answer");
    let took = start.elapsed();
    eprintln!("504 over FastCGI after {took:?}");
    assert_eq!(res.status(), 504);
    assert!(
        took < Duration::from_millis(1500),
        "answered after {took:?}"
    );
    app.wait_for_log("request past request_timeout");
    // The stuck worker is replaced.
    wait_until(
        Duration::from_secs(15),
        "the timed-out worker to be replaced",
        || {
            let now = worker_pids(app.pid());
            // The stuck one is gone (not merely joined by a new one).
            now.len() == 2 && before.iter().any(|p| !now.contains(p))
        },
    );
    let next = fcgi_request(&app.tcp(), "GET", "/hello", b"").expect("the next request");
    assert_eq!(next.status(), 200);

    let nginx = Nginx::start(&dir, &format!("unix:{}", app.unix_path().display()), true);
    let start = Instant::now();
    let res = e2e::http::get(nginx.port(), "/sleep?ms=5000").expect("nginx answers");
    let took = start.elapsed();
    eprintln!("504 through nginx after {took:?}");
    assert_eq!(res.status, 504, "the application's 504, not nginx's 502");
    assert!(
        took < Duration::from_millis(1500),
        "answered after {took:?}"
    );
    wait_until(
        Duration::from_secs(15),
        "a request through nginx to succeed",
        || e2e::http::get(nginx.port(), "/hello").is_ok_and(|r| r.status == 200),
    );
}

/// User plus system CPU time of `pid` so far, from /proc/PID/stat (in clock ticks of 10 ms).
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = stat.rsplit(')').next().expect("fields after the name");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// `app-example` started under `ulimit -n 128`, on a unix socket only.
fn app_with_128_files(dir: &TempDir, args: &[&str]) -> App {
    let unix = dir.path().join("app.sock");
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n 128 && exec \"$0\" \"$@\"")
        .arg(e2e::bin_path("app-example"))
        .arg("--listen")
        .arg(format!("unix:{}", unix.display()))
        .args(args);
    App::start_command(dir, cmd, unix)
}

/// How long the no-spin check watches a worker at its limit.
const SPIN_WINDOW: Duration = Duration::from_secs(10);

/// CPU a worker waiting at its limit may use over [`SPIN_WINDOW`]: a wake-up a second costs
/// microseconds; a spinning loop would use the whole window.
const SPIN_BOUND: Duration = Duration::from_millis(300);

#[test]
fn at_the_file_limit_the_worker_neither_spins_nor_hangs_in_silence() {
    let dir = TempDir::new("hostile-emfile");
    let app = app_with_128_files(
        &dir,
        &[
            "--workers",
            "1",
            "--max-connections",
            "1000",
            "--request-read-timeout",
            "60s",
        ],
    );
    app.wait_for_workers(1);
    let worker = worker_pids(app.pid())[0];
    let held: Vec<Held> = (0..400).map(|_| Held::connect(&app.unix())).collect();
    app.wait_for_log("at the open-file limit");
    let cpu = cpu_time(worker);
    std::thread::sleep(SPIN_WINDOW);
    let used = cpu_time(worker).saturating_sub(cpu);
    eprintln!("worker CPU over {SPIN_WINDOW:?} at the file limit: {used:?}");
    assert!(
        used < SPIN_BOUND,
        "the worker used {used:?} of CPU waiting at its file limit"
    );
    drop(held);
    wait_until(Duration::from_secs(10), "requests to succeed again", || {
        fcgi_request(&app.unix(), "GET", "/hello", b"").is_ok_and(|r| r.status() == 200)
    });
    for _ in 0..10 {
        let took = timed_hello(&app.unix());
        assert!(
            took < Duration::from_secs(1),
            "recovered, but answered in {took:?}"
        );
    }
    let lines = app
        .stderr()
        .lines()
        .filter(|l| l.contains("at the open-file limit"))
        .count();
    assert_eq!(lines, 1, "one line for the episode\n{}", app.stderr());
}

#[test]
fn the_connection_cap_is_what_get_values_says_and_what_the_worker_enforces() {
    let dir = TempDir::new("hostile-cap");
    // No max_connections: the open-file limit (128) minus the reserve (64).
    let app = app_with_128_files(&dir, &["--workers", "1"]);
    app.wait_for_workers(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let values = rt.block_on(async {
        let mut c = Client::connect_unix(app.unix_path())
            .await
            .expect("connect");
        c.get_values(&["FCGI_MAX_CONNS", "FCGI_MPXS_CONNS"])
            .await
            .expect("GET_VALUES answered")
    });
    assert_eq!(values.get_str("FCGI_MAX_CONNS"), Some("64"));
    assert_eq!(values.get_str("FCGI_MPXS_CONNS"), Some("0"));
    let held: Vec<Held> = (0..100).map(|_| Held::connect(&app.unix())).collect();
    app.wait_for_log("at max_connections");
    assert!(
        !app.stderr().contains("at the open-file limit"),
        "the cap keeps the worker below its file limit\n{}",
        app.stderr()
    );
    drop(held);
    wait_until(Duration::from_secs(10), "requests to succeed again", || {
        fcgi_request(&app.unix(), "GET", "/hello", b"").is_ok_and(|r| r.status() == 200)
    });
}
