//! The product end to end: the example application behind real nginx (Debian's package, the
//! shipped config), with `fastcgi_keep_conn` on and off, and behind `cgi-fcgi` (libfcgi).

use std::process::Command;
use std::time::Duration;

use e2e::http::{self, Body};
use e2e::{fetch_pid, worker_pids, App, Nginx, TempDir, Via};
use sha2::{Digest, Sha256};

struct Stack {
    app: App,
    nginx: Nginx,
    _dir: TempDir,
}

fn stack(keep_conn: bool, args: &[&str]) -> Stack {
    let dir = TempDir::new(if keep_conn {
        "nginx-keep"
    } else {
        "nginx-close"
    });
    let app = App::start_with_env(&dir, args, &[("RUST_LOG", "debug")]);
    let upstream = format!("unix:{}", app.unix_path().display());
    let nginx = Nginx::start(&dir, &upstream, keep_conn);
    Stack {
        app,
        nginx,
        _dir: dir,
    }
}

fn both(f: impl Fn(bool)) {
    for keep_conn in [true, false] {
        f(keep_conn);
    }
}

fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

#[test]
fn every_route_through_nginx() {
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
        let env: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
        assert_eq!(env["REQUEST_URI"], "/env?a=1");
        assert_eq!(env["QUERY_STRING"], "a=1");
        assert_eq!(env["REQUEST_METHOD"], "GET");
        assert_eq!(env["GATEWAY_INTERFACE"], "CGI/1.1");

        let r = http::get(p, "/sleep?ms=50").expect("/sleep");
        assert_eq!((r.status, &r.body[..]), (200, &b"slept 50\n"[..]));

        let pid = fetch_pid(Via::Nginx(&s.nginx)).expect("/pid");
        assert!(
            worker_pids(s.app.pid()).contains(&pid),
            "{pid} is one of the workers"
        );

        let r = http::get(p, "/nope").expect("/nope");
        assert_eq!(r.status, 404);

        let r = http::get(p, "/sleep?ms=x").expect("/sleep bad");
        assert_eq!(r.status, 400);
    });
}

