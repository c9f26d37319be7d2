//! Active health probes: one task per endpoint sends `GET health.path` every `interval`
//! (with jitter) and feeds the result to the endpoint's state machine. A supervisor keeps
//! one task per endpoint across config reloads, ticks time-based transitions, and marks
//! the process ready once every endpoint has been probed once.

mod models;
mod scrape;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::forward::endpoint_get::endpoint_get;
use crate::health::{EndpointHealth, ProbeResult};
use crate::runtime::{Shared, Snapshot};

/// How often time-based transitions (hold-downs, probation, drain expiry) are checked.
const TICK: Duration = Duration::from_millis(100);

/// Runs the prober until `shutdown` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut generation = shared.generation.subscribe();
    let mut tasks: HashMap<(String, String), JoinHandle<()>> = HashMap::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let rt = shared.snapshot();
        reconcile(&shared, &rt, &mut tasks);
        if !shared.ready.load(Ordering::Acquire) && (!rt.config.health.enabled || first_round_done(&rt)) {
            shared.ready.store(true, Ordering::Release);
            tracing::info!("first probe round done: ready");
        }
        tokio::select! {
            changed = generation.changed() => if changed.is_err() { break },
            _ = ticker.tick() => shared.tick(&rt),
            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { break },
        }
    }
    for task in tasks.values() {
        task.abort();
    }
}

/// When the first round of probes is done for every endpoint of `rt`.
pub(crate) fn first_round_done(rt: &Snapshot) -> bool {
    rt.regions
        .iter()
        .flat_map(|r| r.endpoints.iter())
        .all(|e| e.health.has_been_probed())
}

/// One task per endpoint of `rt`: new endpoints get one, removed ones lose theirs, kept
/// ones keep theirs (they read the current config every round).
fn reconcile(shared: &Arc<Shared>, rt: &Snapshot, tasks: &mut HashMap<(String, String), JoinHandle<()>>) {
    let mut wanted = HashMap::new();
    if rt.config.health.enabled {
        for r in &rt.regions {
            for e in &r.endpoints {
                wanted.insert((r.name.to_string(), e.config.url.clone()), e.health.clone());
            }
        }
    }
    tasks.retain(|key, task| {
        let keep = wanted.contains_key(key) && !task.is_finished();
        if !keep {
            task.abort();
        }
        keep
    });
    for (key, health) in wanted {
        tasks
            .entry(key)
            .or_insert_with(|| tokio::spawn(probe_loop(shared.clone(), health)));
    }
}

async fn probe_loop(shared: Arc<Shared>, health: Arc<EndpointHealth>) {
    loop {
        let rt = shared.snapshot();
        let Some(result) = probe_once(&rt, &health).await else {
            // The endpoint left the config; the supervisor aborts us too.
            return;
        };
        let passed = result.ok;
        if !result.ok {
            tracing::debug!(region = %health.region, endpoint = %health.url, detail = result.detail.as_deref().unwrap_or(""), "probe failed");
        }
        shared.probed(&rt, &health, result);
        let scraped = Instant::now();
        if passed {
            // Load signals ride on the probe schedule; a down endpoint is not scraped.
            scrape::scrape(&rt, &health).await;
            models::discover(&rt, &health).await;
        }
        // A slow metrics page must not stretch the probe interval.
        let scrape_time = scraped.elapsed();
        let interval = rt
            .endpoint_of(&health)
            .and_then(|(c, _)| c.probe.interval)
            .unwrap_or(rt.config.health.interval);
        let pause = jittered(interval, rt.config.health.jitter, fastrand::f64()).saturating_sub(scrape_time);
        drop(rt);
        tokio::time::sleep(pause).await;
    }
}

/// `interval` moved by up to `±jitter` of itself; `draw` is uniform in `0..1`.
pub(crate) fn jittered(interval: Duration, jitter: f64, draw: f64) -> Duration {
    interval.mul_f64((1.0 + jitter * (2.0 * draw - 1.0)).max(0.0))
}

