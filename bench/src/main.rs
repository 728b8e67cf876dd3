//! `wsgate-bench`: the load generator behind `scripts/bench.sh`.
//!
//! Each load subcommand ends with one machine-readable line, `RESULT {json}`, that
//! carries the `--tag KEY=VALUE` pairs it was given. `stall` is not part of
//! `scripts/bench.sh`: it measures the memory a server holds for large frames in progress. Hidden helpers serve the
//! script: `tls-echo` (the "direct" target: an echo that speaks wss itself), `http-app`
//! (the plain HTTP app behind the HTTP row), `auth-app` (the forward-auth endpoint behind the
//! forward-auth rows),
//! `self-signed`, `free-ports` and `report` (the markdown table).

mod auth_app;
mod chat;
mod client;
mod handshakes;
mod http;
mod idle;
mod latency;
mod report;
mod stall;
mod throughput;
mod tls_echo;
mod util;

use clap::{Parser, Subcommand};
use client::{Connector, Ws};
use futures_util::StreamExt;
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

#[derive(Parser)]
#[command(
    name = "wsgate-bench",
    version,
    about = "Load generator for WebSocket servers (wsgate, nginx, a direct wss echo)"
)]
struct Cli {
    /// Runtime worker threads (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N connections, each keeping K messages in flight; echoes verified; msgs/s and MB/s.
    Throughput(throughput::Args),
    /// Open loop at a fixed total rate; latency from the intended send time; p50/p99/p99.9.
    Latency(latency::Args),
    /// Repeated connect + TLS + upgrade + one echo + close; per second and p99.
    Handshakes(handshakes::Args),
    /// Hold N idle sockets from several source addresses; check each still echoes.
    Idle(idle::Args),
    /// JSON chat messages with or without permessage-deflate: wire bytes and server CPU
    /// per message; with --idle, server memory per idle socket.
    Chat(chat::Args),
    /// Plain HTTP/1.1 GETs over kept-alive connections (one in flight each); requests/s,
    /// p50/p99 and server CPU per request.
    Http(http::Args),
    /// The plain HTTP app behind the targets of the HTTP row: 200 with a fixed body.
    #[command(hide = true)]
    HttpApp {
        #[arg(long)]
        listen: SocketAddr,
        /// Body bytes of every answer.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// The forward-auth endpoint behind the forward-auth rows: 200 with `x-user-id` for a
    /// request carrying the cookie, else 401.
    #[command(hide = true)]
    AuthApp {
        #[arg(long)]
        listen: SocketAddr,
        /// The cookie pair (`name=value`) a logged-in client carries.
        #[arg(long, default_value = "session=bench")]
        cookie: String,
        /// The identity answered in `x-user-id`.
        #[arg(long, default_value = "bench")]
        user: String,
    },
    /// N clients each send part of one large frame and stall; server RSS growth.
    Stall(stall::Args),
    /// A wss echo server (the benchmark's "direct" target).
    #[command(hide = true)]
    TlsEcho {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Write a self-signed certificate for localhost/127.0.0.1/::1 (the one wsgate makes).
    #[command(hide = true)]
    SelfSigned {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Print N free loopback TCP ports.
    #[command(hide = true)]
    FreePorts { n: usize },
    /// Markdown table of medians from a file of RESULT lines.
    #[command(hide = true)]
    Report {
        #[arg(long)]
        raw: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate-bench: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let r = match cli.command {
        Command::Throughput(a) => rt.block_on(throughput::run(a)),
        Command::Latency(a) => rt.block_on(latency::run(a)),
        Command::Handshakes(a) => rt.block_on(handshakes::run(a)),
        Command::Idle(a) => rt.block_on(idle::run(a)),
        Command::Stall(a) => rt.block_on(stall::run(a)),
        Command::Chat(a) => rt.block_on(chat::run(a)),
        Command::Http(a) => rt.block_on(http::run(a)),
        Command::HttpApp { listen, size } => rt.block_on(http::serve_app(listen, size)),
        Command::AuthApp { listen, cookie, user } => rt.block_on(auth_app::serve(listen, cookie, user)),
        Command::TlsEcho { listen, cert, key } => rt.block_on(tls_echo::run(listen, &cert, &key)),
        Command::SelfSigned { cert, key } => wsgate::tls::write_self_signed(&cert, &key).map_err(Into::into),
        Command::FreePorts { n } => free_ports(n),
        Command::Report { raw, out } => report::run(&raw, out.as_deref()),
    };
    let code = match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wsgate-bench: {e:#}");
            1
        }
    };
    // Do not wait for a blocking stdin read (idle) or lingering tasks.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// Bind N listeners on 127.0.0.1:0 at once (so the ports differ), print the ports, release them.
fn free_ports(n: usize) -> anyhow::Result<()> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port().to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    println!("{}", ports.join(" "));
    Ok(())
}

/// Open `n` connections, at most `concurrency` at a time. Returns the open ones,
/// the number that failed and the first error.
async fn connect_all(connector: &std::sync::Arc<Connector>, n: usize, concurrency: usize) -> (Vec<Ws>, usize, Option<String>) {
    let results: Vec<_> = futures_util::stream::iter(0..n)
        .map(|_| {
            let c = connector.clone();
            async move { tokio::time::timeout(Duration::from_secs(30), c.connect()).await }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let (mut open, mut failed, mut first) = (Vec::with_capacity(n), 0, None);
    for r in results {
        match r {
            Ok(Ok(ws)) => open.push(ws),
            Ok(Err(e)) => {
                failed += 1;
                first.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(_) => {
                failed += 1;
                first.get_or_insert_with(|| "connect timed out (30 s)".to_string());
            }
        }
    }
    (open, failed, first)
}

/// Send a close frame and wait (bounded) for the server's close and the end of the stream.
async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        if ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}
