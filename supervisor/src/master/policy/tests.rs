//! Policy tests: every decision driven by a fake clock (`now` is a parameter).

use super::*;

const T: Duration = Duration::from_secs(1000);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn w(pid: i32, state: WorkerState, since: Duration) -> WorkerView {
    WorkerView {
        pid,
        state,
        started: Duration::ZERO,
        since,
        requests: 0,
        timeout_term_at: None,
    }
}

fn idle(n: i32) -> Vec<WorkerView> {
    (1..=n).map(|p| w(p, WorkerState::Idle, T)).collect()
}

fn cfg(mode: PoolMode) -> PoolConfig {
    PoolConfig {
        mode,
        workers: 10,
        start_workers: 3,
        min_spare: 2,
        max_spare: 4,
        max_spawn_rate: 8,
        idle_timeout: secs(10),
    }
}

#[test]
fn static_keeps_exactly_its_size() {
    let mut pool = Pool::new(cfg(PoolMode::Static));
    assert_eq!(pool.initial_workers(), 10);
    assert_eq!(pool.tick(&idle(10), 0, T), PoolPlan::default());
    assert_eq!(pool.tick(&idle(7), 0, T).spawn, 3, "the dead are replaced");
    let mut shrunk = cfg(PoolMode::Static);
    shrunk.workers = 8;
    pool.set_config(shrunk);
    let mut ws = idle(10);
    ws[0].state = WorkerState::Busy;
    assert_eq!(pool.tick(&ws, 0, T).stop.len(), 2);
}

#[test]
fn dynamic_spawn_rate_doubles_and_resets() {
    let mut c = cfg(PoolMode::Dynamic);
    c.min_spare = 8;
    c.workers = 40;
    c.max_spawn_rate = 4;
    let mut pool = Pool::new(c);
    assert_eq!(pool.initial_workers(), 3);
    let busy: Vec<_> = (1..=3).map(|p| w(p, WorkerState::Busy, T)).collect();
    let rates: Vec<usize> = (0..4).map(|_| pool.tick(&busy, 0, T).spawn).collect();
    assert_eq!(rates, [1, 2, 4, 4]);
    assert_eq!(pool.tick(&idle(8), 0, T).spawn, 0);
    assert_eq!(
        pool.tick(&busy, 0, T).spawn,
        1,
        "rate reset once nothing was needed"
    );
}

#[test]
fn dynamic_stops_excess_idle_longest_idle_first_never_busy() {
    let mut pool = Pool::new(cfg(PoolMode::Dynamic));
    let mut ws: Vec<_> = (1..=7)
        .map(|p| w(p, WorkerState::Idle, T + secs(p as u64)))
        .collect();
    ws.push(w(8, WorkerState::Busy, T));
    ws.push(w(9, WorkerState::Starting, T));
    let plan = pool.tick(&ws, 0, T + secs(100));
    assert_eq!(
        plan.stop,
        vec![1, 2, 3],
        "7 idle, max_spare 4: the 3 idle longest go"
    );
}

#[test]
fn dynamic_serves_a_burst_within_a_few_ticks_and_never_exceeds_the_maximum() {
    let mut pool = Pool::new(cfg(PoolMode::Dynamic));
    let mut ws: Vec<_> = (1..=3).map(|p| w(p, WorkerState::Busy, T)).collect();
    let mut ticks = 0;
    while ws.len() < 10 {
        let plan = pool.tick(&ws, 20, T);
        assert!(plan.spawn > 0);
        // New workers are busy at once with the waiting requests.
        for _ in 0..plan.spawn {
            ws.push(w(ws.len() as i32 + 1, WorkerState::Busy, T));
        }
        assert!(ws.len() <= 10);
        ticks += 1;
    }
    assert!(ticks <= 2, "grew to the maximum in {ticks} ticks");
    let plan = pool.tick(&ws, 20, T);
    assert_eq!(plan.spawn, 0);
    assert_eq!(
        plan.max_reached,
        Some(MaxReached {
            workers: 10,
            waiting: 20
        })
    );
    assert_eq!(pool.tick(&ws, 20, T).max_reached, None, "once per episode");
    pool.tick(&ws, 0, T);
    assert!(
        pool.tick(&ws, 5, T).max_reached.is_some(),
        "a new episode is reported again"
    );
}

