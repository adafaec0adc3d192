//! The scoreboard: a table in shared memory, one slot per worker, created by the master before
//! the first fork. Each worker writes its own slot; the master and the status page read them
//! all. It is plain atomics over `SharedWords` (in `sys`), so this module needs no `unsafe`.
//!
//! Orderings: a writer publishes with `Release` and readers load with `Acquire`, so a reader
//! that sees a state also sees the fields written before it. The request's method and URI are
//! several words long, so they are guarded by a sequence counter (a seqlock): odd while being
//! written, and a reader retries until it reads the same even value before and after.

use std::io;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::Duration;

use crate::sys::SharedWords;

mod tasks;
pub use tasks::{
    TaskRole, TaskSlot, TaskSnapshot, TaskState, NAME_BYTES as TASK_NAME_BYTES, TASK_SLOTS,
};

/// Pool-wide figures before the slots: `accepted` and the [`Metrics`] are counted by the
/// workers, the rest is written by the master ([`PoolStats`]).
const HEADER_WORDS: usize = H_METRICS + METRIC_WORDS;
const H_ACCEPTED: usize = 0;
const H_STATS: usize = 1;
const H_STATS_END: usize = 16;
/// The [`Metrics`]: pool-wide counters the workers add to directly, so they survive every
/// worker's exit with nothing for the master to fold, and a reader sees each one only grow.
/// A worker adds to them once per request with relaxed `fetch_add`s, a few nanoseconds.
const H_METRICS: usize = H_STATS_END;
const M_QUEUE_TIMEOUTS: usize = 0;
const M_QUEUE_FULL: usize = 1;
const M_ABANDONED: usize = 2;
const M_DURATION_SUM: usize = 3;
const M_CLASSES: usize = 4;
const M_BUCKETS: usize = M_CLASSES + 5;
const METRIC_WORDS: usize = M_BUCKETS + DURATION_BUCKETS.len() + 1;

/// The request-duration histogram's upper bounds (the last, unbounded bucket is `+Inf`):
/// Prometheus's default buckets, from a fast handler (5 ms) to a slow report (10 s), so
/// existing dashboards' quantile queries fit, and 12 words per pool.
pub const DURATION_BUCKETS: [Duration; 11] = [
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_millis(2500),
    Duration::from_secs(5),
    Duration::from_secs(10),
];

// Word offsets within a slot.
const PID: usize = 0;
const GENERATION: usize = 1;
const STATE: usize = 2;
const STARTED: usize = 3;
const SINCE: usize = 4;
const REQUESTS: usize = 5;
const IN_FLIGHT: usize = 6;
const CONTENT_LENGTH: usize = 7;
const LAST_DURATION: usize = 8;
const RSS: usize = 9;
const SEQ: usize = 10;
const TEXT_LENS: usize = 11;
const METHOD: usize = 12;
/// Bytes of the method kept: the longest registered HTTP method (`UPDATEREDIRECTREF`) is 17;
/// 15 covers every common one.
pub const METHOD_BYTES: usize = 16;
const URI: usize = METHOD + METHOD_BYTES / 8;
/// Bytes of the request URI kept, like PHP-FPM's status page which shows the first 255 or so.
pub const URI_BYTES: usize = 256;
/// Connections the worker accepted while the whole pool was busy, waiting for room.
const HELD: usize = URI + URI_BYTES / 8;
const SLOT_WORDS: usize = HELD + 1;

/// Reader retries before it settles for an empty string instead of a torn one.
const SEQLOCK_RETRIES: usize = 16;

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// No worker.
    Free,
    /// Forked, not yet accepting.
    Starting,
    /// Accepting, with room for a request.
    Idle,
    /// At its cap of requests in flight.
    Busy,
    /// Finishing its requests before it exits.
    Draining,
}

impl SlotState {
    fn code(self) -> u64 {
        match self {
            SlotState::Free => 0,
            SlotState::Starting => 1,
            SlotState::Idle => 2,
            SlotState::Busy => 3,
            SlotState::Draining => 4,
        }
    }

    fn from_code(code: u64) -> SlotState {
        match code {
            1 => SlotState::Starting,
            2 => SlotState::Idle,
            3 => SlotState::Busy,
            4 => SlotState::Draining,
            _ => SlotState::Free,
        }
    }
}

