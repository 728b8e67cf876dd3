//! Metric names (DESIGN.md section 4), their descriptions, and the per-gateway recorder.
//!
//! Each gateway (`gateway::Gateway`) owns its own Prometheus recorder instead of a
//! process-global one, so gateways started side by side (tests) keep separate numbers.
//! Labels are bounded sets: route names from the config and `&'static str` reasons.
//! Hot-path handles (messages, bytes) are created once per session, not per message.

use metrics::{Counter, Gauge, Histogram, Key, Label, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub const CONNECTIONS_ACCEPTED: &str = "wsgate_connections_accepted_total";
pub const CONNECTIONS_ACTIVE: &str = "wsgate_connections_active";
pub const CONNECTIONS_REJECTED: &str = "wsgate_connections_rejected_total";
pub const AUTH_FAILURES: &str = "wsgate_auth_failures_total";
pub const ERRORS: &str = "wsgate_errors_total";
pub const MESSAGES: &str = "wsgate_messages_total";
pub const BYTES: &str = "wsgate_bytes_total";
pub const CLOSES: &str = "wsgate_closes_total";
pub const HANDSHAKE_DURATION: &str = "wsgate_handshake_duration_seconds";
pub const CONNECTION_DURATION: &str = "wsgate_connection_duration_seconds";
pub const UPSTREAM_CONNECT_DURATION: &str = "wsgate_upstream_connect_duration_seconds";
pub const CONFIG_RELOADS: &str = "wsgate_config_reloads_total";
pub const BUILD_INFO: &str = "wsgate_build_info";
pub const JWKS_REFRESHES: &str = "wsgate_jwks_refreshes_total";
pub const LIMITER_EVICTIONS: &str = "wsgate_limiter_evictions_total";
pub const ADMIN_REQUESTS: &str = "wsgate_admin_requests_total";
pub const CLUSTER_UP: &str = "wsgate_cluster_up";
pub const CLUSTER_OPS: &str = "wsgate_cluster_ops_total";
pub const CLUSTER_OP_DURATION: &str = "wsgate_cluster_op_duration_seconds";
pub const CLUSTER_MODE: &str = "wsgate_cluster_mode";
pub const MESSAGES_REJECTED: &str = "wsgate_messages_rejected_total";
pub const TLS_CERT_EXPIRY: &str = "wsgate_tls_certificate_expiry_timestamp_seconds";
pub const ACME_ORDERS: &str = "wsgate_acme_orders_total";
pub const CONNECTIONS_MAX: &str = "wsgate_connections_max";
pub const WORKER_CONNECTIONS: &str = "wsgate_worker_connections";
pub const HTTP_REQUESTS: &str = "wsgate_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "wsgate_http_request_duration_seconds";
pub const UPSTREAM_SESSIONS: &str = "wsgate_upstream_sessions";
pub const UPSTREAM_UP: &str = "wsgate_upstream_up";
pub const UPSTREAM_DRAINED: &str = "wsgate_upstream_drained";
pub const UPSTREAM_HEALTH_CHECKS: &str = "wsgate_upstream_health_checks_total";
pub const COMPRESSED_BYTES: &str = "wsgate_compressed_bytes_total";
pub const TOKEN_REFRESHES: &str = "wsgate_token_refreshes_total";
pub const PROVIDER_REQUESTS: &str = "wsgate_provider_requests_total";
/// The process metrics below come from `metrics-process` (its names and help texts), read
/// on each scrape; listed here so the alert rules and the dashboard have one place to look.
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";
pub const PROCESS_START_TIME: &str = "process_start_time_seconds";

const DESCRIPTIONS: &[(&str, &str)] = &[
    (CONNECTIONS_ACCEPTED, "TCP connections accepted on the wss listeners."),
    (CONNECTIONS_ACTIVE, "WebSocket sessions currently relayed, by route."),
    (CONNECTIONS_REJECTED, "Connections refused before the 101, by reason."),
    (AUTH_FAILURES, "Failed token checks, by route and reason."),
    (
        PROVIDER_REQUESTS,
        "Checks by an auth provider (forward auth, introspection), by provider and result (allow, deny: refused or inactive, error, timeout, cache_hit).",
    ),
    (ERRORS, "Errors that ended or disturbed a session, by kind."),
    (MESSAGES, "Data messages relayed, by route and direction."),
    (BYTES, "Payload bytes relayed, by route and direction."),
    (CLOSES, "Sessions closed, by route, close code and who initiated the close."),
    (HANDSHAKE_DURATION, "Time from TCP accept to the 101 response."),
    (CONNECTION_DURATION, "Length of relayed sessions, by route."),
    (
        UPSTREAM_CONNECT_DURATION,
        "Time to connect to an upstream and complete its WebSocket handshake.",
    ),
    (CONFIG_RELOADS, "Configuration reloads, by result."),
    (
        UPSTREAM_SESSIONS,
        "Live WebSocket sessions per upstream, by route and upstream (its index in the route's list).",
    ),
    (
        UPSTREAM_UP,
        "1 while an upstream is chosen, 0 while it is out (back-off after failures, failing its health_check, or drained), by route and upstream index.",
    ),
    (
        UPSTREAM_DRAINED,
        "1 while an upstream is drained (POST /v1/upstreams/drain), by route and upstream index: alerts tell a drain from a failure with it.",
    ),
    (
        UPSTREAM_HEALTH_CHECKS,
        "Active health checks (health_check) of upstreams, by route, upstream index and result (pass, fail).",
    ),
    (
        HTTP_REQUESTS,
        "Plain HTTP requests on routes with http = true, by route and status class (1xx..5xx), refusals included.",
    ),
    (
        HTTP_REQUEST_DURATION,
        "Time of plain HTTP exchanges, by route: from the request head to the last byte of the answer.",
    ),
    (
        CONNECTIONS_MAX,
        "The configured server.max_connections: connections beyond it are refused (503).",
    ),
    (
        WORKER_CONNECTIONS,
        "Client connections open on each worker thread (server.workers), by worker (1..N): how evenly they are spread.",
    ),
    (BUILD_INFO, "Always 1; the version label names the running build."),
    (
        JWKS_REFRESHES,
        "JWKS URL fetches, by result; on failure the last good key set stays in use.",
    ),
    (
        MESSAGES_REJECTED,
        "Client messages refused by route validation (never sent upstream), by route and reason.",
    ),
    (ADMIN_REQUESTS, "Admin API requests (section 9 of DESIGN.md), by action and result."),
    (CLUSTER_UP, "1 while Redis answers (cluster mode), else 0."),
    (
        CLUSTER_MODE,
        "How shared limits are enforced now: 1 for the mode in force (shared, local, open, closed).",
    ),
    (
        CLUSTER_OPS,
        "Cluster mode Redis operations, by op (admit, release, ban, revoke, sync, heartbeat, probe) and result (ok, error, timeout).",
    ),
    (
        CLUSTER_OP_DURATION,
        "Time of each cluster mode Redis operation, by op (the connect path's admits included).",
    ),
    (
        TLS_CERT_EXPIRY,
        "notAfter of the certificate the wss listeners serve (files or ACME), Unix time; 0 while none is (ACME before its first issuance). Unlabelled: the soonest of all; with [[tls.certificates]], one series per certificate by its index (certificate=\"0\", ...; \"acme\" for ACME's), NaN once a reload removed it.",
    ),
    (
        ACME_ORDERS,
        "ACME certificate orders, by result (issued, failed); a failed order keeps the current certificate.",
    ),
    (
        COMPRESSED_BYTES,
        "Sessions with permessage-deflate only: payload bytes of their messages on the compressed hop's wire (form=wire) and the same messages uncompressed (form=payload), by route and direction; wire/payload is the ratio.",
    ),
    (
        TOKEN_REFRESHES,
        "Live token refreshes on routes with refresh = true, by route and result: ok, or why it was refused (an auth failure reason, other_identity, not_allowed); a refused one closes the session with 1008.",
    ),
    (
        LIMITER_EVICTIONS,
        "Client addresses the per-IP rate limiter forgot early because it was full (coldest first).",
    ),
];

/// Direction of a relayed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::ClientToUpstream => "client_to_upstream",
            Direction::UpstreamToClient => "upstream_to_client",
        }
    }
}