#[test]
fn a_pool_replacing_a_worker_is_not_at_its_maximum() {
    let mut pool = Pool::new(cfg(PoolMode::Static));
    let mut ws: Vec<_> = (1..=10).map(|p| w(p, WorkerState::Busy, T)).collect();
    ws[0].state = WorkerState::Starting;
    assert_eq!(
        pool.tick(&ws, 3, T).max_reached,
        None,
        "the new worker takes one"
    );
    ws[0].state = WorkerState::Busy;
    assert!(pool.tick(&ws, 3, T).max_reached.is_some());
}

#[test]
fn waiting_requests_with_no_worker_to_take_them_start_one_worker_each_at_once() {
    // Start 1, max 8: the one worker busy, 5 more requests waiting.
    let mut c = cfg(PoolMode::Dynamic);
    c.workers = 8;
    c.min_spare = 1;
    c.max_spare = 1;
    let mut pool = Pool::new(c.clone());
    let one_busy = [w(1, WorkerState::Busy, T)];
    assert_eq!(
        pool.tick(&one_busy, 5, T).spawn,
        5,
        "not 1, 2, 4 over three ticks"
    );
    let mut ws: Vec<_> = (1..=3).map(|p| w(p, WorkerState::Busy, T)).collect();
    assert_eq!(pool.tick(&ws, 20, T).spawn, 5, "bounded by the maximum");
    ws.push(w(4, WorkerState::Starting, T));
    assert_eq!(
        pool.tick(&ws, 20, T).spawn,
        0,
        "a starting worker takes the next one; it says so when it is busy too"
    );
    let mut slow = c.clone();
    slow.max_spawn_rate = 2;
    let mut pool = Pool::new(slow);
    assert_eq!(
        pool.tick(&one_busy, 5, T).spawn,
        2,
        "bounded by max_spawn_rate"
    );

    let mut ondemand = c;
    ondemand.mode = PoolMode::OnDemand;
    let mut pool = Pool::new(ondemand);
    assert_eq!(pool.tick(&[], 4, T).spawn, 4, "from empty, all at once");
    assert_eq!(pool.tick(&one_busy, 3, T).spawn, 3);
    assert_eq!(
        pool.tick(&[w(1, WorkerState::Idle, T)], 3, T).spawn,
        0,
        "an idle worker is about to accept"
    );
}