/// A copy of one slot at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotSnapshot {
    /// The slot's index.
    pub index: usize,
    /// The worker's pid (0 before the fork returned).
    pub pid: i32,
    /// The generation the worker belongs to.
    pub generation: u64,
    /// What it is doing.
    pub state: SlotState,
    /// When it was spawned.
    pub started: Duration,
    /// When it entered its current state (for Busy: when the current request started).
    pub since: Duration,
    /// Requests it has finished.
    pub requests: u64,
    /// Requests running now.
    pub in_flight: u32,
    /// Method of the current or last request.
    pub method: String,
    /// URI of the current or last request (truncated to [`URI_BYTES`]).
    pub uri: String,
    /// CONTENT_LENGTH of the current or last request.
    pub content_length: u64,
    /// How long the last finished request took.
    pub last_duration: Duration,
    /// Resident memory as last measured by the worker, in bytes.
    pub rss: u64,
    /// Connections held while the pool was saturated, waiting for room.
    pub held: u64,
}

/// The pool-wide figures the master publishes for the status page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Unix time the master started, in seconds.
    pub start_time: u64,
    /// Monotonic time the master started.
    pub started: Duration,
    /// 0 static, 1 dynamic, 2 ondemand.
    pub mode: u64,
    /// The configured maximum of workers.
    pub max_workers: u64,
    /// The current generation.
    pub generation: u64,
    /// Workers replaced after dying unexpectedly.
    pub respawns: u64,
    /// Crash-loop backoffs.
    pub backoffs: u64,
    /// Times the pool reached its maximum while requests waited.
    pub max_children_reached: u64,
    /// Requests that ran past `slow_request_timeout`.
    pub slow_requests: u64,
    /// Connections waiting in the kernel's accept queues at the last tick.
    pub listen_queue: u64,
    /// The most that ever waited.
    pub max_listen_queue: u64,
    /// The listen backlog.
    pub backlog: u64,
    /// The most workers ever busy at once.
    pub max_active: u64,
}

/// The table.
pub struct Scoreboard {
    mem: SharedWords,
    slots: usize,
}

impl Scoreboard {
    /// Maps a table of `slots` free slots. Call before forking.
    pub fn new(slots: usize) -> io::Result<Scoreboard> {
        let mem = SharedWords::new(words_for(slots))?;
        Ok(Scoreboard { mem, slots })
    }

    /// The table of `slots` slots behind an inherited memfd (an upgrade's previous master).
    pub(crate) fn from_fd(fd: std::os::fd::OwnedFd, slots: usize) -> io::Result<Scoreboard> {
        let mem = SharedWords::from_fd(fd, words_for(slots))?;
        Ok(Scoreboard { mem, slots })
    }

