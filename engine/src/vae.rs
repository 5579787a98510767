//! The KL autoencoder of Stable Diffusion, as diffusers' `AutoencoderKL`.
use super::config::read_config;
use super::nn::{Activation, Conv2d, GroupNorm, Linear};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::weights::{WeightPath, Weights};
use crate::interrupt::{self, Interrupted};
use anyhow::{bail, ensure, Result};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// diffusers hardcodes this epsilon for every norm of the VAE, whatever the config says.
const EPS: f64 = 1e-6;

#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: i64,
    #[serde(default = "three")]
    pub out_channels: i64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<i64>,
    #[serde(default = "one")]
    pub layers_per_block: i64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: i64,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: i64,
    #[serde(default = "thirty_two")]
    pub sample_size: i64,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Whether the VAE must run in float32 when the rest of the model runs in float16
    /// (SDXL's VAE overflows in half precision); SDXL pipelines honour it.
    #[serde(default = "yes")]
    pub force_upcast: bool,
}

fn one() -> i64 {
    1
}
fn three() -> i64 {
    3
}
fn four() -> i64 {
    4
}
fn thirty_two() -> i64 {
    32
}
fn silu() -> String {
    "silu".into()
}
fn default_scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        read_config(&dir.join("config.json"))
    }

    /// A config given as a JSON value (the fields of vae/config.json).
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        super::config::from_value(value, "VAE")
    }

    /// Pixels per latent along each side: every block but the last halves the resolution.
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len().max(1) - 1)
    }

    fn check(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        ensure!(n > 0, "vae config: empty block_out_channels");
        for (field, types, want) in [
            ("down_block_types", &self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            ensure!(types.len() == n, "vae config: {field} has {} entries for {n} block_out_channels", types.len());
            if let Some(t) = types.iter().find(|t| t.as_str() != want) {
                bail!("vae config: unsupported {field} entry `{t}` (only {want})");
            }
        }
        Ok(())
    }

    fn resnet(&self, cin: i64, cout: i64) -> Result<ResnetConfig> {
        Ok(ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: EPS,
            act: Activation::from_name(&self.act_fn)?,
            output_scale_factor: 1.0,
        })
    }
}

