//! The UNet's transformer layers (diffusers' attention_processor.py `Attention` with
//! `AttnProcessor2_0`, attention.py `BasicTransformerBlock`/`FeedForward`,
//! transformer_2d.py `Transformer2DModel` on continuous input), plus an opt-in path that
//! computes cross-attention probabilities explicitly for Grad-SAM.
use super::nn::{is_channels_last, Conv2d, GroupNorm, LayerNorm, Linear};
use super::weights::WeightPath;
use anyhow::{bail, Result};
use std::cell::RefCell;
use tch::{Kind, Tensor};

/// Which cross-attention layers (attn2, numbered in forward order) to capture, and the
/// probabilities captured from them. Passed down the UNet when a caller asks for them.
pub(crate) struct AttnCapture<'a> {
    layers: &'a [usize],
    probs: RefCell<Vec<(usize, Tensor)>>,
}

impl<'a> AttnCapture<'a> {
    pub(crate) fn new(layers: &'a [usize]) -> Self {
        Self { layers, probs: RefCell::new(Vec::new()) }
    }

    fn wants(&self, layer: usize) -> bool {
        self.layers.contains(&layer)
    }

    pub(crate) fn into_probs(self) -> Vec<(usize, Tensor)> {
        self.probs.into_inner()
    }
}

/// The encoder hidden states of a UNet call, with the keys and values each cross-attention
/// layer (attn2) projects from them, computed on first use and kept: every denoising step
/// of a job attends to the same states, so a context prepared once per job saves those
/// projections in all later steps. SDXL-style UNets (`addition_embed_type = "text_time"`)
/// also take the added conditioning that goes with the states.
pub struct CrossContext {
    states: Tensor,
    added: Option<AddedCond>,
    /// Indexed by attn2 number: [B, heads, keys, d] keys and values.
    kv: RefCell<Vec<Option<(Tensor, Tensor)>>>,
}

/// SDXL's added conditioning (diffusers' `added_cond_kwargs`), one row per batch row.
pub struct AddedCond {
    /// The pooled text embedding [B, projection_dim] (`text_embeds`).
    pub text_embeds: Tensor,
    /// [B, 6]: original size (h, w), crop top-left (top, left), target size (h, w).
    pub time_ids: Tensor,
}

impl AddedCond {
    fn rows(&self, start: i64, len: i64) -> Self {
        Self { text_embeds: self.text_embeds.narrow(0, start, len), time_ids: self.time_ids.narrow(0, start, len) }
    }

    fn repeat(&self, times: i64) -> Self {
        Self { text_embeds: self.text_embeds.repeat([times, 1]), time_ids: self.time_ids.repeat([times, 1]) }
    }
}

impl Clone for AddedCond {
    fn clone(&self) -> Self {
        Self { text_embeds: self.text_embeds.shallow_clone(), time_ids: self.time_ids.shallow_clone() }
    }
}

impl CrossContext {
    /// `states`: [B, keys, cross_attention_dim].
    pub fn new(states: &Tensor) -> Self {
        Self { states: states.shallow_clone(), added: None, kv: RefCell::new(Vec::new()) }
    }

    /// `states` with SDXL's added conditioning (rows matching the states' rows).
    pub fn with_added(states: &Tensor, added: AddedCond) -> Self {
        Self { states: states.shallow_clone(), added: Some(added), kv: RefCell::new(Vec::new()) }
    }

    pub fn states(&self) -> &Tensor {
        &self.states
    }

    pub fn added(&self) -> Option<&AddedCond> {
        self.added.as_ref()
    }

    /// Rows `start..start+len` of the batch, as a fresh context.
    pub fn rows(&self, start: i64, len: i64) -> Self {
        Self {
            states: self.states.narrow(0, start, len),
            added: self.added.as_ref().map(|a| a.rows(start, len)),
            kv: RefCell::new(Vec::new()),
        }
    }

    /// The batch repeated `times` times, as a fresh context.
    pub fn repeat(&self, times: i64) -> Self {
        Self {
            states: self.states.repeat([times, 1, 1]),
            added: self.added.as_ref().map(|a| a.repeat(times)),
            kv: RefCell::new(Vec::new()),
        }
    }