    /// The memfd behind the table, to pass on across an upgrade's exec.
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.mem.fd()
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots
    }

    /// Slot `index`. Panics on an index past the end: that is a bug in the master.
    pub fn slot(&self, index: usize) -> Slot<'_> {
        assert!(
            index < self.slots,
            "scoreboard slot {index} of {}",
            self.slots
        );
        let start = HEADER_WORDS + index * SLOT_WORDS;
        Slot {
            index,
            w: &self.mem.words()[start..start + SLOT_WORDS],
        }
    }

    /// The first free slot (master only: it alone claims slots).
    pub fn free_slot(&self) -> Option<usize> {
        (0..self.slots).find(|&i| self.slot(i).state() == SlotState::Free)
    }

    /// Every slot in use.
    pub fn snapshot(&self) -> Vec<SlotSnapshot> {
        (0..self.slots)
            .map(|i| self.slot(i))
            .filter(|s| s.state() != SlotState::Free)
            .map(|s| s.snapshot())
            .collect()
    }

    /// The master's pool-wide figures.
    pub fn stats(&self) -> PoolStats {
        let w = &self.mem.words()[H_STATS..H_STATS_END];
        let g = |i: usize| w[i].load(Ordering::Acquire);
        PoolStats {
            start_time: g(0),
            started: Duration::from_micros(g(1)),
            mode: g(2),
            max_workers: g(3),
            generation: g(4),
            respawns: g(5),
            backoffs: g(6),
            max_children_reached: g(7),
            slow_requests: g(8),
            listen_queue: g(9),
            max_listen_queue: g(10),
            backlog: g(11),
            max_active: g(12),
        }
    }

    /// Master: publishes the pool-wide figures.
    pub fn set_stats(&self, s: &PoolStats) {
        let w = &self.mem.words()[H_STATS..H_STATS_END];
        let values = [
            s.start_time,
            micros(s.started),
            s.mode,
            s.max_workers,
            s.generation,
            s.respawns,
            s.backoffs,
            s.max_children_reached,
            s.slow_requests,
            s.listen_queue,
            s.max_listen_queue,
            s.backlog,
            s.max_active,
        ];
        for (word, v) in w.iter().zip(values) {
            word.store(v, Ordering::Release);
        }
    }

    /// True when no worker has room for a request and the pool cannot grow: its maximum of
    /// workers is busy. (Below the maximum the master is about to start a worker with room.)
    pub fn saturated(&self) -> bool {
        let mut busy = 0;
        for i in 0..self.slots {
            match self.slot(i).state() {
                SlotState::Idle | SlotState::Starting => return false,
                SlotState::Busy => busy += 1,
                SlotState::Free | SlotState::Draining => {}
            }
        }
        busy > 0 && busy >= self.stats().max_workers
    }

    /// True when some worker other than the one in `slot` has room for a request.
    pub fn other_idle(&self, slot: usize) -> bool {
        (0..self.slots).any(|i| i != slot && self.slot(i).state() == SlotState::Idle)
    }

    /// True when some worker other than the one in `slot` has room for a request or is about
    /// to (idle or starting): a connection waiting in the kernel will be taken.
    pub fn other_ready(&self, slot: usize) -> bool {
        (0..self.slots).any(|i| {
            i != slot && matches!(self.slot(i).state(), SlotState::Idle | SlotState::Starting)
        })
    }

    /// Requests accepted by every worker since the table was made ("accepted conn").
    pub fn accepted(&self) -> u64 {
        self.mem.words()[H_ACCEPTED].load(Ordering::Relaxed)
    }

    /// Counts one accepted request.
    pub fn add_accepted(&self) {
        self.mem.words()[H_ACCEPTED].fetch_add(1, Ordering::Relaxed);
    }

    fn metric(&self, word: usize) -> &AtomicU64 {
        &self.mem.words()[H_METRICS + word]
    }

    /// Worker: a request the application answered with `status` after `duration`.
    pub fn add_request(&self, status: u16, duration: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.metric(M_CLASSES + class)
            .fetch_add(1, Ordering::Relaxed);
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&le| duration <= le)
            .unwrap_or(DURATION_BUCKETS.len());
        self.metric(M_BUCKETS + bucket)
            .fetch_add(1, Ordering::Relaxed);
        self.metric(M_DURATION_SUM)
            .fetch_add(micros(duration), Ordering::Relaxed);
    }

    /// Worker: one request turned away from its room queue.
    pub fn add_refused(&self, why: Refused) {
        let word = match why {
            Refused::QueueTimeout => M_QUEUE_TIMEOUTS,
            Refused::QueueFull => M_QUEUE_FULL,
            Refused::Abandoned => M_ABANDONED,
        };
        self.metric(word).fetch_add(1, Ordering::Relaxed);
    }

    /// The pool's request metrics since the table was made.
    pub fn metrics(&self) -> Metrics {
        let g = |word: usize| self.metric(word).load(Ordering::Relaxed);
        Metrics {
            queue_timeouts: g(M_QUEUE_TIMEOUTS),
            queue_full: g(M_QUEUE_FULL),
            abandoned: g(M_ABANDONED),
            classes: std::array::from_fn(|i| g(M_CLASSES + i)),
            buckets: std::array::from_fn(|i| g(M_BUCKETS + i)),
            duration_sum: Duration::from_micros(g(M_DURATION_SUM)),
        }
    }
}

/// Why a waiting request was answered without running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It waited `queue_timeout` for a room: answered 503.
    QueueTimeout,
    /// `max_queue` requests waited already: answered 503 at once.
    QueueFull,
    /// Its client went away while it waited: dropped, never run.
    Abandoned,
}

/// The pool's request counters, summed over every worker that ever ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Requests answered 503 after waiting `queue_timeout` for a room.
    pub queue_timeouts: u64,
    /// Requests answered 503 at once, `max_queue` requests waiting already.
    pub queue_full: u64,
    /// Waiting requests dropped unrun, their client gone.
    pub abandoned: u64,
    /// Requests the application answered, by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub classes: [u64; 5],
    /// Requests the application answered, by duration: one count per bucket of
    /// [`DURATION_BUCKETS`] (not cumulative), the last one past them all.
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
    /// Their durations added up.
    pub duration_sum: Duration,
}

/// One worker's slot.
#[derive(Clone, Copy)]
pub struct Slot<'a> {
    index: usize,
    w: &'a [AtomicU64],
}

