//! Timestep conditioning of the UNet (diffusers' embeddings.py: `get_timestep_embedding`,
//! `TimestepEmbedding`).
use super::nn::{Activation, Linear};
use super::weights::WeightPath;
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// Sinusoidal embedding of one timestep, repeated for `batch`: [batch, dim], float32.
/// Computed in float32 like diffusers (which casts even a float64 timestep with `.float()`),
/// so fractional timesteps from Euler-type schedulers round the same way.
pub fn timestep_embedding(
    timestep: f64,
    batch: i64,
    dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: Device,
) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, device)) * (-(10000f64.ln())) / (half as f64 - freq_shift);
    let t = Tensor::from_slice(&[timestep as f32]).to_device(device).expand([batch], false);
    let args = t.unsqueeze(1) * exponent.exp().unsqueeze(0);
    let (sin, cos) = (args.sin(), args.cos());
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], -1) } else { Tensor::cat(&[sin, cos], -1) };
    if dim % 2 == 1 { emb.constant_pad_nd([0, 1]) } else { emb }
}

/// linear_1 → act → linear_2 (→ optional post activation).
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    pub fn new(p: &WeightPath, in_dim: i64, out_dim: i64, act: Activation, post_act: Option<Activation>) -> Result<Self> {
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
