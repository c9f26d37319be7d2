//! In-process counters: GCRA for request rates and token budgets, an in-flight count for
//! concurrency, kept per hashed key in a sharded table with a cap on keys.
//!
//! Times are nanoseconds since the process's admission epoch ([`clock`]). The hot path takes a shard's read lock
//! and updates the entry's atomics; only a key's first request takes a write lock.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};

use super::{LimitKind, Quota, RuleOutcome};
use crate::config::LimitRule;

/// Nanoseconds since the process's admission epoch: one clock for every table, so a
/// request reads it once whatever the number of rules.
pub(crate) fn clock() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A token budget is spent over this window.
pub(crate) const TOKEN_WINDOW: Duration = Duration::from_secs(60);

/// GCRA: a request costing `cost` is admitted when the theoretical arrival time it leads to
/// is at most `limit` ahead of `now`. Returns the new arrival time, or how long until the
/// request would fit.
pub(crate) fn gcra(tat: u64, now: u64, cost: u64, limit: u64) -> Result<u64, u64> {
    let next = tat.max(now).saturating_add(cost);
    let ahead = next - now;
    if ahead <= limit { Ok(next) } else { Err(ahead - limit) }
}

/// A token budget admits while what was charged is less than a window ahead of `now`;
/// otherwise how long until it is.
pub(crate) fn under_budget(tat: u64, now: u64, window: u64) -> Result<(), u64> {
    let used = tat.saturating_sub(now);
    if used < window { Ok(()) } else { Err(used - window + 1) }
}

/// A rule's costs in nanoseconds, computed once per rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Costs {
    /// Time one request occupies (1 / rate); 0 without a rate.
    pub interval: u64,
    /// How far ahead requests may run: `burst × interval`.
    pub limit: u64,
    pub burst: u64,
    pub concurrent: u32,
    /// Time one token occupies (window / tokens_per_minute); 0 without a budget.
    pub per_token: f64,
    pub(crate) tokens_per_minute: u64,
}

impl Costs {
    pub(crate) fn of(rule: &LimitRule) -> Costs {
        let (interval, burst) = match rule.rate {
            Some(r) => ((1e9 / r.per_second).max(1.0) as u64, u64::from(r.burst)),
            None => (0, 0),
        };
        let tpm = rule.tokens_per_minute.unwrap_or(0);
        Costs {
            interval,
            limit: interval.saturating_mul(burst),
            burst,
            concurrent: rule.concurrent.unwrap_or(0),
            per_token: if tpm > 0 {
                TOKEN_WINDOW.as_nanos() as f64 / tpm as f64
            } else {
                0.0
            },
            tokens_per_minute: tpm,
        }
    }

    /// The `x-ratelimit-*-requests` numbers after an arrival time of `tat`.
    pub(crate) fn request_quota(&self, tat: u64, now: u64) -> Quota {
        let ahead = tat.saturating_sub(now);
        Quota {
            limit: self.burst,
            remaining: self.limit.saturating_sub(ahead) / self.interval.max(1),
            reset: Duration::from_nanos(ahead),
        }
    }

    /// The `x-ratelimit-*-tokens` numbers for a budget charged up to `tat`.
    pub(crate) fn token_quota(&self, tat: u64, now: u64) -> Quota {
        let used = tat.saturating_sub(now);
        let window = TOKEN_WINDOW.as_nanos() as u64;
        let free = window.saturating_sub(used) as f64 / window as f64;
        Quota {
            limit: self.tokens_per_minute,
            remaining: (free * self.tokens_per_minute as f64) as u64,
            reset: Duration::from_nanos(used),
        }
    }
}

/// One key's counters.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    tat: AtomicU64,
    tokens_tat: AtomicU64,
    in_flight: AtomicU32,
    seen: AtomicU64,
}