impl Slot<'_> {
    fn get(&self, field: usize) -> u64 {
        self.w[field].load(Ordering::Acquire)
    }

    fn set(&self, field: usize, value: u64) {
        self.w[field].store(value, Ordering::Release);
    }

    /// Master, before the fork: a new worker of `generation`, Starting.
    pub fn reset(&self, generation: u64, now: Duration) {
        for field in [
            PID,
            REQUESTS,
            IN_FLIGHT,
            CONTENT_LENGTH,
            LAST_DURATION,
            RSS,
            TEXT_LENS,
            HELD,
        ] {
            self.set(field, 0);
        }
        self.set(GENERATION, generation);
        self.set(STARTED, micros(now));
        self.set(SINCE, micros(now));
        self.set(STATE, SlotState::Starting.code());
    }

    /// Records the worker's pid (the master after fork, the worker itself too).
    pub fn set_pid(&self, pid: i32) {
        self.set(PID, pid as u32 as u64);
    }

    /// Master, after reaping the worker: the slot is free again.
    pub fn free(&self) {
        self.set(STATE, SlotState::Free.code());
        self.set(PID, 0);
    }

    /// The worker's state.
    pub fn state(&self) -> SlotState {
        SlotState::from_code(self.get(STATE))
    }

    /// Changes the state (worker: Idle when ready, Draining when it stops accepting).
    pub fn set_state(&self, state: SlotState, now: Duration) {
        self.set(SINCE, micros(now));
        self.set(STATE, state.code());
    }

    /// When the worker entered its state (for Busy: when its current request started).
    pub fn since(&self) -> Duration {
        Duration::from_micros(self.get(SINCE))
    }

    /// Requests this worker has finished.
    pub fn requests(&self) -> u64 {
        self.get(REQUESTS)
    }

    /// Worker: a request starts.
    pub fn begin_request(
        &self,
        method: &str,
        uri: &str,
        content_length: u64,
        cap: u32,
        now: Duration,
    ) {
        let in_flight = self.w[IN_FLIGHT].fetch_add(1, Ordering::AcqRel) + 1;
        self.write_text(method, uri);
        self.set(CONTENT_LENGTH, content_length);
        self.set(SINCE, micros(now));
        if in_flight >= u64::from(cap) && self.state() != SlotState::Draining {
            self.set(STATE, SlotState::Busy.code());
        }
    }

    /// Worker (async service): one more request in flight beside the one the slot shows,
    /// which stays the oldest.
    pub fn join_request(&self, cap: u32) {
        let in_flight = self.w[IN_FLIGHT].fetch_add(1, Ordering::AcqRel) + 1;
        if in_flight >= u64::from(cap) && self.state() != SlotState::Draining {
            self.set(STATE, SlotState::Busy.code());
        }
    }

    /// Worker (async service): the oldest request still in flight, after the one shown ended.
    pub fn show_request(&self, method: &str, uri: &str, content_length: u64, since: Duration) {
        self.write_text(method, uri);
        self.set(CONTENT_LENGTH, content_length);
        self.set(SINCE, micros(since));
    }

    /// Worker (async service): its event loop is stuck. Busy, keeping the oldest request's
    /// start, so the master's request timeout applies to it as to a blocking worker.
    pub fn mark_stuck(&self) {
        if self.state() != SlotState::Draining {
            self.set(STATE, SlotState::Busy.code());
        }
    }

    /// Worker: a request ended after `duration`.
    pub fn end_request(&self, duration: Duration, cap: u32, now: Duration) {
        let before = self.w[IN_FLIGHT].fetch_sub(1, Ordering::AcqRel);
        self.w[REQUESTS].fetch_add(1, Ordering::AcqRel);
        self.set(LAST_DURATION, micros(duration));
        self.set(SINCE, micros(now));
        if before.saturating_sub(1) < u64::from(cap) && self.state() == SlotState::Busy {
            self.set(STATE, SlotState::Idle.code());
        }
    }

    /// Worker: one more (or one fewer) connection held while the pool is saturated.
    pub fn add_held(&self, delta: i64) {
        if delta >= 0 {
            self.w[HELD].fetch_add(delta as u64, Ordering::AcqRel);
        } else {
            self.w[HELD].fetch_sub(delta.unsigned_abs(), Ordering::AcqRel);
        }
    }

    /// Worker: its resident memory, in bytes.
    pub fn set_rss(&self, bytes: u64) {
        self.set(RSS, bytes);
    }

    fn write_text(&self, method: &str, uri: &str) {
        SLOT_TEXT.write(self.w, method, uri);
    }

    fn read_text(&self) -> (String, String) {
        SLOT_TEXT.read(self.w)
    }

    /// A copy of the slot.
    pub fn snapshot(&self) -> SlotSnapshot {
        let (method, uri) = self.read_text();
        SlotSnapshot {
            index: self.index,
            pid: self.get(PID) as u32 as i32,
            generation: self.get(GENERATION),
            state: self.state(),
            started: Duration::from_micros(self.get(STARTED)),
            since: Duration::from_micros(self.get(SINCE)),
            requests: self.get(REQUESTS),
            in_flight: self.get(IN_FLIGHT) as u32,
            method,
            uri,
            content_length: self.get(CONTENT_LENGTH),
            last_duration: Duration::from_micros(self.get(LAST_DURATION)),
            rss: self.get(RSS),
            held: self.get(HELD),
        }
    }
}

