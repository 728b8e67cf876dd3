//! `[[routes]]` as validated: a route's path, upstreams, auth mode, origins, claims,
//! forwarding and message validation (the checks that build it are in `routes.rs`).

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    Jwt,
    /// A verified client certificate is the identity.
    Mtls,
    /// A token and a verified client certificate; a token bound to a certificate
    /// (`cnf.x5t#S256`) must be bound to this one.
    #[serde(rename = "jwt+mtls")]
    JwtMtls,
    /// The app's own endpoint decides (a `[providers.NAME]` of kind `"forward"`).
    Forward,
    /// An opaque token judged by RFC 7662 introspection (a `[providers.NAME]` of kind
    /// `"introspection"`).
    Introspection,
    None,
}

impl AuthMode {
    /// Whether the route needs a token.
    pub fn uses_jwt(self) -> bool {
        matches!(self, AuthMode::Jwt | AuthMode::JwtMtls)
    }

    /// Whether the route needs a verified client certificate.
    pub fn uses_cert(self) -> bool {
        matches!(self, AuthMode::Mtls | AuthMode::JwtMtls)
    }
}

/// `forward_claims` keys that forward the client certificate instead of a token claim.
pub const CERT_FINGERPRINT: &str = "cert:fingerprint";
pub const CERT_SUBJECT: &str = "cert:subject";

/// How a route matches the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// `/echo`: this path only.
    Exact(String),
    /// `/chat/*`: `/chat` and everything below it. Holds `/chat`.
    Prefix(String),
}

/// How a route matches the request's host (`Host`, without port, case and a final dot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `chat.example.com`: this name only (lower case, A-labels).
    Exact(String),
    /// `*.example.com`: exactly one label before `.example.com`. Holds `.example.com`.
    Wildcard(String),
}

impl HostMatch {
    /// Whether `host` (as [`normalize_host`] returns it) is matched.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h == host,
            HostMatch::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        }
    }
}

impl std::fmt::Display for HostMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMatch::Exact(h) => f.write_str(h),
            HostMatch::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// The host of a `Host` header (or a request target's authority) as routes and
/// certificates compare it: the port removed, lower case, one final dot removed, IPv6
/// brackets removed. `None` when it is not a host: empty, a user part, a bad port, or
/// bytes that are not a DNS name or an address (a Unicode name must come in its
/// `xn--` form: browsers send it so).
pub fn normalize_host(value: &str) -> Option<String> {
    let authority: http::uri::Authority = value.parse().ok()?;
    let host = authority.host();
    let port = authority.as_str().strip_prefix(host)?;
    if !(port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.parse::<u16>().is_ok() && p.bytes().all(|b| b.is_ascii_digit())))
    {
        return None;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().ok().map(|ip| ip.to_string());
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let label_ok = |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (host.len() <= 253 && host.split('.').all(label_ok)).then_some(host)
}

/// One upstream of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The in-process echo backend.
    BuiltinEcho,
    /// A WebSocket server reached over TCP (`ws://`) or TLS (`wss://`).
    Remote {
        tls: bool,
        host: String,
        port: u16,
        /// `None` when the URL has no path (or just `/`): the client's path goes upstream unchanged.
        path: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// `None`: any host.
    pub host: Option<HostMatch>,
    pub path: PathMatch,
    /// `provider = "NAME"`: the `[providers.NAME]` that verifies this route's tokens;
    /// `None`: `[jwt]`.
    pub provider: Option<String>,
    pub upstreams: Vec<Upstream>,
    pub auth: AuthMode,
    pub forward_token: bool,
    /// `refresh = true` (jwt routes with `first_message`): a client message that is
    /// exactly `{"token": "<jwt>"}` replaces the session's token (DESIGN.md section 15).
    pub refresh: bool,
    /// Extra trust anchors (PEM) for `wss://` upstreams, besides the webpki roots.
    pub upstream_ca: Option<Located<PathBuf>>,
    /// Normalised origins (`scheme://host[:port]`, default ports removed); `"*"` allows any.
    pub allowed_origins: Vec<String>,
    pub allow_missing_origin: bool,
    /// Claim → required value (equality, or membership for arrays and space-separated strings).
    pub require_claims: Vec<(String, String)>,
    /// Claim → header name sent upstream (lower case).
    pub forward_claims: Vec<(String, http::HeaderName)>,
    /// `[routes.validate]`: client messages are checked before they go upstream.
    pub validate: Option<Validate>,
    /// `[routes.limits]`: what this route overrides; [`Config::limits_of`] resolves it.
    pub limits: RouteLimits,
    /// `http = true`: plain HTTP/1.1 requests are proxied (DESIGN.md section 13);
    /// `None`: they get 426.
    pub http: Option<HttpPolicy>,
    /// `balance`: how an upstream is chosen.
    pub balance: Balance,
    /// `sticky_cookie` (with `balance = "sticky"`, default `wsgate_sticky`).
    pub sticky_cookie: Option<String>,
    /// `health_check`: active checks of each upstream (`None`: only transport failures count).
    pub health_check: Option<HealthCheck>,
    /// permessage-deflate (RFC 7692) on this route's hops (DESIGN.md section 16).
    pub compression: Compression,
}

/// Default `routes.compression_level`: fast (a chat message gains little from more).
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 1;
/// Default `routes.compression_min_size`: smaller messages go uncompressed.
pub const DEFAULT_COMPRESSION_MIN_SIZE: usize = 256;

