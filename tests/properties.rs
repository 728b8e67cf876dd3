//! Property tests: no input panics the parsers a client or an operator feeds, and the
//! invariants the gateway's security rests on hold for every input, not only the listed ones.
//!
//! Case counts are bounded (see each `proptest!` block) so the file runs in a few
//! seconds in a debug build. The paths under test are listed in the report of the
//! commit that added this file; keep them public or move these tests with them.

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::{collection::vec, sample::select};
use std::net::IpAddr;
use wsgate::Config;

// ---------------------------------------------------------------------------
// 1. Request paths: wsgate::upgrade::check_path, Config::route, upstream::upstream_path
// ---------------------------------------------------------------------------

const ROUTES: &str = r#"
[[routes]]
name = "echo"
path = "/echo"
upstreams = ["builtin:echo"]
auth = "none"

[[routes]]
name = "public"
path = "/public/*"
upstreams = ["ws://127.0.0.1:1"]
auth = "none"

[[routes]]
name = "admin"
path = "/admin/*"
upstreams = ["ws://127.0.0.1:1"]
auth = "none"

[[routes]]
name = "chat"
path = "/chat/*"
upstreams = ["ws://127.0.0.1:1/app"]
auth = "none"
"#;

fn routes() -> Config {
    Config::from_toml_str(ROUTES, "properties.toml").unwrap()
}

/// Pieces a path is made of: separators, dots, their encodings (any case, double and
/// triple encoded, overlong UTF-8), route names and odd characters.
fn path_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => select(vec![
            "/", "/", "/", ".", "..", "a", "b", "public", "admin", "chat", "echo", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%25",
            "%252e", "%252E", "%25252e", "%252f", "%255c", "%", "%2", "%g0", ";", "\\", "%00", "%0a", "%3b", "%3B", "~", "-", "_",
            "%41", "%61", "%7e", "%5f", "%20", " ", "\u{e9}", "%E2%82%AC", "%C0%AE", "%c0%ae", "%e0%80%ae", "%C0%AF", "%3F", "+",
            "%u002e", "%ef%bc%8e", "%23", "%3f", "...", ". ", "%2e%20",
        ])
        .prop_map(str::to_string),
        1 => "[ -~]{0,3}",
        1 => any::<char>().prop_map(|c| c.to_string()),
    ]
}

fn request_path() -> impl Strategy<Value = String> {
    (prop::bool::weighted(0.95), vec(path_piece(), 0..10)).prop_map(|(slash, p)| format!("{}{}", if slash { "/" } else { "" }, p.concat()))
}

