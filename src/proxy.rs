//! One request, phase by phase: client IP → location → route plan → body → attempts →
//! response. The attempts are a thin I/O loop around the pure planner
//! (`route::attempt::next_attempt`): it names the region and endpoint, the loop sends,
//! records the outcome (with the error's retry class) and asks again.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode};
use smallvec::SmallVec;

use crate::admission::{self, Admitted, Limited, RequestView, Verdict};
use crate::client_ip::{client_ip_with, is_trusted};
use crate::config::UpstreamProtocol;
use crate::error::ProxyError;
use crate::forward::body::{
    self, BodyError, Completion, EndpointBody, RequestBody, ResponseBody, StreamEnd, UpstreamBody,
};
use crate::forward::breaker::Admission;
use crate::forward::client::{UpstreamError, UpstreamErrorKind, Upstreams};
use crate::forward::client_body::ClientBody;
use crate::forward::endpoint_get::{to_endpoint, under_base};
use crate::forward::h1::OwnRequest;
use crate::forward::head_fields::HeadFields;
use crate::forward::inbound::ClientHead;
use crate::forward::limit::{EndpointSlot, Full};
use crate::forward::pool::PooledEndpoint;
use crate::forward::request_fields::RequestFields;
use crate::forward::rewrite::{self, AddedFields, Forwarding, SentFields};
use crate::forward::upgrade;
use crate::forward::usage::{self, Scanned, UsageScanner};
use crate::geo::{Locate, LocateMemo, Located};
use crate::health::state::Event;
use crate::health::{EndpointHealth, InFlight};
use crate::live_view::LiveView;
use crate::observe::access_log::AccessRecord;
use crate::observe::metrics::RegionMetrics;
use crate::retry::RetryBudget;
use crate::route::attempt::RetryClass;
use crate::route::attempt::{self, Attempt, FailoverReason, Failure, Policy, Skips, Target, Tried};
use crate::route::{self, NoRegion, Refusal, RequestFacts, RoutePlan};
use crate::runtime::{Shared, Snapshot};

/// What the listener knows about the connection a request came on.
///
/// Aligned to 8: a request's future lays out its 4-aligned arguments after everything it
/// keeps across its awaits, ~1.1 KiB past the others, and building the future copied all
/// that span (callgrind: ~140 instructions and 18 cache lines written a request).
#[derive(Debug, Clone, Copy)]
#[repr(align(8))]
pub struct ConnInfo {
    /// The peer: the TCP peer, or the address from a PROXY protocol header.
    pub peer: SocketAddr,
    /// The connection came on the TLS listener (`X-Forwarded-Proto: https`).
    pub tls: bool,
}

/// The proxy service: everything a connection task needs.
#[derive(Clone)]
pub struct Proxy {
    pub(crate) shared: Arc<Shared>,
    /// The retry budget shared by every request (`retry.budget_ratio`, `budget_min_per_second`).
    pub budget: Arc<RetryBudget>,
}

/// The client side of a request, as the first phases found it.
struct Client {
    located: Located,
    fwd: Forwarding<'static>,
}

/// One attempt as sent: where, why there, and the names the log and metrics use.
struct Sent {
    target: Target,
    reason: Option<FailoverReason>,
    region: Arc<str>,
    health: Option<Arc<EndpointHealth>>,
}

/// When an attempt was sent and when its response head came: one clock read each, shared
/// by the time to first byte, the health event, the access record and the token latencies.
#[derive(Clone, Copy)]
struct HeadTiming {
    sent: Instant,
    head: Instant,
    /// `head - sent`, worked out once for its three readers.
    ttfb: Duration,
}

impl HeadTiming {
    fn new(sent: Instant, head: Instant) -> HeadTiming {
        HeadTiming {
            sent,
            head,
            ttfb: head.saturating_duration_since(sent),
        }
    }
}

/// What one attempt came to.
// why: an answer is the usual outcome; boxing it would allocate once per request to shrink a
// value that lives for one match.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    /// A response head to relay (unless the planner retries a gateway status, it is final).
    Answer(Response<EndpointBody>, HeadTiming, Option<InFlight>, Sent),
    /// The client's side failed (its body): answered at once, no other endpoint is tried.
    ClientFault(ProxyError),
    /// The attempt failed: how, for the planner, and the error the client gets if nothing
    /// else answers.
    Failed(Failure, ProxyError),
}

/// "Never" as a deadline (tokio's `Instant::far_future` is 30 years too).
const FAR_FUTURE: Duration = Duration::from_secs(86400 * 365 * 30);

/// Stable text for a retried 502–504: the status itself is in the access log.
const GATEWAY_ERROR: &str = "the endpoint answered with a gateway error";

impl Proxy {
    /// A proxy serving from `shared`, with a fresh retry budget.
    pub fn new(shared: Arc<Shared>) -> Proxy {
        Proxy {
            shared,
            budget: Arc::new(RetryBudget::default()),
        }
    }

