//! Configuration in two layers.
//!
//! 1. `raw`: serde structs that mirror the TOML file exactly, with unknown keys
//!    rejected and typed values (durations, sizes, addresses) parsed on the way in.
//! 2. [`Config`]: the validated form the gateway runs on. Cross-key checks happen
//!    in [`Config::from_toml_str`]; every error names the key and the line and
//!    never echoes a secret.
//!
//! Loading what the config *points to* (certificates, JWT secrets) is done by
//! [`crate::tls`] and [`crate::auth`], which report errors through [`Located`].

use crate::units::{ByteSize, HumanDuration, Rate};
use ipnet::IpNet;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};
use toml::Spanned;

/// Default config file, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/gateway.toml";
/// Accept → request head read, TLS included.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A larger upgrade request head is answered with 431.
pub const DEFAULT_MAX_REQUEST_HEAD: usize = 16 * 1024;
/// No data frame either way for this long → close 1001.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The gateway pings each client this often; no pong within one interval → close.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Global concurrent connection cap → 503.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Drain time on SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Upstream TCP connect + TLS + WebSocket handshake → 504 when exceeded.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Time both peers get to answer a close frame before the sockets are dropped.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest message accepted from either side → close 1009.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;
/// Largest frame accepted from either side → close 1009.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 256 * 1024;
/// Frames per client message (every frame, empty or not, also pays toward `message_rate`).
pub const DEFAULT_MAX_FRAGMENTS: u32 = 1024;
/// New connections per client IP (GCRA) and the burst above it.
pub const DEFAULT_CONNECTION_RATE: &str = "20/s";
pub const DEFAULT_CONNECTION_BURST: u32 = 40;
/// Concurrent connections per client IP.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 100;
/// IPv6 clients are keyed by this prefix length.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// Client → upstream messages per connection, and the burst above it.
pub const DEFAULT_MESSAGE_RATE: &str = "200/s";
pub const DEFAULT_MESSAGE_BURST: u32 = 400;
/// Held back by the message rate without pause for this long → close 1008.
pub const DEFAULT_RATE_ABUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Auth failures per client IP within the window before a ban, and the ban length.
pub const DEFAULT_AUTH_FAILURES_PER_IP: u32 = 10;
pub const DEFAULT_AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_AUTH_BAN: Duration = Duration::from_secs(600);
/// Default JWKS refresh period.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(600);
/// Time a client gets to send its token as the first message.
pub const DEFAULT_FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent sessions per JWT `sub`.
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: u32 = 20;
/// JWT clock skew allowance.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Environment variable holding the HS* secret when no `secret_file` is set.
pub const DEFAULT_SECRET_ENV: &str = "WSGATE_JWT_SECRET";
/// The claim that names the user unless `jwt.identity_claim` says otherwise.
pub const DEFAULT_IDENTITY_CLAIM: &str = "sub";

/// A config error: which file, which line, which key, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}: {}", self.file, line, self.key, self.message),
            None => write!(f, "{}: {}: {}", self.file, self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A value with the config line it came from, so later loading errors can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub key: String,
    pub line: Option<usize>,
}

impl<T> Located<T> {
    /// An error about this value, for the config file `file`.
    pub fn error(&self, file: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            line: self.line,
            key: self.key.clone(),
            message: message.into(),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from (a path, or `<inline>` for tests); used in error messages.
    pub origin: String,
    pub server: Server,
    pub tls: Tls,
    pub admin: Admin,
    pub log: Log,
    pub limits: Limits,
    pub firewall: crate::firewall::Firewall,
    pub jwt: Jwt,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: Vec<SocketAddr>,
    pub handshake_timeout: Duration,
    pub max_request_head: usize,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub upstream_timeout: Duration,
    pub close_timeout: Duration,
    pub trusted_proxies: Vec<IpNet>,
    pub client_ip_source: ClientIpSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientIpSource {
    Peer,
    ProxyProtocol,
    XForwardedFor,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: Located<PathBuf>,
    pub key: Located<PathBuf>,
    pub self_signed_if_missing: bool,
    pub min_version: TlsVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
    pub file: Option<PathBuf>,
    /// Sessions open longer than this log a progress event at this interval.
    pub progress_interval: Option<Duration>,
}

/// Default interval of the progress event for long sessions.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_size: usize,
    pub max_frame_size: usize,
    /// Frames per client message; more → close 1009.
    pub max_fragments: u32,
    /// Per-IP admission (new-connection rate, concurrency, auth-failure bans).
    pub admission: crate::limits::Settings,
    /// Client → upstream messages (pings included) per connection.
    pub message_rate: Rate,
    pub message_burst: u32,
    /// A client held back by `message_rate` without pause for this long is closed with 1008.
    pub rate_abuse_timeout: Duration,
    /// Concurrent sessions per JWT `sub`.
    pub max_connections_per_user: u32,
}

/// Where the HS* secret comes from. Holds names, never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(Located<String>),
    File { path: Located<PathBuf>, generate_if_missing: bool },
}