/// diffusers' `Attention` as the VAE mid-block uses it: one head over all channels,
/// group norm in front, residual connection.
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    fn new(p: &WeightPath, c: i64, groups: i64) -> Result<Self> {
        // Checkpoints from before diffusers 0.14 name the projections query/key/value/proj_attn
        // and some store them as 1×1 convolutions; diffusers converts both on load.
        let old = !p.pp("to_q").contains("weight") && p.pp("query").contains("weight");
        let [q, k, v, o] =
            if old { ["query", "key", "value", "proj_attn"] } else { ["to_q", "to_k", "to_v", "to_out.0"] };
        Ok(Self {
            group_norm: GroupNorm::load(&p.pp("group_norm"), groups, c, EPS)?,
            to_q: Linear::load_squeezable(&p.pp(q), c, c)?,
            to_k: Linear::load_squeezable(&p.pp(k), c, c)?,
            to_v: Linear::load_squeezable(&p.pp(v), c, c)?,
            to_out: Linear::load_squeezable(&p.pp(o), c, c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("[B, C, H, W]");
        let t = self.group_norm.forward(x).view([b, c, h * w]).transpose(1, 2);
        let head = |l: &Linear| l.forward(&t).unsqueeze(1); // [B, 1 head, HW, C]
        let att = Tensor::scaled_dot_product_attention(
            &head(&self.to_q),
            &head(&self.to_k),
            &head(&self.to_v),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let out = self.to_out.forward(&att.squeeze_dim(1));
        out.transpose(1, 2).reshape([b, c, h, w]) + x
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, optional attention, resnet.
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<AttentionBlock>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn new(p: &WeightPath, cfg: &VaeConfig, c: i64) -> Result<Self> {
        let r = cfg.resnet(c, c)?;
        let attention = if cfg.mid_block_add_attention {
            Some(AttentionBlock::new(&p.pp("attentions.0"), c, cfg.norm_num_groups)?)
        } else {
            None
        };
        Ok(Self {
            resnet0: ResnetBlock2D::new(&p.pp("resnets.0"), &r)?,
            attention,
            resnet1: ResnetBlock2D::new(&p.pp("resnets.1"), &r)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnet0.forward(x, None);
        if let Some(a) = &self.attention {
            h = a.forward(&h);
        }
        self.resnet1.forward(&h, None)
    }
}

/// Resnets of one encoder (`DownEncoderBlock2D`) or decoder (`UpDecoderBlock2D`) block.
fn resnets(p: &WeightPath, cfg: &VaeConfig, n: i64, cin: i64, cout: i64) -> Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|i| ResnetBlock2D::new(&p.pp("resnets").pp(i), &cfg.resnet(if i == 0 { cin } else { cout }, cout)?))
        .collect()
}

struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Encoder {
    fn new(p: &WeightPath, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let last = *ch.last().unwrap();
        let mut blocks = Vec::new();
        for (i, &cout) in ch.iter().enumerate() {
            let b = p.pp("down_blocks").pp(i);
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            // padding 0: diffusers pads right/bottom by one, then convolves with stride 2.
            let down =
                if i + 1 < ch.len() { Some(Downsample2D::new(&b.pp("downsamplers.0"), cout, cout, 0)?) } else { None };
            blocks.push((resnets(&b, cfg, cfg.layers_per_block, cin, cout)?, down));
        }
        Ok(Self {
            conv_in: Conv2d::load(&p.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            blocks,
            mid: MidBlock::new(&p.pp("mid_block"), cfg, last)?,
            norm_out: GroupNorm::load(&p.pp("conv_norm_out"), cfg.norm_num_groups, last, EPS)?,
            conv_out: Conv2d::load(&p.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
            act: Activation::from_name(&cfg.act_fn)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for (res, down) in &self.blocks {
            for r in res {
                h = r.forward(&h, None);
            }
            if let Some(d) = down {
                h = d.forward(&h);
            }
        }
        let h = self.mid.forward(&h);
        self.conv_out.forward(&self.act.forward(&self.norm_out.forward(&h)))
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Decoder {
    fn new(p: &WeightPath, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut blocks = Vec::new();
        for (i, &cout) in rev.iter().enumerate() {
            let b = p.pp("up_blocks").pp(i);
            let cin = if i == 0 { rev[0] } else { rev[i - 1] };
            let up = if i + 1 < rev.len() { Some(Upsample2D::new(&b.pp("upsamplers.0"), cout, cout)?) } else { None };
            blocks.push((resnets(&b, cfg, cfg.layers_per_block + 1, cin, cout)?, up));
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: Conv2d::load(&p.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1)?,
            mid: MidBlock::new(&p.pp("mid_block"), cfg, rev[0])?,
            blocks,
            norm_out: GroupNorm::load(&p.pp("conv_norm_out"), cfg.norm_num_groups, first, EPS)?,
            conv_out: Conv2d::load(&p.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
            act: Activation::from_name(&cfg.act_fn)?,
        })
    }

    /// With `interruptible`, stops at the current interrupt between blocks.
    fn forward(&self, z: &Tensor, interruptible: bool) -> Result<Tensor, Interrupted> {
        let check = || if interruptible { interrupt::check() } else { Ok(()) };
        let mut h = self.mid.forward(&self.conv_in.forward(z));
        for (res, up) in &self.blocks {
            for r in res {
                check()?;
                h = r.forward(&h, None);
            }
            if let Some(u) = up {
                h = u.forward(&h, None);
            }
        }
        Ok(self.conv_out.forward(&self.act.forward(&self.norm_out.forward(&h))))
    }
}

/// The encoder's output distribution over latents.
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] like diffusers, so `std` neither underflows nor explodes.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    fn from_moments(moments: &Tensor) -> Self {
        let parts = moments.chunk(2, 1);
        Self { mean: parts[0].shallow_clone(), logvar: parts[1].clamp(-30.0, 20.0) }
    }

    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    /// mean + std · noise; the caller draws `noise` (diffusers: randn(mean.shape) from the
    /// pipeline's generator).
    pub fn sample_with(&self, noise: &Tensor) -> Tensor {
        &self.mean + self.std() * noise
    }
}

pub struct AutoencoderKl {
    cfg: VaeConfig,
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    /// The dtype of its weights; inputs are converted to it.
    kind: Kind,
    /// Bytes of its weight tensors.
    weight_bytes: u64,
}

impl AutoencoderKl {
    pub fn new(p: &WeightPath, cfg: &VaeConfig) -> Result<Self> {
        cfg.check()?;
        let l = cfg.latent_channels;
        let quant_conv =
            if cfg.use_quant_conv { Some(Conv2d::load(&p.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?) } else { None };
        let post_quant_conv =
            if cfg.use_post_quant_conv { Some(Conv2d::load(&p.pp("post_quant_conv"), l, l, 1, 1, 0)?) } else { None };
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Encoder::new(&p.pp("encoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            decoder: Decoder::new(&p.pp("decoder"), cfg)?,
            kind: p.kind(),
            weight_bytes: p.bytes(),
        })
    }

    /// Config and weights from a `vae/` folder.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let cfg = VaeConfig::from_dir(dir)?;
        let weights = Weights::load_dir(dir, device, kind)?;
        Self::new(&weights.root(), &cfg)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The dtype it runs in (its outputs have it too).
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Bytes of its weight tensors.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Image in [-1, 1], [B, in_channels, H, W] with H, W multiples of `scale_factor()`,
    /// to the latent distribution (after `quant_conv`).
    pub fn encode(&self, x: &Tensor) -> DiagonalGaussian {
        let h = self.encoder.forward(&x.to_kind(self.kind));
        let moments = match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => h,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Unscaled latents (the pipeline divides by `scaling_factor` first) to an image in
    /// about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Tensor {
        self.run_decode(z, false).expect("an uninterruptible decode")
    }

    /// `decode`, stopping at this thread's current interrupt (`interrupt::with`) between
    /// the decoder's blocks.
    pub fn try_decode(&self, z: &Tensor) -> Result<Tensor, Interrupted> {
        self.run_decode(z, true)
    }

    fn run_decode(&self, z: &Tensor, interruptible: bool) -> Result<Tensor, Interrupted> {
        let z = z.to_kind(self.kind);
        let z = match &self.post_quant_conv {
            Some(q) => q.forward(&z),
            None => z,
        };
        self.decoder.forward(&z, interruptible)
    }
}
