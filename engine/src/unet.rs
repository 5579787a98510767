//! UNet2DConditionModel (diffusers' unets/unet_2d_condition.py) for SD 1.x/2.x and SDXL
//! configs; the architecture is read from unet/config.json.
use super::attention::AttnCapture;
pub use super::attention::{AddedCond, CrossContext};
use super::config::{read_config, PerBlock};
use super::embeddings::{timesteps_embedding, TimestepEmbedding};
use super::nn::{channels_last, is_channels_last, Activation, Conv2d, GroupNorm};
use super::unet_blocks::{AttentionConfig, BlockConfig, DownBlock, MidBlock, UpBlock};
use super::weights::{WeightPath, Weights};
use crate::interrupt::{self, Interrupted};
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// unet/config.json. Defaults are diffusers' (old SD 1.x configs omit many fields).
/// Fields for features not implemented here are read only to refuse non-default values.
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_4")]
    pub in_channels: i64,
    #[serde(default = "d_4")]
    pub out_channels: i64,
    #[serde(default = "d_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up_blocks")]
    pub up_block_types: Vec<String>,
    /// `null` means no mid block.
    #[serde(default = "d_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_block_out_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_attention_head_dim")]
    pub attention_head_dim: PerBlock<i64>,
    /// diffusers' naming quirk: the head count is `num_attention_heads or attention_head_dim`.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<i64>>,
    #[serde(default = "d_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<i64>,
    #[serde(default = "d_one")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "d_32")]
    pub norm_num_groups: Option<i64>,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_false")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_one_i")]
    pub downsample_padding: i64,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_3")]
    pub conv_in_kernel: i64,
    #[serde(default = "d_3")]
    pub conv_out_kernel: i64,
    #[serde(default)]
    pub sample_size: Option<PerBlock<i64>>,
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// `None`, or "text_time" (SDXL: the pooled text embedding and the size/crop time ids
    /// are embedded and added to the time embedding).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// "text_time": width of each time id's sinusoidal embedding.
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    /// "text_time": input width of `add_embedding` (time ids × their width + pooled width).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,

    // Refused unless default.
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<i64>,
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
}

fn d_4() -> i64 {
    4
}
fn d_3() -> i64 {
    3
}
fn d_32() -> Option<i64> {
    Some(32)
}
fn d_one() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_one_i() -> i64 {
    1
}
fn d_one_f() -> f64 {
    1.0
}
fn d_true() -> bool {
    true
}
fn d_false() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_norm_eps() -> f64 {
    1e-5
}
fn d_silu() -> String {
    "silu".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_layers_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_attention_head_dim() -> PerBlock<i64> {
    PerBlock::One(8)
}
fn d_cross_attention_dim() -> PerBlock<i64> {
    PerBlock::One(1280)
}
fn d_block_out_channels() -> Vec<i64> {
    vec![320, 640, 1280, 1280]
}
fn d_down_blocks() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
}
fn d_up_blocks() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}

/// Per-block values resolved from the config (index = down block index).
struct Resolved {
    layers: Vec<usize>,
    heads: Vec<i64>,
    cross_dims: Vec<i64>,
    transformer_layers: Vec<usize>,
    only_cross: Vec<bool>,
}

