//! gantry-scheduler: Gantry's control plane. So far: the store of desired state (etcd, or an
//! embedded store on redb) behind one contract, and the pure placement core; the API and the
//! controllers build on them.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod cache;
pub mod changelog;
pub mod controller;
pub mod election;
mod liveness;
pub mod metrics;
pub mod model;
pub mod names;
pub mod network;
pub mod ops;
pub mod placement;
pub mod relay;
pub mod server;
pub mod session;
pub mod sim;
pub mod store;
