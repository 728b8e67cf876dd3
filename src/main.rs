//! The `wsgate` command line (DESIGN.md section 2).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::os::unix::net::UnixStream;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};
use tokio_util::sync::CancellationToken;
use wsgate::{
    Config,
    config::HumanDuration,
    config::{AuthMode, ConfigError, DEFAULT_CONFIG_PATH, PathMatch, Upstream},
};

#[derive(Parser)]
#[command(name = "wsgate", version, about = "A hardened WebSocket gateway")]
struct Cli {
    /// Config file.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM/SIGINT (the default); SIGHUP reloads, SIGUSR2 upgrades.
    Run {
        /// Take the listeners over from the gateway running on the control socket (a binary
        /// upgrade: it drains and exits once this one accepts). Under systemd send the gateway
        /// SIGUSR2 instead: it starts this inside the unit.
        #[arg(long)]
        takeover: bool,
    },
    /// Validate the config and everything it points to; print problems and insecure settings.
    Check,
    /// Mint a token with the config's JWT secret, issuer and audience; prints it alone on stdout.
    Token {
        #[arg(long)]
        sub: String,
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: HumanDuration,
        /// Extra claim KEY=VALUE (JSON values keep their type); repeatable.
        #[arg(long = "claim", value_name = "KEY=VALUE", value_parser = parse_claim)]
        claims: Vec<(String, String)>,
    },
    /// Run the standalone echo backend (plain ws).
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// A line-oriented client: stdin lines out as text messages, replies on stdout.
    Client {
        url: String,
        #[arg(long)]
        token: Option<String>,
        #[arg(long = "protocol")]
        protocols: Vec<String>,
        /// Trust this CA (PEM) instead of the system roots.
        #[arg(long, conflicts_with = "insecure")]
        ca: Option<PathBuf>,
        /// Do not verify the server certificate.
        #[arg(long)]
        insecure: bool,
        /// Present this client certificate (PEM chain) for mTLS routes; needs --key.
        #[arg(long, requires = "key", value_name = "FILE")]
        cert: Option<PathBuf>,
        /// The client certificate's private key (PEM).
        #[arg(long, requires = "cert", value_name = "FILE")]
        key: Option<PathBuf>,
    },
    /// Development only: create a client CA (if missing) and a client certificate for NAME
    /// under certs/dev/, to try an mTLS route.
    DevClientCert {
        /// The certificate's CN: the user an `auth = "mtls"` route sees.
        #[arg(long)]
        name: String,
        /// Where the files go.
        #[arg(long, default_value = "certs/dev", value_name = "DIR")]
        dir: PathBuf,
    },
}

fn parse_duration(s: &str) -> Result<HumanDuration, String> {
    s.parse()
}

fn parse_claim(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| "use KEY=VALUE".to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_path = cli.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match cli.command.unwrap_or(Command::Run { takeover: false }) {
        Command::Run { takeover } => {
            // Captured before anything runs: SIGUSR2 starts whatever file is at this path then.
            let exe = wsgate::reexec::startup_exe();
            rt.block_on(run(&config_path, cli.config.is_some(), takeover, exe))
        }
        Command::Check => rt.block_on(check(&config_path)),
        Command::Token { sub, ttl, claims } => token(&config_path, &sub, ttl, &claims),
        Command::Echo { listen } => rt.block_on(echo(listen)),
        Command::Client {
            url,
            token,
            protocols,
            ca,
            insecure,
            cert,
            key,
        } => rt.block_on(client(&url, token, protocols, ca, insecure, cert.zip(key))),
        Command::DevClientCert { name, dir } => dev_client_cert(&dir, &name),
    };
    ExitCode::from(code)
}

fn load(path: &std::path::Path) -> Result<Config, u8> {
    Config::load(path).map_err(|e| {
        eprintln!("wsgate: config error: {e}");
        2
    })
}

