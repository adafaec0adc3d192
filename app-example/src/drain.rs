//! The example's background task, `drain`: with a database (a lease is configured), each run
//! moves what `/enqueue` queued into `example_done` with `FOR UPDATE SKIP LOCKED`, under the
//! lease's fencing token, and records itself in `example_runs`; without one it does something
//! local (it only sleeps), so `scripts/run` needs nothing beyond nginx.
//!
//! Knobs the tests use: `APP_EXAMPLE_TASK_MS` (how long a run takes), `APP_EXAMPLE_TASK_LOG`
//! (a file each run appends `start PID NANOS` and `end PID NANOS` to, wall-clock nanoseconds),
//! `APP_EXAMPLE_TASK_PANIC` (every run panics), `APP_EXAMPLE_HOST` (the host name recorded).

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use supervisor::postgres::{Client, NoTls};
use supervisor::TaskContext;

/// Rows one run moves at most: a run stays short, so a stop or a lost lease waits little.
const DRAIN_BATCH: i64 = 100;

/// The task process's own connection (not the lease's), opened on its first run.
static DB: OnceLock<Mutex<Client>> = OnceLock::new();

/// The tables of the example, created by whoever gets there first.
pub const SCHEMA: &str = "\
    CREATE TABLE IF NOT EXISTS example_queue (id bigserial PRIMARY KEY, payload text NOT NULL);\
    CREATE TABLE IF NOT EXISTS example_done (id bigint PRIMARY KEY, payload text, epoch bigint);\
    CREATE TABLE IF NOT EXISTS example_runs (host text, pid int, epoch bigint,\
        started timestamptz, ended timestamptz, host_time timestamptz)";

fn wall_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn note(what: &str) {
    if let Ok(path) = std::env::var("APP_EXAMPLE_TASK_LOG") {
        let line = format!(
            "{what} {} {}\n",
            std::process::id(),
            wall_nanos(SystemTime::now())
        );
        // One write of one line with O_APPEND: lines from several processes never interleave.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// One run of `drain`.
pub fn run(ctx: &TaskContext) -> Result<(), String> {
    if std::env::var_os("APP_EXAMPLE_TASK_PANIC").is_some() {
        panic!("APP_EXAMPLE_TASK_PANIC is set");
    }
    note("start");
    let took = std::env::var("APP_EXAMPLE_TASK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_default();
    let result = match (ctx.database_url(), ctx.epoch()) {
        (Some(url), Some(epoch)) => drain(ctx, url, epoch, took),
        _ => {
            std::thread::sleep(took);
            Ok(())
        }
    };
    note("end");
    result
}

fn connection(url: &str) -> Result<&'static Mutex<Client>, String> {
    if let Some(db) = DB.get() {
        return Ok(db);
    }
    let mut client = Client::connect(url, NoTls).map_err(|e| format!("cannot connect: {e}"))?;
    client
        .batch_execute(SCHEMA)
        .map_err(|e| format!("cannot create the example's tables: {e}"))?;
    Ok(DB.get_or_init(|| Mutex::new(client)))
}

/// Drains a batch and records the run, both only while `epoch` is still the lease's: a leader
/// that lost the lease without knowing yet writes nothing.
fn drain(ctx: &TaskContext, url: &str, epoch: i64, took: Duration) -> Result<(), String> {
    let db = connection(url)?;
    let mut db = db.lock().unwrap_or_else(|e| e.into_inner());
    let started: f64 = db
        .query_one("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8", &[])
        .map_err(|e| e.to_string())?
        .get(0);
    let host_time = seconds(ctx.host_time());
    std::thread::sleep(took);
    let mut tx = db.transaction().map_err(|e| e.to_string())?;
    // FOR SHARE: a new leader's epoch bump waits for this transaction, or this one sees it.
    let current: Option<i64> = tx
        .query_opt(
            "SELECT epoch FROM supervisor_lease WHERE task = $1 FOR SHARE",
            &[&ctx.name()],
        )
        .map_err(|e| e.to_string())?
        .map(|r| r.get(0));
    if current != Some(epoch) {
        return Err(format!(
            "stale leader: epoch {epoch}, the lease is at {current:?}; nothing written"
        ));
    }
    tx.execute(
        "WITH batch AS (DELETE FROM example_queue WHERE id IN \
           (SELECT id FROM example_queue ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) \
           RETURNING id, payload) \
         INSERT INTO example_done (id, payload, epoch) SELECT id, payload, $1 FROM batch",
        &[&epoch, &DRAIN_BATCH],
    )
    .map_err(|e| e.to_string())?;
    let host = std::env::var("APP_EXAMPLE_HOST").unwrap_or_else(|_| "localhost".into());
    tx.execute(
        "INSERT INTO example_runs (host, pid, epoch, started, ended, host_time) \
         VALUES ($1, $2, $3, to_timestamp($4), clock_timestamp(), to_timestamp($5))",
        &[
            &host,
            &(std::process::id() as i32),
            &epoch,
            &started,
            &host_time,
        ],
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}

/// `/enqueue?n=N`: queues N rows for the task (needs `APP_EXAMPLE_DATABASE_URL`).
pub fn enqueue(n: i64) -> Result<u64, String> {
    let url = std::env::var("APP_EXAMPLE_DATABASE_URL")
        .map_err(|_| "no database: set APP_EXAMPLE_DATABASE_URL".to_string())?;
    let mut db = Client::connect(&url, NoTls).map_err(|e| format!("cannot connect: {e}"))?;
    db.batch_execute(SCHEMA).map_err(|e| e.to_string())?;
    db.execute(
        "INSERT INTO example_queue (payload) SELECT 'item ' || g FROM generate_series(1, $1::bigint) g",
        &[&n],
    )
    .map_err(|e| e.to_string())
}
