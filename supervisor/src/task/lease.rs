//! One leader across hosts: a PostgreSQL session advisory lock held on a direct connection.
//!
//! - A process that gets `pg_try_advisory_lock` is the leader; the others are standbys and try
//!   again every `retry`, jittered. The lock belongs to the session, so it is held exactly as
//!   long as PostgreSQL keeps the connection: a transaction pooler (PgBouncer in transaction
//!   mode) would hand the session to others between statements and the lock with it.
//! - Each term bumps `epoch` in `supervisor_lease` (the fencing token the runs receive).
//! - The leader proves it still holds the lock with `SELECT 1` every `check_interval`; when a
//!   check fails, or none has been answered for `check_interval + check_timeout` (the proof
//!   window), it exits at once. Its session sets `idle_session_timeout = session_timeout`,
//!   longer than the proof window, so a leader whose connection went silent has stopped before
//!   PostgreSQL drops the session and frees the lock. A new leader waits one proof window
//!   before its first run, so a predecessor whose session was terminated under it has noticed.
//! - The schedule is kept on the database's clock: runs record `last_start` and `last_end` as
//!   the server's `now()`, and the wait before the next run is computed by the server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres::{Client, NoTls};

use super::process::{Runner, EXIT_LEASE_LOST};
use super::schedule::jittered;
use crate::clock;
use crate::config::{LeaseConfig, TaskMode};
use crate::scoreboard::{TaskRole, TaskState};

/// How often the watchdog looks at the age of the last answered check: a small fraction of any
/// sensible proof window, and a wake-up that costs nothing.
const WATCHDOG_TICK: Duration = Duration::from_millis(20);

/// The shortest TCP keepalive time the kernel takes (`TCP_KEEPIDLE` is in seconds, from 1).
const MIN_KEEPALIVE: Duration = Duration::from_secs(1);

/// The advisory lock key of `task`: FNV-1a of `supervisor.task.` and the name, so every host
/// running the task computes the same key, and a task's key does not collide with the
/// application's own small integer keys.
fn lock_key(task: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "supervisor.task.".bytes().chain(task.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// Who holds the lease, for `supervisor_lease.holder` and the logs.
fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!("{host}:{}", std::process::id())
}

fn millis(d: Duration) -> u128 {
    d.as_millis().max(1)
}

/// An error with its causes: the client's own message alone ("error connecting to server")
/// does not say why.
fn full(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// A direct connection with the lease's timeouts: connecting, TCP keepalives and unacknowledged
/// data all bounded by the check timeout, and the session's idle timeout set.
fn connect(cfg: &LeaseConfig, task: &str) -> Result<Client, String> {
    let mut pg: postgres::Config = cfg
        .url
        .parse()
        .map_err(|e| format!("lease url is not a PostgreSQL connection string: {e}"))?;
    // The kernel counts keepalive times in whole seconds, and refuses 0.
    let keepalive = cfg.check_interval.max(MIN_KEEPALIVE);
    pg.connect_timeout(cfg.check_timeout)
        .keepalives(true)
        .keepalives_idle(keepalive)
        .keepalives_interval(keepalive)
        .keepalives_retries(1)
        .tcp_user_timeout(cfg.check_timeout)
        .application_name(&format!("supervisor task {task}"));
    let mut client = pg
        .connect(NoTls)
        .map_err(|e| format!("cannot connect to the lease database: {}", full(&e)))?;
    client
        .batch_execute(&format!(
            "SET idle_session_timeout = {}; SET statement_timeout = {}",
            millis(cfg.session_timeout),
            millis(cfg.check_timeout)
        ))
        .map_err(|e| format!("cannot set the lease session's timeouts: {}", full(&e)))?;
    // Every leader of every task creates the table if needed; the transaction lock keeps two
    // from racing on the catalog.
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({}); \
             CREATE TABLE IF NOT EXISTS supervisor_lease (\
               task text PRIMARY KEY, epoch bigint NOT NULL, holder text, \
               acquired timestamptz, last_start timestamptz, last_end timestamptz); COMMIT",
            lock_key("")
        ))
        .map_err(|e| format!("cannot create supervisor_lease: {}", full(&e)))?;
    Ok(client)
}

/// Tries the lock on `client`: the new term's epoch if this process is now the leader.
fn try_lead(client: &mut Client, task: &str) -> Result<Option<i64>, String> {
    let row = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&lock_key(task)])
        .map_err(|e| format!("lease check failed: {}", full(&e)))?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_one(
            "INSERT INTO supervisor_lease (task, epoch, holder, acquired) VALUES ($1, 1, $2, now()) \
             ON CONFLICT (task) DO UPDATE SET epoch = supervisor_lease.epoch + 1, \
             holder = EXCLUDED.holder, acquired = now() RETURNING epoch",
            &[&task, &holder()],
        )
        .map_err(|e| format!("cannot start a lease term: {}", full(&e)))?;
    Ok(Some(row.get(0)))
}

/// Stops this process at once: it can no longer prove that it leads.
fn lost(task: &str, epoch: i64, cause: &str) -> ! {
    tracing::error!(
        pid = std::process::id(),
        task,
        epoch,
        cause,
        "task lost its lease: stopping at once"
    );
    std::process::exit(EXIT_LEASE_LOST)
}