#[test]
fn echo_bodies_of_every_size_arrive_intact() {
    both(|keep| {
        let s = stack(keep, &["--workers", "2"]);
        for size in [0usize, 1, 1 << 20, 10 << 20] {
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
fn a_50_mb_stream_arrives_whole() {
    both(|keep| {
        let s = stack(keep, &["--workers", "1"]);
        let r = http::get(s.nginx.port(), "/big?bytes=50000000").expect("/big");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 50_000_000, "keep_conn {keep}");
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert_eq!(r.header("content-length"), Some("50000000"));
        assert!(r
            .body
            .iter()
            .enumerate()
            .step_by(4099)
            .all(|(i, &b)| b == b'a' + ((i % (64 * 1024)) % 26) as u8));
        // The connection is usable again after a long stream.
        assert_eq!(
            http::get(s.nginx.port(), "/hello").expect("/hello").status,
            200
        );
    });
}

#[test]
fn a_16_kib_header_reaches_the_app() {
    both(|keep| {
        let s = stack(keep, &["--workers", "1"]);
        let big = "x".repeat(16 * 1024);
        let r = http::request(
            s.nginx.port(),
            "GET",
            "/env",
            &[("X-Big", &big)],
            Body::None,
        )
        .expect("/env");
        assert_eq!(r.status, 200);
        let env: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
        assert_eq!(env["HTTP_X_BIG"].as_str().map(str::len), Some(16 * 1024));
    });
}

#[test]
fn static_files_never_reach_the_pool() {
    let s = stack(true, &["--workers", "1"]);
    let r = http::get(s.nginx.port(), "/static.txt").expect("static");
    assert_eq!(
        (r.status, &r.body[..]),
        (200, &b"static file served by nginx\n"[..])
    );
    // A request that does reach the pool, to know its log is being written.
    assert_eq!(
        http::get(s.nginx.port(), "/hello").expect("/hello").status,
        200
    );
    s.app.wait_for_log("uri=\"/hello\"");
    assert!(
        !s.app.stderr().contains("static.txt"),
        "the app saw the static file request"
    );
}

#[test]
fn panic_is_a_500_and_the_worker_keeps_serving() {
    both(|keep| {
        let s = stack(keep, &["--workers", "1"]);
        let before = fetch_pid(Via::Nginx(&s.nginx)).expect("/pid");
        let r = http::get(s.nginx.port(), "/panic").expect("/panic");
        assert_eq!(r.status, 500);
        let after = fetch_pid(Via::Nginx(&s.nginx)).expect("/pid after the panic");
        assert_eq!(after, before, "the same worker answered after its panic");
    });
}

#[test]
fn crash_is_a_502_and_the_pool_is_back_to_size() {
    both(|keep| {
        let s = stack(keep, &["--workers", "2"]);
        s.app.wait_for_workers(2);
        let r = http::get(s.nginx.port(), "/crash").expect("/crash");
        assert_eq!(r.status, 502, "keep_conn {keep}");
        s.app.wait_for_log("worker died unexpectedly");
        // The pool back at 2.
        s.app.wait_for_workers(2);
        assert_eq!(
            http::get(s.nginx.port(), "/hello").expect("/hello").status,
            200
        );
    });
}

#[test]
fn sixty_four_clients_times_two_hundred_requests_all_correct() {
    both(|keep| {
        let s = stack(keep, &["--workers", "4"]);
        let port = s.nginx.port();
        let clients: Vec<_> = (0..64)
            .map(|c| {
                std::thread::spawn(move || {
                    for i in 0..200 {
                        if (c + i) % 4 == 0 {
                            let body = format!("client {c} request {i}");
                            let r = http::request(
                                port,
                                "POST",
                                "/echo",
                                &[],
                                Body::Bytes(body.as_bytes()),
                            )
                            .unwrap_or_else(|e| panic!("client {c} request {i}: {e}"));
                            assert_eq!((r.status, r.body), (200, body.into_bytes()));
                        } else {
                            let r = http::get(port, "/hello")
                                .unwrap_or_else(|e| panic!("client {c} request {i}: {e}"));
                            assert_eq!((r.status, &r.body[..]), (200, &b"Hello, world!\n"[..]));
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.join()
                .expect("every client thread finished with every response correct");
        }
    });
}

/// libfcgi's `cgi-fcgi` as a second real client: the request comes from its environment.
fn cgi_fcgi(socket: &std::path::Path, env: &[(&str, &str)], stdin: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("cgi-fcgi")
        .args(["-bind", "-connect"])
        .arg(socket)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cgi-fcgi (scripts/install-deps installs libfcgi-bin)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("cgi-fcgi output");
    out.stdout
}

#[test]
fn cgi_fcgi_with_an_environment_variable_over_8_kib() {
    let dir = TempDir::new("cgi-fcgi");
    let app = App::start(&dir, &["--workers", "1"]);
    let big = "v".repeat(9000);
    let out = cgi_fcgi(
        app.unix_path(),
        &[
            ("REQUEST_METHOD", "GET"),
            ("DOCUMENT_URI", "/env"),
            ("REQUEST_URI", "/env"),
            ("BIG", &big),
        ],
        b"",
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("Status: 200 OK\r\n"), "{text}");
    let body = &text[text.find("\r\n\r\n").expect("header block") + 4..];
    let env: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(env["BIG"].as_str().map(str::len), Some(9000));

    let out = cgi_fcgi(
        app.unix_path(),
        &[
            ("REQUEST_METHOD", "POST"),
            ("DOCUMENT_URI", "/echo"),
            ("CONTENT_LENGTH", "11"),
        ],
        b"hello bytes",
    );
    assert!(
        out.ends_with(b"\r\n\r\nhello bytes"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn fast_requests_do_not_wait_behind_a_slow_one_on_kept_alive_connections() {
    // With keep_conn on, nginx reuses idle connections to whichever worker; one worker busy
    // with a slow request hands its idle connections to the worker with room.
    let s = stack(true, &["--workers", "2"]);
    let port = s.nginx.port();
    // Warm up: several kept-alive connections to both workers.
    let warm: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || http::get(port, "/hello").expect("warm-up").status))
        .collect();
    for t in warm {
        assert_eq!(t.join().expect("warm-up thread"), 200);
    }
    let slow = std::thread::spawn(move || http::get(port, "/sleep?ms=3000").expect("slow"));
    s.app.wait_for_log("uri=\"/sleep?ms=3000\"");
    // The busy worker notices and moves its idle connections.
    s.app
        .wait_for_log("idle connections move to a worker with room");
    for i in 0..30 {
        let t = std::time::Instant::now();
        let r = http::get(port, "/hello").expect("/hello");
        assert_eq!(r.status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "request {i} waited {:?} behind the slow one",
            t.elapsed()
        );
    }
    assert_eq!(slow.join().expect("slow thread").body, b"slept 3000\n");
}
