//! gantry-scheduler: Gantry's control plane. So far: the store of desired state (etcd, or an
//! embedded store on redb) behind one contract, and the pure placement core; the API and the
//! controllers build on them.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod placement;
pub mod store;