/// Where a token may be found in the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <t>`
    Authorization,
    /// A `Sec-WebSocket-Protocol` entry `bearer.<t>`.
    Protocol,
    /// A query parameter.
    Query(String),
    /// A cookie.
    Cookie(String),
    /// The first text message after the 101 (raw, or JSON `{"token": "..."}`).
    FirstMessage,
}

#[derive(Debug, Clone)]
pub struct Jwt {
    pub algorithms: Vec<Algorithm>,
    pub secret: SecretSource,
    pub issuer: Option<String>,
    pub audience: Vec<String>,
    pub leeway: Duration,
    pub required_claims: Vec<String>,
    pub token_sources: Vec<TokenSource>,
    /// Close live sessions with 4401 when the token's `exp` (plus leeway) passes.
    pub close_on_expiry: bool,
    pub public_key_files: Vec<Located<PathBuf>>,
    pub jwks_file: Option<Located<PathBuf>>,
    pub jwks_url: Option<crate::keys::JwksUrl>,
    pub revoked_jti_file: Option<Located<PathBuf>>,
    pub first_message_timeout: Duration,
    /// The claim that names the user (logs, per-user caps, forwarding); `None` means
    /// `sub`, and then a token without it simply has no user. When set, it is required.
    pub identity_claim: Option<String>,
}

impl Jwt {
    /// The claim that names the user.
    pub fn identity_claim(&self) -> &str {
        self.identity_claim.as_deref().unwrap_or(DEFAULT_IDENTITY_CLAIM)
    }
}

