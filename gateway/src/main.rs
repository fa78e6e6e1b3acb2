//! The `weir` command: parse arguments, load the configuration, run.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// glibc malloc/free was ~11 % of proxy CPU in the load benchmark; mimalloc cuts that (bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "weir", version, about = "Weir: a programmable caching gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Write the bound addresses as JSON to this file once listening (for tests and supervisors).
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Take the listening sockets from the running instance of this configuration, then
        /// let it drain and exit (zero-downtime restart or binary upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Check a configuration and every file it names; print FILE:LINE:COL: message per problem.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Probe a running gateway's admin API (a container HEALTHCHECK: slim images have no curl).
    /// Exit 0 when it answers 200.
    Health {
        /// The admin listener.
        #[arg(long, default_value = "127.0.0.1:9901")]
        addr: String,
        /// `/readyz` (ready for traffic), `/livez` (alive) or `/health`.
        #[arg(long, default_value = "/readyz")]
        path: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Write, build and try plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Scaffold a plugin crate NAME/ (a 20-line example to edit).
    New {
        name: String,
        /// Use this guest SDK (a path from the new crate) instead of the copy `new` writes into
        /// NAME/sdk/ (the SDK this Weir was built with).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build the plugin crate in DIR into a component (default: DIR/../NAME.wasm).
    Build {
        dir: PathBuf,
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Load a component and check it: exports, imports, and init with --config.
    Check {
        file: PathBuf,
        /// The plugin config as JSON (what `plugin.config` becomes).
        #[arg(long, default_value = "{}")]
        config: String,
    },
    /// Run one hook on a request and print its decision, what the gateway would do with it,
    /// and the time it took.
    Run(Box<RunArgs>),
}

/// `weir plugin run`'s arguments.
#[derive(clap::Args)]
struct RunArgs {
    file: PathBuf,
    /// cache-key (the request's key, or bypass), ttl (lifetimes and tags of a response),
    /// invalidate (what a successful write purges), cost (the call's price), identify (the
    /// consumer, given the clock).
    #[arg(long, default_value = "cache-key", value_parser = weir::plugin::cli::HOOKS)]
    hook: String,
    /// `METHOD /path?query`
    #[arg(long, default_value = "GET /")]
    request: String,
    /// Request header `name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    #[arg(long, default_value = "localhost")]
    host: String,
    #[arg(long, default_value = "{}")]
    config: String,
    /// Response status for ttl / invalidate / cost.
    #[arg(long, default_value_t = 200)]
    status: u16,
    /// Response body for ttl / invalidate / cost.
    #[arg(long)]
    response_file: Option<PathBuf>,
    /// Response header `name: value` for ttl / invalidate / cost (repeatable).
    #[arg(long = "response-header")]
    response_headers: Vec<String>,
    /// Request body (given to plugins that ask for it).
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// The clock `identify` is given, Unix seconds (default: now).
    #[arg(long)]
    now: Option<u64>,
    /// The consumer identified before the hook (phase 3).
    #[arg(long)]
    consumer: Option<String>,
}

fn plugin_command(cmd: PluginCommand) -> Result<String, String> {
    use weir::plugin::cli;
    let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).map_err(|e| format!("--config is not JSON: {e}"));
    match cmd {
        PluginCommand::New { name, sdk } => cli::new(&name, sdk.as_deref()),
        PluginCommand::Build { dir, out } => cli::build(&dir, out.as_deref()).map(|p| format!("built {}", p.display())),
        PluginCommand::Check { file, config } => cli::check(&file, &json(&config)?),
        PluginCommand::Run(args) => {
            let RunArgs {
                file,
                hook,
                request,
                headers,
                host,
                config,
                status,
                response_file,
                response_headers,
                body_file,
                now,
                consumer,
            } = *args;
            let mut req = cli::request(&request, &headers, &host)?;
            req.consumer = consumer;
            let read = |f: Option<PathBuf>| match f {
                Some(f) => std::fs::read(&f).map(Some).map_err(|e| format!("cannot read {}: {e}", f.display())),
                None => Ok(None),
            };
            let input = cli::RunInput {
                status,
                response_headers: cli::header_list(&response_headers)?,
                response_body: read(response_file)?,
                request_body: read(body_file)?,
                now: now.map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s)),
            };
            cli::run(&file, &json(&config)?, &hook, req, input)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Plugin { command } => match plugin_command(command) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weir plugin: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Health { addr, path, timeout } => {
            match health(&addr, &path, std::time::Duration::from_secs(timeout)) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("weir health: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Validate { config } => match weir::config::check(&config) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    eprintln!("{w}");
                }
                println!("{}: ok ({} routes)", config.display(), cfg.routes.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, ready_file, upgrade } => {
            let cfg = match weir::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&cfg.log.level);
            // On one CPU (e.g. pinned with taskset or a 1-CPU container) a current-thread runtime
            // does the same work without the work-stealing scheduler's synchronisation.
            let cpus = std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(1);
            let mut builder = if cpus == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                tokio::runtime::Builder::new_multi_thread()
            };
            let rt = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(weir::server::run(cfg, weir::server::RunOptions { ready_file, upgrade })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("weir: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// One HTTP/1.1 GET over a plain socket with a deadline: a probe needs no runtime or client
/// pool, and must never hang the container's health checker.
fn health(addr: &str, path: &str, timeout: std::time::Duration) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    use std::net::ToSocketAddrs as _;
    let sock =
        addr.to_socket_addrs().map_err(|e| format!("{addr}: {e}"))?.next().ok_or(format!("{addr}: no address"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = s.take(64 << 10).read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text.lines().next().unwrap_or("").to_string();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim().to_string();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(body)
    } else if status.is_empty() {
        Err(format!("{addr}{path}: no answer"))
    } else {
        Err(format!("{addr}{path}: {status} {body}"))
    }
}

/// `WEIR_LOG` when set, else `log.level`.
fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}