impl Entry {
    /// Tries to admit one request; on success the caller owns one in-flight slot when the
    /// rule counts concurrency, released with [`Entry::release`].
    pub(crate) fn admit(&self, costs: &Costs, now: u64, rule: usize) -> RuleOutcome {
        self.seen.store(now, Ordering::Relaxed);
        let mut outcome = RuleOutcome::admitted(rule);
        if costs.per_token > 0.0 {
            let tat = self.tokens_tat.load(Ordering::Acquire);
            outcome.tokens = Some(costs.token_quota(tat, now));
            if let Err(wait) = under_budget(tat, now, TOKEN_WINDOW.as_nanos() as u64) {
                outcome.deny(LimitKind::Tokens, Duration::from_nanos(wait));
                return outcome;
            }
        }
        if costs.concurrent > 0 {
            let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
            if before >= costs.concurrent {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                // Nothing says when a slot frees up: ask for a second.
                outcome.deny(LimitKind::Concurrent, Duration::from_secs(1));
                return outcome;
            }
        }
        if costs.interval > 0 {
            let mut tat = self.tat.load(Ordering::Acquire);
            loop {
                match gcra(tat, now, costs.interval, costs.limit) {
                    Ok(next) => match self
                        .tat
                        .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => {
                            outcome.requests = Some(costs.request_quota(next, now));
                            break;
                        }
                        Err(seen) => tat = seen,
                    },
                    Err(wait) => {
                        if costs.concurrent > 0 {
                            self.in_flight.fetch_sub(1, Ordering::AcqRel);
                        }
                        outcome.requests = Some(costs.request_quota(tat.max(now), now));
                        outcome.deny(LimitKind::Requests, Duration::from_nanos(wait));
                        return outcome;
                    }
                }
            }
        }
        outcome
    }

    /// Takes back an admission another rule refused (the request never ran).
    pub(crate) fn undo(&self, costs: &Costs) {
        if costs.interval > 0 {
            self.tat.fetch_sub(costs.interval, Ordering::AcqRel);
        }
        if costs.concurrent > 0 {
            self.release();
        }
    }

    /// Frees the in-flight slot of a request that ended.
    pub(crate) fn release(&self) {
        // Saturating: an undo and a release never race for the same slot, but a count must
        // not wrap if they ever did.
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Charges `tokens` to the budget: admission stops while a window's worth is charged.
    pub(crate) fn charge(&self, costs: &Costs, tokens: u64, now: u64) {
        if costs.per_token <= 0.0 || tokens == 0 {
            return;
        }
        let cost = (tokens as f64 * costs.per_token) as u64;
        let _ = self
            .tokens_tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.max(now).saturating_add(cost))
            });
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Holds nothing a fresh entry would not: forgetting it changes no decision.
    fn is_idle(&self, now: u64) -> bool {
        self.in_flight() == 0
            && self.tat.load(Ordering::Acquire) <= now
            && self.tokens_tat.load(Ordering::Acquire) <= now
    }
}

/// Keys are already hashes: the map uses them as they are.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Shard = RwLock<HashMap<u64, Arc<Entry>, BuildHasherDefault<KeyHasher>>>;

/// One rule's keys: sharded by hash, at most `max_keys` of them.
pub(crate) struct Table {
    pub costs: Costs,
    pub(crate) hasher: RandomState,
    shards: Box<[Shard]>,
    per_shard: usize,
    keys: IntGauge,
    evictions: IntCounter,
}

impl Table {
    pub(crate) fn new(costs: Costs, max_keys: usize, keys: IntGauge, evictions: IntCounter) -> Table {
        // Enough shards that writers rarely meet, few enough that small caps stay exact.
        let n = (max_keys / 64).next_power_of_two().clamp(1, 64);
        Table {
            costs,
            hasher: RandomState::new(),
            shards: (0..n).map(|_| Shard::default()).collect(),
            per_shard: (max_keys / n).max(1),
            keys,
            evictions,
        }
    }

    /// Nanoseconds since the admission epoch ([`clock`]).
    pub(crate) fn now(&self) -> u64 {
        clock()
    }

    fn shard(&self, hash: u64) -> &Shard {
        // The top bits pick the shard; the map uses the whole hash.
        &self.shards[(hash >> 58) as usize % self.shards.len()]
    }

