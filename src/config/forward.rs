//! `[providers.NAME]` of kind `"forward"` (DESIGN.md section 15): the app's own endpoint
//! decides. Every error names the key and its line and never echoes a header value.

use super::validate::{Validator, shown};
use super::*;
use toml::Spanned;

/// Longest `cache` and `recheck`: a day (an answer kept longer outlives any session policy).
const MAX_FORWARD_PERIOD: Duration = Duration::from_secs(86_400);
/// Longest `timeout`.
const MAX_FORWARD_TIMEOUT: Duration = Duration::from_secs(60);
/// Headers the gateway derives itself for the auth endpoint: never passed from the client.
pub const FORWARD_DERIVED: [&str; 6] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-uri",
    "x-original-method",
    "host",
];

impl Validator<'_> {
    pub(super) fn forward(&self, j: raw::Jwt, f: raw::ForwardKeys, p: &str, span: std::ops::Range<usize>) -> Result<Forward, ConfigError> {
        if j.has_any_key() {
            return Err(self.err(
                &Spanned::new(span.clone(), ()),
                &format!("{p}.kind"),
                "a forward provider takes url, pass_headers, identity_header, copy_headers, cache, recheck, timeout \
                 and ca_file, not token keys",
            ));
        }
        let Some(u) = &f.url else {
            return Err(self.err(&Spanned::new(span, ()), &format!("{p}.url"), "a forward provider needs url"));
        };
        let key = format!("{p}.url");
        let url: http::Uri = u.get_ref().parse().map_err(|_| self.err(u, &key, "not a valid URL"))?;
        let https = match url.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(self.err(u, &key, "must be an http:// or https:// URL")),
        };
        let Some(authority) = url.authority() else {
            return Err(self.err(u, &key, "needs a host"));
        };
        if authority.as_str().contains('@') {
            return Err(self.err(u, &key, "must not carry credentials (user:password@)"));
        }
        if url.host().is_none_or(str::is_empty) {
            return Err(self.err(u, &key, "needs a host"));
        }
        let pass_headers = match &f.pass_headers {
            None => DEFAULT_FORWARD_PASS_HEADERS
                .iter()
                .map(|h| http::HeaderName::from_static(h))
                .collect(),
            Some(list) => {
                let names = self.header_names(list, &format!("{p}.pass_headers"))?;
                // In any spelling (`x_forwarded_for`, `X-Real-IP`): the endpoint would read a
                // client's copy as the gateway's word.
                let derived = |h: &http::HeaderName| {
                    FORWARD_DERIVED.iter().any(|d| crate::util::same_header(d, h.as_str())) || super::is_client_forwarding(h.as_str())
                };
                if let Some(h) = names.iter().find(|h| derived(h)) {
                    return Err(self.err(
                        list,
                        &format!("{p}.pass_headers"),
                        format!("\"{}\" is derived by the gateway, never passed from the client", h.as_str()),
                    ));
                }
                names
            }
        };
        let Some(ih) = &f.identity_header else {
            return Err(self.err(
                &Spanned::new(span, ()),
                &format!("{p}.identity_header"),
                "a forward provider needs identity_header",
            ));
        };
        let identity_header = http::HeaderName::from_bytes(ih.get_ref().as_bytes()).map_err(|_| {
            self.err(
                ih,
                &format!("{p}.identity_header"),
                format!("\"{}\" is not a header name", shown(ih.get_ref())),
            )
        })?;
        let copy_headers = match &f.copy_headers {
            None => Vec::new(),
            Some(list) => self.header_names(list, &format!("{p}.copy_headers"))?,
        };
        let period = |v: &Option<Spanned<HumanDuration>>, k: &str, zero_ok: bool| -> Result<Option<Duration>, ConfigError> {
            let Some(d) = v else { return Ok(None) };
            let key = format!("{p}.{k}");
            match d.get_ref().0 {
                z if z.is_zero() && !zero_ok => Err(self.err(d, &key, "must be longer than zero")),
                z if z > MAX_FORWARD_PERIOD => Err(self.err(d, &key, "must be at most 24h")),
                z => Ok(Some(z)),
            }
        };
        let cache = period(&f.cache, "cache", true)?.unwrap_or(Duration::ZERO);
        let recheck = period(&f.recheck, "recheck", false)?;
        let timeout = match (&f.timeout, period(&f.timeout, "timeout", false)?) {
            (Some(at), Some(t)) if t > MAX_FORWARD_TIMEOUT => {
                return Err(self.err(at, &format!("{p}.timeout"), "must be at most 60s"));
            }
            (_, t) => t.unwrap_or(DEFAULT_FORWARD_TIMEOUT),
        };
        let ca_file = match &f.ca_file {
            Some(c) if !https => return Err(self.err(c, &format!("{p}.ca_file"), "only for an https:// url")),
            Some(c) => Some(self.located(c, &format!("{p}.ca_file"))),
            None => None,
        };
        Ok(Forward {
            url,
            pass_headers,
            identity_header,
            copy_headers,
            cache,
            recheck,
            timeout,
            ca_file,
        })
    }

    fn header_names(&self, list: &Spanned<Vec<String>>, key: &str) -> Result<Vec<http::HeaderName>, ConfigError> {
        let mut names: Vec<http::HeaderName> = Vec::new();
        for n in list.get_ref() {
            let name = http::HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| self.err(list, key, format!("\"{}\" is not a header name", shown(n))))?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Ok(names)
    }
}
