//! `wsgate check`: settings that are allowed but insecure, printed as warnings.

use crate::auth::load_secret;
use crate::config::{AuthMode, Config, FirewallDefault};
use std::time::Duration;

/// A JWT leeway beyond this gets a warning.
const LEEWAY_WARNING: Duration = Duration::from_secs(300);
/// HS* secrets shorter than this get a warning.
const MIN_SECRET_LEN: usize = 32;

/// Insecure settings worth a warning from `wsgate check` (they are allowed, not errors).
pub fn warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if config.server.sticky_key_file.is_none()
        && let Some(r) = config.routes.iter().find(|r| r.balance == crate::config::Balance::Sticky)
    {
        w.push(format!(
            "route {:?} has balance = \"sticky\" and server.sticky_key_file is not set: each process signs its cookies with its own key, so after a restart, a binary upgrade or on another instance clients are balanced anew once (Socket.IO then starts a new session); give every instance the same sticky_key_file",
            r.name
        ));
    }
    if config.tls.self_signed_if_missing {
        w.push("tls.self_signed_if_missing = true: a self-signed development certificate may be served".to_string());
    }
    if let Some(a) = &config.tls.acme {
        if crate::acme::is_test_directory(&a.directory_url.value) {
            w.push(format!(
                "tls.acme.directory_url = {}: a staging or test ACME server; browsers do not trust its certificates",
                crate::util::escape(&a.directory_url.value, 128)
            ));
        }
        if !crate::acme::is_test_directory(&a.directory_url.value) && !config.server.listen.iter().any(|l| l.port() == 443) {
            w.push(
                "[tls.acme] without a listener on port 443: the CA validates TLS-ALPN-01 on port 443, which must reach this listener"
                    .to_string(),
            );
        }
        if config.firewall.default == FirewallDefault::Deny {
            w.push("[tls.acme] with firewall.default = \"deny\": the CA's validation servers must be allowed to reach the wss listener, or no certificate is issued".to_string());
        }
    }
    if let crate::config::SecretSource::File {
        generate_if_missing: true, ..
    } = config.jwt.secret
    {
        w.push("jwt.generate_secret_if_missing = true: development only".to_string());
    }
    if let Ok(secret) = load_secret(&config.jwt.secret, &config.origin, false)
        && secret.len() < MIN_SECRET_LEN
        && config.jwt.uses_secret()
    {
        w.push(format!("jwt secret is {} bytes; use at least 32", secret.len()));
    }
    for addr in config.server.listen_plain.iter().filter(|a| !a.ip().is_loopback()) {
        if config.server.trusted_proxies.is_empty() {
            w.push(format!(
                "server.listen_plain = {addr} is not loopback and server.trusted_proxies is empty: clients reach it without TLS (put it behind the balancer that terminates TLS, and name that balancer in trusted_proxies)"
            ));
        }
    }
    if !config.admin.listen.ip().is_loopback() {
        w.push(format!(
            "admin.listen = {}: metrics are reachable beyond this host",
            config.admin.listen
        ));
        if config.admin.token_file.is_some() {
            w.push(format!(
                "admin.token_file is set and admin.listen = {} is not loopback: the admin API (bans, revocations, kicks) is reachable beyond this host",
                config.admin.listen
            ));
        }
    }
    let jwt_routes = config.routes.iter().any(|r| r.auth.uses_jwt());
    let exp_required = config.jwt.required_claims.iter().any(|c| c == "exp");
    if jwt_routes && !exp_required {
        w.push("jwt.required_claims does not hold \"exp\": tokens that never expire are accepted".to_string());
    }
    if jwt_routes && exp_required && !config.jwt.close_on_expiry {
        w.push("jwt.close_on_expiry = false: sessions outlive their token's exp".to_string());
    }
    if config.jwt.leeway > LEEWAY_WARNING {
        w.push("jwt.leeway is over 5 minutes".to_string());
    }
    let public = config.server.listen.iter().any(|a| !a.ip().is_loopback());
    if public && config.firewall.default == FirewallDefault::Allow && !config.firewall.has_deny_rules() {
        w.push("firewall default = \"allow\" with no deny rules on a public listener".to_string());
    }
    if let Some(c) = &config.tls.client
        && c.auth == crate::config::ClientAuth::Optional
        && !config.routes.iter().any(|r| r.auth.uses_cert())
    {
        w.push(
            "tls.client_auth = \"optional\" but no route has auth = \"mtls\" or \"jwt+mtls\": certificates are checked and then unused"
                .to_string(),
        );
    }
    if config.cluster.as_ref().is_some_and(|c| c.state_file.is_none()) {
        w.push(
            "[cluster] without state_file: an instance started while Redis is unreachable knows no bans or revocations and is not ready (503 on /readyz) until Redis answers"
                .to_string(),
        );
    }
    for r in &config.routes {
        if r.auth == AuthMode::None && public {
            w.push(format!("route {:?} has auth = \"none\" on a public listener", r.name));
        }
        let c = &r.compression;
        if (c.client || c.upstream) && c.context_takeover {
            let per_session =
                crate::relay::deflate::deflate_memory(crate::extension::MAX_WINDOW_BITS) + crate::relay::deflate::INFLATE_MEMORY;
            w.push(format!(
                "route {:?} has context_takeover = true: each compressed session keeps about {} KiB of deflate/inflate state per hop, idle or not; limits.max_compression_memory ({} MiB) holds about {} such sessions, later ones go uncompressed",
                r.name,
                per_session >> 10,
                config.limits.max_compression_memory >> 20,
                config.limits.max_compression_memory / per_session
            ));
        }
        if (c.client || c.upstream) && c.level >= 7 {
            w.push(format!(
                "route {:?} has compression_level = {}: several times the CPU of level 1 per message, for a few percent on short messages",
                r.name, c.level
            ));
        }
        if a_first_message_route(config, r) && c.client {
            w.push(format!(
                "route {:?} takes its token in the first message: clients are answered without permessage-deflate there (the 101 goes before the token is read)",
                r.name
            ));
        }
        if r.allowed_origins.iter().any(|o| o == "*") {
            w.push(format!(
                "route {:?} has allowed_origins = [\"*\"]: any web page may open sockets",
                r.name
            ));
        }
    }
    w.extend(shared_provider_keys(config));
    w
}

