//! Frisket server: the Stable Diffusion engine on libtorch and (later) the gRPC service.
pub mod engine;