async fn run(path: &Path, explicit_config: bool, takeover: bool, exe: Option<PathBuf>) -> u8 {
    let early = install_early_signals();
    // Stamped before the read: a config changed while it loads is reloaded (watch_config).
    let baseline = wsgate::watch::Baseline::config(path);
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = wsgate::logging::init(&config.log) {
        eprintln!("wsgate: config error: {e}");
        return 2;
    }
    raise_nofile_limit();
    let signals = install_signals(early);
    let hint = start_hint(&config, path, explicit_config);
    let control = wsgate::takeover::socket_path(config.server.control_socket.as_deref());
    let (mut running, confirm) = match start(config, control.as_deref(), takeover).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    log_listeners(&running, hint);
    if let Some(confirm) = confirm {
        confirm_takeover(confirm).await;
    }
    let background = CancellationToken::new();
    let handed_over = CancellationToken::new();
    // Ends the control socket's task, and with it the listeners' copies it holds.
    let control_stop = background.child_token();
    let serves_takeovers = control
        .as_deref()
        .is_some_and(|socket| serve_control_socket(socket, &mut running, &handed_over, &control_stop));
    let upgrader = wsgate::reexec::Upgrader::new(exe, path, serves_takeovers, handed_over.clone());
    // Idle unless [server] watch_config is on (looked up at each poll).
    let baseline = baseline.named_files(&running.gateway);
    tokio::spawn(wsgate::watch::run(
        running.gateway.clone(),
        path.to_path_buf(),
        baseline,
        background.clone(),
    ));
    wsgate::notify::ready();
    if let Some(every) = wsgate::notify::watchdog_interval() {
        tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog: pinging");
        tokio::spawn(wsgate::notify::watchdog(every, background.clone()));
    }
    serve_signals(signals, &running, path, &handed_over, &upgrader).await;
    if handed_over.is_cancelled() {
        // The new process is the service now (it sent MAINPID=): no STOPPING=1 from here.
        running.hand_over();
    } else {
        tracing::info!("shutdown requested");
        wsgate::notify::stopping();
        running.shutdown();
        // No takeover from here on: the last copies of the listening sockets close with
        // the accept loops, so a new connection is refused at once (its client tries
        // another instance) instead of waiting in the backlog through the drain.
        control_stop.cancel();
        running.handover.clear();
    }
    running.wait().await;
    // The watchdog pings through the drain: a drain that hangs is a stuck process too.
    background.cancel();
    0
}

/// Bind the listeners, or (`--takeover`) receive them from the gateway on `control`.
/// With them comes the stream that confirms the takeover once this process serves.
async fn start(config: Config, control: Option<&Path>, takeover: bool) -> Result<(wsgate::Running, Option<UnixStream>), u8> {
    let started = if takeover {
        let Some(socket) = control.map(Path::to_path_buf) else {
            tracing::error!("config error: --takeover needs [server] control_socket");
            return Err(2);
        };
        let (listeners, confirm) =
            match tokio::task::spawn_blocking(move || wsgate::takeover::receive(&socket, wsgate::takeover::expected_peer())).await {
                Ok(Ok(got)) => got,
                Ok(Err(e)) => {
                    tracing::error!("takeover failed, the running gateway keeps serving: {e}");
                    return Err(1);
                }
                Err(_) => return Err(1),
            };
        wsgate::start_on(config, listeners).await.map(|r| (r, Some(confirm)))
    } else {
        wsgate::start(config).await.map(|r| (r, None))
    };
    started.map_err(|e| {
        if e.is::<ConfigError>() {
            tracing::error!("config error: {e}");
            2
        } else {
            tracing::error!("cannot start: {e}");
            1
        }
    })
}

fn log_listeners(running: &wsgate::Running, hint: Option<String>) {
    for addr in &running.wss_addrs {
        tracing::info!(addr = %addr, "listening on wss://{addr}");
    }
    for addr in &running.plain_addrs {
        tracing::info!(addr = %addr, "listening on ws://{addr} (listen_plain: TLS terminated in front)");
    }
    tracing::info!(addr = %running.admin_addr, "metrics on http://{}/metrics", running.admin_addr);
    if let Some(hint) = hint {
        tracing::info!("try it: {hint}");
    }
}

/// Accepting on the handed-over listeners: the old process may stop now, and this one
/// is the service's main process.
async fn confirm_takeover(confirm: UnixStream) {
    match tokio::task::spawn_blocking(move || wsgate::takeover::confirm(confirm)).await {
        Ok(Ok(())) => {}
        // The old process died or gave up: it serves on too if it is alive (both accept
        // from the same queue), and its log says why.
        Ok(Err(e)) => tracing::error!(error = %e, "takeover: could not confirm to the old process"),
        Err(_) => tracing::error!("takeover: could not confirm to the old process"),
    }
    wsgate::notify::main_pid(std::process::id());
    tracing::info!("took over the listeners; the old process drains");
}

