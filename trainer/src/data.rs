//! Training data: scenes drawn on the fly by the shapes generator (no dataset on disk).
//! Seeds are split by range so that training never sees an evaluation scene's seed.
use frisket_shapes::{generate_default, Scene};
use tch::{Kind, Tensor};

/// Training scenes use seeds from here up (the eval sets use seeds below 1_000_000).
pub const TRAIN_SEED_BASE: u64 = 1 << 32;

/// RGB u8 image → [3, H, W] float in [-1, 1] (the VAE's input range).
pub fn image_tensor(scene: &Scene) -> Tensor {
    let (w, h) = scene.image.dimensions();
    let t = Tensor::from_slice(scene.image.as_raw()).view([h as i64, w as i64, 3]).permute([2, 0, 1]);
    t.to_kind(Kind::Float) / 127.5 - 1.0
}

/// A batch of `n` scenes for step `step` of a run seeded `run_seed`: [n, 3, H, W] and captions.
pub fn batch(run_seed: u64, step: u64, n: usize) -> (Tensor, Vec<String>) {
    let mut imgs = Vec::with_capacity(n);
    let mut caps = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let seed = TRAIN_SEED_BASE + run_seed.wrapping_mul(1 << 40) + step * n as u64 + i;
        let s = generate_default(seed);
        imgs.push(image_tensor(&s));
        caps.push(s.meta.caption.clone());
    }
    (Tensor::stack(&imgs, 0), caps)
}
