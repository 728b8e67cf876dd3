//! `[providers.NAME]` of kind `"introspection"` (DESIGN.md section 15, RFC 7662): an
//! opaque token judged by the issuer's introspection endpoint. Every error names the key
//! and its line and never echoes the client secret.

use super::validate::{Validator, is_env_var_name};
use super::*;
use toml::Spanned;

/// Longest `cache` and `recheck`: a day.
const MAX_PERIOD: Duration = Duration::from_secs(86_400);
/// Longest `timeout`.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

impl Validator<'_> {
    pub(super) fn introspection(
        &self,
        j: raw::Jwt,
        f: raw::ForwardKeys,
        i: raw::IntrospectionKeys,
        p: &str,
        span: std::ops::Range<usize>,
        default_sources: &[TokenSource],
    ) -> Result<Introspection, ConfigError> {
        let at = Spanned::new(span, ());
        let forward_only = [
            ("pass_headers", f.pass_headers.as_ref().map(Spanned::span)),
            ("identity_header", f.identity_header.as_ref().map(Spanned::span)),
            ("copy_headers", f.copy_headers.as_ref().map(Spanned::span)),
        ];
        if let Some((key, s)) = forward_only.into_iter().find_map(|(k, s)| s.map(|s| (k, s))) {
            return Err(self.err(
                &Spanned::new(s, ()),
                &format!("{p}.{key}"),
                "a key of kind \"forward\", not \"introspection\"",
            ));
        }
        // Of the token keys, only those that read the answer or find the token.
        let token_keys = raw::Jwt {
            issuer: None,
            audience: None,
            identity_claim: None,
            token_sources: None,
            ..j
        };
        if token_keys.has_any_key() {
            return Err(self.err(
                &at,
                &format!("{p}.kind"),
                "an introspection provider takes url, client_id, client_secret_file or client_secret_env, cache, \
                 recheck, timeout, ca_file, issuer, audience, identity_claim and token_sources, not key material",
            ));
        }
        let Some(u) = &f.url else {
            return Err(self.err(&at, &format!("{p}.url"), "an introspection provider needs url"));
        };
        let key = format!("{p}.url");
        let url: http::Uri = u.get_ref().parse().map_err(|_| self.err(u, &key, "not a valid URL"))?;
        if url.scheme_str() != Some("https") {
            return Err(self.err(u, &key, "must be an https:// URL (the token and the client secret travel on it)"));
        }
        if url.authority().is_none_or(|a| a.as_str().contains('@')) || url.host().is_none_or(str::is_empty) {
            return Err(self.err(u, &key, "needs a host and no credentials (user:password@)"));
        }
        let Some(client_id) = &i.client_id else {
            return Err(self.err(&at, &format!("{p}.client_id"), "an introspection provider needs client_id"));
        };
        let id = client_id.get_ref();
        if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
            return Err(self.err(
                client_id,
                &format!("{p}.client_id"),
                "must be 1 to 256 characters without control characters",
            ));
        }
        let client_secret = match (&i.client_secret_file, &i.client_secret_env) {
            (Some(_), Some(env)) => {
                return Err(self.err(
                    env,
                    &format!("{p}.client_secret_env"),
                    "set either client_secret_file or client_secret_env, not both",
                ));
            }
            (Some(file), None) => SecretSource::File {
                path: self.located(file, &format!("{p}.client_secret_file")),
                generate_if_missing: false,
            },
            (None, Some(env)) if is_env_var_name(env.get_ref()) => SecretSource::Env(self.located(env, &format!("{p}.client_secret_env"))),
            (None, Some(env)) => {
                return Err(self.err(
                    env,
                    &format!("{p}.client_secret_env"),
                    "must name an environment variable (letters, digits and '_'; the value is not shown)",
                ));
            }
            (None, None) => {
                return Err(self.err(
                    &at,
                    &format!("{p}.client_secret_file"),
                    "an introspection provider needs client_secret_file or client_secret_env",
                ));
            }
        };
        let period = |v: &Option<Spanned<HumanDuration>>, k: &str, zero_ok: bool, max: Duration| -> Result<Option<Duration>, ConfigError> {
            let Some(d) = v else { return Ok(None) };
            let key = format!("{p}.{k}");
            match d.get_ref().0 {
                z if z.is_zero() && !zero_ok => Err(self.err(d, &key, "must be longer than zero")),
                z if z > max => Err(self.err(d, &key, format!("must be at most {}s", max.as_secs()))),
                z => Ok(Some(z)),
            }
        };
        let cache = period(&f.cache, "cache", true, MAX_PERIOD)?.unwrap_or(Duration::ZERO);
        let recheck = period(&f.recheck, "recheck", false, MAX_PERIOD)?;
        let timeout = period(&f.timeout, "timeout", false, MAX_TIMEOUT)?.unwrap_or(DEFAULT_FORWARD_TIMEOUT);
        let identity_claim = match &j.identity_claim {
            None => None,
            Some(c) if c.get_ref().is_empty() || c.get_ref().chars().any(char::is_control) => {
                return Err(self.err(c, &format!("{p}.identity_claim"), "must name a claim"));
            }
            Some(c) => Some(c.get_ref().clone()),
        };
        let token_sources = match &j.token_sources {
            None => default_sources
                .iter()
                .filter(|s| **s != TokenSource::FirstMessage)
                .cloned()
                .collect(),
            Some(list) => {
                let sources = self.token_sources(Some(list), p)?;
                if sources.contains(&TokenSource::FirstMessage) {
                    return Err(self.err(
                        list,
                        &format!("{p}.token_sources"),
                        "\"first_message\": not for an introspection provider",
                    ));
                }
                sources
            }
        };
        if token_sources.is_empty() {
            return Err(self.err(
                &at,
                &format!("{p}.token_sources"),
                "no token source left (first_message is not one here)",
            ));
        }
        Ok(Introspection {
            url,
            client_id: id.clone(),
            client_secret,
            cache,
            recheck,
            timeout,
            ca_file: f.ca_file.as_ref().map(|c| self.located(c, &format!("{p}.ca_file"))),
            issuer: j.issuer,
            audience: j.audience.unwrap_or_default(),
            identity_claim,
            token_sources,
        })
    }
}
