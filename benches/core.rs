//! Costs that must stay flat as work grows (issue: performance, point 4):
//! firewall lookups with 10 vs 100,000 rules, loading a 100,000-line deny file,
//! limiter state for 1,000,000 distinct client IPs, token verification for HS256,
//! RS256 and ES256, and relaying one message through the gateway's relay loop.
//!
//! Run: `cargo bench --bench core` (add `-- --quick` for a short run).

use criterion::{Criterion, criterion_group, criterion_main};
use std::{hint::black_box, net::IpAddr, sync::Arc, time::Duration};
use wsgate::config::FirewallDefault;
use wsgate::firewall::{Firewall, RangeSet};

/// A deterministic pseudo-random sequence (xorshift), so runs compare.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn random_rules(n: usize) -> Vec<ipnet::IpNet> {
    let mut r = rng(0x5eed);
    (0..n)
        .map(|i| {
            let v = r();
            let addr = std::net::Ipv4Addr::from(v as u32);
            let prefix = if i % 2 == 0 { 32 } else { 24 };
            ipnet::IpNet::V4(ipnet::Ipv4Net::new(addr, prefix).unwrap().trunc())
        })
        .collect()
}

fn firewall(c: &mut Criterion) {
    let probes: Vec<IpAddr> = {
        let mut r = rng(42);
        (0..1024).map(|_| IpAddr::from(std::net::Ipv4Addr::from(r() as u32))).collect()
    };
    for n in [10usize, 100_000] {
        let fw = Firewall::new(FirewallDefault::Allow, RangeSet::default(), RangeSet::from_nets(random_rules(n)));
        let mut i = 0;
        c.bench_function(&format!("firewall_lookup_{n}_rules"), |b| {
            b.iter(|| {
                i = (i + 1) % probes.len();
                black_box(fw.allows(black_box(probes[i])))
            })
        });
    }
    let dir = std::env::temp_dir().join(format!("wsgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("deny-100k.txt");
    let text: String = random_rules(100_000).iter().map(|n| format!("{n} # bench\n")).collect();
    std::fs::write(&file, text).unwrap();
    let mut g = c.benchmark_group("firewall_load");
    g.sample_size(10);
    g.bench_function("deny_file_100k_lines", |b| {
        b.iter(|| {
            let nets = wsgate::firewall::read_rule_file(&file).unwrap();
            black_box(RangeSet::from_nets(nets))
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn limiter(c: &mut Criterion) {
    use wsgate::{config::AdmissionLimits, limits::PerIp};
    let settings = AdmissionLimits {
        connection_rate: "20/s".parse().unwrap(),
        connection_burst: 40,
        http_rate: wsgate::config::DEFAULT_HTTP_RATE,
        http_burst: 2,
        max_connections_per_ip: 100,
        ipv6_prefix: 64,
        auth_failures_per_ip: 10,
        auth_failure_window: Duration::from_secs(60),
        auth_ban: Duration::from_secs(600),
    };
    // State size for 1,000,000 distinct clients, before and after pruning.
    let adm = Arc::new(PerIp::new(AdmissionLimits {
        connection_rate: "1000/s".parse().unwrap(),
        connection_burst: 1,
        ..settings.clone()
    }));
    let t0 = std::time::Instant::now();
    let mut refused = 0;
    for i in 0..1_000_000u32 {
        let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i));
        if adm.admit(ip).is_err() {
            refused += 1;
        }
    }
    let during = adm.tracked();
    std::thread::sleep(Duration::from_millis(20));
    adm.prune();
    let after = adm.tracked();
    eprintln!(
        "limiter: 1,000,000 distinct IPs admitted in {:?} ({refused} refused at the {} key cap); tracked keys (rate, per-IP, auth) during: {during:?}, after prune: {after:?}",
        t0.elapsed(),
        wsgate::limits::MAX_TRACKED_KEYS
    );
    let adm = Arc::new(PerIp::new(settings));
    let mut r = rng(7);
    c.bench_function("limiter_admit_distinct_ip", |b| {
        b.iter(|| {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(r() as u32));
            black_box(adm.admit(ip).is_ok())
        })
    });
    adm.prune();
}

fn tokens(c: &mut Criterion) {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let claims = serde_json::json!({"sub": "bench", "exp": 4_000_000_000u64, "iss": "wsgate-bench", "aud": "wsgate"});
    let dir = std::env::temp_dir().join(format!("wsgate-bench-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, alg, kp_alg) in [
        ("RS256", Algorithm::RS256, &rcgen::PKCS_RSA_SHA256),
        ("ES256", Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256),
    ] {
        let kp = rcgen::KeyPair::generate_for(kp_alg).unwrap();
        let pub_path = dir.join(format!("{name}.pem"));
        std::fs::write(&pub_path, kp.public_key_pem()).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(kp.serialize_pem().as_bytes()).unwrap(),
            _ => EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        };
        let token = jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap();
        let cfg = wsgate::Config::from_toml_str(
            &format!(
                "[jwt]\nalgorithms = [\"{name}\"]\npublic_key_files = [\"{}\"]\nissuer = \"wsgate-bench\"\naudience = [\"wsgate\"]\n[[routes]]\nname = \"r\"\npath = \"/r\"\nupstreams = [\"builtin:echo\"]\n",
                pub_path.display()
            ),
            "bench",
        )
        .unwrap();
        let v = wsgate::auth::Verifier::load(&cfg.jwt, "bench", false).unwrap();
        assert!(v.verify_now(&token).is_ok());
        c.bench_function(&format!("verify_{name}"), |b| {
            b.iter(|| black_box(v.verify_now(black_box(&token)).is_ok()))
        });
    }
    let cfg = wsgate::Config::from_toml_str("[jwt]\nissuer = \"wsgate-bench\"\naudience = [\"wsgate\"]\n", "bench").unwrap();
    let secret = wsgate::auth::Secret::from(b"0123456789abcdef0123456789abcdef".to_vec());
    let token = wsgate::auth::mint(&cfg.jwt, &secret, "bench", Duration::from_secs(3600), &[]).unwrap();
    let v = wsgate::auth::Verifier::new(&cfg.jwt, &secret);
    c.bench_function("verify_HS256", |b| b.iter(|| black_box(v.verify_now(black_box(&token)).is_ok())));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A chat schema of the kind the README's example uses.
const CHAT_SCHEMA: &str = r#"{
  "type": "object",
  "required": ["type", "room", "text"],
  "additionalProperties": false,
  "properties": {
    "type": {"enum": ["chat", "join", "leave"]},
    "room": {"type": "string", "pattern": "^[a-z0-9-]{1,32}$"},
    "text": {"type": "string", "maxLength": 500},
    "reply_to": {"type": "integer", "minimum": 0},
    "mentions": {"type": "array", "items": {"type": "string"}, "maxItems": 10}
  }
}"#;

/// A typical 200-byte chat message.
const CHAT_MESSAGE: &str = r#"{"type":"chat","room":"general-42","text":"Hello everyone, the deploy finished at 14:02 and the dashboards look fine; ping me if anything looks off.","reply_to":1234,"mentions":["alice","bob"]}"#;

fn validator(schema: bool) -> wsgate::validation::Validator {
    let v = wsgate::config::Validate {
        json: true,
        binary: false,
        schema_file: None,
        max_depth: wsgate::config::DEFAULT_MAX_DEPTH,
        on_invalid: wsgate::config::OnInvalid::Close,
    };
    let doc: serde_json::Value = serde_json::from_str(CHAT_SCHEMA).unwrap();
    wsgate::validation::Validator::from_schema("bench", &v, schema.then_some(&doc)).unwrap()
}

/// Validating one whole message: depth scan, strict parse, and the schema.
fn validation(c: &mut Criterion) {
    assert!((190..=210).contains(&CHAT_MESSAGE.len()), "{}", CHAT_MESSAGE.len());
    let full = validator(true);
    let json_only = validator(false);
    assert!(full.check(CHAT_MESSAGE.as_bytes()).is_ok());
    c.bench_function("validate_chat_200B_parse_and_schema", |b| {
        b.iter(|| black_box(full.check(black_box(CHAT_MESSAGE.as_bytes()))))
    });
    c.bench_function("validate_chat_200B_parse_only", |b| {
        b.iter(|| black_box(json_only.check(black_box(CHAT_MESSAGE.as_bytes()))))
    });
    let bomb = "[".repeat(1 << 20);
    c.bench_function("validate_nesting_bomb_1MiB", |b| {
        b.iter(|| black_box(full.check(black_box(bomb.as_bytes()))))
    });
}

/// One message client → relay → upstream and back, over in-memory pipes (no TLS, no
/// kernel): the cost of the relay loop itself.
fn relay(c: &mut Criterion) {
    relay_with(c, "relay_roundtrip_64B", None, bytes::Bytes::from(vec![b'x'; 64]), false);
    let json = format!(r#"{{"type":"chat","room":"general","text":"{}"}}"#, "x".repeat(22));
    let validator = Some(std::sync::Arc::new(validator(true)));
    relay_with(c, "relay_roundtrip_64B_json_validated", validator, bytes::Bytes::from(json), true);
}

fn relay_with(
    c: &mut Criterion,
    name: &str,
    validator: Option<std::sync::Arc<wsgate::validation::Validator>>,
    payload: bytes::Bytes,
    text: bool,
) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::{
        WebSocketStream,
        tungstenite::{Message, protocol::Role},
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (mut client, _task) = rt.block_on(async {
        let (client_io, gw_client_io) = tokio::io::duplex(64 * 1024);
        let (gw_up_io, up_io) = tokio::io::duplex(64 * 1024);
        let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let mut gw_client = wsgate::relay::Endpoint::client(gw_client_io, &[]);
        let mut gw_up = wsgate::relay::Endpoint::upstream(gw_up_io, &[]);
        let up = WebSocketStream::from_raw_socket(up_io, Role::Server, None).await;
        tokio::spawn(wsgate::echo::serve(up));
        let task = tokio::spawn(async move {
            let mut settings = wsgate::relay::Settings {
                validator,
                ..wsgate::relay::Settings::unthrottled(1 << 20)
            };
            let metrics = wsgate::metrics::Metrics::new().session("bench");
            let shutdown = tokio_util::sync::CancellationToken::new();
            let mut control = wsgate::relay::Control::new(&shutdown);
            wsgate::relay::run(&mut gw_client, &mut gw_up, &mut settings, &metrics, &mut control).await
        });
        (client, task)
    });
    c.bench_function(name, |b| {
        b.iter(|| {
            rt.block_on(async {
                let m = if text {
                    Message::Text(payload.clone().try_into().unwrap())
                } else {
                    Message::Binary(payload.clone())
                };
                client.send(m).await.unwrap();
                black_box(client.next().await.unwrap().unwrap())
            })
        })
    });
}

criterion_group!(benches, firewall, limiter, tokens, validation, relay);
criterion_main!(benches);
