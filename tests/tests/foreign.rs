//! Foreign FastCGI programs supervised by `fcgi-pool`, each the real program from Debian's
//! packages (`scripts/install-deps --tests`) behind real nginx with `fastcgi_keep_conn` on and
//! off: php-cgi, a libfcgi C program built here, a Perl `FCGI` script, fcgiwrap running a shell
//! CGI script, and programs that cannot start.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::http::{self, Body};
use e2e::{
    assert_throughout, bin_path, fcgi_request, opt_in_if_root, sched_policy, wait_until,
    worker_pids, App, Nginx, TempDir,
};
use fcgi::Params;
use nix::sys::signal::Signal;

const PHP_CGI: &str = "/usr/bin/php-cgi8.2";
const FCGIWRAP: &str = "/usr/sbin/fcgiwrap";

/// The test's PHP application: one script, routes by PATH_INFO (`/app.php/pid`).
const APP_PHP: &str = r#"<?php
switch ($_SERVER['PATH_INFO'] ?? '') {
case '/pid':
    header('Content-Type: text/plain');
    echo getmypid(), "\n";
    break;
case '/echo':
    header('Content-Type: application/octet-stream');
    echo file_get_contents('php://input');
    break;
case '/sleep':
    usleep((int)($_GET['ms'] ?? 0) * 1000);
    header('Content-Type: text/plain');
    echo "slept\n";
    break;
case '/die':
    // The process dies in the middle of the request, before any output is sent; the line
    // says it ran (a request that ran must not be sent again).
    file_put_contents(__DIR__ . '/died.log', "ran\n", FILE_APPEND);
    posix_kill(getmypid(), 9);
    break;
default:
    http_response_code(404);
    echo "no such route\n";
}
"#;

fn require(path: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: run scripts/install-deps --tests"
    );
}

/// `fcgi-pool` with `args`, running `program`; its sockets' directory inside `dir`.
fn pool(dir: &TempDir, args: &[&str], program: &[&str], env: &[(&str, &str)]) -> App {
    let mut all: Vec<&str> = args.to_vec();
    all.push("--");
    all.extend(program);
    let tmp = dir.path().display().to_string();
    let mut env = env.to_vec();
    env.push(("TMPDIR", &tmp));
    App::start_binary(dir, &bin_path("fcgi-pool"), &all, &env)
}

/// A document root with the PHP application in it.
fn php_root(dir: &TempDir) -> PathBuf {
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).expect("root");
    std::fs::write(root.join("app.php"), APP_PHP).expect("app.php");
    root
}

/// nginx in front of `app` with keep_conn on and off, serving `root`.
fn both_nginx(dir: &TempDir, app: &App, root: &Path) -> [(bool, Nginx); 2] {
    let upstream = format!("unix:{}", app.unix_path().display());
    [true, false].map(|keep| (keep, Nginx::start_with_root(dir, &upstream, keep, root)))
}

