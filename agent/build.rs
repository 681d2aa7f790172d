//! Links `gantry-agent` as a position-dependent executable. A PIE binary of this size has ~450 KiB
//! of `.data.rel.ro` that the dynamic loader relocates, and so dirties, in every process: with
//! one shim per container that was most of each shim's memory. Without PIE those pages stay
//! clean and shared. (Go binaries, dockerd and containerd-shim among them, are non-PIE too.)
fn main() {
    println!("cargo:rustc-link-arg-bin=gantry-agent=-no-pie");
}
