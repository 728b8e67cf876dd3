use super::*;
use serde_json::json;

fn settings(max_depth: u32) -> Validate {
    Validate {
        json: true,
        binary: false,
        schema_file: None,
        max_depth,
        on_invalid: OnInvalid::Reply,
    }
}

fn chat() -> Validator {
    let schema = json!({
        "type": "object",
        "required": ["type", "text"],
        "properties": {
            "type": {"enum": ["say", "join"]},
            "text": {"type": "string", "maxLength": 16},
            "n": {"type": "integer"}
        },
        "additionalProperties": false
    });
    Validator::from_schema("chat", &settings(8), Some(&schema)).unwrap()
}

fn reason(v: &Validator, text: &str) -> Option<(MessageRejection, String, String)> {
    v.check(text.as_bytes())
        .err()
        .map(|e| (e.reason, e.pointer.clone(), e.keyword.to_string()))
}

#[test]
fn depth_counts_arrays_and_objects_and_skips_strings() {
    assert!(!exceeds_depth(b"1", 0));
    assert!(!exceeds_depth(b"[1]", 1));
    assert!(exceeds_depth(b"[[1]]", 1));
    assert!(!exceeds_depth(br#"{"a":[{"b":1}]}"#, 3));
    assert!(exceeds_depth(br#"{"a":[{"b":1}]}"#, 2));
    // Brackets inside strings, escaped quotes included, do not count.
    assert!(!exceeds_depth(br#"["[[[[{{{{", "\"[[[[", "\\"]"#, 1));
    assert!(exceeds_depth(br#"["\\", [[1]]]"#, 2), "an escaped backslash ends before the quote");
    let bomb = vec![b'['; 1 << 20];
    assert!(exceeds_depth(&bomb, 8));
    let mut deep_in_string = b"[\"".to_vec();
    deep_in_string.extend(vec![b'['; 100_000]);
    deep_in_string.extend(b"\"]");
    assert!(!exceeds_depth(&deep_in_string, 1));
}

#[test]
fn nesting_nine_deep_is_refused_at_eight() {
    let v = Validator::from_schema("r", &settings(8), None).unwrap();
    let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    assert!(v.check(nest(8).as_bytes()).is_ok());
    assert_eq!(v.check(nest(9).as_bytes()).unwrap_err().reason, MessageRejection::TooDeep);
    // Deeper than serde_json's own limit: refused by the pre-scan, not the parser.
    let v = Validator::from_schema("r", &settings(crate::config::MAX_MAX_DEPTH), None).unwrap();
    assert_eq!(v.check(nest(200).as_bytes()).unwrap_err().reason, MessageRejection::TooDeep);
    assert!(v.check(nest(100).as_bytes()).is_ok());
}

#[test]
fn parse_refuses_what_upstreams_could_read_differently() {
    let v = Validator::from_schema("r", &settings(8), None).unwrap();
    for bad in [
        r#"{"role":"user","role":"admin"}"#,
        "1e999999",
        "\u{feff}{}",
        r#""\ud800""#,
        "{\"a\":1",
        "",
        "{} {}",
        "[1,]",
        "NaN",
    ] {
        let e = v.check(bad.as_bytes()).unwrap_err();
        assert_eq!(e.reason, MessageRejection::NotJson, "{bad:?}");
    }
    let dup = v.check(br#"{"a":{"b":1,"b":2}}"#).unwrap_err();
    assert_eq!(dup.keyword, "duplicate_key");
    for good in [r#"{"a":"\u0000"}"#, "123456789012345678901234567890", "-0", r#"[{"a":{}}]"#, " {} "] {
        assert!(v.check(good.as_bytes()).is_ok(), "{good:?}");
    }
}

#[test]
fn schema_failures_name_pointer_and_keyword() {
    let v = chat();
    assert_eq!(reason(&v, r#"{"type":"say","text":"hi"}"#), None);
    let rows = [
        (r#"[]"#, "", "type"),
        (r#"{"type":"say"}"#, "", "required"),
        (r#"{"type":"shout","text":"hi"}"#, "/type", "enum"),
        (r#"{"type":"say","text":"this text is far too long"}"#, "/text", "maxLength"),
        (r#"{"type":"say","text":7}"#, "/text", "type"),
        (r#"{"type":"say","text":"x","n":1.5}"#, "/n", "type"),
        (r#"{"type":"say","text":"x","extra":1}"#, "", "additionalProperties"),
    ];
    for (msg, pointer, keyword) in rows {
        assert_eq!(
            reason(&v, msg),
            Some((MessageRejection::Schema, pointer.to_string(), keyword.to_string())),
            "{msg}"
        );
    }
}

#[test]
fn replies_never_echo_the_message() {
    let v = chat();
    let secret = "SECRET-VALUE-123";
    for msg in [
        format!(r#"{{"type":"say","text":"{secret} and more text"}}"#),
        format!(r#"{{"type":"{secret}","text":"x"}}"#),
        format!(r#"{{"type":"say","text":"x","{secret}":1}}"#),
        format!(r#"{{"{secret}": tru}}"#),
    ] {
        let e = v.check(msg.as_bytes()).unwrap_err();
        let reply = String::from_utf8(e.reply()).unwrap();
        assert!(!reply.contains(secret), "{reply}");
        let parsed: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(parsed["error"], "invalid_message");
        assert!(parsed["detail"].is_string());
    }
}

#[test]
fn remote_refs_are_refused_at_load_not_fetched() {
    for schema in [
        json!({"$ref": "http://127.0.0.1:9/schema.json"}),
        json!({"properties": {"a": {"$ref": "https://example.com/a.json"}}}),
        json!({"$ref": "file:///etc/passwd"}),
    ] {
        let started = std::time::Instant::now();
        assert!(Validator::from_schema("r", &settings(8), Some(&schema)).is_err(), "{schema}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
    // A local $ref works.
    let local = json!({"$defs": {"s": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/s"}}});
    let v = Validator::from_schema("r", &settings(8), Some(&local)).unwrap();
    assert!(v.check(br#"{"a":"x"}"#).is_ok());
    assert_eq!(v.check(br#"{"a":1}"#).unwrap_err().pointer, "/a");
    assert!(Validator::from_schema("r", &settings(8), Some(&json!({"type": 12}))).is_err());
}

#[test]
fn a_huge_string_in_shallow_json_is_checked_in_linear_time() {
    let v = chat();
    let msg = format!(r#"{{"type":"say","text":"{}"}}"#, "x".repeat(1 << 20));
    let started = std::time::Instant::now();
    assert_eq!(v.check(msg.as_bytes()).unwrap_err().keyword, "maxLength");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}

#[test]
fn formats_are_asserted_and_an_unknown_format_is_a_load_error() {
    let schema = json!({"type": "object", "properties": {"email": {"type": "string", "format": "email"}}});
    let v = Validator::from_schema("r", &settings(8), Some(&schema)).unwrap();
    assert_eq!(reason(&v, r#"{"email":"alice@example.com"}"#), None);
    assert_eq!(
        reason(&v, r#"{"email":"not an address"}"#),
        Some((MessageRejection::Schema, "/email".into(), "format".into()))
    );
    let typo = json!({"properties": {"email": {"format": "emial"}}});
    let e = Validator::from_schema("r", &settings(8), Some(&typo)).unwrap_err();
    assert!(e.contains("format"), "{e}");
}

#[test]
fn the_shipped_example_schema_works_as_the_readme_says() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/chat.schema.json");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let v = Validator::from_schema("chat", &settings(32), Some(&doc)).unwrap();
    for ok in [
        r#"{"type":"join","room":"general"}"#,
        r#"{"type":"chat","room":"general","text":"hello"}"#,
        r#"{"type":"join","room":"general","email":"alice@example.com"}"#,
    ] {
        assert_eq!(reason(&v, ok), None, "{ok}");
    }
    for (bad, pointer, keyword) in [
        (r#"{"type":"chat","room":"general"}"#, "", "required"),
        (r#"{"type":"chat","room":"General!","text":"hi"}"#, "/room", "pattern"),
        (r#"{"type":"join","room":"general","email":"alice"}"#, "/email", "format"),
        (r#"{"type":"shout","room":"general"}"#, "/type", "enum"),
        (r#"{"type":"join","room":"general","admin":true}"#, "", "additionalProperties"),
    ] {
        assert_eq!(
            reason(&v, bad),
            Some((MessageRejection::Schema, pointer.into(), keyword.into())),
            "{bad}"
        );
    }
}

#[test]
fn numbers_the_schema_cannot_compare_exactly_are_refused_when_there_is_a_schema() {
    let schema = json!({"type": "object"});
    let v = Validator::from_schema("r", &settings(8), Some(&schema)).unwrap();
    for bad in [
        r#"{"qty":-9223372036854775809}"#,
        r#"{"qty":18446744073709551616}"#,
        r#"{"price":100.000000000000000001}"#,
        r#"{"role":1.0000000000000000001}"#,
        r#"{"x":1e-400}"#,
        r#"[1, 2, 1234567890.1234567]"#,
    ] {
        assert_eq!(
            reason(&v, bad),
            Some((MessageRejection::NotJson, String::new(), "number".into())),
            "{bad}"
        );
        assert!(v.check(bad.as_bytes()).unwrap_err().detail().contains("exactly"));
    }
    for ok in [
        r#"{"n":18446744073709551615,"m":-9223372036854775808}"#,
        r#"{"x":1.5e10,"y":0.000,"z":-0.0,"w":1E2}"#,
        r#"{"x":123456789012345.0,"y":1.23456789012345e-300}"#,
        r#"{"s":"12345678901234567890123.4567890123","t":"1e-400"}"#,
        r#"{"a":[0,-1,2.5,1e308]}"#,
    ] {
        assert_eq!(reason(&v, ok), None, "{ok}");
    }
    // Without a schema the message is only JSON: numbers pass as written.
    let json_only = Validator::from_schema("r", &settings(8), None).unwrap();
    assert_eq!(reason(&json_only, r#"{"x":1e-400,"y":100.000000000000000001}"#), None);
}