impl Jwt {
    /// Whether an HS* algorithm is allowed (and so a secret is needed).
    pub fn uses_secret(&self) -> bool {
        self.algorithms.iter().any(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    Jwt,
    None,
}

/// How a route matches the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// `/echo`: this path only.
    Exact(String),
    /// `/chat/*`: `/chat` and everything below it. Holds `/chat`.
    Prefix(String),
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
    pub path: PathMatch,
    pub upstreams: Vec<Upstream>,
    pub auth: AuthMode,
    pub forward_token: bool,
    /// Extra trust anchors (PEM) for `wss://` upstreams, besides the webpki roots.
    pub upstream_ca: Option<Located<PathBuf>>,
    /// Normalised origins (`scheme://host[:port]`, default ports removed); `"*"` allows any.
    pub allowed_origins: Vec<String>,
    pub allow_missing_origin: bool,
    /// Claim → required value (equality, or membership for arrays and space-separated strings).
    pub require_claims: Vec<(String, String)>,
    /// Claim → header name sent upstream (lower case).
    pub forward_claims: Vec<(String, http::HeaderName)>,
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
    /// Whether this route serves `path`; longer prefixes are preferred by [`Config::route`].
    fn matches(&self, path: &str) -> bool {
        match &self.path {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}

impl Config {
    /// The route for a request path: an exact match first, then the longest prefix.
    pub fn route(&self, path: &str) -> Option<&Route> {
        self.route_index(path).map(|i| &self.routes[i])
    }

    /// Index into `routes` of the route for `path`.
    pub fn route_index(&self, path: &str) -> Option<usize> {
        let exact = self.routes.iter().position(|r| matches!(&r.path, PathMatch::Exact(p) if p == path));
        exact.or_else(|| {
            let prefixes = self
                .routes
                .iter()
                .enumerate()
                .filter(|(_, r)| matches!(r.path, PathMatch::Prefix(_)) && r.matches(path));
            prefixes
                .max_by_key(|(_, r)| match &r.path {
                    PathMatch::Prefix(p) => p.len(),
                    PathMatch::Exact(_) => 0,
                })
                .map(|(i, _)| i)
        })
    }

    /// Read and validate a config file. Relative paths inside resolve against the working directory.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: origin.clone(),
            line: None,
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        Config::from_toml_str(&src, &origin)
    }

    /// Parse and validate TOML text. `origin` names the source in error messages.
    pub fn from_toml_str(src: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: raw::File = toml::from_str(src).map_err(|e| toml_error(src, origin, &e))?;
        Validator { src, origin }.validate(raw)
    }
}

/// Turn a TOML/serde error into a [`ConfigError`] without echoing the source line
/// (it could hold a secret pasted where it does not belong).
fn toml_error(src: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    let (line, key) = match e.span() {
        Some(span) => (Some(line_of(src, span.start)), key_at(src, span.start)),
        None => (None, "(file)".to_string()),
    };
    ConfigError {
        file: origin.to_string(),
        line,
        key,
        message: e.message().trim().to_string(),
    }
}

fn line_of(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Best-effort `table.key` name for the config position `offset`, from the text around it.
fn key_at(src: &str, offset: usize) -> String {
    let offset = offset.min(src.len());
    let line_start = src[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = src[line_start..].lines().next().unwrap_or("");
    let key: String = match line.split_once('=') {
        Some((k, _)) => k.trim().to_string(),
        None => line.trim().trim_matches(|c| c == '[' || c == ']').to_string(),
    };
    let table = src[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        .filter(|t| !t.is_empty());
    let key: String = key.chars().filter(|c| !c.is_control()).take(64).collect();
    // An error always names something: the table, or the file, when no key can be read.
    match table {
        Some(t) if key.trim().is_empty() => t,
        Some(t) if !line.trim_start().starts_with('[') => format!("{t}.{key}"),
        _ if key.trim().is_empty() => "(file)".to_string(),
        _ => key,
    }
}

struct Validator<'a> {
    src: &'a str,
    origin: &'a str,
}

impl Validator<'_> {
    fn err<T>(&self, spanned: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.origin.to_string(),
            line: Some(line_of(self.src, spanned.span().start)),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn located<T: Clone>(&self, spanned: &Spanned<T>, key: &str) -> Located<T> {
        Located {
            value: spanned.get_ref().clone(),
            key: key.to_string(),
            line: Some(line_of(self.src, spanned.span().start)),
        }
    }

    fn validate(&self, raw: raw::File) -> Result<Config, ConfigError> {
        let s = raw.server;
        let listen = match &s.listen {
            Some(l) if l.get_ref().is_empty() => return Err(self.err(l, "server.listen", "needs at least one address")),
            Some(l) => l.get_ref().clone(),
            None => vec![SocketAddr::from(([127, 0, 0, 1], 8443))],
        };
        let max_request_head = s.max_request_head.map_or(DEFAULT_MAX_REQUEST_HEAD, |v| v.0 as usize);
        if max_request_head < 1024 {
            return Err(self.err_key("server.max_request_head", "must be at least 1KiB"));
        }
        let max_connections = s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(self.err_key("server.max_connections", "must be at least 1"));
        }
        let server = Server {
            listen,
            handshake_timeout: nonzero(s.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT, "server.handshake_timeout", self)?,
            max_request_head,
            idle_timeout: nonzero(s.idle_timeout, DEFAULT_IDLE_TIMEOUT, "server.idle_timeout", self)?,
            ping_interval: nonzero(s.ping_interval, DEFAULT_PING_INTERVAL, "server.ping_interval", self)?,
            max_connections,
            shutdown_grace: s.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            upstream_timeout: nonzero(s.upstream_timeout, DEFAULT_UPSTREAM_TIMEOUT, "server.upstream_timeout", self)?,
            close_timeout: nonzero(s.close_timeout, DEFAULT_CLOSE_TIMEOUT, "server.close_timeout", self)?,
            trusted_proxies: s.trusted_proxies.into_iter().map(|n| n.trunc()).collect(),
            client_ip_source: s.client_ip_source.unwrap_or(ClientIpSource::Peer),
        };
        if server.client_ip_source != ClientIpSource::Peer && server.trusted_proxies.is_empty() {
            return Err(self.err_key("server.client_ip_source", "needs server.trusted_proxies"));
        }

        let t = raw.tls;
        let tls = Tls {
            cert: t
                .cert
                .as_ref()
                .map_or_else(|| unlocated("tls.cert", "certs/dev/server.crt"), |c| self.located(c, "tls.cert")),
            key: t
                .key
                .as_ref()
                .map_or_else(|| unlocated("tls.key", "certs/dev/server.key"), |c| self.located(c, "tls.key")),
            self_signed_if_missing: t.self_signed_if_missing.unwrap_or(false),
            min_version: t.min_version.unwrap_or(TlsVersion::V1_2),
        };

        let admin = Admin {
            listen: raw.admin.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
        };
        let log = Log {
            format: raw.log.format.unwrap_or(LogFormat::Text),
            level: raw.log.level.unwrap_or_else(|| "info".into()),
            file: raw.log.file,
            progress_interval: match raw.log.progress_interval.as_deref() {
                None => Some(DEFAULT_PROGRESS_INTERVAL),
                Some("off") => None,
                Some(v) => {
                    let d = v.parse::<HumanDuration>().map_err(|m| self.err_key("log.progress_interval", m))?.0;
                    if d < Duration::from_secs(1) {
                        return Err(self.err_key("log.progress_interval", "must be at least 1s, or \"off\""));
                    }
                    Some(d)
                }
            },
        };
        if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
            return Err(self.err_key("log.level", "not a valid level or filter (try \"info\" or \"debug\")"));
        }

        let l = raw.limits;
        let parse_rate = |s: &str| {
            s.parse::<Rate>().unwrap_or(Rate {
                count: 1,
                per: Duration::from_secs(1),
            })
        };
        let ipv6_prefix = l.ipv6_prefix.unwrap_or(DEFAULT_IPV6_PREFIX);
        if ipv6_prefix > 128 {
            return Err(self.err_key("limits.ipv6_prefix", "must be between 0 and 128"));
        }
        let limits = Limits {
            max_message_size: l.max_message_size.map_or(DEFAULT_MAX_MESSAGE_SIZE, |v| v.0 as usize),
            max_frame_size: l.max_frame_size.map_or(DEFAULT_MAX_FRAME_SIZE, |v| v.0 as usize),
            max_fragments: match l.max_fragments {
                None => DEFAULT_MAX_FRAGMENTS,
                Some(0) => return Err(self.err_key("limits.max_fragments", "must be at least 1")),
                Some(n) => n,
            },
            admission: crate::limits::Settings {
                connection_rate: l.connection_rate_per_ip.unwrap_or_else(|| parse_rate(DEFAULT_CONNECTION_RATE)),
                connection_burst: l.connection_burst_per_ip.unwrap_or(DEFAULT_CONNECTION_BURST).max(1),
                max_connections_per_ip: l.max_connections_per_ip.unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP).max(1),
                ipv6_prefix,
                auth_failures_per_ip: l.auth_failures_per_ip.unwrap_or(DEFAULT_AUTH_FAILURES_PER_IP),
                auth_failure_window: l.auth_failure_window.map_or(DEFAULT_AUTH_FAILURE_WINDOW, |d| d.0),
                auth_ban: l.auth_ban.map_or(DEFAULT_AUTH_BAN, |d| d.0),
            },
            message_rate: l.message_rate.unwrap_or_else(|| parse_rate(DEFAULT_MESSAGE_RATE)),
            message_burst: l.message_burst.unwrap_or(DEFAULT_MESSAGE_BURST).max(1),
            rate_abuse_timeout: nonzero(l.rate_abuse_timeout, DEFAULT_RATE_ABUSE_TIMEOUT, "limits.rate_abuse_timeout", self)?,
            max_connections_per_user: l.max_connections_per_user.unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_USER).max(1),
        };
        if limits.max_message_size == 0 || limits.max_frame_size == 0 {
            return Err(self.err_key("limits.max_message_size", "sizes must be larger than zero"));
        }
        if limits.max_frame_size > limits.max_message_size {
            return Err(self.err_key("limits.max_frame_size", "must not exceed limits.max_message_size"));
        }

        let firewall = self.firewall(raw.firewall)?;
        let jwt = self.jwt(raw.jwt)?;
        let routes = self.routes(raw.routes)?;
        if routes.iter().any(|r| r.auth == AuthMode::Jwt) && jwt.algorithms.is_empty() {
            return Err(self.err_key("jwt.algorithms", "a route has auth = \"jwt\" but no algorithm is allowed"));
        }
        let asymmetric = jwt.algorithms.iter().any(|a| a.family() != jsonwebtoken::AlgorithmFamily::Hmac);
        let has_public = !jwt.public_key_files.is_empty() || jwt.jwks_file.is_some() || jwt.jwks_url.is_some();
        if asymmetric && !has_public && routes.iter().any(|r| r.auth == AuthMode::Jwt) {
            return Err(self.err_key(
                "jwt.algorithms",
                "RS/PS/ES/EdDSA algorithms need public_key_files, jwks_file or jwks_url",
            ));
        }
        Ok(Config {
            origin: self.origin.to_string(),
            server,
            tls,
            admin,
            log,
            limits,
            firewall,
            jwt,
            routes,
        })
    }

