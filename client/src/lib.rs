//! Frisket client library (typed async API over the gRPC stubs; arrives with the service).
pub use frisket_proto as proto;
