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
    },
    /// Check a configuration and every file it names; print FILE:LINE:COL: message per problem.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match weir::config::load(&config) {
            Ok(cfg) => {
                for w in &cfg.not_yet_supported {
                    eprintln!("warning: {w}");
                }
                println!("{}: ok ({} routes)", config.display(), cfg.routes.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, ready_file } => {
            init_logging();
            let cfg = match weir::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
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
            match rt.block_on(weir::server::run(cfg, weir::server::RunOptions { ready_file })) {
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}
