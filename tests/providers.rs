//! Named token providers (DESIGN.md sections 14 and 15): a route's `provider` picks the
//! `[providers.NAME]` that verifies its tokens; tokens never cross providers, and
//! per-user caps count each provider's users apart.

mod common;

use common::*;
use std::time::Duration;

const MISSING_OR_BAD: &[u16] = &[401];

/// Routes: `/chat` verified by `[jwt]`, `/partners` by `[providers.partners]`, `/same`
/// by `[providers.same]` which shares partners' secret but not its issuer.
fn config(secrets: &std::path::Path) -> String {
    let d = secrets.display();
    format!(
        r#"
[limits]
max_connections_per_user = 1

[providers.partners]
kind = "jwt"
secret_file = "{d}/partners.secret"
generate_secret_if_missing = true
issuer = "https://idp.partners.test"
audience = ["partners"]

[providers.same]
kind = "jwt"
secret_file = "{d}/partners.secret"
issuer = "https://idp.other.test"

[[routes]]
name = "chat"
path = "/chat"
upstreams = ["builtin:echo"]
auth = "jwt"

[[routes]]
name = "partners"
path = "/partners"
upstreams = ["builtin:echo"]
auth = "jwt"
provider = "partners"

[[routes]]
name = "same"
path = "/same"
upstreams = ["builtin:echo"]
auth = "jwt"
provider = "same"
"#
    )
}

fn provider_token(gw: &Gw, provider: &str, sub: &str) -> String {
    let cfg = &gw.config.providers[provider];
    let secret = wsgate::auth::load_secret(&cfg.secret, "test", true).unwrap();
    wsgate::auth::mint(cfg, &secret, sub, Duration::from_secs(600), &[]).unwrap()
}

async fn status(gw: &Gw, path: &str, token: &str) -> u16 {
    match gw.try_connect(path, &gw.options(Some(token.to_string()))).await {
        Ok(_) => 101,
        Err(s) => s,
    }
}

#[tokio::test]
async fn a_token_passes_only_on_the_routes_of_its_provider_and_users_are_per_provider() {
    let secrets = tempfile::tempdir().unwrap();
    let gw = Gw::start("", &config(secrets.path())).await;
    let default = gw.token("alice");
    let partners = provider_token(&gw, "partners", "alice");
    let same = provider_token(&gw, "same", "alice");

    // Each on its own route (alice of each provider holds her one slot).
    let mut a = gw.try_connect("/chat", &gw.options(Some(default.clone()))).await.unwrap().0;
    let mut b = gw.try_connect("/partners", &gw.options(Some(partners.clone()))).await.unwrap().0;
    let mut c = gw.try_connect("/same", &gw.options(Some(same.clone()))).await.unwrap().0;
    for ws in [&mut a, &mut b, &mut c] {
        assert_eq!(roundtrip(ws, "hi").await, "hi");
    }
    // The per-user cap counts each provider's alice apart: a second one of any is refused.
    assert_eq!(status(&gw, "/partners", &partners).await, 429);
    assert_eq!(status(&gw, "/chat", &default).await, 429);

    // Never on another provider's route, even with the same secret (issuer differs) —
    // refused before any cap.
    for (path, token) in [
        ("/chat", &partners),
        ("/partners", &default),
        ("/partners", &same),
        ("/same", &partners),
        ("/same", &default),
        ("/chat", &same),
    ] {
        let s = status(&gw, path, token).await;
        assert!(MISSING_OR_BAD.contains(&s), "{path}: {s}");
    }
    drop((a, b, c));
}

#[test]
fn a_provider_is_self_contained_and_checked() {
    let text = |extra: &str| format!("{extra}\n[jwt]\nsecret_env = \"X\"\nissuer = \"main\"\naudience = [\"a\"]\nleeway = \"5m\"\n");
    let c = wsgate::Config::from_toml_str(
        &text("[providers.p]\nkind = \"jwt\"\nsecret_env = \"P_SECRET\"\n[[routes]]\nname = \"r\"\npath = \"/r\"\nupstreams = [\"builtin:echo\"]\nprovider = \"p\"\n"),
        "t.toml",
    )
    .unwrap();
    let p = &c.providers["p"];
    // `[jwt]`'s defaults, not its values.
    assert_eq!(p.issuer, None);
    assert!(p.audience.is_empty());
    assert_eq!(p.leeway, wsgate::config::DEFAULT_LEEWAY);
    assert_eq!(c.jwt_of(&c.routes[0]).issuer, None);

    let err = |extra: &str| wsgate::Config::from_toml_str(&text(extra), "t.toml").unwrap_err();
    let route = |auth: &str, provider: &str| {
        format!("[[routes]]\nname = \"r\"\npath = \"/r\"\nupstreams = [\"builtin:echo\"]\nauth = \"{auth}\"\nprovider = \"{provider}\"\n")
    };
    let p = "[providers.p]\nkind = \"jwt\"\nsecret_env = \"P_SECRET\"\n";
    let e = err(&format!("{p}{}", route("jwt", "nope")));
    assert_eq!(e.key, "routes.provider");
    assert!(e.message.contains("no [providers.nope]"), "{e}");
    assert_eq!(err(&format!("{p}{}", route("none", "p"))).key, "routes.provider");
    let e = err("[providers.p]\nkind = \"oidc\"\nsecret_env = \"P\"\n");
    assert_eq!((e.key.as_str(), e.line), ("providers.p.kind", Some(2)), "{e}");
    // Without keys of its own it would fall back to `[jwt]`'s default secret variable.
    let e = err("\n[providers.p]\nkind = \"jwt\"\nissuer = \"x\"\n");
    assert_eq!(e.key, "providers.p", "{e}");
    let e = err("[providers.p]\nkind = \"jwt\"\nsecret_env = \"P\"\nleeway = \"soon\"\n");
    assert_eq!(e.line, Some(4), "{e}");
    let e = err("[providers.p]\nkind = \"jwt\"\nsecret_env = \"P\"\ntoken_sources = [\"header\"]\n");
    assert_eq!((e.key.as_str(), e.line), ("providers.p.token_sources", Some(4)), "{e}");
    let e = err("[providers.p]\nkind = \"jwt\"\nsecret_env = \"P\"\nunknown = 1\n");
    assert_eq!(e.line, Some(4), "{e}");
}