/// The table's words: the header, the workers' slots, then the tasks' ([`tasks`]).
fn words_for(slots: usize) -> usize {
    HEADER_WORDS + slots * SLOT_WORDS + tasks::TASK_WORDS
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The request's method and URI in a worker's slot.
const SLOT_TEXT: TextPair = TextPair {
    seq: SEQ,
    lens: TEXT_LENS,
    first: (METHOD, URI),
    second: (URI, SLOT_WORDS),
    max: (METHOD_BYTES, URI_BYTES),
};

/// Where two strings of a slot live, behind its sequence counter (the seqlock described at
/// the top): word indexes of the counter, of the packed lengths, and of each string's words,
/// with each string's byte limit.
pub(crate) struct TextPair {
    pub(crate) seq: usize,
    pub(crate) lens: usize,
    pub(crate) first: (usize, usize),
    pub(crate) second: (usize, usize),
    pub(crate) max: (usize, usize),
}

impl TextPair {
    /// Writer (the slot's one owner): both strings, cut to their limits on char boundaries.
    pub(crate) fn write(&self, w: &[AtomicU64], first: &str, second: &str) {
        let first = truncate(first, self.max.0);
        let second = truncate(second, self.max.1);
        let seq = w[self.seq].load(Ordering::Relaxed);
        w[self.seq].store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        pack(&w[self.first.0..self.first.1], first.as_bytes());
        pack(&w[self.second.0..self.second.1], second.as_bytes());
        w[self.lens].store(
            first.len() as u64 | (second.len() as u64) << 16,
            Ordering::Relaxed,
        );
        w[self.seq].store(seq.wrapping_add(2), Ordering::Release);
    }

    /// Any reader: a whole write, or two empty strings after [`SEQLOCK_RETRIES`] torn reads.
    pub(crate) fn read(&self, w: &[AtomicU64]) -> (String, String) {
        for _ in 0..SEQLOCK_RETRIES {
            let before = w[self.seq].load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let lens = w[self.lens].load(Ordering::Relaxed);
            let first = unpack(&w[self.first.0..self.first.1], (lens & 0xffff) as usize);
            let second = unpack(
                &w[self.second.0..self.second.1],
                (lens >> 16 & 0xffff) as usize,
            );
            fence(Ordering::Acquire);
            if w[self.seq].load(Ordering::Relaxed) == before {
                // Only whole writes are read, and they were cut on char boundaries.
                return (
                    String::from_utf8_lossy(&first).into_owned(),
                    String::from_utf8_lossy(&second).into_owned(),
                );
            }
        }
        (String::new(), String::new())
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn pack(words: &[AtomicU64], bytes: &[u8]) {
    for (word, chunk) in words.iter().zip(bytes.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        word.store(u64::from_le_bytes(b), Ordering::Relaxed);
    }
}

fn unpack(words: &[AtomicU64], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for word in words {
        if out.len() >= len {
            break;
        }
        out.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(100);

    #[test]
    fn a_request_round_trip() {
        let board = Scoreboard::new(2).expect("map");
        let slot = board.slot(1);
        slot.reset(3, T0);
        slot.set_pid(1234);
        assert_eq!(board.free_slot(), Some(0));
        slot.set_state(SlotState::Idle, T0);
        slot.begin_request("GET", "/hello?x=1", 7, 1, T0 + Duration::from_secs(1));
        let s = slot.snapshot();
        assert_eq!(
            (s.pid, s.generation, s.state, s.in_flight),
            (1234, 3, SlotState::Busy, 1)
        );
        assert_eq!(
            (s.method.as_str(), s.uri.as_str(), s.content_length),
            ("GET", "/hello?x=1", 7)
        );
        slot.end_request(Duration::from_millis(5), 1, T0 + Duration::from_secs(2));
        let s = slot.snapshot();
        assert_eq!((s.state, s.requests, s.in_flight), (SlotState::Idle, 1, 0));
        assert_eq!(s.last_duration, Duration::from_millis(5));
        assert_eq!(s.since, T0 + Duration::from_secs(2));
        assert_eq!(board.snapshot().len(), 1);
        slot.free();
        assert!(board.snapshot().is_empty());
    }

    #[test]
    fn a_busy_worker_below_its_cap_stays_idle() {
        let board = Scoreboard::new(1).expect("map");
        let slot = board.slot(0);
        slot.reset(1, T0);
        slot.set_state(SlotState::Idle, T0);
        slot.begin_request("GET", "/", 0, 2, T0);
        assert_eq!(slot.state(), SlotState::Idle);
        slot.begin_request("GET", "/", 0, 2, T0);
        assert_eq!(slot.state(), SlotState::Busy);
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary() {
        let board = Scoreboard::new(1).expect("map");
        let slot = board.slot(0);
        let uri = format!("/{}", "é".repeat(200));
        slot.begin_request("PROPPATCHLONGMETHOD", &uri, 0, 1, T0);
        let s = slot.snapshot();
        assert!(
            s.uri.len() <= URI_BYTES && s.uri.len() >= URI_BYTES - 1,
            "{}",
            s.uri.len()
        );
        assert!(uri.starts_with(&s.uri));
        assert_eq!(s.method, "PROPPATCHLONGMET");
    }

    #[test]
    fn request_metrics_land_in_their_class_and_bucket() {
        let board = Scoreboard::new(2).expect("map");
        board.add_request(200, Duration::from_millis(5));
        board.add_request(404, Duration::from_micros(5001));
        board.add_request(500, Duration::from_secs(11));
        board.add_request(101, Duration::ZERO);
        // A status past 5xx is counted as 5xx rather than lost.
        board.add_request(999, Duration::from_millis(300));
        board.add_refused(Refused::QueueFull);
        board.add_refused(Refused::Abandoned);
        board.add_refused(Refused::Abandoned);
        let m = board.metrics();
        assert_eq!(m.classes, [1, 1, 0, 1, 2]);
        let mut buckets = [0; DURATION_BUCKETS.len() + 1];
        buckets[0] = 2; // 0 and exactly 5 ms: `le` is inclusive
        buckets[1] = 1; // 5.001 ms
        buckets[6] = 1; // 300 ms, in the 500 ms bucket
        buckets[11] = 1; // past 10 s: +Inf
        assert_eq!(m.buckets, buckets);
        assert_eq!(
            m.duration_sum,
            Duration::from_micros(5000 + 5001 + 11_000_000 + 300_000)
        );
        assert_eq!((m.queue_timeouts, m.queue_full, m.abandoned), (0, 1, 2));
        // The counters live in the header: a slot freed and reused keeps them.
        board.slot(0).reset(1, T0);
        board.slot(0).free();
        assert_eq!(board.metrics(), m);
        assert_eq!(board.stats(), PoolStats::default());
    }

    // A forked worker's slot as the master sees it: `fork_checks.rs`, run by `tests/fork.rs`,
    // since no test here may fork inside the multi-threaded harness.

    #[test]
    fn readers_never_see_torn_text() {
        let board = std::sync::Arc::new(Scoreboard::new(1).expect("map"));
        let writer = {
            let board = std::sync::Arc::clone(&board);
            std::thread::spawn(move || {
                for i in 0..20_000 {
                    let (m, u) = if i % 2 == 0 {
                        ("GET", "/aaaaaaaaaaaaaaaaaaaaaaaa")
                    } else {
                        ("DELETE", "/bb")
                    };
                    board.slot(0).begin_request(m, u, 0, 1, T0);
                }
            })
        };
        for _ in 0..20_000 {
            let (m, u) = board.slot(0).read_text();
            assert!(
                matches!(
                    (m.as_str(), u.as_str()),
                    ("", "") | ("GET", "/aaaaaaaaaaaaaaaaaaaaaaaa") | ("DELETE", "/bb")
                ),
                "torn: {m} {u}"
            );
        }
        writer.join().expect("writer");
    }
}
