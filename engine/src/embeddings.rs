//! Timestep conditioning of the UNet (diffusers' embeddings.py: `get_timestep_embedding`,
//! `TimestepEmbedding`).
use super::nn::{Activation, Linear};
use super::weights::WeightPath;
use anyhow::Result;
use tch::{Kind, Tensor};

/// Sinusoidal embedding of one timestep per sample (`timesteps` [B], float32): [B, dim].
/// Inference passes one t for the whole batch (float32, as diffusers casts it); training draws
/// one per sample.
pub fn timesteps_embedding(timesteps: &Tensor, dim: i64, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor {
    let half = dim / 2;
    let exponent =
        Tensor::arange(half, (Kind::Float, timesteps.device())) * (-(10000f64.ln())) / (half as f64 - freq_shift);
    let args = timesteps.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    let (sin, cos) = (args.sin(), args.cos());
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], -1) } else { Tensor::cat(&[sin, cos], -1) };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}

/// linear_1 → act → linear_2 (→ optional post activation).
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    pub fn new(
        p: &WeightPath,
        in_dim: i64,
        out_dim: i64,
        act: Activation,
        post_act: Option<Activation>,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&p.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: Linear::load(&p.pp("linear_2"), out_dim, out_dim, true)?,
            act,
            post_act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.linear_2.forward(&self.act.forward(&self.linear_1.forward(x)));
        match self.post_act {
            Some(a) => a.forward(&h),
            None => h,
        }
    }
}