    /// Several contexts' rows as one (a UNet call stacking several jobs). A layer's keys
    /// and values are the parts' own, concatenated, where every part has them; the rest
    /// are projected on first use (`share_kv` hands those back to the parts).
    pub fn concat(parts: &[&CrossContext]) -> Self {
        let states: Vec<&Tensor> = parts.iter().map(|c| &c.states).collect();
        let added = parts[0].added.as_ref().map(|_| {
            let each = |f: fn(&AddedCond) -> &Tensor| -> Vec<&Tensor> {
                parts.iter().map(|c| f(c.added.as_ref().expect("contexts of one UNet"))).collect()
            };
            AddedCond {
                text_embeds: Tensor::cat(&each(|a| &a.text_embeds), 0),
                time_ids: Tensor::cat(&each(|a| &a.time_ids), 0),
            }
        });
        let caches: Vec<_> = parts.iter().map(|c| c.kv.borrow()).collect();
        let layers = caches.iter().map(|c| c.len()).min().unwrap_or(0);
        let kv = (0..layers)
            .map(|i| {
                let each: Option<Vec<&(Tensor, Tensor)>> = caches.iter().map(|c| c[i].as_ref()).collect();
                each.map(|each| {
                    let keys: Vec<&Tensor> = each.iter().map(|(k, _)| k).collect();
                    let values: Vec<&Tensor> = each.iter().map(|(_, v)| v).collect();
                    (Tensor::cat(&keys, 0), Tensor::cat(&values, 0))
                })
            })
            .collect();
        Self { states: Tensor::cat(&states, 0), added, kv: RefCell::new(kv) }
    }

    /// Gives `parts` (as passed to `concat`) the keys and values this context projected
    /// that they lack, so their later steps reuse them.
    pub fn share_kv(&self, parts: &[&CrossContext]) {
        let cache = self.kv.borrow();
        let mut row = 0;
        for part in parts {
            let rows = part.states.size()[0];
            let mut own = part.kv.borrow_mut();
            if own.len() < cache.len() {
                own.resize_with(cache.len(), || None);
            }
            for (mine, (k, v)) in own.iter_mut().zip(cache.iter()).filter_map(|(m, c)| c.as_ref().map(|c| (m, c))) {
                if mine.is_none() {
                    *mine = Some((k.narrow(0, row, rows), v.narrow(0, row, rows)));
                }
            }
            row += rows;
        }
    }

    /// The same conditioning, detached and converted to `kind` (fresh context).
    pub fn detached(&self, kind: Kind) -> Self {
        let conv = |t: &Tensor| t.detach().to_kind(kind);
        Self {
            states: conv(&self.states),
            added: self
                .added
                .as_ref()
                .map(|a| AddedCond { text_embeds: conv(&a.text_embeds), time_ids: a.time_ids.detach() }),
            kv: RefCell::new(Vec::new()),
        }
    }

    /// Layer `index`'s keys and values, projected by `attn` the first time they are asked for.
    fn kv(&self, index: usize, attn: &Attention) -> (Tensor, Tensor) {
        let mut cache = self.kv.borrow_mut();
        if index >= cache.len() {
            cache.resize_with(index + 1, || None);
        }
        let (k, v) = cache[index].get_or_insert_with(|| attn.kv(&self.states));
        (k.shallow_clone(), v.shallow_clone())
    }
}

pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    head_dim: i64,
    /// Only the explicit path honours it (as diffusers' AttnProcessor does); SDPA ignores it
    /// exactly like AttnProcessor2_0.
    upcast: bool,
}

impl Attention {
    /// `context_dim` is the key/value input width (`None`: self-attention).
    pub fn new(
        p: &WeightPath,
        query_dim: i64,
        context_dim: Option<i64>,
        heads: i64,
        head_dim: i64,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::load(&p.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(&p.pp("to_k"), kv_dim, inner, false)?,
            to_v: Linear::load(&p.pp("to_v"), kv_dim, inner, false)?,
            to_out: Linear::load(&p.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            head_dim,
            upcast,
        })
    }

