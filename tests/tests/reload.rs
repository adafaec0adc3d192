//! SIGHUP: a new generation of workers starts, and the old one drains once it is ready, while
//! requests keep flowing through nginx; an invalid configuration changes nothing.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::http;
use e2e::{wait_until, worker_pids, App, Nginx, TempDir};
use nix::sys::signal::Signal;

#[test]
fn hup_replaces_every_worker_without_failing_a_request() {
    let dir = TempDir::new("reload");
    let app = App::start(&dir, &["--pm", "static", "--workers", "2"]);
    let nginx = Nginx::start(&dir, &format!("unix:{}", app.unix_path().display()), true);
    wait_until(Duration::from_secs(10), "2 workers", || worker_pids(app.pid()).len() == 2);

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let port = nginx.port();
    let load: Vec<_> = (0..4)
        .map(|c| {
            let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
            std::thread::spawn(move || {
                // Bounded: the test stops it, and it never sends more than 5000 requests.
                for i in 0..5000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (path, body) = if (c + i) % 5 == 0 {
                        ("/sleep?ms=300", &b"slept 300\n"[..])
                    } else {
                        ("/hello", &b"Hello, world!\n"[..])
                    };
                    let r = http::get(port, path).unwrap_or_else(|e| panic!("{path}: {e}"));
                    assert_eq!((r.status, &r.body[..]), (200, body), "{path} during a reload");
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    for round in 0..3 {
        let old: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();
        app.signal(Signal::SIGHUP);
        wait_until(Duration::from_secs(15), "the old generation to be replaced", || {
            let now: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();
            now.len() == 2 && now.is_disjoint(&old)
        });
        let r = http::get(port, "/pid").expect("/pid");
        let pid: i32 = String::from_utf8_lossy(&r.body).trim().parse().expect("a pid");
        assert!(!old.contains(&pid), "round {round}: answered by the new generation");
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().expect("every request during the reloads succeeded");
    }
    let total = sent.load(Ordering::Relaxed);
    eprintln!("{total} requests through 3 reloads, none failed");
    assert!(total > 50, "the load ran: {total}");
    assert_eq!(app.stderr().matches("reload: new generation ready").count(), 3);
}

#[test]
fn hup_with_an_invalid_config_keeps_serving() {
    let dir = TempDir::new("reload-invalid");
    let conf = dir.path().join("app.toml");
    std::fs::write(&conf, "workers = 2\n").expect("config");
    let app = App::start(&dir, &["--config", conf.to_str().expect("utf-8")]);
    wait_until(Duration::from_secs(10), "2 workers", || worker_pids(app.pid()).len() == 2);
    let before: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();
    std::fs::write(&conf, "workers = 2\nrequest_timeout = \"whenever\"\n").expect("config");
    app.signal(Signal::SIGHUP);
    app.wait_for_log("reload refused");
    let log = app.stderr();
    assert!(log.contains("request_timeout"), "the log names the bad key: {log}");
    let after: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();
    assert_eq!(before, after, "nothing was replaced");
    let r = e2e::fcgi_request(&app.unix(), "GET", "/hello", b"").expect("still serving");
    assert_eq!(r.status(), 200);
}