/// The gateway's metrics: a recorder and the handle that renders it.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    accepted: Counter,
    handshake: Histogram,
    /// `certificate` labels of the expiry gauge set so far (indices below this).
    cert_series: Arc<std::sync::atomic::AtomicUsize>,
    /// Each route's plain-request series, resolved on its first request (a request then
    /// counts without building label sets). Grows with route names only.
    http_routes: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<HttpRouteMetrics>>>>,
    process: metrics_process::Collector,
}

/// One route's plain-request series ([`Metrics::http_route`]).
pub struct HttpRouteMetrics {
    pub route: Arc<str>,
    /// `wsgate_http_requests_total` by status class (1xx..5xx), each registered on first use.
    codes: [std::sync::OnceLock<Counter>; 5],
    duration: Histogram,
    metrics: Metrics,
}

impl HttpRouteMetrics {
    /// One plain HTTP request answered (or refused) with `status`.
    pub fn request(&self, status: u16) {
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let i = usize::from((status / 100).clamp(1, 5) - 1);
        self.codes[i]
            .get_or_init(|| self.metrics.counter(HTTP_REQUESTS, &[("route", &self.route), ("code", CLASSES[i])]))
            .increment(1);
    }

    pub fn duration(&self, seconds: f64) {
        self.duration.record(seconds);
    }
}