/// A path that starts at one of the routes more often than not.
fn routed_path() -> impl Strategy<Value = String> {
    (select(vec!["/public", "/admin", "/chat", "/echo", ""]), vec(path_piece(), 0..8)).prop_map(|(r, p)| format!("{r}{}", p.concat()))
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Percent-decode once as a lenient backend would: `%XX` escapes become bytes, and
/// overlong UTF-8 forms of ASCII (`%C0%AE`, `%E0%80%AE`) become the ASCII character
/// (Tomcat before CVE-2008-2938, old IIS). Independent of the gateway's decoder.
fn lenient_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut bytes = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                bytes.push(h * 16 + l);
                i += 3;
            }
            (c, _, _) => {
                bytes.push(c);
                i += 1;
            }
        }
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i..] {
            [a @ 0xC0..=0xC1, c, ..] if c & 0xC0 == 0x80 => {
                out.push(((a & 0x1F) << 6) | (c & 0x3F));
                i += 2;
            }
            [0xE0, c1, c2, ..] if c1 & 0xE0 == 0x80 && c2 & 0xC0 == 0x80 => {
                out.push(((c1 & 0x01) << 6) | (c2 & 0x3F));
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every form of `s` a backend may see: `s`, decoded once, twice, ... until it stops changing.
fn decodings(s: &str) -> Vec<String> {
    let mut all = vec![s.to_string()];
    for _ in 0..16 {
        let next = lenient_decode(all.last().unwrap());
        if &next == all.last().unwrap() {
            break;
        }
        all.push(next);
    }
    all
}

/// The path as a normalising backend reads it: fully decoded, `;params` dropped from
/// each segment (Tomcat, Spring), dot segments removed (RFC 3986 5.2.4).
fn backend_view(path: &str) -> String {
    let decoded = decodings(path).pop().unwrap();
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    for (i, seg) in segments.iter().enumerate() {
        // Path parameters, a query or fragment decoded out of an escape, a NUL; and
        // Windows, which drops trailing dots and spaces (`... ` is a parent at worst).
        let name = seg.split([';', '?', '#', '\0']).next().unwrap_or("");
        let dots = name.contains('.') && name.chars().all(|c| c == '.' || c == ' ');
        let name = if dots && name != "." { ".." } else { name };
        match name {
            "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(name),
        }
        if i + 1 == segments.len() && (name == "." || name == "..") {
            out.push("");
        }
    }
    format!("/{}", out.join("/"))
}

fn facts<'a>(path: &'a str, headers: &'a HeaderMap) -> wsgate::upstream::ClientFacts<'a> {
    wsgate::upstream::ClientFacts {
        ip: "203.0.113.7".parse().unwrap(),
        peer: "203.0.113.7".parse().unwrap(),
        peer_trusted: false,
        path,
        query: None,
        headers,
        forward_token: None,
        token_sources: &[],
        claims: None,
        cert: None,
        forward_claims: &[],
        identity_headers: &[],
        request_id: None,
        gateway_cookie: None,
        copied: &[],
    }
}

fn route_name<'a>(cfg: &'a Config, path: &str) -> Option<&'a str> {
    cfg.route("localhost", path).map(|r| r.name.as_str())
}

proptest! {
    // Cases count paths check_path accepts; most generated ones are refused (rejects).
    #![proptest_config(ProptestConfig { cases: 1000, max_global_rejects: 50_000, ..ProptestConfig::default() })]

    #[test]
    fn check_path_never_panics_on_any_string(s in any::<String>()) {
        let _ = wsgate::upgrade::check_path(&s);
    }

    #[test]
    fn an_accepted_path_has_no_hidden_dot_segment_slash_or_backslash(path in request_path()) {
        prop_assume!(wsgate::upgrade::check_path(&path).is_ok());
        prop_assert!(path.starts_with('/'));
        prop_assert!(!path.contains("//"), "{path:?}");
        prop_assert!(!path.contains('\\'), "{path:?}");
        for segment in path[1..].split('/') {
            for form in decodings(segment) {
                let name = form.split([';', '\0']).next().unwrap_or("");
                prop_assert!(name != "." && name != "..", "{path:?}: segment {segment:?} reads as {form:?}");
                prop_assert!(!form.contains(['/', '\\']), "{path:?}: segment {segment:?} reads as {form:?}");
            }
        }
    }

    #[test]
    fn routing_sees_what_the_upstream_sees(path in routed_path()) {
        prop_assume!(wsgate::upgrade::check_path(&path).is_ok());
        let cfg = routes();
        let Some(route) = cfg.route("localhost", &path) else { return Ok(()) };
        // A normalising backend reads the path as the same route.
        let view = backend_view(&path);
        prop_assert_eq!(route_name(&cfg, &view), Some(route.name.as_str()), "{:?} reads as {:?}", path, view);
        // The upstream request carries what was checked: the path itself when the
        // upstream URL has none, else the URL's path plus the part below the prefix,
        // which passes the same check.
        let headers = HeaderMap::new();
        let base = match &route.upstreams[0] {
            wsgate::config::Upstream::Remote { path, .. } => path.clone(),
            wsgate::config::Upstream::BuiltinEcho => None,
        };
        let up = wsgate::upstream::upstream_path(route, base.as_deref(), &facts(&path, &headers));
        match &base {
            None => prop_assert_eq!(&up, &path),
            Some(b) => {
                prop_assert!(up.starts_with(b.as_str()), "{up:?}");
                prop_assert!(path.ends_with(&up[b.len()..]), "{path:?} -> {up:?}");
                prop_assert!(wsgate::upgrade::check_path(&up).is_ok(), "{path:?} -> {up:?}");
            }
        }
    }
}

