//! Compiles the gantry.v1 wire contract (proto/gantry/v1/*.proto) with tonic-prost-build and
//! writes the file descriptor set (with source info, i.e. comments) for gRPC reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/gantry/v1/workload.proto",
    "proto/gantry/v1/instance.proto",
    "proto/gantry/v1/node.proto",
    "proto/gantry/v1/events.proto",
    "proto/gantry/v1/session.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Shared between the sessions it is sent on (see `NetworkConfig.routes`).
        .bytes(".gantry.v1.NetworkConfig.routes")
        // Likewise (see `NameTable.workloads`).
        .bytes(".gantry.v1.NameTable.workloads")
        .file_descriptor_set_path(out_dir.join("gantry_v1_descriptor.bin"))
        .compile_protos(PROTOS, &["proto"])?;
    Ok(())
}
