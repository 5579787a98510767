//! Stable Diffusion 1.x/2.x on libtorch, matching diffusers numerically.
pub mod attention;
pub mod clip;
pub mod config;
pub mod embeddings;
pub mod explain;
pub mod image_io;
pub mod model;
pub mod nn;
pub mod pipeline;
pub mod resnet;
pub mod schedulers;
pub mod tokenizer;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod weights;
