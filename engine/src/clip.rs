//! CLIP text encoder, as transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`.
//! SD 1.x/2.x pipelines use its `last_hidden_state` as the UNet's `encoder_hidden_states`;
//! SDXL uses the penultimate hidden state of two encoders and the second one's projected
//! pooled output.
use super::config::read_config;
use super::nn::{Activation, Embedding, LayerNorm, Linear};
use super::weights::{WeightPath, Weights};
use anyhow::{ensure, Result};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Where the pooled output is taken: the first position holding this id, except that
    /// the legacy value 2 means the position of the largest id (transformers' rule).
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    /// Width of `text_projection` (CLIPTextModelWithProjection).
    #[serde(default = "default_projection")]
    pub projection_dim: i64,
}

fn default_eos() -> i64 {
    2
}

fn default_projection() -> i64 {
    512
}

/// transformers' CLIP default activation (text and vision towers).
pub fn default_act() -> String {
    "quick_gelu".into()
}

/// transformers' CLIP default layer-norm epsilon (text and vision towers).
pub fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        read_config(&dir.join("config.json"))
    }

    /// A config given as a JSON value (the fields of text_encoder/config.json).
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        super::config::from_value(value, "text encoder")
    }
}

/// One pre-norm transformer layer of CLIP (`CLIPEncoderLayer`), the same in the text and the
/// vision tower: only the text tower's attention is causal.
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    pub fn load(p: &WeightPath, hidden: i64, intermediate: i64, eps: f64) -> Result<Self> {
        let (d, a) = (hidden, p.pp("self_attn"));
        Ok(Self {
            layer_norm1: LayerNorm::load(&p.pp("layer_norm1"), d, eps)?,
            q_proj: Linear::load(&a.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(&a.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(&a.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(&a.pp("out_proj"), d, d, true)?,
            layer_norm2: LayerNorm::load(&p.pp("layer_norm2"), d, eps)?,
            fc1: Linear::load(&p.pp("mlp").pp("fc1"), d, intermediate, true)?,
            fc2: Linear::load(&p.pp("mlp").pp("fc2"), intermediate, d, true)?,
        })
    }

    /// `causal`: each token attends to itself and earlier ones (the text tower: CLIP was
    /// trained that way, and SD pipelines pass no padding mask); the vision tower attends to
    /// all patches. The scale is head_dim^-0.5 (SDPA's default), as in CLIP.
    pub fn forward(&self, x: &Tensor, heads: i64, act: Activation, causal: bool) -> Tensor {
        let (b, n, d) = x.size3().expect("[batch, seq, hidden]");
        let h = self.layer_norm1.forward(x);
        let split = |t: Tensor| t.view([b, n, heads, d / heads]).transpose(1, 2);
        let (q, k, v) =
            (split(self.q_proj.forward(&h)), split(self.k_proj.forward(&h)), split(self.v_proj.forward(&h)));
        let att = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, causal, None, false);
        let x = x + self.out_proj.forward(&att.transpose(1, 2).reshape([b, n, d]));
        let h = self.fc2.forward(&act.forward(&self.fc1.forward(&self.layer_norm2.forward(&x))));
        x + h
    }
}

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// CLIPTextModelWithProjection's projection of the pooled output (no bias).
    text_projection: Option<Linear>,
    heads: i64,
    act: Activation,
    max_positions: i64,
    eos_token_id: i64,
}

/// What SDXL takes from a text encoder.
pub struct PenultimateOutput {
    /// `hidden_states[-2]`: the output of the second-to-last layer, without the final norm,
    /// [batch, seq, hidden].
    pub hidden: Tensor,
    /// The pooled output through `text_projection` [batch, projection_dim], when the
    /// encoder has a projection and it was asked for.
    pub pooled: Option<Tensor>,
}