/// Answer `run --takeover` on `socket` until one succeeds (`handed_over`). False when the
/// socket cannot be opened: the gateway serves on, without upgrades.
fn serve_control_socket(socket: &Path, running: &mut wsgate::Running, handed_over: &CancellationToken, stop: &CancellationToken) -> bool {
    match wsgate::takeover::bind(socket) {
        Ok((listener, owner)) => {
            tracing::info!(socket = %socket.display(), "control socket: `kill -USR2` or `run --takeover` upgrades");
            let fds = wsgate::takeover::RunningFds::of(running);
            tokio::spawn(wsgate::takeover::serve(listener, owner, fds, handed_over.clone(), stop.clone()));
            true
        }
        Err(e) => {
            tracing::warn!(socket = %socket.display(), error = %e, "cannot open the control socket: no takeover possible");
            false
        }
    }
}

/// Raise the soft open-file limit to the hard limit, as nginx's `worker_rlimit_nofile`
/// does: each proxied session holds two descriptors.
fn raise_nofile_limit() {
    #[cfg(unix)]
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, hard)) if soft < hard => match rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit to the hard limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        },
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// SIGTERM, SIGINT, SIGHUP and SIGUSR2 handlers, installed before the gateway says it is
/// ready (a `systemctl reload` right after READY=1 must not meet SIGHUP's default: exit).
#[cfg(unix)]
type Signals = Option<[tokio::signal::unix::Signal; 4]>;
#[cfg(not(unix))]
type Signals = ();

/// SIGHUP and SIGUSR2 handlers, installed first thing: a SIGUSR2 sent to every process of
/// the unit (`systemctl kill` without `--kill-whom=main`) during an upgrade must not kill
/// a starting successor by its default action. SIGTERM and SIGINT keep theirs (stop at
/// once) until the gateway serves.
#[cfg(unix)]
type Early = Option<[tokio::signal::unix::Signal; 2]>;
#[cfg(not(unix))]
type Early = ();

#[cfg(unix)]
fn install_early_signals() -> Early {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::hangup()), signal(SignalKind::user_defined2())) {
        (Ok(hup), Ok(usr2)) => Some([hup, usr2]),
        _ => None,
    }
}

#[cfg(not(unix))]
fn install_early_signals() -> Early {}

#[cfg(unix)]
fn install_signals(early: Early) -> Signals {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), early) {
        (Ok(term), Ok(int), Some([hup, usr2])) => Some([term, int, hup, usr2]),
        _ => None,
    }
}

#[cfg(not(unix))]
fn install_signals(_: Early) -> Signals {}

/// Until SIGTERM/SIGINT or a takeover: SIGHUP reloads the config file, SIGUSR2 starts
/// the new binary to take over.
#[cfg(unix)]
async fn serve_signals(
    signals: Signals,
    running: &wsgate::Running,
    path: &Path,
    handed_over: &CancellationToken,
    upgrader: &wsgate::reexec::Upgrader,
) {
    let Some([mut term, mut int, mut hup, mut usr2]) = signals else {
        tokio::select! {
            _ = wait_for_signal() => {}
            _ = handed_over.cancelled() => {}
        }
        return;
    };
    loop {
        tokio::select! {
            _ = handed_over.cancelled() => return,
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => { wsgate::watch::reload_file(&running.gateway, path).await; }
            _ = usr2.recv() => upgrader.upgrade(),
        }
    }
}