/// Inputs the properties above found, fixed in the same commit; kept as plain cases.
#[test]
fn inputs_found_by_the_properties() {
    // Overlong UTF-8 for `.`: a dot segment to lenient decoders.
    for p in ["/%C0%AE", "/public/%c0%ae%c0%ae/admin", "/a/%e0%80%ae/b"] {
        assert!(wsgate::upgrade::check_path(p).is_err(), "{p}");
    }
    // `wsgate_token= x` is the token `x`; `wsgate_token=""` is no token at all, so the
    // next source still gets a turn.
    let v = verifier("cookie:wsgate_token");
    let h = header_map("cookie", &["wsgate_token= wsgate_token=".to_string()]);
    assert_eq!(v.find_token(&h, None).map(|f| f.token).as_deref(), Some("wsgate_token="));
    let h = header_map("cookie", &["wsgate_token=\"\"".to_string()]);
    assert!(v.find_token(&h, None).is_none());
    // A config error names a key (here the file, as `=` has none).
    let e = Config::from_toml_str("=", "t.toml").unwrap_err();
    assert_eq!(e.key, "(file)");
    let e = Config::from_toml_str("[jwt]\n=", "t.toml").unwrap_err();
    assert_eq!(e.key, "jwt");
}

// ---------------------------------------------------------------------------
// 2. X-Forwarded-For: wsgate::upgrade::client_ip, wsgate::upgrade::parse_hop
// ---------------------------------------------------------------------------

fn xff_config() -> Config {
    Config::from_toml_str(
        "[server]\nclient_ip_source = \"x_forwarded_for\"\ntrusted_proxies = [\"10.0.0.0/8\", \"::1/128\", \"2001:db8:ffff::/48\"]\n",
        "t",
    )
    .unwrap()
}

fn trusted(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 10,
        IpAddr::V6(v6) => v6.is_loopback() || v6.segments()[..3] == [0x2001, 0xdb8, 0xffff],
    }
}

fn ip_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<u8>().prop_map(|x| IpAddr::from([10, 0, 0, x])),
        any::<[u16; 8]>().prop_map(IpAddr::from),
        any::<u16>().prop_map(|x| IpAddr::from([0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, x])),
        Just("::1".parse().unwrap()),
        any::<u8>().prop_map(|x| IpAddr::V6(std::net::Ipv4Addr::new(10, 0, 0, x).to_ipv6_mapped())),
        any::<[u8; 4]>().prop_map(|o| IpAddr::V6(std::net::Ipv4Addr::from(o).to_ipv6_mapped())),
    ]
}

/// One hop as proxies write them, or something no proxy should write.
fn hop() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ip_addr().prop_map(|ip| ip.to_string()),
        2 => (ip_addr(), any::<u16>()).prop_map(|(ip, p)| std::net::SocketAddr::new(ip, p).to_string()),
        1 => any::<std::net::Ipv6Addr>().prop_map(|ip| format!("[{ip}]")),
        1 => select(vec!["unknown", "", " ", "_hidden", "1.2.3", "1.2.3.4.5", "[::1", "::1]", "10.0.0.1:", "[10.0.0.1]", "0x0a000001", "fe80::1%eth0", "obfuscated"]).prop_map(str::to_string),
        1 => "[ -~]{0,12}",
    ]
    .prop_flat_map(|h| (Just(h), "[ \t]{0,2}", "[ \t]{0,2}").prop_map(|(h, a, b)| format!("{a}{h}{b}")))
}

/// The header lines: each a list of hops joined with `,`.
fn xff_lines() -> impl Strategy<Value = Vec<String>> {
    vec(vec(hop(), 1..4).prop_map(|h| h.join(",")), 0..3)
}

