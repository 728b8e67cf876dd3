//! `[tls.acme]`: the directory URL, contacts and the names the certificate covers.
//! The cache directory is a file-system question, answered where the runtime is built.

use super::validate::{Validator, shown};
use super::*;
use toml::Spanned;

/// Most names in one certificate (Let's Encrypt's limit).
pub const MAX_ACME_DOMAINS: usize = 100;
/// Most `contact` entries.
const MAX_CONTACTS: usize = 10;
/// Longest directory URL.
const MAX_URL: usize = 2048;

impl Validator<'_> {
    /// `[tls.acme]`, and what it excludes in `[tls]`: the certificate files, the
    /// self-signed fallback, and `client_auth = "required"` (the CA's validation
    /// server presents no client certificate).
    pub(super) fn acme(&self, t: &raw::Tls) -> Result<Option<Acme>, ConfigError> {
        let Some(a) = &t.acme else { return Ok(None) };
        let excluded = [
            ("tls.cert", t.cert.as_ref().map(|c| c.span())),
            ("tls.key", t.key.as_ref().map(|k| k.span())),
        ];
        if let Some((key, _)) = excluded.iter().find(|(_, span)| span.is_some()) {
            return Err(self.err(
                a,
                key,
                "set either tls.cert and tls.key, or [tls.acme] (which obtains the certificate)",
            ));
        }
        if t.self_signed_if_missing == Some(true) {
            return Err(self.err_key(
                "tls.self_signed_if_missing",
                "has no place beside [tls.acme]: remove it (until the first certificate is issued, only the ACME challenge is answered)",
            ));
        }
        if let Some(auth) = &t.client_auth
            && *auth.get_ref() == ClientAuth::Required
        {
            return Err(self.err(
                    auth,
                    "tls.client_auth",
                    "\"required\" cannot be used with [tls.acme]: the CA's validation server presents no client certificate; use \"optional\" with auth = \"mtls\" routes",
                ));
        }
        let a = a.get_ref();
        let directory_url = match &a.directory_url {
            Some(u) => {
                self.directory_url(u)?;
                self.located(u, "tls.acme.directory_url")
            }
            None => Located {
                value: DEFAULT_ACME_DIRECTORY.to_string(),
                key: "tls.acme.directory_url".into(),
                line: None,
            },
        };
        let contact = match &a.contact {
            Some(c) => self.contacts(c)?,
            None => Vec::new(),
        };
        let renew_before = match &a.renew_before {
            Some(d) if d.get_ref().0.is_zero() => return Err(self.err(d, "tls.acme.renew_before", "must be longer than zero")),
            Some(d) => d.get_ref().0,
            None => DEFAULT_RENEW_BEFORE,
        };
        Ok(Some(Acme {
            directory_url,
            contact,
            domains: self.acme_domains(&a.domains)?,
            cache_dir: match &a.cache_dir {
                Some(d) if d.get_ref().as_os_str().is_empty() => return Err(self.err(d, "tls.acme.cache_dir", "must not be empty")),
                Some(d) => self.located(d, "tls.acme.cache_dir"),
                None => Located {
                    value: PathBuf::from(DEFAULT_ACME_CACHE_DIR),
                    key: "tls.acme.cache_dir".into(),
                    line: None,
                },
            },
            renew_before,
            ca_file: a.ca_file.as_ref().map(|f| self.located(f, "tls.acme.ca_file")),
        }))
    }

    fn directory_url(&self, u: &Spanned<String>) -> Result<(), ConfigError> {
        let key = "tls.acme.directory_url";
        let url = u.get_ref();
        if url.len() > MAX_URL {
            return Err(self.err(u, key, format!("is longer than {MAX_URL} characters")));
        }
        let Some(rest) = url.strip_prefix("https://") else {
            return Err(self.err(u, key, "must be an https:// URL"));
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            return Err(self.err(u, key, "credentials in the URL are refused (not shown)"));
        }
        match url.parse::<http::Uri>() {
            // An empty or out-of-range port is refused, not read as 443.
            Ok(_) if crate::util::authority_port(authority).is_err() => Err(self.err(u, key, "the port must be between 1 and 65535")),
            Ok(uri) if uri.host().is_some_and(|h| !h.is_empty()) => Ok(()),
            _ => Err(self.err(u, key, format!("not a valid URL: {}", shown(url)))),
        }
    }

    fn contacts(&self, c: &Spanned<Vec<String>>) -> Result<Vec<String>, ConfigError> {
        let key = "tls.acme.contact";
        if c.get_ref().len() > MAX_CONTACTS {
            return Err(self.err(c, key, format!("at most {MAX_CONTACTS} entries")));
        }
        for entry in c.get_ref() {
            let address = entry.strip_prefix("mailto:").unwrap_or("");
            let plausible = address.len() <= 254
                && address.bytes().all(|b| b.is_ascii_graphic() && !b",?%<>\"\\".contains(&b))
                && address.split('@').count() == 2
                && address.split('@').all(|part| !part.is_empty());
            if !plausible {
                return Err(self.err(
                    c,
                    key,
                    format!(
                        "{} is not a mailto: URL with one address (\"mailto:ops@example.com\")",
                        shown(entry)
                    ),
                ));
            }
        }
        Ok(c.get_ref().clone())
    }

    fn acme_domains(&self, d: &Spanned<Vec<String>>) -> Result<Vec<AcmeIdentifier>, ConfigError> {
        let key = "tls.acme.domains";
        let names = d.get_ref();
        if names.is_empty() || names.len() > MAX_ACME_DOMAINS {
            return Err(self.err(d, key, format!("needs 1 to {MAX_ACME_DOMAINS} names")));
        }
        let mut out: Vec<AcmeIdentifier> = Vec::with_capacity(names.len());
        for name in names {
            let id = parse_identifier(name).map_err(|m| self.err(d, key, format!("{}: {m}", shown(name))))?;
            if out.contains(&id) {
                return Err(self.err(d, key, format!("{id} is listed twice")));
            }
            out.push(id);
        }
        Ok(out)
    }
}

