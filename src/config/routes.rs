//! `[[routes]]`: each route's path, upstreams, auth, origins, claims and validation, and
//! the checks across routes and the `[tls]` and `[jwt]` tables.

use super::validate::{Validator, shown};
use super::*;
use toml::Spanned;

impl Validator<'_> {
    /// Routes that need a client certificate need `tls.client_ca`.
    pub(super) fn cert_routes(&self, tls: &Tls, routes: &[Route]) -> Result<(), ConfigError> {
        if tls.client.is_some() {
            return Ok(());
        }
        if let Some(r) = routes.iter().find(|r| r.auth.uses_cert()) {
            return Err(self.err_key(
                "tls.client_ca",
                format!(
                    "route \"{}\" needs client certificates (auth = \"mtls\" or \"jwt+mtls\"): set tls.client_ca",
                    r.name
                ),
            ));
        }
        if let Some(r) = routes.iter().find(|r| r.forward_claims.iter().any(|(c, _)| c.starts_with("cert:"))) {
            return Err(self.err_key(
                "tls.client_ca",
                format!("route \"{}\" forwards certificate fields: set tls.client_ca", r.name),
            ));
        }
        Ok(())
    }

    /// Checks across `[jwt]` (`provider` `None`) or a `[providers.NAME]` and the routes
    /// that use it.
    pub(super) fn jwt_routes(&self, jwt: &Jwt, provider: Option<&str>, routes: &[Route]) -> Result<(), ConfigError> {
        if !routes.iter().any(|r| r.auth.uses_jwt() && r.provider.as_deref() == provider) {
            return Ok(());
        }
        let key = match provider {
            Some(name) => format!("providers.{name}.algorithms"),
            None => "jwt.algorithms".to_string(),
        };
        if jwt.algorithms.is_empty() {
            return Err(self.err_key(
                &key,
                "a route uses tokens (auth = \"jwt\" or \"jwt+mtls\") but no algorithm is allowed",
            ));
        }
        let asymmetric = jwt.algorithms.iter().any(|a| a.family() != jsonwebtoken::AlgorithmFamily::Hmac);
        let has_public = !jwt.public_key_files.is_empty() || jwt.jwks_file.is_some() || jwt.jwks_url.is_some();
        if asymmetric && !has_public {
            return Err(self.err_key(&key, "RS/PS/ES/EdDSA algorithms need public_key_files, jwks_file or jwks_url"));
        }
        Ok(())
    }

    /// A route's `provider` names a `[providers.NAME]`, and its `auth` uses tokens.
    pub(super) fn route_providers(
        &self,
        providers: &std::collections::BTreeMap<String, Jwt>,
        forwards: &std::collections::BTreeMap<String, Forward>,
        introspections: &std::collections::BTreeMap<String, Introspection>,
        routes: &[Route],
    ) -> Result<(), ConfigError> {
        for r in routes {
            if r.auth == AuthMode::Introspection {
                let Some(name) = &r.provider else {
                    return Err(self.err_key(
                        "routes.auth",
                        format!("route \"{}\": auth = \"introspection\" needs provider = \"NAME\"", r.name),
                    ));
                };
                if !introspections.contains_key(name) {
                    return Err(self.err_key(
                        "routes.provider",
                        format!("route \"{}\": no [providers.{}] of kind \"introspection\"", r.name, shown(name)),
                    ));
                }
                continue;
            }
            if r.provider.as_ref().is_some_and(|n| introspections.contains_key(n)) {
                return Err(self.err_key(
                    "routes.provider",
                    format!("route \"{}\": an introspection provider needs auth = \"introspection\"", r.name),
                ));
            }
            if r.auth == AuthMode::Forward {
                let Some(name) = &r.provider else {
                    return Err(self.err_key(
                        "routes.auth",
                        format!("route \"{}\": auth = \"forward\" needs provider = \"NAME\"", r.name),
                    ));
                };
                if !forwards.contains_key(name) {
                    return Err(self.err_key(
                        "routes.provider",
                        format!("route \"{}\": no [providers.{}] of kind \"forward\"", r.name, shown(name)),
                    ));
                }
                continue;
            }
            let Some(name) = &r.provider else { continue };
            if forwards.contains_key(name) {
                return Err(self.err_key(
                    "routes.provider",
                    format!("route \"{}\": a forward provider needs auth = \"forward\"", r.name),
                ));
            }
            if !providers.contains_key(name) {
                return Err(self.err_key("routes.provider", format!("route \"{}\": no [providers.{}]", r.name, shown(name))));
            }
            if !r.auth.uses_jwt() {
                return Err(self.err_key(
                    "routes.provider",
                    format!("route \"{}\": a jwt provider needs auth = \"jwt\" or \"jwt+mtls\"", r.name),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn routes(
        &self,
        raws: Vec<raw::Route>,
        jwt: &Jwt,
        providers: &std::collections::BTreeMap<String, Jwt>,
    ) -> Result<Vec<Route>, ConfigError> {
        let mut routes: Vec<Route> = Vec::with_capacity(raws.len());
        for r in raws {
            let route = self.route(&r)?;
            self.refresh(&r, &route, jwt, providers)?;
            if routes.iter().any(|o| o.name == route.name) {
                return Err(self.err(&r.name, "routes.name", "duplicate route name"));
            }
            if routes.iter().any(|o| o.path == route.path && o.host == route.host) {
                let message = match &route.host {
                    Some(h) => format!("another route has the same host (\"{h}\") and path"),
                    None => "another route has the same path (and no host)".to_string(),
                };
                return Err(self.err(&r.path, "routes.path", message));
            }
            routes.push(route);
        }
        Ok(routes)
    }

    fn route(&self, r: &raw::Route) -> Result<Route, ConfigError> {
        let name = r.name.get_ref().clone();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(self.err(&r.name, "routes.name", "use letters, digits, '_' and '-' (it is a metric label)"));
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
        if r.upstreams.get_ref().is_empty() {
            return Err(self.err(&r.upstreams, "routes.upstreams", "needs at least one upstream"));
        }
        let upstreams = r
            .upstreams
            .get_ref()
            .iter()
            .map(|u| parse_upstream(u).map_err(|m| self.err(&r.upstreams, "routes.upstreams", m)))
            .collect::<Result<Vec<_>, _>>()?;
        let auth = r.auth.unwrap_or(AuthMode::Jwt);
        // A certificate, or a forward auth answer, has no claims: silently ignoring them
        // would leave the route open wider than written.
        if let Some(req) = r.require_claims.as_ref().filter(|m| !m.get_ref().is_empty()) {
            match auth {
                AuthMode::Mtls => {
                    return Err(self.err(req, "routes.require_claims", "needs a token: use auth = \"jwt+mtls\" on this route"));
                }
                AuthMode::Forward => {
                    return Err(self.err(
                        req,
                        "routes.require_claims",
                        "a forward auth answer carries no claims: let the app's endpoint refuse (401/403) \
                         whom the route must not admit",
                    ));
                }
                _ => {}
            }
        }
        // The same for a claim to forward: it would send nothing, and the app would take the
        // missing header for an anonymous user. The endpoint's own headers go by `copy_headers`.
        if auth == AuthMode::Forward
            && let Some(m) = r.forward_claims.as_ref()
            && let Some(claim) = m.get_ref().keys().find(|c| !c.starts_with("cert:"))
        {
            return Err(self.err(
                m,
                "routes.forward_claims",
                format!(
                    "\"{}\": a forward auth answer carries no claims: name the endpoint's headers in the \
                     provider's copy_headers",
                    shown(claim)
                ),
            ));
        }
        let host = r.host.as_ref().map(|h| self.route_host(h)).transpose()?;
        Ok(Route {
            name,
            host,
            provider: r.provider.as_ref().map(|p| p.get_ref().clone()),
            path,
            upstreams,
            auth,
            forward_token: r.forward_token.unwrap_or(false),
            refresh: r.refresh.as_ref().is_some_and(|f| *f.get_ref()),
            upstream_ca: r.upstream_ca.as_ref().map(|c| self.located(c, "routes.upstream_ca")),
            allowed_origins: self.allowed_origins(r.allowed_origins.as_ref())?,
            allow_missing_origin: r.allow_missing_origin.unwrap_or(true),
            require_claims: r
                .require_claims
                .as_ref()
                .map(|m| m.get_ref().clone().into_iter().collect())
                .unwrap_or_default(),
            forward_claims: self.forward_claims(r.forward_claims.as_ref())?,
            validate: r.validate.as_ref().map(|v| self.validate_section(v)).transpose()?,
            limits: r.limits.as_ref().map(|l| self.route_limits(l)).transpose()?.unwrap_or_default(),
            http: self.http_policy(r)?,
            balance: r.balance.unwrap_or_default(),
            sticky_cookie: self.sticky_cookie(r)?,
            health_check: r.health_check.as_ref().map(|h| self.health_check(h)).transpose()?,
            compression: self.compression(r)?,
        })
    }

    /// `refresh = true` needs a route whose tokens come as a message: `auth = "jwt"` (or
    /// `"jwt+mtls"`) with `first_message` among its verifier's `token_sources`. A route
    /// whose `provider` is unknown is left to [`Validator::route_providers`].
    fn refresh(
        &self,
        r: &raw::Route,
        route: &Route,
        jwt: &Jwt,
        providers: &std::collections::BTreeMap<String, Jwt>,
    ) -> Result<(), ConfigError> {
        let Some(flag) = r.refresh.as_ref().filter(|f| *f.get_ref()) else {
            return Ok(());
        };
        let verifier = match &route.provider {
            None => Some(jwt),
            Some(name) => providers.get(name),
        };
        let first_message = verifier.is_none_or(|j| j.token_sources.contains(&TokenSource::FirstMessage));
        if !route.auth.uses_jwt() || !first_message {
            return Err(self.err(
                flag,
                "routes.refresh",
                format!(
                    "route \"{}\": refresh needs auth = \"jwt\" (or \"jwt+mtls\") and \"first_message\" in the token_sources of {}",
                    route.name,
                    route
                        .provider
                        .as_ref()
                        .map_or_else(|| "[jwt]".to_string(), |p| format!("[providers.{}]", shown(p)))
                ),
            ));
        }
        Ok(())
    }

    /// The route's permessage-deflate keys (DESIGN.md section 16).
    fn compression(&self, r: &raw::Route) -> Result<Compression, ConfigError> {
        let level = match &r.compression_level {
            None => DEFAULT_COMPRESSION_LEVEL,
            Some(l) => match u32::try_from(*l.get_ref()) {
                Ok(v @ 1..=9) => v,
                _ => return Err(self.err(l, "routes.compression_level", "must be 1 (fast) … 9 (small)")),
            },
        };
        let min_size = match &r.compression_min_size {
            None => DEFAULT_COMPRESSION_MIN_SIZE,
            Some(m) => usize::try_from(m.get_ref().0).map_err(|_| self.err(m, "routes.compression_min_size", "too large"))?,
        };
        Ok(Compression {
            client: r.compression.unwrap_or(true),
            upstream: r.upstream_compression.unwrap_or(false),
            level,
            min_size,
            context_takeover: r.context_takeover.unwrap_or(false),
        })
    }

    /// `health_check`: a path in origin form (starts with `/`, visible ASCII, at most
    /// [`MAX_HEALTH_PATH`] bytes); `interval` from [`MIN_HEALTH_INTERVAL`] to
    /// [`MAX_HEALTH_INTERVAL`]; `timeout` above zero and below `interval`.
    fn health_check(&self, spanned: &Spanned<raw::HealthCheck>) -> Result<HealthCheck, ConfigError> {
        let h = spanned.get_ref();
        let bad = |key: &str, m: &str| Err(self.err(spanned, &format!("routes.health_check.{key}"), m));
        let p = &h.path;
        if !p.starts_with('/') || p.starts_with("//") || p.len() > MAX_HEALTH_PATH || !p.bytes().all(|b| b.is_ascii_graphic()) {
            return bad(
                "path",
                "must be a path starting with '/' (visible ASCII, no spaces, at most 1024 bytes), e.g. \"/healthz\"",
            );
        }
        if p.parse::<http::uri::PathAndQuery>().is_err() || p.contains('#') {
            return bad("path", "is not a valid request path");
        }
        let interval = h.interval.map_or(DEFAULT_HEALTH_INTERVAL, |d| d.0);
        let timeout = h.timeout.map_or(DEFAULT_HEALTH_TIMEOUT, |d| d.0);
        if !(MIN_HEALTH_INTERVAL..=MAX_HEALTH_INTERVAL).contains(&interval) {
            return bad("interval", "must be from 100ms to 1h");
        }
        if timeout.is_zero() {
            return bad("timeout", "must be longer than zero");
        }
        if timeout >= interval {
            return bad("timeout", "must be shorter than interval");
        }
        Ok(HealthCheck {
            path: p.clone(),
            interval,
            timeout,
        })
    }

    /// `sticky_cookie`: only with `balance = "sticky"`; a cookie name of letters,
    /// digits, `_` and `-`.
    fn sticky_cookie(&self, r: &raw::Route) -> Result<Option<String>, ConfigError> {
        let sticky = r.balance == Some(Balance::Sticky);
        match &r.sticky_cookie {
            None => Ok(sticky.then(|| DEFAULT_STICKY_COOKIE.to_string())),
            Some(c) if !sticky => Err(self.err(c, "routes.sticky_cookie", "needs balance = \"sticky\" on this route")),
            Some(c) => {
                let name = c.get_ref();
                if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                    return Err(self.err(c, "routes.sticky_cookie", "use 1 to 64 letters, digits, '_' and '-'"));
                }
                Ok(Some(name.clone()))
            }
        }
    }

    /// `http`, `http_methods`, `max_body`, `http_timeout` (DESIGN.md section 13). The
    /// other keys without `http = true` would do nothing: refused, so a typo in the
    /// intent shows.
    fn http_policy(&self, r: &raw::Route) -> Result<Option<HttpPolicy>, ConfigError> {
        if r.http != Some(true) {
            if let Some(m) = &r.http_methods {
                return Err(self.err(m, "routes.http_methods", "needs http = true on this route"));
            }
            if let Some(t) = &r.http_timeout {
                return Err(self.err(t, "routes.http_timeout", "needs http = true on this route"));
            }
            if let Some(b) = &r.max_body {
                return Err(self.err(b, "routes.max_body", "needs http = true on this route"));
            }
            if let Some(m) = &r.http_max_connections {
                return Err(self.err(m, "routes.http_max_connections", "needs http = true on this route"));
            }
            return Ok(None);
        }
        let methods = match &r.http_methods {
            None => DEFAULT_HTTP_METHODS
                .iter()
                .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            Some(list) => {
                let mut methods: Vec<http::Method> = Vec::new();
                for m in list.get_ref() {
                    // Methods are case-sensitive (RFC 9110 9.1): `get` is not `GET`.
                    let ok = !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
                    let method = http::Method::from_bytes(m.as_bytes()).ok().filter(|_| ok);
                    match method {
                        Some(method) if method == http::Method::CONNECT || method == http::Method::TRACE => {
                            return Err(self.err(list, "routes.http_methods", format!("\"{}\" is not proxied", shown(m))));
                        }
                        Some(method) if !methods.contains(&method) => methods.push(method),
                        Some(_) => {}
                        None => {
                            return Err(self.err(
                                list,
                                "routes.http_methods",
                                format!("\"{}\" is not a method (upper case, e.g. \"GET\")", shown(m)),
                            ));
                        }
                    }
                }
                if methods.is_empty() {
                    return Err(self.err(list, "routes.http_methods", "needs at least one method"));
                }
                methods
            }
        };
        let timeout = match &r.http_timeout {
            None => DEFAULT_HTTP_TIMEOUT,
            Some(t) if t.get_ref().0.is_zero() => return Err(self.err(t, "routes.http_timeout", "must be longer than zero")),
            Some(t) => t.get_ref().0,
        };
        let max_connections = match &r.http_max_connections {
            None => DEFAULT_HTTP_MAX_CONNECTIONS,
            Some(m) => match usize::try_from(*m.get_ref()) {
                Ok(n @ 1..=MAX_HTTP_MAX_CONNECTIONS) => n,
                _ => {
                    return Err(self.err(m, "routes.http_max_connections", format!("must be 1 … {MAX_HTTP_MAX_CONNECTIONS}")));
                }
            },
        };
        Ok(Some(HttpPolicy {
            methods,
            max_body: r.max_body.as_ref().map_or(DEFAULT_MAX_BODY, |b| b.get_ref().0),
            timeout,
            max_connections,
        }))
    }

    /// `[routes.limits]`: each key as in `[limits]`, `[server]` or `[jwt]`; zero is refused.
    fn route_limits(&self, spanned: &Spanned<raw::RouteLimits>) -> Result<RouteLimits, ConfigError> {
        let l = spanned.get_ref();
        let zero = |key: &str| Err(self.err(spanned, &format!("routes.limits.{key}"), "must be larger than zero"));
        let size = |v: Option<ByteSize>| v.map(|b| b.0 as usize);
        let limits = RouteLimits {
            max_message_size: size(l.max_message_size),
            max_frame_size: size(l.max_frame_size),
            max_fragments: l.max_fragments,
            message_rate: l.message_rate,
            message_burst: l.message_burst,
            max_connections_per_user: l.max_connections_per_user,
            idle_timeout: l.idle_timeout.map(|d| d.0),
            ping_interval: l.ping_interval.map(|d| d.0),
            first_message_timeout: l.first_message_timeout.map(|d| d.0),
        };
        let sizes = [
            ("max_message_size", limits.max_message_size.map(|v| v as u128)),
            ("max_frame_size", limits.max_frame_size.map(|v| v as u128)),
            ("max_fragments", limits.max_fragments.map(u128::from)),
            ("message_burst", limits.message_burst.map(u128::from)),
            ("max_connections_per_user", limits.max_connections_per_user.map(u128::from)),
            ("message_rate", limits.message_rate.map(|r| u128::from(r.count))),
            ("idle_timeout", limits.idle_timeout.map(|d| d.as_millis())),
            ("ping_interval", limits.ping_interval.map(|d| d.as_millis())),
            ("first_message_timeout", limits.first_message_timeout.map(|d| d.as_millis())),
        ];
        if let Some((key, _)) = sizes.iter().find(|(_, v)| *v == Some(0)) {
            return zero(key);
        }
        if let (Some(m), Some(f)) = (limits.max_message_size, limits.max_frame_size)
            && f > m
        {
            return Err(self.err(spanned, "routes.limits.max_frame_size", "must not exceed max_message_size"));
        }
        Ok(limits)
    }

    /// `host`: a DNS name (A-labels, `xn--` for Unicode) or `*.` and one, without port
    /// or final dot; compared in lower case.
    fn route_host(&self, h: &Spanned<String>) -> Result<HostMatch, ConfigError> {
        let text = h.get_ref();
        let bad = |m: &str| Err(self.err(h, "routes.host", format!("\"{}\": {m}", shown(text))));
        if !text.is_ascii() {
            return bad("write a Unicode name in its A-label (xn--) form");
        }
        let (wildcard, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        // An IPv6 address, bare or in brackets (clients send `Host: [::1]:8443`).
        let v6 = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
        if let (false, Ok(ip)) = (wildcard, v6.parse::<std::net::Ipv6Addr>()) {
            return Ok(HostMatch::Exact(ip.to_string()));
        }
        if name.contains(':') {
            return bad("a host takes no port (hosts are compared without it)");
        }
        if name.ends_with('.') {
            return bad("write the name without a final dot");
        }
        if name.contains('*') {
            return bad("a wildcard is only allowed as the whole first label (\"*.example.com\")");
        }
        match normalize_host(name) {
            Some(n) if n.contains('.') || !wildcard => Ok(if wildcard {
                HostMatch::Wildcard(format!(".{n}"))
            } else {
                HostMatch::Exact(n)
            }),
            Some(_) => bad("a wildcard needs at least two labels after \"*.\""),
            None => bad("not a host name"),
        }
    }

    /// `[routes.validate]`: defaults (JSON on, binary refused, depth 32, close) and
    /// the combinations that would check nothing or contradict themselves.
    fn validate_section(&self, v: &Spanned<raw::Validate>) -> Result<Validate, ConfigError> {
        let raw = v.get_ref();
        let json = raw.json.unwrap_or(true);
        let binary = raw.binary.unwrap_or(false);
        if !json {
            if let Some(f) = &raw.schema_file {
                return Err(self.err(f, "routes.validate.schema_file", "a schema needs json = true"));
            }
            if let Some(d) = &raw.max_depth {
                return Err(self.err(d, "routes.validate.max_depth", "a depth limit needs json = true"));
            }
            if binary {
                return Err(self.err(v, "routes.validate", "json = false and binary = true check nothing"));
            }
        }
        let max_depth = match &raw.max_depth {
            None => DEFAULT_MAX_DEPTH,
            Some(d) if (1..=MAX_MAX_DEPTH).contains(d.get_ref()) => *d.get_ref(),
            Some(d) => {
                return Err(self.err(d, "routes.validate.max_depth", format!("must be 1 to {MAX_MAX_DEPTH}")));
            }
        };
        Ok(Validate {
            json,
            binary,
            schema_file: raw.schema_file.as_ref().map(|f| self.located(f, "routes.validate.schema_file")),
            max_depth,
            on_invalid: raw.on_invalid.unwrap_or_default(),
        })
    }

    fn allowed_origins(&self, list: Option<&Spanned<Vec<String>>>) -> Result<Vec<String>, ConfigError> {
        let Some(list) = list else { return Ok(Vec::new()) };
        list.get_ref()
            .iter()
            .map(|o| {
                if o == "*" {
                    return Ok("*".to_string());
                }
                normalize_origin(o).ok_or_else(|| {
                    self.err(
                        list,
                        "routes.allowed_origins",
                        format!("not an origin (scheme://host[:port]): \"{}\"", shown(o)),
                    )
                })
            })
            .collect()
    }

    fn forward_claims(
        &self,
        map: Option<&Spanned<std::collections::BTreeMap<String, String>>>,
    ) -> Result<Vec<(String, http::HeaderName)>, ConfigError> {
        let Some(m) = map else { return Ok(Vec::new()) };
        m.get_ref()
            .iter()
            .map(|(claim, header)| {
                if claim.starts_with("cert:") && claim != CERT_FINGERPRINT && claim != CERT_SUBJECT {
                    return Err(self.err(
                        m,
                        "routes.forward_claims",
                        format!(
                            "\"{}\": the certificate forwards \"cert:fingerprint\" or \"cert:subject\"",
                            shown(claim)
                        ),
                    ));
                }
                let name = http::HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes())
                    .map_err(|_| self.err(m, "routes.forward_claims", format!("\"{}\": not a valid header name", shown(claim))))?;
                Ok((claim.clone(), name))
            })
            .collect()
    }
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
    let host = crate::util::unbracket(auth.host()).to_string();
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