fn get(nginx: &Nginx, path: &str) -> http::Response {
    http::get(nginx.port(), path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The pid a `/pid` route answered.
fn pid_of(r: &http::Response, what: &str) -> i32 {
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 200, "{what}: {text}");
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{what}: not a pid: {text:?}"))
}

/// The parent pid and command name of `pid`, from /proc.
fn parent_and_name(pid: i32) -> (i32, String) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process runs");
    let name = stat
        .split_once('(')
        .and_then(|(_, r)| r.rsplit_once(')'))
        .map(|(n, _)| n.to_string())
        .unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let ppid = rest
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    (ppid, name)
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or_default()
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// 1 MiB of bytes that are not a repeating pattern, so a misplaced chunk shows.
fn mib_body() -> Vec<u8> {
    let mut x: u32 = 0x2545_f491;
    (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn php_cgi_answers_its_pid_echoes_a_mib_and_sleeps_with_keep_conn_on_and_off() {
    require(PHP_CGI);
    let dir = TempDir::new("foreign-php");
    let root = php_root(&dir);
    let app = pool(&dir, &["--workers", "2"], &[PHP_CGI], &[]);
    app.wait_for_workers(2);
    let body = mib_body();
    for (keep, nginx) in both_nginx(&dir, &app, &root) {
        let pid = pid_of(&get(&nginx, "/app.php/pid"), "pid");
        let (parent, name) = parent_and_name(pid);
        assert!(name.starts_with("php-cgi"), "keep_conn {keep}: {name}");
        assert!(
            worker_pids(app.pid()).contains(&parent),
            "keep_conn {keep}: php-cgi {pid} is a worker's child, not {parent}'s"
        );

        let r = http::request(
            nginx.port(),
            "POST",
            "/app.php/echo",
            &[("Content-Type", "application/octet-stream")],
            Body::Bytes(&body),
        )
        .expect("POST");
        assert_eq!(r.status, 200, "keep_conn {keep}");
        assert_eq!(r.body.len(), body.len(), "keep_conn {keep}");
        assert!(
            r.body == body,
            "keep_conn {keep}: the body came back byte for byte"
        );

        let t = Instant::now();
        let r = get(&nginx, "/app.php/sleep?ms=300");
        assert_eq!((r.status, &r.body[..]), (200, &b"slept\n"[..]));
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );

        let r = get(&nginx, "/app.php/nothing");
        assert_eq!(r.status, 404, "the program's Status header is kept");
        assert_eq!(r.header("content-type"), Some("text/html; charset=UTF-8"));
    }
    // The sockets live in a private directory inside TMPDIR.
    let dirs: Vec<_> = std::fs::read_dir(dir.path())
        .expect("listed")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("fcgi-pool."))
        .collect();
    assert_eq!(dirs.len(), 1, "one socket directory");
    use std::os::unix::fs::PermissionsExt;
    let mode = dirs[0].metadata().expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    app.signal(Signal::SIGTERM);
    assert_eq!(
        app.wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert!(
        !dirs[0].path().exists(),
        "the master removed the socket directory"
    );
}

#[test]
fn cpu_scheduling_batch_reaches_the_program_the_worker_starts() {
    require(PHP_CGI);
    let dir = TempDir::new("foreign-sched");
    let app = pool(
        &dir,
        &["--workers", "1", "--cpu-scheduling", "batch"],
        &[PHP_CGI],
        &[],
    );
    app.wait_for_workers(1);
    let worker = worker_pids(app.pid())[0];
    // The worker counts from its fork; its php-cgi starts right after.
    wait_until(Duration::from_secs(30), "the worker's php-cgi", || {
        worker_pids(worker).len() == 1
    });
    let programs = worker_pids(worker);
    assert_eq!(sched_policy(worker), 3, "the worker is SCHED_BATCH");
    assert_eq!(sched_policy(programs[0]), 3, "and so is its program");
}

#[test]
fn php_cgi_dying_mid_request_costs_that_request_a_502_and_is_replaced() {
    require(PHP_CGI);
    let dir = TempDir::new("foreign-php-die");
    let root = php_root(&dir);
    let app = pool(&dir, &["--workers", "1"], &[PHP_CGI], &[]);
    app.wait_for_workers(1);
    let workers = worker_pids(app.pid());
    for (keep, nginx) in both_nginx(&dir, &app, &root) {
        let before = pid_of(&get(&nginx, "/app.php/pid"), "before");
        let r = get(&nginx, "/app.php/die");
        assert_eq!(
            r.status,
            502,
            "keep_conn {keep}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        let after = pid_of(&get(&nginx, "/app.php/pid"), "after");
        assert_ne!(before, after, "keep_conn {keep}: a new php-cgi");
    }
    let died_log = root.join("died.log");
    let runs = || std::fs::read_to_string(&died_log).map_or(0, |l| l.lines().count());
    assert_eq!(
        runs(),
        2,
        "each /die ran once, never sent to the replacement"
    );
    assert_eq!(
        worker_pids(app.pid()),
        workers,
        "the worker itself survived"
    );
    assert!(app
        .stderr()
        .contains("program gave no answer; answered 502"));

    // The connection from the web server survives: the same kept-alive FastCGI connection
    // gets the 502 and then the next answer.
    let params = |path: &str| {
        Params::from_pairs([
            ("REQUEST_METHOD", "GET".to_string()),
            (
                "SCRIPT_FILENAME",
                root.join("app.php").display().to_string(),
            ),
            ("SCRIPT_NAME", "/app.php".to_string()),
            ("PATH_INFO", path.to_string()),
            ("REQUEST_URI", format!("/app.php{path}")),
            ("SERVER_PROTOCOL", "HTTP/1.1".to_string()),
            ("REDIRECT_STATUS", "200".to_string()),
        ])
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = fcgi::io::Client::connect_unix(app.unix_path())
            .await
            .expect("connect");
        let died = c
            .request_with(fcgi::Role::Responder, true, &params("/die"), b"", None)
            .await
            .expect("an answer, not a closed connection");
        assert_eq!(died.status(), 502);
        assert_eq!(runs(), 3, "the /die on a kept connection ran once");
        let next = c
            .request_with(fcgi::Role::Responder, true, &params("/pid"), b"", None)
            .await
            .expect("the same connection serves the next request");
        assert_eq!(next.status(), 200);
    });
}

#[test]
fn php_cgi_exiting_after_php_fcgi_max_requests_never_fails_a_request() {
    require(PHP_CGI);
    let dir = TempDir::new("foreign-php-max");
    let root = php_root(&dir);
    let app = pool(
        &dir,
        &["--workers", "1"],
        &[PHP_CGI],
        &[("PHP_FCGI_MAX_REQUESTS", "3")],
    );
    app.wait_for_workers(1);
    let workers = worker_pids(app.pid());
    let nginx = both_nginx(&dir, &app, &root);
    let mut pids = BTreeSet::new();
    // Back to back: each fourth request reaches a php-cgi that is exiting or just exited.
    for i in 0..24 {
        let (keep, nginx) = &nginx[i % 2];
        pids.insert(pid_of(
            &get(nginx, "/app.php/pid"),
            &format!("request {i}, keep_conn {keep}"),
        ));
    }
    assert_eq!(pids.len(), 8, "3 requests per php-cgi: {pids:?}");
    let log = app.stderr();
    let replaced = log.matches("program exited between requests").count()
        + log.matches("program exited as the request arrived").count();
    assert_eq!(replaced, 7, "each exit is logged once: {log}");
    assert_eq!(worker_pids(app.pid()), workers, "the worker itself stays");
}

#[test]
fn php_cgi_in_an_ondemand_pool_starts_for_a_request_is_recycled_and_is_reaped_when_idle() {
    require(PHP_CGI);
    let dir = TempDir::new("foreign-php-ondemand");
    let root = php_root(&dir);
    let app = pool(
        &dir,
        &[
            "--pm",
            "ondemand",
            "--workers",
            "2",
            "--idle-timeout",
            "1s",
            "--max-requests",
            "4",
            "--max-requests-jitter",
            "0",
        ],
        &[PHP_CGI],
        &[],
    );
    app.wait_for_log("master started");
    assert_throughout(
        Duration::from_millis(1200),
        "ondemand starts with no worker and no php-cgi",
        || worker_pids(app.pid()).is_empty(),
    );
    let nginx = both_nginx(&dir, &app, &root);
    // php-cgi pid -> requests it answered.
    let mut answered: std::collections::BTreeMap<i32, usize> = Default::default();
    for i in 0..12 {
        let (keep, nginx) = &nginx[i % 2];
        let php = pid_of(
            &get(nginx, "/app.php/pid"),
            &format!("request {i}, keep_conn {keep}"),
        );
        let requests = answered.entry(php).or_default();
        if *requests == 0 {
            // Its first answer: the worker has more to serve, so both still run.
            let worker = parent_and_name(php).0;
            let (master, name) = parent_and_name(worker);
            assert!(
                master == app.pid() && name == "fcgi-pool",
                "php-cgi {php} runs under a worker of the pool, not {worker} ({name}, child of {master})"
            );
        }
        *requests += 1;
    }
    for (php, requests) in &answered {
        assert!(
            *requests <= 4,
            "php-cgi {php} answered {requests} requests: its worker recycles after 4"
        );
    }
    assert!(
        answered.len() >= 3,
        "12 requests at 4 per worker went to 3 or more: {answered:?}"
    );
    // Idle past idle_timeout: the workers stop, and their php-cgi with them.
    app.wait_for_workers_within(0, Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "every php-cgi to be gone", || {
        answered
            .keys()
            .all(|php| !Path::new(&format!("/proc/{php}")).exists())
    });
}

/// Client threads sending requests through nginx until told to stop (bounded: at most 5000
/// each); each asserts its answer, so a failure fails its thread.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(ports: &[u16]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let threads = (0..4)
            .map(|c| {
                let (stop, sent, port) =
                    (Arc::clone(&stop), Arc::clone(&sent), ports[c % ports.len()]);
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let path = if i % 5 == 0 {
                            "/app.php/sleep?ms=50"
                        } else {
                            "/app.php/pid"
                        };
                        let r = http::get(port, path).unwrap_or_else(|e| panic!("{path}: {e}"));
                        assert_eq!(
                            r.status,
                            200,
                            "{path}: {}",
                            String::from_utf8_lossy(&r.body)
                        );
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            threads,
        }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("every request under load succeeded");
        }
        self.sent.load(Ordering::Relaxed)
    }
}

