//! Issue 14, first half: workers drop to `user`/`group` and stay there across a reload and an
//! upgrade, root workers need the opt-in, a worker that cannot switch fails its start, the
//! workers' environment and limits are what the configuration says, and the status command
//! prints a running pool's page.
//!
//! The account tests need root (the tests run as root here); as anyone else they say so and
//! pass without checking, since no other user can switch accounts.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use e2e::{
    bin_path, fetch_pid, free_port, openmetrics, sched_policy, wait_until, worker_pids, App,
    TempDir, Via, WORKERS_DEADLINE,
};
use nix::sys::signal::Signal;

/// A reload or an upgrade on a loaded two-core machine: a check-config run, a fork per
/// worker and their drain; seconds at most, with room to spare.
const GENERATION_DEADLINE: Duration = Duration::from_secs(30);

fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("not root: switching accounts cannot be tested; skipped");
    }
    root
}

/// The four ids of a `Uid:` or `Gid:` line of /proc/PID/status (real, effective, saved, fs),
/// or the list of a `Groups:` line.
fn proc_ids(pid: i32, field: &str) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))?;
    line.split_whitespace().map(|n| n.parse().ok()).collect()
}

/// An account as /proc shows a process of it.
#[derive(Debug, PartialEq, Eq)]
struct Account {
    uids: Vec<u32>,
    gids: Vec<u32>,
    groups: BTreeSet<u32>,
}

fn account_of(pid: i32) -> Option<Account> {
    Some(Account {
        uids: proc_ids(pid, "Uid")?,
        gids: proc_ids(pid, "Gid")?,
        groups: proc_ids(pid, "Groups")?.into_iter().collect(),
    })
}

/// What a process switched to `user` shows: every uid and gid that user's, and the groups
/// the group database gives it.
fn account_for(user: &str) -> Account {
    let entry = nix::unistd::User::from_name(user)
        .expect("the passwd database")
        .unwrap_or_else(|| panic!("a user named {user}"));
    let name = std::ffi::CString::new(user).expect("a name");
    let groups = nix::unistd::getgrouplist(&name, entry.gid)
        .expect("getgrouplist")
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    Account {
        uids: vec![entry.uid.as_raw(); 4],
        gids: vec![entry.gid.as_raw(); 4],
        groups,
    }
}

