//! # Layout
//!
//! The public contract of Gatehouse: the `gatehouse.v1` protobuf package, generated at build
//! time from `proto/gatehouse/v1/*.proto` (see `build.rs`), and the encoded file descriptor set
//! that the server publishes through gRPC reflection.
#![forbid(unsafe_code)]

/// Generated messages, clients and servers of `gatehouse.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
    tonic::include_proto!("gatehouse.v1");
}

/// Encoded `FileDescriptorSet` of every `gatehouse.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gatehouse_descriptor.bin"));
