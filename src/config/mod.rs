//! Configuration: plain data and its validation, nothing else.
//!
//! `config` is a leaf: it reads the TOML text it is given and nothing more. Files the
//! config *points to* (certificates, secrets, keys, firewall rule files) are loaded
//! where the runtime is built (`gateway::Runtime::load`), and their errors
//! point back at the config line through [`Located`].
//!
//! | file | concern |
//! |------|---------|
//! | `mod.rs` | the validated types the gateway runs on, defaults, route lookup |
//! | `raw.rs` | serde structs mirroring the TOML file, unknown keys rejected |
//! | `validate.rs` | raw → validated, cross-key checks; errors name key and line |
//! | `located.rs` | [`ConfigError`], [`Located`], and line/key lookup in the text |
//! | `units.rs` | durations, byte sizes and rates as written in the file |

mod acme;
mod forward;
mod introspection;
mod located;
mod raw;
mod route;
mod routes;
pub mod units;
pub use forward::FORWARD_DERIVED;
mod validate;

pub use acme::{MAX_ACME_DOMAINS, parse_identifier};
pub use located::{ConfigError, Located};
pub use route::*;
pub use units::{ByteSize, HumanDuration, Rate};
pub use validate::{is_env_var_name, parse_ip_rule};

use ipnet::IpNet;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

/// Default config file, relative to the working directory.
/// Forwarding headers a backend behind the gateway may trust (nginx realip, Spring,
/// Express `trust proxy`): a client's copies are dropped in any spelling (case, `_`),
/// and the gateway sets `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Real-IP` itself.
pub(crate) const CLIENT_FORWARDING: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "x-real-ip",
    "x-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-method",
    "x-original-forwarded-for",
    "true-client-ip",
    "x-request-id",
    "client-ip",
    "cf-connecting-ip",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "x-original-uri",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-forwarded-scheme",
    "x-forwarded-protocol",
    "x-scheme",
    "x-url-scheme",
    "front-end-https",
    "x-host",
    "x-original-host",
    "x-envoy-external-address",
];

/// Whether `name`, in any spelling, is a forwarding header only the gateway may set.
pub(crate) fn is_client_forwarding(name: &str) -> bool {
    let mut buf = [0u8; crate::util::NAME_KEY_MAX];
    crate::util::name_key_in(name, &mut buf).is_some_and(is_client_forwarding_key)
}

/// [`is_client_forwarding`] of a name already reduced by [`crate::util::name_key`]
/// (a request's header is reduced once for every list it is compared with).
pub(crate) fn is_client_forwarding_key(key: &[u8]) -> bool {
    static KEYS: std::sync::LazyLock<Vec<Vec<u8>>> =
        std::sync::LazyLock::new(|| CLIENT_FORWARDING.iter().map(|f| crate::util::name_key(f).collect()).collect());
    KEYS.iter().any(|k| k.as_slice() == key)
}

