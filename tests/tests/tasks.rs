//! Background tasks (README "Background tasks"): supervised beside the workers, never two runs
//! at once on a host (reloads, upgrades, two masters), the crash-loop backoff, the status rows,
//! and with a real PostgreSQL server one leader across two "hosts" (two masters), its fencing
//! token and its schedule on the database's clock.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::pg::{Blackhole, Postgres};
use e2e::{fcgi_request, wait_until, App, TempDir};
use nix::sys::signal::Signal;

/// How long a task may take to do what it was told on a loaded two-core machine: forks, a
/// reload's new generation, the end of a run, a takeover.
const DEADLINE: Duration = Duration::from_secs(20);

/// A config file in `dir` with `body` after the common keys: one worker, the status page, and
/// the task lock files in `lock_dir` (never the shared temporary directory, where another
/// test's masters would contend for them).
fn config(dir: &TempDir, name: &str, lock_dir: &Path, body: &str) -> PathBuf {
    let path = dir.path().join(name);
    let text = format!(
        "workers = 1\nstatus_path = \"/status\"\nlog_format = \"json\"\ntask_lock_dir = \"{}\"\n{body}",
        lock_dir.display()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// A run as the example's task logs it (`APP_EXAMPLE_TASK_LOG`): pid, start, end (wall-clock
/// nanoseconds; `None` while it runs).
#[derive(Debug, Clone, Copy)]
struct LoggedRun {
    pid: u32,
    start: u128,
    end: Option<u128>,
}

fn logged_runs(path: &Path) -> Vec<LoggedRun> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut runs: Vec<LoggedRun> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(what), Some(pid), Some(at)) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let (Ok(pid), Ok(at)) = (pid.parse::<u32>(), at.parse::<u128>()) else {
            continue;
        };
        match what {
            "start" => runs.push(LoggedRun {
                pid,
                start: at,
                end: None,
            }),
            "end" => {
                if let Some(run) = runs
                    .iter_mut()
                    .rev()
                    .find(|r| r.pid == pid && r.end.is_none())
                {
                    run.end = Some(at);
                }
            }
            _ => {}
        }
    }
    runs
}

/// No run starts before the one before it ended.
fn assert_no_overlap(runs: &[LoggedRun]) {
    let mut sorted = runs.to_vec();
    sorted.sort_by_key(|r| r.start);
    for pair in sorted.windows(2) {
        let end = pair[0]
            .end
            .unwrap_or_else(|| panic!("run {:?} never ended but {:?} started", pair[0], pair[1]));
        assert!(
            end <= pair[1].start,
            "runs overlap: {:?} and {:?} (all: {sorted:?})",
            pair[0],
            pair[1]
        );
    }
}

fn pids_in(runs: &[LoggedRun]) -> Vec<u32> {
    let mut pids: Vec<u32> = Vec::new();
    for r in runs {
        if !pids.contains(&r.pid) {
            pids.push(r.pid);
        }
    }
    pids
}

/// The JSON log's lines whose message is `message`.
fn log_lines(app: &App, message: &str) -> Vec<serde_json::Value> {
    app.stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

/// A JSON log line's time as Unix seconds (`2026-12-01T22:30:26.447302Z`).
fn log_time(line: &serde_json::Value) -> f64 {
    let ts = line["timestamp"].as_str().expect("timestamp");
    let (date, clock) = ts
        .trim_end_matches('Z')
        .split_once('T')
        .expect("date and time");
    let d: Vec<i64> = date.split('-').map(|p| p.parse().expect("date")).collect();
    let t: Vec<f64> = clock.split(':').map(|p| p.parse().expect("time")).collect();
    // Days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let (y, m, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days as f64 * 86_400.0 + t[0] * 3600.0 + t[1] * 60.0 + t[2]
}

/// When `app` logged that its leader of term `epoch` lost the lease, if it did.
fn lost_at(app: &App, epoch: i64) -> Option<f64> {
    log_lines(app, "task lost its lease: stopping at once")
        .iter()
        .find(|l| l["epoch"] == epoch)
        .map(log_time)
}

/// When the first run of term `epoch` started, on the database's clock (this machine's).
fn first_run_of(pg: &Postgres, epoch: i64) -> Option<f64> {
    db_runs(pg)
        .iter()
        .find(|r| r.epoch == epoch)
        .map(|r| r.started)
}

fn status_tasks(app: &App) -> Vec<serde_json::Value> {
    let res = fcgi_request(&app.unix(), "GET", "/status?json", b"").expect("status");
    let text = String::from_utf8_lossy(&res.stdout).to_string();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("status JSON ({e}): {body}"));
    v["tasks"].as_array().cloned().unwrap_or_default()
}