#[test]
fn php_cgi_reloads_and_upgrades_under_load_without_a_failed_request_and_the_status_page_shows_it_busy(
) {
    require(PHP_CGI);
    let dir = TempDir::new("foreign-php-reload");
    let root = php_root(&dir);
    let app = pool(
        &dir,
        &["--workers", "2", "--status-path", "/status"],
        &[PHP_CGI],
        &[],
    );
    app.wait_for_workers(2);
    let nginx = both_nginx(&dir, &app, &root);

    // Both workers busy in php-cgi: the status page names them and their URIs.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let port = nginx[0].1.port();
            std::thread::spawn(move || http::get(port, "/app.php/sleep?ms=2500"))
        })
        .collect();
    wait_until(
        Duration::from_secs(10),
        "2 processes busy in /app.php/sleep",
        || {
            let r = fcgi_request(&app.unix(), "GET", "/status?json&full", b"").expect("status");
            let json: serde_json::Value = serde_json::from_slice(r.body()).expect("JSON");
            let busy = json["processes"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| {
                            p["state"] == "Running"
                                && p["request URI"]
                                    .as_str()
                                    .is_some_and(|u| u.starts_with("/app.php/sleep"))
                        })
                        .count()
                })
                .unwrap_or(0);
            json["active processes"] == 2 && busy == 2
        },
    );
    for t in slow {
        let r = t.join().expect("client").expect("answered");
        assert_eq!(r.status, 200);
    }

    let ports: Vec<u16> = nginx.iter().map(|(_, n)| n.port()).collect();
    let load = Load::start(&ports);
    // A binary upgrade re-executes the command line, program and all: the new binary's check
    // must see its own flags, not hand them to the program after `--`.
    let signals = [
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGHUP,
        Signal::SIGUSR2,
    ];
    for (round, signal) in signals.into_iter().enumerate() {
        let old: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();
        app.signal(signal);
        wait_until(
            Duration::from_secs(30),
            &format!("{signal} {round}"),
            || {
                let now: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();
                now.len() == 2 && now.is_disjoint(&old)
            },
        );
    }
    let sent = load.finish();
    eprintln!("{sent} requests to php-cgi through 2 reloads and 2 upgrades, none failed");
    assert!(sent > 0);
    let log = app.stderr();
    assert_eq!(
        log.matches("upgrade: re-executing in place").count(),
        2,
        "both upgrades ran:\n{log}"
    );
}