    /// Serves one request. Never fails: every problem becomes a response. `memo`: the
    /// connection's last GeoIP lookup, when the listener keeps one; `head`: the request's
    /// parts, and its fields over its head's bytes when the server kept them so (its map
    /// holds the rest).
    ///
    /// An `async` block rather than an `async fn`, which would keep the request twice in
    /// its state.
    #[allow(clippy::manual_async_fn)] // why: the state size, above
    pub(crate) fn handle(
        &self,
        conn: ConnInfo,
        memo: Option<&LocateMemo>,
        head: &mut ClientHead,
        body: ClientBody,
    ) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send {
        async move {
            let ClientHead { parts, listed } = head;
            let started = Instant::now();
            let rt = self.shared.snapshot();
            let config = &rt.config;
            let (client, mut record) = self.locate(&rt, conn, memo, parts, listed.as_ref());

            let uri_len = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
            if uri_len > config.server.max_uri_bytes {
                let limit = config.server.max_uri_bytes;
                return Ok(self.refuse(ProxyError::UriTooLong { limit }, record, started));
            }
            // Method, Host and the normalised path: what rules, residency and the endpoint see.
            let has_host = match crate::forward::inbound::admit(parts, listed.as_ref()) {
                Ok(has_host) => has_host,
                Err(err) => return Ok(self.refuse(err, record, started)),
            };
            // Room for a per-client candidate order (city coordinates), so it is not allocated.
            let mut nearest = route::InlineCandidates::new();
            let plan = match self.route(
                &rt,
                client.located,
                (&*parts, listed.as_ref()),
                &mut record,
                &mut nearest,
            ) {
                Ok(plan) => plan,
                Err(err) => return Ok(self.refuse(err, record, started)),
            };
            let (added, client_upgrade) =
                prepare_head((&mut *parts, listed.as_mut()), has_host, &client.fwd, &mut record);
            // Most requests have no body: no reading future is built for them.
            let (body, overflow) = if hyper::body::Body::is_end_stream(&body) {
                (RequestBody::Empty, None)
            } else {
                match read_body(config, body).await {
                    Ok(read) => read,
                    Err(err) => return Ok(self.refuse(err, record, started)),
                }
            };
            record.bytes_in = body.len_hint();
            // Model-aware routing: candidates filtered to the regions serving the body's model.
            let mut plan = plan;
            if let Err(err) = filter_by_model(rt.as_ref(), &mut plan, parts, &body) {
                return Ok(self.refuse(err, record, started));
            }
            // Admission control: a limited request is answered here and reaches no endpoint.
            // Without `[[limit]]` rules no admission future is built.
            let admitted = if rt.admission.is_empty() {
                None
            } else {
                let sent_fields = SentFields {
                    client: RequestFields::new(listed.as_ref(), &parts.headers),
                    added: Some(&added),
                };
                match self.admit(&rt, record.client_ip, parts, sent_fields, &body).await {
                    Ok(admitted) => admitted,
                    Err(limited) => return Ok(self.rate_limited(limited, record, started)),
                }
            };
            self.budget.record_request();

            // Not boxed apart: both servers box this whole future per request already. The
            // head stays in its block and the added fields in this future's state: moved into
            // the attempt loop's, they were copied six times (callgrind: ~250 instructions).
            let head = (&mut *parts, listed.as_ref(), &added);
            let Ok(r) = self.attempts(&rt, &plan, head, body, overflow, record, started).await;
            // Most answers are neither limited nor an upgrade: not moved through either (nor
            // through a closure: each move of a `Response` is a 352-byte copy).
            if admitted.is_none() && client_upgrade.is_none() {
                return Ok(r);
            }
            Ok(match (admitted, client_upgrade) {
                (admitted, client_upgrade) if r.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    let (r, held) = admission::attach_session(r, admitted);
                    upgrade::bridge(r, client_upgrade, held)
                }
                // A refused upgrade is an ordinary answer.
                (admitted, _) => admission::attach(r, admitted),
            })
        }
    }

    /// The `[[limit]]` rules' decision; `Err` when one refuses the request.
    async fn admit(
        &self,
        rt: &Snapshot,
        client: IpAddr,
        parts: &http::request::Parts,
        headers: SentFields<'_>,
        body: &RequestBody,
    ) -> Result<Option<Admitted>, Limited> {
        let model = if rt.admission.needs_model {
            // The same in-place read model routing uses: no copy of the body.
            body.kept().and_then(crate::route::models::request_model)
        } else {
            None
        };
        let view = RequestView {
            client_ip: client,
            path: parts.uri.path(),
            headers,
            model,
        };
        match rt.admission.admit(&view).await {
            Verdict::Unlimited => Ok(None),
            Verdict::Admitted(a) => Ok(Some(a)),
            Verdict::Limited(l) => Err(l),
        }
    }

    /// Answers 429 with `Retry-After` and the limited key's quota headers.
    fn rate_limited(&self, limited: Limited, record: Box<AccessRecord>, started: Instant) -> Response<ResponseBody> {
        let mut resp = self.refuse(limited.error(), record, started);
        limited.headers.apply(resp.headers_mut());
        resp
    }

    /// Client IP and location; the access record started with them.
    fn locate(
        &self,
        rt: &Snapshot,
        conn: ConnInfo,
        memo: Option<&LocateMemo>,
        req: &http::request::Parts,
        listed: Option<&HeadFields>,
    ) -> (Client, Box<AccessRecord>) {
        let config = &rt.config;
        let fields = RequestFields::new(listed, &req.headers);
        let peer = conn.peer.ip().to_canonical();
        let peer_trusted = is_trusted(peer, &config.geoip.trusted_proxies);
        let client = client_ip_with(peer, peer_trusted, fields, &config.geoip.trusted_proxies);
        let located = match memo {
            Some(memo) => memo.locate(&rt.geo, client),
            None => rt.geo.locate(client),
        };
        self.count_lookup(&located);
        // Static spelling from the country table: no allocation per request.
        let country: &'static str = located.country().and_then(|c| c.info()).map_or("XX", |info| info.code);
        // Only the access log reads the path: no copy per request when the log is off.
        let path = if config.log.access_log {
            req.uri.path().to_string()
        } else {
            String::new()
        };
        // Boxed: the record travels through every phase and into the body's completion; a
        // pointer moves where 432 bytes were copied at each step (and sized two futures).
        // Allocated before it is built, so it is built in place (`Box::new` copied it).
        let mut record = Box::write(
            Box::new_uninit(),
            AccessRecord::new(client, country, req.method.clone(), path),
        );
        // observe: access-log fields of the request head, and the client's trace.
        record.head(
            req.version,
            fields,
            req.uri.authority().map(|a| a.as_str()),
            config.log.access_log,
        );
        // observe: the request's server span when tracing is on; the log's trace id.
        record.trace = crate::observe::trace::RequestTrace::start(&req.method, req.uri.path(), fields);
        record.trace_id = match &record.trace {
            Some(t) => Some(t.trace_id_hex()),
            None if config.log.access_log => crate::observe::trace::client_trace_id(fields),
            None => None,
        };
        let fwd = Forwarding {
            peer,
            peer_trusted,
            proto: if conn.tls { "https" } else { "http" },
            country,
        };
        (Client { located, fwd }, record)
    }

    /// Route plan: residency, route rules, candidate order.
    fn route<'t>(
        &self,
        rt: &'t Snapshot,
        located: Located,
        (req, listed): (&http::request::Parts, Option<&HeadFields>),
        record: &mut AccessRecord,
        nearest: &'t mut route::InlineCandidates,
    ) -> Result<RoutePlan<'t>, ProxyError> {
        let fields = RequestFields::new(listed, &req.headers);
        let facts = RequestFacts {
            method: &req.method,
            path: req.uri.path(),
            headers: &fields,
        };
        match route::plan_in(&rt.table, located, &facts, nearest) {
            Ok(plan) => {
                record.zone = plan.zone.and_then(|z| rt.table.zone_name_shared(z));
                Ok(plan)
            }
            Err(refusal) => {
                // Refused before the headers are rewritten: the client's id, or a new one the
                // answer carries, so the log line can be found from either side.
                record.request_id = fields
                    .get_value(&rewrite::X_REQUEST_ID)
                    .unwrap_or_else(rewrite::new_request_id);
                Err(match refusal {
                    Refusal::LocationRefused => ProxyError::LocationRefused,
                    Refusal::ResidencyForbidden { zone, .. } => {
                        let zone = self.residency_rejection(rt, zone, "route_rule");
                        // The refused client's zone, in the access log too.
                        record.zone = Some(zone.as_str().into());
                        ProxyError::ResidencyForbidden { zone }
                    }
                })
            }
        }
    }

    /// The I/O loop around the planner: plan, send, record the outcome, plan again.
    ///
    /// The head is borrowed from the request's future, where it stays for the request's life
    /// (`handle`). An `async` block rather than an `async fn`: an `async fn` keeps each
    /// argument twice in its state (as passed, and as the body's binding).
    #[allow(clippy::too_many_arguments, clippy::manual_async_fn)] // why: the state size, above
    fn attempts(
        &self,
        rt: &Arc<Snapshot>,
        plan: &RoutePlan<'_>,
        (parts, listed, added): (&mut http::request::Parts, Option<&HeadFields>, &AddedFields),
        body: RequestBody,
        overflow: Option<Arc<AtomicBool>>,
        mut record: Box<AccessRecord>,
        started: Instant,
    ) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> {
        async move {
            let skips = slow_start_skips(rt, plan);
            let policy = attempt_policy(rt, (parts, listed), &body, &skips);
            let mut tried: SmallVec<[Tried; 4]> = SmallVec::new();
            let mut body = Some(body);
            let mut last_error: Option<ProxyError> = None;
            loop {
                let kept = body.as_ref().and_then(RequestBody::kept);
                let sent_fields = SentFields {
                    client: RequestFields::new(listed, &parts.headers),
                    added: Some(added),
                };
                let (target, reason) = match self.plan_next(rt, plan, &tried, &policy, sent_fields, kept, &record) {
                    Ok(next) => next,
                    Err(refusal) => {
                        last_error = refusal.or(last_error);
                        break;
                    }
                };
                // Past the endpoint's connection cap and wait queue nothing is sent: the attempt
                // moves on like a refused connect, and the endpoint's health is not touched.
                let slot = match enter_endpoint(rt, target).await {
                    Ok(slot) => slot,
                    Err(full) => {
                        last_error = Some(self.not_sent(rt, target, &full, &mut record, tried.len()));
                        let failure = Failure::Error(RetryClass::NothingSent);
                        tried.push(Tried { target, failure });
                        continue;
                    }
                };
                // A kept body is sent again; a streamed one has this attempt only.
                let Some(attempt_body) = body.as_ref().and_then(RequestBody::replay).or_else(|| body.take()) else {
                    break;
                };
                let step = (target, reason, tried.len());
                let failure = match self
                    .try_target(
                        rt,
                        step,
                        (&mut *parts, listed, added),
                        attempt_body,
                        &mut record,
                        &policy,
                        overflow.as_deref(),
                    )
                    .await
                {
                    Outcome::Answer(resp, timing, inflight, sent) => {
                        self.answered(rt, plan, &sent, timing.ttfb, &mut record);
                        let relayed = (timing.sent, inflight, slot);
                        return Ok(self.relay(rt, target, resp, record, started, relayed, sent.health));
                    }
                    Outcome::ClientFault(fault) => return Ok(self.refuse(fault, record, started)),
                    Outcome::Failed(failure, error) => {
                        last_error = Some(error);
                        failure
                    }
                };
                tried.push(Tried { target, failure });
            }
            let err = last_error.unwrap_or(ProxyError::NoRegionAvailable { region: None });
            Ok(self.refuse(err, record, started))
        }
    }

    /// Sends one attempt (`step`: its target, why it goes there, how many came before) and
    /// observes what came back: an answer to relay, the client's own fault, or a failure the
    /// planner weighs for the next attempt.
    ///
    /// An `async` block rather than an `async fn` (as `forward` and the exchange below it):
    /// an `async fn` keeps each argument twice in its state and copies it from one to the
    /// other when it starts.
    #[allow(clippy::too_many_arguments, clippy::manual_async_fn)] // why: the state size, above
    fn try_target(
        &self,
        rt: &Arc<Snapshot>,
        (target, reason, tried): (Target, Option<FailoverReason>, usize),
        (parts, listed, added): (&mut http::request::Parts, Option<&HeadFields>, &AddedFields),
        body: RequestBody,
        record: &mut AccessRecord,
        policy: &Policy<'_>,
        overflow: Option<&AtomicBool>,
    ) -> impl Future<Output = Outcome> {
        async move {
            let span = self.start_attempt_span(record, tried, &mut parts.headers);
            let head = HeadView { parts, listed, added };
            let outcome = self.forward(rt, target, head, body).await;
            let sent = self.sent(rt, target, reason, record, tried);
            self.observe_attempt(rt, &sent, &outcome, span, record);
            match outcome {
                Ok((mut resp, timing, inflight)) => {
                    self.observe_answer(rt, &sent, &mut resp, timing);
                    let gateway = matches!(resp.status().as_u16(), 502..=504);
                    if gateway && attempt::may_retry(Failure::GatewayStatus, tried + 1, policy) {
                        let error = ProxyError::UpstreamUnreachable {
                            region: sent.region.to_string(),
                            reason: GATEWAY_ERROR,
                        };
                        return Outcome::Failed(Failure::GatewayStatus, error);
                    }
                    Outcome::Answer(resp, timing, inflight, sent)
                }
                Err(e) => {
                    self.observe_error(rt, sent.health.as_deref(), &e);
                    match client_fault(rt, &e, overflow) {
                        Some(fault) => Outcome::ClientFault(fault),
                        None => Outcome::Failed(Failure::Error(e.retry_class()), failed(&sent, &e, record)),
                    }
                }
            }
        }
    }

    /// Asks the planner for the next attempt: its target, or the refusal to answer with
    /// (`Err(None)`: answer with the last attempt's error).
    #[allow(clippy::too_many_arguments)]
    fn plan_next(
        &self,
        rt: &Snapshot,
        plan: &RoutePlan<'_>,
        tried: &[Tried],
        policy: &Policy<'_>,
        headers: SentFields<'_>,
        body: Option<&[u8]>,
        record: &AccessRecord,
    ) -> Result<(Target, Option<FailoverReason>), Option<ProxyError>> {
        let view = LiveView {
            rt,
            budget: &self.budget,
            headers,
            body,
        };
        match attempt::next_attempt(&view, plan, tried, policy, |k| fastrand::usize(..k)) {
            Attempt::Send { target, retry, reason } => {
                if retry {
                    self.shared.metrics.retries.inc();
                }
                Ok((target, reason))
            }
            // Once no candidate is left (none was available, or every one failed), the
            // answer is 503, whatever the last attempt's error was.
            Attempt::Refuse(NoRegion::ResidencyUnavailable { zone }) => Err(Some(ProxyError::ResidencyUnavailable {
                zone: self.residency_rejection(rt, zone, "unavailable"),
            })),
            // `region` only where one was tried (SPEC): a request nothing was sent for names none.
            Attempt::Refuse(NoRegion::NoRegionAvailable) => Err(Some(ProxyError::NoRegionAvailable {
                region: record.region.as_deref().map(str::to_string),
            })),
            Attempt::Stop(why) => {
                tracing::debug!(?why, "no further attempt");
                Err(None)
            }
        }
    }

    /// Notes an attempt in the access record; the names the log and metrics use.
    fn sent(
        &self,
        rt: &Snapshot,
        target: Target,
        reason: Option<FailoverReason>,
        record: &mut AccessRecord,
        before: usize,
    ) -> Sent {
        let (region, health) = self.target_names(rt, target);
        record.region = Some(region.clone());
        record.endpoint = health
            .as_ref()
            .map(|h| h.url.clone())
            .or_else(|| rt.fallback.as_ref().map(|f| Arc::from(f.config.endpoint.url.as_str())));
        record.attempts = before as u32 + 1;
        Sent {
            target,
            reason,
            region,
            health,
        }
    }

    /// The attempt's client span, when the request is traced; the endpoint continues it
    /// through the `traceparent` header.
    fn start_attempt_span(
        &self,
        record: &AccessRecord,
        attempt: usize,
        headers: &mut http::HeaderMap,
    ) -> Option<crate::observe::trace::AttemptSpan> {
        let trace = record.trace.as_ref()?;
        // Numbered from 1, as the access log's `attempts` counts them.
        let span = trace.attempt(attempt as u32 + 1);
        headers.insert(crate::observe::trace::TRACEPARENT, trace.traceparent(&span));
        Some(span)
    }

    /// Per-endpoint metrics of one attempt, the upstream status and failover reason for the
    /// log (kept when a later attempt fails too), and the end of the attempt's span.
    fn observe_attempt(
        &self,
        rt: &Snapshot,
        sent: &Sent,
        outcome: &Result<(Response<EndpointBody>, HeadTiming, Option<InFlight>), UpstreamError>,
        span: Option<crate::observe::trace::AttemptSpan>,
        record: &mut AccessRecord,
    ) {
        if let Target::Endpoint { region, endpoint } = sent.target {
            if let Some(e) = rt.regions.get(region).and_then(|r| r.endpoints.get(endpoint)) {
                e.metrics.attempt(
                    outcome
                        .as_ref()
                        .map(|(resp, timing, _)| (resp.status().as_u16(), timing.ttfb)),
                );
            }
        }
        record.upstream_status = outcome.as_ref().ok().map(|(resp, _, _)| resp.status().as_u16());
        if sent.reason.is_some() {
            record.failover_reason = sent.reason.map(FailoverReason::as_str);
        }
        if let (Some(t), Some(span)) = (record.trace.as_deref(), span) {
            span.end(
                t,
                crate::observe::trace::AttemptFields {
                    region: &sent.region,
                    endpoint: record.endpoint.as_deref().unwrap_or("-"),
                    status: record.upstream_status,
                    error: outcome.as_ref().err().map(|e| e.kind().as_str().to_string()),
                    failover_reason: sent.reason.map(FailoverReason::as_str),
                    ttfb: outcome.as_ref().ok().map(|(_, timing, _)| timing.ttfb),
                },
            );
        }
    }

    /// A failover counts against the first choice (and as a spillover when it was saturated).
    fn count_failover(&self, rt: &Snapshot, plan: &RoutePlan<'_>, sent: &Sent) {
        let from = plan.candidates.first().and_then(|c| rt.regions.get(c.region));
        let (Some(reason), Some(from)) = (sent.reason, from) else {
            return;
        };
        let metrics = &self.shared.metrics;
        metrics
            .failovers
            .with_label_values(&[&from.name, &sent.region, reason.as_str()])
            .inc();
        if reason == FailoverReason::Saturated {
            metrics.spillovers.with_label_values(&[&from.name, &sent.region]).inc();
        }
    }

    /// An attempt the endpoint's connection cap kept from being sent.
    fn not_sent(
        &self,
        rt: &Snapshot,
        target: Target,
        full: &dyn std::fmt::Display,
        record: &mut AccessRecord,
        tried: usize,
    ) -> ProxyError {
        let (region, _) = self.target_names(rt, target);
        tracing::debug!(region = %region, error = %full, "attempt not sent");
        record.attempts = tried as u32 + 1;
        ProxyError::NoRegionAvailable {
            region: Some(region.to_string()),
        }
    }

    /// The attempt whose answer goes to the client: what the access log and the failover
    /// counters say of it.
    fn answered(&self, rt: &Snapshot, plan: &RoutePlan<'_>, sent: &Sent, ttfb: Duration, record: &mut AccessRecord) {
        record.ttfb = Some(ttfb);
        record.failover_reason = sent.reason.map(FailoverReason::as_str);
        self.count_failover(rt, plan, sent);
    }

    /// Health feedback from a response head, and the endpoint's load report (taken out of
    /// the head).
    fn observe_answer(&self, rt: &Snapshot, sent: &Sent, resp: &mut Response<EndpointBody>, timing: HeadTiming) {
        let Some(h) = &sent.health else {
            return;
        };
        self.observe_response(rt, h, resp, timing);
        if let Target::Endpoint { region, .. } = sent.target {
            rt.take_load_report(region, h, |name| match resp.body_mut().fields_mut() {
                Some(fields) => fields.take(name),
                None => resp.headers_mut().remove(name),
            });
        }
    }

    /// Health feedback from a failed attempt; the client's own body says nothing of the endpoint.
    fn observe_error(&self, rt: &Snapshot, health: Option<&EndpointHealth>, e: &UpstreamError) {
        let event = match e.kind() {
            UpstreamErrorKind::HeadTimeout => Event::Timeout,
            UpstreamErrorKind::ConnectRefused
            | UpstreamErrorKind::ConnectTimeout
            | UpstreamErrorKind::Tls
            | UpstreamErrorKind::ResetBeforeHead
            | UpstreamErrorKind::Protocol => Event::ConnectError,
            UpstreamErrorKind::BreakerOpen
            | UpstreamErrorKind::NoFallback
            | UpstreamErrorKind::ClientBody
            | UpstreamErrorKind::ClientStalled => return,
        };
        if let Some(h) = health {
            self.shared.observe(rt, h, event);
        }
    }

    fn target_names(&self, rt: &Snapshot, target: Target) -> (Arc<str>, Option<Arc<EndpointHealth>>) {
        match target {
            Target::Endpoint { region, endpoint } => {
                let r = &rt.regions[region];
                (r.name.clone(), r.endpoints.get(endpoint).map(|e| e.health.clone()))
            }
            Target::Fallback => (Arc::from("fallback"), None),
        }
    }

    /// Sends one attempt; returns the response head, its time to first byte and the
    /// in-flight guard that lives as long as the response body.
    #[allow(clippy::manual_async_fn)] // why: the state size (`try_target`)
    fn forward(
        &self,
        rt: &Snapshot,
        target: Target,
        head: HeadView<'_>,
        body: RequestBody,
    ) -> impl Future<Output = Result<(Response<EndpointBody>, HeadTiming, Option<InFlight>), UpstreamError>> {
        async move {
            let upstream = upstream_of(rt, target)?;
            let timeout = rt.config.server.request_timeout;
            let request = match own_request(rt, target, &upstream, head, &body)? {
                Some((via, own)) => AttemptRequest::Own(via, own),
                None => AttemptRequest::Built(Box::new(endpoint_request(rt, target, &upstream, head, body)?)),
            };
            let inflight = match target {
                Target::Endpoint { region, endpoint } => Some(rt.regions[region].endpoints[endpoint].health.start()),
                Target::Fallback => None,
            };
            let sent = Instant::now();
            let resp = match request {
                AttemptRequest::Own(via, own) => {
                    // Clamped as tokio's own `timeout` does: a huge configured timeout must not
                    // overflow the deadline.
                    let deadline = sent + timeout.min(FAR_FUTURE);
                    upstream.pools.send_own(via, own, deadline).await
                }
                // Boxed: hyper's paths would size the hot path's future (and its copies) too.
                AttemptRequest::Built(req) => {
                    Box::pin(
                        upstream
                            .pools
                            .send_via(upstream.pooled, *req, upstream.protocol, timeout),
                    )
                    .await
                }
            };
            if let (Target::Fallback, Some(f)) = (target, rt.fallback.as_ref()) {
                let ok = resp.as_ref().is_ok_and(|r| r.status().as_u16() < 500);
                let result = if ok { "ok" } else { "error" };
                self.shared.metrics.fallback_requests.with_label_values(&[result]).inc();
                // The client's own broken body says nothing about the fallback.
                let client_side = resp.as_ref().is_err_and(|e| {
                    matches!(
                        e.kind(),
                        UpstreamErrorKind::ClientBody | UpstreamErrorKind::ClientStalled
                    )
                });
                if !client_side {
                    f.breaker.record(ok);
                }
            }
            let resp = resp?;
            let head = Instant::now();
            Ok((resp, HeadTiming::new(sent, head), inflight))
        }
    }

    fn observe_response(
        &self,
        rt: &Snapshot,
        health: &EndpointHealth,
        resp: &Response<EndpointBody>,
        timing: HeadTiming,
    ) {
        let status = resp.status().as_u16();
        if matches!(status, 429 | 503) {
            let value = match resp.body().fields() {
                Some(fields) => fields.get("retry-after"),
                None => resp.headers().get(header::RETRY_AFTER).map(HeaderValue::as_bytes),
            };
            if let Some(after) = value.and_then(retry_after) {
                self.shared
                    .observe_at(rt, health, Event::Shed { retry_after: after }, timing.head);
                return;
            }
        }
        let ttfb = timing.ttfb;
        self.shared
            .observe_at(rt, health, Event::Response { status, ttfb }, timing.head);
    }

    #[allow(clippy::too_many_arguments)]
    fn relay(
        &self,
        rt: &Arc<Snapshot>,
        target: Target,
        resp: Response<EndpointBody>,
        mut record: Box<AccessRecord>,
        started: Instant,
        (sent, inflight, slot): (Instant, Option<InFlight>, Option<EndpointSlot>),
        health: Option<Arc<EndpointHealth>>,
    ) -> Response<ResponseBody> {
        let (region_header, metrics) = match target {
            Target::Endpoint { region, .. } => (&rt.regions[region].header, rt.regions[region].metrics.clone()),
            Target::Fallback => match rt.fallback.as_ref() {
                Some(f) => (&f.header, f.metrics.clone()),
                None => return ProxyError::NoRegionAvailable { region: None }.response(rt.config.health.interval),
            },
        };
        let (mut parts, mut incoming) = resp.into_parts();
        record.status = parts.status.as_u16();
        if let Some(ttfb) = record.ttfb {
            metrics.ttfb.observe(ttfb.as_secs_f64());
        }
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            // A `101`'s rewrite keeps `Upgrade` and sets `Connection`: the map's.
            if let Some(fields) = incoming.take_fields() {
                fields.append_to(&mut parts.headers);
            }
        }
        let length = hyper::body::Body::size_hint(&incoming).exact();
        let end_stream = hyper::body::Body::is_end_stream(&incoming);
        // The endpoint's fields are in the map (hyper's client), or still over the head's
        // bytes (Meridian's own HTTP/1.1 reading): rewritten where they are.
        let content_type = match incoming.fields_mut() {
            Some(fields) => {
                rewrite::response_fields(fields, region_header, record.attempts);
                fields.get("content-type")
            }
            None => {
                rewrite::response_headers(&mut parts.headers, region_header, record.attempts, switching);
                parts.headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes)
            }
        };
        let scanner =
            UsageScanner::for_response(content_type, length, end_stream, rt.config.server.max_buffered_answer);
        let sse = scanner.is_sse();
        // TTFT and TPOT count from the attempt's send time.
        let head = record.ttfb.unwrap_or_default();
        let done = Box::write(
            Box::new_uninit(),
            Done {
                shared: self.shared.clone(),
                runtime: rt.clone(),
                metrics,
                record,
                started,
                sent,
                head,
                _inflight: inflight,
                _slot: slot,
                health,
            },
        );
        let body = UpstreamBody::new(incoming, rt.config.server.stall_timeout, sse, scanner, done);
        Response::from_parts(parts, ResponseBody::Upstream(body))
    }

    /// Answers with Meridian's own error, counting and logging it.
    fn refuse(&self, err: ProxyError, mut record: Box<AccessRecord>, started: Instant) -> Response<ResponseBody> {
        let mut resp: Response<ResponseBody> = err.response(self.shared.snapshot().config.health.interval);
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
        let bytes_out = hyper::body::Body::size_hint(resp.body()).exact().unwrap_or(0);
        // Residency refusals are Meridian's answer, not a region's: `none`, as documented.
        let region = match record.region.as_deref() {
            Some(r) if !err.is_residency() => r,
            _ => "none",
        };
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
        let metrics = &self.shared.metrics;
        metrics
            .request_bytes
            .with_label_values(&[region])
            .inc_by(record.bytes_in);
        metrics.response_bytes.with_label_values(&[region]).inc_by(bytes_out);
        record.end_trace();
        if self.shared.snapshot().config.log.access_log {
            record.emit(started.elapsed(), bytes_out, "local");
        }
        resp
    }

    /// Counts a request refused to keep a zone's client inside it; returns the zone's name.
    /// `kind`: `route_rule` (403: a rule sends the path outside the zone, by design) or
    /// `unavailable` (503: no region of the zone can serve), so alerts page on the latter.
    fn residency_rejection(&self, rt: &Snapshot, zone: usize, kind: &'static str) -> String {
        let name = rt.table.zone_name(zone).to_string();
        self.shared
            .metrics
            .residency_rejections
            .with_label_values(&[&name, kind])
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
    runtime: Arc<Snapshot>,
    metrics: Arc<RegionMetrics>,
    record: Box<AccessRecord>,
    started: Instant,
    /// When the attempt that answered was sent, and its time to the response head.
    sent: Instant,
    head: Duration,
    _inflight: Option<InFlight>,
    /// The endpoint's request slot: freed when the response body ends or is dropped.
    _slot: Option<EndpointSlot>,
    health: Option<Arc<EndpointHealth>>,
}