/// Standby until leader, then run on the database's schedule until told to stop. Returns
/// only for a stop.
pub(super) fn leader_loop<R>(runner: &mut Runner<'_, R>, cfg: &LeaseConfig) -> std::io::Result<()> {
    let task = runner.cfg.name.clone();
    let pid = u64::from(std::process::id());
    let mut client: Option<Client> = None;
    let mut tries: u64 = 0;
    let mut said: Option<String> = None;
    let epoch = loop {
        if runner.stop.requested() {
            return Ok(());
        }
        runner.slot.set_role(TaskRole::Standby, 0);
        runner.slot.set_state(TaskState::Standby);
        let attempt = match client.as_mut() {
            Some(c) => try_lead(c, &task),
            None => connect(cfg, &task).and_then(|mut c| {
                let r = try_lead(&mut c, &task);
                client = Some(c);
                r
            }),
        };
        match attempt {
            Ok(Some(epoch)) => break epoch,
            Ok(None) => {
                if said.as_deref() != Some("standby") {
                    tracing::info!(pid, task, "task standby: another process holds the lease");
                    said = Some("standby".into());
                }
            }
            Err(e) => {
                client = None;
                // Once per episode: a database that is down for an hour is one line, not 3600.
                if said.as_deref() != Some(e.as_str()) {
                    tracing::warn!(pid, task, error = e, "task standby: cannot reach the lease");
                    said = Some(e);
                }
            }
        }
        tries += 1;
        if runner.stop.sleep(jittered(cfg.retry, pid << 20 ^ tries)) {
            return Ok(());
        }
    };
    let Some(client) = client else {
        return Err(std::io::Error::other("leader without a connection"));
    };
    tracing::info!(
        pid,
        task,
        epoch,
        holder = holder(),
        "task leader: lease acquired"
    );
    runner.slot.set_role(TaskRole::Leader, epoch as u64);
    runner.slot.set_state(TaskState::Idle);
    let client = Arc::new(Mutex::new(client));
    watch_lease(Arc::clone(&client), cfg.clone(), task.clone(), epoch)?;
    // A predecessor whose session was dropped under it stops within one proof window.
    if runner.stop.sleep(cfg.proof_window()) {
        return Ok(());
    }
    let db = Fenced {
        client,
        task: task.clone(),
        epoch,
    };
    loop {
        let wait = db.wait_before_next(runner.cfg.mode, runner.cfg.interval);
        if runner.stop.requested() || runner.stop.sleep(wait) {
            return Ok(());
        }
        db.mark("last_start");
        runner.run_once(Some(epoch));
        db.mark("last_end");
    }
}

/// The leader's statements, each fenced by its epoch.
struct Fenced {
    client: Arc<Mutex<Client>>,
    task: String,
    epoch: i64,
}

impl Fenced {
    fn client(&self) -> std::sync::MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server's wait before the next run, by the rule of `schedule::wait_before_next`,
    /// computed on the server's clock from the times it recorded.
    fn wait_before_next(&self, mode: TaskMode, interval: Duration) -> Duration {
        let due = match mode {
            TaskMode::Interval => "last_end + $3 * interval '1 millisecond'",
            TaskMode::Loop => "GREATEST(last_start + $3 * interval '1 millisecond', last_end)",
        };
        let sql = format!(
            "SELECT COALESCE(GREATEST(0, EXTRACT(EPOCH FROM ({due} - now())) * 1000), 0)::float8 \
             FROM supervisor_lease WHERE task = $1 AND epoch = $2"
        );
        let ms = interval.as_millis() as f64;
        let rows = self.client().query(&sql, &[&self.task, &self.epoch, &ms]);
        match rows {
            Ok(rows) => match rows.first() {
                Some(row) => Duration::from_secs_f64(row.get::<_, f64>(0).max(0.0) / 1000.0),
                None => lost(&self.task, self.epoch, "another leader took over"),
            },
            Err(e) => lost(
                &self.task,
                self.epoch,
                &format!("schedule query failed: {e}"),
            ),
        }
    }

    /// Records the server's `now()` as `column` of this term; no row means a newer term exists.
    fn mark(&self, column: &str) {
        let sql =
            format!("UPDATE supervisor_lease SET {column} = now() WHERE task = $1 AND epoch = $2");
        match self.client().execute(&sql, &[&self.task, &self.epoch]) {
            Ok(1) => {}
            Ok(_) => lost(&self.task, self.epoch, "another leader took over"),
            Err(e) => lost(
                &self.task,
                self.epoch,
                &format!("cannot record {column}: {e}"),
            ),
        }
    }
}

/// The checker (`SELECT 1` every `check_interval`) and the watchdog (exits once no check has
/// been answered within the proof window, including a check stuck on a silent connection).
fn watch_lease(
    client: Arc<Mutex<Client>>,
    cfg: LeaseConfig,
    task: String,
    epoch: i64,
) -> std::io::Result<()> {
    // When the last answered check was sent, on the shared monotonic clock (microseconds).
    let proved = Arc::new(AtomicU64::new(clock::now().as_micros() as u64));
    {
        let (proved, task) = (Arc::clone(&proved), task.clone());
        let interval = cfg.check_interval;
        std::thread::Builder::new()
            .name("lease-check".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                let sent = clock::now();
                let answer = client
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .simple_query("SELECT 1");
                match answer {
                    Ok(_) => proved.store(sent.as_micros() as u64, Ordering::Release),
                    Err(e) => lost(&task, epoch, &format!("lease check failed: {}", full(&e))),
                }
            })?;
    }
    let window = cfg.proof_window();
    std::thread::Builder::new()
        .name("lease-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(WATCHDOG_TICK);
            let last = Duration::from_micros(proved.load(Ordering::Acquire));
            let age = clock::now().saturating_sub(last);
            if age > window {
                lost(
                    &task,
                    epoch,
                    &format!(
                        "no lease check answered for {} ms (check_interval + check_timeout = {} ms)",
                        age.as_millis(),
                        window.as_millis()
                    ),
                );
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable_and_differ_per_task() {
        assert_eq!(lock_key("drain"), lock_key("drain"));
        assert_ne!(lock_key("drain"), lock_key("report"));
        assert_ne!(lock_key(""), lock_key("drain"));
    }
}
