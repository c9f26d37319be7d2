//! Fleet mode: the counters live in Redis, so every instance sharing it enforces one limit.
//!
//! A request's rules are checked and committed together by one Lua script (one round trip,
//! Redis's clock, all or nothing). Concurrency slots are leased members of a sorted set,
//! so a crashed instance's slots expire; releases and token charges are sent after the
//! answer, off the request path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::local::{Costs, TOKEN_WINDOW};
use super::{LimitKind, RuleOutcome};
use crate::config::LimitsBackend;

/// A concurrency slot is forgotten this long after it was taken if no release arrives
/// (an instance that died holding it).
pub(crate) const SLOT_LEASE: Duration = Duration::from_secs(15 * 60);

/// KEYS: per rule `base:r` (request arrival time), `base:c` (in-flight slots), `base:t`
/// (token arrival time). ARGV: lease µs, member, then per rule interval µs, limit µs,
/// concurrent, token window µs (0 = not limited). Returns {ok, per rule: kind, wait µs,
/// requests ahead µs, tokens used µs}; kind 0 admitted, 1 requests, 2 concurrent, 3 tokens.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
local member = ARGV[2]
local n = #KEYS / 3
local ok = 1
local out = {0}
local nexts = {}
for i = 1, n do
  local a = 3 + (i - 1) * 4
  local interval, limit = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local conc, window = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local kind, wait, ahead, used = 0, 0, 0, 0
  if window > 0 then
    local ttat = tonumber(redis.call('GET', KEYS[3 * i]) or '0')
    used = math.max(ttat - now, 0)
    if used >= window then kind = 3; wait = used - window + 1 end
  end
  if kind == 0 and conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3 * i - 1], '-inf', string.format('%d', now))
    if redis.call('ZCARD', KEYS[3 * i - 1]) >= conc then kind = 2; wait = 1000000 end
  end
  if interval > 0 then
    local tat = tonumber(redis.call('GET', KEYS[3 * i - 2]) or '0')
    local nxt = math.max(tat, now) + interval
    if kind == 0 and nxt - now > limit then kind = 1; wait = nxt - now - limit end
    if kind == 0 then nexts[i] = nxt; ahead = nxt - now else ahead = math.max(tat - now, 0) end
  end
  if kind ~= 0 then ok = 0 end
  out[#out + 1] = kind
  out[#out + 1] = wait
  out[#out + 1] = ahead
  out[#out + 1] = used
end
if ok == 1 then
  for i = 1, n do
    local a = 3 + (i - 1) * 4
    if nexts[i] then
      redis.call('SET', KEYS[3 * i - 2], string.format('%d', nexts[i]), 'PX',
        string.format('%d', math.ceil((nexts[i] - now) / 1000) + 1))
    end
    if tonumber(ARGV[a + 2]) > 0 then
      redis.call('ZADD', KEYS[3 * i - 1], string.format('%d', now + lease), member)
      redis.call('PEXPIRE', KEYS[3 * i - 1], string.format('%d', math.ceil(lease / 1000) + 1))
    end
  end
end
out[1] = ok
return out
";

/// KEYS[1]: `base:t`; ARGV[1]: the tokens' cost in µs.
const CHARGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local nxt = math.max(tat, now) + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', string.format('%d', math.ceil((nxt - now) / 1000) + 1))
return 1
";

/// Why Redis gave no decision.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BackendError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from the admission script ({0} values)")]
    Reply(usize),
}

impl BackendError {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            BackendError::Timeout(_) => "timeout",
            BackendError::Redis(_) => "error",
            BackendError::Reply(_) => "reply",
        }
    }
}

/// Handles for the backend metrics.
pub(crate) struct BackendMetrics {
    pub timeouts: IntCounter,
    pub errors: IntCounter,
    pub(crate) replies: IntCounter,
    pub duration: Histogram,
}

/// One rule's part of a fleet check.
#[derive(Debug, Clone)]
pub(crate) struct FleetKey {
    pub rule: usize,
    /// `meridian:limit:<hash of rule and key>`.
    pub base: String,
    pub costs: Costs,
}

/// The Redis connection (reconnected with backoff by the manager) and the scripts.
pub(crate) struct Fleet {
    pub config: LimitsBackend,
    conn: ConnectionManager,
    admit: redis::Script,
    charge: redis::Script,
    metrics: BackendMetrics,
    /// Unix second of the last warning, so a dead Redis logs once a second, not per request.
    last_warning: AtomicU64,
}

impl Fleet {
    /// Connects lazily; within a tokio runtime a first connection and the script load start
    /// in the background so the first request does not pay for them.
    pub(crate) fn new(config: &LimitsBackend, metrics: BackendMetrics) -> Result<Arc<Fleet>, redis::RedisError> {
        let client = redis::Client::open(config.redis.as_str())?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(250))))
            .set_response_timeout(Some(config.timeout.max(Duration::from_millis(250))))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(usize::MAX);
        let conn = ConnectionManager::new_lazy_with_config(client, manager)?;
        let fleet = Arc::new(Fleet {
            config: config.clone(),
            conn,
            admit: redis::Script::new(ADMIT),
            charge: redis::Script::new(CHARGE),
            metrics,
            last_warning: AtomicU64::new(0),
        });
        let warm = fleet.clone();
        spawn(async move {
            let mut conn = warm.conn.clone();
            if let Err(e) = warm.admit.prepare_invoke().load_async(&mut conn).await {
                tracing::warn!(error = %e, "admission backend: cannot load the script yet");
            }
        });
        Ok(fleet)
    }

    /// Checks and commits every rule of one request in one round trip, within the timeout.
    pub(crate) async fn admit(&self, keys: &[FleetKey], member: &str) -> Result<Vec<RuleOutcome>, BackendError> {
        let mut call = self.admit.prepare_invoke();
        call.arg(SLOT_LEASE.as_micros() as u64).arg(member);
        for k in keys {
            call.key(format!("{}:r", k.base))
                .key(format!("{}:c", k.base))
                .key(format!("{}:t", k.base));
            let window = if k.costs.per_token > 0.0 {
                TOKEN_WINDOW.as_micros() as u64
            } else {
                0
            };
            call.arg(micros(k.costs.interval))
                .arg(micros(k.costs.limit))
                .arg(k.costs.concurrent)
                .arg(window);
        }
        let started = Instant::now();
        let mut conn = self.conn.clone();
        let reply = tokio::time::timeout(self.config.timeout, call.invoke_async::<Vec<i64>>(&mut conn)).await;
        self.metrics.duration.observe(started.elapsed().as_secs_f64());
        let values = match reply {
            Err(_) => return Err(self.failed(BackendError::Timeout(self.config.timeout))),
            Ok(Err(e)) => return Err(self.failed(BackendError::Redis(e))),
            Ok(Ok(v)) => v,
        };
        if values.len() != 1 + 4 * keys.len() {
            return Err(self.failed(BackendError::Reply(values.len())));
        }
        Ok(keys
            .iter()
            .zip(values[1..].chunks_exact(4))
            .map(|(k, v)| outcome(k, v))
            .collect())
    }

    /// Frees a request's concurrency slots once its answer ends.
    pub(crate) fn release(self: &Arc<Self>, bases: Vec<String>, member: String) {
        if bases.is_empty() {
            return;
        }
        let fleet = self.clone();
        spawn(async move {
            let mut conn = fleet.conn.clone();
            let mut pipe = redis::pipe();
            for b in &bases {
                pipe.zrem(format!("{b}:c"), &member).ignore();
            }
            let sent = tokio::time::timeout(fleet.config.timeout * 4, pipe.query_async::<()>(&mut conn)).await;
            if !matches!(sent, Ok(Ok(()))) {
                // The lease ends the slot later.
                fleet.metrics.errors.inc();
            }
        });
    }

    /// Charges tokens to a key's budget.
    pub(crate) fn charge(self: &Arc<Self>, base: String, costs: Costs, tokens: u64) {
        if costs.per_token <= 0.0 || tokens == 0 {
            return;
        }
        let cost = (tokens as f64 * costs.per_token / 1000.0).ceil() as u64;
        let fleet = self.clone();
        spawn(async move {
            let mut conn = fleet.conn.clone();
            let mut call = fleet.charge.prepare_invoke();
            call.key(format!("{base}:t")).arg(cost);
            let sent = tokio::time::timeout(fleet.config.timeout * 4, call.invoke_async::<i64>(&mut conn)).await;
            if !matches!(sent, Ok(Ok(_))) {
                fleet.metrics.errors.inc();
            }
        });
    }

    fn failed(&self, e: BackendError) -> BackendError {
        match e {
            BackendError::Timeout(_) => self.metrics.timeouts.inc(),
            BackendError::Redis(_) => self.metrics.errors.inc(),
            BackendError::Reply(_) => self.metrics.replies.inc(),
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.last_warning.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(error = %e, kind = e.kind(), "admission backend failed; rules apply on_backend_error");
        }
        e
    }
}

fn micros(ns: u64) -> u64 {
    if ns == 0 { 0 } else { (ns / 1000).max(1) }
}

/// One rule's part of the script's answer, in the shape local mode gives.
fn outcome(k: &FleetKey, v: &[i64]) -> RuleOutcome {
    let (kind, wait, ahead, used) = (v[0], v[1].max(0) as u64, v[2].max(0) as u64, v[3].max(0) as u64);
    let mut o = RuleOutcome::admitted(k.rule);
    if k.costs.interval > 0 {
        o.requests = Some(k.costs.request_quota(ahead * 1000, 0));
    }
    if k.costs.per_token > 0.0 {
        o.tokens = Some(k.costs.token_quota(used * 1000, 0));
    }
    let kind = match kind {
        0 => None,
        1 => Some(LimitKind::Requests),
        2 => Some(LimitKind::Concurrent),
        _ => Some(LimitKind::Tokens),
    };
    if let Some(kind) = kind {
        o.deny(kind, Duration::from_micros(wait));
    }
    o
}

/// Spawns on the current runtime; outside one (a test dropping a guard) there is nothing to
/// send the message with, and the lease ends the slot.
fn spawn(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(fut);
    }
}