    fn err_key(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let (table, leaf) = key.rsplit_once('.').unwrap_or(("", key));
        ConfigError {
            file: self.origin.to_string(),
            line: find_key_line(self.src, table, leaf),
            key: key.into(),
            message: message.into(),
        }
    }

    fn firewall(&self, f: raw::Firewall) -> Result<crate::firewall::Firewall, ConfigError> {
        use crate::firewall::{RangeSet, parse_rule, read_rule_file};
        let mut sets = Vec::new();
        for (key, inline, files) in [
            ("firewall.allow", &f.allow, &f.allow_files),
            ("firewall.deny", &f.deny, &f.deny_files),
        ] {
            let mut nets = Vec::new();
            if let Some(list) = inline {
                for rule in list.get_ref() {
                    let net = parse_rule(rule).ok_or_else(|| {
                        let shown: String = rule.chars().take(64).flat_map(char::escape_debug).collect();
                        self.err(list, key, format!("not an address or CIDR: \"{shown}\""))
                    })?;
                    nets.push(net);
                }
            }
            if let Some(files) = files {
                for path in files.get_ref() {
                    nets.extend(read_rule_file(path).map_err(|m| self.err(files, &format!("{key}_files"), m))?);
                }
            }
            sets.push(RangeSet::from_nets(nets));
        }
        let deny = sets.pop().unwrap_or_default();
        let allow = sets.pop().unwrap_or_default();
        Ok(crate::firewall::Firewall::new(f.default.unwrap_or_default(), allow, deny))
    }

