//! The `keygate` command: parse the command line, load and check the whole config, then run
//! the proxy until SIGTERM or SIGINT. A bad config prints to stderr and exits 2 before any
//! socket is opened.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keygate::config::{LogFormat, Overrides};
use keygate::secrets::ProcessSecrets;
use keygate::Config;
use tokio::signal::unix::{signal, SignalKind};

/// jemalloc, with its background threads purging what a burst freed: glibc keeps freed
/// memory in its arenas, so the process would stay at its peak after a burst.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(version, about = "Authenticating reverse proxy for inference servers")]
struct Cli {
    /// Config file (TOML).
    #[arg(long, global = true, default_value = "config/keygate.toml")]
    config: PathBuf,
    /// Listen address, replacing [server] listen.
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Upstream URL, replacing [upstream] url.
    #[arg(long, global = true)]
    upstream: Option<String>,
    /// Log format, replacing [log] format.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter such as "info" or "keygate=debug,warn", replacing [log] level.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Load the config and every secret it names, print a summary (names, never values).
    Check,
    /// Print one new random API key (256 bits, URL-safe).
    Keygen,
}

/// Exit code for a config that cannot be used.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen,
        upstream: cli.upstream,
        log_format: cli.log_format,
        log_level: cli.log_level,
    };
    let load = || Config::load(&cli.config, &overrides, &ProcessSecrets);
    match cli.command {
        Some(Command::Keygen) => match keygate::auth::generate_key() {
            Ok(key) => {
                println!("{key}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("keygate: no randomness from the operating system: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Check) => match load() {
            Ok(config) => {
                println!("{}: OK\n{}", cli.config.display(), config.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        None => match load() {
            Ok(config) => serve(config),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}

fn serve(config: Config) -> ExitCode {
    keygate::logging::init(&config.log);
    let runtime = match runtime(config.server.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listeners = match keygate::Listeners::bind(&config).await {
            Ok(listeners) => listeners,
            Err(e) => {
                eprintln!(
                    "keygate: cannot listen on {} (or the [admin] address): {e}",
                    config.server.listen
                );
                return ExitCode::FAILURE;
            }
        };
        let signals = match Signals::new() {
            Ok(signals) => signals,
            Err(e) => {
                eprintln!("keygate: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            config = %config.file.display(),
            summary = %config.summary().replace('\n', "; "),
            "keygate starting"
        );
        let (reload, reloads) = tokio::sync::mpsc::unbounded_channel();
        match keygate::run(config, listeners, signals.shutdown(reload), reloads).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// One worker runs everything on the main thread (tokio's current-thread scheduler), the
/// cheapest form for a sidecar pinned to one core; more use the work-stealing scheduler.
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    builder.enable_all().build()
}

/// SIGTERM and SIGINT start a graceful shutdown; a second one exits at once. SIGHUP asks
/// for the key files to be re-read.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    async fn shutdown(mut self, reload: tokio::sync::mpsc::UnboundedSender<()>) {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => break,
                _ = self.interrupt.recv() => break,
                _ = self.hangup.recv() => {
                    tracing::info!("SIGHUP received: re-reading the key files and the TLS certificate");
                    let _ = reload.send(());
                }
            }
        }
        tracing::info!("shutdown signal received; a second signal exits at once");
        tokio::spawn(async move {
            tokio::select! {
                _ = self.terminate.recv() => {},
                _ = self.interrupt.recv() => {},
            }
            tracing::warn!("second shutdown signal: exiting now");
            std::process::exit(1);
        });
    }
}
