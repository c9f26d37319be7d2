//! One request, phase by phase: client IP → location → route plan → body → attempts
//! (region → endpoint → forward → outcome) → response.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use crate::client_ip::{client_ip, is_trusted};
use crate::error::ProxyError;
use crate::forward::body::{self, BodyError, Completion, RequestBody, ResponseBody, StreamEnd, UpstreamBody};
use crate::forward::breaker::Admission;
use crate::forward::client::UpstreamError;
use crate::forward::limit::{EndpointSlot, Full};
use crate::forward::rewrite::{self, Forwarding};
use crate::forward::upgrade;
use crate::geo::{Locate, Located};
use crate::health::state::Event;
use crate::health::{EndpointHealth, InFlight};
use crate::observe::access_log::AccessRecord;
use crate::observe::metrics::RegionMetrics;
use crate::retry::RetryBudget;
use crate::route::{self, Decision, NoRegion, Refusal, RegionState, RequestFacts, RoutePlan};
use crate::runtime::{Runtime, Shared};

/// What the listener knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The peer: the TCP peer, or the address from a PROXY protocol header.
    pub peer: SocketAddr,
    pub tls: bool,
}

/// The proxy service: everything a connection task needs.
#[derive(Clone)]
pub struct Proxy {
    pub shared: Arc<Shared>,
    pub budget: Arc<RetryBudget>,
}

