//! `[routes.limits]` (DESIGN.md section 14): a route's overrides apply to its sessions
//! only; absent keys inherit; a reload applies them to new sessions.

mod common;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

const ROUTES: &str = r#"
[limits]
max_connections_per_user = 1

[[routes]]
name = "small"
path = "/small"
upstreams = ["builtin:echo"]
auth = "jwt"
[routes.limits]
max_message_size = "1KiB"
idle_timeout = "300ms"
max_connections_per_user = 2

[[routes]]
name = "plain"
path = "/plain"
upstreams = ["builtin:echo"]
auth = "jwt"
"#;

#[tokio::test]
async fn a_routes_overrides_apply_to_its_sessions_only() {
    let gw = Gw::start("", ROUTES).await;
    let big = "x".repeat(2048);
    // The plain route inherits [limits]: 2 KiB passes; alice holds the global slot.
    let mut plain = gw.connect("/plain").await;
    assert_eq!(roundtrip(&mut plain, &big).await, big);
    assert_eq!(
        gw.try_connect("/plain", &gw.options(Some(gw.token("alice")))).await.err(),
        Some(429)
    );
    // The small route counts alice apart, up to its own cap of 2.
    let mut small = gw.connect("/small").await;
    let _second = gw.connect("/small").await;
    assert_eq!(
        gw.try_connect("/small", &gw.options(Some(gw.token("alice")))).await.err(),
        Some(429)
    );
    assert_eq!(roundtrip(&mut small, "ok").await, "ok");
    small.send(Message::text(big.clone())).await.unwrap();
    assert_eq!(close_code(&mut small).await.0, 1009);
    // Its idle timeout is its own: the second session ends within a second, the plain one stays.
    let mut idle = gw.try_connect("/small", &gw.options(Some(gw.token("bob")))).await.unwrap().0;
    let started = std::time::Instant::now();
    assert_eq!(close_code(&mut idle).await.0, 1001);
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert_eq!(roundtrip(&mut plain, "still here").await, "still here");

    // A reload raises the route's size: new sessions get it.
    let text = config_text(gw.dir.path(), "", &ROUTES.replace("\"1KiB\"", "\"4KiB\""));
    gw.reload(&text).await.unwrap();
    let mut after = gw.try_connect("/small", &gw.options(Some(gw.token("carol")))).await.unwrap().0;
    assert_eq!(roundtrip(&mut after, &big).await, big);
}

#[test]
fn route_limits_are_checked_and_inherit() {
    let base = "[[routes]]\nname = \"r\"\npath = \"/r\"\nupstreams = [\"builtin:echo\"]\n[routes.limits]\n";
    let cfg = |extra: &str| wsgate::Config::from_toml_str(&format!("[limits]\nmax_frame_size = \"64KiB\"\n{base}{extra}"), "t.toml");
    let c = cfg("message_rate = \"5/s\"\n").unwrap();
    let l = c.limits_of(&c.routes[0]);
    assert_eq!((l.message_rate.count, l.max_frame_size, l.user_cap_per_route), (5, 64 << 10, false));
    assert_eq!(l.idle_timeout, c.server.idle_timeout);
    // A larger message size takes frames as large (a browser sends one frame).
    let c = cfg("max_message_size = \"4MiB\"\n").unwrap();
    assert_eq!(c.limits_of(&c.routes[0]).max_frame_size, 4 << 20);
    for (extra, key, line) in [
        ("max_fragments = 0\n", "routes.limits.max_fragments", 7),
        ("idle_timeout = \"0s\"\n", "routes.limits.idle_timeout", 7),
        (
            "max_message_size = \"1KiB\"\nmax_frame_size = \"2KiB\"\n",
            "routes.limits.max_frame_size",
            7,
        ),
    ] {
        let e = cfg(extra).unwrap_err();
        assert_eq!((e.key.as_str(), e.line), (key, Some(line)), "{extra}: {e}");
    }
    let e = cfg("rate_abuse_timeout = \"1s\"\n").unwrap_err();
    assert_eq!(e.line, Some(8), "{e}");
}

#[tokio::test]
async fn a_reload_gives_live_sessions_their_routes_new_timers() {
    let gw = Gw::start("", ROUTES).await;
    let mut live = gw.connect("/plain").await;
    assert_eq!(roundtrip(&mut live, "before").await, "before");
    // The plain route gets an idle timeout of its own: the open session ends by it.
    let routes = ROUTES.replace(
        "name = \"plain\"\npath = \"/plain\"\nupstreams = [\"builtin:echo\"]\nauth = \"jwt\"\n",
        "name = \"plain\"\npath = \"/plain\"\nupstreams = [\"builtin:echo\"]\nauth = \"jwt\"\n[routes.limits]\nidle_timeout = \"300ms\"\n",
    );
    assert_ne!(routes, ROUTES);
    let started = std::time::Instant::now();
    gw.reload(&config_text(gw.dir.path(), "", &routes)).await.unwrap();
    assert_eq!(close_code(&mut live).await.0, 1001);
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "{:?}", started.elapsed());
}
