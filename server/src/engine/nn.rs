//! The few layers Stable Diffusion needs, as plain tensors plus functional libtorch ops.
//! Parameters are leaves without grad; Grad-SAM differentiates activations, not weights.
use super::weights::WeightPath;
use anyhow::Result;
use tch::Tensor;

pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(p: &WeightPath, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = p.get("weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(p.get("bias", &[out_dim])?) } else { None };
        Ok(Self { weight, bias })
    }

    /// A 1×1 convolution's weights used as a linear layer (old VAE attention checkpoints
    /// store `proj_attn`/`query` as [out, in] or as [out, in, 1, 1]).
    pub fn load_squeezable(p: &WeightPath, in_dim: i64, out_dim: i64) -> Result<Self> {
        // Try [out, in] first so that a missing or misshapen tensor is reported as such.
        let w = match p.get("weight", &[out_dim, in_dim]) {
            Ok(w) => w,
            Err(e) => match p.get("weight", &[out_dim, in_dim, 1, 1]) {
                Ok(w) => w.reshape([out_dim, in_dim]),
                Err(_) => return Err(e),
            },
        };
        Ok(Self { weight: w, bias: Some(p.get("bias", &[out_dim])?) })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: i64,
    pub padding: i64,
}

impl Conv2d {
    pub fn load(p: &WeightPath, in_ch: i64, out_ch: i64, kernel: i64, stride: i64, padding: i64) -> Result<Self> {
        let weight = p.get("weight", &[out_ch, in_ch, kernel, kernel])?;
        let bias = Some(p.get("bias", &[out_ch])?);
        Ok(Self { weight, bias, stride, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, self.bias.as_ref(), [self.stride, self.stride], [self.padding, self.padding], [1, 1], 1)
    }
}

pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(p: &WeightPath, groups: i64, channels: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: p.get("weight", &[channels])?, bias: p.get("bias", &[channels])?, groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub dim: i64,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(p: &WeightPath, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: p.get("weight", &[dim])?, bias: p.get("bias", &[dim])?, dim, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn load(p: &WeightPath, count: i64, dim: i64) -> Result<Self> {
        Ok(Self { weight: p.get("weight", &[count, dim])? })
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// Activation functions by their diffusers/transformers config names.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Silu,
    Gelu,
    GeluTanh,
    QuickGelu,
    Relu,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            other => anyhow::bail!("unsupported activation `{other}`"),
        })
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
            Self::Relu => x.relu(),
        }
    }
}