impl ClipTextModel {
    /// `p` is the root of the text encoder's weights. transformers 4 saved them under
    /// `text_model.` (as every published SD checkpoint has them); transformers 5 saves
    /// `CLIPTextModel` without that prefix. Both load. A `text_projection` next to them
    /// (CLIPTextModelWithProjection) is loaded too.
    pub fn new(p: &WeightPath, cfg: &ClipTextConfig) -> Result<Self> {
        ensure!(
            cfg.hidden_size % cfg.num_attention_heads == 0,
            "text encoder hidden_size {} is not a multiple of num_attention_heads {}",
            cfg.hidden_size,
            cfg.num_attention_heads
        );
        let t = if p.contains("embeddings.token_embedding.weight") { p.clone() } else { p.pp("text_model") };
        let e = t.pp("embeddings");
        let d = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                EncoderLayer::load(&t.pp("encoder").pp("layers").pp(i), d, cfg.intermediate_size, cfg.layer_norm_eps)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embedding: Embedding::load(&e.pp("token_embedding"), cfg.vocab_size, d)?,
            position_embedding: Embedding::load(&e.pp("position_embedding"), cfg.max_position_embeddings, d)?,
            layers,
            final_layer_norm: LayerNorm::load(&t.pp("final_layer_norm"), d, cfg.layer_norm_eps)?,
            text_projection: if p.pp("text_projection").contains("weight") {
                Some(Linear::load(&p.pp("text_projection"), d, cfg.projection_dim, false)?)
            } else {
                None
            },
            heads: cfg.num_attention_heads,
            act: Activation::from_name(&cfg.hidden_act)?,
            max_positions: cfg.max_position_embeddings,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Config and weights from a `text_encoder/` folder.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Ok(Self::load_with_weights(dir, device, kind)?.0)
    }

    /// `load`, also returning the weights, whose tensors the model holds (not copies).
    pub fn load_with_weights(dir: &Path, device: Device, kind: Kind) -> Result<(Self, Weights)> {
        let cfg = ClipTextConfig::from_dir(dir)?;
        let weights = Weights::load_dir(dir, device, kind)?;
        Ok((Self::new(&weights.root(), &cfg)?, weights))
    }

    /// `last_hidden_state` (after `final_layer_norm`), [batch, seq, hidden], for `input_ids`
    /// of shape [batch, seq] with seq ≤ max_position_embeddings.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        self.final_layer_norm.forward(&self.hidden_after(input_ids, self.layers.len()))
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> i64 {
        self.token_embedding.weight.size()[1]
    }

    /// Width of the projected pooled output, for an encoder with `text_projection`.
    pub fn projection_dim(&self) -> Option<i64> {
        self.text_projection.as_ref().map(|p| p.weight.size()[0])
    }

    /// SDXL's reading of the encoder: `hidden_states[-2]` and, with `pooled` (which needs
    /// `text_projection`), the projected pooled output: the final-normed last hidden state
    /// at the end-of-text position.
    pub fn forward_penultimate(&self, input_ids: &Tensor, pooled: bool) -> PenultimateOutput {
        let n = self.layers.len();
        assert!(n >= 2, "the penultimate hidden state needs at least 2 encoder layers, this encoder has {n}");
        let hidden = self.hidden_after(input_ids, n - 1);
        let pooled = pooled.then(|| {
            let last = self.final_layer_norm.forward(&self.layers[n - 1].forward(&hidden, self.heads, self.act, true));
            self.project_at_eos(input_ids, &last)
        });
        PenultimateOutput { hidden, pooled }
    }

    /// The projected pooled output alone (`CLIPModel.get_text_features`), [batch, projection_dim]:
    /// the final-normed last hidden state at the end-of-text position through `text_projection`.
    pub fn forward_projected(&self, input_ids: &Tensor) -> Tensor {
        self.project_at_eos(input_ids, &self.forward(input_ids))
    }

    /// `last` [batch, seq, hidden] at each row's end-of-text position, through `text_projection`.
    fn project_at_eos(&self, input_ids: &Tensor, last: &Tensor) -> Tensor {
        let projection = self.text_projection.as_ref().expect("pooled output needs text_projection");
        let ids = input_ids.to_kind(Kind::Int64);
        let positions = if self.eos_token_id == 2 {
            ids.argmax(-1, false)
        } else {
            ids.eq(self.eos_token_id).to_kind(Kind::Int).argmax(-1, false)
        };
        let rows = Tensor::arange(ids.size()[0], (Kind::Int64, ids.device()));
        projection.forward(&last.index(&[Some(rows), Some(positions)]))
    }

    /// The hidden state after the first `layers` encoder layers (0: the embeddings).
    fn hidden_after(&self, input_ids: &Tensor, layers: usize) -> Tensor {
        let seq = *input_ids.size().last().expect("[batch, seq] ids");
        assert!(seq <= self.max_positions, "{seq} tokens exceed max_position_embeddings {}", self.max_positions);
        let positions = Tensor::arange(seq, (Kind::Int64, input_ids.device()));
        let mut x = self.token_embedding.forward(input_ids) + self.position_embedding.forward(&positions);
        for layer in &self.layers[..layers] {
            x = layer.forward(&x, self.heads, self.act, true);
        }
        x
    }
}
