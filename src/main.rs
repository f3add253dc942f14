//! The `smartlead-proxy` binary: parse the command line and hand over to the library.
#![forbid(unsafe_code)]

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use smartlead_proxy::{Settings, sim, telemetry};

#[derive(Parser)]
#[command(
    name = "smartlead-proxy",
    version,
    about = "A quota-keeping proxy for the SmartLead API"
)]
struct Cli {
    /// A TOML file layered over config/default.toml.
    #[arg(long, env = "SMARTLEAD_PROXY_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Exit 0 if the proxy's /healthz answers 200 (for container HEALTHCHECKs).
    Healthcheck {
        /// Defaults to /healthz on the port of server.listen (SMARTLEAD_PROXY__SERVER__LISTEN).
        #[arg(long)]
        url: Option<String>,
    },
    /// Run a simulated SmartLead API to develop and test against, offline.
    Simulate {
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        #[arg(long, default_value_t = 9000)]
        port: u16,
        /// The only API key accepted; empty accepts any (or none).
        #[arg(long, env = "SIM_API_KEY", default_value = "sim-key")]
        api_key: String,
        /// More keys accepted besides --api-key, each with a quota of its own (several
        /// accounts).
        #[arg(long, value_delimiter = ',')]
        more_keys: Vec<String>,
        /// Requests allowed per key in any window of --period; 0 for no limit.
        #[arg(long, default_value_t = 60)]
        requests: u32,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        period: Duration,
        /// Several limits per key at once instead of --requests/--period, like a SmartLead
        /// plan: "10/1s,60/60s,1000/1h".
        #[arg(long, value_delimiter = ',', value_parser = parse_window)]
        windows: Vec<(u32, Duration)>,
        /// Added before every answer.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        latency: Duration,
        /// Do not keep a record of requests (for long benchmarks).
        #[arg(long)]
        no_record: bool,
    },
    /// See it work in under a minute: a simulated SmartLead with a small quota, the proxy
    /// in front, 50 workers, and the same work done with the retry recipe from SmartLead's
    /// error-handling guide (the guide recipe) for comparison.
    Demo,
    /// Show the quota at work: accounts, windows, waiting clients and recent errors of a
    /// running proxy, as a table (exit 0; non-zero with one line when it cannot be reached).
    Status {
        /// The proxy (e.g. http://127.0.0.1:8787); defaults to server.listen's port.
        #[arg(long)]
        url: Option<String>,
        /// Redraw every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// An access token, when server.status_requires_token is set.
        #[arg(long, env = "SMARTLEAD_PROXY_TOKEN")]
        token: Option<String>,
    },
    /// Validate the configuration exactly as start-up does and print the effective
    /// settings (every key and token as ***). Exit 0 when valid, 2 when not, like nginx -t.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Serving is thread-per-core: this thread is the first worker and `run` starts the
    // rest, each with its own single-threaded event loop. The other commands use the
    // usual multi-threaded runtime.
    let runtime = match cli.command {
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(_) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(rt) => rt.block_on(dispatch(cli)),
        Err(e) => {
            eprintln!("smartlead-proxy: cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Simulate {
            host,
            port,
            api_key,
            more_keys,
            requests,
            period,
            windows,
            latency,
            no_record,
        }) => {
            let config = sim::SimConfig {
                api_key: (!api_key.is_empty()).then_some(api_key),
                more_keys,
                requests,
                period,
                windows,
                latency,
                record: !no_record,
            };
            simulate((host, port).into(), config).await
        }
        Some(Command::Demo) => match smartlead_proxy::demo::run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("smartlead-proxy demo: {e}");
                ExitCode::from(1)
            }
        },
        Some(Command::Healthcheck { url }) => {
            let url = url.unwrap_or_else(|| smartlead_proxy::healthcheck::url_for(listen()));
            match smartlead_proxy::healthcheck::check(&url, Duration::from_secs(3)).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("smartlead-proxy healthcheck: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some(Command::CheckConfig) => check_config(cli.config),
        Some(Command::Status { url, watch, token }) => status(url, watch, token).await,
        None => serve(cli.config).await,
    }
}

