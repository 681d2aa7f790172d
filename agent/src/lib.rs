//! gantry-agent: the node agent of Gantry — its container runtime, the per-container shim, and logs.
#![deny(unsafe_code)]

pub mod daemon;
pub mod image;
pub mod logs;
pub mod network;
pub mod runtime;
pub mod sys;