impl Completion for Done {
    fn complete(mut self: Box<Self>, end: StreamEnd, bytes: u64, scanned: Scanned) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.started);
        self.metrics.count(self.record.status);
        self.metrics.duration.observe(elapsed.as_secs_f64());
        self.metrics.bytes_in.inc_by(self.record.bytes_in);
        self.metrics.bytes_out.inc_by(bytes);
        let latency = usage::measure(&scanned, self.sent, self.head, now);
        let ok = self.record.status < 400;
        if ok {
            self.record.ttft = latency.first_token;
            self.record.tpot = latency.per_token;
            self.record.output_tokens = latency.output_tokens;
            self.record.prompt_tokens = scanned.usage.prompt_tokens;
            if end == StreamEnd::Complete {
                self.metrics.observe_answer(&latency);
            }
        }
        if let Some(h) = &self.health {
            // Only a response relayed to its end proves the endpoint; a stall counts against it.
            let event = match end {
                StreamEnd::Stalled | StreamEnd::UpstreamError => Some(Event::StreamError),
                StreamEnd::Complete if self.record.status < 500 => Some(Event::Completed),
                StreamEnd::Complete | StreamEnd::ClientGone => None,
            };
            let answered = usage::answer(end, ok, &scanned, &latency, self.sent, now).map(Event::Answered);
            self.shared.observe_each_at(&self.runtime, h, [event, answered], now);
        }
        self.record.end_trace();
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
async fn enter_endpoint(rt: &Snapshot, target: Target) -> Result<Option<EndpointSlot>, Full> {
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

/// Filters `plan` to the regions serving the model the request body names (docs/inference.md, "Models");
/// the model is read in place from the body kept for replay.
fn filter_by_model(
    rt: &Snapshot,
    plan: &mut RoutePlan<'_>,
    parts: &http::request::Parts,
    body: &RequestBody,
) -> Result<(), ProxyError> {
    use crate::route::models::{self, ModelRefusal};
    if !models::reads_model(&rt.config, &parts.method, parts.uri.path()) {
        return Ok(());
    }
    let Some(model) = body.kept().and_then(models::request_model) else {
        return Ok(());
    };
    let fallback_usable = rt.fallback.is_some();
    models::filter_plan(plan, |r| rt.region_serves(r, model), rt.regions.len(), fallback_usable).map_err(|refusal| {
        match refusal {
            ModelRefusal::NotInZone { zone } => ProxyError::ModelNotAvailableInZone {
                zone: rt.table.zone_name(zone).to_string(),
                model: model.to_string(),
            },
            ModelRefusal::NotFound => ProxyError::ModelNotFound {
                model: model.to_string(),
            },
        }
    })
}

fn rewrite_fallback_path(rt: &Snapshot, base: &str, path: &str) -> PathAndQuery {
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
fn retry_after(value: &[u8]) -> Option<Duration> {
    let secs: u64 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
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

/// Where an attempt's request goes: the endpoint's (or fallback's) address and pools.
struct Upstream<'a> {
    scheme: &'a http::uri::Scheme,
    authority: &'a http::uri::Authority,
    base: &'a str,
    protocol: UpstreamProtocol,
    pools: &'a Upstreams,
    /// The endpoint's idle connections, resolved with the config (none for the fallback).
    pooled: Option<&'a PooledEndpoint>,
}

fn upstream_of(rt: &Snapshot, target: Target) -> Result<Upstream<'_>, UpstreamError> {
    match target {
        Target::Endpoint { region, endpoint } => {
            let e = &rt.regions[region].endpoints[endpoint];
            Ok(Upstream {
                scheme: &e.config.scheme,
                authority: &e.config.authority,
                base: e.config.base_path.as_str(),
                protocol: e.config.protocol,
                pools: &rt.upstreams,
                pooled: e.pooled.as_ref(),
            })
        }
        Target::Fallback => {
            let f = rt
                .fallback
                .as_ref()
                .ok_or_else(|| UpstreamError::bare(UpstreamErrorKind::NoFallback))?;
            // Another request took the half-open trial since selection looked: nothing is
            // sent, and the next selection no longer offers the fallback.
            if f.breaker.admit() == Admission::Rejected {
                return Err(UpstreamError::bare(UpstreamErrorKind::BreakerOpen));
            }
            Ok(Upstream {
                scheme: &f.config.endpoint.scheme,
                authority: &f.config.endpoint.authority,
                base: f.config.endpoint.base_path.as_str(),
                protocol: UpstreamProtocol::Http1,
                pools: &f.upstreams,
                pooled: None,
            })
        }
    }
}

/// One attempt's look at the client's head: its parts, its listed fields, what Meridian adds.
#[derive(Clone, Copy)]
struct HeadView<'a> {
    parts: &'a http::request::Parts,
    listed: Option<&'a HeadFields>,
    added: &'a AddedFields,
}

