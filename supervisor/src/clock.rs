//! Time and memory as every process of the pool reads them: the monotonic clock the
//! scoreboard and the policies share, and this process's resident memory.

use std::time::Duration;

/// The monotonic clock every process shares (`CLOCK_MONOTONIC`): the scoreboard's and the
/// policies' time.
pub(crate) fn now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default()
}

/// This process's resident set size in bytes, from `/proc/self/statm`.
pub(crate) fn self_rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    Some(pages * page as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_and_rss() {
        assert!(now() > Duration::ZERO);
        assert!(self_rss().is_some_and(|r| r > 0));
    }
}