    /// The key's entry, created (evicting when the shard is full) on its first request.
    pub(crate) fn entry(&self, hash: u64, now: u64) -> Arc<Entry> {
        let shard = self.shard(hash);
        if let Some(e) = shard.read().unwrap_or_else(|p| p.into_inner()).get(&hash) {
            return e.clone();
        }
        let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get(&hash) {
            return e.clone();
        }
        if map.len() >= self.per_shard {
            self.make_room(&mut map, now);
        }
        let e = Arc::new(Entry::default());
        map.insert(hash, e.clone());
        self.keys.inc();
        e
    }

    /// Drops entries that hold nothing; when none does, evicts the least recently seen
    /// (one with no request in flight if there is one).
    fn make_room(&self, map: &mut HashMap<u64, Arc<Entry>, BuildHasherDefault<KeyHasher>>, now: u64) {
        let before = map.len();
        map.retain(|_, e| !e.is_idle(now));
        self.keys.sub((before - map.len()) as i64);
        if map.len() < self.per_shard {
            return;
        }
        let victim = map
            .iter()
            .min_by_key(|(_, e)| (e.in_flight() > 0, e.seen.load(Ordering::Relaxed)))
            .map(|(k, _)| *k);
        if let Some(k) = victim {
            map.remove(&k);
            self.keys.dec();
            self.evictions.inc();
        }
    }

    /// Keys held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendErrorPolicy, LimitKey, RateLimit};
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    fn costs(rps: Option<(f64, u32)>, concurrent: Option<u32>, tpm: Option<u64>) -> Costs {
        Costs::of(&LimitRule {
            name: "t".into(),
            key: LimitKey::ClientIp,
            path_prefix: None,
            model: None,
            rate: rps.map(|(per_second, burst)| RateLimit { per_second, burst }),
            concurrent,
            tokens_per_minute: tpm,
            on_backend_error: BackendErrorPolicy::Allow,
        })
    }

    fn table(c: Costs, max_keys: usize) -> Table {
        Table::new(
            c,
            max_keys,
            IntGauge::new("k", "k").unwrap(),
            IntCounter::new("e", "e").unwrap(),
        )
    }

    #[test]
    fn gcra_burst_then_refill() {
        // 2 per second, burst 3: three at once, the fourth waits half a second.
        let c = costs(Some((2.0, 3)), None, None);
        let e = Entry::default();
        let t0 = 10 * SEC;
        let verdicts: Vec<bool> = (0..4).map(|_| e.admit(&c, t0, 0).denied.is_none()).collect();
        assert_eq!(verdicts, [true, true, true, false]);
        let denied = e.admit(&c, t0, 0);
        assert_eq!(denied.denied.map(|d| d.1), Some(Duration::from_millis(500)));
        assert_eq!(denied.requests.map(|q| q.remaining), Some(0));
        // Half a second later exactly one more fits.
        assert!(e.admit(&c, t0 + SEC / 2, 0).denied.is_none());
        assert!(e.admit(&c, t0 + SEC / 2, 0).denied.is_some());
        // After a long pause the whole burst is back.
        let later = t0 + 60 * SEC;
        let first = e.admit(&c, later, 0);
        assert_eq!(first.requests.map(|q| (q.limit, q.remaining)), Some((3, 2)));
        assert!(e.admit(&c, later, 0).denied.is_none());
        assert!(e.admit(&c, later, 0).denied.is_none());
        assert!(e.admit(&c, later, 0).denied.is_some());
    }

    #[test]
    fn gcra_table() {
        // (tat, now, cost, limit) -> result
        let cases = [
            ((0, 100, 10, 30), Ok(110)),
            ((120, 100, 10, 30), Ok(130)),
            ((125, 100, 10, 30), Err(5)),
            ((130, 100, 10, 30), Err(10)),
        ];
        for ((tat, now, cost, limit), want) in cases {
            assert_eq!(gcra(tat, now, cost, limit), want, "{tat} {now}");
        }
        assert_eq!(under_budget(0, 5, 60), Ok(()));
        assert_eq!(under_budget(64, 5, 60), Ok(()));
        assert_eq!(under_budget(65, 5, 60), Err(1));
    }