    fn jwt(&self, j: raw::Jwt) -> Result<Jwt, ConfigError> {
        let mut algorithms = Vec::new();
        let names = j.algorithms.unwrap_or_else(|| Spanned::new(0..0, vec!["HS256".to_string()]));
        for name in names.get_ref() {
            let alg = match name.as_str() {
                n if n.eq_ignore_ascii_case("none") => return Err(self.err(&names, "jwt.algorithms", "\"none\" can never be enabled")),
                "HS256" => Algorithm::HS256,
                "HS384" => Algorithm::HS384,
                "HS512" => Algorithm::HS512,
                "RS256" => Algorithm::RS256,
                "RS384" => Algorithm::RS384,
                "RS512" => Algorithm::RS512,
                "PS256" => Algorithm::PS256,
                "PS384" => Algorithm::PS384,
                "PS512" => Algorithm::PS512,
                "ES256" => Algorithm::ES256,
                "ES384" => Algorithm::ES384,
                "EdDSA" => Algorithm::EdDSA,
                _ => {
                    let shown: String = name.chars().take(32).flat_map(char::escape_debug).collect();
                    return Err(self.err(
                        &names,
                        "jwt.algorithms",
                        format!("unsupported algorithm \"{shown}\" (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA)"),
                    ));
                }
            };
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }
        let secret = match (&j.secret_env, &j.secret_file) {
            (Some(env), Some(_)) => return Err(self.err(env, "jwt.secret_env", "set either secret_env or secret_file, not both")),
            (_, Some(file)) => SecretSource::File {
                path: self.located(file, "jwt.secret_file"),
                generate_if_missing: j.generate_secret_if_missing.unwrap_or(false),
            },
            (Some(env), None) => {
                if !is_env_var_name(env.get_ref()) {
                    // Often the secret itself pasted here: never print the value.
                    return Err(self.err(
                        env,
                        "jwt.secret_env",
                        "must name an environment variable (letters, digits and '_'; the value is not shown)",
                    ));
                }
                SecretSource::Env(self.located(env, "jwt.secret_env"))
            }
            (None, None) => SecretSource::Env(unlocated("jwt.secret_env", DEFAULT_SECRET_ENV)),
        };
        if j.generate_secret_if_missing == Some(true) && j.secret_file.is_none() {
            return Err(self.err_key("jwt.generate_secret_if_missing", "needs jwt.secret_file"));
        }
        let required_claims = j.required_claims.unwrap_or_else(|| vec!["exp".into(), "sub".into()]);
        let mut token_sources = Vec::new();
        let sources = j.token_sources.unwrap_or_else(|| {
            Spanned::new(
                0..0,
                ["authorization", "protocol", "query:access_token", "cookie:wsgate_token"]
                    .map(String::from)
                    .to_vec(),
            )
        });
        for s in sources.get_ref() {
            let src = match s.split_once(':') {
                None if s == "authorization" => TokenSource::Authorization,
                None if s == "protocol" => TokenSource::Protocol,
                Some(("query", name)) if !name.is_empty() => TokenSource::Query(name.to_string()),
                Some(("cookie", name)) if !name.is_empty() => TokenSource::Cookie(name.to_string()),
                None if s == "first_message" => TokenSource::FirstMessage,
                _ => {
                    return Err(self.err(
                        &sources,
                        "jwt.token_sources",
                        format!(
                            "unknown token source {:?} (use \"authorization\", \"protocol\", \"query:NAME\", \"cookie:NAME\" or \"first_message\")",
                            s.escape_debug().to_string()
                        ),
                    ));
                }
            };
            token_sources.push(src);
        }
        Ok(Jwt {
            algorithms,
            secret,
            issuer: j.issuer,
            audience: j.audience.unwrap_or_default(),
            leeway: j.leeway.map_or(DEFAULT_LEEWAY, |d| d.0),
            required_claims,
            token_sources,
            close_on_expiry: j.close_on_expiry.unwrap_or(true),
            public_key_files: j
                .public_key_files
                .as_ref()
                .map(|f| {
                    f.get_ref()
                        .iter()
                        .map(|p| Located {
                            value: p.clone(),
                            key: "jwt.public_key_files".into(),
                            line: Some(line_of(self.src, f.span().start)),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            jwks_file: j.jwks_file.as_ref().map(|f| self.located(f, "jwt.jwks_file")),
            jwks_url: match &j.jwks_url {
                None => None,
                Some(u) => {
                    let url: http::Uri = u.get_ref().parse().map_err(|_| self.err(u, "jwt.jwks_url", "not a valid URL"))?;
                    if url.scheme_str() != Some("https") || url.host().is_none() {
                        return Err(self.err(u, "jwt.jwks_url", "must be an https:// URL"));
                    }
                    Some(crate::keys::JwksUrl {
                        url,
                        refresh: nonzero(j.jwks_refresh, DEFAULT_JWKS_REFRESH, "jwt.jwks_refresh", self)?,
                        ca: j.jwks_ca.as_ref().map(|c| self.located(c, "jwt.jwks_ca")),
                    })
                }
            },
            revoked_jti_file: j.revoked_jti_file.as_ref().map(|f| self.located(f, "jwt.revoked_jti_file")),
            first_message_timeout: nonzero(
                j.first_message_timeout,
                DEFAULT_FIRST_MESSAGE_TIMEOUT,
                "jwt.first_message_timeout",
                self,
            )?,
            identity_claim: match &j.identity_claim {
                None => None,
                Some(c) if c.get_ref().is_empty() || c.get_ref().chars().any(char::is_control) => {
                    return Err(self.err(c, "jwt.identity_claim", "must name a claim"));
                }
                Some(c) => Some(c.get_ref().clone()),
            },
        })
    }

    fn routes(&self, raws: Vec<raw::Route>) -> Result<Vec<Route>, ConfigError> {
        let mut routes: Vec<Route> = Vec::with_capacity(raws.len());
        for r in raws {
            let name = r.name.get_ref().clone();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(self.err(&r.name, "routes.name", "use letters, digits, '_' and '-' (it is a metric label)"));
            }
            if routes.iter().any(|o| o.name == name) {
                return Err(self.err(&r.name, "routes.name", "duplicate route name"));
            }
            let p = r.path.get_ref();
            let path = if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
                return Err(self.err(&r.path, "routes.path", "must start with '/' and hold no query"));
            } else if let Some(prefix) = p.strip_suffix("/*") {
                PathMatch::Prefix(prefix.to_string())
            } else if p.contains('*') {
                return Err(self.err(&r.path, "routes.path", "a wildcard is only allowed as a final \"/*\""));
            } else {
                PathMatch::Exact(p.clone())
            };
            if routes.iter().any(|o| o.path == path) {
                return Err(self.err(&r.path, "routes.path", "another route has the same path"));
            }
            if r.upstreams.get_ref().is_empty() {
                return Err(self.err(&r.upstreams, "routes.upstreams", "needs at least one upstream"));
            }
            let upstreams = r
                .upstreams
                .get_ref()
                .iter()
                .map(|u| parse_upstream(u).map_err(|m| self.err(&r.upstreams, "routes.upstreams", m)))
                .collect::<Result<Vec<_>, _>>()?;
            routes.push(Route {
                name,
                path,
                upstreams,
                auth: r.auth.unwrap_or(AuthMode::Jwt),
                forward_token: r.forward_token.unwrap_or(false),
                upstream_ca: r.upstream_ca.as_ref().map(|c| self.located(c, "routes.upstream_ca")),
                allowed_origins: match &r.allowed_origins {
                    None => Vec::new(),
                    Some(list) => list
                        .get_ref()
                        .iter()
                        .map(|o| {
                            if o == "*" {
                                Ok("*".to_string())
                            } else {
                                normalize_origin(o).ok_or_else(|| {
                                    let shown: String = o.chars().take(64).flat_map(char::escape_debug).collect();
                                    self.err(
                                        list,
                                        "routes.allowed_origins",
                                        format!("not an origin (scheme://host[:port]): \"{shown}\""),
                                    )
                                })
                            }
                        })
                        .collect::<Result<_, _>>()?,
                },
                allow_missing_origin: r.allow_missing_origin.unwrap_or(true),
                require_claims: r
                    .require_claims
                    .as_ref()
                    .map(|m| m.get_ref().clone().into_iter().collect())
                    .unwrap_or_default(),
                forward_claims: match &r.forward_claims {
                    None => Vec::new(),
                    Some(m) => m
                        .get_ref()
                        .iter()
                        .map(|(claim, header)| {
                            let name = http::HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes())
                                .map_err(|_| self.err(m, "routes.forward_claims", format!("{claim:?}: not a valid header name")))?;
                            Ok((claim.clone(), name))
                        })
                        .collect::<Result<_, ConfigError>>()?,
                },
            });
        }
        Ok(routes)
    }
}

/// Whether `s` looks like an environment variable name (`[A-Za-z_][A-Za-z0-9_]*`, at
/// most 128 bytes). Anything else is not echoed: it may be a secret pasted by mistake.
pub fn is_env_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn unlocated<T: From<&'static str>>(key: &str, value: &'static str) -> Located<T> {
    Located {
        value: T::from(value),
        key: key.into(),
        line: None,
    }
}

