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
        if r.allowed_origins.iter().any(|o| o == "*") {
            w.push(format!(
                "route {:?} has allowed_origins = [\"*\"]: any web page may open sockets",
                r.name
            ));
        }
    }
    w
}