impl UNetConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg: Self = read_config(&dir.join("config.json"))?;
        cfg.validate().with_context(|| format!("unsupported UNet config in {}", dir.display()))?;
        Ok(cfg)
    }

    /// A config given as a JSON value (the fields of unet/config.json), validated.
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let cfg: Self = super::config::from_value(value, "UNet")?;
        cfg.validate().context("unsupported UNet config")?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let refuse = |field: &str, value: &dyn std::fmt::Debug| -> Result<()> {
            bail!("`{field}` = {value:?} is not supported")
        };
        if self.time_embedding_type != "positional" {
            refuse("time_embedding_type", &self.time_embedding_type)?;
        }
        if self.resnet_time_scale_shift != "default" {
            refuse("resnet_time_scale_shift", &self.resnet_time_scale_shift)?;
        }
        if self.attention_type != "default" {
            refuse("attention_type", &self.attention_type)?;
        }
        if self.dual_cross_attention {
            refuse("dual_cross_attention", &true)?;
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                ensure!(
                    self.addition_time_embed_dim.is_some_and(|d| d > 0),
                    "`addition_embed_type` = \"text_time\" needs a positive `addition_time_embed_dim`"
                );
                ensure!(
                    self.projection_class_embeddings_input_dim.is_some_and(|d| d > 0),
                    "`addition_embed_type` = \"text_time\" needs `projection_class_embeddings_input_dim`"
                );
            }
            Some(other) => refuse("addition_embed_type", &other)?,
        }
        let unset: [(&str, bool, &dyn std::fmt::Debug); 6] = [
            ("class_embed_type", self.class_embed_type.is_some(), &self.class_embed_type),
            ("num_class_embeds", self.num_class_embeds.is_some(), &self.num_class_embeds),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some(), &self.encoder_hid_dim),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type.is_some(), &self.encoder_hid_dim_type),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some(), &self.time_cond_proj_dim),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null()),
                &self.reverse_transformer_layers_per_block,
            ),
        ];
        for (field, set, value) in unset {
            if set {
                refuse(field, value)?;
            }
        }
        if self.norm_num_groups.is_none() {
            refuse("norm_num_groups", &self.norm_num_groups)?;
        }
        if let Some(mid) = &self.mid_block_type {
            if mid != "UNetMidBlock2DCrossAttn" {
                refuse("mid_block_type", mid)?;
            }
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                refuse("down_block_types", t)?;
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                refuse("up_block_types", t)?;
            }
        }
        let n = self.block_out_channels.len();
        ensure!(n > 0, "`block_out_channels` is empty");
        ensure!(
            self.down_block_types.len() == n && self.up_block_types.len() == n,
            "{} down and {} up block types for {n} block_out_channels",
            self.down_block_types.len(),
            self.up_block_types.len()
        );
        ensure!(self.conv_in_kernel % 2 == 1 && self.conv_out_kernel % 2 == 1, "conv_in/conv_out kernels must be odd");
        Activation::from_name(&self.act_fn)?;
        self.resolve()?;
        Ok(())
    }

    fn resolve(&self) -> Result<Resolved> {
        let n = self.block_out_channels.len();
        let heads = self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim);
        Ok(Resolved {
            layers: self.layers_per_block.expand(n, "layers_per_block")?,
            heads: heads.expand(n, "attention_head_dim")?,
            cross_dims: self.cross_attention_dim.expand(n, "cross_attention_dim")?,
            transformer_layers: self.transformer_layers_per_block.expand(n, "transformer_layers_per_block")?,
            only_cross: self.only_cross_attention.expand(n, "only_cross_attention")?,
        })
    }

    /// Width of the time embedding fed to the resnets.
    pub fn time_embed_dim(&self) -> i64 {
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4)
    }

    /// "text_time" added conditioning: (width of each time id's embedding, width of the
    /// pooled text embedding it expects for `time_ids` time ids).
    pub fn text_time_dims(&self, time_ids: i64) -> Option<(i64, i64)> {
        match (self.addition_embed_type.as_deref(), self.addition_time_embed_dim) {
            (Some("text_time"), Some(dim)) => {
                let input = self.projection_class_embeddings_input_dim.unwrap_or(0);
                Some((dim, input - dim * time_ids))
            }
            _ => None,
        }
    }

    /// The latent size the model was trained at, (height, width), when the config says.
    pub fn sample_size(&self) -> Option<(i64, i64)> {
        match self.sample_size.as_ref()? {
            PerBlock::One(n) => Some((*n, *n)),
            PerBlock::Each(v) if v.len() == 2 => Some((v[0], v[1])),
            PerBlock::Each(_) => None,
        }
    }
}