fn nonzero(v: Option<HumanDuration>, default: Duration, key: &str, val: &Validator) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(d) if d.0.is_zero() => Err(val.err_key(key, "must be longer than zero")),
        Some(d) => Ok(d.0),
    }
}

/// The line of `leaf` inside `[table]` (or the first `[[table]]`), by scanning the text.
fn find_key_line(src: &str, table: &str, leaf: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        } else if current == table && t.split_once('=').is_some_and(|(k, _)| k.trim() == leaf) {
            return Some(i + 1);
        }
    }
    None
}

/// Parse `builtin:echo`, `ws://host:port/path` or `wss://…`. The message never echoes
/// credentials: URLs with a user part are refused without printing them.
fn parse_upstream(s: &str) -> Result<Upstream, String> {
    if s == "builtin:echo" {
        return Ok(Upstream::BuiltinEcho);
    }
    let uri: http::Uri = s
        .parse()
        .map_err(|_| "not a valid URL (use \"ws://host:port/path\", \"wss://…\" or \"builtin:echo\")".to_string())?;
    let tls = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err("the scheme must be ws://, wss:// or builtin:echo".into()),
    };
    let auth = uri.authority().ok_or("the URL needs a host")?;
    if auth.as_str().contains('@') {
        return Err("credentials in upstream URLs are not supported".into());
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']').to_string();
    if host.is_empty() {
        return Err("the URL needs a host".into());
    }
    let port = auth.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if uri.query().is_some() {
        return Err("upstream URLs take no query".into());
    }
    let path = match uri.path() {
        "" | "/" => None,
        p => Some(p.trim_end_matches('/').to_string()),
    };
    Ok(Upstream::Remote { tls, host, port, path })
}