pub const DEFAULT_CONFIG_PATH: &str = "config/gateway.toml";
/// The wss listener unless `server.listen` says otherwise.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8443);
/// The admin listener (metrics, health) unless `admin.listen` says otherwise.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);
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
/// Frames per client message (every frame, empty or not, also pays toward `message_rate`).
pub const DEFAULT_MAX_FRAGMENTS: u32 = 1024;
/// New connections per client IP (GCRA) and the burst above it.
pub const DEFAULT_CONNECTION_RATE: Rate = Rate {
    count: 20,
    per: Duration::from_secs(1),
};
pub const DEFAULT_CONNECTION_BURST: u32 = 40;
/// Default `limits.http_rate_per_ip`: plain HTTP requests per client IP (`http = true` routes).
pub const DEFAULT_HTTP_RATE: Rate = Rate {
    count: 50,
    per: Duration::from_secs(1),
};
/// Default `limits.http_burst_per_ip`.
pub const DEFAULT_HTTP_BURST: u32 = 100;
/// Default `routes.http_methods`.
pub const DEFAULT_HTTP_METHODS: [&str; 4] = ["GET", "POST", "OPTIONS", "HEAD"];
/// Default `routes.max_body`: a plain request's body; larger → 413.
pub const DEFAULT_MAX_BODY: u64 = 1 << 20;
/// Default `routes.http_timeout`: time without a byte either way in one exchange → 504.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(60);
/// Concurrent connections per client IP.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 100;
/// IPv6 clients are keyed by this prefix length.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// Client → upstream messages per connection, and the burst above it.
pub const DEFAULT_MESSAGE_RATE: Rate = Rate {
    count: 200,
    per: Duration::from_secs(1),
};
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
/// Claims a token must hold unless `jwt.required_claims` says otherwise.
pub const DEFAULT_REQUIRED_CLAIMS: [&str; 2] = ["exp", "sub"];
/// Where tokens are looked for unless `jwt.token_sources` says otherwise.
pub const DEFAULT_TOKEN_SOURCES: [&str; 4] = ["authorization", "protocol", "query:access_token", "cookie:wsgate_token"];
/// Nesting depth of a client message on a validated route unless `max_depth` says otherwise.
pub const DEFAULT_MAX_DEPTH: u32 = 32;
/// The largest `max_depth`: below serde_json's own recursion limit (128), so the depth
/// pre-scan always refuses a nesting bomb before the parser sees it.
pub const MAX_MAX_DEPTH: u32 = 100;
/// The development certificate and key (created by `wsgate dev-cert`).
pub const DEFAULT_TLS_CERT: &str = "certs/dev/server.crt";
pub const DEFAULT_TLS_KEY: &str = "certs/dev/server.key";

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
    pub firewall: FirewallRules,
    pub jwt: Jwt,
    /// `[providers.NAME]` of kind jwt, by name (DESIGN.md section 15).
    pub providers: std::collections::BTreeMap<String, Jwt>,
    /// `[providers.NAME]` of kind forward, by name (DESIGN.md section 15).
    pub forward_providers: std::collections::BTreeMap<String, Forward>,
    /// `[providers.NAME]` of kind introspection, by name (DESIGN.md section 15).
    pub introspection_providers: std::collections::BTreeMap<String, Introspection>,
    pub routes: Vec<Route>,
    /// `[cluster]`: absent, one instance with in-process state.
    pub cluster: Option<Cluster>,
}

/// `[cluster]` (DESIGN.md section 7). The password is read where the runtime is built.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Where Redis is: one server, a Sentinel-managed master, or a Redis Cluster.
    pub redis: RedisServers,
    /// `state_file`: the last synced bans and revocations, loaded at start.
    pub state_file: Option<Located<PathBuf>>,
    pub password: Option<SecretSource>,
    /// Trust anchors (PEM) for a `rediss://` server instead of the system's.
    pub ca: Option<Located<PathBuf>>,
    /// Prefix of every key and channel.
    pub key_prefix: String,
    /// Budget of one Redis call.
    pub timeout: Duration,
    pub on_failure: OnFailure,
}

/// `[cluster]`'s Redis: `redis`, `sentinels` + `sentinel_master`, or `redis_cluster`.
/// URLs are `redis://` or `rediss://`, without credentials.
#[derive(Debug, Clone, PartialEq)]
pub enum RedisServers {
    One(Located<String>),
    /// Sentinels (`redis://host:26379`) and the name of the master they watch.
    Sentinel {
        sentinels: Vec<Located<String>>,
        master: String,
    },
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<Located<String>>),
}

impl RedisServers {
    /// Every URL, for messages and the restart note of a reload.
    pub fn urls(&self) -> Vec<&Located<String>> {
        match self {
            RedisServers::One(u) => vec![u],
            RedisServers::Sentinel { sentinels, .. } => sentinels.iter().collect(),
            RedisServers::Cluster(seeds) => seeds.iter().collect(),
        }
    }

    /// Whether the data nodes are reached over TLS (`rediss://`).
    pub fn tls(&self) -> bool {
        self.urls().first().is_some_and(|u| u.value.starts_with("rediss://"))
    }
}

