//! Message validation per route (`[routes.validate]`, DESIGN.md section 11), end to end:
//! a real gateway over TLS, tokio-tungstenite clients, a test upstream that logs what
//! reaches it. An invalid message never reaches the upstream; the client gets a close
//! code or, in reply mode, an error message, and the socket stays.

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    },
};

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["type", "text"],
  "additionalProperties": false,
  "properties": {
    "type": {"enum": ["chat", "join"]},
    "text": {"type": "string", "maxLength": 20},
    "to": {"type": "string", "pattern": "^[a-z]+$"},
    "n": {"type": "integer", "minimum": 0}
  }
}"#;

/// A gateway with one route `/v` (no auth) to a logging echo upstream, validated by
/// `validate` (the body of `[routes.validate]`; `{schema}` is replaced by the path of
/// a file holding `schema`).
struct Setup {
    gw: Gw,
    up: Upstream,
    schema_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup(limits: &str, validate: &str, schema: &str) -> Setup {
    let up = upstream(Behaviour::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let schema_path = dir.path().join("chat.schema.json");
    std::fs::write(&schema_path, schema).unwrap();
    let validate = validate.replace("{schema}", &schema_path.display().to_string());
    let rest = format!("{limits}\n{}\n[routes.validate]\n{validate}\n", route("v", "/v", &up.url(), "none"));
    let gw = Gw::start("", &rest).await;
    Setup {
        gw,
        up,
        schema_path,
        _dir: dir,
    }
}

impl Setup {
    /// The text messages the upstream received, in order.
    fn upstream_texts(&self) -> Vec<String> {
        self.up.texts()
    }

    async fn rejected(&self, reason: &str) -> f64 {
        self.gw
            .metric(&format!(r#"wsgate_messages_rejected_total{{route="v",reason="{reason}"}}"#))
            .await
    }
}

/// The next text message (pings and pongs skipped).
async fn next_text(ws: &mut wsgate::client::ClientStream) -> String {
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.expect("no message in time") {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn each_keyword_refuses_with_its_close_code_and_nothing_reaches_the_upstream() {
    let s = setup("", "schema_file = \"{schema}\"", SCHEMA).await;
    let valid = r#"{"type":"chat","text":"hi","to":"bob","n":3}"#;
    let mut ws = s.gw.connect("/v").await;
    assert_eq!(roundtrip(&mut ws, valid).await, valid);
    let cases: &[(&str, u16, &str)] = &[
        ("not json", 1007, "not_json"),
        (r#"{"type":"chat","text":"hi""#, 1007, "not_json"),
        (r#"{"type":"chat","text":"hi","type":"join"}"#, 1007, "not_json"),
        (r#"{"type":"chat","text":1e999999}"#, 1007, "not_json"),
        (r#"{"type":"chat"}"#, 1008, "schema"),
        (r#"{"type":"shout","text":"hi"}"#, 1008, "schema"),
        (r#"{"type":"chat","text":5}"#, 1008, "schema"),
        (r#"{"type":"chat","text":"this text is far too long"}"#, 1008, "schema"),
        (r#"{"type":"chat","text":"hi","extra":1}"#, 1008, "schema"),
        (r#"{"type":"chat","text":"hi","to":"Bob1"}"#, 1008, "schema"),
        (r#"{"type":"chat","text":"hi","n":-1}"#, 1008, "schema"),
        (r#"{"type":"chat","text":"hi","n":1.5}"#, 1008, "schema"),
        (r#"["chat","hi"]"#, 1008, "schema"),
    ];
    for (msg, code, _) in cases {
        let mut ws = s.gw.connect("/v").await;
        ws.send(Message::text(*msg)).await.unwrap();
        assert_eq!(close_code(&mut ws).await.0, *code, "{msg}");
    }
    let not_json = cases.iter().filter(|c| c.2 == "not_json").count() as f64;
    s.gw.wait_metric(r#"wsgate_messages_rejected_total{route="v",reason="not_json"}"#, not_json)
        .await;
    let schema = cases.iter().filter(|c| c.2 == "schema").count() as f64;
    s.gw.wait_metric(r#"wsgate_messages_rejected_total{route="v",reason="schema"}"#, schema)
        .await;
    assert_eq!(s.rejected("too_deep").await, 0.0);
    // The refusals are the gateway's closes, not errors of the client's protocol. (A
    // session's close is counted when it ends, just after the client reads its code.)
    s.gw.wait_metric(r#"wsgate_closes_total{route="v",code="1008",initiator="gateway"}"#, schema)
        .await;
    // Still open: the first session echoes, and the upstream saw valid messages only.
    assert_eq!(roundtrip(&mut ws, valid).await, valid);
    assert_eq!(s.upstream_texts(), vec![valid.to_string(), valid.to_string()]);
}

#[tokio::test]
async fn nesting_depth_8_passes_and_9_is_refused() {
    let s = setup("", "max_depth = 8", "{}").await;
    let mut ws = s.gw.connect("/v").await;
    let eight = format!("{}1{}", "[".repeat(8), "]".repeat(8));
    assert_eq!(roundtrip(&mut ws, &eight).await, eight);
    let mixed = r#"{"a":[{"b":[{"c":[{"d":[1]}]}]}]}"#; // 8 deep, objects and arrays
    assert_eq!(roundtrip(&mut ws, mixed).await, mixed);
    // Brackets inside strings (and escaped quotes) do not count.
    let stringy = r#"["[[[[[[[[[[[[\"{{{{{{{{{{"]"#;
    assert_eq!(roundtrip(&mut ws, stringy).await, stringy);
    for nine in [
        format!("{}1{}", "[".repeat(9), "]".repeat(9)),
        r#"{"a":[{"b":[{"c":[{"d":[[1]]}]}]}]}"#.to_string(),
    ] {
        let mut ws = s.gw.connect("/v").await;
        ws.send(Message::text(nine.clone())).await.unwrap();
        assert_eq!(close_code(&mut ws).await.0, 1008, "{nine}");
    }
    s.gw.wait_metric(r#"wsgate_messages_rejected_total{route="v",reason="too_deep"}"#, 2.0)
        .await;
    assert_eq!(s.upstream_texts(), vec![eight, mixed.to_string(), stringy.to_string()]);
}

#[tokio::test]
async fn fragmented_messages_are_assembled_and_checked_whole() {
    let s = setup("", "schema_file = \"{schema}\"", SCHEMA).await;
    let mut ws = s.gw.connect("/v").await;
    // Three fragments with a ping between them (RFC 6455 5.4): one valid message.
    let parts = [r#"{"type":"#, r#""chat","text""#, r#":"hi"}"#];
    ws.send(Message::Frame(Frame::message(parts[0], OpCode::Data(Data::Text), false)))
        .await
        .unwrap();
    ws.send(Message::Ping("between".into())).await.unwrap();
    ws.send(Message::Frame(Frame::message(parts[1], OpCode::Data(Data::Continue), false)))
        .await
        .unwrap();
    ws.send(Message::Frame(Frame::message(parts[2], OpCode::Data(Data::Continue), true)))
        .await
        .unwrap();
    let whole = parts.concat();
    assert_eq!(next_text(&mut ws).await, whole);
    // Each fragment is JSON-looking on its own; together they fail the schema.
    let mut bad = s.gw.connect("/v").await;
    for (i, part) in [r#"{"type":"chat","#, r#""text":"#, "42}"].iter().enumerate() {
        let op = if i == 0 { Data::Text } else { Data::Continue };
        bad.send(Message::Frame(Frame::message(*part, OpCode::Data(op), i == 2)))
            .await
            .unwrap();
    }
    assert_eq!(close_code(&mut bad).await.0, 1008);
    // A multi-byte character split across fragments is reassembled, not refused.
    let euro = r#"{"type":"chat","text":"5 €"}"#;
    let cut = euro.find('€').unwrap() + 1; // inside the character's three bytes
    let mut raw = s.gw.connect("/v").await;
    raw.send(Message::Frame(Frame::message(
        &euro.as_bytes()[..cut],
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    raw.send(Message::Frame(Frame::message(
        &euro.as_bytes()[cut..],
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(next_text(&mut raw).await, euro);
    assert_eq!(s.upstream_texts(), vec![whole, euro.to_string()]);
    // Every frame went to the upstream as one message: the upstream saw no fragments.
    assert_eq!(
        s.gw.metric(r#"wsgate_messages_total{route="v",direction="client_to_upstream"}"#)
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_nesting_bomb_is_refused_within_a_second_while_other_sessions_echo() {
    let s = setup("[limits]\nmax_message_size = \"2MiB\"\n", "json = true", "{}").await;
    let mut other = s.gw.connect("/v").await;
    for bomb in ["[".repeat(1 << 20), "{\"a\":".repeat((1 << 20) / 5)] {
        let mut ws = s.gw.connect("/v").await;
        let started = Instant::now();
        let send = ws.send(Message::text(bomb));
        let (sent, ()) = tokio::join!(send, async {
            // The other session keeps echoing while the bomb is read and refused.
            for i in 0..20 {
                let m = format!("[{i}]");
                assert_eq!(roundtrip(&mut other, &m).await, m);
            }
        });
        let _ = sent; // the gateway may close before the last byte is written
        assert_eq!(close_code(&mut ws).await.0, 1008);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "the bomb took {took:?} to refuse");
    }
    s.gw.wait_metric(r#"wsgate_messages_rejected_total{route="v",reason="too_deep"}"#, 2.0)
        .await;
    assert_eq!(roundtrip(&mut other, "[\"still here\"]").await, "[\"still here\"]");
    assert_eq!(s.upstream_texts().len(), 41);
}

#[tokio::test]
async fn binary_messages_are_refused_with_1003_or_allowed() {
    let refused = setup("", "json = true", "{}").await;
    let mut ws = refused.gw.connect("/v").await;
    assert_eq!(roundtrip(&mut ws, "{}").await, "{}");
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(close_code(&mut ws).await.0, 1003);
    refused
        .gw
        .wait_metric(r#"wsgate_messages_rejected_total{route="v",reason="binary"}"#, 1.0)
        .await;
    assert!(refused.up.log.lock().unwrap().messages.iter().all(|m| !m.is_binary()));

    let allowed = setup("", "binary = true", "{}").await;
    let mut ws = allowed.gw.connect("/v").await;
    ws.send(Message::binary(vec![9u8; 3000])).await.unwrap();
    match tokio::time::timeout(TIMEOUT, ws.next()).await.unwrap() {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &[9u8; 3000][..]),
        other => panic!("{other:?}"),
    }
    // Text is still checked on that route.
    ws.send(Message::text("nope")).await.unwrap();
    assert_eq!(close_code(&mut ws).await.0, 1007);
}

#[tokio::test]
async fn reply_mode_answers_without_the_value_and_keeps_the_socket() {
    let s = setup("", "schema_file = \"{schema}\"\non_invalid = \"reply\"", SCHEMA).await;
    let mut ws = s.gw.connect("/v").await;
    let secret = "SECRET-VALUE-0123456789";
    ws.send(Message::text(format!(r#"{{"type":"chat","text":"{secret}"}}"#)))
        .await
        .unwrap();
    let reply = next_text(&mut ws).await;
    assert!(!reply.contains(secret), "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["error"], "invalid_message");
    assert_eq!(v["pointer"], "/text");
    assert_eq!(v["keyword"], "maxLength");
    assert!(v["detail"].as_str().unwrap().contains("maxLength"), "{reply}");
    // Not JSON: the reply names the position, not the text.
    ws.send(Message::text("{\"type\": SECRET}")).await.unwrap();
    let reply = next_text(&mut ws).await;
    assert!(!reply.contains("SECRET"), "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(
        (v["error"].as_str(), v["reason"].as_str()),
        (Some("invalid_message"), Some("not_json"))
    );
    // A binary message gets its reply too.
    ws.send(Message::binary(vec![0u8; 10])).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(v["reason"], "binary");
    // Many invalid messages sent before reading any reply: each is answered, in order,
    // then a valid one still goes through.
    const N: usize = 100;
    for i in 0..N {
        ws.feed(Message::text(format!("bad {i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    for _ in 0..N {
        let v: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
        assert_eq!(v["reason"], "not_json");
    }
    let valid = r#"{"type":"join","text":""}"#;
    assert_eq!(roundtrip(&mut ws, valid).await, valid);
    assert_eq!(s.upstream_texts(), vec![valid.to_string()]);
    s.gw.wait_metric(r#"wsgate_messages_rejected_total{route="v",reason="not_json"}"#, (N + 1) as f64)
        .await;
    assert_eq!(s.rejected("schema").await, 1.0);
    assert_eq!(s.rejected("binary").await, 1.0);
}

#[tokio::test]
async fn a_reload_reads_the_schema_again_and_a_bad_schema_changes_nothing() {
    let s = setup("", "schema_file = \"{schema}\"", SCHEMA).await;
    let eleven = r#"{"type":"chat","text":"hello world"}"#;
    let mut before = s.gw.connect("/v").await;
    assert_eq!(roundtrip(&mut before, eleven).await, eleven);
    // Tighter schema: new connections get it.
    std::fs::write(&s.schema_path, SCHEMA.replace("\"maxLength\": 20", "\"maxLength\": 5")).unwrap();
    s.gw.reload_config(s.gw.config.clone()).await.unwrap();
    let mut after = s.gw.connect("/v").await;
    after.send(Message::text(eleven)).await.unwrap();
    assert_eq!(close_code(&mut after).await.0, 1008);
    // A session keeps the schema it started with.
    assert_eq!(roundtrip(&mut before, eleven).await, eleven);
    // An invalid schema is a config error naming the key and the file; the last good
    // schema stays in force.
    std::fs::write(&s.schema_path, r#"{"type": 12}"#).unwrap();
    let e = s.gw.reload_config(s.gw.config.clone()).await.unwrap_err();
    assert_eq!(e.key, "routes.validate.schema_file");
    assert!(e.to_string().contains("chat.schema.json"), "{e}");
    std::fs::write(&s.schema_path, "not json").unwrap();
    let e = s.gw.reload_config(s.gw.config.clone()).await.unwrap_err();
    assert!(e.to_string().contains("not JSON"), "{e}");
    let mut still = s.gw.connect("/v").await;
    still.send(Message::text(eleven)).await.unwrap();
    assert_eq!(close_code(&mut still).await.0, 1008);
    let mut ok = s.gw.connect("/v").await;
    let short = r#"{"type":"chat","text":"hi"}"#;
    assert_eq!(roundtrip(&mut ok, short).await, short);
}

#[tokio::test]
async fn check_reports_a_bad_schema_with_its_key() {
    let s = setup("", "schema_file = \"{schema}\"", SCHEMA).await;
    let text = config_text(
        s.gw.dir.path(),
        "",
        &format!(
            "{}\n[routes.validate]\nschema_file = \"{}\"\n",
            route("v", "/v", &s.up.url(), "none"),
            s.schema_path.display()
        ),
    );
    let cfg = s.gw.dir.path().join("check.toml");
    std::fs::write(&cfg, &text).unwrap();
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    assert!(check().status.success(), "{}", String::from_utf8_lossy(&check().stderr));
    std::fs::write(&s.schema_path, r#"{"type": "objekt"}"#).unwrap();
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("routes.validate.schema_file") && err.contains("chat.schema.json"),
        "{err}"
    );
    std::fs::remove_file(&s.schema_path).unwrap();
    let out = check();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chat.schema.json"));
}

#[tokio::test]
async fn validated_and_streamed_messages_keep_their_order_in_one_read() {
    let s = setup("", "binary = true", "{}").await;
    let mut ws = s.gw.connect("/v").await;
    let mut sent = Vec::new();
    for i in 0..50u8 {
        let m = if i % 3 == 0 {
            Message::binary(vec![i; 1 + usize::from(i)])
        } else {
            Message::text(format!("{{\"i\":{i}}}"))
        };
        sent.push(m.clone());
        ws.feed(m).await.unwrap();
        if i % 7 == 0 {
            ws.feed(Message::Ping(vec![i].into())).await.unwrap();
        }
    }
    ws.flush().await.unwrap();
    let mut got = Vec::new();
    while got.len() < sent.len() {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.expect("echo stalled") {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => got.push(m),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, sent);
    let up: Vec<Message> =
        s.up.log
            .lock()
            .unwrap()
            .messages
            .iter()
            .filter(|m| m.is_text() || m.is_binary())
            .cloned()
            .collect();
    assert_eq!(up, sent);
}

#[tokio::test]
async fn pings_do_not_keep_a_half_assembled_message_alive_past_the_idle_timeout() {
    let up = upstream(Behaviour::Echo).await;
    let rest = format!("{}\n[routes.validate]\njson = true\n", route("v", "/v", &up.url(), "none"));
    let gw = Gw::start("idle_timeout = \"1s\"", &rest).await;
    let mut ws = gw.connect("/v").await;
    ws.send(Message::Frame(Frame::message(
        vec![b'['; 64 * 1024],
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    let started = Instant::now();
    let mut ping = tokio::time::interval(Duration::from_millis(200));
    let code = loop {
        tokio::select! {
            _ = ping.tick() => {
                if ws.send(Message::Ping(vec![1].into())).await.is_err() {
                    break close_code(&mut ws).await.0;
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Close(f))) => break f.map_or(1005, |f| u16::from(f.code)),
                Some(Ok(_)) => {}
                _ => break 1006,
            },
        }
        assert!(started.elapsed() < Duration::from_secs(8), "still open with pings alone");
    };
    assert_eq!(code, 1001);
    // On the same route a whole message resets the timer as always.
    let mut ws = gw.connect("/v").await;
    for i in 0..6 {
        assert_eq!(roundtrip(&mut ws, &format!("[{i}]")).await, format!("[{i}]"));
        tokio::time::sleep(Duration::from_millis(300)).await; // kept: the pace is the test
    }
}

/// Send the first fragment of a text message, then a ping; once its pong is back, the
/// gateway has taken in the whole fragment.
async fn send_half(ws: &mut wsgate::client::ClientStream, head: &str) {
    ws.send(Message::Frame(Frame::message(head.to_string(), OpCode::Data(Data::Text), false)))
        .await
        .unwrap();
    ws.send(Message::Ping(b"sync".to_vec().into())).await.unwrap();
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.expect("no pong") {
            Some(Ok(Message::Pong(p))) if &p[..] == b"sync" => return,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn half_sent_messages_share_a_gateway_wide_budget_and_the_overflow_gets_1013() {
    // Room for two half-sent 64 KiB messages, not three. (All from one address: its
    // share is the whole budget here, so what is tested is the gateway-wide bound.)
    let limits = "[limits]\nmax_message_size = \"64KiB\"\nmax_assembly_memory = \"128KiB\"\nmax_assembly_memory_per_client = \"128KiB\"\n";
    let s = setup(limits, "json = true", "{}").await;
    let head = format!("[\"{}", "a".repeat(60 * 1024));
    let mut first = s.gw.connect("/v").await;
    send_half(&mut first, &head).await;
    let mut second = s.gw.connect("/v").await;
    send_half(&mut second, &head).await;
    let mut third = s.gw.connect("/v").await;
    let _ = third
        .send(Message::Frame(Frame::message(head.clone(), OpCode::Data(Data::Text), false)))
        .await;
    assert_eq!(close_code(&mut third).await, (1013, "gateway busy, try again later".into()));
    s.gw.wait_metric(r#"wsgate_closes_total{route="v",code="1013",initiator="gateway"}"#, 1.0)
        .await;
    // The first completes its message: it is relayed, and its room is given back.
    first
        .send(Message::Frame(Frame::message("\"]", OpCode::Data(Data::Continue), true)))
        .await
        .unwrap();
    assert_eq!(next_text(&mut first).await.len(), head.len() + 2);
    let mut fourth = s.gw.connect("/v").await;
    send_half(&mut fourth, &head).await;
    fourth
        .send(Message::Frame(Frame::message("\"]", OpCode::Data(Data::Continue), true)))
        .await
        .unwrap();
    assert_eq!(next_text(&mut fourth).await.len(), head.len() + 2);
    // A session that ends mid-message gives its room back too: once it is gone, two
    // half-sent messages fit again.
    drop(second);
    wait_until("the second session ended", TIMEOUT, || async {
        s.gw.metric(r#"wsgate_connections_active{route="v"}"#).await == 2.0
    })
    .await;
    let mut fifth = s.gw.connect("/v").await;
    send_half(&mut fifth, &head).await;
    let mut sixth = s.gw.connect("/v").await;
    send_half(&mut sixth, &head).await;
    let mut seventh = s.gw.connect("/v").await;
    let _ = seventh
        .send(Message::Frame(Frame::message(head.clone(), OpCode::Data(Data::Text), false)))
        .await;
    assert_eq!(close_code(&mut seventh).await.0, 1013);
}

/// Connect to `/v` from the loopback address `src`.
async fn connect_from(gw: &Gw, src: &str) -> wsgate::client::ClientStream {
    let mut o = gw.options(None);
    o.source = Some(src.parse().unwrap());
    gw.try_connect("/v", &o).await.unwrap_or_else(|s| panic!("refused with {s}")).0
}

/// Issue 28, item 1: one address with several sockets, each holding the start of a large
/// message it never finishes, holds at most its share of the budget; its own sockets past
/// the share get 1013, and another client's message still goes through.
#[tokio::test]
async fn one_client_holds_only_its_share_of_the_assembly_budget() {
    // Budget for four half-sent 64 KiB messages; a client's default share is a quarter: one.
    let limits = "[limits]\nmax_message_size = \"64KiB\"\nmax_assembly_memory = \"256KiB\"\n";
    let s = setup(limits, "json = true", "{}").await;
    let head = format!("[\"{}", "a".repeat(60 * 1024));
    let mut first = connect_from(&s.gw, "127.0.0.21").await;
    send_half(&mut first, &head).await;
    for _ in 0..3 {
        let mut more = connect_from(&s.gw, "127.0.0.21").await;
        let _ = more
            .send(Message::Frame(Frame::message(head.clone(), OpCode::Data(Data::Text), false)))
            .await;
        assert_eq!(close_code(&mut more).await, (1013, "gateway busy, try again later".into()));
    }
    // Another client's 40 KB message fits what the first left.
    let mut other = connect_from(&s.gw, "127.0.0.22").await;
    let msg = format!("[\"{}\"]", "b".repeat(40_000));
    assert_eq!(roundtrip(&mut other, &msg).await, msg);
    // And the first client's own message completes within its share.
    first
        .send(Message::Frame(Frame::message("\"]", OpCode::Data(Data::Continue), true)))
        .await
        .unwrap();
    assert_eq!(next_text(&mut first).await.len(), head.len() + 2);
}

/// Issue 28, item 1: a message being assembled must be whole within `assembly_timeout`
/// of its first frame, whether the client stalls or trickles fragments (pings do not
/// help either); the session is closed with 1001 and its room given back.
#[tokio::test]
async fn a_message_not_completed_in_time_is_closed_and_its_room_given_back() {
    let limits = "[limits]\nmax_message_size = \"64KiB\"\nmax_assembly_memory = \"64KiB\"\nassembly_timeout = \"1s\"\n";
    let s = setup(limits, "json = true", "{}").await;
    let head = format!("[\"{}", "a".repeat(60 * 1024));
    // Stalls after the first fragment.
    let mut stalled = s.gw.connect("/v").await;
    send_half(&mut stalled, &head).await;
    let started = Instant::now();
    assert_eq!(
        close_code(&mut stalled).await,
        (1001, "client message not completed in time".into())
    );
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    // The room is back once the session is gone: the budget fits one more half-sent message.
    wait_until("the stalled session ended", TIMEOUT, || async {
        s.gw.metric(r#"wsgate_connections_active{route="v"}"#).await == 0.0
    })
    .await;
    let mut trickle = s.gw.connect("/v").await;
    send_half(&mut trickle, &head).await;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let code = loop {
        tokio::select! {
            _ = tick.tick() => {
                let piece = Frame::message("a", OpCode::Data(Data::Continue), false);
                if trickle.send(Message::Frame(piece)).await.is_err()
                    || trickle.send(Message::Ping(vec![1].into())).await.is_err()
                {
                    break close_code(&mut trickle).await.0;
                }
            }
            m = trickle.next() => match m {
                Some(Ok(Message::Close(f))) => break f.map_or(1005, |f| u16::from(f.code)),
                Some(Ok(_)) => {}
                _ => break 1006,
            },
        }
        assert!(started.elapsed() < Duration::from_secs(8), "a trickled message is still held");
    };
    assert_eq!(code, 1001);
    s.gw.wait_metric(r#"wsgate_closes_total{route="v",code="1001",initiator="gateway"}"#, 2.0)
        .await;
    // A whole message on the same route is relayed as always.
    let mut ws = s.gw.connect("/v").await;
    assert_eq!(roundtrip(&mut ws, "[1]").await, "[1]");
}
