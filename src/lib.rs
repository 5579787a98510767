//! Generated gRPC types and stubs for Frisket's API (`proto/frisket/v1/frisket.proto`).
pub mod codec;

pub mod v1 {
    tonic::include_proto!("frisket.v1");
}

/// The encoded descriptors of the API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("frisket_descriptor");