/// One probe of `health` as configured in `rt`; `None` when `rt` no longer has it.
async fn probe_once(rt: &Snapshot, health: &Arc<EndpointHealth>) -> Option<ProbeResult> {
    let (region, endpoint) = rt.endpoint_of(health)?;
    let overrides = &region.probe;
    let probe_path = overrides.path.as_deref().unwrap_or(&rt.config.health.path);
    let timeout = overrides.timeout.unwrap_or(rt.config.health.timeout);
    let fail = |detail: String, started: Instant| ProbeResult {
        ok: false,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        detail: Some(detail),
    };
    let started = Instant::now();
    let req = match endpoint_get(&endpoint.config, probe_path, "meridian-health-probe") {
        Ok(req) => req,
        Err(e) => return Some(fail(format!("probe request: {e}"), started)),
    };
    let sent = rt.upstreams.send(req, endpoint.config.protocol, timeout);
    let outcome = tokio::time::timeout(timeout, async {
        let resp = sent.await.map_err(|e| e.detail())?;
        let latency = started.elapsed();
        let status = resp.status();
        // Read the body so the connection can be reused; its content does not matter.
        resp.into_body().collect().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(latency)
        } else {
            Err(format!("status {}", status.as_u16()))
        }
    })
    .await;
    Some(match outcome {
        Ok(Ok(latency)) => ProbeResult {
            ok: true,
            latency_ms: latency.as_secs_f64() * 1000.0,
            detail: None,
        },
        Ok(Err(detail)) => fail(detail, started),
        Err(_) => fail(format!("no answer within {timeout:?}"), started),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_table() {
        let s = Duration::from_secs;
        let cases = [
            (s(2), 0.0, 0.9, s(2)),
            (s(2), 0.1, 0.5, s(2)),
            (s(2), 0.1, 0.0, Duration::from_millis(1800)),
            (s(2), 0.1, 1.0, Duration::from_millis(2200)),
        ];
        for (interval, jitter, draw, want) in cases {
            let got = jittered(interval, jitter, draw);
            assert!(got.abs_diff(want) < Duration::from_micros(1), "{got:?} != {want:?}");
        }
    }
}

#[cfg(test)]
mod reload_tests {
    use super::*;
    use crate::config::Config;
    use crate::test_fixtures::{CountingEndpoint, TestResult};

    fn config(endpoints: &[String]) -> Config {
        let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
        let text = format!(
            "[health]\ninterval = \"50ms\"\n[[region]]\nname = \"r\"\nlocation = [0.0, 0.0]\nendpoints = [{}]\n",
            list.join(", ")
        );
        Config::parse(&text, None).unwrap()
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..400 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn probes_follow_reloads_and_health_survives_them() -> TestResult {
        let a = CountingEndpoint::start().await?;
        let b = CountingEndpoint::start().await?;
        let shared = Shared::new(config(&[a.url()]))?;
        let (stop, stopped) = watch::channel(false);
        let prober = tokio::spawn(run(shared.clone(), stopped));
        until("a is probed and the process ready", || {
            a.hits() >= 1 && shared.ready.load(Ordering::Acquire)
        })
        .await;
        let a_health = shared.snapshot().regions[0].endpoints[0].health.clone();

        // Add b: it gets a prober; a keeps its health object (and its task).
        let rt = shared.build(config(&[a.url(), b.url()]), Some(&shared.snapshot()))?;
        shared.install(rt);
        until("b is probed", || b.hits() >= 1).await;
        assert!(Arc::ptr_eq(
            &shared.snapshot().regions[0].endpoints[0].health,
            &a_health
        ));

        // Remove a: its probes stop.
        let rt = shared.build(config(&[b.url()]), Some(&shared.snapshot()))?;
        shared.install(rt);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = a.hits();
        let b_before = b.hits();
        until("b keeps being probed", || b.hits() >= b_before + 3).await;
        assert!(a.hits() <= after + 1, "a is still probed");

        let _ = stop.send(true);
        prober.await?;
        Ok(())
    }
}