/// The model: the right-most hop that is not a trusted proxy; an unparsable one on the way is an error.
fn expected_client(lines: &[String]) -> Option<IpAddr> {
    let hops: Vec<&str> = lines.iter().flat_map(|l| l.split(',')).collect();
    for h in hops.iter().rev() {
        let h = h.trim();
        let ip = h
            .parse::<IpAddr>()
            .ok()
            .or_else(|| h.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
            .or_else(|| {
                h.strip_prefix('[')?
                    .strip_suffix(']')?
                    .parse::<std::net::Ipv6Addr>()
                    .ok()
                    .map(IpAddr::V6)
            })?
            .to_canonical();
        if !trusted(ip) {
            return Some(ip);
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parse_hop_never_panics_and_returns_canonical_addresses(s in any::<String>()) {
        if let Some(ip) = wsgate::upgrade::parse_hop(&s) {
            prop_assert_eq!(ip, ip.to_canonical());
        }
    }

    #[test]
    fn client_ip_is_the_rightmost_untrusted_hop_and_never_a_proxy(lines in xff_lines(), raw in vec(any::<u8>(), 0..24), use_raw in prop::bool::weighted(0.1)) {
        let cfg = xff_config();
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let mut headers = HeaderMap::new();
        if use_raw {
            // Arbitrary bytes, as far as a header value can hold them (obs-text included).
            if let Ok(v) = HeaderValue::from_bytes(&raw) {
                headers.append("x-forwarded-for", v);
            }
        }
        for l in &lines {
            headers.append("x-forwarded-for", HeaderValue::from_str(l).unwrap());
        }
        let got = wsgate::upgrade::client_ip(&cfg, proxy, &headers);
        if let Ok(ip) = got {
            prop_assert!(!trusted(ip), "a trusted proxy's address {ip} taken as the client's: {lines:?}");
        }
        if !use_raw {
            let want = expected_client(&lines);
            prop_assert_eq!(got.as_ref().ok().copied(), want, "{:?} -> {:?}", lines, got);
            if want.is_none() {
                prop_assert!(matches!(got, Err(wsgate::error::Reject::BadRequest(_))), "{got:?}");
            }
        }
        // A peer that is not a trusted proxy is the client, whatever the header says.
        let direct: IpAddr = "192.0.2.5".parse().unwrap();
        prop_assert_eq!(wsgate::upgrade::client_ip(&cfg, direct, &headers).ok(), Some(direct));
    }

    #[test]
    fn an_unparsable_rightmost_untrusted_hop_is_an_error(lines in xff_lines(), junk in select(vec!["unknown", "", "garbage", "1.2.3", "[::1"]), trail in vec(any::<u8>(), 0..3)) {
        // `junk` is right of every untrusted hop: only trusted proxies follow it.
        let mut last = vec![junk.to_string()];
        last.extend(trail.iter().map(|x| format!("10.0.0.{x}")));
        let mut all = lines.clone();
        all.push(last.join(", "));
        let mut headers = HeaderMap::new();
        for l in &all {
            headers.append("x-forwarded-for", HeaderValue::from_str(l).unwrap());
        }
        let got = wsgate::upgrade::client_ip(&xff_config(), "10.0.0.1".parse().unwrap(), &headers);
        prop_assert!(matches!(got, Err(wsgate::error::Reject::BadRequest(_))), "{all:?} -> {got:?}");
    }
}

// ---------------------------------------------------------------------------
// 3. Token extraction: wsgate::auth::Verifier::find_token, wsgate::auth::token_from_message
// ---------------------------------------------------------------------------

fn verifier(source: &str) -> wsgate::auth::Verifier {
    let text = format!("[jwt]\ntoken_sources = [\"{source}\"]\n");
    let cfg = Config::from_toml_str(&text, "t").unwrap();
    wsgate::auth::Verifier::new(&cfg.jwt, &wsgate::auth::Secret::from(vec![7u8; 32]))
}

/// Header text around the places tokens hide.
fn header_text() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            3 => select(vec![
                "Bearer ", "bearer ", "BEARER  ", "Basic ", "bearer.", "Bearer.", "chat", ",", ", ", ";", "; ", "=", "\"", " ", "\t",
                "wsgate_token=", "wsgate_token", "access_token=", "&", "eyJ", "a.b.c", "x",
            ])
            .prop_map(str::to_string),
            1 => "[ -~]{0,8}",
        ],
        0..10,
    )
    .prop_map(|p| p.concat())
}

