//! Frisket server: the Stable Diffusion engine on libtorch and the gRPC service.
pub mod cli;
pub mod config;
pub mod service;