/// Waits until the pool has `n` workers and every one of them shows `want`; panics with what
/// each worker showed last.
fn wait_for_workers_as(app: &App, n: usize, want: &Account) -> Vec<i32> {
    let deadline = std::time::Instant::now() + WORKERS_DEADLINE;
    loop {
        let pids = worker_pids(app.pid());
        let seen: Vec<_> = pids.iter().map(|&p| (p, account_of(p))).collect();
        let all = seen.iter().all(|(_, a)| a.as_ref() == Some(want));
        if pids.len() == n && all {
            return pids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} workers as {want:?} within {WORKERS_DEADLINE:?}; saw {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The master is root, every worker `nobody`, the socket file `nobody`'s, and a worker
/// answers.
fn assert_dropped(app: &App, nobody: &Account) -> BTreeSet<i32> {
    let pids = wait_for_workers_as(app, 2, nobody);
    let master = account_of(app.pid()).expect("the master's status");
    assert_eq!(master.uids, vec![0; 4], "the master keeps root: {master:?}");
    assert_eq!(master.gids, vec![0; 4], "{master:?}");
    let socket = std::fs::metadata(app.unix_path()).expect("the socket file");
    assert_eq!(
        (socket.uid(), socket.gid()),
        (nobody.uids[0], nobody.gids[0]),
        "the socket file belongs to the workers' account"
    );
    let pid = fetch_pid(Via::Fcgi(&app.unix())).expect("a worker answers");
    assert!(pids.contains(&pid), "{pid} is one of {pids:?}");
    pids.into_iter().collect()
}

fn wait_for_new_generation(app: &App, old: &BTreeSet<i32>, what: &str) {
    wait_until(GENERATION_DEADLINE, what, || {
        let now: BTreeSet<i32> = worker_pids(app.pid()).into_iter().collect();
        now.len() == 2 && now.is_disjoint(old)
    });
}

#[test]
fn workers_run_as_nobody_through_a_reload_and_an_upgrade() {
    if !is_root() {
        return;
    }
    let nobody = account_for("nobody");
    let dir = TempDir::new("as-nobody");
    let conf = dir.path().join("app.toml");
    std::fs::write(&conf, "user = \"nobody\"\nworkers = 2\n").expect("config");
    let app = App::start(&dir, &["--config", conf.to_str().expect("utf-8")]);
    let first = assert_dropped(&app, &nobody);

    app.signal(Signal::SIGHUP);
    wait_for_new_generation(&app, &first, "the reloaded generation");
    let reloaded = assert_dropped(&app, &nobody);

    app.signal(Signal::SIGUSR2);
    app.wait_for_log("upgrade: re-executing in place");
    wait_for_new_generation(&app, &reloaded, "the upgraded generation");
    assert_dropped(&app, &nobody);
}

#[test]
fn root_workers_are_refused_unless_opted_in() {
    if !is_root() {
        return;
    }
    let dir = TempDir::new("root-refused");
    let sock = dir.path().join("app.sock");
    let listen = format!("unix:{}", sock.display());
    let cases: &[&[&str]] = &[
        &["--listen", &listen],
        &["--listen", &listen, "--user", "root"],
        &["--listen", &listen, "--user", "0", "--group", "0"],
        &["--listen", &listen, "--check-config"],
    ];
    for args in cases {
        let out = Command::new(bin_path("app-example"))
            .args(*args)
            .output()
            .expect("run app-example");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("workers would run as root")
                && err.contains("allow_root = true")
                && err.contains("--allow-root")
                && err.contains("--user nobody"),
            "{args:?} says how to opt in: {err}"
        );
        assert!(!sock.exists(), "{args:?}: refused before binding");
    }
    let out = Command::new(bin_path("app-example"))
        .args(["--listen", &listen, "--check-config", "--allow-root"])
        .output()
        .expect("run app-example");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_worker_that_cannot_switch_fails_its_start_and_the_master_backs_off() {
    if !is_root() {
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("no setpriv: skipped");
        return;
    }
    // A root master without CAP_SETUID: it may bind and fork, but its workers cannot become
    // nobody, which is what a confined (or misconfigured) container does.
    let dir = TempDir::new("cannot-switch");
    let sock = dir.path().join("app.sock");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set", "-setuid", "--"])
        .arg(bin_path("app-example"))
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .args(["--workers", "1", "--user", "nobody"]);
    let app = App::start_command(&dir, cmd, sock);
    app.wait_for_log("crash-loop backoff");
    let log = app.stderr();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("worker failed"))
        .collect();
    assert!(failures.len() >= 2, "{log}");
    let nobody = account_for("nobody");
    let why = format!(
        "cannot switch to user nobody (uid {}, gid {}): setresuid: EPERM",
        nobody.uids[0], nobody.gids[0]
    );
    for line in &failures {
        assert!(
            line.contains("pid=") && line.contains(&why),
            "one line with the pid, the user and the errno: {line}"
        );
    }
}

/// The worker's own environment, from `/env?process`.
fn worker_env(app: &App) -> serde_json::Map<String, serde_json::Value> {
    let r = e2e::fcgi_request(&app.unix(), "GET", "/env?process", b"").expect("/env?process");
    assert_eq!(r.status(), 200);
    match serde_json::from_slice(r.body()).expect("a JSON object") {
        serde_json::Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// A line of /proc/PID/limits: its soft and hard columns.
fn proc_limit(pid: i32, name: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("a {name} line in {limits}"));
    let mut cols = line.split_whitespace();
    let soft = cols.next().expect("soft").to_string();
    let hard = cols.next().expect("hard").to_string();
    (soft, hard)
}

#[test]
fn clear_env_env_rlimits_and_cpu_scheduling_make_the_workers_process() {
    let dir = TempDir::new("env-limits");
    let conf = dir.path().join("app.toml");
    std::fs::write(
        &conf,
        "workers = 1\nclear_env = true\nrlimit_files = 4096\nrlimit_core = \"unlimited\"\n\
         cpu_scheduling = \"batch\"\n\
         [env]\nGREETING_TEST = \"x$HOME\"\nPRICE = \"$${HOME}\"\n",
    )
    .expect("config");
    let master_env = [
        ("HARDENING_SECRET", "from the master"),
        ("HOME", "/home/e2e-test"),
    ];
    let app = App::start_with_env(
        &dir,
        &["--config", conf.to_str().expect("utf-8")],
        &master_env,
    );
    app.wait_for_workers(1);
    let env = worker_env(&app);
    let names: Vec<&str> = env.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["GREETING_TEST", "PRICE"],
        "exactly `env`, nothing of the master's: {env:?}"
    );
    assert_eq!(env["GREETING_TEST"], "x/home/e2e-test");
    assert_eq!(env["PRICE"], "${HOME}");
    let worker = worker_pids(app.pid())[0];
    assert_eq!(
        proc_limit(worker, "Max open files"),
        ("4096".into(), "4096".into())
    );
    assert_eq!(
        proc_limit(worker, "Max core file size"),
        ("unlimited".into(), "unlimited".into())
    );
    let master = proc_limit(app.pid(), "Max open files");
    assert_ne!(master.0, "4096", "the master keeps its own limit");
    assert_eq!(sched_policy(worker), 3, "the worker is SCHED_BATCH");
    assert_eq!(sched_policy(app.pid()), 0, "the master stays SCHED_OTHER");
    drop(app);

    // Without clear_env the master's environment stays, and `env` is laid over it.
    let dir = TempDir::new("env-kept");
    let app = App::start_with_env(
        &dir,
        &["--workers", "1", "--env", "GREETING_TEST=y${HOME}"],
        &master_env,
    );
    app.wait_for_workers(1);
    let env = worker_env(&app);
    assert_eq!(env["GREETING_TEST"], "y/home/e2e-test");
    assert_eq!(env["HARDENING_SECRET"], "from the master");
}

#[test]
fn a_missing_variable_in_env_is_a_configuration_error_naming_it() {
    let dir = TempDir::new("env-missing");
    let (code, err) = App::run_to_exit(
        &dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--check-config",
            "--env",
            "A=$HARDENING_NOT_SET_ANYWHERE",
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("\"env\"") && err.contains("HARDENING_NOT_SET_ANYWHERE to be set"),
        "{err}"
    );
}

#[test]
fn the_status_command_prints_a_running_pool_s_page() {
    let dir = TempDir::new("status-command");
    let app = App::start(&dir, &["--workers", "2", "--status-path", "/fpm-status"]);
    app.wait_for_workers(2);
    let unix = format!("unix:{}", app.unix_path().display());
    let run = |args: &[&str]| App::run_to_exit(&dir, args);

    let (code, page) = run(&["status", "--listen", &unix, "--status-path", "/fpm-status"]);
    assert_eq!(code, Some(0), "{page}");
    assert!(
        page.contains("pool:") && page.contains("active processes"),
        "{page}"
    );

    let conf = dir.path().join("app.toml");
    std::fs::write(
        &conf,
        format!("listen = [\"{unix}\"]\nstatus_path = \"/fpm-status\"\n"),
    )
    .expect("config");
    let conf = conf.to_str().expect("utf-8");
    let (code, json) = run(&["status", "--config", conf, "--json", "--full"]);
    assert_eq!(code, Some(0), "{json}");
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("JSON");
    assert_eq!(v["pool"], "www", "{v}");
    assert_eq!(
        v["processes"].as_array().map(Vec::len),
        Some(2),
        "one entry per worker: {v}"
    );

    let tcp = match app.tcp() {
        e2e::Addr::Tcp(a) => a,
        e2e::Addr::Unix(_) => unreachable!("App::tcp is TCP"),
    };
    let (code, metrics) = run(&[
        "status",
        "--listen",
        &tcp,
        "--status-path",
        "/fpm-status",
        "--openmetrics",
    ]);
    assert_eq!(code, Some(0), "{metrics}");
    openmetrics::check(&metrics).unwrap_or_else(|e| panic!("{e}: {metrics}"));

    // A path the pool does not answer as its page: an answer, but not the page.
    let (code, err) = run(&["status", "--listen", &unix]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("status 404"), "{err}");

    let nowhere = format!("127.0.0.1:{}", free_port());
    let (code, err) = run(&["status", "--listen", &nowhere]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("no answer from {nowhere}")) && err.contains("refused"),
        "{err}"
    );
    let (code, err) = run(&["status", "--bogus"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = run(&["status"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--listen ADDR"), "{err}");
}