fn header_map(name: &'static str, lines: &[String]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for l in lines {
        if let Ok(v) = HeaderValue::from_str(l) {
            h.append(name, v);
        }
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn tokens_found_in_headers_are_non_empty_trimmed_pieces_of_one_line(
        lines in vec(header_text(), 0..3),
        which in 0usize..3,
    ) {
        // (source, header, separators a token never spans, whether it is trimmed)
        let (source, header, sep, trimmed): (&str, &'static str, &[char], bool) = [
            ("authorization", "authorization", &[][..], true),
            // `bearer. x` yields ` x`: not a valid subprotocol token anyway, and refused by verification.
            ("protocol", "sec-websocket-protocol", &[','][..], false),
            // A quoted value keeps what is inside the quotes (`"x "` gives `x `).
            ("cookie:wsgate_token", "cookie", &[';'][..], false),
        ][which];
        let h = header_map(header, &lines);
        let v = verifier(source);
        if let Some(found) = v.find_token(&h, None) {
            let t = found.token;
            prop_assert!(!t.is_empty());
            if trimmed {
                prop_assert_eq!(t.trim(), t.as_str(), "untrimmed token from {:?}", lines);
            }
            prop_assert!(!t.contains(sep), "{t:?} spans a separator in {lines:?}");
            prop_assert!(
                h.get_all(header).iter().any(|l| l.to_str().is_ok_and(|l| l.contains(t.as_str()) && t.len() < l.len())),
                "{t:?} is not part of one {header} line: {lines:?}"
            );
        }
    }

    #[test]
    fn query_tokens_are_the_value_of_an_exact_access_token_pair(query in header_text().prop_map(|q| q.replace([' ', '\t', '"'], ""))) {
        let v = verifier("query:access_token");
        if let Some(found) = v.find_token(&HeaderMap::new(), Some(&query)) {
            let t = found.token;
            prop_assert!(!t.is_empty() && !t.contains('&'), "{t:?}");
            let pair = format!("access_token={t}");
            prop_assert!(query.split('&').any(|p| p == pair), "{t:?} from {query:?}");
        }
    }

    #[test]
    fn first_message_tokens_are_never_longer_than_the_message(
        text in prop_oneof![
            any::<String>(),
            "[ -~]{0,40}".prop_map(|t| serde_json::json!({ "token": t }).to_string()),
            any::<String>().prop_map(|t| serde_json::json!({ "token": t, "x": 1 }).to_string()),
            any::<String>().prop_map(|t| format!("{{\"token\":{t}}}")),
        ]
    ) {
        if let Some(t) = wsgate::auth::token_from_message(&text) {
            prop_assert!(!t.is_empty());
            prop_assert!(t.len() <= text.len(), "{t:?} from {text:?}");
            if !text.trim_start().starts_with('{') {
                prop_assert_eq!(t.as_str(), text.trim());
            }
        }
    }

    /// A live refresh (`refresh = true`) is exactly `{"token": "<string>"}`: any string
    /// round-trips through it, and a message is one only when it is an object whose one
    /// member is `token` (so a second member, or any other JSON, is relayed instead).
    #[test]
    fn refresh_messages_are_exactly_one_string_token(
        token in any::<String>(),
        other in any::<String>(),
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let text = serde_json::json!({ "token": token }).to_string();
        prop_assert_eq!(wsgate::relay::refresh_token(text.as_bytes()), Some(token.clone()));
        let two = serde_json::json!({ "token": token, other.clone() + "_": 1 }).to_string();
        prop_assert_eq!(wsgate::relay::refresh_token(two.as_bytes()), None);
        prop_assert_eq!(wsgate::relay::refresh_token(serde_json::json!([token]).to_string().as_bytes()), None);
        if let Some(t) = wsgate::relay::refresh_token(&bytes) {
            let v: serde_json::Value = serde_json::from_slice(&bytes).expect("a refresh is JSON");
            prop_assert_eq!(v, serde_json::json!({ "token": t }));
        }
    }
}