/// A route's permessage-deflate settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// Negotiate with clients that offer it (`compression`, default true).
    pub client: bool,
    /// Also negotiate with the upstream (`upstream_compression`, default false).
    pub upstream: bool,
    /// 1 (fast) … 9 (`compression_level`).
    pub level: u32,
    /// Messages the gateway sends that are smaller go uncompressed (`compression_min_size`).
    pub min_size: usize,
    /// Keep deflate/inflate state between messages (`context_takeover`, default false:
    /// no state kept, so an idle socket holds none).
    pub context_takeover: bool,
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            client: true,
            upstream: false,
            level: DEFAULT_COMPRESSION_LEVEL,
            min_size: DEFAULT_COMPRESSION_MIN_SIZE,
            context_takeover: false,
        }
    }
}

/// `balance` (DESIGN.md section 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    /// Live WebSocket sessions plus in-flight plain requests, fewest first.
    LeastSessions,
    /// A signed cookie keeps a client on one upstream while it is up.
    Sticky,
}

/// `routes.health_check` (DESIGN.md section 13): `GET path` on each upstream every
/// `interval`; a pass is a 2xx within `timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Origin-form path (and query), starting with `/`.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
}

/// Default `health_check.interval`.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Default `health_check.timeout`.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest `health_check.interval`: a check costs the upstream a connection.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `health_check.interval`.
pub const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(3600);
/// Longest `health_check.path`.
pub const MAX_HEALTH_PATH: usize = 1024;

/// Default `routes.sticky_cookie`.
pub const DEFAULT_STICKY_COOKIE: &str = "wsgate_sticky";

/// How a route with `http = true` proxies plain requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPolicy {
    /// `http_methods`: others → 405.
    pub methods: Vec<http::Method>,
    /// `max_body`: a request body beyond it → 413.
    pub max_body: u64,
    /// `http_timeout`: time without a byte either way in one exchange → 504.
    pub timeout: Duration,
    /// `http_max_connections`: connections to each upstream carrying a request at once
    /// (long polls hold one each); a request that finds none free within `http_timeout`
    /// gets 504.
    pub max_connections: usize,
}

/// Default `routes.http_max_connections`: enough for a node's Socket.IO clients that
/// stay on long polling (each holds a connection for up to 25 s), a bound on what the
/// gateway holds per upstream (about 30 KiB each while busy).
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 1024;
/// Largest `routes.http_max_connections`.
pub const MAX_HTTP_MAX_CONNECTIONS: usize = 65536;

/// `[routes.limits]` as written: `None` inherits (DESIGN.md section 14).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteLimits {
    pub max_message_size: Option<usize>,
    pub max_frame_size: Option<usize>,
    pub max_fragments: Option<u32>,
    pub message_rate: Option<Rate>,
    pub message_burst: Option<u32>,
    pub max_connections_per_user: Option<u32>,
    pub idle_timeout: Option<Duration>,
    pub ping_interval: Option<Duration>,
    pub first_message_timeout: Option<Duration>,
}

/// The limits a route's sessions run under: its overrides, else `[limits]`, `[server]`
/// and its provider's (or `[jwt]`'s) values.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionLimits {
    pub max_message_size: usize,
    pub max_frame_size: usize,
    pub max_fragments: u32,
    pub message_rate: Rate,
    pub message_burst: u32,
    pub max_connections_per_user: u32,
    /// The route overrides `max_connections_per_user`: its users are counted on this
    /// route alone.
    pub user_cap_per_route: bool,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub first_message_timeout: Duration,
}

/// `[routes.validate]` (DESIGN.md section 11). The schema file is compiled where the
/// runtime is built (`gateway::Runtime::load`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validate {
    /// Text messages must be JSON (default true; schema and depth need it).
    pub json: bool,
    /// Binary messages pass unchecked (true) or are refused (false, the default).
    pub binary: bool,
    /// JSON Schema (draft 2020-12) every text message must satisfy.
    pub schema_file: Option<Located<PathBuf>>,
    /// Nesting depth: arrays and objects count, scalars do not (`[1]` is 1 deep).
    pub max_depth: u32,
    pub on_invalid: OnInvalid,
}

/// What an invalid client message gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnInvalid {
    /// Close the session: 1007 (not JSON), 1008 (too deep, schema), 1003 (binary).
    #[default]
    Close,
    /// Answer the client with `{"error": "invalid_message", ...}`; the socket stays open.
    Reply,
}

/// `Origin` in the form routes compare: lower-case scheme and host, default port dropped.
/// `None` when it is not a `scheme://host[:port]` origin (e.g. `null`).
pub fn normalize_origin(origin: &str) -> Option<String> {
    let (scheme, rest) = origin.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let authority: http::uri::Authority = rest.parse().ok()?;
    let host = authority.host().to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    Some(match authority.port_u16() {
        Some(p) if Some(p) != default => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

impl Route {
    /// How well this route's host matches `host` (normalised): 2 exact, 1 wildcard, 0
    /// any host; `None` when it does not.
    pub(super) fn host_rank(&self, host: &str) -> Option<u8> {
        match &self.host {
            None => Some(0),
            Some(h) if h.matches(host) => Some(if matches!(h, HostMatch::Exact(_)) { 2 } else { 1 }),
            Some(_) => None,
        }
    }

    /// Whether this route serves `path`; longer prefixes are preferred by [`Config::route`].
    pub(super) fn matches(&self, path: &str) -> bool {
        match &self.path {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}