#[test]
fn hup_and_usr2_during_a_long_run_let_it_finish_before_the_next_generation_runs() {
    let dir = TempDir::new("task-reload");
    let log = dir.path().join("runs.log");
    let cfg = config(
        &dir,
        "app.toml",
        dir.path(),
        "[tasks.drain]\ninterval = \"50ms\"\nstop_timeout = \"20s\"\n",
    );
    let env = [
        ("APP_EXAMPLE_TASK_MS", "1500"),
        ("APP_EXAMPLE_TASK_LOG", log.to_str().expect("utf-8")),
    ];
    let app = App::start_with_env(&dir, &["--config", cfg.to_str().expect("utf-8")], &env);
    let log_path = log.clone();
    let running = move |n: usize| {
        let log = log_path.clone();
        move || {
            let runs = logged_runs(&log);
            pids_in(&runs).len() >= n && runs.last().is_some_and(|r| r.end.is_none())
        }
    };
    wait_until(DEADLINE, "the first run", running(1));
    let first = logged_runs(&log)[0].pid;
    app.signal(Signal::SIGHUP);
    wait_until(DEADLINE, "a run of the reload's task process", running(2));
    app.signal(Signal::SIGUSR2);
    wait_until(DEADLINE, "a run of the upgrade's task process", running(3));
    let runs = logged_runs(&log);
    assert_no_overlap(&runs);
    let pids = pids_in(&runs);
    assert_eq!(pids[0], first);
    for old in &pids[..2] {
        let last = runs.iter().rev().find(|r| r.pid == *old).expect("a run");
        assert!(
            last.end.is_some(),
            "the old process finished its run: {runs:?}"
        );
    }
    let exits = log_lines(&app, "task exited").len()
        + log_lines(
            &app,
            "task exited (started by the previous master, before the upgrade)",
        )
        .len();
    assert!(
        exits >= 2,
        "both old task processes exited: {}",
        app.stderr()
    );
    assert!(
        app.stderr().contains("task waits for the host lock"),
        "the new processes waited for the old ones"
    );
}

#[test]
fn two_masters_on_one_host_never_both_run_the_task() {
    let dir = TempDir::new("task-two-masters");
    let (dir_a, dir_b) = (TempDir::new("task-host-a"), TempDir::new("task-host-b"));
    let log = dir.path().join("runs.log");
    let body = "[tasks.drain]\ninterval = \"20ms\"\nstop_timeout = \"10s\"\n";
    let env = [
        ("APP_EXAMPLE_TASK_MS", "100"),
        ("APP_EXAMPLE_TASK_LOG", log.to_str().expect("utf-8")),
    ];
    let cfg_a = config(&dir_a, "a.toml", dir.path(), body);
    let cfg_b = config(&dir_b, "b.toml", dir.path(), body);
    let a = App::start_with_env(&dir_a, &["--config", cfg_a.to_str().expect("utf-8")], &env);
    wait_until(DEADLINE, "a's first run", || !logged_runs(&log).is_empty());
    let b = App::start_with_env(&dir_b, &["--config", cfg_b.to_str().expect("utf-8")], &env);
    wait_until(DEADLINE, "b's task waiting for the host lock", || {
        status_tasks(&b)
            .first()
            .is_some_and(|t| t["state"] == "waiting for host lock")
    });
    std::thread::sleep(Duration::from_secs(2));
    let runs = logged_runs(&log);
    assert_eq!(pids_in(&runs).len(), 1, "only a's task ran: {runs:?}");
    assert!(runs.len() >= 5, "a's task kept running: {runs:?}");
    // a stops gracefully: b's task takes the lock once a's has finished its run.
    a.signal(Signal::SIGTERM);
    wait_until(DEADLINE, "b's task to run", || {
        pids_in(&logged_runs(&log)).len() == 2
    });
    assert!(a.wait_exit(DEADLINE).is_some(), "a stopped");
    assert_no_overlap(&logged_runs(&log));
}