// ---------------------------------------------------------------------------
// 4. Close codes: wsgate::metrics::close_code_label, wsgate::error::CloseReason,
//    wsgate::wire::{close_code_allowed, close_payload, check_close}
// ---------------------------------------------------------------------------

/// Every close reason. The match makes this fail to compile when a variant is added.
fn all_close_reasons() -> Vec<wsgate::error::CloseReason> {
    use wsgate::error::CloseReason::*;
    let all = vec![
        Shutdown,
        IdleTimeout,
        PingTimeout,
        ClientProtocol,
        ClientInvalidUtf8,
        ClientTooBig,
        ClientIo,
        UpstreamReset,
        UpstreamProtocol,
        UpstreamInvalidUtf8,
        UpstreamTooBig,
        TokenExpired,
        RateAbuse,
        AccessRevoked,
        Overloaded,
        MessageStalled,
        UpstreamDrained,
        RefreshRefused,
    ];
    for r in &all {
        match r {
            Shutdown | IdleTimeout | PingTimeout | ClientProtocol | ClientInvalidUtf8 | ClientTooBig | ClientIo | UpstreamReset
            | UpstreamProtocol | UpstreamInvalidUtf8 | UpstreamTooBig | TokenExpired | RateAbuse | AccessRevoked | InvalidMessage(_)
            | Overloaded | MessageStalled | UpstreamDrained | RefreshRefused => {}
        }
    }
    let mut all = all;
    all.extend(wsgate::error::MessageRejection::ALL.map(InvalidMessage));
    all
}

/// Exhaustive rather than sampled: the whole u16 range is small.
#[test]
fn close_code_labels_form_a_small_fixed_set_over_every_u16() {
    let labels: std::collections::BTreeSet<&str> = (0..=u16::MAX).map(wsgate::metrics::close_code_label).collect();
    assert!(labels.len() <= 32, "{} labels: {labels:?}", labels.len());
    for l in &labels {
        assert!(
            matches!(*l, "3xxx" | "4xxx" | "other") || l.parse::<u16>().is_ok_and(|c| (1000..=1015).contains(&c) || c == 4401),
            "{l}"
        );
    }
    // A label names its own code when it is a number.
    for code in 0..=u16::MAX {
        let l = wsgate::metrics::close_code_label(code);
        if let Ok(n) = l.parse::<u16>() {
            assert_eq!(n, code);
        }
    }
}

#[test]
fn every_close_reason_sends_codes_allowed_on_the_wire_and_short_texts() {
    let mut kinds = std::collections::BTreeSet::new();
    for r in all_close_reasons() {
        let (c, u) = r.codes();
        for code in [u16::from(c), u16::from(u)] {
            assert!(wsgate::wire::close_code_allowed(code), "{r:?} sends {code}");
            assert_ne!(wsgate::metrics::close_code_label(code), "other", "{r:?}");
        }
        assert!(r.text().len() <= wsgate::wire::MAX_CONTROL - 2, "{r:?}");
        let (p, n) = wsgate::wire::close_payload(u16::from(c), r.text());
        assert_eq!(wsgate::wire::check_close(&p[..n]), Ok(Some(u16::from(c))), "{r:?}");
        kinds.extend(r.error_kind());
    }
    assert!(kinds.len() <= 16, "{kinds:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn close_payloads_round_trip_for_allowed_codes_and_cut_reasons_at_char_boundaries(code in any::<u16>(), reason in any::<String>()) {
        let (p, n) = wsgate::wire::close_payload(code, &reason);
        prop_assert!(n <= wsgate::wire::MAX_CONTROL);
        prop_assert!(reason.starts_with(std::str::from_utf8(&p[2..n]).unwrap()));
        let checked = wsgate::wire::check_close(&p[..n]);
        if wsgate::wire::close_code_allowed(code) {
            prop_assert_eq!(checked, Ok(Some(code)));
        } else {
            prop_assert!(checked.is_err());
        }
    }

    #[test]
    fn check_close_never_panics(payload in vec(any::<u8>(), 0..130)) {
        if let Ok(Some(code)) = wsgate::wire::check_close(&payload) {
            prop_assert!(wsgate::wire::close_code_allowed(code));
        }
    }
}

