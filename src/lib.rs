//! wsgate: a hardened WebSocket gateway.
//!
//! A connection passes these stages in order; cheap checks come first, and nothing
//! expensive happens for a connection a cheap check would refuse (DESIGN.md section 1):
//!
//! | # | stage | module |
//! |---|-------|--------|
//! | 1 | accept, global cap; client address from PROXY protocol v1/v2 | [`server`], [`proxy_protocol`] |
//! | 2–3 | firewall, per-IP rate and concurrency limits (before TLS) | [`firewall`], [`limits`] |
//! | 4 | TLS handshake under `handshake_timeout` | [`tls`], [`conn`] |
//! | 5 | upgrade request: head read by hyper with size/time bounds, route, validate | [`upgrade`], [`conn`] |
//! | 6 | JWT authentication | [`auth`] |
//! | 7 | upstream connect + handshake, before the 101 | [`upstream`], [`echo`] |
//! | 8 | 101 with the upstream's subprotocol | [`upgrade`] |
//! | 9 | relay: frames both ways, limits, pings, idle, shutdown | [`relay`], [`wire`] |
//! | 10 | one access-log event; metrics | [`conn`], [`metrics`] |
//!
//! [`error`] maps every reason to its status code, close code and metric label.
//! [`config`] turns the TOML file into a validated [`config::Config`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod admit;
pub mod auth;
pub mod client;
pub mod config;
pub mod conn;
pub mod echo;
pub mod error;
pub mod firewall;
pub mod fsutil;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod proxy_protocol;
pub mod relay;
pub mod server;
pub mod tls;
pub mod units;
pub mod upgrade;
pub mod upstream;
pub mod wire;

pub use config::Config;
pub use server::{Running, start};
