//! `gantry-agent`: the node agent. `gantry-agent shim …` is the per-container shim, which must
//! be dispatched before anything starts a thread (libcontainer forks and runs Rust code in its
//! children, which is only sound in a single-threaded process). `gantry-agent run …` is the node
//! agent daemon; `gantry-agent image …` imports and lists node-local images; `gantry-agent ctr …`
//! drives the runtime directly; `gantry-agent network cleanup` detaches what dead containers left
//! on the network.

mod ctr;
mod image_cmd;
mod net_cmd;
mod serve;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("shim") => {
            // Diagnostics only when asked for: the shim stays small and quick to start.
            if let Some(filter) = std::env::var_os("GANTRY_SHIM_LOG") {
                tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::new(filter.to_string_lossy()))
                    .with_writer(std::io::stderr)
                    .init();
            }
            let code = gantry_agent::runtime::shim::main(&args[2..]);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Some("ctr") => {
            let opts = ctr::Ctr::parse_from(
                std::iter::once("gantry-agent ctr".to_string()).chain(args[2..].iter().cloned()),
            );
            logs_to_stderr(tracing_subscriber::EnvFilter::from_default_env());
            block_on("ctr", ctr::main(opts), |code| {
                ExitCode::from(u8::try_from(code).unwrap_or(1))
            })
        }
        Some("run") => {
            let opts = serve::Run::parse_from(
                std::iter::once("gantry-agent run".to_string()).chain(args[2..].iter().cloned()),
            );
            logs_to_stderr(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            );
            block_on("run", serve::main(opts), |()| ExitCode::SUCCESS)
        }
        Some("cleanup") => {
            let opts = net_cmd::CleanupArgs::parse_from(
                std::iter::once("gantry-agent cleanup".to_string())
                    .chain(args[2..].iter().cloned()),
            );
            logs_to_stderr(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            );
            block_on("cleanup", net_cmd::cleanup(opts), |()| ExitCode::SUCCESS)
        }
        Some("network") => {
            let opts = net_cmd::NetworkCmd::parse_from(
                std::iter::once("gantry-agent network".to_string())
                    .chain(args[2..].iter().cloned()),
            );
            logs_to_stderr(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            );
            block_on("network", net_cmd::main(opts), |()| ExitCode::SUCCESS)
        }
        Some("image") => {
            let opts = image_cmd::ImageCmd::parse_from(
                std::iter::once("gantry-agent image".to_string()).chain(args[2..].iter().cloned()),
            );
            match image_cmd::main(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("gantry-agent image: {err:#}");
                    ExitCode::from(1)
                }
            }
        }
        _ => {
            eprintln!(
                "usage: gantry-agent run --help | gantry-agent image --help | gantry-agent ctr --help | gantry-agent network --help | gantry-agent cleanup --help | gantry-agent shim run|exec|delete STATE_DIR"
            );
            ExitCode::from(2)
        }
    }
}

fn logs_to_stderr(filter: tracing_subscriber::EnvFilter) {
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Runs `verb`'s future on a new tokio runtime; errors print as `gantry-agent VERB: …` and exit 1.
fn block_on<T>(
    verb: &str,
    future: impl std::future::Future<Output = anyhow::Result<T>>,
    exit: impl FnOnce(T) -> ExitCode,
) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("gantry-agent: starting the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(future) {
        Ok(value) => exit(value),
        Err(err) => {
            eprintln!("gantry-agent {verb}: {err:#}");
            ExitCode::from(1)
        }
    }
}
