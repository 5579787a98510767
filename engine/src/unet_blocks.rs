//! The UNet's down, mid and up blocks (diffusers' unet_2d_blocks.py). CrossAttnDownBlock2D
//! and DownBlock2D differ only in having a transformer after each resnet, so one type
//! serves both (likewise for the up blocks).
use super::attention::{AttnCapture, CrossContext, Transformer2DModel, TransformerConfig};
use super::nn::Activation;
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::weights::WeightPath;
use anyhow::Result;
use tch::Tensor;

/// What a block needs from the UNet config, already resolved for this block.
pub struct BlockConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Up blocks: channels coming from the block below.
    pub prev_output_channels: i64,
    pub temb_channels: i64,
    pub num_layers: usize,
    pub groups: i64,
    pub eps: f64,
    pub act: Activation,
    pub output_scale_factor: f64,
    /// `None`: DownBlock2D / UpBlock2D (no attention).
    pub attention: Option<AttentionConfig>,
    /// Down blocks add a downsampler, up blocks an upsampler, except the last one.
    pub resample: bool,
    pub downsample_padding: i64,
}

#[derive(Clone)]
pub struct AttentionConfig {
    pub heads: i64,
    pub transformer_layers: usize,
    pub cross_attention_dim: i64,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

impl BlockConfig {
    fn resnet(&self, cin: i64, cout: i64) -> ResnetConfig {
        ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            act: self.act,
            output_scale_factor: self.output_scale_factor,
        }
    }

    fn transformer(&self, channels: i64) -> Option<TransformerConfig> {
        self.attention.as_ref().map(|a| TransformerConfig {
            channels,
            heads: a.heads,
            layers: a.transformer_layers,
            cross_attention_dim: a.cross_attention_dim,
            groups: self.groups,
            use_linear_projection: a.use_linear_projection,
            only_cross_attention: a.only_cross_attention,
            upcast_attention: a.upcast_attention,
        })
    }
}

fn attentions(
    p: &WeightPath,
    c: &BlockConfig,
    channels: i64,
    count: usize,
    next: &mut usize,
) -> Result<Vec<Transformer2DModel>> {
    match c.transformer(channels) {
        Some(tc) => (0..count).map(|i| Transformer2DModel::new(&p.pp("attentions").pp(i), &tc, next)).collect(),
        None => Ok(Vec::new()),
    }
}

/// CrossAttnDownBlock2D / DownBlock2D.
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(p: &WeightPath, c: &BlockConfig, next_cross_index: &mut usize) -> Result<Self> {
        let mut resnets = Vec::new();
        for i in 0..c.num_layers {
            let cin = if i == 0 { c.in_channels } else { c.out_channels };
            resnets.push(ResnetBlock2D::new(&p.pp("resnets").pp(i), &c.resnet(cin, c.out_channels))?);
        }
        let attentions = attentions(p, c, c.out_channels, c.num_layers, next_cross_index)?;
        let downsampler = if c.resample {
            Some(Downsample2D::new(&p.pp("downsamplers.0"), c.out_channels, c.out_channels, c.downsample_padding)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the output and the skip connections it adds (one per resnet, plus the
    /// downsampled output).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &CrossContext,
        capture: Option<&AttnCapture>,
    ) -> (Tensor, Vec<Tensor>) {
        let mut h = x.shallow_clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb));
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, capture);
            }
            skips.push(h.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h);
            skips.push(h.shallow_clone());
        }
        (h, skips)
    }
}

/// UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) once.
pub struct MidBlock {
    first: ResnetBlock2D,
    layers: Vec<(Transformer2DModel, ResnetBlock2D)>,
}

impl MidBlock {
    pub fn new(p: &WeightPath, c: &BlockConfig, next_cross_index: &mut usize) -> Result<Self> {
        let ch = c.in_channels;
        let first = ResnetBlock2D::new(&p.pp("resnets.0"), &c.resnet(ch, ch))?;
        let attns = attentions(p, c, ch, c.num_layers, next_cross_index)?;
        let mut layers = Vec::new();
        for (i, attn) in attns.into_iter().enumerate() {
            layers.push((attn, ResnetBlock2D::new(&p.pp("resnets").pp(i + 1), &c.resnet(ch, ch))?));
        }
        Ok(Self { first, layers })
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &CrossContext,
        capture: Option<&AttnCapture>,
    ) -> Tensor {
        let mut h = self.first.forward(x, Some(temb));
        for (attn, resnet) in &self.layers {
            h = resnet.forward(&attn.forward(&h, context, capture), Some(temb));
        }
        h
    }
}

/// CrossAttnUpBlock2D / UpBlock2D.
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub fn new(p: &WeightPath, c: &BlockConfig, next_cross_index: &mut usize) -> Result<Self> {
        let mut resnets = Vec::new();
        for i in 0..c.num_layers {
            // The last resnet consumes the skip from the previous (shallower) down block.
            let skip = if i == c.num_layers - 1 { c.in_channels } else { c.out_channels };
            let cin = if i == 0 { c.prev_output_channels } else { c.out_channels };
            resnets.push(ResnetBlock2D::new(&p.pp("resnets").pp(i), &c.resnet(cin + skip, c.out_channels))?);
        }
        let attentions = attentions(p, c, c.out_channels, c.num_layers, next_cross_index)?;
        let upsampler = if c.resample {
            Some(Upsample2D::new(&p.pp("upsamplers.0"), c.out_channels, c.out_channels)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, upsampler })
    }

    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` in the order they were produced; consumed from the end. `upsample_size` is
    /// the spatial size of the next skip connection (diffusers' forward_upsample_size).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &CrossContext,
        upsample_size: Option<(i64, i64)>,
        capture: Option<&AttnCapture>,
    ) -> Tensor {
        let mut h = x.shallow_clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = resnet.forward(&Tensor::cat(&[&h, skip], 1), Some(temb));
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, capture);
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&h, upsample_size),
            None => h,
        }
    }
}