/// SDXL's added conditioning path: each time id's sinusoidal embedding, concatenated after
/// the pooled text embedding, through `add_embedding` (linear_1 → SiLU → linear_2).
struct TextTimeEmbedding {
    time_dim: i64,
    embedding: TimestepEmbedding,
}

pub struct UNet2DConditionModel {
    cfg: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TextTimeEmbedding>,
    time_embed_act: Option<Activation>,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    cross_layers: usize,
}

impl UNet2DConditionModel {
    pub fn new(p: &WeightPath, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate()?;
        let r = cfg.resolve()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let act = Activation::from_name(&cfg.act_fn)?;
        let groups = cfg.norm_num_groups.expect("validated");
        let temb = cfg.time_embed_dim();
        let post_act = cfg.timestep_post_act.as_deref().map(Activation::from_name).transpose()?;
        let block =
            |i: usize, cin: i64, cout: i64, prev: i64, layers: usize, cross: bool, resample: bool| BlockConfig {
                in_channels: cin,
                out_channels: cout,
                prev_output_channels: prev,
                temb_channels: temb,
                num_layers: layers,
                groups,
                eps: cfg.norm_eps,
                act,
                output_scale_factor: 1.0,
                attention: cross.then(|| AttentionConfig {
                    heads: r.heads[i],
                    transformer_layers: r.transformer_layers[i],
                    cross_attention_dim: r.cross_dims[i],
                    use_linear_projection: cfg.use_linear_projection,
                    only_cross_attention: r.only_cross[i],
                    upcast_attention: cfg.upcast_attention,
                }),
                resample,
                downsample_padding: cfg.downsample_padding,
            };

        let mut cross_index = 0;
        let mut down = Vec::with_capacity(n);
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let c = block(i, cin, ch[i], 0, r.layers[i], kind == "CrossAttnDownBlock2D", i + 1 < n);
            down.push(DownBlock::new(&p.pp("down_blocks").pp(i), &c, &mut cross_index)?);
        }
        let mid = match cfg.mid_block_type {
            Some(_) => {
                let mut c = block(n - 1, ch[n - 1], ch[n - 1], 0, 1, true, false);
                c.output_scale_factor = cfg.mid_block_scale_factor;
                // UNetMidBlock2DCrossAttn never receives only_cross_attention.
                if let Some(a) = c.attention.as_mut() {
                    a.only_cross_attention = false;
                }
                Some(MidBlock::new(&p.pp("mid_block"), &c, &mut cross_index)?)
            }
            None => None,
        };
        // Up block i mirrors down block n-1-i; per-block values are taken reversed.
        let mut up = Vec::with_capacity(n);
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let j = n - 1 - i;
            let prev = if i == 0 { ch[n - 1] } else { ch[j + 1] };
            let cin = ch[j.saturating_sub(1)];
            let c = block(j, cin, ch[j], prev, r.layers[j] + 1, kind == "CrossAttnUpBlock2D", i + 1 < n);
            up.push(UpBlock::new(&p.pp("up_blocks").pp(i), &c, &mut cross_index)?);
        }

        let (kin, kout) = (cfg.conv_in_kernel, cfg.conv_out_kernel);
        Ok(Self {
            conv_in: Conv2d::load(&p.pp("conv_in"), cfg.in_channels, ch[0], kin, 1, (kin - 1) / 2)?,
            time_embedding: TimestepEmbedding::new(&p.pp("time_embedding"), ch[0], temb, act, post_act)?,
            add_embedding: match (cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) {
                (Some(time_dim), Some(input)) if cfg.addition_embed_type.is_some() => Some(TextTimeEmbedding {
                    time_dim,
                    // diffusers builds it with TimestepEmbedding's default activation.
                    embedding: TimestepEmbedding::new(&p.pp("add_embedding"), input, temb, Activation::Silu, None)?,
                }),
                _ => None,
            },
            time_embed_act: cfg.time_embedding_act_fn.as_deref().map(Activation::from_name).transpose()?,
            down,
            mid,
            up,
            conv_norm_out: GroupNorm::load(&p.pp("conv_norm_out"), groups, ch[0], cfg.norm_eps)?,
            conv_act: act,
            conv_out: Conv2d::load(&p.pp("conv_out"), ch[0], cfg.out_channels, kout, 1, (kout - 1) / 2)?,
            cross_layers: cross_index,
            cfg: cfg.clone(),
        })
    }

    /// Loads `dir` (a `unet` folder: config.json plus safetensors) as `kind` on `device`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Ok(Self::load_with_weights(dir, device, kind)?.0)
    }

    /// `load`, also returning the weights, whose tensors the model holds (not copies).
    pub fn load_with_weights(dir: &Path, device: Device, kind: Kind) -> Result<(Self, Weights)> {
        let cfg = UNetConfig::from_dir(dir)?;
        let weights = Weights::load_dir(dir, device, kind)?;
        let unet =
            Self::new(&weights.root(), &cfg).with_context(|| format!("building the UNet from {}", dir.display()))?;
        Ok((unet, weights))
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Number of cross-attention layers (attn2), the valid indices for `Capture::layers`.
    pub fn cross_attention_layer_count(&self) -> usize {
        self.cross_layers
    }

    /// The UNet's one entry point: `sample` [B,C,H,W] at `timesteps` (one for the whole
    /// batch, or one per row), attending to `context` (the encoder hidden states [B,77,D],
    /// plus SDXL's added conditioning for a "text_time" UNet; a context kept across a job's
    /// steps reuses its cross-attention keys and values) → the noise prediction
    /// [B,C',H,W], plus what `capture` asks for.
    pub fn forward<'t>(
        &self,
        sample: &Tensor,
        timesteps: impl Into<Timesteps<'t>>,
        context: &CrossContext,
        capture: Capture<'_>,
    ) -> UNetOutput {
        self.run(sample, timesteps.into(), context, capture, false).expect("an uninterruptible UNet call")
    }

    /// `forward`, stopping at this thread's current interrupt (`interrupt::with`) between
    /// blocks: what jobs call, so that a cancelled job frees the engine within one block.
    pub fn try_forward<'t>(
        &self,
        sample: &Tensor,
        timesteps: impl Into<Timesteps<'t>>,
        context: &CrossContext,
        capture: Capture<'_>,
    ) -> Result<UNetOutput, Interrupted> {
        self.run(sample, timesteps.into(), context, capture, true)
    }

    fn run(
        &self,
        sample: &Tensor,
        timesteps: Timesteps<'_>,
        context: &CrossContext,
        capture: Capture<'_>,
        interruptible: bool,
    ) -> Result<UNetOutput, Interrupted> {
        let timesteps = match timesteps {
            // float32 like diffusers (which casts even a float64 timestep with `.float()`).
            Timesteps::Shared(t) => {
                Tensor::from_slice(&[t as f32]).to_device(sample.device()).expand([sample.size()[0]], false)
            }
            Timesteps::PerRow(t) => t.shallow_clone(),
        };
        let attn = (!capture.layers.is_empty()).then(|| AttnCapture::new(capture.layers));
        let (sample, head_input) = self.run_timesteps(sample, &timesteps, context, attn.as_ref(), interruptible)?;
        Ok(UNetOutput {
            sample,
            probs: attn.map(AttnCapture::into_probs).unwrap_or_default(),
            head_input: capture.head_input.then_some(head_input),
        })
    }

    /// The output head: conv_norm_out → conv_act → conv_out.
    pub fn head(&self) -> (&GroupNorm, Activation, &Conv2d) {
        (&self.conv_norm_out, self.conv_act, &self.conv_out)
    }

    /// The noise prediction and the output head's input.
    fn run_timesteps(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &CrossContext,
        capture: Option<&AttnCapture>,
        interruptible: bool,
    ) -> Result<(Tensor, Tensor), Interrupted> {
        let check = || if interruptible { interrupt::check() } else { Ok(()) };
        let cfg = &self.cfg;
        let sample = if cfg.center_input_sample { sample * 2.0 - 1.0 } else { sample.shallow_clone() };
        let t_emb = timesteps_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
            .to_kind(sample.kind());
        let mut emb = self.time_embedding.forward(&t_emb);
        if let Some(add) = &self.add_embedding {
            let added = context.added().expect(
                "this UNet (addition_embed_type \"text_time\") needs the pooled text embedding and time ids in its CrossContext",
            );
            let rows = added.text_embeds.size()[0];
            let time_embeds =
                timesteps_embedding(&added.time_ids.flatten(0, -1), add.time_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
                    .reshape([rows, -1]);
            let add_embeds =
                Tensor::cat(&[added.text_embeds.to_kind(Kind::Float), time_embeds], -1).to_kind(emb.kind());
            emb += add.embedding.forward(&add_embeds);
        }
        if let Some(act) = self.time_embed_act {
            emb = act.forward(&emb);
        }

        // The convolutions' weights are channels-last on the CPU (nn::Conv2d): so are their
        // outputs and everything in between (norms, activations, additions, upsampling,
        // concatenation and the transformers' token views keep that layout).
        let channels_last_weights = is_channels_last(&self.conv_in.weight);
        let sample = if channels_last_weights { channels_last(&sample) } else { sample };
        let mut h = self.conv_in.forward(&sample);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down {
            check()?;
            let (out, s) = block.forward(&h, &emb, context, capture);
            h = out;
            skips.extend(s);
        }
        if let Some(mid) = &self.mid {
            check()?;
            h = mid.forward(&h, &emb, context, capture);
        }
        for block in &self.up {
            check()?;
            let rest = skips.len() - block.num_skips();
            let own = skips.split_off(rest);
            // Upsample to the next skip's size: equals 2× when sizes divide evenly and
            // handles odd sizes like diffusers' forward_upsample_size.
            let size = skips.last().map(|s| {
                let sz = s.size();
                (sz[2], sz[3])
            });
            h = block.forward(&h, &own, &emb, context, size, capture);
        }
        let out = self.conv_out.forward(&self.conv_act.forward(&self.conv_norm_out.forward(&h)));
        // Callers get the usual contiguous layout.
        Ok((if channels_last_weights { out.contiguous() } else { out }, h))
    }
}