/// Per-session counters, resolved once when the session starts.
pub struct SessionMetrics {
    pub messages: [Counter; 2],
    pub bytes: [Counter; 2],
    pub active: Gauge,
    /// Refused client messages by [`crate::error::MessageRejection::index`]: only on
    /// routes with `[routes.validate]` (see [`Metrics::rejections`]).
    pub rejected: Option<[Counter; 4]>,
    /// The session's own running totals, for the admin API's session list.
    pub live: Option<std::sync::Arc<LiveCounters>>,
    /// `wsgate_compressed_bytes_total` by direction, then form (wire, payload): only for
    /// a session with permessage-deflate (see [`Metrics::compressed`]).
    pub compressed: Option<Box<[[Counter; 2]; 2]>>,
}

const SECONDS_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const SESSION_BUCKETS: &[f64] = &[0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0];
/// HTTP exchanges: long polls (25 s for Socket.IO) must land in a bucket of their own.
const HTTP_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let builder = PrometheusBuilder::new()
            .set_buckets(SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(CONNECTION_DURATION.into()),
                    SESSION_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(HTTP_REQUEST_DURATION.into()),
                    HTTP_BUCKETS,
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = Arc::new(builder.build_recorder());
        let handle = recorder.handle();
        for (name, help) in DESCRIPTIONS {
            let help = SharedString::from(*help);
            let unit = name.ends_with("_seconds").then_some(Unit::Seconds);
            if name.ends_with("_total") {
                recorder.describe_counter((*name).into(), unit, help);
            } else if name.ends_with("_seconds") && *name != TLS_CERT_EXPIRY {
                recorder.describe_histogram((*name).into(), unit, help);
            } else {
                recorder.describe_gauge((*name).into(), unit, help);
            }
        }
        let meta = metadata();
        let accepted = recorder.register_counter(&Key::from_name(CONNECTIONS_ACCEPTED), &meta);
        accepted.increment(0);
        let handshake = recorder.register_histogram(&Key::from_name(HANDSHAKE_DURATION), &meta);
        let build = recorder.register_gauge(
            &Key::from_parts(BUILD_INFO, vec![Label::new("version", env!("CARGO_PKG_VERSION"))]),
            &meta,
        );
        build.set(1.0);
        let process = metrics_process::Collector::default();
        metrics::with_local_recorder(recorder.as_ref(), || process.describe());
        let m = Metrics {
            recorder,
            handle,
            accepted,
            handshake,
            cert_series: Arc::default(),
            http_routes: Arc::default(),
            process,
        };
        m.counter(CONFIG_RELOADS, &[("result", "success")]).increment(0);
        m.counter(CONFIG_RELOADS, &[("result", "failure")]).increment(0);
        m.counter(LIMITER_EVICTIONS, &[]).increment(0);
        m
    }

    /// The Prometheus text exposition of every metric, the process metrics read now.
    pub fn render(&self) -> String {
        metrics::with_local_recorder(self.recorder.as_ref(), || self.process.collect());
        self.handle.render()
    }

    /// The configured connection cap (set at start and on every reload).
    pub fn connections_max(&self, max: usize) {
        self.recorder
            .register_gauge(&Key::from_name(CONNECTIONS_MAX), &metadata())
            .set(max as f64);
    }

    /// Connections open on each worker thread, `open[i]` on worker `i + 1`.
    pub fn worker_connections(&self, open: &[usize]) {
        for (i, n) in open.iter().enumerate() {
            let key = Key::from_parts(WORKER_CONNECTIONS, vec![Label::new("worker", (i + 1).to_string())]);
            self.recorder.register_gauge(&key, &metadata()).set(*n as f64);
        }
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect();
        self.recorder.register_counter(&Key::from_parts(name, labels), &metadata())
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect();
        self.recorder.register_histogram(&Key::from_parts(name, labels), &metadata())
    }

    pub fn accepted(&self) {
        self.accepted.increment(1);
    }

    pub fn rejected(&self, reason: &'static str) {
        self.counter(CONNECTIONS_REJECTED, &[("reason", reason)]).increment(1);
    }

    pub fn auth_failure(&self, route: &str, reason: &'static str) {
        self.counter(AUTH_FAILURES, &[("route", route), ("reason", reason)]).increment(1);
    }

    /// A live refresh on `route`: `ok`, or why it was refused (a bounded set of labels).
    pub fn token_refresh(&self, route: &str, result: &'static str) {
        self.counter(TOKEN_REFRESHES, &[("route", route), ("result", result)]).increment(1);
    }

    pub fn error(&self, kind: &'static str) {
        self.counter(ERRORS, &[("kind", kind)]).increment(1);
    }

    pub fn closed(&self, route: &str, code: u16, initiator: &'static str) {
        self.counter(
            CLOSES,
            &[("route", route), ("code", close_code_label(code)), ("initiator", initiator)],
        )
        .increment(1);
    }

    pub fn handshake_done(&self, seconds: f64) {
        self.handshake.record(seconds);
    }

    pub fn session_duration(&self, route: &str, seconds: f64) {
        self.histogram(CONNECTION_DURATION, &[("route", route)]).record(seconds);
    }

    /// The plain-request series of `route`.
    pub fn http_route(&self, route: &str) -> Arc<HttpRouteMetrics> {
        let mut routes = crate::util::lock(&self.http_routes);
        if let Some(m) = routes.get(route) {
            return m.clone();
        }
        let m = Arc::new(HttpRouteMetrics {
            route: route.into(),
            codes: Default::default(),
            duration: self.histogram(HTTP_REQUEST_DURATION, &[("route", route)]),
            metrics: self.clone_without_routes(),
        });
        routes.insert(route.to_string(), m.clone());
        m
    }

    /// A handle that registers series but keeps no route cache (held by the cache's
    /// own entries, which would otherwise hold the cache).
    fn clone_without_routes(&self) -> Metrics {
        Metrics {
            http_routes: Arc::default(),
            ..self.clone()
        }
    }

    /// One active health check of upstream `index` of `route`.
    pub fn health_check(&self, route: &str, index: usize, pass: bool) {
        let index = index.to_string();
        let result = if pass { "pass" } else { "fail" };
        self.counter(
            UPSTREAM_HEALTH_CHECKS,
            &[("route", route), ("upstream", &index), ("result", result)],
        )
        .increment(1);
    }

    /// One upstream's state, read when the metrics are rendered.
    pub fn upstream_state(&self, route: &str, index: usize, sessions: usize, (up, drained): (bool, bool)) {
        let labels = || vec![Label::new("route", route.to_string()), Label::new("upstream", index.to_string())];
        self.recorder
            .register_gauge(&Key::from_parts(UPSTREAM_SESSIONS, labels()), &metadata())
            .set(sessions as f64);
        self.recorder
            .register_gauge(&Key::from_parts(UPSTREAM_UP, labels()), &metadata())
            .set(if up { 1.0 } else { 0.0 });
        self.recorder
            .register_gauge(&Key::from_parts(UPSTREAM_DRAINED, labels()), &metadata())
            .set(if drained { 1.0 } else { 0.0 });
    }

    pub fn upstream_connect(&self, route: &str, seconds: f64) {
        self.histogram(UPSTREAM_CONNECT_DURATION, &[("route", route)]).record(seconds);
    }

    /// One check by `provider` (a configured name, never a client's value).
    pub fn provider_request(&self, provider: &str, result: &'static str) {
        self.counter(PROVIDER_REQUESTS, &[("provider", provider), ("result", result)])
            .increment(1);
    }

    pub fn jwks_refresh(&self, ok: bool) {
        self.counter(JWKS_REFRESHES, &[("result", if ok { "success" } else { "failure" })])
            .increment(1);
    }

    /// The rate limiter's evictions so far (a running total kept by the limiter).
    pub fn limiter_evictions(&self, total: u64) {
        self.counter(LIMITER_EVICTIONS, &[]).absolute(total);
    }

    pub fn cluster_up(&self, up: bool) {
        self.recorder
            .register_gauge(&Key::from_name(CLUSTER_UP), &metadata())
            .set(if up { 1.0 } else { 0.0 });
    }

    /// Mark `mode` as the one in force (`shared`, `local`, `open`, `closed`).
    pub fn cluster_mode(&self, mode: &str) {
        for m in ["shared", "local", "open", "closed"] {
            self.recorder
                .register_gauge(&Key::from_parts(CLUSTER_MODE, vec![Label::new("mode", m)]), &metadata())
                .set(if m == mode { 1.0 } else { 0.0 });
        }
    }

    /// One Redis call of cluster mode: counted by result, its time observed by op.
    pub fn cluster_op(&self, op: &'static str, result: &'static str, took: std::time::Duration) {
        self.counter(CLUSTER_OPS, &[("op", op), ("result", result)]).increment(1);
        self.histogram(CLUSTER_OP_DURATION, &[("op", op)]).record(took.as_secs_f64());
    }

    /// One admin API request: `action` and `result` are from fixed sets.
    pub fn admin_request(&self, action: &'static str, result: &'static str) {
        self.counter(ADMIN_REQUESTS, &[("action", action), ("result", result)]).increment(1);
    }

    /// The served certificate's notAfter (Unix seconds); `None`: no certificate yet.
    pub fn certificate_expiry(&self, not_after: Option<i64>) {
        self.recorder
            .register_gauge(&Key::from_name(TLS_CERT_EXPIRY), &metadata())
            .set(not_after.unwrap_or(0) as f64);
    }

    /// With `[[tls.certificates]]`: each certificate's notAfter by its index (bounded
    /// by the config), `acme` for ACME's (0 before its first issuance); an index a
    /// reload removed reads NaN, so no alert fires for a certificate no longer served.
    pub fn certificate_expiries(&self, files: &[i64], acme: Option<Option<i64>>) {
        use std::sync::atomic::Ordering;
        let gauge = |label: String| {
            self.recorder.register_gauge(
                &Key::from_parts(TLS_CERT_EXPIRY, vec![Label::new("certificate", label)]),
                &metadata(),
            )
        };
        for (i, not_after) in files.iter().enumerate() {
            gauge(i.to_string()).set(*not_after as f64);
        }
        let before = self.cert_series.fetch_max(files.len(), Ordering::Relaxed);
        for i in files.len()..before {
            gauge(i.to_string()).set(f64::NAN);
        }
        if let Some(acme) = acme {
            gauge("acme".to_string()).set(acme.unwrap_or(0) as f64);
        }
    }

    /// One ACME order; `None` registers both series at zero.
    pub fn acme_order(&self, issued: Option<bool>) {
        match issued {
            Some(ok) => self
                .counter(ACME_ORDERS, &[("result", if ok { "issued" } else { "failed" })])
                .increment(1),
            None => {
                self.counter(ACME_ORDERS, &[("result", "issued")]).increment(0);
                self.counter(ACME_ORDERS, &[("result", "failed")]).increment(0);
            }
        }
    }

    pub fn reload(&self, ok: bool) {
        self.counter(CONFIG_RELOADS, &[("result", if ok { "success" } else { "failure" })])
            .increment(1);
    }

    /// Make the route's series visible at zero before any traffic.
    pub fn register_route(&self, route: &str, validated: bool) {
        self.session(route).active.increment(0.0);
        if validated {
            for c in self.rejections(route) {
                c.increment(0);
            }
        }
    }

    /// Handles for one session on `route`.
    pub fn session(&self, route: &str) -> SessionMetrics {
        let dirs = [Direction::ClientToUpstream, Direction::UpstreamToClient];
        let messages = dirs.map(|d| self.counter(MESSAGES, &[("route", route), ("direction", d.label())]));
        let bytes = dirs.map(|d| self.counter(BYTES, &[("route", route), ("direction", d.label())]));
        let active = self.recorder.register_gauge(
            &Key::from_parts(CONNECTIONS_ACTIVE, vec![Label::new("route", route.to_string())]),
            &metadata(),
        );
        SessionMetrics {
            messages,
            bytes,
            active,
            rejected: None,
            live: None,
            compressed: None,
        }
    }

    /// `wsgate_compressed_bytes_total` handles of a session with permessage-deflate, by
    /// direction, then form (`wire`, `payload`).
    pub fn compressed(&self, route: &str) -> [[Counter; 2]; 2] {
        [Direction::ClientToUpstream, Direction::UpstreamToClient].map(|d| {
            ["wire", "payload"].map(|form| self.counter(COMPRESSED_BYTES, &[("route", route), ("direction", d.label()), ("form", form)]))
        })
    }

    /// `wsgate_messages_rejected_total` handles of a validated route, one per reason
    /// (registering them makes the series visible at zero).
    pub fn rejections(&self, route: &str) -> [Counter; 4] {
        crate::error::MessageRejection::ALL.map(|r| self.counter(MESSAGES_REJECTED, &[("route", route), ("reason", r.label())]))
    }
}