    /// [B, N, heads·d] → [B, heads, N, d]
    fn split_heads(&self, x: &Tensor) -> Tensor {
        let (b, n, _) = x.size3().expect("[batch, tokens, dim]");
        x.view([b, n, self.heads, self.head_dim]).transpose(1, 2)
    }

    /// Keys and values of `context`, split into heads: [B, heads, keys, d] each.
    pub fn kv(&self, context: &Tensor) -> (Tensor, Tensor) {
        (self.split_heads(&self.to_k.forward(context)), self.split_heads(&self.to_v.forward(context)))
    }

    fn qkv(&self, x: &Tensor, context: Option<&Tensor>) -> (Tensor, Tensor, Tensor) {
        let (k, v) = self.kv(context.unwrap_or(x));
        (self.split_heads(&self.to_q.forward(x)), k, v)
    }

    fn output(&self, h: Tensor) -> Tensor {
        let (b, _, n, _) = h.size4().expect("[batch, heads, tokens, d]");
        self.to_out.forward(&h.transpose(1, 2).reshape([b, n, self.heads * self.head_dim]))
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let (q, k, v) = self.qkv(x, context);
        self.attend(&q, &k, &v)
    }

    /// `forward` with keys and values already projected (`kv`).
    pub fn forward_kv(&self, x: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        self.attend(&self.split_heads(&self.to_q.forward(x)), k, v)
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let h = Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, None, false);
        self.output(h)
    }

    /// Like `forward`, also returning softmax(q·kᵀ·scale) as [B, heads, queries, keys],
    /// computed as diffusers' `get_attention_scores` does (q, k in float32 when upcasting).
    pub fn forward_with_probs(&self, x: &Tensor, context: Option<&Tensor>) -> (Tensor, Tensor) {
        let (q, k, v) = self.qkv(x, context);
        self.attend_with_probs(q, k, v)
    }

    /// `forward_with_probs` with keys and values already projected (`kv`).
    pub fn forward_with_probs_kv(&self, x: &Tensor, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        self.attend_with_probs(self.split_heads(&self.to_q.forward(x)), k.shallow_clone(), v.shallow_clone())
    }

    fn attend_with_probs(&self, q: Tensor, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let kind = q.kind();
        let (qs, ks) = if self.upcast { (q.to_kind(Kind::Float), k.to_kind(Kind::Float)) } else { (q, k) };
        let scores = qs.matmul(&ks.transpose(-1, -2)) * (self.head_dim as f64).powf(-0.5);
        let mut probs = scores.softmax(-1, None::<Kind>).to_kind(kind);
        // Nothing upstream requires grad (weights are plain tensors), so make the
        // probabilities a graph leaf: the rest of the UNet is then recorded from here on and
        // d(output)/d(probs) can be taken. Detaching loses nothing when nothing requires grad.
        if !probs.requires_grad() {
            probs = probs.detach().set_requires_grad(true);
        }
        (self.output(probs.matmul(&v)), probs)
    }
}