#[test]
fn a_task_that_panics_at_start_backs_off_exponentially() {
    let dir = TempDir::new("task-panic");
    let cfg = config(&dir, "app.toml", dir.path(), "[tasks.drain]\n");
    let app = App::start_with_env(
        &dir,
        &["--config", cfg.to_str().expect("utf-8")],
        &[("APP_EXAMPLE_TASK_PANIC", "1")],
    );
    let started = || log_lines(&app, "task started");
    wait_until(DEADLINE, "seven starts of the panicking task", || {
        started().len() >= 7
    });
    let times: Vec<f64> = started().iter().map(log_time).collect();
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // 100 ms doubling: the later gaps are several times the earlier ones.
    assert!(
        gaps[5] >= 3.0 * gaps[2] && gaps[5] >= 0.6,
        "restarts back off exponentially: gaps {gaps:?}"
    );
    assert!(!log_lines(
        &app,
        "task keeps dying young: delaying its restart (crash-loop backoff)"
    )
    .is_empty());
    assert!(!log_lines(&app, "task panicked").is_empty());
    let died = log_lines(&app, "task died unexpectedly");
    assert!(
        died.iter().any(|l| l["cause"] == "exit code 70"),
        "{died:?}"
    );
}

#[test]
fn the_status_page_shows_the_task_rows_and_run_timeout_ends_a_stuck_run() {
    let dir = TempDir::new("task-status");
    let log = dir.path().join("runs.log");
    let cfg = config(
        &dir,
        "app.toml",
        dir.path(),
        "[tasks.drain]\ninterval = \"100ms\"\nrun_timeout = \"1500ms\"\n",
    );
    let env = [
        ("APP_EXAMPLE_TASK_MS", "600"),
        ("APP_EXAMPLE_TASK_LOG", log.to_str().expect("utf-8")),
    ];
    let app = App::start_with_env(&dir, &["--config", cfg.to_str().expect("utf-8")], &env);
    wait_until(DEADLINE, "two finished runs", || {
        status_tasks(&app)
            .first()
            .is_some_and(|t| t["iterations"].as_u64() >= Some(2))
    });
    let rows = status_tasks(&app);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let t = &rows[0];
    assert_eq!(t["task"], "drain");
    assert_eq!(t["role"], "local");
    assert_eq!(t["last error"], "-");
    assert!(t["state"] == "running" || t["state"] == "idle", "{t}");
    let ms = t["last run duration"].as_u64().expect("micros") / 1000;
    assert!(ms >= 550, "the last run took about 600 ms: {ms}");
    let text = fcgi_request(&app.unix(), "GET", "/status", b"").expect("status");
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(text.contains("task:                 drain\n"), "{text}");
    assert!(text.contains("role:                 local\n"), "{text}");
    let metrics = fcgi_request(&app.unix(), "GET", "/status?openmetrics", b"").expect("status");
    let metrics = String::from_utf8_lossy(&metrics.stdout).to_string();
    let body = metrics.split("\r\n\r\n").nth(1).unwrap_or("");
    let samples = e2e::openmetrics::check(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(
        samples.iter().any(
            |s| s.name == "fcgi_pool_task_iterations_total" && s.label("task") == Some("drain")
        ),
        "{body}"
    );
    drop(app);

    // A run that outlives run_timeout costs its process, which is replaced.
    let dir = TempDir::new("task-run-timeout");
    let cfg = config(
        &dir,
        "app.toml",
        dir.path(),
        "[tasks.drain]\nrun_timeout = \"500ms\"\n",
    );
    let app = App::start_with_env(
        &dir,
        &["--config", cfg.to_str().expect("utf-8")],
        &[("APP_EXAMPLE_TASK_MS", "60000")],
    );
    let timeout = app.wait_for_json_line("task run timeout: killing the task process");
    assert_eq!(timeout["task"], "drain", "{timeout}");
    wait_until(DEADLINE, "a replacement task process", || {
        log_lines(&app, "task started").len() >= 2
    });
}

// ---- One leader across hosts, with a real PostgreSQL ----

/// The lease settings of these tests: checks every 300 ms, lost after 1.8 s without an answer
/// (a loaded two-core machine has held a check past a second), the server drops a silent
/// session after 5 s; standbys retry every 300 ms (jittered).
const LEASE: &str = "check_interval = \"300ms\"\ncheck_timeout = \"1500ms\"\n\
                     session_timeout = \"5s\"\nretry = \"300ms\"\n";
/// The task's interval on the database's clock, and how long one run takes.
const INTERVAL_MS: f64 = 700.0;
const RUN_MS: &str = "200";
/// The documented takeover bound after the lock is freed (retry x 1.5 + check_interval +
/// check_timeout = 2.25 s), plus a run's end and a loaded machine's scheduling.
const TAKEOVER: Duration = Duration::from_secs(10);

/// A "host": a master with its own lock dir (hosts do not share one), its lease url, its name
/// in the runs table, and extra environment.
fn host(dir: &TempDir, name: &str, url: &str, env: &[(&str, &str)]) -> App {
    let body = format!(
        "[tasks.drain]\nmode = \"interval\"\ninterval = \"{INTERVAL_MS}ms\"\nstop_timeout = \"5s\"\n\
         lease = \"{url}\"\n[lease]\n{LEASE}"
    );
    let cfg = config(dir, "app.toml", dir.path(), &body);
    let mut all = vec![
        ("APP_EXAMPLE_HOST", name),
        ("APP_EXAMPLE_TASK_MS", RUN_MS),
        ("APP_EXAMPLE_DATABASE_URL", url),
    ];
    all.extend_from_slice(env);
    App::start_with_env(dir, &["--config", cfg.to_str().expect("utf-8")], &all)
}

/// A run as the example's task records it in `example_runs`, on the database's clock
/// (seconds), with the host's clock as the task process saw it.
#[derive(Debug, Clone)]
struct DbRun {
    host: String,
    epoch: i64,
    started: f64,
    ended: f64,
    host_time: f64,
}

fn db_runs(pg: &Postgres) -> Vec<DbRun> {
    let mut c = pg.client();
    let rows = c
        .query(
            "SELECT host, epoch, EXTRACT(EPOCH FROM started)::float8, \
             EXTRACT(EPOCH FROM ended)::float8, EXTRACT(EPOCH FROM host_time)::float8 \
             FROM example_runs ORDER BY started",
            &[],
        )
        .unwrap_or_default();
    rows.iter()
        .map(|r| DbRun {
            host: r.get(0),
            epoch: r.get(1),
            started: r.get(2),
            ended: r.get(3),
            host_time: r.get(4),
        })
        .collect()
}

/// Over the whole table: no two runs overlap, and each run starts at least the interval after
/// the one before it ended (no double run), and not much later unless a takeover sits between
/// them (no gap).
fn assert_schedule(runs: &[DbRun], takeover_slack: f64) {
    let interval = INTERVAL_MS / 1000.0;
    for pair in runs.windows(2) {
        let gap = pair[1].started - pair[0].ended;
        assert!(gap >= 0.0, "runs overlap: {pair:?}");
        assert!(
            gap >= interval - 0.005,
            "a run started {gap:.3}s after the last ended, inside the interval: {pair:?}"
        );
        let slack = if pair[0].epoch == pair[1].epoch {
            // One leader's runs: the interval plus a loaded machine's delays.
            2.0
        } else {
            takeover_slack
        };
        assert!(
            gap <= interval + slack,
            "a gap of {gap:.3}s between runs: {pair:?}"
        );
    }
}

/// The example's tables, made before any master starts so no two creators race.
fn schema(pg: &Postgres) {
    pg.client()
        .batch_execute(
            "CREATE TABLE example_queue (id bigserial PRIMARY KEY, payload text NOT NULL);\
             CREATE TABLE example_done (id bigint PRIMARY KEY, payload text, epoch bigint);\
             CREATE TABLE example_runs (host text, pid int, epoch bigint,\
                 started timestamptz, ended timestamptz, host_time timestamptz)",
        )
        .expect("schema");
}

fn leaders(hosts: &[&App]) -> Vec<usize> {
    hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| status_tasks(h).iter().any(|t| t["role"] == "leader"))
        .map(|(i, _)| i)
        .collect()
}