impl<'a> HeadView<'a> {
    fn fields(self) -> RequestFields<'a> {
        RequestFields::new(self.listed, &self.parts.headers)
    }
}

/// What one attempt sends.
enum AttemptRequest<'a> {
    /// Borrowed from the client's request, for Meridian's own HTTP/1.1 exchange.
    Own(&'a PooledEndpoint, OwnRequest<'a>),
    /// Built for hyper's clients (HTTP/2, streamed bodies, upgrades) and the fallback; boxed,
    /// as it would double the hot path's share of the attempt's state.
    Built(Box<Request<RequestBody>>),
}

/// The hot path's request, when the attempt can take it: a whole body (none, or kept, with
/// no trailers) to an HTTP/1.1 endpoint through its resolved idle stack, not an upgrade. It
/// borrows the client's head, so it sends what [`endpoint_request`] would build (the path
/// under the endpoint's base, the region's load-report field) without copying the headers.
fn own_request<'a>(
    rt: &Snapshot,
    target: Target,
    upstream: &Upstream<'a>,
    head: HeadView<'a>,
    body: &RequestBody,
) -> Result<Option<(&'a PooledEndpoint, OwnRequest<'a>)>, UpstreamError> {
    let HeadView { parts, added, .. } = head;
    let Target::Endpoint { region, .. } = target else {
        return Ok(None);
    };
    let Some(via) = upstream.pooled.filter(|via| upstream.pools.owns(via)) else {
        return Ok(None);
    };
    if upstream.protocol != UpstreamProtocol::Http1 || added.upgrade {
        return Ok(None);
    }
    let Some(whole) = body.whole() else {
        return Ok(None);
    };
    let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let path = if upstream.base.is_empty() {
        Cow::Borrowed(path)
    } else {
        let joined = under_base(upstream.base, path).map_err(|e| UpstreamError::new(UpstreamErrorKind::Protocol, e))?;
        Cow::Owned(joined.as_str().to_owned())
    };
    Ok(Some((
        via,
        OwnRequest {
            method: &parts.method,
            path,
            headers: head.fields(),
            extra: rt.load_report_field(region),
            added: Some(added),
            body: whole,
        },
    )))
}