    #[test]
    fn concurrency_is_held_until_released() {
        let c = costs(None, Some(2), None);
        let e = Entry::default();
        assert!(e.admit(&c, 0, 0).denied.is_none());
        assert!(e.admit(&c, 0, 0).denied.is_none());
        let third = e.admit(&c, 0, 0);
        assert_eq!(third.denied.map(|d| d.0), Some(LimitKind::Concurrent));
        assert_eq!(e.in_flight(), 2);
        e.release();
        assert!(e.admit(&c, 0, 0).denied.is_none());
        e.release();
        e.release();
        e.release();
        assert_eq!(e.in_flight(), 0, "release never wraps");
    }

    #[test]
    fn a_rate_refusal_gives_back_the_concurrency_slot() {
        let c = costs(Some((1.0, 1)), Some(5), None);
        let e = Entry::default();
        assert!(e.admit(&c, 0, 0).denied.is_none());
        assert_eq!(e.admit(&c, 0, 0).denied.map(|d| d.0), Some(LimitKind::Requests));
        assert_eq!(e.in_flight(), 1);
        e.undo(&c);
        assert_eq!(e.in_flight(), 0);
        assert!(e.admit(&c, 0, 0).denied.is_none(), "undo gave the rate back");
    }

    #[test]
    fn tokens_admit_while_under_budget_and_refill() {
        // 600 tokens a minute: 10 a second.
        let c = costs(None, None, Some(600));
        let e = Entry::default();
        assert!(e.admit(&c, 0, 0).denied.is_none());
        e.charge(&c, 599, 0);
        let under = e.admit(&c, 0, 0);
        assert!(under.denied.is_none(), "one token left");
        assert_eq!(under.tokens.map(|q| q.remaining), Some(1));
        e.charge(&c, 100, 0);
        let over = e.admit(&c, 0, 0);
        assert_eq!(over.denied.map(|d| d.0), Some(LimitKind::Tokens));
        // 699 tokens charged: 99 past the budget, about 9.9 s of refill.
        let wait = over.denied.map(|d| d.1).unwrap_or_default();
        assert!(
            wait > Duration::from_millis(9_800) && wait < Duration::from_millis(10_000),
            "{wait:?}"
        );
        assert!(e.admit(&c, 10 * SEC, 0).denied.is_none());
    }

    #[test]
    fn a_full_table_forgets_idle_keys_first_then_the_oldest() {
        let c = costs(Some((1.0, 1)), Some(1), None);
        let t = table(c, 2);
        let a = t.entry(1, 0);
        assert!(a.admit(&c, 0, 0).denied.is_none());
        let b = t.entry(2, SEC);
        assert!(b.admit(&c, SEC, 0).denied.is_none());
        b.release();
        // Full: b is still rate-limited (not idle), a is in flight: b is evicted.
        let _c = t.entry(3, SEC);
        assert_eq!(t.len(), 2);
        assert_eq!(t.evictions.get(), 1);
        assert!(Arc::ptr_eq(&t.entry(1, SEC), &a), "the in-flight key stays");
        // Much later every entry is idle: making room evicts nothing that matters.
        a.release();
        let _d = t.entry(4, 100 * SEC);
        assert_eq!(t.evictions.get(), 1);
        assert!(t.len() <= 2);
        assert_eq!(t.keys.get(), t.len() as i64);
    }

    proptest! {
        /// Over any window of length w, GCRA admits at most burst + w × rate requests.
        #[test]
        fn no_sequence_admits_more_than_the_rate(
            rps in 0.5f64..50.0,
            burst in 1u32..10,
            gaps in proptest::collection::vec(0u64..400_000_000, 1..200),
        ) {
            let c = costs(Some((rps, burst)), None, None);
            let e = Entry::default();
            let mut now = 0;
            let mut admitted = Vec::new();
            for g in gaps {
                now += g;
                if e.admit(&c, now, 0).denied.is_none() {
                    admitted.push(now);
                }
            }
            for (i, &start) in admitted.iter().enumerate() {
                for (j, &end) in admitted.iter().enumerate().skip(i) {
                    let count = (j - i + 1) as u64;
                    let bound = u64::from(burst) + (end - start) / c.interval;
                    prop_assert!(count <= bound, "{count} admitted in {} ns, bound {bound}", end - start);
                }
            }
        }
    }
}