/// A libfcgi responder: its pid, the URI, and how many body bytes it read.
const C_PROGRAM: &str = r#"
#include <fcgiapp.h>
#include <stdio.h>
#include <unistd.h>

int main(void) {
    FCGX_Request req;
    FCGX_Init();
    FCGX_InitRequest(&req, 0, 0);
    while (FCGX_Accept_r(&req) >= 0) {
        char buf[4096];
        long total = 0;
        int n;
        while ((n = FCGX_GetStr(buf, sizeof buf, req.in)) > 0) total += n;
        const char *uri = FCGX_GetParam("REQUEST_URI", req.envp);
        FCGX_FPrintF(req.out, "Content-Type: text/plain\r\n\r\nc pid=%d uri=%s body=%ld\n",
                     (int)getpid(), uri ? uri : "", total);
        FCGX_Finish_r(&req);
    }
    return 0;
}
"#;

#[test]
fn a_libfcgi_c_program_built_here_serves_gets_and_large_posts() {
    require("/usr/include/fcgiapp.h");
    let dir = TempDir::new("foreign-c");
    let src = dir.path().join("responder.c");
    let exe = dir.path().join("responder");
    std::fs::write(&src, C_PROGRAM).expect("source");
    let out = Command::new("gcc")
        .arg("-O2")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .arg("-lfcgi")
        .output()
        .expect("run gcc");
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = exe.display().to_string();
    let app = pool(&dir, &["--workers", "2"], &[&exe], &[]);
    app.wait_for_workers(2);
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).expect("root");
    let body = vec![b'x'; 300 * 1024];
    for (keep, nginx) in both_nginx(&dir, &app, &root) {
        let r = get(&nginx, "/c/path?q=1");
        let text = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!(r.status, 200, "keep_conn {keep}: {text}");
        assert!(
            text.starts_with("c pid=") && text.contains("uri=/c/path?q=1 body=0"),
            "{text}"
        );
        // Larger than what is sent in one write: the body streams to the program.
        let r =
            http::request(nginx.port(), "POST", "/c/post", &[], Body::Bytes(&body)).expect("POST");
        let text = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!(r.status, 200, "keep_conn {keep}: {text}");
        assert!(
            text.contains(&format!("body={}", body.len())),
            "keep_conn {keep}: {text}"
        );
    }
}

