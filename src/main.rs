//! `gantry`: the command-line client of Gantry. Parses the command line, runs the verb against
//! gantry-scheduler's API (see `cli`), and turns the outcome into an exit code: 0 ok, 1 error,
//! 2 usage.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // clap prints usage errors and exits with 2 (0 for --help and --version).
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(cli::error::EXIT_ERROR);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::from(cli::error::EXIT_OK),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(cli::error::exit_code(&err))
        }
    }
}