// ---------------------------------------------------------------------------
// 5. Frame codec: wsgate::wire::{parse, header, apply_mask, rotate, combine, Utf8}
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parse_never_panics_and_needs_exactly_header_len_bytes(buf in vec(any::<u8>(), 0..20)) {
        if let Ok(Some(h)) = wsgate::wire::parse(&buf) {
            prop_assert!(h.header_len <= buf.len() && h.header_len <= wsgate::wire::MAX_HEADER);
            prop_assert!(h.len >> 63 == 0);
            prop_assert!(!h.is_control() || (h.fin && h.len <= wsgate::wire::MAX_CONTROL as u64));
            // Any shorter prefix asks for more bytes; any longer buffer gives the same header.
            for cut in 0..h.header_len {
                prop_assert_eq!(wsgate::wire::parse(&buf[..cut]), Ok(None));
            }
            let mut longer = buf.clone();
            longer.extend_from_slice(&[0xAB; 8]);
            prop_assert_eq!(wsgate::wire::parse(&longer), Ok(Some(h)));
        }
    }

    #[test]
    fn header_then_parse_round_trips(
        opcode in select(vec![0u8, 1, 2, 8, 9, 10]),
        fin in any::<bool>(),
        len in prop_oneof![0usize..=125, 126usize..=0xFFFF, 0x1_0000usize..=usize::MAX >> 1],
        mask in any::<Option<[u8; 4]>>(),
    ) {
        let control = opcode & 0x8 != 0;
        let (fin, len) = if control { (true, len % 126) } else { (fin, len) };
        let (h, n) = wsgate::wire::header(opcode, fin, len, mask);
        let parsed = wsgate::wire::parse(&h[..n]).unwrap().unwrap();
        prop_assert_eq!(parsed, wsgate::wire::Header { fin, rsv1: false, opcode, mask, len: len as u64, header_len: n });
    }

    #[test]
    fn masking_in_pieces_with_the_running_offset_equals_masking_whole(
        data in vec(any::<u8>(), 0..200),
        key in any::<[u8; 4]>(),
        other in any::<[u8; 4]>(),
        cuts in vec(any::<prop::sample::Index>(), 0..5),
    ) {
        use wsgate::wire::{apply_mask, combine, rotate};
        let mut whole = data.clone();
        apply_mask(&mut whole, key);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
        points.push(0);
        points.push(data.len());
        points.sort_unstable();
        let mut pieces = data.clone();
        for w in points.windows(2) {
            apply_mask(&mut pieces[w[0]..w[1]], rotate(key, w[0]));
        }
        prop_assert_eq!(&pieces, &whole);
        // Masking twice restores; a combined key unmasks and re-masks in one pass.
        let mut twice = whole.clone();
        apply_mask(&mut twice, key);
        prop_assert_eq!(&twice, &data);
        let mut remasked = whole.clone();
        apply_mask(&mut remasked, combine(key, other));
        let mut expected = data.clone();
        apply_mask(&mut expected, other);
        prop_assert_eq!(remasked, expected);
    }

    #[test]
    fn streamed_utf8_check_agrees_with_std_at_any_split(
        text in prop_oneof![
            any::<String>().prop_map(String::into_bytes),
            vec(any::<u8>(), 0..24),
            (any::<String>(), vec(any::<u8>(), 0..3)).prop_map(|(s, tail)| [s.into_bytes(), tail].concat()),
        ],
        cuts in vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(text.len() + 1)).collect();
        points.push(0);
        points.push(text.len());
        points.sort_unstable();
        let mut u = wsgate::wire::Utf8::default();
        let mut ok = true;
        for (i, w) in points.windows(2).enumerate() {
            if u.feed(&text[w[0]..w[1]], i + 2 == points.len()).is_err() {
                ok = false;
                break;
            }
        }
        prop_assert_eq!(ok, std::str::from_utf8(&text).is_ok(), "{:?} cut at {:?}", text, points);
    }
}