/// The request one attempt sends: the client's, re-addressed to `upstream`.
fn endpoint_request(
    rt: &Snapshot,
    target: Target,
    upstream: &Upstream<'_>,
    head: HeadView<'_>,
    body: RequestBody,
) -> Result<Request<RequestBody>, UpstreamError> {
    let HeadView { parts, added, .. } = head;
    let base = upstream.base;
    let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let path_and_query = match target {
        Target::Fallback => rewrite_fallback_path(rt, base, path),
        // The client's path as parsed: no copy.
        Target::Endpoint { .. } if base.is_empty() => parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        Target::Endpoint { .. } => {
            under_base(base, path).map_err(|e| UpstreamError::new(UpstreamErrorKind::Protocol, e))?
        }
    };
    let mut req = to_endpoint(
        upstream.scheme,
        upstream.authority,
        path_and_query,
        upstream_protocol(upstream.protocol, added.upgrade),
        parts.method.clone(),
        body,
    )
    .map_err(|e| UpstreamError::new(UpstreamErrorKind::Protocol, e))?;
    *req.headers_mut() = head.fields().to_map(4);
    added.apply(req.headers_mut());
    match (target, rt.fallback.as_ref()) {
        (Target::Endpoint { region, .. }, _) => rt.ask_for_load_report(region, req.headers_mut()),
        (Target::Fallback, Some(f)) => {
            if let Ok(host) = HeaderValue::from_str(f.config.endpoint.authority.as_str()) {
                req.headers_mut().insert(header::HOST, host);
            }
            for (name, value) in &f.config.headers {
                req.headers_mut().insert(name.clone(), value.clone());
            }
        }
        (Target::Fallback, None) => {}
    }
    Ok(req)
}

