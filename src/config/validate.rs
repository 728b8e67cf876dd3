//! Raw TOML → validated [`Config`]: defaults, ranges and cross-key checks. Every error
//! names the key and the line, and never echoes a value that may be a secret.

use super::located::{find_key_line, line_of};
use super::units::HumanDuration;
use super::*;
use toml::Spanned;

/// Longest part of a bad value echoed in an error message (escaped).
const SHOWN_VALUE: usize = 64;
/// Longest environment variable name echoed.
const MAX_ENV_NAME: usize = 128;
/// Smallest `server.max_request_head`.
const MIN_REQUEST_HEAD: usize = 1024;
/// `server.workers`: more threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;
/// Smallest `log.progress_interval`.
const MIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

pub(super) struct Validator<'a> {
    pub(super) src: &'a str,
    pub(super) origin: &'a str,
}

impl Validator<'_> {
    pub(super) fn err<T>(&self, spanned: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.origin.to_string(),
            line: Some(line_of(self.src, spanned.span().start)),
            key: key.to_string(),
            message: message.into(),
        }
    }

    pub(super) fn located<T: Clone>(&self, spanned: &Spanned<T>, key: &str) -> Located<T> {
        Located {
            value: spanned.get_ref().clone(),
            key: key.to_string(),
            line: Some(line_of(self.src, spanned.span().start)),
        }
    }

    /// Each entry of a list of paths, located at the list's line; empty when absent.
    fn located_list(&self, list: Option<&Spanned<Vec<PathBuf>>>, key: &str) -> Vec<Located<PathBuf>> {
        let Some(list) = list else { return Vec::new() };
        let line = Some(line_of(self.src, list.span().start));
        list.get_ref()
            .iter()
            .map(|p| Located {
                value: p.clone(),
                key: key.into(),
                line,
            })
            .collect()
    }

    pub(super) fn err_key(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let (table, leaf) = key.rsplit_once('.').unwrap_or(("", key));
        ConfigError {
            file: self.origin.to_string(),
            line: find_key_line(self.src, table, leaf),
            key: key.into(),
            message: message.into(),
        }
    }

    fn nonzero(&self, v: Option<HumanDuration>, default: Duration, key: &str) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(d) if d.0.is_zero() => Err(self.err_key(key, "must be longer than zero")),
            Some(d) => Ok(d.0),
        }
    }

    pub(super) fn validate(&self, raw: raw::File) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let tls = self.tls(&raw.tls)?;
        let admin = Admin {
            listen: raw.admin.listen.unwrap_or(DEFAULT_ADMIN_LISTEN),
            token_file: raw.admin.token_file.as_ref().map(|f| self.located(f, "admin.token_file")),
        };
        let log = self.log(raw.log)?;
        let limits = self.limits(raw.limits)?;
        let firewall = self.firewall(raw.firewall)?;
        let jwt = self.jwt(raw.jwt, "jwt")?;
        let Providers {
            jwt: providers,
            forward: forward_providers,
            introspection: introspection_providers,
        } = self.providers(raw.providers, &jwt.token_sources)?;
        let routes = self.routes(raw.routes, &jwt, &providers)?;
        let cluster = raw.cluster.as_ref().map(|c| self.cluster(c)).transpose()?;
        self.jwt_routes(&jwt, None, &routes)?;
        for (name, provider) in &providers {
            self.jwt_routes(provider, Some(name), &routes)?;
        }
        self.route_providers(&providers, &forward_providers, &introspection_providers, &routes)?;
        self.cert_routes(&tls, &routes)?;
        Ok(Config {
            origin: self.origin.to_string(),
            server,
            tls,
            admin,
            log,
            limits,
            firewall,
            jwt,
            providers,
            forward_providers,
            introspection_providers,
            routes,
            cluster,
        })
    }

    fn server(&self, s: raw::Server) -> Result<Server, ConfigError> {
        let listen = match &s.listen {
            Some(l) if l.get_ref().is_empty() => return Err(self.err(l, "server.listen", "needs at least one address")),
            Some(l) => l.get_ref().clone(),
            None => vec![DEFAULT_LISTEN],
        };
        let max_request_head = s.max_request_head.map_or(DEFAULT_MAX_REQUEST_HEAD, |v| v.0 as usize);
        if max_request_head < MIN_REQUEST_HEAD {
            return Err(self.err_key("server.max_request_head", "must be at least 1KiB"));
        }
        let max_connections = s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(self.err_key("server.max_connections", "must be at least 1"));
        }
        let workers = s.workers.unwrap_or(0);
        if workers > MAX_WORKERS {
            return Err(self.err_key("server.workers", format!("must be at most {MAX_WORKERS} (0: one per core)")));
        }
        let server = Server {
            workers,
            listen,
            handshake_timeout: self.nonzero(s.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT, "server.handshake_timeout")?,
            max_request_head,
            idle_timeout: self.nonzero(s.idle_timeout, DEFAULT_IDLE_TIMEOUT, "server.idle_timeout")?,
            ping_interval: self.nonzero(s.ping_interval, DEFAULT_PING_INTERVAL, "server.ping_interval")?,
            max_connections,
            shutdown_grace: s.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            upstream_timeout: self.nonzero(s.upstream_timeout, DEFAULT_UPSTREAM_TIMEOUT, "server.upstream_timeout")?,
            close_timeout: self.nonzero(s.close_timeout, DEFAULT_CLOSE_TIMEOUT, "server.close_timeout")?,
            trusted_proxies: s.trusted_proxies.into_iter().map(|n| n.trunc()).collect(),
            client_ip_source: s.client_ip_source.unwrap_or(ClientIpSource::Peer),
            watch_config: s.watch_config.unwrap_or(false),
            listen_plain: s.listen_plain.clone(),
            control_socket: s.control_socket.clone(),
            sticky_key_file: s.sticky_key_file.as_ref().map(|f| self.located(f, "server.sticky_key_file")),
        };
        if server.client_ip_source != ClientIpSource::Peer && server.trusted_proxies.is_empty() {
            return Err(self.err_key("server.client_ip_source", "needs server.trusted_proxies"));
        }
        Ok(server)
    }

    fn tls(&self, t: &raw::Tls) -> Result<Tls, ConfigError> {
        Ok(Tls {
            cert: t
                .cert
                .as_ref()
                .map_or_else(|| unlocated("tls.cert", DEFAULT_TLS_CERT), |c| self.located(c, "tls.cert")),
            key: t
                .key
                .as_ref()
                .map_or_else(|| unlocated("tls.key", DEFAULT_TLS_KEY), |c| self.located(c, "tls.key")),
            self_signed_if_missing: t.self_signed_if_missing.unwrap_or(false),
            min_version: t.min_version.unwrap_or(TlsVersion::V1_2),
            client: self.client_tls(t)?,
            acme: self.acme(t)?,
            certificates: self.certificates(t)?,
        })
    }

    /// `[[tls.certificates]]`: not beside `tls.cert`/`tls.key` (the one-certificate form).
    fn certificates(&self, t: &raw::Tls) -> Result<Vec<CertificateFiles>, ConfigError> {
        let Some(list) = &t.certificates else { return Ok(Vec::new()) };
        let one = [("tls.cert", t.cert.as_ref()), ("tls.key", t.key.as_ref())];
        if let Some((key, Some(v))) = one.into_iter().find(|(_, v)| v.is_some()) {
            return Err(self.err(v, key, "has no place beside [[tls.certificates]]: list every certificate there"));
        }
        if t.self_signed_if_missing == Some(true) {
            return Err(self.err_key(
                "tls.self_signed_if_missing",
                "applies to tls.cert/tls.key, not to [[tls.certificates]]",
            ));
        }
        if list.get_ref().is_empty() || list.get_ref().len() > MAX_CERTIFICATES {
            return Err(self.err(list, "tls.certificates", format!("needs 1 to {MAX_CERTIFICATES} certificates")));
        }
        Ok(list
            .get_ref()
            .iter()
            .map(|c| CertificateFiles {
                cert: self.located(&c.cert, "tls.certificates.cert"),
                key: self.located(&c.key, "tls.certificates.key"),
            })
            .collect())
    }

    /// `client_ca`, `client_auth` and `client_crl_files`: the last two need the first.
    fn client_tls(&self, t: &raw::Tls) -> Result<Option<ClientTls>, ConfigError> {
        let Some(ca) = &t.client_ca else {
            if let Some(a) = &t.client_auth {
                return Err(self.err(a, "tls.client_auth", "needs tls.client_ca"));
            }
            if let Some(c) = &t.client_crl_files {
                return Err(self.err(c, "tls.client_crl_files", "needs tls.client_ca"));
            }
            return Ok(None);
        };
        let crl_files = self.located_list(t.client_crl_files.as_ref(), "tls.client_crl_files");
        Ok(Some(ClientTls {
            ca: self.located(ca, "tls.client_ca"),
            auth: t.client_auth.as_ref().map_or(ClientAuth::Optional, |a| *a.get_ref()),
            crl_files,
        }))
    }

    fn log(&self, l: raw::Log) -> Result<Log, ConfigError> {
        let log = Log {
            format: l.format.unwrap_or(LogFormat::Text),
            level: l.level.unwrap_or_else(|| "info".into()),
            file: l.file,
            progress_interval: match l.progress_interval.as_deref() {
                None => Some(DEFAULT_PROGRESS_INTERVAL),
                Some("off") => None,
                Some(v) => {
                    let d = v.parse::<HumanDuration>().map_err(|m| self.err_key("log.progress_interval", m))?.0;
                    if d < MIN_PROGRESS_INTERVAL {
                        return Err(self.err_key("log.progress_interval", "must be at least 1s, or \"off\""));
                    }
                    Some(d)
                }
            },
        };
        if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
            return Err(self.err_key("log.level", "not a valid level or filter (try \"info\" or \"debug\")"));
        }
        Ok(log)
    }

    fn limits(&self, l: raw::Limits) -> Result<Limits, ConfigError> {
        let ipv6_prefix = l.ipv6_prefix.unwrap_or(DEFAULT_IPV6_PREFIX);
        if ipv6_prefix > 128 {
            return Err(self.err_key("limits.ipv6_prefix", "must be between 0 and 128"));
        }
        let max_message_size = l.max_message_size.map_or(DEFAULT_MAX_MESSAGE_SIZE, |v| v.0 as usize);
        let max_assembly_memory = l.max_assembly_memory.map_or(DEFAULT_MAX_ASSEMBLY_MEMORY, |v| v.0 as usize);
        let limits = Limits {
            max_message_size,
            // A browser sends each message as one frame: by default a client frame may be
            // as large as a message.
            max_frame_size: l.max_frame_size.map_or(max_message_size, |v| v.0 as usize),
            max_assembly_memory,
            max_assembly_memory_per_client: l.max_assembly_memory_per_client.map_or_else(
                || (max_assembly_memory / DEFAULT_ASSEMBLY_SHARE_DIVISOR).max(max_message_size),
                |v| v.0 as usize,
            ),
            assembly_timeout: self.nonzero(l.assembly_timeout, DEFAULT_ASSEMBLY_TIMEOUT, "limits.assembly_timeout")?,
            max_compression_memory: l.max_compression_memory.map_or(DEFAULT_MAX_COMPRESSION_MEMORY, |v| v.0 as usize),
            max_fragments: match l.max_fragments {
                None => DEFAULT_MAX_FRAGMENTS,
                Some(0) => return Err(self.err_key("limits.max_fragments", "must be at least 1")),
                Some(n) => n,
            },
            admission: AdmissionLimits {
                connection_rate: l.connection_rate_per_ip.unwrap_or(DEFAULT_CONNECTION_RATE),
                connection_burst: l.connection_burst_per_ip.unwrap_or(DEFAULT_CONNECTION_BURST).max(1),
                http_rate: match l.http_rate_per_ip {
                    Some(r) if r.count == 0 => return Err(self.err_key("limits.http_rate_per_ip", "must be larger than zero")),
                    r => r.unwrap_or(DEFAULT_HTTP_RATE),
                },
                http_burst: match l.http_burst_per_ip {
                    Some(0) => return Err(self.err_key("limits.http_burst_per_ip", "must be at least 1")),
                    b => b.unwrap_or(DEFAULT_HTTP_BURST),
                },
                max_connections_per_ip: l.max_connections_per_ip.unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP).max(1),
                ipv6_prefix,
                auth_failures_per_ip: l.auth_failures_per_ip.unwrap_or(DEFAULT_AUTH_FAILURES_PER_IP),
                auth_failure_window: l.auth_failure_window.map_or(DEFAULT_AUTH_FAILURE_WINDOW, |d| d.0),
                auth_ban: l.auth_ban.map_or(DEFAULT_AUTH_BAN, |d| d.0),
            },
            message_rate: l.message_rate.unwrap_or(DEFAULT_MESSAGE_RATE),
            message_burst: l.message_burst.unwrap_or(DEFAULT_MESSAGE_BURST).max(1),
            rate_abuse_timeout: self.nonzero(l.rate_abuse_timeout, DEFAULT_RATE_ABUSE_TIMEOUT, "limits.rate_abuse_timeout")?,
            max_connections_per_user: l.max_connections_per_user.unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_USER).max(1),
        };
        if limits.max_message_size == 0 || limits.max_frame_size == 0 {
            return Err(self.err_key("limits.max_message_size", "sizes must be larger than zero"));
        }
        if limits.max_frame_size > limits.max_message_size {
            return Err(self.err_key("limits.max_frame_size", "must not exceed limits.max_message_size"));
        }
        if limits.max_assembly_memory < limits.max_message_size {
            return Err(self.err_key(
                "limits.max_assembly_memory",
                "must be at least limits.max_message_size (one whole message)",
            ));
        }
        if limits.max_assembly_memory_per_client < limits.max_message_size
            || limits.max_assembly_memory_per_client > limits.max_assembly_memory
        {
            return Err(self.err_key(
                "limits.max_assembly_memory_per_client",
                "must be at least limits.max_message_size (one whole message) and at most limits.max_assembly_memory",
            ));
        }
        Ok(limits)
    }

    /// Inline rules are parsed here; rule files are only recorded, and read when the
    /// runtime is built.
    fn firewall(&self, f: raw::Firewall) -> Result<FirewallRules, ConfigError> {
        let inline = |key: &str, list: &Option<Spanned<Vec<String>>>| -> Result<Vec<IpNet>, ConfigError> {
            let Some(list) = list else { return Ok(Vec::new()) };
            list.get_ref()
                .iter()
                .map(|rule| parse_ip_rule(rule).ok_or_else(|| self.err(list, key, format!("not an address or CIDR: \"{}\"", shown(rule)))))
                .collect()
        };
        let files = |key: &str, files: &Option<Spanned<Vec<PathBuf>>>| -> Vec<Located<PathBuf>> {
            let Some(files) = files else { return Vec::new() };
            let line = Some(line_of(self.src, files.span().start));
            files
                .get_ref()
                .iter()
                .map(|p| Located {
                    value: p.clone(),
                    key: key.to_string(),
                    line,
                })
                .collect()
        };
        Ok(FirewallRules {
            default: f.default.unwrap_or_default(),
            allow: inline("firewall.allow", &f.allow)?,
            deny: inline("firewall.deny", &f.deny)?,
            allow_files: files("firewall.allow_files", &f.allow_files),
            deny_files: files("firewall.deny_files", &f.deny_files),
        })
    }

    fn jwt(&self, j: raw::Jwt, p: &str) -> Result<Jwt, ConfigError> {
        if j.generate_secret_if_missing == Some(true) && j.secret_file.is_none() {
            return Err(self.err_key(&format!("{p}.generate_secret_if_missing"), format!("needs {p}.secret_file")));
        }
        let secret = self.secret(&j, p)?;
        let jwks_url = self.jwks_url(&j, p)?;
        Ok(Jwt {
            algorithms: self.algorithms(j.algorithms.as_ref(), p)?,
            secret,
            issuer: j.issuer,
            audience: j.audience.unwrap_or_default(),
            leeway: j.leeway.map_or(DEFAULT_LEEWAY, |d| d.0),
            required_claims: j
                .required_claims
                .unwrap_or_else(|| DEFAULT_REQUIRED_CLAIMS.map(String::from).to_vec()),
            token_sources: self.token_sources(j.token_sources.as_ref(), p)?,
            close_on_expiry: j.close_on_expiry.unwrap_or(true),
            public_key_files: self.located_list(j.public_key_files.as_ref(), &format!("{p}.public_key_files")),
            jwks_file: j.jwks_file.as_ref().map(|f| self.located(f, &format!("{p}.jwks_file"))),
            jwks_url,
            revoked_jti_file: j
                .revoked_jti_file
                .as_ref()
                .map(|f| self.located(f, &format!("{p}.revoked_jti_file"))),
            first_message_timeout: self.nonzero(
                j.first_message_timeout,
                DEFAULT_FIRST_MESSAGE_TIMEOUT,
                &format!("{p}.first_message_timeout"),
            )?,
            identity_claim: match &j.identity_claim {
                None => None,
                Some(c) if c.get_ref().is_empty() || c.get_ref().chars().any(char::is_control) => {
                    return Err(self.err(c, &format!("{p}.identity_claim"), "must name a claim"));
                }
                Some(c) => Some(c.get_ref().clone()),
            },
        })
    }

    /// `[providers.NAME]`: each a self-contained `[jwt]` (keys it does not set take
    /// `[jwt]`'s defaults, not its values) of kind `"jwt"`, with key material of its own.
    fn providers(
        &self,
        raws: std::collections::BTreeMap<String, Spanned<raw::Provider>>,
        default_sources: &[TokenSource],
    ) -> Result<Providers, ConfigError> {
        let mut providers = std::collections::BTreeMap::new();
        let mut forwards = std::collections::BTreeMap::new();
        let mut introspections = std::collections::BTreeMap::new();
        for (name, spanned) in raws {
            let p = format!("providers.{name}");
            if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(self.err(
                    &spanned,
                    "providers",
                    "a provider name uses letters, digits, '_' and '-' (it is a label)",
                ));
            }
            let span = spanned.span();
            let (kind, j, mut f, i) = spanned.into_inner().split();
            let introspection_key = i.first_set();
            match kind.get_ref().as_str() {
                "jwt" | "forward" if introspection_key.is_some() => {
                    let (key, at) = introspection_key.unwrap_or(("client_id", span));
                    return Err(self.err(&Spanned::new(at, ()), &format!("{p}.{key}"), "a key of kind \"introspection\" only"));
                }
                "jwt" => {}
                "forward" => {
                    forwards.insert(name.clone(), self.forward(j, f, &p, span)?);
                    continue;
                }
                "introspection" => {
                    introspections.insert(name.clone(), self.introspection(j, f, i, &p, span, default_sources)?);
                    continue;
                }
                other => {
                    return Err(self.err(
                        &kind,
                        &format!("{p}.kind"),
                        format!(
                            "unknown kind \"{}\" (this version has \"jwt\", \"introspection\" and \"forward\")",
                            shown(other)
                        ),
                    ));
                }
            }
            // A jwt provider's `ca_file` is the trust anchor of its discovery.
            let ca_file = f.ca_file.take();
            if let Some((key, at)) = f.first_set() {
                return Err(self.err(
                    &Spanned::new(at, ()),
                    &format!("{p}.{key}"),
                    "a key of kind \"forward\", not \"jwt\"",
                ));
            }
            let own_keys = j.secret_env.is_some()
                || j.secret_file.is_some()
                || j.public_key_files.is_some()
                || j.jwks_file.is_some()
                || j.jwks_url.is_some()
                || j.discovery.as_ref().is_some_and(|d| *d.get_ref());
            if !own_keys {
                // The default secret variable is `[jwt]`'s: sharing it would let one
                // provider's tokens pass on another's routes.
                return Err(self.err(
                    &Spanned::new(span, ()),
                    &p,
                    "needs keys of its own: secret_env, secret_file, public_key_files, jwks_file, jwks_url or discovery",
                ));
            }
            let own_secret = j.secret_env.is_some() || j.secret_file.is_some();
            let has_jwks_ca = j.jwks_ca.is_some();
            let mut jwt = self.jwt(j, &p)?;
            if let Some(c) = &ca_file {
                let key = format!("{p}.ca_file");
                match jwt.jwks_url.as_mut() {
                    Some(u) if u.discovery.is_some() && !has_jwks_ca => u.ca = Some(self.located(c, &key)),
                    Some(u) if u.discovery.is_some() => return Err(self.err(c, &key, "not with jwks_ca (one trust anchor file)")),
                    _ => return Err(self.err(c, &key, "on a jwt provider only with discovery = true (else jwks_ca)")),
                }
            }
            // An HS* algorithm verifies with a secret: the provider's own, never `[jwt]`'s
            // default variable (other keys of its own do not stand in for it).
            if jwt.uses_secret() && !own_secret {
                return Err(self.err(
                    &Spanned::new(span, ()),
                    &format!("{p}.algorithms"),
                    "an HS* algorithm needs the provider's own secret_env or secret_file",
                ));
            }
            providers.insert(name, jwt);
        }
        Ok(Providers {
            jwt: providers,
            forward: forwards,
            introspection: introspections,
        })
    }

    fn algorithms(&self, names: Option<&Spanned<Vec<String>>>, p: &str) -> Result<Vec<Algorithm>, ConfigError> {
        let Some(names) = names else {
            return Ok(vec![Algorithm::HS256]);
        };
        let mut algorithms = Vec::new();
        for name in names.get_ref() {
            if name.eq_ignore_ascii_case("none") {
                return Err(self.err(names, &format!("{p}.algorithms"), "\"none\" can never be enabled"));
            }
            let alg = ALGORITHMS.iter().find(|(n, _)| n == name).map(|(_, a)| *a).ok_or_else(|| {
                self.err(
                    names,
                    &format!("{p}.algorithms"),
                    format!(
                        "unsupported algorithm \"{}\" (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA)",
                        shown(name)
                    ),
                )
            })?;
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }
        Ok(algorithms)
    }

    fn secret(&self, j: &raw::Jwt, p: &str) -> Result<SecretSource, ConfigError> {
        Ok(match (&j.secret_env, &j.secret_file) {
            (Some(env), Some(_)) => {
                return Err(self.err(env, &format!("{p}.secret_env"), "set either secret_env or secret_file, not both"));
            }
            (_, Some(file)) => SecretSource::File {
                path: self.located(file, &format!("{p}.secret_file")),
                generate_if_missing: j.generate_secret_if_missing.unwrap_or(false),
            },
            (Some(env), None) => {
                if !is_env_var_name(env.get_ref()) {
                    // Often the secret itself pasted here: never print the value.
                    return Err(self.err(
                        env,
                        &format!("{p}.secret_env"),
                        "must name an environment variable (letters, digits and '_'; the value is not shown)",
                    ));
                }
                SecretSource::Env(self.located(env, &format!("{p}.secret_env")))
            }
            (None, None) => SecretSource::Env(unlocated(&format!("{p}.secret_env"), DEFAULT_SECRET_ENV)),
        })
    }

    /// A `redis://`/`rediss://` URL that holds no credentials (they come from
    /// `redis_password_env` or `_file`; the URL is never printed when it has them).
    fn redis_url(&self, url: &Spanned<String>, key: &str) -> Result<Located<String>, ConfigError> {
        let rest = url
            .get_ref()
            .strip_prefix("redis://")
            .or_else(|| url.get_ref().strip_prefix("rediss://"));
        let Some(rest) = rest else {
            return Err(self.err(url, key, "must start with redis:// or rediss://"));
        };
        let authority = rest.split('/').next().unwrap_or("");
        if authority.contains('@') {
            return Err(self.err(
                url,
                key,
                "credentials in the URL are refused (not shown): use redis_password_env or redis_password_file",
            ));
        }
        if authority.is_empty() {
            return Err(self.err(url, key, "the URL needs a host"));
        }
        Ok(self.located(url, key))
    }

    /// A list of Redis URLs (`sentinels`, `redis_cluster`): 1 to 16, all `redis://` or all
    /// `rediss://`.
    fn redis_urls(&self, list: &Spanned<Vec<Spanned<String>>>, key: &str) -> Result<Vec<Located<String>>, ConfigError> {
        if list.get_ref().is_empty() || list.get_ref().len() > 16 {
            return Err(self.err(list, key, "list 1 to 16 URLs"));
        }
        let urls = list
            .get_ref()
            .iter()
            .map(|u| self.redis_url(u, key))
            .collect::<Result<Vec<_>, _>>()?;
        if urls
            .iter()
            .any(|u| u.value.starts_with("rediss://") != urls[0].value.starts_with("rediss://"))
        {
            return Err(self.err(list, key, "use redis:// for all of them or rediss:// for all of them"));
        }
        Ok(urls)
    }

    /// `[cluster]`'s Redis: exactly one of `redis`, `sentinels` (with `sentinel_master`)
    /// and `redis_cluster`.
    fn redis_servers(&self, spanned: &Spanned<raw::Cluster>) -> Result<RedisServers, ConfigError> {
        let c = spanned.get_ref();
        let redis = match (&c.redis, &c.sentinels, &c.redis_cluster) {
            (Some(url), None, None) => RedisServers::One(self.redis_url(url, "cluster.redis")?),
            (None, Some(list), None) => {
                let Some(master) = &c.sentinel_master else {
                    return Err(self.err(
                        list,
                        "cluster.sentinel_master",
                        "sentinels need sentinel_master (the name of the master)",
                    ));
                };
                let name = master.get_ref();
                if name.is_empty() || name.len() > 128 || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(self.err(master, "cluster.sentinel_master", "use 1 to 128 visible ASCII characters"));
                }
                RedisServers::Sentinel {
                    sentinels: self.redis_urls(list, "cluster.sentinels")?,
                    master: name.clone(),
                }
            }
            (None, None, Some(list)) => RedisServers::Cluster(self.redis_urls(list, "cluster.redis_cluster")?),
            (None, None, None) => {
                return Err(self.err(
                    spanned,
                    "cluster.redis",
                    "set redis, sentinels (with sentinel_master) or redis_cluster",
                ));
            }
            _ => {
                return Err(self.err(spanned, "cluster.redis", "set only one of redis, sentinels and redis_cluster"));
            }
        };
        if let (Some(m), false) = (&c.sentinel_master, matches!(redis, RedisServers::Sentinel { .. })) {
            return Err(self.err(m, "cluster.sentinel_master", "goes with sentinels"));
        }
        Ok(redis)
    }

    /// `[cluster]`: where Redis is, credentials from `redis_password_env` or `_file`.
    fn cluster(&self, spanned: &Spanned<raw::Cluster>) -> Result<Cluster, ConfigError> {
        let c = spanned.get_ref();
        let redis = self.redis_servers(spanned)?;
        let password = match (&c.redis_password_env, &c.redis_password_file) {
            (Some(e), Some(_)) => {
                return Err(self.err(
                    e,
                    "cluster.redis_password_env",
                    "set either redis_password_env or redis_password_file",
                ));
            }
            (Some(e), None) if !is_env_var_name(e.get_ref()) => {
                return Err(self.err(
                    e,
                    "cluster.redis_password_env",
                    "must name an environment variable (the value is not shown)",
                ));
            }
            (Some(e), None) => Some(SecretSource::Env(self.located(e, "cluster.redis_password_env"))),
            (None, Some(f)) => Some(SecretSource::File {
                path: self.located(f, "cluster.redis_password_file"),
                generate_if_missing: false,
            }),
            (None, None) => None,
        };
        let key_prefix = match &c.key_prefix {
            None => DEFAULT_KEY_PREFIX.to_string(),
            Some(p)
                if !p.get_ref().is_empty()
                    && p.get_ref().len() <= 64
                    && p.get_ref().bytes().all(|b| b.is_ascii_alphanumeric() || b"_-:.".contains(&b)) =>
            {
                p.get_ref().clone()
            }
            Some(p) => return Err(self.err(p, "cluster.key_prefix", "use 1 to 64 letters, digits and '_', '-', ':', '.'")),
        };
        if let (Some(ca), false) = (&c.redis_ca, redis.tls()) {
            return Err(self.err(ca, "cluster.redis_ca", "needs a rediss:// URL"));
        }
        Ok(Cluster {
            redis,
            state_file: c.state_file.as_ref().map(|f| self.located(f, "cluster.state_file")),
            password,
            ca: c.redis_ca.as_ref().map(|f| self.located(f, "cluster.redis_ca")),
            key_prefix,
            timeout: c.timeout.map_or(DEFAULT_CLUSTER_TIMEOUT, |d| d.0),
            on_failure: c.on_failure.unwrap_or_default(),
        })
    }

    pub(super) fn token_sources(&self, sources: Option<&Spanned<Vec<String>>>, p: &str) -> Result<Vec<TokenSource>, ConfigError> {
        let Some(sources) = sources else {
            return Ok(DEFAULT_TOKEN_SOURCES.iter().filter_map(|s| parse_token_source(s)).collect());
        };
        sources
            .get_ref()
            .iter()
            .map(|s| {
                parse_token_source(s).ok_or_else(|| {
                    self.err(
                        sources,
                        &format!("{p}.token_sources"),
                        format!(
                            "unknown token source \"{}\" (use \"authorization\", \"protocol\", \"query:NAME\", \"cookie:NAME\" or \"first_message\")",
                            shown(s)
                        ),
                    )
                })
            })
            .collect()
    }

    fn jwks_url(&self, j: &raw::Jwt, p: &str) -> Result<Option<JwksUrl>, ConfigError> {
        if let Some(d) = j.discovery.as_ref().filter(|d| *d.get_ref()) {
            return self.discovery(j, d, p).map(Some);
        }
        let Some(u) = &j.jwks_url else { return Ok(None) };
        let url: http::Uri = u
            .get_ref()
            .parse()
            .map_err(|_| self.err(u, &format!("{p}.jwks_url"), "not a valid URL"))?;
        if url.scheme_str() != Some("https") || url.host().is_none() {
            return Err(self.err(u, &format!("{p}.jwks_url"), "must be an https:// URL"));
        }
        Ok(Some(JwksUrl {
            url,
            refresh: self.nonzero(j.jwks_refresh, DEFAULT_JWKS_REFRESH, &format!("{p}.jwks_refresh"))?,
            ca: j.jwks_ca.as_ref().map(|c| self.located(c, &format!("{p}.jwks_ca"))),
            discovery: None,
        }))
    }

    /// `discovery = true`: the keys come from the `jwks_uri` of the `issuer`'s discovery
    /// document, fetched like a `jwks_url` (https, refreshed, the last good set kept).
    fn discovery(&self, j: &raw::Jwt, d: &Spanned<bool>, p: &str) -> Result<JwksUrl, ConfigError> {
        if let Some(u) = &j.jwks_url {
            return Err(self.err(
                u,
                &format!("{p}.jwks_url"),
                "not with discovery = true (the discovery document names the JWKS)",
            ));
        }
        let key = format!("{p}.issuer");
        let Some(issuer) = &j.issuer else {
            return Err(self.err(d, &format!("{p}.discovery"), format!("needs {key} (the OIDC issuer URL)")));
        };
        let url = discovery_url(issuer)
            .ok_or_else(|| self.err_key(&key, "discovery needs an https:// issuer URL with a host and no query or fragment"))?;
        let (table, leaf) = key.rsplit_once('.').unwrap_or(("", key.as_str()));
        let line = find_key_line(self.src, table, leaf);
        Ok(JwksUrl {
            url,
            refresh: self.nonzero(j.jwks_refresh, DEFAULT_JWKS_REFRESH, &format!("{p}.jwks_refresh"))?,
            ca: j.jwks_ca.as_ref().map(|c| self.located(c, &format!("{p}.jwks_ca"))),
            discovery: Some(Located {
                value: issuer.clone(),
                key,
                line,
            }),
        })
    }
}