/// Where one attempt goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Endpoint { region: usize, endpoint: usize },
    Fallback,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Proxy {
        Proxy {
            shared,
            budget: Arc::new(RetryBudget::default()),
        }
    }

    /// Serves one request. Never fails: every problem becomes a response.
    pub async fn handle(
        &self,
        conn: ConnInfo,
        mut req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let started = Instant::now();
        let rt = self.shared.runtime();
        let config = &rt.config;

        // Client IP and location.
        let peer = conn.peer.ip().to_canonical();
        let peer_trusted = is_trusted(peer, &config.geoip.trusted_proxies);
        let client = client_ip(peer, req.headers(), &config.geoip.trusted_proxies);
        let located = rt.geo.locate(client);
        self.count_lookup(&located);
        let country = located.country();
        // Static spelling from the country table: no allocation per request.
        let country_str: &'static str = country.and_then(|c| c.info()).map_or("XX", |info| info.code);

        let mut record = AccessRecord {
            request_id: HeaderValue::from_static("-"),
            client_ip: client,
            country: country_str,
            zone: None,
            method: req.method().clone(),
            // Only the access log reads it: no copy per request when the log is off.
            path: if config.log.access_log {
                req.uri().path().to_string()
            } else {
                String::new()
            },
            region: None,
            endpoint: None,
            attempts: 0,
            status: 0,
            ttfb: None,
            bytes_in: 0,
            failover_reason: None,
            error: None,
        };

        let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if uri_len > config.server.max_uri_bytes {
            let limit = config.server.max_uri_bytes;
            return Ok(self.refuse(ProxyError::UriTooLong { limit }, record, started));
        }
        // Method, Host and the normalised path: what rules, residency and the endpoint see.
        if let Err(err) = crate::forward::inbound::admit(&mut req) {
            return Ok(self.refuse(err, record, started));
        }

        // Route plan: residency, route rules, candidate order.
        let facts = RequestFacts {
            method: req.method(),
            path: req.uri().path(),
            headers: req.headers(),
        };
        let plan = match route::plan(&rt.table, located, &facts) {
            Ok(plan) => plan,
            Err(refusal) => {
                // Refused before the headers are rewritten: the client's id, or a new one the
                // answer carries, so the log line can be found from either side.
                record.request_id = req
                    .headers()
                    .get(&rewrite::X_REQUEST_ID)
                    .cloned()
                    .unwrap_or_else(rewrite::new_request_id);
                let err = match refusal {
                    Refusal::LocationRefused => ProxyError::LocationRefused,
                    Refusal::ResidencyForbidden { zone, .. } => ProxyError::ResidencyForbidden {
                        zone: self.residency_rejection(&rt, zone),
                    },
                };
                return Ok(self.refuse(err, record, started));
            }
        };
        record.zone = plan.zone.map(|z| rt.table.zone_name(z).to_string());

        // Request head and body.
        let (mut parts, incoming) = req.into_parts();
        let fwd = Forwarding {
            peer,
            peer_trusted,
            proto: if conn.tls { "https" } else { "http" },
            country: country_str,
        };
        if !parts.headers.contains_key(header::HOST) {
            // HTTP/2 carries the host in :authority; HTTP/1.1 endpoints need a Host header.
            if let Some(host) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                parts.headers.insert(header::HOST, host);
            }
        }
        // WebSocket and other upgrades: routed like any request, bridged once the endpoint
        // answers 101.
        let upgrade = upgrade::is_upgrade(&parts.headers);
        let client_upgrade = if upgrade {
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        record.request_id = rewrite::request_headers(&mut parts.headers, &fwd, upgrade);
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let overflow = Arc::new(AtomicBool::new(false));
        let limit = config.server.max_request_body;
        let body_timeout = config.server.body_timeout;
        let body = match body::prepare(incoming, declared, limit, overflow.clone(), body_timeout).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => return Ok(self.refuse(ProxyError::BodyTooLarge { limit }, record, started)),
            Err(BodyError::ClientStalled(_)) => return Ok(self.refuse(ProxyError::BodyTimeout, record, started)),
            Err(_) => {
                return Ok(self.refuse(
                    ProxyError::BadRequest("the request body could not be read"),
                    record,
                    started,
                ));
            }
        };
        record.bytes_in = body.len_hint();
        self.budget.record_request();

        // Boxed: the attempt loop's state is most of this future, and hyper keeps one
        // request future's worth of memory per connection for the connection's life.
        // Allocated per request instead, an idle keep-alive connection stays small.
        let resp = Box::pin(self.attempts(&rt, &plan, parts, body, overflow, record, started)).await;
        resp.map(|r| upgrade::bridge(r, client_upgrade))
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        rt: &Arc<Runtime>,
        plan: &RoutePlan<'_>,
        parts: http::request::Parts,
        body: RequestBody,
        overflow: Arc<AtomicBool>,
        mut record: AccessRecord,
        started: Instant,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let config = &rt.config;
        let mut tried: Vec<Target> = Vec::with_capacity(config.retry.max_attempts as usize);
        let mut body = Some(body);
        let mut last_error: Option<ProxyError> = None;
        let first_choice = plan.candidates.first().map(|c| c.region);
        let first_state = first_choice.map(|r| rt.region_state(r, |_| false));
        // Slow start: a region that just came back takes only a growing share of its clients;
        // the others keep going where they went while it was away. Drawn once per request.
        let ramp_skips = slow_start_skips(rt, plan);

        while (tried.len() as u32) < config.retry.max_attempts {
            let fallback_usable =
                rt.fallback.as_ref().is_some_and(|f| f.breaker.would_admit()) && !tried.contains(&Target::Fallback);
            let tried_so_far = &tried;
            let state = |skip: u64| {
                move |r: usize| match rt.region_state(r, |e| {
                    tried_so_far.contains(&Target::Endpoint { region: r, endpoint: e })
                }) {
                    RegionState::Available if r < 64 && skip & (1 << r) != 0 => RegionState::Unavailable,
                    s => s,
                }
            };
            let mut decision = route::select(plan, state(ramp_skips), fallback_usable, config.health.panic_mode);
            if ramp_skips != 0 && !matches!(decision, Decision::Region(_)) {
                // Nowhere else to go: the ramping region serves after all.
                decision = route::select(plan, state(0), fallback_usable, config.health.panic_mode);
            }
            let target = match decision {
                Decision::Region(region) => match self.pick(
                    rt,
                    region,
                    &tried,
                    &parts.headers,
                    body.as_ref().and_then(RequestBody::kept),
                ) {
                    Some(endpoint) => Target::Endpoint { region, endpoint },
                    None => break,
                },
                Decision::Fallback => Target::Fallback,
                // SPEC step 6: once no candidate is left (none was available, or every one
                // failed), the answer is 503, whatever the last attempt's error was.
                Decision::Refuse(no) => {
                    last_error = Some(match no {
                        NoRegion::ResidencyUnavailable { zone } => ProxyError::ResidencyUnavailable {
                            zone: self.residency_rejection(rt, zone),
                        },
                        NoRegion::NoRegionAvailable => ProxyError::NoRegionAvailable {
                            region: record
                                .region
                                .clone()
                                .or_else(|| first_choice.map(|r| rt.regions[r].name.clone())),
                        },
                    });
                    break;
                }
            };
            if !tried.is_empty() {
                if !self
                    .budget
                    .try_retry(config.retry.budget_ratio, config.retry.budget_min_per_second)
                {
                    break;
                }
                self.shared.metrics.retries.inc();
            }
            tried.push(target);
            // Past the endpoint's connection cap and wait queue nothing is sent: the attempt
            // moves on like a refused connect, and the endpoint's health is not touched.
            let slot = match enter_endpoint(rt, target).await {
                Ok(slot) => slot,
                Err(full) => {
                    let (region_name, _) = self.target_names(rt, target);
                    tracing::debug!(region = %region_name, error = %full, "attempt not sent");
                    record.attempts = tried.len() as u32;
                    last_error = Some(ProxyError::NoRegionAvailable {
                        region: Some(region_name),
                    });
                    continue;
                }
            };
            let attempt_body = match body.as_ref().and_then(RequestBody::replay) {
                Some(replay) => replay,
                // Streamed: this is the only attempt it can have.
                None => match body.take() {
                    Some(b) => b,
                    None => break,
                },
            };
            let idempotent = is_idempotent(&parts.method);
            let replayable = crate::retry::may_replay(
                &parts.method,
                &parts.headers,
                parts.uri.path(),
                &config.retry.replay_paths,
            );
            let can_retry = body.as_ref().is_some_and(|b| b.replay().is_some());
            let outcome = self.forward(rt, target, &parts, attempt_body).await;
            let (region_name, health) = self.target_names(rt, target);
            record.region = Some(region_name.clone());
            record.endpoint = health
                .as_ref()
                .map(|h| h.url.clone())
                .or_else(|| rt.fallback.as_ref().map(|f| f.config.endpoint.url.clone()));
            record.attempts = tried.len() as u32;
            match outcome {
                Ok((resp, ttfb, inflight)) => {
                    let status = resp.status().as_u16();
                    if let Some(h) = &health {
                        self.observe_response(rt, h, &resp, ttfb);
                        if let Target::Endpoint { region, .. } = target {
                            crate::health::scrape::orca(rt, region, h, resp.headers());
                        }
                    }
                    let retry_status = matches!(status, 502..=504) && idempotent;
                    if retry_status && can_retry && (tried.len() as u32) < config.retry.max_attempts {
                        last_error = Some(ProxyError::UpstreamUnreachable {
                            region: region_name,
                            detail: format!("endpoint answered {status}"),
                        });
                        continue;
                    }
                    record.ttfb = Some(ttfb);
                    record.failover_reason = failover_reason(plan, first_choice, first_state, target, tried.len()).map(
                        |r| match first_choice {
                            Some(f) if r == "unhealthy" && f < 64 && ramp_skips & (1 << f) != 0 => "slow_start",
                            _ => r,
                        },
                    );
                    let from = first_choice.and_then(|r| rt.regions.get(r));
                    if let (Some(reason), Some(from)) = (record.failover_reason, from) {
                        self.shared
                            .metrics
                            .failovers
                            .with_label_values(&[&from.name, &region_name, reason])
                            .inc();
                        if reason == "saturated" {
                            self.shared
                                .metrics
                                .spillovers
                                .with_label_values(&[&from.name, &region_name])
                                .inc();
                        }
                    }
                    return Ok(self.relay(rt, target, resp, record, started, (inflight, slot), health));
                }
                Err(e) => {
                    if let Some(h) = &health {
                        let event = match e {
                            UpstreamError::Timeout(_) => Some(Event::Timeout),
                            UpstreamError::Body(_) | UpstreamError::ClientStalled(_) => None,
                            _ => Some(Event::ConnectError),
                        };
                        if let Some(event) = event {
                            self.shared.observe(rt, h, event);
                        }
                    }
                    if overflow.load(std::sync::atomic::Ordering::Acquire) {
                        let limit = config.server.max_request_body;
                        return Ok(self.refuse(ProxyError::BodyTooLarge { limit }, record, started));
                    }
                    if let UpstreamError::ClientStalled(_) = e {
                        return Ok(self.refuse(ProxyError::BodyTimeout, record, started));
                    }
                    tracing::debug!(region = %region_name, error = %e, "attempt failed");
                    last_error = Some(match &e {
                        UpstreamError::Timeout(_) => ProxyError::UpstreamTimeout { region: region_name },
                        _ => ProxyError::UpstreamUnreachable {
                            region: region_name,
                            detail: e.to_string(),
                        },
                    });
                    // Garbage instead of a response head is, for the client, a 502 from that
                    // endpoint: retried like one (SPEC step 7), so only for idempotent methods.
                    let retryable = e.retryable() || (replayable && e.retryable_if_replayable());
                    if !(retryable && can_retry) {
                        break;
                    }
                }
            }
        }
        let err = last_error.unwrap_or(ProxyError::NoRegionAvailable { region: None });
        Ok(self.refuse(err, record, started))
    }

    /// Power of two choices among the region's untried, available endpoints (any untried
    /// one in panic mode); a session's own endpoint when the region has affinity.
    fn pick(
        &self,
        rt: &Runtime,
        region: usize,
        tried: &[Target],
        headers: &http::HeaderMap,
        body: Option<&[u8]>,
    ) -> Option<usize> {
        let r = rt.regions.get(region)?;
        let mut loads: [crate::balance::EndpointLoad; 16] = [crate::balance::EndpointLoad {
            eligible: false,
            latency: 0.0,
            in_flight: 0,
            weight: 1.0,
            queue_depth: 0.0,
            kv_cache: 0.0,
        }; 16];
        let n = r.endpoints.len().min(loads.len());
        let mut any = false;
        for (i, e) in r.endpoints.iter().take(n).enumerate() {
            let mut load = e.health.load(e.config.weight, rt.config.health.slow_start);
            load.eligible &= !tried.contains(&Target::Endpoint { region, endpoint: i });
            any |= load.eligible;
            loads[i] = load;
        }
        if !any {
            // Panic mode: every untried endpoint is a candidate.
            for (i, l) in loads.iter_mut().take(n).enumerate() {
                l.eligible = !tried.contains(&Target::Endpoint { region, endpoint: i });
            }
        }
        if let Some(choice) = crate::affinity::for_request(rt, region, &loads[..n], headers, body) {
            return choice;
        }
        crate::balance::pick(&loads[..n], |k| fastrand::usize(..k))
    }

    fn target_names(&self, rt: &Runtime, target: Target) -> (String, Option<Arc<EndpointHealth>>) {
        match target {
            Target::Endpoint { region, endpoint } => {
                let r = &rt.regions[region];
                (r.name.clone(), r.endpoints.get(endpoint).map(|e| e.health.clone()))
            }
            Target::Fallback => ("fallback".to_string(), None),
        }
    }

    /// Sends one attempt; returns the response head, its time to first byte and the
    /// in-flight guard that lives as long as the response body.
    async fn forward(
        &self,
        rt: &Runtime,
        target: Target,
        parts: &http::request::Parts,
        body: RequestBody,
    ) -> Result<(Response<Incoming>, Duration, Option<InFlight>), UpstreamError> {
        let config = &rt.config;
        let (scheme, authority, base, protocol, inflight, upstreams) = match target {
            Target::Endpoint { region, endpoint } => {
                let r = &rt.regions[region];
                let e = &r.endpoints[endpoint];
                (
                    &e.config.scheme,
                    &e.config.authority,
                    e.config.base_path.as_str(),
                    e.config.protocol,
                    Some(e.health.start()),
                    &rt.upstreams,
                )
            }
            Target::Fallback => {
                let f = rt
                    .fallback
                    .as_ref()
                    .ok_or_else(|| UpstreamError::Connect("no fallback".into()))?;
                // Another request took the half-open trial since selection looked: nothing is
                // sent, and the next selection no longer offers the fallback.
                if f.breaker.admit() == Admission::Rejected {
                    return Err(UpstreamError::Connect("fallback circuit breaker is open".into()));
                }
                (
                    &f.config.endpoint.scheme,
                    &f.config.endpoint.authority,
                    f.config.endpoint.base_path.as_str(),
                    crate::config::UpstreamProtocol::Http1,
                    None,
                    &f.upstreams,
                )
            }
        };
        let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let path_and_query = match target {
            Target::Fallback => rewrite_fallback_path(rt, base, path),
            Target::Endpoint { .. } if base.is_empty() => parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            Target::Endpoint { .. } => {
                PathAndQuery::try_from(format!("{base}{path}")).map_err(|e| UpstreamError::Protocol(e.to_string()))?
            }
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(scheme.clone());
        uri.authority = Some(authority.clone());
        uri.path_and_query = Some(path_and_query);
        let uri = Uri::from_parts(uri).map_err(|e| UpstreamError::Protocol(e.to_string()))?;

        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        // Upgrades exist only in HTTP/1.1, whatever the region speaks otherwise.
        let protocol = if upgrade::is_upgrade(&parts.headers) {
            crate::config::UpstreamProtocol::Http1
        } else {
            protocol
        };
        *req.version_mut() = match protocol {
            crate::config::UpstreamProtocol::Http1 => Version::HTTP_11,
            crate::config::UpstreamProtocol::Http2 => Version::HTTP_2,
        };
        *req.headers_mut() = parts.headers.clone();
        if let Target::Endpoint { region, .. } = target {
            crate::health::scrape::ask_for_orca(rt, region, req.headers_mut());
        }
        if let (Target::Fallback, Some(f)) = (target, rt.fallback.as_ref()) {
            if let Ok(host) = HeaderValue::from_str(f.config.endpoint.authority.as_str()) {
                req.headers_mut().insert(header::HOST, host);
            }
            for (name, value) in &f.config.headers {
                req.headers_mut().insert(name.clone(), value.clone());
            }
        }
        let sent = Instant::now();
        let resp = upstreams.send(req, protocol, config.server.request_timeout).await;
        if let (Target::Fallback, Some(f)) = (target, rt.fallback.as_ref()) {
            let ok = resp.as_ref().is_ok_and(|r| r.status().as_u16() < 500);
            let result = if ok { "ok" } else { "error" };
            self.shared.metrics.fallback_requests.with_label_values(&[result]).inc();
            // The client's own broken body says nothing about the fallback.
            if !matches!(resp, Err(UpstreamError::Body(_) | UpstreamError::ClientStalled(_))) {
                f.breaker.record(ok);
            }
        }
        let resp = resp?;
        Ok((resp, sent.elapsed(), inflight))
    }

    fn observe_response(&self, rt: &Runtime, health: &EndpointHealth, resp: &Response<Incoming>, ttfb: Duration) {
        let status = resp.status().as_u16();
        if matches!(status, 429 | 503) {
            if let Some(after) = retry_after(resp.headers()) {
                self.shared.observe(rt, health, Event::Shed { retry_after: after });
                return;
            }
        }
        self.shared.observe(rt, health, Event::Response { status, ttfb });
    }

    #[allow(clippy::too_many_arguments)]
    fn relay(
        &self,
        rt: &Arc<Runtime>,
        target: Target,
        resp: Response<Incoming>,
        mut record: AccessRecord,
        started: Instant,
        (inflight, slot): (Option<InFlight>, Option<EndpointSlot>),
        health: Option<Arc<EndpointHealth>>,
    ) -> Response<ResponseBody> {
        let (region_header, metrics) = match target {
            Target::Endpoint { region, .. } => (&rt.regions[region].header, rt.regions[region].metrics.clone()),
            Target::Fallback => match rt.fallback.as_ref() {
                Some(f) => (&f.header, f.metrics.clone()),
                None => return ProxyError::NoRegionAvailable { region: None }.response(),
            },
        };
        let (mut parts, incoming) = resp.into_parts();
        record.status = parts.status.as_u16();
        if let Some(ttfb) = record.ttfb {
            metrics.ttfb.observe(ttfb.as_secs_f64());
        }
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        rewrite::response_headers(&mut parts.headers, region_header, record.attempts, switching);
        if let Target::Endpoint { region, .. } = target {
            // Load reports are for Meridian's balancer, not for clients: they would expose
            // internal queue and cache numbers.
            crate::health::scrape::strip_orca(rt, region, &mut parts.headers);
        }
        let sse = body::is_sse(&parts.headers);
        let done = Box::new(Done {
            shared: self.shared.clone(),
            runtime: rt.clone(),
            metrics,
            record,
            started,
            _inflight: inflight,
            _slot: slot,
            health,
        });
        let body = UpstreamBody::new(incoming, rt.config.server.stall_timeout, sse, done);
        Response::from_parts(parts, ResponseBody::Upstream(body))
    }

    /// Answers with Meridian's own error, counting and logging it.
    fn refuse(&self, err: ProxyError, mut record: AccessRecord, started: Instant) -> Response<ResponseBody> {
        let mut resp: Response<ResponseBody> = err.response();
        if let Some(region) = &record.region {
            if let Ok(v) = HeaderValue::from_str(region) {
                resp.headers_mut().insert(&rewrite::X_MERIDIAN_REGION, v);
            }
        }
        if let Ok(v) = HeaderValue::from_str(record.request_id.to_str().unwrap_or("")) {
            if !v.is_empty() && v != "-" {
                resp.headers_mut().insert(&rewrite::X_REQUEST_ID, v);
            }
        }
        if record.attempts > 0 {
            resp.headers_mut()
                .insert(&rewrite::X_MERIDIAN_ATTEMPTS, HeaderValue::from(record.attempts));
        }
        if err == ProxyError::BodyTimeout {
            // The rest of the body may never come: the connection cannot be reused.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        record.status = err.status().as_u16();
        record.error = Some(err.code());
        let region = record.region.as_deref().unwrap_or("none");
        self.shared
            .metrics
            .requests
            .with_label_values(&[region, status_class(err.status())])
            .inc();
        self.shared
            .metrics
            .request_duration
            .with_label_values(&[region])
            .observe(started.elapsed().as_secs_f64());
        if self.shared.runtime().config.log.access_log {
            record.emit(started.elapsed(), 0, "local");
        }
        resp
    }

    /// Counts a request refused to keep a zone's client inside it; returns the zone's name.
    fn residency_rejection(&self, rt: &Runtime, zone: usize) -> String {
        let name = rt.table.zone_name(zone).to_string();
        self.shared
            .metrics
            .residency_rejections
            .with_label_values(&[&name])
            .inc();
        name
    }

    fn count_lookup(&self, located: &Located) {
        let results = &self.shared.metrics.geoip_results;
        match located {
            Located::Country { .. } => results.hit.inc(),
            Located::Unknown => results.miss.inc(),
            Located::Private => results.private.inc(),
        }
    }
}

/// Runs when a relayed response body ends: metrics, health and the access log.
struct Done {
    shared: Arc<Shared>,
    runtime: Arc<Runtime>,
    metrics: RegionMetrics,
    record: AccessRecord,
    started: Instant,
    _inflight: Option<InFlight>,
    /// The endpoint's request slot: freed when the response body ends or is dropped.
    _slot: Option<EndpointSlot>,
    health: Option<Arc<EndpointHealth>>,
}

impl Completion for Done {
    fn complete(self: Box<Self>, end: StreamEnd, bytes: u64) {
        let elapsed = self.started.elapsed();
        self.metrics.count(self.record.status);
        self.metrics.duration.observe(elapsed.as_secs_f64());
        if let Some(h) = &self.health {
            // Only a response relayed to its end proves the endpoint; a stall counts against it.
            let event = match end {
                StreamEnd::Stalled | StreamEnd::UpstreamError => Some(Event::StreamError),
                StreamEnd::Complete if self.record.status < 500 => Some(Event::Completed),
                StreamEnd::Complete | StreamEnd::ClientGone => None,
            };
            if let Some(event) = event {
                self.shared.observe(&self.runtime, h, event);
            }
        }
        if self.runtime.config.log.access_log {
            let end = match end {
                StreamEnd::Complete => "complete",
                StreamEnd::Stalled => "stalled",
                StreamEnd::UpstreamError => "upstream_error",
                StreamEnd::ClientGone => "client_gone",
            };
            self.record.emit(elapsed, bytes, end);
        }
    }
}

/// Takes a request slot of the target endpoint, when its connections are capped.
async fn enter_endpoint(rt: &Runtime, target: Target) -> Result<Option<EndpointSlot>, Full> {
    let Target::Endpoint { region, endpoint } = target else {
        return Ok(None);
    };
    match rt
        .regions
        .get(region)
        .and_then(|r| r.endpoints.get(endpoint))
        .and_then(|e| e.limit.as_ref())
    {
        Some(limit) => limit.enter().await.map(Some),
        None => Ok(None),
    }
}

fn failover_reason(
    plan: &RoutePlan<'_>,
    first: Option<usize>,
    first_state: Option<RegionState>,
    target: Target,
    attempts: usize,
) -> Option<&'static str> {
    let served = match target {
        Target::Endpoint { region, .. } => Some(region),
        Target::Fallback => None,
    };
    if served == first || plan.candidates.is_empty() {
        return None;
    }
    Some(match (attempts, first_state) {
        (n, _) if n > 1 => "retry",
        (_, Some(RegionState::Saturated)) => "saturated",
        (_, Some(RegionState::Unavailable)) => "unavailable",
        _ => "unhealthy",
    })
}

