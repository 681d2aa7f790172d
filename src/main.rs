//! `gantry`: the command-line client of Gantry. The cluster verbs (`up`, `apply`, `get`, …) talk
//! to gantry-scheduler's gRPC API; until the control plane lands, the node runtime is driven with
//! `gantry-agent ctr`.

use clap::Parser;

/// Gantry: containers on a fleet of Linux machines.
#[derive(Parser, Debug)]
#[command(name = "gantry", version, about)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!(
        "gantry: the cluster commands need gantry-scheduler, which is not part of this build yet;\n\
         run containers on this machine with `gantry-agent ctr --help`"
    );
    std::process::exit(2);
}