/// What a connection gets while Redis cannot be asked (`cluster.on_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The instance's own limits decide.
    #[default]
    Local,
    /// The shared limits are skipped (the instance's own still apply).
    Open,
    /// New connections are refused with 503.
    Closed,
}

impl OnFailure {
    /// The `mode` label of `wsgate_cluster_mode` while Redis fails.
    pub fn label(self) -> &'static str {
        match self {
            OnFailure::Local => "local",
            OnFailure::Open => "open",
            OnFailure::Closed => "closed",
        }
    }
}

/// Default `cluster.key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "wsgate";
/// `tls.acme.directory_url`: Let's Encrypt's production directory.
pub const DEFAULT_ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// `tls.acme.cache_dir`.
pub const DEFAULT_ACME_CACHE_DIR: &str = "certs/acme";
/// `tls.acme.renew_before`.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default `cluster.timeout`.
pub const DEFAULT_CLUSTER_TIMEOUT: Duration = Duration::from_millis(20);

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
    /// Reload when the config file or a file it names changes (polled, debounced).
    pub watch_config: bool,
    /// Plain `ws://` listeners for use behind a balancer or mesh that terminates TLS
    /// (no client certificates, no ACME on them).
    pub listen_plain: Vec<SocketAddr>,
    /// The Unix socket `wsgate run --takeover` asks for the listeners on (0600, owner
    /// only); none unless set.
    pub control_socket: Option<PathBuf>,
    /// The secret sticky cookies are signed with (`balance = "sticky"`): the same file
    /// on every instance, kept across restarts and binary upgrades, lets a cookie made
    /// by one process steer on another. `None`: a random key per process.
    pub sticky_key_file: Option<Located<PathBuf>>,
    /// Threads serving client connections, each running its own single-threaded
    /// runtime (thread per core); 0: one per core the process may use.
    pub workers: usize,
}

impl Server {
    /// Whether `ip` is one of `trusted_proxies`: the one trusted-proxy check.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
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
    /// `client_ca` and what goes with it: client certificates (mTLS). `None` when unset.
    pub client: Option<ClientTls>,
    /// `[tls.acme]`: certificates from an ACME server instead of `cert`/`key`.
    pub acme: Option<Acme>,
    /// `[[tls.certificates]]`: several certificates chosen by SNI, instead of
    /// `cert`/`key` (empty when unset). Read where the runtime is built.
    pub certificates: Vec<CertificateFiles>,
}

/// Most `[[tls.certificates]]` (each is read at start and on every reload).
pub const MAX_CERTIFICATES: usize = 100;

/// One `[[tls.certificates]]`: a PEM chain and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: Located<PathBuf>,
    pub key: Located<PathBuf>,
}

/// `[tls.acme]` (DESIGN.md section 12). The cache directory is checked where the
/// runtime is built (`acme::check_cache_dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acme {
    /// `https://` URL of the ACME directory.
    pub directory_url: Located<String>,
    /// `mailto:` URLs for the account.
    pub contact: Vec<String>,
    /// What the certificate covers, in the order given, without duplicates.
    pub domains: Vec<AcmeIdentifier>,
    pub cache_dir: Located<PathBuf>,
    /// Renew this long before the certificate expires (at most two thirds of its lifetime).
    pub renew_before: Duration,
    /// Extra trust anchors (PEM) for the ACME server's own HTTPS certificate.
    pub ca_file: Option<Located<PathBuf>>,
}

/// One name a certificate from `[tls.acme]` covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AcmeIdentifier {
    /// A DNS name, lower case, in A-label (xn--) form.
    Dns(String),
    /// An IP address (RFC 8738).
    Ip(std::net::IpAddr),
}

impl std::fmt::Display for AcmeIdentifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AcmeIdentifier::Dns(name) => f.write_str(name),
            AcmeIdentifier::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Client certificates: trust anchors, whether a certificate is required, CRLs. The files
