//! wsgate: a hardened WebSocket gateway.
//!
//! A connection passes these stages in order; cheap checks come first, and nothing
//! expensive happens for a connection a cheap check would refuse (DESIGN.md section 1):
//!
//! | # | stage | module |
//! |---|-------|--------|
//! | 1 | accept, global cap; client address from PROXY protocol v1/v2 | [`server`], `proxy_protocol` |
//! | 2–3 | firewall, per-IP rate and concurrency limits (before TLS) | [`firewall`], [`limits`], [`gateway::Gateway`] |
//! | 4 | TLS handshake under `handshake_timeout`; client certificate verified (mTLS) | [`tls`], `conn` |
//! | 5 | upgrade request: head read by hyper with size/time bounds, route, validate | [`upgrade`], `admit` |
//! | 6 | authentication: client certificate and/or JWT, certificate-bound tokens | [`auth`], `keys`, `admit` |
//! | 7 | upstream connect + handshake, before the 101 | [`upstream`], [`echo`] |
//! | 8 | 101 with the upstream's subprotocol | [`upgrade`] |
//! | 9 | relay: frames both ways, limits, pings, idle, shutdown; client messages checked on routes with `[routes.validate]` | [`relay`], [`wire`], [`validation`] |
//! | 10 | one access-log event; metrics | `conn`, [`metrics`] |
//!
//! Layers, each importing only from the ones below it (no cycles):
//!
//! - `server` (accept loops, drain) → `conn` (one connection, stage by stage) →
//!   `admit` (the request stage) → the stage modules → [`gateway`] (shared state,
//!   reload, the one place a refusal is counted and logged) with [`incidents`] (admin
//!   bans, revocations, kicks, the live session list) and [`cluster`] (those shared
//!   through Redis). `admin` and `admin_api` depend on [`gateway`], [`incidents`],
//!   [`cluster`] and the stages' parsers only.
//! - Stage modules: [`upstream`], [`auth`] → `keys` → [`tls`]; [`relay`] → [`wire`],
//!   [`validation`];
//!   [`firewall`], [`limits`], [`upgrade`], [`metrics`].
//! - Leaves: [`config`] (plain data and validation: reads only the TOML text),
//!   [`error`] (every reason → status, close code, metric label), `util`.
//!
//! The public modules are the surface `main`, the integration tests and the benches
//! use; the rest is crate-private.
#![forbid(unsafe_code)]

pub mod acme;
mod admin;
mod admin_api;
mod admit;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
mod conn;
pub mod echo;
pub mod error;
pub mod firewall;
mod fsutil;
pub mod gateway;
pub mod incidents;
mod keys;
pub mod limits;
pub mod logging;
pub mod metrics;
mod proxy_protocol;
pub mod relay;
pub mod server;
pub mod tls;
pub mod upgrade;
pub mod upstream;
mod util;
pub mod validation;
pub mod wire;

pub use config::Config;
pub use server::{Running, start};
pub use util::escape;