/// The TOML file as written. Every table rejects unknown keys.
mod raw {
    use super::*;

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct File {
        pub server: Server,
        pub tls: Tls,
        pub admin: Admin,
        pub log: Log,
        pub limits: Limits,
        pub firewall: Firewall,
        pub jwt: Jwt,
        pub routes: Vec<Route>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Firewall {
        pub default: Option<crate::firewall::Default_>,
        pub allow: Option<Spanned<Vec<String>>>,
        pub deny: Option<Spanned<Vec<String>>>,
        pub allow_files: Option<Spanned<Vec<PathBuf>>>,
        pub deny_files: Option<Spanned<Vec<PathBuf>>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Server {
        pub listen: Option<Spanned<Vec<SocketAddr>>>,
        pub handshake_timeout: Option<HumanDuration>,
        pub max_request_head: Option<ByteSize>,
        pub idle_timeout: Option<HumanDuration>,
        pub ping_interval: Option<HumanDuration>,
        pub max_connections: Option<usize>,
        pub shutdown_grace: Option<HumanDuration>,
        pub upstream_timeout: Option<HumanDuration>,
        pub close_timeout: Option<HumanDuration>,
        pub trusted_proxies: Vec<IpNet>,
        pub client_ip_source: Option<ClientIpSource>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Tls {
        pub cert: Option<Spanned<PathBuf>>,
        pub key: Option<Spanned<PathBuf>>,
        pub self_signed_if_missing: Option<bool>,
        pub min_version: Option<TlsVersion>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Admin {
        pub listen: Option<SocketAddr>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Log {
        pub format: Option<LogFormat>,
        pub level: Option<String>,
        pub file: Option<PathBuf>,
        pub progress_interval: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Limits {
        pub max_message_size: Option<ByteSize>,
        pub max_frame_size: Option<ByteSize>,
        pub max_fragments: Option<u32>,
        pub connection_rate_per_ip: Option<Rate>,
        pub connection_burst_per_ip: Option<u32>,
        pub max_connections_per_ip: Option<u32>,
        pub ipv6_prefix: Option<u8>,
        pub message_rate: Option<Rate>,
        pub message_burst: Option<u32>,
        pub rate_abuse_timeout: Option<HumanDuration>,
        pub auth_failures_per_ip: Option<u32>,
        pub auth_failure_window: Option<HumanDuration>,
        pub auth_ban: Option<HumanDuration>,
        pub max_connections_per_user: Option<u32>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct Jwt {
        pub algorithms: Option<Spanned<Vec<String>>>,
        pub secret_env: Option<Spanned<String>>,
        pub secret_file: Option<Spanned<PathBuf>>,
        pub generate_secret_if_missing: Option<bool>,
        pub issuer: Option<String>,
        pub audience: Option<Vec<String>>,
        pub leeway: Option<HumanDuration>,
        pub required_claims: Option<Vec<String>>,
        pub token_sources: Option<Spanned<Vec<String>>>,
        pub close_on_expiry: Option<bool>,
        pub public_key_files: Option<Spanned<Vec<PathBuf>>>,
        pub jwks_file: Option<Spanned<PathBuf>>,
        pub jwks_url: Option<Spanned<String>>,
        pub jwks_refresh: Option<HumanDuration>,
        pub jwks_ca: Option<Spanned<PathBuf>>,
        pub revoked_jti_file: Option<Spanned<PathBuf>>,
        pub first_message_timeout: Option<HumanDuration>,
        pub identity_claim: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Route {
        pub name: Spanned<String>,
        pub path: Spanned<String>,
        pub upstreams: Spanned<Vec<String>>,
        pub auth: Option<AuthMode>,
        pub forward_token: Option<bool>,
        pub upstream_ca: Option<Spanned<PathBuf>>,
        pub allowed_origins: Option<Spanned<Vec<String>>>,
        pub allow_missing_origin: Option<bool>,
        pub require_claims: Option<Spanned<std::collections::BTreeMap<String, String>>>,
        pub forward_claims: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[routes]]
name = "echo"
path = "/echo"
upstreams = ["builtin:echo"]
"#;

    fn err(src: &str) -> ConfigError {
        Config::from_toml_str(src, "t.toml").unwrap_err()
    }

    #[test]
    fn defaults_apply() {
        let c = Config::from_toml_str(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.server.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(c.limits.max_message_size, 1 << 20);
        assert_eq!(c.routes[0].auth, AuthMode::Jwt);
        assert_eq!(c.jwt.algorithms, vec![Algorithm::HS256]);
        assert_eq!(c.jwt.token_sources.len(), 4);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = err("[server]\nlisten = [\"127.0.0.1:1\"]\nlisten_backlog = 5\n");
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("listen_backlog"), "{e}");
    }

    #[test]
    fn bad_duration_names_key_and_line() {
        let e = err("[server]\n\nidle_timeout = \"5 fortnights\"\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key, "server.idle_timeout");
        assert!(e.message.contains("invalid duration"), "{e}");
    }

    #[test]
    fn error_never_echoes_a_misplaced_secret() {
        let e = err("[jwt]\nsecret = \"hunter2-super-secret\"\n");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn none_algorithm_refused() {
        let e = err("[jwt]\nalgorithms = [\"HS256\", \"None\"]\n");
        assert_eq!((e.key.as_str(), e.line), ("jwt.algorithms", Some(2)));
    }

    #[test]
    fn bad_route_path_and_upstream() {
        let e = err("[[routes]]\nname = \"a\"\npath = \"echo\"\nupstreams = [\"builtin:echo\"]\n");
        assert_eq!((e.key.as_str(), e.line), ("routes.path", Some(3)));
        let e = err("[[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"http://x\"]\n");
        assert_eq!((e.key.as_str(), e.line), ("routes.upstreams", Some(4)));
        let e = err("[[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"ws://user:pw@x/\"]\n");
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn both_secret_sources_refused() {
        let pasted = "s3cr3t-Value/with+chars==";
        let e = err(&format!("[jwt]\nsecret_env = \"{pasted}\"\n"));
        assert_eq!((e.key.as_str(), e.line), ("jwt.secret_env", Some(2)));
        assert!(!e.to_string().contains(pasted), "{e}");
        assert!(is_env_var_name("WSGATE_JWT_SECRET") && !is_env_var_name("1A") && !is_env_var_name(""));
        let e = err("[jwt]\nsecret_env = \"X\"\nsecret_file = \"f\"\n");
        assert_eq!((e.key.as_str(), e.line), ("jwt.secret_env", Some(2)));
    }

    #[test]
    fn frame_larger_than_message_refused() {
        let e = err("[limits]\nmax_message_size = \"1KiB\"\nmax_frame_size = \"2KiB\"\n");
        assert_eq!((e.key.as_str(), e.line), ("limits.max_frame_size", Some(3)));
    }

    #[test]
    fn routing_prefers_exact_then_longest_prefix() {
        let c = Config::from_toml_str(
            r#"
[[routes]]
name = "a"
path = "/chat/*"
upstreams = ["ws://127.0.0.1:1"]
[[routes]]
name = "b"
path = "/chat/admin/*"
upstreams = ["ws://127.0.0.1:2/x"]
[[routes]]
name = "c"
path = "/chat/exact"
upstreams = ["builtin:echo"]
"#,
            "t",
        )
        .unwrap();
        let name = |p: &str| c.route(p).map(|r| r.name.as_str());
        assert_eq!(name("/chat/room"), Some("a"));
        assert_eq!(name("/chat"), Some("a"));
        assert_eq!(name("/chatroom"), None);
        assert_eq!(name("/chat/admin/x"), Some("b"));
        assert_eq!(name("/chat/exact"), Some("c"));
        assert_eq!(
            c.routes[1].upstreams[0],
            Upstream::Remote {
                tls: false,
                host: "127.0.0.1".into(),
                port: 2,
                path: Some("/x".into())
            }
        );
    }

    #[test]
    fn origins_normalise() {
        assert_eq!(
            normalize_origin("HTTPS://App.Example.com:443").as_deref(),
            Some("https://app.example.com")
        );
        assert_eq!(normalize_origin("http://a.b:8080").as_deref(), Some("http://a.b:8080"));
        assert_eq!(normalize_origin("null"), None);
        assert_eq!(normalize_origin("https://a.b/path"), None);
    }

    #[test]
    fn firewall_rules_are_checked() {
        let e = err("[firewall]\ndeny = [\"10.0.0.0/8\", \"bogus\"]\n");
        assert_eq!((e.key.as_str(), e.line), ("firewall.deny", Some(2)));
        let c = Config::from_toml_str("[firewall]\ndefault = \"deny\"\nallow = [\"127.0.0.0/8\", \"::1\"]\n", "t").unwrap();
        assert!(c.firewall.allows("127.0.0.9".parse().unwrap()));
        assert!(!c.firewall.allows("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn shipped_config_is_valid() {
        let src = include_str!("../config/gateway.toml");
        Config::from_toml_str(src, "config/gateway.toml").unwrap();
    }
}
