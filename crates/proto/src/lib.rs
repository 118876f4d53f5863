//! The Skald gRPC API (`proto/skald/v1/skald.proto`): messages, service traits for the server,
//! and clients. The documentation of each message is in the `.proto` file and `docs/grpc.md`.

/// Package `skald.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("skald.v1");
}

/// The encoded descriptor set of `skald.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("skald_descriptor");
