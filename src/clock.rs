//! Clock reads for bookkeeping that needs milliseconds, not nanoseconds.
//!
//! A fine read (`Instant::now`, `CLOCK_MONOTONIC`) goes through the paravirtual clock and
//! `rdtsc`: about 29 ns on the benchmark VM, and a proxied request made twelve of them. The
//! kernel's coarse clocks (`CLOCK_MONOTONIC_COARSE`, `CLOCK_REALTIME_COARSE`) return its last
//! tick, at most one tick (1–4 ms) behind, for about 7 ns — as NGINX's cached time does.
//! Timeouts, idle stamps, pool expiry and the `Date` field read the coarse clocks; latencies
//! (time to the response head, first token, per token, the request's duration) keep the fine
//! one.

use std::time::Instant;

/// Now, to within one kernel tick (never ahead of `Instant::now()`), as an [`Instant`] so it
/// mixes with fine readings: for deadlines and idle stamps measured in seconds.
#[cfg(target_os = "linux")]
pub fn coarse() -> Instant {
    use std::cell::Cell;
    use std::sync::OnceLock;
    use std::time::Duration;

    // The coarse clock moves once a tick, and a request reads it about five times: within a
    // tick the thread's last mapping onto `Instant` is reused (the mapping, an `Instant`
    // addition std does not inline, cost more than the reading: ~35 of ~70 instructions).
    thread_local! {
        static LAST: Cell<Option<(libc::time_t, libc::c_long, Instant)>> = const { Cell::new(None) };
    }
    let ts = raw(libc::CLOCK_MONOTONIC_COARSE);
    if let Some((sec, nsec, at)) = LAST.get()
        && sec == ts.tv_sec
        && nsec == ts.tv_nsec
    {
        return at;
    }
    // `Instant` is `CLOCK_MONOTONIC` on Linux, and the coarse clock counts the same time:
    // one fine reading taken beside a raw one maps every later coarse reading onto `Instant`.
    static BASE: OnceLock<(Instant, Duration)> = OnceLock::new();
    let (base, base_raw) = *BASE.get_or_init(|| {
        let at = Instant::now();
        (at, duration(raw(libc::CLOCK_MONOTONIC)))
    });
    // A coarse reading in the tick the base was taken in may be behind it: the base then.
    let at = base + duration(ts).saturating_sub(base_raw);
    LAST.set(Some((ts.tv_sec, ts.tv_nsec, at)));
    at
}

#[cfg(not(target_os = "linux"))]
pub fn coarse() -> Instant {
    Instant::now()
}

/// Seconds since the Unix epoch, to within one kernel tick: for the `Date` field.
#[cfg(target_os = "linux")]
pub fn unix_secs() -> u64 {
    u64::try_from(raw(libc::CLOCK_REALTIME_COARSE).tv_sec).unwrap_or(0)
}

#[cfg(not(target_os = "linux"))]
pub fn unix_secs() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(target_os = "linux")]
fn raw(clock: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock ids are constants this kernel
    // has had since 2.6.32, so the call cannot fail (it would leave `ts` at zero).
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts
}

#[cfg(target_os = "linux")]
fn duration(ts: libc::timespec) -> std::time::Duration {
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    #[test]
    fn coarse_readings_stay_within_a_tick_of_the_fine_clock_and_never_go_back() {
        let mut last = coarse();
        for _ in 0..2_000 {
            let before = Instant::now();
            let c = coarse();
            let after = Instant::now();
            assert!(c >= last, "the coarse clock went back");
            // Not ahead of a fine reading taken after it (beyond the base's own ~100 ns gap),
            // and not behind one taken before it by more than a tick at HZ=100.
            assert!(
                c <= after + Duration::from_micros(1),
                "coarse reading ahead of the fine clock"
            );
            assert!(
                before.saturating_duration_since(c) <= Duration::from_millis(11),
                "coarse reading a tick behind"
            );
            last = c;
        }
    }

    #[test]
    fn unix_seconds_agree_with_the_system_clock() {
        let fine = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let coarse = unix_secs();
        assert!(coarse.abs_diff(fine) <= 1, "{coarse} against {fine}");
    }
}
