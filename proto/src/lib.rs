//! The `hufu.v1` gRPC contract: messages, clients and servers generated from
//! `proto/hufu/v1/*.proto` at build time.

pub mod codec;

/// Generated code for package `hufu.v1`.
pub mod v1 {
    #![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
    tonic::include_proto!("hufu.v1");

    /// Encoded `FileDescriptorSet` of the package, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/hufu_descriptor.bin"));
}

pub use prost_types::{Duration, Timestamp};
