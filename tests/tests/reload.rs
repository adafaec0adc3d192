//! SIGHUP: a new generation of workers starts, and the old one drains once it is ready, while
//! requests keep flowing through nginx; an invalid configuration changes nothing.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::http::{self, Body};
use e2e::{fetch_pid, wait_until, worker_pids, App, Nginx, TempDir, Via};
use nix::sys::signal::Signal;

/// Four client threads sending requests until told to stop (bounded: at most 20000 each);
/// each request asserts its own answer, so a failure fails its thread.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(request: impl Fn(usize, usize) + Send + Sync + Clone + 'static) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let threads = (0..4)
            .map(|c| {
                let (stop, sent, request) = (Arc::clone(&stop), Arc::clone(&sent), request.clone());
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        request(c, i);
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

    /// Stops the clients; every request they sent succeeded, or this panics. Returns the count.
    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("every request under load succeeded");
        }
        self.sent.load(Ordering::Relaxed)
    }
}

/// Waits until none of `old` is a worker any more and the pool is back at `size`; then every
/// answer comes from the new generation.
fn wait_for_new_generation(app: &App, old: &BTreeSet<i32>, size: usize, what: &str) {
    wait_until(Duration::from_secs(20), what, || {
        let now: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();
        now.len() == size && now.is_disjoint(old)
    });
}

#[test]
fn ten_reloads_and_five_upgrades_under_load_fail_no_request() {
    let dir = TempDir::new("reload");
    let app = App::start(&dir, &["--pm", "static", "--workers", "3"]);
    let nginx = Nginx::start(&dir, &format!("unix:{}", app.unix_path().display()), true);
    app.wait_for_workers(3);
    let master = app.pid();

    let port = nginx.port();
    let load = Load::start(move |c, i| {
        let (path, body) = if c == 0 && i % 4 == 0 {
            ("/sleep?ms=1500", &b"slept 1500\n"[..])
        } else {
            ("/hello", &b"Hello, world!\n"[..])
        };
        let r = http::get(port, path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            (r.status, &r.body[..]),
            (200, body),
            "{path} during a reload"
        );
    });

    let signals = [Signal::SIGHUP; 10].into_iter().chain([Signal::SIGUSR2; 5]);
    for (round, sig) in signals.enumerate() {
        let old: BTreeSet<i32> = worker_pids(master).into_iter().collect();
        app.signal(sig);
        wait_for_new_generation(
            &app,
            &old,
            3,
            &format!("round {round} ({sig:?}) to replace the workers"),
        );
        for _ in 0..10 {
            let pid = fetch_pid(Via::Nginx(&nginx)).expect("/pid");
            assert!(
                !old.contains(&pid),
                "round {round}: answered by the new generation"
            );
        }
        assert_eq!(app.pid(), master, "the master's pid never changes");
    }
    let total = load.finish();
    eprintln!("{total} requests through 10 reloads and 5 upgrades, none failed");
    let log = app.stderr();
    assert_eq!(
        log.matches("reload: new generation ready").count(),
        15,
        "{log}"
    );
    assert_eq!(log.matches("upgrade: re-executing in place").count(), 5);
}

#[test]
fn upgrade_to_a_binary_whose_setup_fails_keeps_the_old_one_serving() {
    let dir = TempDir::new("upgrade-broken");
    let program = dir.path().join("app");
    std::fs::copy(e2e::bin_path("app-example"), &program).expect("copy the binary");
    let app = App::start_binary(&dir, &program, &["--workers", "2"], &[]);
    app.wait_for_workers(2);
    let before: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();

    // A deploy puts a broken build in place (renamed over the old file, as deploy tools do).
    let broken = dir.path().join("app.new");
    let real = e2e::bin_path("app-example");
    std::fs::write(
        &broken,
        format!(
            "#!/bin/sh\nAPP_EXAMPLE_FAIL_SETUP=broken exec {} \"$@\"\n",
            real.display()
        ),
    )
    .expect("write the broken build");
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::fs::rename(&broken, &program).expect("deploy");

    app.signal(Signal::SIGUSR2);
    app.wait_for_log("upgrade refused");
    let log = app.stderr();
    assert!(
        log.contains("APP_EXAMPLE_FAIL_SETUP"),
        "the check's output is logged: {log}"
    );
    assert!(
        app.wait_exit(Duration::ZERO).is_none(),
        "the master still runs"
    );
    assert_same_workers_serving(&app, &before, "the old generation keeps serving");
}

#[test]
fn hup_with_an_invalid_config_keeps_serving() {
    let dir = TempDir::new("reload-invalid");
    let conf = dir.path().join("app.toml");
    std::fs::write(&conf, "workers = 2\n").expect("config");
    let app = App::start(&dir, &["--config", conf.to_str().expect("utf-8")]);
    app.wait_for_workers(2);
    let before: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();
    std::fs::write(&conf, "workers = 2\nrequest_timeout = \"whenever\"\n").expect("config");
    app.signal(Signal::SIGHUP);
    app.wait_for_log("reload refused");
    let log = app.stderr();
    assert!(
        log.contains("request_timeout"),
        "the log names the bad key: {log}"
    );
    assert_same_workers_serving(&app, &before, "nothing was replaced");
}

/// The workers are those of `before`, and they still answer.
fn assert_same_workers_serving(app: &App, before: &BTreeSet<i32>, why: &str) {
    let after: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();
    assert_eq!(before, &after, "{why}");
    let r = e2e::fcgi_request(&app.unix(), "GET", "/hello", b"").expect("still serving");
    assert_eq!(r.status(), 200);
}

#[test]
fn posts_on_kept_alive_connections_survive_reloads_and_upgrades() {
    // nginx does not retry a POST it has sent: a draining worker that closed an idle kept-alive
    // connection while nginx wrote into it would cost a 502. Draining workers hand such
    // connections over instead.
    let dir = TempDir::new("reload-posts");
    let app = App::start(&dir, &["--pm", "static", "--workers", "3"]);
    let nginx = Nginx::start(&dir, &format!("unix:{}", app.unix_path().display()), true);
    app.wait_for_workers(3);
    let port = nginx.port();
    let load = Load::start(move |c, i| {
        let body = format!("client {c} request {i}");
        let r = http::request(port, "POST", "/echo", &[], Body::Bytes(body.as_bytes()))
            .unwrap_or_else(|e| panic!("POST /echo: {e}"));
        assert_eq!(
            (r.status, r.body),
            (200, body.into_bytes()),
            "POST during a reload"
        );
    });
    let signals = [Signal::SIGHUP; 7].into_iter().chain([Signal::SIGUSR2; 3]);
    for (round, sig) in signals.enumerate() {
        let old: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();
        app.signal(sig);
        wait_for_new_generation(&app, &old, 3, &format!("round {round} ({sig:?})"));
    }
    let total = load.finish();
    eprintln!("{total} POSTs through 7 reloads and 3 upgrades, none failed");
    assert!(total > 100, "the load ran: {total}");
}
