//! Pool policies: pure functions of a scoreboard snapshot and `now`.
//!
//! Time is a `Duration` on the monotonic clock (`CLOCK_MONOTONIC`, shared by all processes),
//! so tests pass any value they like: that is the fake clock.

use std::time::Duration;

/// How the pool is sized, like PHP-FPM's `pm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Exactly `workers` processes.
    Static,
    /// Between `min_spare` and `max_spare` idle workers, at most `workers` in all.
    Dynamic,
    /// None until requests arrive; idle workers are reaped after `idle_timeout`.
    OnDemand,
}

/// The validated pool settings the policies read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Process manager mode.
    pub mode: PoolMode,
    /// The maximum number of workers (the exact number for `static`).
    pub workers: usize,
    /// Workers started at boot (`dynamic` only).
    pub start_workers: usize,
    /// Spawn when fewer idle workers than this (`dynamic`).
    pub min_spare: usize,
    /// Stop idle workers above this many (`dynamic`).
    pub max_spare: usize,
    /// Upper bound of the doubling spawn rate per tick (default 32, like PHP-FPM).
    pub max_spawn_rate: usize,
    /// `ondemand`: reap a worker idle longer than this.
    pub idle_timeout: Duration,
}
