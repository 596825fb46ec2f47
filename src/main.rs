//! The `inferd` binary: parse the command line, then hand over to the library.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Parser;
use inferd::config::{Cli, Command, Config};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// After the grace, how long the server may take to end the remaining requests before the
/// process exits anyway.
const AFTER_GRACE: Duration = Duration::from_secs(10);

/// How long candle's compute threads spin before parking between kernels. candle's default
/// (25,000 spins) keeps them busy-waiting across the short gaps of a decode step, stealing the
/// cores the other thread needs; measured with `inferd bench` (100-token prompts, 128 new, 2
/// cores): SmolLM2 16 streams 245 -> 270-316 output tok/s (run-to-run spread), 1 stream
/// 94 -> 101; Qwen2.5-0.5B 16 streams 121 -> 132, 1 stream 37.6 -> 40.5. Larger (100k) and
/// smaller (1, 100) limits were worse.
const CANDLE_SPIN_LIMIT: &str = "1000";

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Before any thread exists (the pool reads it once, on first use).
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = Config::from_args(&args)?;
            set_threads(config.threads)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(config))
        }
        Command::Eval(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(inferd::eval::run(&args))?;
            print!("{}", inferd::eval::table(&report));
            for path in inferd::eval::outputs(&args, &report) {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Bench(args) => {
            set_threads(None)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let (reports, check) = if args.serve.self_serve {
                let o = rt.block_on(inferd::bench::self_serve::run(&args))?;
                (o.reports, o.check)
            } else {
                (rt.block_on(inferd::bench::run(&args))?, None)
            };
            for report in &reports {
                println!("{}", report.table());
                println!("{}", serde_json::to_string(report)?);
            }
            if let Some(c) = check {
                println!("{}", c.line());
                println!("{}", serde_json::json!({ "numerics": c }));
                if !c.passed {
                    anyhow::bail!("the numerics check against the CPU failed");
                }
            }
            Ok(())
        }
    }
}

/// Size candle's compute pools (read once, on first use: so before anything runs on them).
fn set_threads(asked: Option<usize>) -> anyhow::Result<()> {
    if asked == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    if asked.is_none()
        && (std::env::var_os("CANDLE_NUM_THREADS").is_some()
            || std::env::var_os("RAYON_NUM_THREADS").is_some())
    {
        return Ok(()); // the user sized the pools themselves
    }
    let n = asked.unwrap_or_else(inferd::models::layers::pool::default_threads);
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let addr = format!("{}:{}", config.host, config.port);
    let opts = inferd::ServeOptions::from(&config);
    let wind_down = opts.drain_delay + opts.shutdown_timeout;
    // Listen first: while the models load, /health answers (alive) and /ready says 503.
    let listener = TcpListener::bind(&addr).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    let load = async move {
        tokio::task::spawn_blocking(move || inferd::load(&config))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|loaded| loaded)
    };

    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
        shutdown_signal().await;
        tracing::warn!("second signal: exiting without waiting for in-flight requests");
        std::process::exit(130);
    });
    let mut graceful = rx.clone();
    let mut deadline = rx;
    let server = inferd::serve_loading(
        load,
        listener,
        async move {
            let _ = graceful.wait_for(|&s| s).await;
        },
        opts,
    );
    tokio::select! {
        r = server => r?,
        _ = async {
            let _ = deadline.wait_for(|&s| s).await;
            tokio::time::sleep(wind_down + AFTER_GRACE).await;
        } => tracing::warn!("requests still open after the grace; exiting"),
    }
    tracing::info!("stopped");
    Ok(())
}

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
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