/// Upgrades exist only in HTTP/1.1, whatever the region speaks otherwise.
fn upstream_protocol(configured: UpstreamProtocol, upgrade: bool) -> UpstreamProtocol {
    if upgrade { UpstreamProtocol::Http1 } else { configured }
}

/// The request head as endpoints get it (Host, hop-by-hop fields gone) with the fields
/// Meridian adds beside it (forwarding fields, request id); the client's side of an
/// upgrade, bridged once the endpoint answers 101.
fn prepare_head(
    (parts, listed): (&mut http::request::Parts, Option<&mut HeadFields>),
    has_host: bool,
    fwd: &Forwarding,
    record: &mut AccessRecord,
) -> (AddedFields, Option<upgrade::ClientUpgrade>) {
    if !has_host {
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
    // Only a request whose server left a way to take its connection over can be an upgrade:
    // Meridian's HTTP/1.1 server does so only for one, so most requests skip the lookups.
    let upgrade =
        !parts.extensions.is_empty() && upgrade::is_upgrade(RequestFields::new(listed.as_deref(), &parts.headers));
    let client_upgrade = if upgrade {
        upgrade::ClientUpgrade::take(&mut parts.extensions)
    } else {
        None
    };
    let (request_id, added) = rewrite::rewrite_request((&mut parts.headers, listed), fwd, upgrade);
    record.request_id = request_id;
    (added, client_upgrade)
}

/// The request body: kept whole for replay when small enough, else streamed.
async fn read_body(
    config: &crate::config::Config,
    incoming: ClientBody,
) -> Result<(RequestBody, Option<Arc<AtomicBool>>), ProxyError> {
    // The length the head declared, as the server that read the head took it: not looked
    // up again in the map.
    let declared = hyper::body::Body::size_hint(&incoming).exact();
    let limit = config.server.max_request_body;
    let body_timeout = config.server.body_timeout;
    match body::prepare(incoming, declared, limit, body_timeout).await {
        Ok(prepared) => Ok(prepared),
        Err(BodyError::TooLarge) => Err(ProxyError::BodyTooLarge { limit }),
        Err(BodyError::ClientStalled(_)) => Err(ProxyError::BodyTimeout),
        Err(BodyError::Client(_) | BodyError::Upstream(_) | BodyError::Stalled(_) | BodyError::SendTimeout(_)) => {
            Err(ProxyError::BadRequest("the request body could not be read"))
        }
    }
}

/// The retry policy of one request, as data for the planner.
fn attempt_policy<'a>(
    rt: &Snapshot,
    (parts, listed): (&http::request::Parts, Option<&HeadFields>),
    body: &RequestBody,
    skips: &'a [usize],
) -> Policy<'a> {
    Policy {
        max_attempts: rt.config.retry.max_attempts,
        // The one place the replay rules (docs/security.md) are applied.
        replay: crate::retry::may_replay(
            &parts.method,
            RequestFields::new(listed, &parts.headers),
            parts.uri.path(),
            &rt.config.retry.replay_paths,
        ),
        body_kept: body.replay().is_some(),
        panic_mode: rt.config.health.panic_mode,
        slow_start_skips: skips,
    }
}