/// Candidate regions in slow start that this request skips, as a bit set of region indexes.
fn slow_start_skips(rt: &Runtime, plan: &RoutePlan<'_>) -> u64 {
    let window = rt.config.health.slow_start;
    let mut skips = 0u64;
    for c in plan.candidates.iter().filter(|c| c.region < 64) {
        let ramp = rt.regions[c.region].health.ramp(window);
        if ramp < 1.0 && !crate::health::slow_start::admit(ramp, fastrand::f64()) {
            skips |= 1 << c.region;
        }
    }
    skips
}

fn rewrite_fallback_path(rt: &Runtime, base: &str, path: &str) -> PathAndQuery {
    let mut path = path.to_string();
    if let Some(f) = rt.fallback.as_ref() {
        for (from, to) in &f.config.path_rewrite {
            if let Some(rest) = path.strip_prefix(from.as_str()) {
                if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') {
                    // `to` is stored without its trailing slash: "/" maps to "".
                    let sep = if to.is_empty() && !rest.starts_with('/') {
                        "/"
                    } else {
                        ""
                    };
                    path = format!("{to}{sep}{rest}");
                    break;
                }
            }
        }
    }
    PathAndQuery::try_from(format!("{base}{path}")).unwrap_or_else(|_| PathAndQuery::from_static("/"))
}

/// `Retry-After` in seconds (the HTTP-date form is rare from model servers and ignored).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

fn is_idempotent(m: &Method) -> bool {
    crate::retry::is_idempotent(m)
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}