fn epoch(pg: &Postgres) -> i64 {
    pg.client()
        .query_one(
            "SELECT epoch FROM supervisor_lease WHERE task = 'drain'",
            &[],
        )
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// The write a stale leader would make: fenced by its epoch, it changes nothing.
fn fenced_write(pg: &Postgres, epoch: i64) -> u64 {
    pg.client()
        .execute(
            "UPDATE supervisor_lease SET holder = 'stale' WHERE task = 'drain' AND epoch = $1",
            &[&epoch],
        )
        .expect("fenced write")
}

#[test]
fn one_leader_across_two_hosts_survives_a_killed_master_on_the_database_clock() {
    let dir = TempDir::new("task-lease");
    let pg = Postgres::start(&dir);
    schema(&pg);
    let (dir_a, dir_b) = (TempDir::new("lease-host-a"), TempDir::new("lease-host-b"));
    let a = host(&dir_a, "a", &pg.url(), &[]);
    wait_until(DEADLINE, "a to lead", || leaders(&[&a]) == [0]);
    // b's clock is a minute ahead: the schedule must not care.
    let b = host(
        &dir_b,
        "b",
        &pg.url(),
        &[("SUPERVISOR_TASK_CLOCK_OFFSET_SECS", "60")],
    );
    wait_until(DEADLINE, "b to be a standby", || {
        status_tasks(&b)
            .first()
            .is_some_and(|t| t["role"] == "standby")
    });
    wait_until(DEADLINE, "four runs", || db_runs(&pg).len() >= 4);
    // a leads unless a loaded machine made it miss a check since: either way, one leader.
    let leading = leaders(&[&a, &b]);
    assert_eq!(leading.len(), 1, "exactly one leader: {leading:?}");
    let (leader, survivor, survivor_name) = if leading == [0] {
        (&a, &b, "b")
    } else {
        (&b, &a, "a")
    };
    let queued = fcgi_request(&survivor.unix(), "GET", "/enqueue?n=50", b"").expect("enqueue");
    let queued = String::from_utf8_lossy(&queued.stdout).to_string();
    assert!(queued.contains("queued 50"), "{queued}");
    let old = epoch(&pg);
    let killed = Instant::now();
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    leader.signal(Signal::SIGKILL);
    wait_until(TAKEOVER, "the standby to lead", || {
        leaders(&[survivor]) == [0]
    });
    let took = killed.elapsed();
    wait_until(DEADLINE, "the new leader's runs", || {
        db_runs(&pg)
            .iter()
            .filter(|r| r.host == survivor_name)
            .count()
            >= 3
    });
    let new = epoch(&pg);
    assert!(new > old, "a new term: {old} -> {new}");
    // The database's clock is this machine's: the new term's first run, after the kill.
    let first_run = first_run_of(&pg, new).expect("the new leader's runs") - killed_at;
    assert!(
        first_run < TAKEOVER.as_secs_f64(),
        "the new leader ran {first_run:.3}s after the kill"
    );
    assert_eq!(
        fenced_write(&pg, old),
        0,
        "a write with the old epoch is rejected"
    );
    let runs = db_runs(&pg);
    assert_schedule(&runs, TAKEOVER.as_secs_f64());
    for r in runs.iter().filter(|r| r.host == "b") {
        let skew = r.host_time - r.started;
        assert!(
            (55.0..65.0).contains(&skew),
            "b's clock was a minute off: {r:?}"
        );
    }
    let done: i64 = pg
        .client()
        .query_one("SELECT count(*) FROM example_done", &[])
        .expect("count")
        .get(0);
    assert_eq!(done, 50, "the queue was drained exactly once");
    eprintln!(
        "takeover after SIGKILL of the leader's master: leader after {took:?}, first run after {first_run:.3}s"
    );
}

#[test]
fn a_terminated_or_black_holed_leader_stops_before_the_next_one_starts() {
    let dir = TempDir::new("task-fence");
    let pg = Postgres::start(&dir);
    schema(&pg);
    let proxy = Blackhole::start(pg.port());
    let (dir_a, dir_b) = (TempDir::new("fence-host-a"), TempDir::new("fence-host-b"));
    // a reaches the database through the proxy, b directly.
    let a = host(&dir_a, "a", &pg.url_via(proxy.port()), &[]);
    wait_until(DEADLINE, "a to lead", || leaders(&[&a]) == [0]);
    let b = host(&dir_b, "b", &pg.url(), &[]);
    wait_until(DEADLINE, "three runs", || db_runs(&pg).len() >= 3);
    let leading = leaders(&[&a, &b]);
    assert_eq!(leading.len(), 1, "exactly one leader: {leading:?}");
    let leader = if leading == [0] { &a } else { &b };

    // 1. The leader's session is terminated under it.
    let first = epoch(&pg);
    let terminated: bool = pg
        .client()
        .query_one(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted LIMIT 1",
            &[],
        )
        .expect("terminate")
        .get(0);
    assert!(terminated);
    wait_until(DEADLINE, "the leader's task to notice", || {
        lost_at(leader, first).is_some()
    });
    wait_until(TAKEOVER, "a new term", || epoch(&pg) > first);
    let second = epoch(&pg);
    wait_until(DEADLINE, "a run of the new term", || {
        first_run_of(&pg, second).is_some()
    });
    let (Some(stopped), Some(started)) = (lost_at(leader, first), first_run_of(&pg, second)) else {
        unreachable!("both waited for")
    };
    assert!(
        stopped < started,
        "the terminated leader stopped ({stopped:.3}) before the next one ran ({started:.3})"
    );
    assert_eq!(
        fenced_write(&pg, first),
        0,
        "the old epoch's write is rejected"
    );
    assert_schedule(&db_runs(&pg), TAKEOVER.as_secs_f64());

    // 2. Make sure a leads again, with a standby beside it, then black-hole a's connection.
    let mut standby = b;
    let dir_c = TempDir::new("fence-host-c");
    if leaders(&[&a]) != [0] {
        standby.signal(Signal::SIGTERM);
        assert!(standby.wait_exit(DEADLINE).is_some(), "b stopped");
        wait_until(TAKEOVER, "a to lead", || leaders(&[&a]) == [0]);
        standby = host(&dir_c, "c", &pg.url(), &[]);
    }
    let held = epoch(&pg);
    wait_until(DEADLINE, "a standby beside a", || {
        status_tasks(&standby)
            .first()
            .is_some_and(|t| t["role"] == "standby")
    });
    let silent = Instant::now();
    proxy.go_silent();
    wait_until(DEADLINE, "the silent leader to stop", || {
        lost_at(&a, held).is_some()
    });
    let stopped = silent.elapsed();
    wait_until(
        TAKEOVER,
        "the standby to lead once the server dropped a's session",
        || epoch(&pg) > held,
    );
    let took = silent.elapsed();
    assert!(
        took >= Duration::from_millis(4500),
        "the lock was only free once the server dropped the silent session (5s): {took:?}"
    );
    let third = epoch(&pg);
    assert_eq!(
        fenced_write(&pg, held),
        0,
        "the silent leader's epoch is rejected"
    );
    wait_until(DEADLINE, "a run of the standby's term", || {
        first_run_of(&pg, third).is_some()
    });
    let (Some(a_stopped), Some(next_ran)) = (lost_at(&a, held), first_run_of(&pg, third)) else {
        unreachable!("both waited for")
    };
    assert!(
        a_stopped < next_ran,
        "the silent leader stopped ({a_stopped:.3}) before the next one ran ({next_ran:.3})"
    );
    let lost = log_lines(&a, "task lost its lease: stopping at once")
        .into_iter()
        .find(|l| l["epoch"] == held)
        .map(|l| l["cause"].to_string())
        .unwrap_or_default();
    assert_schedule(&db_runs(&pg), TAKEOVER.as_secs_f64());
    assert!(
        pg.log().contains("idle-session timeout") || pg.log().contains("idle_session"),
        "postgres dropped the session for its idleness: {}",
        pg.log()
    );
    eprintln!("black hole: leader stopped after {stopped:?} ({lost}), standby led after {took:?}");
}