/// Slow start: a region that just came back takes only a growing share of its clients; the
/// others keep going where they went while it was away. Drawn once per request.
fn slow_start_skips(rt: &Snapshot, plan: &RoutePlan<'_>) -> Skips {
    let window = rt.config.health.slow_start;
    let ramp = |r: usize| rt.regions.get(r).map_or(1.0, |region| region.health.ramp(window));
    attempt::slow_start_skips(plan, ramp, fastrand::f64)
}

/// An attempt that failed on the client's side: its body was too large or stalled. Answered
/// as such, never retried elsewhere and never held against the endpoint.
fn client_fault(rt: &Snapshot, e: &UpstreamError, overflow: Option<&AtomicBool>) -> Option<ProxyError> {
    if overflow.is_some_and(|o| o.load(std::sync::atomic::Ordering::Acquire)) {
        let limit = rt.config.server.max_request_body;
        return Some(ProxyError::BodyTooLarge { limit });
    }
    (e.kind() == UpstreamErrorKind::ClientStalled).then_some(ProxyError::BodyTimeout)
}

/// A failed attempt in the log (debug) and the access record; the error the client gets if
/// nothing else answers.
fn failed(sent: &Sent, e: &UpstreamError, record: &mut AccessRecord) -> ProxyError {
    tracing::debug!(region = %sent.region, error = %e.detail(), "attempt failed");
    record.error_detail = Some(e.detail());
    upstream_error(sent.region.to_string(), e)
}

/// Meridian's answer for a failed attempt: the kind's stable text, never the OS error.
fn upstream_error(region: String, e: &UpstreamError) -> ProxyError {
    match e.kind() {
        UpstreamErrorKind::HeadTimeout => ProxyError::UpstreamTimeout { region },
        kind @ (UpstreamErrorKind::ConnectRefused
        | UpstreamErrorKind::ConnectTimeout
        | UpstreamErrorKind::Tls
        | UpstreamErrorKind::ResetBeforeHead
        | UpstreamErrorKind::Protocol
        | UpstreamErrorKind::BreakerOpen
        | UpstreamErrorKind::NoFallback
        | UpstreamErrorKind::ClientBody
        | UpstreamErrorKind::ClientStalled) => ProxyError::UpstreamUnreachable {
            region,
            reason: kind.as_str(),
        },
    }
}