#[test]
fn ondemand_starts_empty_spawns_on_waiting_and_reaps_idle() {
    let mut pool = Pool::new(cfg(PoolMode::OnDemand));
    assert_eq!(pool.initial_workers(), 0);
    assert_eq!(pool.tick(&[], 0, T).spawn, 0);
    assert_eq!(pool.tick(&[], 1, T).spawn, 1);
    let starting = vec![w(1, WorkerState::Starting, T)];
    assert_eq!(
        pool.tick(&starting, 1, T).spawn,
        0,
        "a starting worker will take it"
    );
    let ws = vec![w(1, WorkerState::Idle, T)];
    assert!(pool.tick(&ws, 0, T + secs(9)).stop.is_empty());
    assert_eq!(pool.tick(&ws, 0, T + secs(10)).stop, vec![1]);
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A worker that died before it became ready, after `lifetime`.
fn never_ready(lifetime: Duration) -> Death {
    Death {
        lifetime,
        ready: false,
        served: false,
    }
}

/// A worker that became ready and took a request (a crash in it, a kill during it).
fn served(lifetime: Duration) -> Death {
    Death {
        lifetime,
        ready: true,
        served: true,
    }
}

/// A worker that became ready but never took a request.
fn ready_unused(lifetime: Duration) -> Death {
    Death {
        lifetime,
        ready: true,
        served: false,
    }
}

#[test]
fn one_old_death_respawns_at_once() {
    let mut r = Respawn::new();
    assert_eq!(r.on_crash(ready_unused(secs(60)), T), None);
    assert_eq!(r.hold_until(T), None);
}

#[test]
fn which_deaths_count() {
    assert!(never_ready(ms(5)).counts());
    assert!(
        never_ready(secs(60)).counts(),
        "a slow init that fails is still a worker that cannot start"
    );
    assert!(ready_unused(YOUNG_DEATH - ms(1)).counts());
    assert!(!ready_unused(YOUNG_DEATH).counts());
    assert!(!served(ms(1)).counts(), "a crash in a request");
    assert!(!served(secs(60)).counts());
}

#[test]
fn crash_loop_backs_off_exponentially_up_to_the_cap() {
    let mut r = Respawn::new();
    assert_eq!(
        r.on_crash(never_ready(ms(5)), T),
        None,
        "the first counted death is free"
    );
    let mut delays = Vec::new();
    for _ in 0..12 {
        delays.push(r.on_crash(never_ready(ms(5)), T).expect("backoff"));
    }
    assert_eq!(&delays[..4], &[100, 200, 400, 800].map(ms));
    assert_eq!(*delays.last().expect("12 delays"), BACKOFF_MAX);
    assert_eq!(r.hold_until(T), Some(T + BACKOFF_MAX));
    r.on_healthy();
    assert_eq!(r.hold_until(T), None);
    assert_eq!(r.on_crash(never_ready(ms(5)), T), None);
}

#[test]
fn a_storm_of_deaths_in_requests_never_holds_back() {
    // A client crashing a worker with every request, 2 ms after each spawn, for 5 s.
    let mut r = Respawn::new();
    let mut now = T;
    while now < T + secs(5) {
        now += ms(2);
        assert_eq!(r.on_crash(served(ms(2)), now), None);
        assert_eq!(r.hold_until(now), None, "held at {:?}", now - T);
    }
}

#[test]
fn a_death_after_serving_ends_a_crash_loop() {
    let mut r = Respawn::new();
    for _ in 0..5 {
        r.on_crash(never_ready(ms(5)), T);
    }
    assert!(r.hold_until(T).is_some());
    assert_eq!(r.on_crash(served(ms(5)), T), None);
    assert_eq!(
        r.hold_until(T),
        None,
        "that worker proved workers start and serve"
    );
    assert_eq!(
        r.on_crash(never_ready(ms(5)), T),
        None,
        "a new loop starts from the free death"
    );
}

/// Spawns a worker whenever the backoff allows for 5 simulated seconds; each one lives 1 ms
/// and dies as `death` says, with a maintenance pass (the healthy check) between. Returns
/// how many were spawned.
fn spawns_in_five_seconds(death: impl Fn(Duration) -> Death, state_when_up: WorkerState) -> u32 {
    let mut r = Respawn::new();
    let mut now = T;
    let end = T + secs(5);
    let mut spawns = 0;
    while now < end {
        if let Some(t) = r.hold_until(now) {
            now = t;
            continue;
        }
        spawns += 1;
        let started = now;
        now += ms(1);
        let up = WorkerView {
            started,
            ..w(1, state_when_up, started)
        };
        if any_healthy(&[up], now) {
            r.on_healthy();
        }
        r.on_crash(death(ms(1)), now);
    }
    spawns
}

#[test]
fn crash_loop_spawns_stay_few() {
    let spawns = spawns_in_five_seconds(never_ready, WorkerState::Starting);
    assert!(spawns < 20, "{spawns} spawns of workers that never start");
}

#[test]
fn workers_that_die_right_after_becoming_ready_do_not_spin() {
    // Ready (idle, seen by a maintenance pass), then dead 1 ms later without a request: a
    // background thread crashing each one. Readiness alone must not end the loop.
    let spawns = spawns_in_five_seconds(ready_unused, WorkerState::Idle);
    assert!(
        spawns < 20,
        "{spawns} spawns of workers that die once ready"
    );
}

#[test]
fn a_worker_that_answers_its_own_timeouts_is_ended_only_past_the_margin() {
    let ws = vec![w(1, WorkerState::Busy, T)];
    let ms = Duration::from_millis;
    let blocking = ending_age(secs(5), false);
    let own = ending_age(secs(5), true);
    assert_eq!((blocking, own), (secs(5), secs(5) + SELF_TIMED_MARGIN));
    // 5.2 s in: a blocking worker's thread is stuck, ended; an event loop answering a few
    // milliseconds late is left to it.
    assert_eq!(
        request_timeouts(&ws, blocking, secs(2), T + ms(5200)).len(),
        1
    );
    assert!(request_timeouts(&ws, own, secs(2), T + ms(5200)).is_empty());
    // Past the margin the loop did not answer (its watchdog marks the slot busy well before
    // then): ended as any worker.
    assert_eq!(
        request_timeouts(&ws, own, secs(2), T + ms(6100)),
        vec![TimeoutAction::Term {
            pid: 1,
            elapsed: ms(6100)
        }]
    );
}

#[test]
fn timeouts_term_once_then_kill_after_grace() {
    let mut ws = vec![w(1, WorkerState::Busy, T), w(2, WorkerState::Idle, T)];
    let grace = secs(2);
    assert!(request_timeouts(&ws, secs(30), grace, T + secs(30)).is_empty());
    assert_eq!(
        request_timeouts(&ws, secs(30), grace, T + secs(31)),
        vec![TimeoutAction::Term {
            pid: 1,
            elapsed: secs(31)
        }]
    );
    ws[0].timeout_term_at = Some(T + secs(31));
    assert!(request_timeouts(&ws, secs(30), grace, T + secs(32)).is_empty());
    assert_eq!(
        request_timeouts(&ws, secs(30), grace, T + secs(33)),
        vec![TimeoutAction::Kill {
            pid: 1,
            elapsed: secs(33)
        }]
    );
}

#[test]
fn slow_requests_are_reported_once_each() {
    let mut log = SlowLog::default();
    let ws = vec![w(1, WorkerState::Busy, T)];
    assert!(log.check(&ws, secs(5), T + secs(5)).is_empty());
    assert_eq!(log.check(&ws, secs(5), T + secs(6)), vec![(1, secs(6))]);
    assert!(log.check(&ws, secs(5), T + secs(7)).is_empty());
    let next = vec![w(1, WorkerState::Busy, T + secs(10))];
    assert_eq!(log.check(&next, secs(5), T + secs(16)), vec![(1, secs(6))]);
}

#[test]
fn grow_adds_one_until_half_the_scoreboard() {
    let small = PoolConfig {
        workers: 2,
        ..cfg(PoolMode::Dynamic)
    };
    let grown = resize(&small, Resize::Grow, 8).expect("3 of 8 slots fits");
    assert_eq!(grown.workers, 3);
    let grown = resize(&grown, Resize::Grow, 8);
    assert_eq!(
        grown,
        Err(BoardFull {
            workers: 3,
            slots: 8
        }),
        "4 workers would leave no room for a reload beside them"
    );
}

#[test]
fn grow_keeps_spare_and_start_counts() {
    let grown = resize(&cfg(PoolMode::Dynamic), Resize::Grow, 256).expect("fits");
    assert_eq!(
        (
            grown.workers,
            grown.start_workers,
            grown.min_spare,
            grown.max_spare
        ),
        (11, 3, 2, 4)
    );
}

#[test]
fn shrink_clamps_spare_and_start_counts_and_stops_at_one() {
    let mut pool = cfg(PoolMode::Dynamic);
    let mut sizes = Vec::new();
    for _ in 0..11 {
        pool = resize(&pool, Resize::Shrink, 0).expect("shrinking never needs slots");
        assert!(pool.min_spare <= pool.workers && pool.max_spare <= pool.workers);
        assert!(pool.start_workers <= pool.workers);
        sizes.push(pool.workers);
    }
    assert_eq!(sizes, [9, 8, 7, 6, 5, 4, 3, 2, 1, 1, 1]);
    assert_eq!(
        (pool.start_workers, pool.min_spare, pool.max_spare),
        (1, 1, 1)
    );
    assert_eq!(pool.mode, PoolMode::Dynamic);
    assert_eq!(pool.max_spawn_rate, 8, "what resizing does not touch stays");
}

#[test]
fn healthy_once_a_running_worker_serves_or_outlives_a_young_death() {
    let started = |state, at| WorkerView {
        started: at,
        ..w(1, state, at)
    };
    let young = [started(WorkerState::Idle, T)];
    assert!(!any_healthy(
        &young,
        T + YOUNG_DEATH - Duration::from_millis(1)
    ));
    assert!(any_healthy(&young, T + YOUNG_DEATH));
    let stuck = [started(WorkerState::Starting, T)];
    assert!(
        !any_healthy(&stuck, T + secs(60)),
        "a worker that never got past starting proves nothing"
    );
    assert!(
        any_healthy(&[started(WorkerState::Busy, T)], T + ms(1)),
        "a worker serving a request is up"
    );
    let served_one = WorkerView {
        requests: 1,
        ..started(WorkerState::Idle, T)
    };
    assert!(any_healthy(&[served_one], T + ms(1)));
    assert!(!any_healthy(&[], T + secs(60)));
}

#[test]
fn listeners_are_watched_only_when_a_pool_could_start_a_worker_for_a_connection() {
    let busy = [w(1, WorkerState::Busy, T)];
    let dynamic = cfg(PoolMode::Dynamic);
    assert!(watch_listeners(&dynamic, &busy, 0));
    assert!(watch_listeners(&cfg(PoolMode::OnDemand), &[], 0));
    assert!(
        !watch_listeners(&cfg(PoolMode::Static), &busy, 0),
        "static is always full"
    );
    assert!(
        !watch_listeners(&dynamic, &busy, 1),
        "a worker is starting this tick"
    );
    for ready in [WorkerState::Idle, WorkerState::Starting] {
        let ws = [w(1, WorkerState::Busy, T), w(2, ready, T)];
        assert!(!watch_listeners(&dynamic, &ws, 0), "{ready:?} takes it");
    }
    let full: Vec<WorkerView> = (1..=10).map(|p| w(p, WorkerState::Busy, T)).collect();
    assert!(!watch_listeners(&dynamic, &full, 0), "no room for one more");
}

#[test]
fn a_reload_is_ready_when_the_pool_serves_and_late_after_reload_slow() {
    let ws = [
        w(1, WorkerState::Idle, T),
        w(2, WorkerState::Busy, T),
        w(3, WorkerState::Starting, T),
        w(4, WorkerState::Draining, T),
    ];
    assert_eq!(ready_workers(&ws), 2);
    assert_eq!(reload_progress(2, 2, T, T), ReloadProgress::Ready);
    assert_eq!(
        reload_progress(1, 2, T, T + secs(1)),
        ReloadProgress::Waiting
    );
    assert_eq!(
        reload_progress(1, 2, T, T + RELOAD_SLOW - Duration::from_millis(1)),
        ReloadProgress::Waiting
    );
    assert_eq!(
        reload_progress(1, 2, T, T + RELOAD_SLOW),
        ReloadProgress::Late
    );
    assert_eq!(
        reload_progress(0, 0, T, T + RELOAD_SLOW),
        ReloadProgress::Ready,
        "ondemand starts no worker: nothing to wait for"
    );
}