// ---------------------------------------------------------------------------
// 6. Config: wsgate::Config::from_toml_str, wsgate::config::is_env_var_name
// ---------------------------------------------------------------------------

const SHIPPED: &str = include_str!("../config/gateway.toml");

/// Characters that change the meaning of TOML.
fn toml_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => select(vec!['=', '[', ']', '"', '\'', '\n', '#', '0', '9', '-', '.', ',', '{', '}', ' ', 'a', 's', 'm', '/', '*', '\\', ':', '_']),
        1 => any::<char>(),
    ]
}

/// One edit: delete, insert or replace a character at a position (an index into the chars).
#[derive(Debug, Clone)]
enum Edit {
    Delete(prop::sample::Index),
    Insert(prop::sample::Index, char),
    Replace(prop::sample::Index, char),
    /// Duplicate a line (the same key or table twice).
    DuplicateLine(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Edit::Delete),
        (any::<prop::sample::Index>(), toml_char()).prop_map(|(i, c)| Edit::Insert(i, c)),
        (any::<prop::sample::Index>(), toml_char()).prop_map(|(i, c)| Edit::Replace(i, c)),
        any::<prop::sample::Index>().prop_map(Edit::DuplicateLine),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        match e {
            Edit::Delete(i) if !chars.is_empty() => {
                chars.remove(i.index(chars.len()));
            }
            Edit::Insert(i, c) => chars.insert(i.index(chars.len() + 1), *c),
            Edit::Replace(i, c) if !chars.is_empty() => {
                let i = i.index(chars.len());
                chars[i] = *c;
            }
            Edit::DuplicateLine(i) => {
                let s: String = chars.iter().collect();
                let lines: Vec<&str> = s.lines().collect();
                let n = i.index(lines.len().max(1));
                let mut out: Vec<&str> = lines.clone();
                if let Some(l) = lines.get(n) {
                    out.insert(n, l);
                }
                chars = out.join("\n").chars().collect();
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn check_error(e: &wsgate::config::ConfigError) -> Result<(), TestCaseError> {
    prop_assert!(!e.key.trim().is_empty(), "error without a key: {e:?}");
    prop_assert!(e.to_string().contains(&e.key), "{e}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_text_either_loads_or_names_a_key(text in any::<String>()) {
        if let Err(e) = Config::from_toml_str(&text, "fuzz.toml") {
            check_error(&e)?;
        }
    }

    #[test]
    fn mutations_of_the_shipped_config_load_or_name_a_key(edits in vec(edit(), 1..5)) {
        let text = apply(SHIPPED, &edits);
        if let Err(e) = Config::from_toml_str(&text, "gateway.toml") {
            check_error(&e)?;
        }
    }

    #[test]
    fn a_secret_pasted_as_secret_env_is_never_shown(
        secret in "[ -~]{6,60}",
        key in select(vec!["secret_env", "secret", "jwt_secret", "key"]),
        before in select(vec!["", "issuer = \"x\"\n", "algorithms = [\"HS256\"]\n"]),
    ) {
        let text = format!("[jwt]\n{before}{key} = {}\n", toml_string(&secret));
        match Config::from_toml_str(&text, "t.toml") {
            Ok(c) => {
                prop_assert_eq!(key, "secret_env");
                prop_assert!(wsgate::config::is_env_var_name(&secret), "{secret:?} accepted as a variable name");
                prop_assert_eq!(&c.jwt.secret, &wsgate::config::SecretSource::Env(wsgate::config::Located {
                    value: secret.clone(),
                    key: "jwt.secret_env".into(),
                    line: Some(2 + before.lines().count()),
                }));
            }
            Err(e) => {
                check_error(&e)?;
                if !wsgate::config::is_env_var_name(&secret) {
                    let shown = format!("{e} {e:?}");
                    prop_assert!(!shown.contains(secret.as_str()), "{secret:?} shown in {shown}");
                    if key == "secret_env" {
                        prop_assert_eq!(e.key.as_str(), "jwt.secret_env");
                    }
                }
            }
        }
    }
}