/// The timesteps of a UNet call.
#[derive(Clone, Copy)]
pub enum Timesteps<'a> {
    /// One timestep for every row (inference).
    Shared(f64),
    /// One per row, [B] (training, rows of different jobs).
    PerRow(&'a Tensor),
}

impl From<f64> for Timesteps<'_> {
    fn from(t: f64) -> Self {
        Self::Shared(t)
    }
}

impl<'a> From<&'a Tensor> for Timesteps<'a> {
    fn from(t: &'a Tensor) -> Self {
        Self::PerRow(t)
    }
}

/// What a UNet call returns besides its prediction.
#[derive(Clone, Copy, Default)]
pub struct Capture<'a> {
    /// Cross-attention layers whose post-softmax probabilities [B, heads, H·W, keys] to
    /// return, in forward order. They are part of the autograd graph when grad mode is
    /// on, so d(output)/d(probs) can be taken (Grad-SAM, attention grounding).
    pub layers: &'a [usize],
    /// Return the output head's input (the last up block's output [B, C0, H, W], in the
    /// graph): Grad-SAM's fast mode factorises the final layer's Jacobian through it.
    pub head_input: bool,
}

impl<'a> Capture<'a> {
    pub const NONE: Capture<'static> = Capture { layers: &[], head_input: false };

    pub fn layers(layers: &'a [usize]) -> Self {
        Self { layers, head_input: false }
    }
}

/// A UNet call's results.
pub struct UNetOutput {
    /// The prediction (noise, or v for v-prediction models) [B, C', H, W].
    pub sample: Tensor,
    /// `Capture::layers`' probabilities, as (layer, probs), in forward order.
    pub probs: Vec<(usize, Tensor)>,
    /// With `Capture::head_input`.
    pub head_input: Option<Tensor>,
}
