//! The UNet of an original-layout checkpoint (`model.diffusion_model.*`): its diffusers
//! config, derived from tensor shapes and the family's defaults, and the key renames to
//! diffusers' `UNet2DConditionModel` (SD 1.x, 2.x and SDXL: per-block transformer depth,
//! `label_emb` → `add_embedding`).
use super::detect::UNET;
use super::plan::{Op, Plan};
use super::safetensors::Header;
use super::Family;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Shapes of the UNet's blocks, read from the header.
struct Layout {
    model_channels: i64,
    /// Resnets per down block.
    layers: usize,
    /// Output channels of each down block.
    channels: Vec<i64>,
    /// Transformer depth of each down block (0: no attention).
    depth: Vec<usize>,
    mid_depth: usize,
}

fn shape<'a>(h: &'a Header, leaf: &str) -> Result<&'a [i64]> {
    h.weight_shape(&format!("{UNET}{leaf}"), "UNet")
}

/// How many `prefix<N>.` indices exist under `prefix`.
fn count(h: &Header, prefix: &str) -> usize {
    let full = format!("{UNET}{prefix}");
    let ids: BTreeSet<usize> =
        h.names_with_prefix(&full).filter_map(|k| k[full.len()..].split('.').next()?.parse().ok()).collect();
    ids.len()
}

fn layout(h: &Header) -> Result<Layout> {
    let file = h.path.display();
    let model_channels = shape(h, "input_blocks.0.0.weight")?[0];
    let inputs = count(h, "input_blocks.");
    let downsamples = (1..inputs).filter(|i| h.contains(&format!("{UNET}input_blocks.{i}.0.op.weight"))).count();
    let blocks = downsamples + 1;
    ensure!(
        inputs > 1 && (inputs - 1 - downsamples).is_multiple_of(blocks),
        "{file}: {inputs} UNet input blocks with {downsamples} downsamplers do not form equal down blocks"
    );
    let layers = (inputs - 1 - downsamples) / blocks;
    let (mut channels, mut depth) = (Vec::new(), Vec::new());
    for b in 0..blocks {
        let i = 1 + b * (layers + 1);
        channels.push(shape(h, &format!("input_blocks.{i}.0.out_layers.3.weight"))?[0]);
        depth.push(count(h, &format!("input_blocks.{i}.1.transformer_blocks.")));
    }
    let mid_depth = count(h, "middle_block.1.transformer_blocks.");
    Ok(Layout { model_channels, layers, channels, depth, mid_depth })
}

