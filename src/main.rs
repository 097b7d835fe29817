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
    let reloader = likeness::Reloader::new();
    let hangups = tokio::spawn(reload_on_hangup(reloader.clone()));
    let options = likeness::ServeOptions {
        reloader: Some(reloader),
        ..Default::default()
    };
    let served = likeness::serve_with(listener, config, options, shutdown_signal()).await;
    hangups.abort();
    served.map_err(|e| e.to_string())
}

/// SIGHUP re-reads the TLS certificates and the tokens file (cert-manager and Secret
/// rotation write new files; the daemon keeps running). A file that fails to load is
/// logged, and the old one stays in force.
async fn reload_on_hangup(reloader: likeness::Reloader) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading certificates and tokens");
        // The reload logs what it did and what failed.
        let _ = reloader.reload();
    }
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
