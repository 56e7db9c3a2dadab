//! The `keygate` command: parse the command line, load and check the whole config, then run
//! the proxy until SIGTERM or SIGINT. A bad config prints to stderr and exits 2 before any
//! socket is opened.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use keygate::{Config, ConfigError, LogFormat, Overrides, ProcessSecrets};
use tokio::signal::unix::{signal, SignalKind};

/// jemalloc, with its background threads purging what a burst freed: glibc keeps freed
/// memory in its arenas, so the process would stay at its peak after a burst.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Authenticating reverse proxy for inference servers",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The config to run or check, and the flags that replace parts of it.
#[derive(Args)]
struct ConfigArgs {
    /// Config file (TOML).
    #[arg(long, default_value = "config/keygate.toml")]
    config: PathBuf,
    /// Listen address, replacing [server] listen.
    #[arg(long)]
    listen: Option<String>,
    /// Upstream URL, replacing [upstream] url.
    #[arg(long)]
    upstream: Option<String>,
    /// Log format, replacing [log] format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter such as "info" or "keygate=debug,warn", replacing [log] level.
    #[arg(long)]
    log_level: Option<String>,
}

impl ConfigArgs {
    fn load(self) -> Result<(PathBuf, Config), ConfigError> {
        let overrides = Overrides {
            listen: self.listen,
            upstream: self.upstream,
            log_format: self.log_format,
            log_level: self.log_level,
        };
        let config = Config::load(&self.config, &overrides, &ProcessSecrets)?;
        Ok((self.config, config))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Load the config and every secret it names, print a summary (names, never values).
    Check(ConfigArgs),
    /// Print one new random API key (256 bits, URL-safe).
    Keygen(KeygenArgs),
}

#[derive(Args)]
struct KeygenArgs {
    /// Also print the key's entry for the key registry ([auth] registry) under this name:
    /// its SHA-256, never the key.
    #[arg(long)]
    name: Option<String>,
}

/// Exit code for a config that cannot be used.
const EXIT_CONFIG: u8 = 2;

/// How long a second shutdown signal lets the log writer write what is queued (among it,
/// the line saying why the process exits) before exiting.
const EXIT_NOW_LOG_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Keygen(args)) => keygen(args.name.as_deref()),
        Some(Command::Check(args)) => match args.load() {
            Ok((path, config)) => {
                println!("{}: OK\n{}", path.display(), config.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        None => match cli.config.load() {
            Ok((_, config)) => serve(config),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}

/// Prints a new key on its own line; with a name, then the key's registry entry, which
/// holds its digest only: the key itself is shown this once and kept nowhere.
fn keygen(name: Option<&str>) -> ExitCode {
    let key = match keygate::generate_key() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("keygate: no randomness from the operating system: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(name) = name else {
        println!("{key}");
        return ExitCode::SUCCESS;
    };
    match keygate::registry_entry(name, &key) {
        Ok(entry) => {
            println!("{key}\n{entry}");
            eprintln!(
                "keygate: the first line is the key, for the client alone: it is shown once and \
                 stored nowhere. The second is its entry for the registry's keys = [ ... ]."
            );
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("keygate: --name {name:?}: {why}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn serve(config: Config) -> ExitCode {
    if let Err(e) = keygate::logging::init(&config.log) {
        eprintln!("keygate: cannot start the log writer thread: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match runtime(config.server.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        let listeners = match keygate::Listeners::bind(&config).await {
            Ok(listeners) => listeners,
            Err(e) => {
                eprintln!("keygate: {e}");
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
    });
    keygate::logging::finish(keygate::logging::FINISH_WITHIN);
    code
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
/// for the key files, the key registry and the certificate to be re-read.
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
                    tracing::info!("SIGHUP received: re-reading the key files, the key registry and the TLS certificate");
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
            keygate::logging::finish(EXIT_NOW_LOG_WAIT);
            std::process::exit(1);
        });
    }
}