/// A Perl FCGI responder (libfcgi-perl), reading fd 0 as FCGI programs do.
const PERL_SCRIPT: &str = r#"#!/usr/bin/perl
use strict;
use warnings;
use FCGI;
my $req = FCGI::Request();
while ($req->Accept() >= 0) {
    print "Content-Type: text/plain\r\n\r\nperl pid=$$ uri=$ENV{REQUEST_URI}\n";
}
"#;

#[test]
fn php_fcgi_children_is_not_passed_on_so_each_worker_runs_one_php_cgi() {
    require(PHP_CGI);
    let dir = TempDir::new("foreign-php-children");
    let root = php_root(&dir);
    let app = pool(
        &dir,
        &["--workers", "1"],
        &[PHP_CGI],
        &[("PHP_FCGI_CHILDREN", "3")],
    );
    app.wait_for_workers(1);
    let [(_, nginx), _] = both_nginx(&dir, &app, &root);
    let php = pid_of(&get(&nginx, "/app.php/pid"), "php-cgi");
    let worker = parent_and_name(php).0;
    assert!(
        worker_pids(app.pid()).contains(&worker),
        "the php-cgi answering is the worker's own child"
    );
    assert_eq!(
        worker_pids(php),
        Vec::<i32>::new(),
        "php-cgi forked no children of its own"
    );
    let log = app.stderr();
    assert!(
        log.contains("PHP_FCGI_CHILDREN is not passed to the program"),
        "{log}"
    );
}

/// A Perl FCGI responder that forks a long sleep at start and answers with its pid.
const FORKING_PERL: &str = r#"use strict;
use warnings;
use FCGI;
my $sleeper = fork() // die "fork: $!";
if ($sleeper == 0) { exec("sleep", "1000") or exit 1; }
my $req = FCGI::Request();
while ($req->Accept() >= 0) {
    print "Content-Type: text/plain\r\n\r\n$sleeper\n";
}
"#;

#[test]
fn what_a_program_forks_stops_with_it() {
    require("/usr/bin/perl");
    let dir = TempDir::new("foreign-forks");
    let script = dir.path().join("forking.pl");
    std::fs::write(&script, FORKING_PERL).expect("script");
    let script = script.display().to_string();
    let app = pool(&dir, &["--workers", "1"], &["/usr/bin/perl", &script], &[]);
    app.wait_for_workers(1);
    let r = fcgi_request(&app.unix(), "GET", "/", b"").expect("answered");
    let sleeper: i32 = String::from_utf8_lossy(r.body())
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("a pid: {:?}", r.body()));
    assert!(!gone(sleeper), "the program's child runs");
    app.signal(Signal::SIGTERM);
    app.wait_exit(Duration::from_secs(10))
        .expect("the pool stops");
    wait_until(
        Duration::from_secs(10),
        "the program's child to stop",
        || gone(sleeper),
    );
}

#[test]
fn a_perl_fcgi_script_serves_through_nginx() {
    require("/usr/bin/perl");
    let dir = TempDir::new("foreign-perl");
    let script = dir.path().join("responder.pl");
    std::fs::write(&script, PERL_SCRIPT).expect("script");
    let script = script.display().to_string();
    let app = pool(&dir, &["--workers", "2"], &["/usr/bin/perl", &script], &[]);
    app.wait_for_workers(2);
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).expect("root");
    for (keep, nginx) in both_nginx(&dir, &app, &root) {
        for i in 0..5 {
            let r = get(&nginx, &format!("/perl/{i}"));
            let text = String::from_utf8_lossy(&r.body).to_string();
            assert_eq!(r.status, 200, "keep_conn {keep}: {text}");
            assert!(
                text.starts_with("perl pid=") && text.contains(&format!("uri=/perl/{i}")),
                "{text}"
            );
        }
    }
}

