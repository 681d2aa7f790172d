//! gantry-scheduler: Gantry's control plane. So far: the store of desired state (etcd, or an
//! embedded store on redb) behind one contract; the API, placement and controllers build on it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod store;
