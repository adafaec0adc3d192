//! Limits hit by peers are logged once per episode, not once per connection: a scanner that
//! opens 500 connections must cost the operator two log lines (one when it starts, one with the
//! count when it is over), not 500.
//!
//! An episode starts at the first hit and ends once [`EPISODE_QUIET`] has passed without
//! another. [`Tally`] is the pure rule, with time as a parameter; [`Episode`] wraps it for the
//! worker and logs the end from a task on the worker's runtime.

use std::sync::Mutex;
use std::time::Duration;

/// How long without a hit ends an episode: longer than the gaps of a client retrying in a
/// loop (so one storm is one episode), short enough that the count arrives while the operator
/// is still looking.
pub(crate) const EPISODE_QUIET: Duration = Duration::from_secs(10);

/// The hits of one kind of limit, counted per episode.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Hits in the episode under way; 0 when none is.
    count: u64,
    /// When the last hit came.
    last: Duration,
}

impl Tally {
    /// Counts a hit at `now`; true when it starts an episode (log it).
    pub(crate) fn hit(&mut self, now: Duration) -> bool {
        self.count += 1;
        self.last = now;
        self.count == 1
    }

    /// At `now`: `Ok(count)` when the episode is over (it is then closed), else how much
    /// longer to wait before asking again.
    pub(crate) fn end_if_quiet(&mut self, now: Duration) -> Result<u64, Duration> {
        let quiet = now.saturating_sub(self.last);
        if quiet >= EPISODE_QUIET {
            Ok(std::mem::take(&mut self.count))
        } else {
            Err(EPISODE_QUIET - quiet)
        }
    }
}

/// One kind of limit, as the worker counts it.
#[derive(Debug, Default)]
pub(crate) struct Episode {
    tally: Mutex<Tally>,
}

impl Episode {
    /// Counts a hit; at the first of an episode calls `first` (the warning, with the numbers
    /// that explain it) and, from inside the runtime, schedules `over` with the episode's count
    /// once it is quiet again.
    pub(crate) fn hit(
        &'static self,
        first: impl FnOnce(),
        over: impl FnOnce(u64) + Send + 'static,
    ) {
        let starts = match self.tally.lock() {
            Ok(mut t) => t.hit(crate::clock::now()),
            Err(_) => return,
        };
        if !starts {
            return;
        }
        first();
        tokio::spawn(async move {
            let mut wait = EPISODE_QUIET;
            loop {
                tokio::time::sleep(wait).await;
                let ended = match self.tally.lock() {
                    Ok(mut t) => t.end_if_quiet(crate::clock::now()),
                    Err(_) => return,
                };
                match ended {
                    Ok(count) => return over(count),
                    Err(more) => wait = more,
                }
            }
        });
    }
}

/// The limits a worker logs by episode. Static: one set per process, reached from wherever a
/// limit is hit without threading a handle through.
pub(crate) struct Episodes {
    /// Connections closed for not sending a complete request in `request_read_timeout`.
    pub read_timeout: Episode,
    /// Requests answered 431: params over the limit.
    pub rejected: Episode,
    /// Accepts that failed for want of a descriptor.
    pub fds: Episode,
    /// Times the accept loop stopped at `max_connections`.
    pub conn_cap: Episode,
    /// Connections closed at accept: the peer is not in `allowed_clients`.
    pub not_allowed: Episode,
    /// Requests answered 503 after waiting `queue_timeout`.
    pub queue_timeout: Episode,
    /// Requests answered 503 at once: `max_queue` wait already.
    pub queue_full: Episode,
    /// Waiting requests dropped unrun: their client left.
    pub abandoned: Episode,
}

/// This process's episodes.
pub(crate) static EPISODES: Episodes = Episodes {
    read_timeout: Episode::new(),
    rejected: Episode::new(),
    fds: Episode::new(),
    conn_cap: Episode::new(),
    not_allowed: Episode::new(),
    queue_timeout: Episode::new(),
    queue_full: Episode::new(),
    abandoned: Episode::new(),
};

impl Episode {
    const fn new() -> Episode {
        Episode {
            tally: Mutex::new(Tally {
                count: 0,
                last: Duration::ZERO,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_storm_is_one_episode_and_its_end_carries_the_count() {
        let mut t = Tally::default();
        assert!(t.hit(S), "the first hit starts an episode");
        for i in 2..=500u32 {
            assert!(
                !t.hit(S + Duration::from_millis(u64::from(i))),
                "hit {i} is counted"
            );
        }
        let last = S + Duration::from_millis(500);
        assert_eq!(t.end_if_quiet(last + S), Err(EPISODE_QUIET - S));
        assert_eq!(t.end_if_quiet(last + EPISODE_QUIET), Ok(500));
        assert!(
            t.hit(last + EPISODE_QUIET + S),
            "after the quiet, a new episode"
        );
    }

    #[test]
    fn hits_closer_than_the_quiet_keep_the_episode_open() {
        let mut t = Tally::default();
        assert!(t.hit(Duration::ZERO));
        let step = EPISODE_QUIET - S;
        for i in 1..5u32 {
            let now = step * i;
            assert!(t.end_if_quiet(now).is_err());
            assert!(!t.hit(now), "still the same episode at {now:?}");
        }
        assert_eq!(t.end_if_quiet(step * 4 + EPISODE_QUIET), Ok(5));
    }
}
