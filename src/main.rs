//! The likeness binary: `likeness serve` runs the daemon; the other subcommands are a
//! client of a running daemon (`--addr`). The benchmark is a binary of its own,
//! `likeness-bench`.

use clap::Parser;

use likeness::cli::{self, Cli, Command};
use likeness::config::{Config, LogFormat};

fn main() -> std::process::ExitCode {
    likeness::memory::limit_arenas();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => match Config::resolve(&args) {
            Ok(config) => {
                init_logging(config.log_format, &config.log);
                rt.block_on(run_server(config))
            }
            Err(e) => Err(e),
        },
        other => {
            init_logging(LogFormat::Human, "warn");
            rt.block_on(cli::run(cli.addr, other))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_server(config: Config) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    likeness::serve(listener, config, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested; draining");
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}