/// GEGLU feed-forward: proj → (h, gate) → h·gelu(gate) → linear.
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn new(p: &WeightPath, dim: i64, inner: i64) -> Result<Self> {
        Ok(Self {
            proj_in: Linear::load(&p.pp("net.0.proj"), dim, inner * 2, true)?,
            proj_out: Linear::load(&p.pp("net.2"), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.proj_in.forward(x).chunk(2, -1);
        self.proj_out.forward(&(&h[0] * h[1].gelu("none")))
    }
}

pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
    /// This block's attn2 number among all cross-attention layers of the UNet.
    cross_index: usize,
}

pub struct TransformerConfig {
    pub channels: i64,
    pub heads: i64,
    pub layers: usize,
    pub cross_attention_dim: i64,
    pub groups: i64,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

impl BasicTransformerBlock {
    fn new(p: &WeightPath, c: &TransformerConfig, cross_index: usize) -> Result<Self> {
        let (dim, heads) = (c.channels, c.heads);
        let head_dim = dim / heads;
        let ctx = c.cross_attention_dim;
        let eps = 1e-5; // Transformer2DModel's norm_eps default; the UNet never sets it
        Ok(Self {
            norm1: LayerNorm::load(&p.pp("norm1"), dim, eps)?,
            attn1: Attention::new(
                &p.pp("attn1"),
                dim,
                c.only_cross_attention.then_some(ctx),
                heads,
                head_dim,
                c.upcast_attention,
            )?,
            norm2: LayerNorm::load(&p.pp("norm2"), dim, eps)?,
            attn2: Attention::new(&p.pp("attn2"), dim, Some(ctx), heads, head_dim, c.upcast_attention)?,
            norm3: LayerNorm::load(&p.pp("norm3"), dim, eps)?,
            ff: FeedForward::new(&p.pp("ff"), dim, dim * 4)?,
            only_cross_attention: c.only_cross_attention,
            cross_index,
        })
    }

    fn forward(&self, x: &Tensor, context: &CrossContext, capture: Option<&AttnCapture>) -> Tensor {
        let self_ctx = self.only_cross_attention.then_some(context.states());
        let x = self.attn1.forward(&self.norm1.forward(x), self_ctx) + x;
        let n = self.norm2.forward(&x);
        let (k, v) = context.kv(self.cross_index, &self.attn2);
        let a = match capture {
            Some(c) if c.wants(self.cross_index) => {
                let (a, probs) = self.attn2.forward_with_probs_kv(&n, &k, &v);
                c.probs.borrow_mut().push((self.cross_index, probs));
                a
            }
            _ => self.attn2.forward_kv(&n, &k, &v),
        };
        let x = a + x;
        self.ff.forward(&self.norm3.forward(&x)) + x
    }
}

enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn load(p: &WeightPath, linear: bool, cin: i64, cout: i64) -> Result<Self> {
        Ok(if linear {
            Self::Linear(Linear::load(p, cin, cout, true)?)
        } else {
            Self::Conv(Conv2d::load(p, cin, cout, 1, 1, 0)?)
        })
    }
}

/// GroupNorm → proj_in → transformer blocks over the H·W tokens → proj_out, plus residual.
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// `next_cross_index` numbers the attn2 layers in construction (= forward) order.
    pub fn new(p: &WeightPath, c: &TransformerConfig, next_cross_index: &mut usize) -> Result<Self> {
        let ch = c.channels;
        if c.heads <= 0 || ch % c.heads != 0 {
            bail!("{}: {ch} channels cannot be split into {} attention heads", p.name("attn"), c.heads);
        }
        let mut blocks = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            blocks.push(BasicTransformerBlock::new(&p.pp("transformer_blocks").pp(i), c, *next_cross_index)?);
            *next_cross_index += 1;
        }
        Ok(Self {
            norm: GroupNorm::load(&p.pp("norm"), c.groups, ch, 1e-6)?,
            proj_in: Projection::load(&p.pp("proj_in"), c.use_linear_projection, ch, ch)?,
            blocks,
            proj_out: Projection::load(&p.pp("proj_out"), c.use_linear_projection, ch, ch)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &CrossContext, capture: Option<&AttnCapture>) -> Tensor {
        let (b, c, h, w) = x.size4().expect("[batch, channels, height, width]");
        // Token rows are the pixels of a channels-last image: when the UNet runs
        // channels-last (on the CPU), both conversions are free views and the output stays
        // channels-last; otherwise they copy, and the output is contiguous like the input.
        let keep_channels_last = is_channels_last(x);
        let to_tokens = |t: Tensor| t.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let to_image = |t: Tensor| {
            let image = t.reshape([b, h, w, c]).permute([0, 3, 1, 2]);
            if keep_channels_last {
                image
            } else {
                image.contiguous()
            }
        };
        let n = self.norm.forward(x);
        let mut t = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&n)),
            Projection::Linear(lin) => lin.forward(&to_tokens(n)),
        };
        for block in &self.blocks {
            t = block.forward(&t, context, capture);
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(t)),
            Projection::Linear(lin) => to_image(lin.forward(&t)),
        };
        out + x
    }
}