fn metadata() -> metrics::Metadata<'static> {
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, None)
}

/// The `code` label of a close: the registered codes 1000–1015 and 4401 as themselves,
/// other application codes as `3xxx` / `4xxx`, anything else as `other`. A bounded set:
/// a client choosing its close code cannot create new series.
pub fn close_code_label(code: u16) -> &'static str {
    const REGISTERED: [&str; 16] = [
        "1000", "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010", "1011", "1012", "1013", "1014", "1015",
    ];
    match code {
        1000..=1015 => REGISTERED[usize::from(code - 1000)],
        4401 => "4401",
        3000..=3999 => "3xxx",
        4000..=4999 => "4xxx",
        _ => "other",
    }
}

/// Messages and bytes of a live session by direction, updated as the relay reports them.
#[derive(Default)]
pub struct LiveCounters {
    pub messages: [AtomicU64; 2],
    pub bytes: [AtomicU64; 2],
}

impl LiveCounters {
    pub fn add(&self, direction: usize, messages: u64, bytes: u64) {
        self.messages[direction].fetch_add(messages, Ordering::Relaxed);
        self.bytes[direction].fetch_add(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_text_and_separate_gateways_stay_separate() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.rejected("not_found");
        a.register_route("echo", true);
        let text = a.render();
        assert!(text.contains("# HELP wsgate_connections_rejected_total"), "{text}");
        assert!(text.contains("wsgate_connections_rejected_total{reason=\"not_found\"} 1"), "{text}");
        assert!(text.contains("wsgate_build_info{version="), "{text}");
        assert!(text.contains("# HELP wsgate_messages_rejected_total"), "{text}");
        assert!(
            text.contains("wsgate_messages_rejected_total{route=\"echo\",reason=\"too_deep\"} 0"),
            "{text}"
        );
        assert!(!b.render().contains("not_found"));
    }

    #[test]
    fn process_metrics_have_the_standard_names_and_help() {
        let m = Metrics::new();
        m.connections_max(1234);
        let text = m.render();
        for name in [
            PROCESS_OPEN_FDS,
            PROCESS_MAX_FDS,
            PROCESS_RESIDENT_MEMORY,
            PROCESS_CPU_SECONDS,
            PROCESS_START_TIME,
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
            assert!(text.lines().any(|l| l.starts_with(&format!("{name} "))), "{name}: {text}");
        }
        assert!(text.contains("wsgate_connections_max 1234"), "{text}");
        let open: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_open_fds "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(open >= 3.0, "{text}");
    }
}

#[cfg(test)]
mod close_label_tests {
    use super::close_code_label;

    #[test]
    fn client_chosen_close_codes_cannot_create_series() {
        assert_eq!(close_code_label(1000), "1000");
        assert_eq!(close_code_label(1015), "1015");
        assert_eq!(close_code_label(4401), "4401");
        assert_eq!(close_code_label(3000), "3xxx");
        assert_eq!(close_code_label(3999), "3xxx");
        assert_eq!(close_code_label(4000), "4xxx");
        assert_eq!(close_code_label(4999), "4xxx");
        assert_eq!(close_code_label(999), "other");
        assert_eq!(close_code_label(u16::MAX), "other");
        let labels: std::collections::HashSet<_> = (0..=u16::MAX).map(close_code_label).collect();
        assert_eq!(labels.len(), 16 + 4, "{labels:?}");
    }
}
