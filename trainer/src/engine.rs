//! The engine's model code, compiled into the trainer from server/src/engine (the same
//! source files, not a copy), so that training runs exactly the forward the server runs.
//! Only the modules the models need: no pipeline, explain or schedulers (those pull in
//! the rest of the server).
#![allow(dead_code)]

#[path = "../../server/src/engine/attention.rs"]
pub mod attention;
#[path = "../../server/src/engine/clip.rs"]
pub mod clip;
#[path = "../../server/src/engine/config.rs"]
pub mod config;
#[path = "../../server/src/engine/embeddings.rs"]
pub mod embeddings;
#[path = "../../server/src/engine/nn.rs"]
pub mod nn;
#[path = "../../server/src/engine/resnet.rs"]
pub mod resnet;
#[path = "../../server/src/engine/tokenizer.rs"]
pub mod tokenizer;
#[path = "../../server/src/engine/unet.rs"]
pub mod unet;
#[path = "../../server/src/engine/unet_blocks.rs"]
pub mod unet_blocks;
#[path = "../../server/src/engine/vae.rs"]
pub mod vae;
#[path = "../../server/src/engine/weights.rs"]
pub mod weights;