#[test]
fn the_readme_two_tenant_config_is_valid() {
    let readme = include_str!("../README.md");
    let section = &readme[readme.find("## Several hosts and identity providers").unwrap()..];
    let start = section.find("```toml\n").unwrap() + "```toml\n".len();
    let text = &section[start..start + section[start..].find("```").unwrap()];
    let c = wsgate::Config::from_toml_str(text, "README.md").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.tls.certificates.len(), 2);
    let route = |host: &str| c.route(host, "/ws").map(|r| r.name.as_str());
    assert_eq!(route("chat.example.com"), Some("chat"));
    assert_eq!(route("eu.partners.example.com"), Some("partners"));
    assert_eq!(route("partners.example.com"), Some("partners-apex"));
    assert_eq!(route("a.b.partners.example.com"), None);
    let partners = &c.routes[1];
    assert_eq!(c.jwt_of(partners).issuer.as_deref(), Some("https://idp.partners.example"));
    assert_eq!(c.limits_of(partners).max_connections_per_user, 2);
}

#[tokio::test]
async fn a_reload_that_gives_a_route_another_provider_ends_its_sessions() {
    let secrets = tempfile::tempdir().unwrap();
    let text = config(secrets.path());
    let gw = Gw::start("", &text).await;
    let mut chat = gw.try_connect("/chat", &gw.options(Some(gw.token("alice")))).await.unwrap().0;
    let token = provider_token(&gw, "partners", "bob");
    let mut partners = gw.try_connect("/partners", &gw.options(Some(token))).await.unwrap().0;
    assert_eq!(roundtrip(&mut chat, "a").await, "a");
    // /chat is now verified by the partners' provider: alice's [jwt] token no longer passes.
    let moved = text.replace(
        "name = \"chat\"\npath = \"/chat\"\nupstreams = [\"builtin:echo\"]\nauth = \"jwt\"\n",
        "name = \"chat\"\npath = \"/chat\"\nupstreams = [\"builtin:echo\"]\nauth = \"jwt\"\nprovider = \"partners\"\n",
    );
    assert_ne!(moved, text);
    gw.reload(&common::config_text(gw.dir.path(), "", &moved)).await.unwrap();
    assert_eq!(close_code(&mut chat).await.0, 1008);
    assert_eq!(roundtrip(&mut partners, "still").await, "still");
}

#[test]
fn providers_sharing_a_secret_are_refused_and_check_warns_about_jwks_urls_not_apart() {
    let dir = tempfile::tempdir().unwrap();
    let routes = "[[routes]]\nname = \"a\"\npath = \"/a\"\nupstreams = [\"builtin:echo\"]\n\
                  [[routes]]\nname = \"b\"\npath = \"/b\"\nupstreams = [\"builtin:echo\"]\nprovider = \"p\"\n";
    // One secret in two files (the second with a zero byte appended: the same HMAC key).
    let (f1, f2) = (dir.path().join("s1"), dir.path().join("s2"));
    std::fs::write(&f1, [b'k'; 40]).unwrap();
    std::fs::write(&f2, [[b'k'; 40].as_slice(), &[0]].concat()).unwrap();
    let load = |jwt: &str, p: &str| {
        let t = format!(
            "[jwt]\nsecret_file = \"{}\"\n{jwt}\n[providers.p]\nkind = \"jwt\"\nsecret_file = \"{}\"\n{p}\n{routes}",
            f1.display(),
            f2.display()
        );
        let c = wsgate::Config::from_toml_str(&t, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        wsgate::auth::Methods::load(&c, None, false).map(|_| ())
    };
    let e = load("", "").unwrap_err();
    assert_eq!((e.key.as_str(), e.line), ("providers.p.secret_file", Some(6)), "{e}");
    assert!(load("issuer = \"x\"", "").is_err(), "[jwt]'s issuer alone tells nothing apart");
    load("issuer = \"main\"", "issuer = \"x\"").unwrap();

    // Keys from JWKS URLs are known only once fetched: check warns when nothing tells
    // the providers apart.
    let text = |jwt: &str, p: &str| {
        format!(
            "[jwt]\nalgorithms = [\"RS256\"]\njwks_url = \"https://idp.test/a.json\"\n{jwt}\n\
             [providers.p]\nkind = \"jwt\"\nalgorithms = [\"RS256\"]\njwks_url = \"https://idp.test/b.json\"\n{p}\n{routes}"
        )
    };
    let warned = |t: String| {
        let c = wsgate::Config::from_toml_str(&t, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        wsgate::check::warnings(&c)
            .iter()
            .any(|w| w.contains("no issuer or audience tells"))
    };
    assert!(warned(text("", "")));
    assert!(warned(text("issuer = \"main\"", "")), "p has no issuer");
    assert!(
        warned(text("audience = [\"a\", \"c\"]", "audience = [\"b\", \"c\"]")),
        "a shared audience"
    );
    assert!(!warned(text("issuer = \"main\"", "issuer = \"x\"")));
    assert!(!warned(text("audience = [\"a\"]", "audience = [\"b\"]")));
}