#[test]
fn fcgiwrap_runs_a_shell_cgi_script() {
    require(FCGIWRAP);
    let dir = TempDir::new("foreign-cgi");
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).expect("root");
    let script = root.join("hello.cgi");
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\necho \"cgi path_info=$PATH_INFO query=$QUERY_STRING\"\n",
    )
    .expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let app = pool(&dir, &["--workers", "2"], &[FCGIWRAP], &[]);
    app.wait_for_workers(2);
    for (keep, nginx) in both_nginx(&dir, &app, &root) {
        let r = get(&nginx, "/hello.cgi/more?x=1");
        let text = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!(r.status, 200, "keep_conn {keep}: {text}");
        assert_eq!(text, "cgi path_info=/more query=x=1\n", "keep_conn {keep}");
    }
}

#[test]
fn check_config_names_a_missing_or_unexecutable_program() {
    let dir = TempDir::new("foreign-check");
    let plain = dir.path().join("not-executable.sh");
    std::fs::write(&plain, "#!/bin/sh\n").expect("file");
    let sock = format!("unix:{}", dir.path().join("s.sock").display());
    let check = |program: &str| {
        let mut cmd = Command::new(bin_path("fcgi-pool"));
        opt_in_if_root(&mut cmd);
        let out = cmd
            .args(["--listen", &sock, "--check-config", "--", program])
            .output()
            .expect("run fcgi-pool");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = check("/nonexistent/php-cgi");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/nonexistent/php-cgi does not exist"), "{err}");
    let (code, err) = check(&plain.display().to_string());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not-executable.sh is not executable"), "{err}");
    let (code, err) = check("/bin/sh");
    assert_eq!(code, Some(0), "{err}");
    // Without a program there is nothing to run.
    let mut cmd = Command::new(bin_path("fcgi-pool"));
    opt_in_if_root(&mut cmd);
    let out = cmd
        .args(["--listen", &sock, "--check-config"])
        .output()
        .expect("run fcgi-pool");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no program to run"), "{err}");
}

#[test]
fn a_program_that_exits_at_start_is_reported_and_backed_off() {
    let dir = TempDir::new("foreign-fails");
    let app = pool(
        &dir,
        &["--workers", "2"],
        &["/bin/sh", "-c", "echo broken on purpose >&2; exit 3"],
        &[],
    );
    app.wait_for_log("exited at start (exit status: 3) before");
    app.wait_for_log("crash-loop backoff");
    let deaths = || app.stderr().matches("exited at start").count();
    wait_until(Duration::from_secs(15), "workers to keep failing", || {
        deaths() >= 3
    });
    // Without backoff two workers failing at once would respawn hundreds of times in 3 s.
    assert_throughout(
        Duration::from_secs(3),
        "respawns bounded by the backoff (under 30)",
        || deaths() < 30,
    );
    assert!(
        app.stderr().contains("broken on purpose"),
        "the program's own stderr is logged"
    );
}

#[test]
fn a_request_timeout_names_the_uri_and_replaces_the_php_cgi_stuck_in_it() {
    require(PHP_CGI);
    let dir = TempDir::new("foreign-php-timeout");
    let root = php_root(&dir);
    let app = pool(
        &dir,
        &[
            "--workers",
            "1",
            "--request-timeout",
            "1s",
            "--request-timeout-grace",
            "500ms",
        ],
        &[PHP_CGI],
        &[],
    );
    app.wait_for_workers(1);
    let [(_, nginx), _] = both_nginx(&dir, &app, &root);
    let php = pid_of(&get(&nginx, "/app.php/pid"), "before");
    let workers = worker_pids(app.pid());
    let t = Instant::now();
    let r = get(&nginx, "/app.php/sleep?ms=20000");
    assert!(r.status >= 500, "the hung request fails: {}", r.status);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "ended by the timeout, not the sleep"
    );
    app.wait_for_log("killing the program running it");
    let log = app.stderr();
    for what in ["request timeout", "killing the program running it"] {
        let line = log
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("a line saying {what:?} in\n{log}"));
        assert!(line.contains("/app.php/sleep?ms=20000"), "{line}");
    }
    wait_until(
        Duration::from_secs(10),
        "the old php-cgi to be gone",
        || gone(php),
    );
    let after = pid_of(&get(&nginx, "/app.php/pid"), "after");
    assert_ne!(after, php, "a new php-cgi answers");
    // The worker's loop answered the timeout itself: the master, which waits a margin past
    // it, had no worker to end.
    assert_eq!(
        worker_pids(app.pid()),
        workers,
        "the same worker serves on:\n{}",
        app.stderr()
    );
    assert!(
        !app.stderr().contains("request timeout: ending worker"),
        "{}",
        app.stderr()
    );
}
