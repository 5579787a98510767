//! Generated gRPC types for Frisket's API (`proto/`).
