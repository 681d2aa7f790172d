//! The generated gRPC API (`gantry.v1`, from proto/gantry/v1): messages, clients
//! (`*_client`) and servers (`*_server`). Proto types stop at the edge: daemons convert them to
//! domain types in one conversion module each.
#![allow(
    missing_docs,
    clippy::doc_lazy_continuation,
    clippy::large_enum_variant
)]

tonic::include_proto!("gantry.v1");

/// Encoded `google.protobuf.FileDescriptorSet` of gantry.v1 and its imports, with source info
/// (comments), for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gantry_v1_descriptor");
