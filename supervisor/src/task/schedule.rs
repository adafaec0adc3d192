//! When a task's next run starts, on the host's monotonic clock (without a lease; with one the
//! database computes the same rule on its own clock, see `lease`), and the standby's jitter.

use std::time::Duration;

use crate::config::TaskMode;

/// A finished run, on the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: Duration,
    pub end: Duration,
}

/// How long to wait at `now` before the next run. `interval`: `interval` after the last run
/// ended; `loop`: at once, or `interval` after the last run started if that is later.
pub(crate) fn wait_before_next(
    mode: TaskMode,
    interval: Duration,
    last: Option<Run>,
    now: Duration,
) -> Duration {
    let Some(last) = last else {
        return Duration::ZERO;
    };
    let due = match mode {
        TaskMode::Interval => last.end + interval,
        TaskMode::Loop => (last.start + interval).max(last.end),
    };
    due.saturating_sub(now)
}

/// `base` spread by half either way, from `seed` (any number that differs between hosts and
/// tries): standbys of several hosts do not retry in step.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn jittered(base: Duration, seed: u64) -> Duration {
    // splitmix64: a good spread from consecutive seeds.
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let permille = z % 1000;
    base / 2 + base * permille as u32 / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn interval_counts_from_the_end_of_the_last_run() {
        let last = Some(Run {
            start: S(10),
            end: S(13),
        });
        assert_eq!(
            wait_before_next(TaskMode::Interval, S(5), None, S(10)),
            Duration::ZERO
        );
        assert_eq!(
            wait_before_next(TaskMode::Interval, S(5), last, S(13)),
            S(5)
        );
        assert_eq!(
            wait_before_next(TaskMode::Interval, S(5), last, S(17)),
            S(1)
        );
        assert_eq!(
            wait_before_next(TaskMode::Interval, S(5), last, S(30)),
            Duration::ZERO
        );
    }

    #[test]
    fn loop_spaces_starts_but_never_overlaps() {
        let short = Some(Run {
            start: S(10),
            end: S(11),
        });
        assert_eq!(wait_before_next(TaskMode::Loop, S(5), short, S(11)), S(4));
        let long = Some(Run {
            start: S(10),
            end: S(20),
        });
        assert_eq!(
            wait_before_next(TaskMode::Loop, S(5), long, S(20)),
            Duration::ZERO,
            "a run longer than the spacing is followed at once"
        );
        assert_eq!(
            wait_before_next(TaskMode::Loop, Duration::ZERO, short, S(11)),
            Duration::ZERO
        );
    }

    #[test]
    fn jitter_stays_within_half_either_way_and_spreads() {
        let base = Duration::from_millis(1000);
        let picks: Vec<Duration> = (0..200).map(|seed| jittered(base, seed)).collect();
        assert!(picks.iter().all(|d| *d >= base / 2 && *d < base * 3 / 2));
        let low = picks.iter().filter(|d| **d < base).count();
        assert!((60..140).contains(&low), "{low} of 200 below the base");
    }
}