/// are read where the runtime is built (`tls::client_verifier`).
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: Located<PathBuf>,
    pub auth: ClientAuth,
    pub crl_files: Vec<Located<PathBuf>>,
}

/// `tls.client_auth`: whether a client without a certificate completes the TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// A certificate is checked when presented; clients without one are served (routes decide).
    Optional,
    /// No valid certificate → the TLS handshake fails, before any HTTP.
    Required,
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
    /// The admin API's bearer token (DESIGN.md section 9); without it the API is off.
    /// Read where the runtime is built.
    pub token_file: Option<Located<PathBuf>>,
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

/// Default `limits.max_assembly_memory`.
pub const DEFAULT_MAX_ASSEMBLY_MEMORY: usize = 256 << 20;
/// Default `limits.max_assembly_memory_per_client`: this share of `max_assembly_memory`
/// (but at least `max_message_size`), so one client cannot hold the whole budget.
pub const DEFAULT_ASSEMBLY_SHARE_DIVISOR: usize = 4;
/// Default `limits.max_compression_memory`.
pub const DEFAULT_MAX_COMPRESSION_MEMORY: usize = 256 << 20;
/// Default `limits.assembly_timeout`.
pub const DEFAULT_ASSEMBLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval of the progress event for long sessions.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_size: usize,
    pub max_frame_size: usize,
    /// Frames per client message; more → close 1009.
    pub max_fragments: u32,
    /// What messages being assembled for validation may hold together, gateway-wide;
    /// beyond it a session that needs more is closed with 1013.
    pub max_assembly_memory: usize,
    /// What one client (its address, IPv6 by `ipv6_prefix`, and its identity when
    /// known, each counted on its own) may hold of `max_assembly_memory`; beyond it
    /// that client's session that needs more is closed with 1013.
    pub max_assembly_memory_per_client: usize,
    /// A message being assembled for validation must be complete this long after its
    /// first frame, else the session is closed with 1001.
    pub assembly_timeout: Duration,
    /// What the deflate/inflate state of all sessions with permessage-deflate may hold
    /// together; beyond it a new session's 101 carries no extension.
    pub max_compression_memory: usize,
    /// Per-IP admission (new-connection rate, concurrency, auth-failure bans).
    pub admission: AdmissionLimits,
    /// Client → upstream messages (pings included) per connection.
    pub message_rate: Rate,
    pub message_burst: u32,
    /// A client held back by `message_rate` without pause for this long is closed with 1008.
    pub rate_abuse_timeout: Duration,
    /// Concurrent sessions per JWT `sub`.
    pub max_connections_per_user: u32,
}

/// The `[limits]` values per-IP admission uses (rate, concurrency, auth-failure bans).
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionLimits {
    pub connection_rate: Rate,
    pub connection_burst: u32,
    /// Plain HTTP requests per client IP on `http = true` routes (GCRA), apart from
    /// the connection rate.
    pub http_rate: Rate,
    pub http_burst: u32,
    pub max_connections_per_ip: u32,
    pub ipv6_prefix: u8,
    pub auth_failures_per_ip: u32,
    pub auth_failure_window: Duration,
    pub auth_ban: Duration,
}

/// What the firewall does when no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FirewallDefault {
    #[default]
    Allow,
    Deny,
}

/// `[firewall]` as written: inline rules (already parsed) and rule files (read when the
/// runtime is built, by `firewall::Firewall::load`).
#[derive(Debug, Clone, Default)]
pub struct FirewallRules {
    pub default: FirewallDefault,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub allow_files: Vec<Located<PathBuf>>,
    pub deny_files: Vec<Located<PathBuf>>,
}

impl FirewallRules {
    /// Whether any deny rule is configured (inline or in a file).
    pub fn has_deny_rules(&self) -> bool {
        !self.deny.is_empty() || !self.deny_files.is_empty()
    }
}

