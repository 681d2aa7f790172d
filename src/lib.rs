//! `gantry`: the root package of Gantry. Beside the `gantry` CLI it holds what users write and
//! every process reads: the workload spec (YAML/JSON ↔ domain types, validation) and the value
//! types it is made of — quantities, durations, label selectors — and the generated gRPC API
//! (`pb`, compiled from proto/ by build.rs).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod convert;
pub mod duration;
pub mod pb;
pub mod quantity;
pub mod selector;
pub mod workload;
