use super::*;

const MINIMAL: &str = r#"
[[routes]]
name = "echo"
path = "/echo"
upstreams = ["builtin:echo"]
"#;

fn err(src: &str) -> ConfigError {
    Config::from_toml_str(src, "t.toml").unwrap_err()
}

#[test]
fn defaults_apply() {
    let c = Config::from_toml_str(MINIMAL, "t.toml").unwrap();
    assert_eq!(c.server.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
    assert_eq!(c.limits.max_message_size, 1 << 20);
    assert_eq!(c.routes[0].auth, AuthMode::Jwt);
    assert_eq!(c.jwt.algorithms, vec![Algorithm::HS256]);
    assert_eq!(c.jwt.token_sources.len(), 4);
}

#[test]
fn unknown_key_names_key_and_line() {
    let e = err("[server]\nlisten = [\"127.0.0.1:1\"]\nlisten_backlog = 5\n");
    assert_eq!(e.line, Some(3));
    assert!(e.message.contains("listen_backlog"), "{e}");
}

#[test]
fn bad_duration_names_key_and_line() {
    let e = err("[server]\n\nidle_timeout = \"5 fortnights\"\n");
    assert_eq!(e.line, Some(3));
    assert_eq!(e.key, "server.idle_timeout");
    assert!(e.message.contains("invalid duration"), "{e}");
}

#[test]
fn error_never_echoes_a_misplaced_secret() {
    let e = err("[jwt]\nsecret = \"hunter2-super-secret\"\n");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert_eq!(e.line, Some(2));
}

#[test]
fn none_algorithm_refused() {
    let e = err("[jwt]\nalgorithms = [\"HS256\", \"None\"]\n");
    assert_eq!((e.key.as_str(), e.line), ("jwt.algorithms", Some(2)));
}

#[test]
fn bad_route_path_and_upstream() {
    let e = err("[[routes]]\nname = \"a\"\npath = \"echo\"\nupstreams = [\"builtin:echo\"]\n");
    assert_eq!((e.key.as_str(), e.line), ("routes.path", Some(3)));
    let e = err("[[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"http://x\"]\n");
    assert_eq!((e.key.as_str(), e.line), ("routes.upstreams", Some(4)));
    let e = err("[[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"ws://user:pw@x/\"]\n");
    assert!(!e.to_string().contains("pw"), "{e}");
}

#[test]
fn both_secret_sources_refused() {
    let pasted = "s3cr3t-Value/with+chars==";
    let e = err(&format!("[jwt]\nsecret_env = \"{pasted}\"\n"));
    assert_eq!((e.key.as_str(), e.line), ("jwt.secret_env", Some(2)));
    assert!(!e.to_string().contains(pasted), "{e}");
    assert!(is_env_var_name("WSGATE_JWT_SECRET") && !is_env_var_name("1A") && !is_env_var_name(""));
    let e = err("[jwt]\nsecret_env = \"X\"\nsecret_file = \"f\"\n");
    assert_eq!((e.key.as_str(), e.line), ("jwt.secret_env", Some(2)));
}

#[test]
fn frame_larger_than_message_refused() {
    let e = err("[limits]\nmax_message_size = \"1KiB\"\nmax_frame_size = \"2KiB\"\n");
    assert_eq!((e.key.as_str(), e.line), ("limits.max_frame_size", Some(3)));
}

#[test]
fn routing_prefers_exact_then_longest_prefix() {
    let c = Config::from_toml_str(
        r#"
[[routes]]
name = "a"
path = "/chat/*"
upstreams = ["ws://127.0.0.1:1"]
[[routes]]
name = "b"
path = "/chat/admin/*"
upstreams = ["ws://127.0.0.1:2/x"]
[[routes]]
name = "c"
path = "/chat/exact"
upstreams = ["builtin:echo"]
"#,
        "t",
    )
    .unwrap();
    let name = |p: &str| c.route("any.host", p).map(|r| r.name.as_str());
    assert_eq!(name("/chat/room"), Some("a"));
    assert_eq!(name("/chat"), Some("a"));
    assert_eq!(name("/chatroom"), None);
    assert_eq!(name("/chat/admin/x"), Some("b"));
    assert_eq!(name("/chat/exact"), Some("c"));
    assert_eq!(
        c.routes[1].upstreams[0],
        Upstream::Remote {
            tls: false,
            host: "127.0.0.1".into(),
            port: 2,
            path: Some("/x".into())
        }
    );
}

#[test]
fn origins_normalise() {
    assert_eq!(
        normalize_origin("HTTPS://App.Example.com:443").as_deref(),
        Some("https://app.example.com")
    );
    assert_eq!(normalize_origin("http://a.b:8080").as_deref(), Some("http://a.b:8080"));
    assert_eq!(normalize_origin("null"), None);
    assert_eq!(normalize_origin("https://a.b/path"), None);
}

#[test]
fn firewall_rules_are_checked() {
    let e = err("[firewall]\ndeny = [\"10.0.0.0/8\", \"bogus\"]\n");
    assert_eq!((e.key.as_str(), e.line), ("firewall.deny", Some(2)));
    let c = Config::from_toml_str("[firewall]\ndefault = \"deny\"\nallow = [\"127.0.0.0/8\", \"::1\"]\n", "t").unwrap();
    assert_eq!(c.firewall.default, FirewallDefault::Deny);
    assert_eq!(
        c.firewall.allow,
        vec!["127.0.0.0/8".parse::<IpNet>().unwrap(), "::1/128".parse().unwrap()]
    );
}

#[test]
fn shipped_config_is_valid() {
    let src = include_str!("../../config/gateway.toml");
    Config::from_toml_str(src, "config/gateway.toml").unwrap();
}

#[test]
fn assembly_memory_must_hold_one_message() {
    let e = err("[limits]\nmax_message_size = \"1MiB\"\nmax_assembly_memory = \"512KiB\"\n");
    assert_eq!((e.key.as_str(), e.line), ("limits.max_assembly_memory", Some(3)));
    let c = Config::from_toml_str("[limits]\nmax_assembly_memory = \"2GiB\"\n", "t").unwrap();
    assert_eq!(c.limits.max_assembly_memory, 2 << 30);
    assert_eq!(Config::from_toml_str("", "t").unwrap().limits.max_assembly_memory, 256 << 20);
}

#[test]
fn a_clients_assembly_share_defaults_to_a_quarter_and_holds_one_message() {
    let d = Config::from_toml_str("", "t").unwrap().limits;
    assert_eq!(
        (d.max_assembly_memory_per_client, d.assembly_timeout),
        (64 << 20, Duration::from_secs(10))
    );
    let small = Config::from_toml_str("[limits]\nmax_message_size = \"1MiB\"\nmax_assembly_memory = \"2MiB\"\n", "t").unwrap();
    assert_eq!(small.limits.max_assembly_memory_per_client, 1 << 20, "at least one message");
    let e = err("[limits]\nmax_message_size = \"1MiB\"\nmax_assembly_memory_per_client = \"512KiB\"\n");
    assert_eq!(e.key.as_str(), "limits.max_assembly_memory_per_client");
    let e = err("[limits]\nmax_assembly_memory = \"8MiB\"\nmax_assembly_memory_per_client = \"9MiB\"\n");
    assert_eq!(e.key.as_str(), "limits.max_assembly_memory_per_client");
    assert_eq!(err("[limits]\nassembly_timeout = \"0s\"\n").key.as_str(), "limits.assembly_timeout");
}

#[test]
fn cluster_urls_hold_no_credentials_and_show_none() {
    let e = err("[cluster]\nredis = \"redis://:hunter2@127.0.0.1:6379/0\"\n");
    assert_eq!((e.key.as_str(), e.line), ("cluster.redis", Some(2)));
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = err("[cluster]\nredis = \"redis://user:hunter2@h/0\"\n");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert_eq!(err("[cluster]\nredis = \"http://h\"\n").key, "cluster.redis");
    let e = err("[cluster]\nredis = \"redis://h\"\nredis_password_env = \"A\"\nredis_password_file = \"f\"\n");
    assert_eq!(e.key, "cluster.redis_password_env");
    let e = err("[cluster]\nredis = \"redis://h\"\nredis_password_env = \"pa55 word\"\n");
    assert!(!e.to_string().contains("pa55"), "{e}");
    assert_eq!(
        err("[cluster]\nredis = \"redis://h\"\nkey_prefix = \"a b\"\n").key,
        "cluster.key_prefix"
    );
    let c = Config::from_toml_str("[cluster]\nredis = \"rediss://h:6380/1\"\nredis_password_file = \"p\"\n", "t").unwrap();
    let cluster = c.cluster.unwrap();
    assert_eq!(
        (cluster.key_prefix.as_str(), cluster.timeout),
        ("wsgate", std::time::Duration::from_millis(20))
    );
    assert!(Config::from_toml_str("", "t").unwrap().cluster.is_none());
    let e = err("[cluster]\nredis = \"redis://h\"\nredis_ca = \"ca.pem\"\n");
    assert_eq!((e.key.as_str(), e.line), ("cluster.redis_ca", Some(3)));
}

const ACME: &str = "[tls.acme]\ndirectory_url = \"https://acme.example/dir\"\ndomains = [\"ws.example.com\", \"192.0.2.7\"]\n";

#[test]
fn acme_table_parses_with_defaults() {
    let c = Config::from_toml_str(&format!("{ACME}{MINIMAL}"), "t.toml").unwrap();
    let a = c.tls.acme.unwrap();
    assert_eq!(
        a.domains,
        vec![
            AcmeIdentifier::Dns("ws.example.com".into()),
            AcmeIdentifier::Ip("192.0.2.7".parse().unwrap())
        ]
    );
    assert_eq!(a.renew_before, DEFAULT_RENEW_BEFORE);
    assert_eq!(a.cache_dir.value, PathBuf::from(DEFAULT_ACME_CACHE_DIR));
    assert!(a.contact.is_empty());
    let c = Config::from_toml_str(&format!("[tls.acme]\ndomains = [\"a.example\"]\n{MINIMAL}"), "t.toml").unwrap();
    assert_eq!(c.tls.acme.unwrap().directory_url.value, DEFAULT_ACME_DIRECTORY);
}

#[test]
fn acme_errors_name_the_key_and_line() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[tls]\ncert = \"c.pem\"\n[tls.acme]\ndomains = [\"a.example\"]\n",
            "tls.cert",
            "either",
        ),
        (
            "[tls]\nself_signed_if_missing = true\n[tls.acme]\ndomains = [\"a.example\"]\n",
            "tls.self_signed_if_missing",
            "[tls.acme]",
        ),
        (
            "[tls]\nclient_ca = \"ca.pem\"\nclient_auth = \"required\"\n[tls.acme]\ndomains = [\"a.example\"]\n",
            "tls.client_auth",
            "validation server",
        ),
        ("[tls.acme]\ndomains = []\n", "tls.acme.domains", "1 to 100"),
        ("[tls.acme]\ndomains = [\"*.example.com\"]\n", "tls.acme.domains", "RFC 8737"),
        (
            "[tls.acme]\ndomains = [\"a.example\", \"A.example\"]\n",
            "tls.acme.domains",
            "twice",
        ),
        ("[tls.acme]\ndomains = [\"bad_name.example\"]\n", "tls.acme.domains", "DNS name"),
        (
            "[tls.acme]\ndirectory_url = \"http://acme.example/dir\"\ndomains = [\"a.example\"]\n",
            "tls.acme.directory_url",
            "https",
        ),
        (
            "[tls.acme]\ndirectory_url = \"https://user:hunter2@acme.example/dir\"\ndomains = [\"a.example\"]\n",
            "tls.acme.directory_url",
            "credentials",
        ),
        (
            "[tls.acme]\ncontact = [\"ops@example.com\"]\ndomains = [\"a.example\"]\n",
            "tls.acme.contact",
            "mailto:",
        ),
        (
            "[tls.acme]\ncontact = [\"mailto:a@b,c@d\"]\ndomains = [\"a.example\"]\n",
            "tls.acme.contact",
            "mailto:",
        ),
        (
            "[tls.acme]\nrenew_before = \"0s\"\ndomains = [\"a.example\"]\n",
            "tls.acme.renew_before",
            "zero",
        ),
        ("[tls.acme]\ndomains = [\"a.example\"]\nport = 80\n", "tls.acme", "port"),
    ];
    for (src, key, words) in cases {
        let e = err(&format!("{src}{MINIMAL}"));
        assert!(e.key.starts_with(key) && e.message.contains(words), "{src}: {e}");
        assert!(e.line.is_some(), "{src}: {e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}

#[test]
fn cluster_takes_one_of_redis_sentinels_and_redis_cluster() {
    let e = err("[cluster]\nkey_prefix = \"x\"\n");
    assert_eq!(e.key, "cluster.redis");
    let e = err("[cluster]\nredis = \"redis://h\"\nredis_cluster = [\"redis://a\"]\n");
    assert!(e.message.contains("only one"), "{e}");
    let e = err("[cluster]\nsentinels = [\"redis://s1:26379\"]\n");
    assert_eq!((e.key.as_str(), e.line), ("cluster.sentinel_master", Some(2)));
    let e = err("[cluster]\nredis = \"redis://h\"\nsentinel_master = \"m\"\n");
    assert_eq!((e.key.as_str(), e.line), ("cluster.sentinel_master", Some(3)));
    let e = err("[cluster]\nsentinels = [\"redis://s1:26379\", \"redis://:pw@s2\"]\nsentinel_master = \"m\"\n");
    assert_eq!((e.key.as_str(), e.line), ("cluster.sentinels", Some(2)));
    assert!(!e.to_string().contains("pw@"), "{e}");
    let e = err("[cluster]\nredis_cluster = [\"redis://a\", \"rediss://b\"]\n");
    assert_eq!(e.key, "cluster.redis_cluster");
    assert_eq!(err("[cluster]\nredis_cluster = []\n").key, "cluster.redis_cluster");
    let c = Config::from_toml_str(
        "[cluster]\nsentinels = [\"redis://s1:26379\", \"redis://s2:26379\"]\nsentinel_master = \"wsgate\"\nstate_file = \"/var/lib/wsgate/state.json\"\n",
        "t",
    )
    .unwrap()
    .cluster
    .unwrap();
    assert!(matches!(&c.redis, RedisServers::Sentinel { sentinels, master } if sentinels.len() == 2 && master == "wsgate"));
    assert_eq!(c.state_file.unwrap().value, std::path::PathBuf::from("/var/lib/wsgate/state.json"));
    let c = Config::from_toml_str("[cluster]\nredis_cluster = [\"rediss://a:7000\"]\n", "t")
        .unwrap()
        .cluster
        .unwrap();
    assert!(c.redis.tls());
}

const HOSTS: &str = r#"
[[routes]]
name = "any"
path = "/ws"
upstreams = ["builtin:echo"]
[[routes]]
name = "chat"
host = "Chat.Example.com"
path = "/ws"
upstreams = ["builtin:echo"]
[[routes]]
name = "wild"
host = "*.example.com"
path = "/ws"
upstreams = ["builtin:echo"]
[[routes]]
name = "wild_prefix"
host = "*.example.com"
path = "/ws/*"
upstreams = ["builtin:echo"]
[[routes]]
name = "anywhere_deep"
path = "/ws/deep/*"
upstreams = ["builtin:echo"]
"#;

#[test]
fn routes_match_host_first_exact_before_wildcard_then_path() {
    let c = Config::from_toml_str(HOSTS, "t.toml").unwrap();
    let name = |h: &str, p: &str| normalize_host(h).and_then(|h| c.route(&h, p)).map(|r| r.name.as_str());
    assert_eq!(name("chat.example.com", "/ws"), Some("chat"));
    assert_eq!(name("CHAT.EXAMPLE.COM:8443", "/ws"), Some("chat"));
    assert_eq!(name("chat.example.com.", "/ws"), Some("chat"));
    assert_eq!(name("partners.example.com", "/ws"), Some("wild"));
    // One label only: not the parent, not two labels.
    assert_eq!(name("example.com", "/ws"), Some("any"));
    assert_eq!(name("a.b.example.com", "/ws"), Some("any"));
    assert_eq!(name("other.test", "/ws"), Some("any"));
    // A host's prefix route beats a longer prefix for any host: host first.
    assert_eq!(name("x.example.com", "/ws/deep/1"), Some("wild_prefix"));
    assert_eq!(name("other.test", "/ws/deep/1"), Some("anywhere_deep"));
    // The exact host has no prefix route: the wildcard's serves it.
    assert_eq!(name("chat.example.com", "/ws/room"), Some("wild_prefix"));
}

#[test]
fn request_hosts_normalise() {
    assert_eq!(normalize_host("A.B:443").as_deref(), Some("a.b"));
    assert_eq!(normalize_host("a.b.").as_deref(), Some("a.b"));
    assert_eq!(normalize_host("[::1]:8443").as_deref(), Some("::1"));
    assert_eq!(normalize_host("127.0.0.1:1").as_deref(), Some("127.0.0.1"));
    for bad in [
        "", "a.b..", "user@a.b", "a.b:", "a.b:x", "a b", "ä.b", "*.a.b", "a..b", ".a.b", "a.b:1:2",
    ] {
        assert_eq!(normalize_host(bad), None, "{bad:?}");
    }
}

#[test]
fn route_hosts_are_checked_and_duplicates_name_key_and_line() {
    let n = std::cell::Cell::new(0);
    let route = |host: &str, path: &str| {
        n.set(n.get() + 1);
        format!(
            "[[routes]]\nname = \"r{}\"\nhost = \"{host}\"\npath = \"{path}\"\nupstreams = [\"builtin:echo\"]\n",
            n.get()
        )
    };
    // IPv6 addresses, bare or in brackets, in any spelling, are the host a client sends.
    let c = Config::from_toml_str(&format!("{}{}", route("[::1]", "/a"), route("0:0::0:1", "/b")), "t.toml").unwrap();
    assert_eq!(c.route("::1", "/a").map(|r| r.name.as_str()), Some("r1"));
    assert_eq!(
        c.route(&normalize_host("[::1]:8443").unwrap(), "/b").map(|r| r.name.as_str()),
        Some("r2")
    );
    assert_eq!(err(&route("[::1]:443", "/a")).key, "routes.host");
    assert_eq!(err(&route("*.::1", "/a")).key, "routes.host");
    let two = format!("{}{}", route("a.example.com", "/ws"), route("A.example.com", "/ws"));
    let e = err(&two);
    assert_eq!((e.key.as_str(), e.line), ("routes.path", Some(9)), "{e}");
    assert!(e.message.contains("same host"), "{e}");
    // Exact and wildcard, host and no host, or other paths do not conflict.
    let fine = format!(
        "{}{}{}",
        route("a.example.com", "/ws"),
        route("*.example.com", "/ws"),
        route("a.example.com", "/other")
    );
    Config::from_toml_str(&format!("{fine}{}", MINIMAL.replace("/echo", "/ws")), "t.toml").unwrap();
    for bad in ["a.b:443", "a.b.", "*.b", "a.*.b", "**.b.c", "ä.example", "a b", "*"] {
        let e = err(&route(bad, "/ws"));
        assert_eq!((e.key.as_str(), e.line), ("routes.host", Some(3)), "{bad}: {e}");
    }
}

#[test]
fn watch_config_is_off_by_default_and_watches_every_file_a_reload_reads() {
    let c = Config::from_toml_str(MINIMAL, "t.toml").unwrap();
    assert!(!c.server.watch_config);
    let src = r#"
[server]
watch_config = true
[tls]
cert = "/cm/tls.crt"
key = "/cm/tls.key"
client_ca = "/cm/clients.pem"
client_crl_files = ["/cm/a.crl"]
[admin]
token_file = "/cm/admin.token"
[firewall]
deny_files = ["/cm/deny.txt"]
allow_files = ["/cm/allow.txt"]
[jwt]
secret_file = "/cm/jwt.secret"
revoked_jti_file = "/cm/revoked.txt"
[log]
file = "/var/log/wsgate/wsgate.log"
[[routes]]
name = "echo"
path = "/echo"
upstreams = ["builtin:echo"]
[routes.validate]
schema_file = "/cm/schema.json"
"#;
    let c = Config::from_toml_str(src, "t.toml").unwrap();
    assert!(c.server.watch_config);
    let files: Vec<String> = c.watched_files().iter().map(|p| p.display().to_string()).collect();
    for f in [
        "/cm/tls.crt",
        "/cm/tls.key",
        "/cm/clients.pem",
        "/cm/a.crl",
        "/cm/admin.token",
        "/cm/deny.txt",
        "/cm/allow.txt",
        "/cm/jwt.secret",
        "/cm/revoked.txt",
        "/cm/schema.json",
    ] {
        assert!(files.contains(&f.to_string()), "{f} not watched: {files:?}");
    }
    // Read only at start: a change there needs a restart, so it triggers no reload.
    assert!(!files.iter().any(|f| f.contains("wsgate.log")), "{files:?}");
}

#[test]
fn several_certificates_exclude_the_one_certificate_form_and_sit_beside_acme() {
    let certs = "[[tls.certificates]]\ncert = \"a.crt\"\nkey = \"a.key\"\n[[tls.certificates]]\ncert = \"b.crt\"\nkey = \"b.key\"\n";
    let c = Config::from_toml_str(&format!("{certs}{MINIMAL}"), "t.toml").unwrap();
    assert_eq!(c.tls.certificates.len(), 2);
    assert_eq!(c.tls.certificates[1].key.line, Some(6));
    let c = Config::from_toml_str(&format!("[tls.acme]\ndomains = [\"x.example.com\"]\n{certs}{MINIMAL}"), "t.toml").unwrap();
    assert!(c.tls.acme.is_some() && c.tls.certificates.len() == 2);
    let e = err(&format!("[tls]\ncert = \"c.crt\"\n{certs}"));
    assert_eq!((e.key.as_str(), e.line), ("tls.cert", Some(2)), "{e}");
    let e = err(&format!("[tls]\nself_signed_if_missing = true\n{certs}"));
    assert_eq!(e.key, "tls.self_signed_if_missing", "{e}");
    let e = err("[[tls.certificates]]\ncert = \"a.crt\"\n");
    assert!(e.message.contains("key"), "{e}");
}

#[test]
fn watch_config_watches_several_certificates_and_every_providers_files() {
    let src = r#"
[server]
watch_config = true
[[tls.certificates]]
cert = "/cm/a.crt"
key = "/cm/a.key"
[[tls.certificates]]
cert = "/cm/b.crt"
key = "/cm/b.key"
[providers.p]
kind = "jwt"
issuer = "p"
secret_file = "/cm/p.secret"
revoked_jti_file = "/cm/p.revoked"
[providers.q]
kind = "jwt"
issuer = "q"
algorithms = ["ES256"]
public_key_files = ["/cm/q.pem"]
[[routes]]
name = "echo"
path = "/echo"
upstreams = ["builtin:echo"]
provider = "p"
"#;
    let c = Config::from_toml_str(src, "t.toml").unwrap();
    let files: Vec<String> = c.watched_files().iter().map(|p| p.display().to_string()).collect();
    for f in [
        "/cm/a.crt",
        "/cm/a.key",
        "/cm/b.crt",
        "/cm/b.key",
        "/cm/p.secret",
        "/cm/p.revoked",
        "/cm/q.pem",
    ] {
        assert!(files.contains(&f.to_string()), "{f} not watched: {files:?}");
    }
}

#[test]
fn a_provider_with_hs_algorithms_needs_its_own_secret() {
    let src = "[providers.b]\nkind = \"jwt\"\njwks_file = \"kb.jwks\"\nalgorithms = [\"ES256\", \"HS256\"]\n";
    let e = err(src);
    assert_eq!(e.key, "providers.b.algorithms", "{e}");
    assert!(e.message.contains("own secret"), "{e}");
    Config::from_toml_str(&src.replace("jwks_file", "secret_file = \"b.secret\"\njwks_file"), "t.toml").unwrap();
}

#[test]
fn refresh_needs_a_jwt_route_with_first_message() {
    let route = |auth: &str| {
        format!("[[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"builtin:echo\"]\nauth = \"{auth}\"\nrefresh = true\n")
    };
    // The default token sources have no first_message.
    let e = err(&route("jwt"));
    assert_eq!((e.key.as_str(), e.line), ("routes.refresh", Some(6)), "{e}");
    assert!(e.message.contains("first_message") && e.message.contains("[jwt]"), "{e}");
    let fm = "[jwt]\ntoken_sources = [\"authorization\", \"first_message\"]\n";
    let e = err(&format!("{fm}{}", route("none")));
    assert_eq!((e.key.as_str(), e.line), ("routes.refresh", Some(8)), "{e}");
    let c = Config::from_toml_str(&format!("{fm}{}", route("jwt")), "t.toml").unwrap();
    assert!(c.routes[0].refresh);
    // A provider's own token sources count, not [jwt]'s.
    let provider = "[providers.p]\nkind = \"jwt\"\nissuer = \"p\"\nsecret_env = \"X\"\ntoken_sources = [\"authorization\"]\n";
    let e = err(&format!(
        "{fm}{provider}{}",
        route("jwt").replace("auth =", "provider = \"p\"\nauth =")
    ));
    assert_eq!(e.key, "routes.refresh", "{e}");
    assert!(e.message.contains("[providers.p]"), "{e}");
    // Off is fine anywhere.
    let c = Config::from_toml_str(&route("none").replace("true", "false"), "t.toml").unwrap();
    assert!(!c.routes[0].refresh);
}

#[test]
fn discovery_errors_name_the_key_and_line() {
    let route = "\n[[routes]]\nname = \"p\"\npath = \"/p\"\nupstreams = [\"builtin:echo\"]\nprovider = \"p\"\n";
    let ok = format!(
        "[providers.p]\nkind = \"jwt\"\nissuer = \"https://idp.example/realm/\"\ndiscovery = true\nalgorithms = [\"RS256\"]\nca_file = \"ca.pem\"\n{route}"
    );
    let c = Config::from_toml_str(&ok, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    let u = c.providers["p"].jwks_url.as_ref().unwrap();
    assert_eq!(u.url.to_string(), "https://idp.example/realm/.well-known/openid-configuration");
    assert_eq!(
        u.discovery.as_ref().map(|d| (d.value.as_str(), d.line)),
        Some(("https://idp.example/realm/", Some(3)))
    );
    assert_eq!(u.ca.as_ref().map(|c| c.key.as_str()), Some("providers.p.ca_file"));

    let cases = [
        ("kind = \"jwt\"\ndiscovery = true\n", "providers.p.discovery", 3),
        (
            "kind = \"jwt\"\nissuer = \"http://idp.example\"\ndiscovery = true\n",
            "providers.p.issuer",
            3,
        ),
        (
            "kind = \"jwt\"\nissuer = \"https://idp.example?x=1\"\ndiscovery = true\n",
            "providers.p.issuer",
            3,
        ),
        (
            "kind = \"jwt\"\nissuer = \"https://idp.example\"\ndiscovery = true\njwks_url = \"https://idp.example/k\"\n",
            "providers.p.jwks_url",
            5,
        ),
        (
            "kind = \"jwt\"\njwks_url = \"https://idp.example/k\"\nca_file = \"ca.pem\"\n",
            "providers.p.ca_file",
            4,
        ),
    ];
    for (keys, key, line) in cases {
        let e = err(&format!("[providers.p]\n{keys}algorithms = [\"RS256\"]\n{route}"));
        assert_eq!((e.key.as_str(), e.line), (key, Some(line)), "{keys}: {e}");
    }
}

#[test]
fn introspection_providers_validate_and_errors_name_the_key_and_line() {
    let route = "\n[[routes]]\nname = \"o\"\npath = \"/o\"\nupstreams = [\"builtin:echo\"]\nauth = \"introspection\"\nprovider = \"o\"\n";
    let head = "[providers.o]\nkind = \"introspection\"\n";
    let good = "url = \"https://idp.example/introspect\"\nclient_id = \"wsgate\"\nclient_secret_file = \"s\"\n";
    let c = Config::from_toml_str(&format!("{head}{good}cache = \"60s\"\nrecheck = \"5m\"\n{route}"), "t.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    let i = &c.introspection_providers["o"];
    assert_eq!((i.cache, i.recheck), (Duration::from_secs(60), Some(Duration::from_secs(300))));
    assert!(!i.token_sources.contains(&TokenSource::FirstMessage) && !i.token_sources.is_empty());
    assert_eq!(c.token_sources_of(&c.routes[0]), i.token_sources.as_slice());
    assert!(c.watched_files().iter().any(|p| p.ends_with("s")), "the secret file is watched");

    let cases = [
        (
            "url = \"http://idp.example/i\"\nclient_id = \"w\"\nclient_secret_file = \"s\"\n",
            "providers.o.url",
            3,
        ),
        (
            "url = \"https://u:p@idp.example/i\"\nclient_id = \"w\"\nclient_secret_file = \"s\"\n",
            "providers.o.url",
            3,
        ),
        (
            "url = \"https://idp.example/i\"\nclient_secret_file = \"s\"\n",
            "providers.o.client_id",
            1,
        ),
        (
            "url = \"https://idp.example/i\"\nclient_id = \"w\"\n",
            "providers.o.client_secret_file",
            1,
        ),
        (
            "url = \"https://idp.example/i\"\nclient_id = \"w\"\nclient_secret_file = \"s\"\nclient_secret_env = \"S\"\n",
            "providers.o.client_secret_env",
            6,
        ),
        (
            "url = \"https://idp.example/i\"\nclient_id = \"w\"\nclient_secret_env = \"hunter2 secret\"\n",
            "providers.o.client_secret_env",
            5,
        ),
        (
            "url = \"https://idp.example/i\"\nclient_id = \"w\"\nclient_secret_file = \"s\"\ntimeout = \"2m\"\n",
            "providers.o.timeout",
            6,
        ),
        (
            "url = \"https://idp.example/i\"\nclient_id = \"w\"\nclient_secret_file = \"s\"\nrecheck = \"0s\"\n",
            "providers.o.recheck",
            6,
        ),
        (
            "url = \"https://idp.example/i\"\nclient_id = \"w\"\nclient_secret_file = \"s\"\nidentity_header = \"x\"\n",
            "providers.o.identity_header",
            6,
        ),
        (
            "url = \"https://idp.example/i\"\nclient_id = \"w\"\nclient_secret_file = \"s\"\njwks_file = \"k\"\n",
            "providers.o.kind",
            1,
        ),
        (
            "url = \"https://idp.example/i\"\nclient_id = \"w\"\nclient_secret_file = \"s\"\ntoken_sources = [\"first_message\"]\n",
            "providers.o.token_sources",
            6,
        ),
    ];
    for (keys, key, line) in cases {
        let e = err(&format!("{head}{keys}{route}"));
        assert_eq!((e.key.as_str(), e.line), (key, Some(line)), "{keys}: {e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
    // A route and its provider must agree on the kind.
    let e = err(&format!(
        "{head}{good}{}",
        route.replace("auth = \"introspection\"", "auth = \"jwt\"")
    ));
    assert_eq!(e.key, "routes.provider", "{e}");
    let e = err(&format!(
        "[providers.o]\nkind = \"jwt\"\nsecret_file = \"s\"\nclient_id = \"w\"\n{route}"
    ));
    assert_eq!((e.key.as_str(), e.line), ("providers.o.client_id", Some(4)), "{e}");
}

#[test]
fn forward_pass_headers_never_name_a_forwarding_header_in_any_spelling() {
    for name in [
        "x_forwarded_for",
        "X-Forwarded-Host",
        "x-real-ip",
        "forwarded",
        "x.original.method",
        "HOST",
    ] {
        let text = format!(
            "[providers.app]\nkind = \"forward\"\nurl = \"http://127.0.0.1:9/auth\"\nidentity_header = \"x-user\"\npass_headers = [\"cookie\", \"{name}\"]\n"
        );
        let e = err(&text);
        assert_eq!((e.key.as_str(), e.line), ("providers.app.pass_headers", Some(5)), "{name}: {e}");
    }
}

#[test]
fn forward_claims_on_a_forward_route_are_refused_but_certificate_ones() {
    let text = |claims: &str| {
        format!(
            "[providers.app]\nkind = \"forward\"\nurl = \"http://127.0.0.1:9/auth\"\nidentity_header = \"x-user\"\n\n\
             [[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"builtin:echo\"]\nauth = \"forward\"\nprovider = \"app\"\n\
             forward_claims = {{ {claims} }}\n"
        )
    };
    let e = err(&text(r#"sub = "x-sub""#));
    assert_eq!((e.key.as_str(), e.line), ("routes.forward_claims", Some(12)), "{e}");
    assert!(e.message.contains("copy_headers"), "{e}");
    // A certificate's fields are no claims of the answer: refused only for want of a client CA.
    let e = err(&text(r#""cert:fingerprint" = "x-cert""#));
    assert_eq!(e.key, "tls.client_ca", "{e}");
    Config::from_toml_str(&text(""), "t.toml").unwrap_or_else(|e| panic!("{e}"));
}
