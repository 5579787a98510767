//! ResNet block, down- and up-samplers shared by the UNet and the VAE (diffusers' resnet.py).
use super::nn::{Activation, Conv2d, GroupNorm, Linear};
use super::weights::WeightPath;
use anyhow::Result;
use tch::Tensor;

pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

pub struct ResnetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Width of the time embedding; `None` in the VAE, which has no time conditioning.
    pub temb_channels: Option<i64>,
    pub groups: i64,
    pub eps: f64,
    pub act: Activation,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(p: &WeightPath, c: &ResnetConfig) -> Result<Self> {
        let (cin, cout) = (c.in_channels, c.out_channels);
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(Linear::load(&p.pp("time_emb_proj"), t, cout, true)?),
            None => None,
        };
        let conv_shortcut =
            if cin != cout { Some(Conv2d::load(&p.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None };
        Ok(Self {
            norm1: GroupNorm::load(&p.pp("norm1"), c.groups, cin, c.eps)?,
            conv1: Conv2d::load(&p.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::load(&p.pp("norm2"), c.groups, cout, c.eps)?,
            conv2: Conv2d::load(&p.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut,
            act: c.act,
            output_scale_factor: c.output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.act.forward(&self.norm1.forward(x)));
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            h += proj.forward(&self.act.forward(temb)).unsqueeze(-1).unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.act.forward(&self.norm2.forward(&h)));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x.shallow_clone(),
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// Strided 3×3 convolution. With `padding == 0` diffusers pads right/bottom by one first
/// (the VAE encoder's asymmetric padding).
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn new(p: &WeightPath, channels: i64, out_channels: i64, padding: i64) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&p.pp("conv"), channels, out_channels, 3, 2, padding)?,
            asymmetric_pad: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.asymmetric_pad {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour upsampling to `size` (twice the input unless the skip connection
/// says otherwise), then a 3×3 convolution.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(p: &WeightPath, channels: i64, out_channels: i64) -> Result<Self> {
        Ok(Self { conv: Conv2d::load(&p.pp("conv"), channels, out_channels, 3, 1, 1)? })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let (_, _, h, w) = x.size4().expect("4-d input");
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        let up = x.upsample_nearest2d([oh, ow], None, None);
        self.conv.forward(&up)
    }
}
