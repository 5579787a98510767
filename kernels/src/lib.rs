//! CPU kernels on plain `f32` slices, for the engine to run where libtorch has no fast
//! path of its own. No libtorch here: the engine hands in tensors' memory.
pub mod winograd;