/// The diffusers config (unet/config.json) of the checkpoint's UNet.
pub fn config(h: &Header, family: Family) -> Result<Value> {
    let l = layout(h)?;
    let attn = (0..l.depth.len())
        .find(|&b| l.depth[b] > 0)
        .map(|b| format!("input_blocks.{}.1.", 1 + b * (l.layers + 1)))
        .with_context(|| format!("{}: the UNet has no cross-attention", h.path.display()))?;
    let context = shape(h, &format!("{attn}transformer_blocks.0.attn2.to_k.weight"))?[1];
    let linear = shape(h, &format!("{attn}proj_in.weight"))?.len() == 2;
    let down: Vec<&str> = l.depth.iter().map(|&d| if d > 0 { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
    let up: Vec<&str> = l.depth.iter().rev().map(|&d| if d > 0 { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
    // Head counts: SD 1.x uses 8 heads everywhere; SD 2.x and SDXL use 64-wide heads.
    let heads = match family {
        Family::Sd1 => json!(8),
        Family::Sd2 | Family::Sdxl => json!(l.channels.iter().map(|c| (c / 64).max(1)).collect::<Vec<_>>()),
    };
    // diffusers counts one transformer layer for blocks without attention.
    let per_block: Vec<usize> = l.depth.iter().map(|&d| d.max(1)).collect();
    let depths = if per_block.iter().all(|&d| d == 1) && l.mid_depth <= 1 { json!(1) } else { json!(per_block) };
    let mut cfg = json!({
        "sample_size": family.native_size(None) / 8,
        "in_channels": shape(h, "input_blocks.0.0.weight")?[1],
        "out_channels": shape(h, "out.2.weight")?[0],
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": if l.mid_depth > 0 { Value::from("UNetMidBlock2DCrossAttn") } else { Value::Null },
        "block_out_channels": l.channels,
        "layers_per_block": l.layers,
        "attention_head_dim": heads,
        "cross_attention_dim": context,
        "transformer_layers_per_block": depths,
        "use_linear_projection": linear,
        "upcast_attention": family == Family::Sd2,
        "norm_num_groups": 32,
    });
    if family == Family::Sdxl {
        let adm = shape(h, "label_emb.0.0.weight")?[1];
        let pooled = family.pooled_dim(h)?;
        ensure!(
            adm > pooled && (adm - pooled) % 6 == 0,
            "{}: label_emb takes {adm} features, not the pooled text width {pooled} plus 6 time embeddings",
            h.path.display()
        );
        cfg["addition_embed_type"] = json!("text_time");
        cfg["addition_time_embed_dim"] = json!((adm - pooled) / 6);
        cfg["projection_class_embeddings_input_dim"] = json!(adm);
    }
    ensure!(l.model_channels == l.channels[0], "{}: conv_in width differs from the first block", h.path.display());
    Ok(cfg)
}

fn resnet_leaf(leaf: &str) -> String {
    [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("emb_layers.1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ]
    .iter()
    .find_map(|(old, new)| leaf.strip_prefix(old).map(|rest| format!("{new}{rest}")))
    .unwrap_or_else(|| leaf.to_string())
}

/// The diffusers name of one UNet tensor (its name without `model.diffusion_model.`).
fn rename(key: &str, layers: usize) -> Option<String> {
    let fixed = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("middle_block.0.", "mid_block.resnets.0."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
    ];
    for (old, new) in fixed {
        if let Some(rest) = key.strip_prefix(old) {
            let rest = if old.starts_with("middle_block.0") || old.starts_with("middle_block.2") {
                resnet_leaf(rest)
            } else {
                rest.to_string()
            };
            return Some(format!("{new}{rest}"));
        }
    }
    let (side, rest) = if let Some(r) = key.strip_prefix("input_blocks.") {
        ("down", r)
    } else {
        ("up", key.strip_prefix("output_blocks.")?)
    };
    let mut parts = rest.splitn(3, '.');
    let i: usize = parts.next()?.parse().ok()?;
    let sub = parts.next()?;
    let leaf = parts.next()?;
    let (block, layer) = match side {
        "down" if i == 0 => return None,
        "down" => ((i - 1) / (layers + 1), (i - 1) % (layers + 1)),
        _ => (i / (layers + 1), i % (layers + 1)),
    };
    let base = format!("{side}_blocks.{block}");
    Some(match (side, sub) {
        ("down", "0") if leaf.starts_with("op.") => format!("{base}.downsamplers.0.conv.{}", &leaf[3..]),
        (_, "0") => format!("{base}.resnets.{layer}.{}", resnet_leaf(leaf)),
        ("up", "1" | "2") if leaf.starts_with("conv.") => format!("{base}.upsamplers.0.{leaf}"),
        (_, "1") => format!("{base}.attentions.{layer}.{leaf}"),
        _ => return None,
    })
}

/// The plan that turns every `model.diffusion_model.*` tensor into its diffusers name.
pub fn plan(h: &Header) -> Result<Plan> {
    let layers = layout(h)?.layers;
    let mut plan = Plan::default();
    for key in h.names_with_prefix(UNET) {
        let short = &key[UNET.len()..];
        let Some(target) = rename(short, layers) else {
            bail!("{}: UNet tensor `{key}` has no diffusers counterpart", h.path.display());
        };
        plan.push(target, key, Op::Copy);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::rename;

    #[test]
    fn renames_follow_diffusers() {
        let cases = [
            ("input_blocks.1.0.in_layers.0.weight", "down_blocks.0.resnets.0.norm1.weight"),
            ("input_blocks.3.0.op.bias", "down_blocks.0.downsamplers.0.conv.bias"),
            ("input_blocks.5.1.proj_in.weight", "down_blocks.1.attentions.1.proj_in.weight"),
            ("middle_block.2.emb_layers.1.weight", "mid_block.resnets.1.time_emb_proj.weight"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            ("output_blocks.4.0.skip_connection.weight", "up_blocks.1.resnets.1.conv_shortcut.weight"),
            ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
        ];
        for (old, new) in cases {
            assert_eq!(rename(old, 2).as_deref(), Some(new), "{old}");
        }
    }
}
