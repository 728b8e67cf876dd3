//! The TOML file as written: serde structs that mirror it exactly. Every table
//! rejects unknown keys; typed values (durations, sizes, addresses) parse on the way in.

use super::units::{ByteSize, HumanDuration, Rate};
use super::{AuthMode, ClientAuth, ClientIpSource, FirewallDefault, LogFormat, OnInvalid, TlsVersion};
use ipnet::IpNet;
use serde::Deserialize;
use std::{net::SocketAddr, path::PathBuf};
use toml::Spanned;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct File {
    pub server: Server,
    pub tls: Tls,
    pub admin: Admin,
    pub log: Log,
    pub limits: Limits,
    pub firewall: Firewall,
    pub jwt: Jwt,
    pub routes: Vec<Route>,
    pub providers: std::collections::BTreeMap<String, Spanned<Provider>>,
    pub cluster: Option<Spanned<Cluster>>,
}

/// `[cluster]`: state shared by several instances through Redis.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Cluster {
    pub redis: Option<Spanned<String>>,
    pub sentinels: Option<Spanned<Vec<Spanned<String>>>>,
    pub sentinel_master: Option<Spanned<String>>,
    pub redis_cluster: Option<Spanned<Vec<Spanned<String>>>>,
    pub state_file: Option<Spanned<PathBuf>>,
    pub redis_password_env: Option<Spanned<String>>,
    pub redis_password_file: Option<Spanned<PathBuf>>,
    pub redis_ca: Option<Spanned<PathBuf>>,
    pub key_prefix: Option<Spanned<String>>,
    pub timeout: Option<HumanDuration>,
    pub on_failure: Option<super::OnFailure>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Firewall {
    pub default: Option<FirewallDefault>,
    pub allow: Option<Spanned<Vec<String>>>,
    pub deny: Option<Spanned<Vec<String>>>,
    pub allow_files: Option<Spanned<Vec<PathBuf>>>,
    pub deny_files: Option<Spanned<Vec<PathBuf>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Server {
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
    pub watch_config: Option<bool>,
    pub listen_plain: Vec<SocketAddr>,
    pub control_socket: Option<PathBuf>,
    pub sticky_key_file: Option<Spanned<PathBuf>>,
    pub workers: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Tls {
    pub cert: Option<Spanned<PathBuf>>,
    pub key: Option<Spanned<PathBuf>>,
    pub self_signed_if_missing: Option<bool>,
    pub min_version: Option<TlsVersion>,
    pub client_ca: Option<Spanned<PathBuf>>,
    pub client_auth: Option<Spanned<ClientAuth>>,
    pub client_crl_files: Option<Spanned<Vec<PathBuf>>>,
    pub acme: Option<Spanned<Acme>>,
    pub certificates: Option<Spanned<Vec<CertificateFiles>>>,
}

/// One `[[tls.certificates]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CertificateFiles {
    pub cert: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
}

/// `[tls.acme]`: automatic certificates.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Acme {
    pub directory_url: Option<Spanned<String>>,
    pub contact: Option<Spanned<Vec<String>>>,
    pub domains: Spanned<Vec<String>>,
    pub cache_dir: Option<Spanned<PathBuf>>,
    pub renew_before: Option<Spanned<HumanDuration>>,
    pub ca_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Admin {
    pub listen: Option<SocketAddr>,
    pub token_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Log {
    pub format: Option<LogFormat>,
    pub level: Option<String>,
    pub file: Option<PathBuf>,
    pub progress_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Limits {
    pub max_message_size: Option<ByteSize>,
    pub max_frame_size: Option<ByteSize>,
    pub max_fragments: Option<u32>,
    pub max_assembly_memory: Option<ByteSize>,
    pub max_assembly_memory_per_client: Option<ByteSize>,
    pub assembly_timeout: Option<HumanDuration>,
    pub max_compression_memory: Option<ByteSize>,
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
    pub http_rate_per_ip: Option<Rate>,
    pub http_burst_per_ip: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Jwt {
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
    /// OIDC discovery from `issuer` (DESIGN.md section 15).
    pub discovery: Option<Spanned<bool>>,
}

/// `[providers.NAME]`: a `kind` and, for kind `"jwt"`, every key of `[jwt]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Provider {
    pub kind: Spanned<String>,
    #[serde(default)]
    pub algorithms: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub secret_env: Option<Spanned<String>>,
    #[serde(default)]
    pub secret_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub generate_secret_if_missing: Option<bool>,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<Vec<String>>,
    #[serde(default)]
    pub leeway: Option<HumanDuration>,
    #[serde(default)]
    pub required_claims: Option<Vec<String>>,
    #[serde(default)]
    pub token_sources: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub close_on_expiry: Option<bool>,
    #[serde(default)]
    pub public_key_files: Option<Spanned<Vec<PathBuf>>>,
    #[serde(default)]
    pub jwks_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub jwks_url: Option<Spanned<String>>,
    #[serde(default)]
    pub jwks_refresh: Option<HumanDuration>,
    #[serde(default)]
    pub jwks_ca: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub revoked_jti_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub first_message_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub identity_claim: Option<Spanned<String>>,
    #[serde(default)]
    pub discovery: Option<Spanned<bool>>,
    // Kind "forward" (DESIGN.md section 15).
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    #[serde(default)]
    pub pass_headers: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub identity_header: Option<Spanned<String>>,
    #[serde(default)]
    pub copy_headers: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub cache: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub recheck: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub timeout: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    pub ca_file: Option<Spanned<PathBuf>>,
    // Kind "introspection" (DESIGN.md section 15); it shares url, cache, recheck,
    // timeout and ca_file with "forward".
    #[serde(default)]
    pub client_id: Option<Spanned<String>>,
    #[serde(default)]
    pub client_secret_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub client_secret_env: Option<Spanned<String>>,
}

/// The keys only a `[providers.NAME]` of kind `"introspection"` takes.
pub(super) struct IntrospectionKeys {
    pub client_id: Option<Spanned<String>>,
    pub client_secret_file: Option<Spanned<PathBuf>>,
    pub client_secret_env: Option<Spanned<String>>,
}

impl IntrospectionKeys {
    /// The first key set (for an error on a provider of another kind).
    pub(super) fn first_set(&self) -> Option<(&'static str, std::ops::Range<usize>)> {
        let spans = [
            ("client_id", self.client_id.as_ref().map(Spanned::span)),
            ("client_secret_file", self.client_secret_file.as_ref().map(Spanned::span)),
            ("client_secret_env", self.client_secret_env.as_ref().map(Spanned::span)),
        ];
        spans.into_iter().find_map(|(k, s)| s.map(|s| (k, s)))
    }
}

impl Jwt {
    /// Whether any key is set (a forward provider takes none of them).
    pub(super) fn has_any_key(&self) -> bool {
        self.algorithms.is_some()
            || self.secret_env.is_some()
            || self.secret_file.is_some()
            || self.generate_secret_if_missing.is_some()
            || self.issuer.is_some()
            || self.audience.is_some()
            || self.leeway.is_some()
            || self.required_claims.is_some()
            || self.token_sources.is_some()
            || self.close_on_expiry.is_some()
            || self.public_key_files.is_some()
            || self.jwks_file.is_some()
            || self.jwks_url.is_some()
            || self.jwks_refresh.is_some()
            || self.jwks_ca.is_some()
            || self.revoked_jti_file.is_some()
            || self.first_message_timeout.is_some()
            || self.identity_claim.is_some()
            || self.discovery.is_some()
    }
}

/// The keys of a `[providers.NAME]` of kind `"forward"`.
pub(super) struct ForwardKeys {
    pub url: Option<Spanned<String>>,
    pub pass_headers: Option<Spanned<Vec<String>>>,
    pub identity_header: Option<Spanned<String>>,
    pub copy_headers: Option<Spanned<Vec<String>>>,
    pub cache: Option<Spanned<HumanDuration>>,
    pub recheck: Option<Spanned<HumanDuration>>,
    pub timeout: Option<Spanned<HumanDuration>>,
    pub ca_file: Option<Spanned<PathBuf>>,
}

impl ForwardKeys {
    /// The first forward key set (for an error on a provider of another kind).
    pub(super) fn first_set(&self) -> Option<(&'static str, std::ops::Range<usize>)> {
        let spans = [
            ("url", self.url.as_ref().map(Spanned::span)),
            ("pass_headers", self.pass_headers.as_ref().map(Spanned::span)),
            ("identity_header", self.identity_header.as_ref().map(Spanned::span)),
            ("copy_headers", self.copy_headers.as_ref().map(Spanned::span)),
            ("cache", self.cache.as_ref().map(Spanned::span)),
            ("recheck", self.recheck.as_ref().map(Spanned::span)),
            ("timeout", self.timeout.as_ref().map(Spanned::span)),
            ("ca_file", self.ca_file.as_ref().map(Spanned::span)),
        ];
        spans.into_iter().find_map(|(k, s)| s.map(|s| (k, s)))
    }
}

impl Provider {
    /// The kind, the keys as `[jwt]` holds them, the forward keys and the introspection keys.
    pub(super) fn split(self) -> (Spanned<String>, Jwt, ForwardKeys, IntrospectionKeys) {
        (
            self.kind,
            Jwt {
                algorithms: self.algorithms,
                secret_env: self.secret_env,
                secret_file: self.secret_file,
                generate_secret_if_missing: self.generate_secret_if_missing,
                issuer: self.issuer,
                audience: self.audience,
                leeway: self.leeway,
                required_claims: self.required_claims,
                token_sources: self.token_sources,
                close_on_expiry: self.close_on_expiry,
                public_key_files: self.public_key_files,
                jwks_file: self.jwks_file,
                jwks_url: self.jwks_url,
                jwks_refresh: self.jwks_refresh,
                jwks_ca: self.jwks_ca,
                revoked_jti_file: self.revoked_jti_file,
                first_message_timeout: self.first_message_timeout,
                identity_claim: self.identity_claim,
                discovery: self.discovery,
            },
            ForwardKeys {
                url: self.url,
                pass_headers: self.pass_headers,
                identity_header: self.identity_header,
                copy_headers: self.copy_headers,
                cache: self.cache,
                recheck: self.recheck,
                timeout: self.timeout,
                ca_file: self.ca_file,
            },
            IntrospectionKeys {
                client_id: self.client_id,
                client_secret_file: self.client_secret_file,
                client_secret_env: self.client_secret_env,
            },
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Route {
    pub name: Spanned<String>,
    pub host: Option<Spanned<String>>,
    pub provider: Option<Spanned<String>>,
    pub path: Spanned<String>,
    pub upstreams: Spanned<Vec<String>>,
    pub auth: Option<AuthMode>,
    pub forward_token: Option<bool>,
    pub refresh: Option<Spanned<bool>>,
    pub upstream_ca: Option<Spanned<PathBuf>>,
    pub allowed_origins: Option<Spanned<Vec<String>>>,
    pub allow_missing_origin: Option<bool>,
    pub require_claims: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    pub forward_claims: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    pub validate: Option<Spanned<Validate>>,
    pub limits: Option<Spanned<RouteLimits>>,
    pub http: Option<bool>,
    pub http_methods: Option<Spanned<Vec<String>>>,
    pub max_body: Option<Spanned<ByteSize>>,
    pub http_max_connections: Option<Spanned<i64>>,
    pub http_timeout: Option<Spanned<HumanDuration>>,
    pub balance: Option<super::Balance>,
    pub sticky_cookie: Option<Spanned<String>>,
    pub health_check: Option<Spanned<HealthCheck>>,
    pub compression: Option<bool>,
    pub compression_level: Option<Spanned<i64>>,
    pub compression_min_size: Option<Spanned<ByteSize>>,
    pub context_takeover: Option<bool>,
    pub upstream_compression: Option<bool>,
}

/// `health_check = { path, interval, timeout }`: active checks of each upstream.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthCheck {
    pub path: String,
    pub interval: Option<HumanDuration>,
    pub timeout: Option<HumanDuration>,
}

/// `[routes.limits]`: this route's overrides of `[limits]`, `[server]` and `[jwt]` keys.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RouteLimits {
    pub max_message_size: Option<ByteSize>,
    pub max_frame_size: Option<ByteSize>,
    pub max_fragments: Option<u32>,
    pub message_rate: Option<Rate>,
    pub message_burst: Option<u32>,
    pub max_connections_per_user: Option<u32>,
    pub idle_timeout: Option<HumanDuration>,
    pub ping_interval: Option<HumanDuration>,
    pub first_message_timeout: Option<HumanDuration>,
}

/// `[routes.validate]`: message validation, client → upstream.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Validate {
    pub json: Option<bool>,
    pub binary: Option<bool>,
    pub schema_file: Option<Spanned<PathBuf>>,
    pub max_depth: Option<Spanned<u32>>,
    pub on_invalid: Option<OnInvalid>,
}