#[cfg(not(unix))]
async fn serve_signals(_: Signals, _: &wsgate::Running, _: &Path, _: &CancellationToken, _: &wsgate::reexec::Upgrader) {
    wait_for_signal().await;
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// A ready-to-paste client command. The token is minted by a nested `token` command
/// rather than printed, so no token ever lands in a log.
fn start_hint(config: &Config, path: &std::path::Path, explicit_config: bool) -> Option<String> {
    let route = config
        .routes
        .iter()
        .find(|r| matches!(r.path, PathMatch::Exact(_)) && r.upstreams.contains(&Upstream::BuiltinEcho))?;
    let PathMatch::Exact(route_path) = &route.path else { return None };
    let addr = config.server.listen.first()?;
    let host = match addr.ip() {
        ip if ip.is_unspecified() => "localhost".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let exe = std::env::args().next().unwrap_or_else(|| "wsgate".into());
    let cfg_arg = if explicit_config {
        format!(" --config {}", path.display())
    } else {
        String::new()
    };
    let ca = if config.tls.self_signed_if_missing {
        format!(" --ca {}", config.tls.cert.value.display())
    } else {
        String::new()
    };
    let token = match route.auth {
        AuthMode::Jwt => format!(" --token \"$({exe} token --sub dev{cfg_arg})\""),
        AuthMode::Mtls => " --cert certs/dev/dev.crt --key certs/dev/dev.key".to_string(),
        AuthMode::JwtMtls => format!(" --token \"$({exe} token --sub dev{cfg_arg})\" --cert certs/dev/dev.crt --key certs/dev/dev.key"),
        AuthMode::None | AuthMode::Forward | AuthMode::Introspection => String::new(),
    };
    Some(format!("{exe} client wss://{host}:{}{route_path}{ca}{token}", addr.port()))
}

async fn check(path: &std::path::Path) -> u8 {
    wsgate::logging::init_default();
    let config = match load(path) {
        Ok(c) => c,
        Err(_) => return 1,
    };
    for w in wsgate::check::warnings(&config) {
        println!("warning: {w}");
    }
    // `[cluster]` is built at start (not on reload): its password is checked here too.
    if let Some(c) = &config.cluster
        && let Err(e) = wsgate::cluster::Cluster::new(c, &config.origin)
    {
        eprintln!("wsgate: config error: {e}");
        return 1;
    }
    let loaded = match wsgate::gateway::Runtime::load(config, false) {
        Ok(rt) => wsgate::gateway::discover(&rt).await.map(|()| rt),
        Err(e) => Err(e),
    };
    match loaded {
        Ok(rt) => {
            for w in wsgate::check::host_warnings(&rt.config, &rt.certs) {
                println!("warning: {w}");
            }
            println!("{}: ok", path.display());
            0
        }
        Err(e) => {
            eprintln!("wsgate: config error: {e}");
            1
        }
    }
}

fn token(path: &std::path::Path, sub: &str, ttl: HumanDuration, claims: &[(String, String)]) -> u8 {
    wsgate::logging::init_default();
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let secret = match wsgate::auth::load_secret(&config.jwt.secret, &config.origin, true) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsgate: config error: {e}");
            return 2;
        }
    };
    match wsgate::auth::mint(&config.jwt, &secret, sub, ttl.0, claims) {
        Ok(t) => {
            println!("{t}");
            0
        }
        Err(e) => {
            eprintln!("wsgate: {e}");
            1
        }
    }
}

async fn echo(listen: SocketAddr) -> u8 {
    wsgate::logging::init_default();
    raise_nofile_limit();
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wsgate: cannot listen on {listen}: {e}");
            return 1;
        }
    };
    match listener.local_addr() {
        Ok(a) => tracing::info!("echo listening on ws://{a}"),
        Err(_) => return 1,
    }
    tokio::select! {
        r = wsgate::echo::run(listener) => if r.is_err() { 1 } else { 0 },
        _ = wait_for_signal() => 0,
    }
}

fn dev_client_cert(dir: &std::path::Path, name: &str) -> u8 {
    match wsgate::tls::write_dev_client_cert(dir, name) {
        Ok(d) => {
            if d.ca_created {
                println!("created client CA {} (set tls.client_ca to it)", d.ca_cert.display());
            }
            println!("created {} and {} (key mode 0600)", d.cert.display(), d.key.display());
            0
        }
        Err(e) => {
            eprintln!("wsgate: {e}");
            1
        }
    }
}

async fn client(
    url: &str,
    token: Option<String>,
    protocols: Vec<String>,
    ca: Option<PathBuf>,
    insecure: bool,
    cert: Option<(PathBuf, PathBuf)>,
) -> u8 {
    let identity = cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    let tls = match wsgate::tls::cli_client_config_with_cert(ca.as_deref(), insecure, identity) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wsgate: {e}");
            return 2;
        }
    };
    let opts = wsgate::client::Options {
        token,
        protocols,
        headers: vec![],
        tls: Some(tls),
        ws_config: None,
        ..Default::default()
    };
    wsgate::client::run_cli(url, &opts).await as u8
}
