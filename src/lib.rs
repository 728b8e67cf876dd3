//! wsgate: a hardened WebSocket gateway.
//!
//! A connection passes these stages in order; cheap checks come first, and nothing
//! expensive happens for a connection a cheap check would refuse (DESIGN.md section 1):
//!
//! | # | stage | module |
//! |---|-------|--------|
//! | 1 | accept, global cap; client address from PROXY protocol v1/v2 | `server`, `proxy_protocol` |
//! | 2–3 | firewall, per-IP rate and concurrency limits (before TLS) | [`firewall`], [`limits`], [`gateway::Gateway`] |
//! | 4 | TLS handshake under `handshake_timeout`; client certificate verified (mTLS) | [`tls`], `conn` |
//! | 5 | upgrade request: head read by hyper with size/time bounds (raw heads checked for smuggling), route, validate; on `http = true` routes a plain request is admitted the same way and proxied | [`upgrade`], `framing`, `admit`, `proxy` |
//! | 6 | authentication: client certificate and/or JWT, certificate-bound tokens | [`auth`], `keys`, `admit` |
//! | 7 | upstream connect + handshake, before the 101 | [`upstream`], [`echo`] |
//! | 8 | 101 with the upstream's subprotocol | [`upgrade`] |
//! | 9 | relay: frames both ways, limits, pings, idle, shutdown; client messages checked on routes with `[routes.validate]` | [`relay`], [`wire`], [`validation`] |
//! | 10 | one access-log event; metrics | `conn`, [`metrics`] |
//!
//! # Layers
//!
//! The modules in import order, top to bottom: each imports only modules listed below
//! it (so there is no cycle). `tests/layers.rs` reads this table and fails when an
//! import in `src/` goes up; keep it true.
//!
//! | layer | module | what it holds |
//! |-------|--------|---------------|
//! | entry | [`reexec`] | SIGUSR2: start the new binary in this cgroup to take the listeners over |
//! | entry | [`takeover`] | `run --takeover`: the control socket, listeners handed over by fd passing |
//! | entry | `server` | listeners, accept loops, the three-step drain |
//! | entry | [`watch`] | reload from the config file (SIGHUP), `watch_config`: the file and those it names, polled |
//! | entry | `admin` | the admin listener: metrics, health, readiness |
//! | entry | [`client`] | `wsgate client`, the line-oriented CLI client |
//! | entry | [`check`] | `wsgate check`: insecure settings as warnings |
//! | connection | `conn` | one connection: TLS, hyper, the relay, one log line |
//! | connection | `admin_api` | the admin API (bans, revocations, kicks, sessions) |
//! | admission | `admit` | the one owner of admission: request checks, shared caps, auth, upstream choice, `first_message`, live re-checks |
//! | composition | [`gateway`] | the [`gateway::Runtime`] built from one config, reload, the one place a refusal is counted |
//! | stage | `proxy` | plain HTTP on `http = true` routes: the exchange, upstream pools, streamed bodies |
//! | stage | [`health`] | each upstream's state: passive back-off, active health checks, drain (1012 spread over `over`) |
//! | stage | [`upstream`] | the upstream request and WebSocket handshake, TLS to upstreams |
//! | stage | `balance` | choosing an upstream: round robin, least sessions, the signed sticky cookie; load per upstream |
//! | stage | [`cluster`] | state shared through Redis: connection and breaker, events, leases |
//! | stage | `acme` | automatic certificates (TLS-ALPN-01) |
//! | stage | `incidents` | admin bans, revocations, kicks, the live session list |
//! | stage | [`auth`] | methods → one [`auth::Principal`]; JWT, client certificates |
//! | stage | `keys` | JWT keys: secrets, PEM, JWKS and its refresh |
//! | stage | [`relay`] | frames both ways: limits, pings, idle, validation, closing |
//! | stage | [`validation`] | JSON and JSON Schema checks of client messages |
//! | stage | [`firewall`] | CIDR rules and rule files |
//! | stage | [`limits`] | per-IP rate and caps, per-user slots, the message rate |
//! | stage | `framing` | raw request heads checked for smuggling (what hyper hides), client activity |
//! | stage | [`upgrade`] | the upgrade request: path, headers, Origin, client address, answers |
//! | stage | [`tls`] | server TLS, the certificate store, client certificates |
//! | stage | [`metrics`] | metric names, descriptions, the exporter |
//! | stage | [`echo`] | the built-in echo backend |
//! | stage | [`extension`] | `Sec-WebSocket-Extensions`: permessage-deflate offers and answers, per hop |
//! | stage | [`wire`] | WebSocket frame headers, masking, UTF-8, close payloads |
//! | stage | [`logging`] | tracing setup |
//! | stage | [`notify`] | systemd notifications: ready, reloading, stopping, watchdog, main pid |
//! | stage | `proxy_protocol` | PROXY protocol v1/v2 headers |
//! | leaf | [`config`] | raw TOML → validated [`Config`]; reads nothing but the TOML |
//! | leaf | [`error`] | every reason → status, close code, metric label |
//! | leaf | `fsutil` | bounded, checked file reads |
//! | leaf | `util` | small helpers shared by several stages (escape, percent-decoding, lock) |
//! | leaf | `workers` | thread per core: the connection threads, one current-thread runtime each, and which one this is |
//!
//! # Where the next features live
//!
//! - Plain HTTP on routes (DESIGN 13), landed in part: `admit/plain.rs` (the same
//!   checks for a plain request), the stage `proxy` (the HTTP/1.1 exchange with hyper's
//!   client, pools), `framing` (raw heads checked for smuggling), `balance` (round
//!   robin, least sessions, the sticky cookie) that `admit/upstream.rs` asks, and
//!   [`health`] (active health checks and drain, listed and ordered by `admin_api`,
//!   shared by `cluster` events).
//! - Hosts, SNI and per-route policy (DESIGN 14), landed: certificates by SNI in
//!   `tls/certs.rs` (the `CertStore`), routing by host in `config::Config::route_index`,
//!   the 421 check in `admit/request.rs`, per-route limits in `config::Config::limits_of`
//!   (read by `relay::Settings::from_config` and the per-user key in `admit`), jwt
//!   providers in `auth::Methods` (one verifier per provider).
//! - Auth providers (DESIGN 15): `auth/oidc.rs`, `auth/introspection.rs`,
//!   `auth/forward.rs`, each returning an [`auth::Principal`] and re-checked through
//!   [`auth::Methods::recheck`].
//! - Compression (DESIGN 16), landed: negotiation per hop in [`extension`] (the client's
//!   offer in `admit`, the upstream's answer in [`upstream`]), the codec in
//!   `relay/deflate.rs` and the frame path in `relay/frames/compressed.rs`.
//! - Sentinel, Redis Cluster, the state file (DESIGN 7): `cluster/connection.rs` and a
//!   new `cluster/state_file.rs`.
//! - Upgrades, systemd, process metrics (DESIGN 17): new `takeover.rs` and `notify.rs`
//!   beside `server`, process metrics in `metrics`.
//!
//! The public modules are the surface `main`, the integration tests and the benches
//! use; the rest is crate-private.
#![forbid(unsafe_code)]
// The connection future nests the cluster client's (redis) futures deeply; the Send
// check of `server`'s spawn needs more than the default 128 levels.
#![recursion_limit = "256"]
#![warn(unreachable_pub, clippy::self_named_module_files)]

mod acme;
mod admin;
mod admin_api;
mod admit;
pub mod auth;
mod balance;
pub mod check;
pub mod client;
pub mod cluster;
pub mod config;
mod conn;
pub mod echo;
pub mod error;
pub mod extension;
pub mod firewall;
mod framing;
mod fsutil;
pub mod gateway;
pub mod health;
mod incidents;
mod keys;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod notify;
mod proxy;
mod proxy_protocol;
pub mod reexec;
pub mod relay;
mod server;
pub mod takeover;
pub mod tls;
pub mod upgrade;
pub mod upstream;
mod util;
pub mod validation;
pub mod watch;
pub mod wire;
mod workers;

pub use config::Config;
pub use server::{Listeners, Running, start, start_on};
pub use util::escape;