/// The `[providers.NAME]` tables by kind.
struct Providers {
    jwt: std::collections::BTreeMap<String, Jwt>,
    forward: std::collections::BTreeMap<String, Forward>,
    introspection: std::collections::BTreeMap<String, Introspection>,
}

/// `{issuer}/.well-known/openid-configuration` (OpenID Connect Discovery 1.0, section
/// 4: a trailing `/` of the issuer is dropped first); `None` unless the issuer is an
/// https URL with a host, no credentials, no query and no fragment.
fn discovery_url(issuer: &str) -> Option<http::Uri> {
    let u: http::Uri = issuer.parse().ok()?;
    let authority = u.authority()?;
    if u.scheme_str() != Some("https") || authority.as_str().contains('@') || u.host().is_none_or(str::is_empty) {
        return None;
    }
    if u.query().is_some() || issuer.contains('#') {
        return None;
    }
    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'))
        .parse()
        .ok()
}

/// The algorithms `jwt.algorithms` may name (`none` never).
const ALGORITHMS: [(&str, Algorithm); 12] = [
    ("HS256", Algorithm::HS256),
    ("HS384", Algorithm::HS384),
    ("HS512", Algorithm::HS512),
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

fn parse_token_source(s: &str) -> Option<TokenSource> {
    Some(match s.split_once(':') {
        None if s == "authorization" => TokenSource::Authorization,
        None if s == "protocol" => TokenSource::Protocol,
        None if s == "first_message" => TokenSource::FirstMessage,
        Some(("query", name)) if !name.is_empty() => TokenSource::Query(name.to_string()),
        Some(("cookie", name)) if !name.is_empty() => TokenSource::Cookie(name.to_string()),
        _ => return None,
    })
}

/// A value from the file, shortened and escaped for an error message.
pub(super) fn shown(s: &str) -> String {
    crate::util::escape(s, SHOWN_VALUE)
}

/// One firewall rule: a CIDR (host bits dropped) or a bare address.
pub fn parse_ip_rule(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Whether `s` looks like an environment variable name (`[A-Za-z_][A-Za-z0-9_]*`, at
/// most 128 bytes). Anything else is not echoed: it may be a secret pasted by mistake.
pub fn is_env_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_ENV_NAME
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
