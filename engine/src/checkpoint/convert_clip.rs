//! Text encoders of original-layout checkpoints → transformers' `CLIPTextModel` names:
//! OpenAI CLIP-L as SD 1.x and SDXL store it (already in transformers' layout under a
//! prefix), and OpenCLIP as SD 2.x and SDXL store it (`resblocks`, fused `in_proj`).
use super::plan::{Op, Plan};
use super::safetensors::Header;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Width of one attention head in every CLIP text model SD uses (L, ViT-H, bigG).
const HEAD_DIM: i64 = 64;

fn shape<'a>(h: &'a Header, name: &str) -> Result<&'a [i64]> {
    h.weight_shape(name, "text-encoder")
}

fn count(h: &Header, prefix: &str) -> usize {
    let ids: BTreeSet<usize> =
        h.names_with_prefix(prefix).filter_map(|k| k[prefix.len()..].split('.').next()?.parse().ok()).collect();
    ids.len()
}

fn text_config(vocab: &[i64], positions: i64, layers: usize, intermediate: i64, act: &str) -> Value {
    let hidden = vocab[1];
    json!({
        "vocab_size": vocab[0],
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": (hidden / HEAD_DIM).max(1),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    })
}

/// OpenAI CLIP under `prefix` (e.g. `cond_stage_model.transformer.`): the names after the
/// prefix are transformers' own; `position_ids` (a buffer) is dropped.
pub fn clip(h: &Header, prefix: &str) -> Result<(Value, Plan)> {
    let t = format!("{prefix}text_model.");
    let cfg = text_config(
        shape(h, &format!("{t}embeddings.token_embedding.weight"))?,
        shape(h, &format!("{t}embeddings.position_embedding.weight"))?[0],
        count(h, &format!("{t}encoder.layers.")),
        shape(h, &format!("{t}encoder.layers.0.mlp.fc1.weight"))?[0],
        "quick_gelu",
    );
    let mut plan = Plan::default();
    for key in h.names_with_prefix(prefix) {
        if !key.ends_with("position_ids") {
            plan.push(&key[prefix.len()..], key, Op::Copy);
        }
    }
    Ok((cfg, plan))
}

/// OpenCLIP under `prefix` (e.g. `cond_stage_model.model.`). `drop_last` leaves out the last
/// residual block: SD 2.x conditions on the penultimate layer, so diffusers' SD 2 text
/// encoder has one layer less and no projection. Otherwise (SDXL's second encoder) every
/// layer is kept and `text_projection` becomes a linear weight (transposed).
pub fn open_clip(h: &Header, prefix: &str, drop_last: bool) -> Result<(Value, Plan)> {
    let file = h.path.display();
    let blocks = format!("{prefix}transformer.resblocks.");
    let total = count(h, &blocks);
    let layers = if drop_last { total.saturating_sub(1) } else { total };
    if layers == 0 {
        bail!("{file}: the OpenCLIP text encoder at {prefix} has {total} layers");
    }
    let vocab = shape(h, &format!("{prefix}token_embedding.weight"))?;
    let mut cfg = text_config(
        vocab,
        shape(h, &format!("{prefix}positional_embedding"))?[0],
        layers,
        shape(h, &format!("{blocks}0.mlp.c_fc.weight"))?[0],
        "gelu",
    );
    let mut plan = Plan::default();
    let m = "text_model.";
    plan.push(format!("{m}embeddings.token_embedding.weight"), format!("{prefix}token_embedding.weight"), Op::Copy);
    plan.push(format!("{m}embeddings.position_embedding.weight"), format!("{prefix}positional_embedding"), Op::Copy);
    for p in ["weight", "bias"] {
        plan.push(format!("{m}final_layer_norm.{p}"), format!("{prefix}ln_final.{p}"), Op::Copy);
    }
    if !drop_last {
        let proj = format!("{prefix}text_projection");
        cfg["projection_dim"] = json!(shape(h, &proj)?[1]);
        plan.push("text_projection.weight", proj, Op::Transpose);
    }
    for i in 0..layers {
        let (src, dst) = (format!("{blocks}{i}."), format!("{m}encoder.layers.{i}."));
        for p in ["weight", "bias"] {
            for (old, new) in [
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
                ("attn.out_proj", "self_attn.out_proj"),
            ] {
                plan.push(format!("{dst}{new}.{p}"), format!("{src}{old}.{p}"), Op::Copy);
            }
            for (part, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                let op = Op::Rows { part: part as i64, parts: 3 };
                plan.push(format!("{dst}self_attn.{name}.{p}"), format!("{src}attn.in_proj_{p}"), op);
            }
        }
    }
    for item in &plan.items {
        if !h.contains(&item.source) {
            bail!("{file}: missing text-encoder tensor `{}`", item.source);
        }
    }
    Ok((cfg, plan))
}