/// Where this host's proxy listens: `SMARTLEAD_PROXY__SERVER__LISTEN`, else the default.
fn listen() -> std::net::SocketAddr {
    std::env::var("SMARTLEAD_PROXY__SERVER__LISTEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| Settings::default().server.listen)
}

async fn status(url: Option<String>, watch: bool, token: Option<String>) -> ExitCode {
    let base = url.unwrap_or_else(|| smartlead_proxy::healthcheck::base_url_for(listen()));
    let url = if base.ends_with("/status.json") {
        base
    } else {
        format!("{}/status.json", base.trim_end_matches('/'))
    };
    loop {
        let fetched =
            smartlead_proxy::healthcheck::get(&url, token.as_deref(), Duration::from_secs(3))
                .await
                .and_then(|body| {
                    serde_json::from_slice::<smartlead_proxy::status::Snapshot>(&body)
                        .map_err(|e| format!("{url} did not answer a status: {e}"))
                });
        match fetched {
            Ok(snapshot) => {
                if watch {
                    // Clear the screen and go home before each picture.
                    print!("\x1b[2J\x1b[H");
                }
                print!("{}", smartlead_proxy::status::table(&snapshot));
            }
            Err(e) => {
                eprintln!("smartlead-proxy status: cannot read the proxy's status: {e}");
                return ExitCode::from(1);
            }
        }
        if !watch {
            return ExitCode::SUCCESS;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
        }
    }
}

fn check_config(config: Option<PathBuf>) -> ExitCode {
    match Settings::load(config.as_deref()) {
        Ok(settings) => {
            print!("{}", settings.to_toml());
            eprintln!("smartlead-proxy: the configuration is valid");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smartlead-proxy: {e}");
            ExitCode::from(2)
        }
    }
}

/// `"N/duration"`, as in `limit.windows`.
fn parse_window(text: &str) -> Result<(u32, Duration), String> {
    let w = smartlead_proxy::config::Window::parse(text)?;
    Ok((w.requests, w.period))
}

async fn serve(config: Option<PathBuf>) -> ExitCode {
    let settings = match Settings::load(config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("smartlead-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.log, settings.secrets());
    telemetry::install_panic_hook();
    // Registered before serving, so a hangup (`systemctl reload`, `kill -HUP`, a closed
    // terminal) never meets the default action, which kills the process.
    let (reload, requests) = tokio::sync::mpsc::unbounded_channel();
    let hangups = hangups(reload);
    let reloader = smartlead_proxy::reload::Reloader {
        requests,
        load: Box::new(move || Settings::load(config.as_deref())),
    };
    let addr = settings.server.listen;
    let listener = match bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("smartlead-proxy: cannot listen on {addr} (server.listen): {e}");
            return ExitCode::from(1);
        }
    };
    tokio::spawn(hangups);
    let secrets = settings.secrets();
    match smartlead_proxy::run_with(listener, settings, shutdown_signal(), Some(reloader)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smartlead-proxy: {}", secrets.redact(&e.to_string()));
            ExitCode::from(1)
        }
    }
}

async fn simulate(addr: std::net::SocketAddr, config: sim::SimConfig) -> ExitCode {
    telemetry::init(&Default::default(), Default::default());
    match sim::Sim::start_on(addr, config).await {
        Ok(sim) => {
            println!("simulated SmartLead on {}", sim.base_url());
            shutdown_signal().await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smartlead-proxy simulate: cannot listen on {addr}: {e}");
            ExitCode::from(1)
        }
    }
}

/// Binds with a deep accept backlog, so a burst of thousands of clients queues in the
/// kernel instead of having its SYNs dropped.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Asks for a reload on each SIGHUP.
#[cfg(unix)]
fn hangups(
    reload: tokio::sync::mpsc::UnboundedSender<()>,
) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let registered = signal(SignalKind::hangup());
    async move {
        let Ok(mut hangup) = registered else {
            tracing::warn!("cannot listen for SIGHUP; a hangup may stop the proxy");
            return;
        };
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the configuration");
            if reload.send(()).is_err() {
                return;
            }
        }
    }
}

#[cfg(not(unix))]
fn hangups(_: tokio::sync::mpsc::UnboundedSender<()>) -> impl std::future::Future<Output = ()> {
    std::future::ready(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