/// Whether `route` may take its token in the first message (so its 101 goes out first).
fn a_first_message_route(config: &Config, route: &crate::config::Route) -> bool {
    route.auth.uses_jwt()
        && config
            .jwt_of(route)
            .token_sources
            .iter()
            .any(|s| matches!(s, crate::config::TokenSource::FirstMessage))
}

/// Token verifiers (`[jwt]` and `[providers.NAME]`) that neither issuer nor audience
/// tells apart, one of them with keys fetched from a JWKS URL. Static keys they share
/// are refused at load; fetched ones can only be found per token: a token both would
/// accept is then refused (401) on the routes of both.
fn shared_provider_keys(config: &Config) -> Vec<String> {
    let used = |p: Option<&str>| config.routes.iter().any(|r| r.auth.uses_jwt() && r.provider.as_deref() == p);
    let all: Vec<(String, &crate::config::Jwt)> = std::iter::once(("[jwt]".to_string(), &config.jwt))
        .filter(|_| used(None))
        .chain(
            config
                .providers
                .iter()
                .filter(|(n, _)| used(Some(n)))
                .map(|(n, p)| (format!("[providers.{n}]"), p)),
        )
        .collect();
    let apart = |a: &crate::config::Jwt, b: &crate::config::Jwt| {
        let issuers = matches!((&a.issuer, &b.issuer), (Some(x), Some(y)) if x != y);
        let audiences = !a.audience.is_empty() && !b.audience.is_empty() && !a.audience.iter().any(|x| b.audience.contains(x));
        issuers || audiences
    };
    let mut w = Vec::new();
    for (i, (a, ja)) in all.iter().enumerate() {
        for (b, jb) in &all[i + 1..] {
            if (ja.jwks_url.is_some() || jb.jwks_url.is_some()) && !apart(ja, jb) {
                w.push(format!(
                    "{a} and {b}: no issuer or audience tells their tokens apart, and keys come from a JWKS URL: \
                     should both ever hold one key, tokens both would accept are refused on the routes of both; \
                     set distinct `issuer`s"
                ));
            }
        }
    }
    w
}

/// Routes whose `host` no certificate names (`[tls]`, `[[tls.certificates]]`, or
/// `[tls.acme]`'s domains): browsers refuse such a host before any request.
pub fn host_warnings(config: &Config, certs: &crate::tls::CertStore) -> Vec<String> {
    let served = certs.all();
    let acme: Vec<String> = config
        .tls
        .acme
        .iter()
        .flat_map(|a| a.domains.iter().map(|d| d.to_string()))
        .collect();
    config
        .routes
        .iter()
        .filter_map(|r| {
            let host = r.host.as_ref()?;
            let name = host.to_string();
            let covered = match host {
                crate::config::HostMatch::Exact(h) => served.iter().any(|c| c.names_host(h)) || acme.iter().any(|d| covers(d, h)),
                crate::config::HostMatch::Wildcard(_) => {
                    served.iter().any(|c| c.names.iter().any(|n| n.to_string() == name)) || acme.contains(&name)
                }
            };
            (!covered).then(|| format!("route \"{}\": host \"{name}\" is not a name of any certificate served", r.name))
        })
        .collect()
}

/// Whether an ACME domain (`x.example.com` or `*.example.com`) names `host`.
fn covers(domain: &str, host: &str) -> bool {
    domain == host
        || domain
            .strip_prefix("*.")
            .is_some_and(|rest| host.split_once('.').is_some_and(|(l, parent)| !l.is_empty() && parent == rest))
}
