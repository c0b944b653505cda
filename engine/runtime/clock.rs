//! The time, read once per turn of a worker's event loop.
//!
//! A small request read the clock about seventeen times (deadlines armed and
//! disarmed, the pool's idle ages, the record's start and end, the health
//! cooldown's wall-clock milliseconds), each a `clock_gettime`. A turn (the
//! runtime collects completions, then runs every task they woke) serves about
//! ten requests under load, so the worker reads the clock when a turn starts
//! and everything in that turn uses that reading: a deadline or a duration is
//! off by at most the turn's own run time (microseconds), far inside the
//! deadline wheel's 100 ms tick. What is reported as a measurement still
//! reads the clock itself: Ringway's own time on a request
//! (`ringway_overhead_seconds`, intervals shorter than a turn), and the
//! durations that start from those exact readings (the request's duration,
//! the upstream's time, time to first token), which a turn-clock end would
//! under-report by up to a turn.
//!
//! Wall time (Unix milliseconds: limit windows, health and key cooldowns) is
//! read from the real-time clock at the same moment, not extrapolated from the
//! monotonic one: the two drift apart when the system clock is stepped or
//! slewed (a virtual machine resumed, NTP correcting), and limit windows must
//! agree with other replicas and Redis. (With an offset refreshed once a
//! second, one full e2e run under load had two limit tests see Ringway's wall
//! time 4–5 ms, and once about 15 s, behind the client's: requests counted in
//! the wrong window.) Threads without a runtime hook (control, admin, tests)
//! read the clocks directly.

use std::{
    cell::Cell,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

#[derive(Clone, Copy)]
struct Turn {
    now: Instant,
    wall_ms: u64,
}

thread_local! {
    static TURN: Cell<Option<Turn>> = const { Cell::new(None) };
}

/// Makes this thread's runtime read the clock once per turn (see the module).
pub fn install() {
    turn_started();
    monoio::set_turn_hook(Some(turn_started));
}

/// The runtime's turn hook.
fn turn_started() {
    TURN.set(Some(Turn {
        now: Instant::now(),
        wall_ms: since_epoch().as_millis() as u64,
    }));
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The monotonic time at the start of this turn.
pub fn now() -> Instant {
    TURN.get().map_or_else(Instant::now, |t| t.now)
}

/// Milliseconds since the Unix epoch, at the start of this turn.
pub fn wall_ms() -> u64 {
    TURN.get()
        .map_or_else(|| since_epoch().as_millis() as u64, |t| t.wall_ms)
}

/// Time passed since `t`, by this turn's clock.
pub fn since(t: Instant) -> Duration {
    now().saturating_duration_since(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the hook every call reads the clocks; with it, readings hold within a turn
    /// and move at the next one, and wall time is the real-time clock's.
    #[test]
    fn readings_hold_for_a_turn() {
        let a = now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(now() > a, "no hook: the clock is read each time");
        let std_wall = since_epoch().as_millis() as u64;
        assert!(wall_ms().abs_diff(std_wall) < 50);

        turn_started();
        let t = now();
        let w = wall_ms();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(now(), t, "one reading per turn");
        assert_eq!(wall_ms(), w);
        assert!(since(t) == Duration::ZERO);
        turn_started();
        assert!(now() >= t + Duration::from_millis(5));
        assert!(wall_ms() >= w + 5);
        let real = since_epoch().as_millis() as u64;
        assert!(
            wall_ms().abs_diff(real) < 50,
            "wall {} real {real}",
            wall_ms()
        );
        TURN.set(None);
    }

    /// Installed on a runtime, the reading moves at every turn: a task that slept sees
    /// the time after its sleep, not the time the worker started.
    #[test]
    fn the_runtime_calls_the_hook_each_turn() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            install();
            let (t, w) = (now(), wall_ms());
            monoio::time::sleep(Duration::from_millis(20)).await;
            assert!(since(t) >= Duration::from_millis(20), "{:?}", since(t));
            assert!(wall_ms() >= w + 20);
            assert!(
                now().elapsed() < Duration::from_millis(20),
                "read when the turn began"
            );
        });
        monoio::set_turn_hook(None);
        TURN.set(None);
    }
}
