//! Stable Diffusion 1.x/2.x on libtorch, matching diffusers numerically: model blocks,
//! schedulers, the pipeline, Grad-SAM and protected regions. The only crate that links
//! libtorch; `tch` is re-exported so the crates above use this one version of it.
pub use tch;

pub mod attention;
pub mod checkpoint;
pub mod clip;
pub mod compare;
pub mod config;
pub mod embeddings;
pub mod explain;
pub mod hooks;
pub mod image_io;
pub mod interrupt;
pub mod lora;
pub mod model;
pub mod nn;
pub mod pipeline;
pub mod protect;
pub mod resnet;
pub mod schedulers;
pub mod text;
pub mod tokenizer;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod weights;
pub mod winograd;