/// Default `pass_headers` of a forward provider: what a cookie-session app reads.
pub const DEFAULT_FORWARD_PASS_HEADERS: [&str; 3] = ["cookie", "authorization", "origin"];
/// Default `timeout` of a forward provider: the whole exchange with the auth endpoint.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// `[providers.NAME]` of kind `"forward"`: the app's endpoint decides (cookie sessions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// `http://` or `https://`, without credentials.
    pub url: http::Uri,
    /// The client's headers sent to `url` (lower case; only these).
    pub pass_headers: Vec<http::HeaderName>,
    /// The answer's header naming the user.
    pub identity_header: http::HeaderName,
    /// Answer headers sent upstream; client copies of these names are removed.
    pub copy_headers: Vec<http::HeaderName>,
    /// How long an answer may be reused (zero: never).
    pub cache: Duration,
    /// Live sessions are asked again this often (`None`: never).
    pub recheck: Option<Duration>,
    pub timeout: Duration,
    /// Extra trust anchor for an `https` url.
    pub ca_file: Option<Located<PathBuf>>,
}

/// A `[providers.NAME]` of kind `"introspection"`: RFC 7662 for opaque tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introspection {
    /// The introspection endpoint (https).
    pub url: http::Uri,
    pub client_id: String,
    /// The client secret's file or variable (the secret itself is read when the
    /// runtime is built, never kept in the config).
    pub client_secret: SecretSource,
    /// How long an answer may be reused (zero: never); never past the token's `exp`.
    pub cache: Duration,
    /// Live sessions are introspected again this often (`None`: never).
    pub recheck: Option<Duration>,
    pub timeout: Duration,
    /// Extra trust anchor for the endpoint's HTTPS.
    pub ca_file: Option<Located<PathBuf>>,
    /// The answer's `iss` must be this one, when set.
    pub issuer: Option<String>,
    /// The answer's `aud` must hold one of these, when set.
    pub audience: Vec<String>,
    /// The claim that names the user (`None`: `sub`, else `username`, else `client_id`).
    pub identity_claim: Option<String>,
    /// Where the token is found (`[jwt]`'s sources unless set; never `first_message`).
    pub token_sources: Vec<TokenSource>,
}

/// Where a JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksUrl {
    /// The JWKS, or (`discovery`) the issuer's discovery document.
    pub url: http::Uri,
    pub refresh: Duration,
    /// Extra trust anchor for the identity provider (tests, private CAs).
    pub ca: Option<Located<PathBuf>>,
    /// OIDC discovery (`discovery = true`): `url` is
    /// `{issuer}/.well-known/openid-configuration`, whose `issuer` must be this one
    /// exactly; the keys are at its `jwks_uri` (https, the same trust anchors).
    pub discovery: Option<Located<String>>,
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
    pub jwks_url: Option<JwksUrl>,
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

impl Config {
    /// The token settings of `route`: its provider's, or `[jwt]`.
    pub fn jwt_of(&self, route: &Route) -> &Jwt {
        route.provider.as_ref().and_then(|p| self.providers.get(p)).unwrap_or(&self.jwt)
    }

    /// Where `route`'s token is found (and what is removed before its upstream).
    pub fn token_sources_of(&self, route: &Route) -> &[TokenSource] {
        match route.provider.as_ref().and_then(|p| self.introspection_providers.get(p)) {
            Some(i) => &i.token_sources,
            None => &self.jwt_of(route).token_sources,
        }
    }

    /// The limits of `route`'s sessions: its `[routes.limits]`, else the global ones.
    /// A route that raises `max_message_size` without `max_frame_size` takes frames as
    /// large as its messages (a browser sends a message as one frame).
    pub fn limits_of(&self, route: &Route) -> SessionLimits {
        let (o, l, s) = (&route.limits, &self.limits, &self.server);
        let max_message_size = o.max_message_size.unwrap_or(l.max_message_size);
        SessionLimits {
            max_message_size,
            max_frame_size: o
                .max_frame_size
                .or(o.max_message_size)
                .unwrap_or(l.max_frame_size)
                .min(max_message_size),
            max_fragments: o.max_fragments.unwrap_or(l.max_fragments),
            message_rate: o.message_rate.unwrap_or(l.message_rate),
            message_burst: o.message_burst.unwrap_or(l.message_burst),
            max_connections_per_user: o.max_connections_per_user.unwrap_or(l.max_connections_per_user),
            user_cap_per_route: o.max_connections_per_user.is_some(),
            idle_timeout: o.idle_timeout.unwrap_or(s.idle_timeout),
            ping_interval: o.ping_interval.unwrap_or(s.ping_interval),
            first_message_timeout: o.first_message_timeout.unwrap_or(self.jwt_of(route).first_message_timeout),
        }
    }