/// A name for an ACME order: an IP address, or a DNS name in A-label form. Wildcards
/// are refused: TLS-ALPN-01 cannot validate them (RFC 8737 section 3).
pub fn parse_identifier(name: &str) -> Result<AcmeIdentifier, &'static str> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        if let std::net::IpAddr::V6(v6) = ip
            && v6.to_ipv4_mapped().is_some()
        {
            return Err("write an IPv4-mapped address in its IPv4 form");
        }
        if ip.is_unspecified() || ip.is_multicast() {
            return Err("not an address a certificate can name");
        }
        return Ok(AcmeIdentifier::Ip(ip));
    }
    if name.contains('*') {
        return Err("wildcard names cannot be validated with TLS-ALPN-01 (RFC 8737); list each name");
    }
    if !name.is_ascii() {
        return Err("write internationalized names in their A-label form (xn--...)");
    }
    if name.ends_with('.') {
        return Err("write the name without the trailing dot");
    }
    let lower = name.to_ascii_lowercase();
    let valid_label = |l: &str| {
        (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-') && !l.ends_with('-')
    };
    if lower.is_empty() || lower.len() > 253 || !lower.split('.').all(valid_label) {
        return Err("neither an IP address nor a DNS name (letters, digits, '-' and '.', labels of 1 to 63)");
    }
    if lower.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err("looks like an IP address but is not one");
    }
    Ok(AcmeIdentifier::Dns(lower))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_names_or_addresses_and_nothing_else() {
        assert_eq!(parse_identifier("WS.Example.com"), Ok(AcmeIdentifier::Dns("ws.example.com".into())));
        assert_eq!(parse_identifier("127.0.0.1"), Ok(AcmeIdentifier::Ip("127.0.0.1".parse().unwrap())));
        assert_eq!(
            parse_identifier("2001:db8::1"),
            Ok(AcmeIdentifier::Ip("2001:db8::1".parse().unwrap()))
        );
        assert_eq!(
            parse_identifier("xn--bcher-kva.example"),
            Ok(AcmeIdentifier::Dns("xn--bcher-kva.example".into()))
        );
        for bad in [
            "*.example.com",
            "bücher.example",
            "example.com.",
            "",
            "a..b",
            "-a.example",
            "a_b.example",
            "1.2.3",
            "01.2.3.4.5",
            "[::1]",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "ex ample.com",
            &"a".repeat(64),
        ] {
            assert!(parse_identifier(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