    /// The route for a request to `host` (normalised by [`normalize_host`]) and `path`:
    /// host first (an exact host, then a wildcard, then routes for any host), then path
    /// (an exact path, then the longest prefix).
    pub fn route(&self, host: &str, path: &str) -> Option<&Route> {
        self.route_index(host, path).map(|i| &self.routes[i])
    }

    /// Index into `routes` of the route for `host` and `path`.
    pub fn route_index(&self, host: &str, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.matches(path))
            .filter_map(|(i, r)| {
                let path_rank = match &r.path {
                    PathMatch::Exact(_) => usize::MAX,
                    PathMatch::Prefix(p) => p.len(),
                };
                r.host_rank(host).map(|h| ((h, path_rank), i))
            })
            // Ties cannot happen (same host and path is a config error); the first wins.
            .max_by_key(|&(rank, i)| (rank, std::cmp::Reverse(i)))
            .map(|(_, i)| i)
    }

    /// The files a reload reads besides the config file itself (certificates, keys,
    /// secrets, CA and CRL files, firewall lists, schemas): what `watch_config` watches.
    /// Files that only a restart reads (the log file, ACME's cache, the cluster's) are not.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<&Located<PathBuf>> = Vec::new();
        if self.tls.acme.is_none() {
            files.extend([&self.tls.cert, &self.tls.key]);
        }
        if let Some(c) = &self.tls.client {
            files.push(&c.ca);
            files.extend(&c.crl_files);
        }
        for c in &self.tls.certificates {
            files.extend([&c.cert, &c.key]);
        }
        files.extend(&self.admin.token_file);
        files.extend(&self.server.sticky_key_file);
        files.extend(self.firewall.allow_files.iter().chain(&self.firewall.deny_files));
        // `[jwt]` and every `[providers.NAME]`: secrets, keys, JWKS files, revocation lists.
        for j in std::iter::once(&self.jwt).chain(self.providers.values()) {
            if let SecretSource::File { path, .. } = &j.secret {
                files.push(path);
            }
            files.extend(&j.public_key_files);
            files.extend(j.jwks_file.iter().chain(&j.revoked_jti_file));
            files.extend(j.jwks_url.as_ref().and_then(|u| u.ca.as_ref()));
        }
        for f in self.forward_providers.values() {
            files.extend(&f.ca_file);
        }
        for i in self.introspection_providers.values() {
            if let SecretSource::File { path, .. } = &i.client_secret {
                files.push(path);
            }
            files.extend(&i.ca_file);
        }
        for r in &self.routes {
            files.extend(&r.upstream_ca);
            files.extend(r.validate.as_ref().and_then(|v| v.schema_file.as_ref()));
        }
        let mut paths: Vec<PathBuf> = files.into_iter().map(|l| l.value.clone()).collect();
        paths.sort();
        paths.dedup();
        paths
    }

    /// Read and validate a config file. Relative paths inside resolve against the working directory.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let src = crate::fsutil::read_text(path, crate::fsutil::MAX_CONFIG_FILE).map_err(|e| ConfigError {
            file: origin.clone(),
            line: None,
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        Config::from_toml_str(&src, &origin)
    }

    /// Parse and validate TOML text. `origin` names the source in error messages.
    pub fn from_toml_str(src: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: raw::File = toml::from_str(src).map_err(|e| located::toml_error(src, origin, &e))?;
        validate::Validator { src, origin }.validate(raw)
    }
}

#[cfg(test)]
mod tests;
