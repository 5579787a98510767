//! The VAE of an original-layout checkpoint (`first_stage_model.*`, or a standalone VAE
//! file with or without that prefix): its diffusers config from tensor shapes and the key
//! renames to diffusers' `AutoencoderKL`, the mid-block attention's 1×1 convolutions
//! becoming linear layers.
use super::plan::{Op, Plan};
use super::safetensors::Header;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Where the VAE's tensors are in a file, and whether they already have diffusers' names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VaeLayout {
    Original { prefix: String },
    Diffusers,
}

/// Finds the VAE in `h`: under `first_stage_model.`, at the root (a standalone original
/// VAE), or in diffusers' layout (a standalone diffusers VAE).
pub fn locate(h: &Header) -> Option<VaeLayout> {
    if h.contains("encoder.down_blocks.0.resnets.0.conv1.weight") {
        return Some(VaeLayout::Diffusers);
    }
    ["first_stage_model.", "vae.", ""]
        .into_iter()
        .find(|p| h.contains(&format!("{p}encoder.down.0.block.0.conv1.weight")))
        .map(|p| VaeLayout::Original { prefix: p.to_string() })
}

fn shape<'a>(h: &'a Header, name: &str) -> Result<&'a [i64]> {
    h.weight_shape(name, "VAE")
}

fn indices(h: &Header, prefix: &str) -> BTreeSet<usize> {
    h.names_with_prefix(prefix).filter_map(|k| k[prefix.len()..].split('.').next()?.parse().ok()).collect()
}

/// The diffusers config (vae/config.json) of the VAE, with `scaling_factor` and
/// `sample_size` from the family (the file does not record them).
pub fn config(h: &Header, layout: &VaeLayout, scaling_factor: f64, sample_size: i64) -> Result<Value> {
    let (root, down, block) = match layout {
        VaeLayout::Original { prefix } => (prefix.as_str(), format!("{prefix}encoder.down."), "block"),
        VaeLayout::Diffusers => ("", "encoder.down_blocks.".to_string(), "resnets"),
    };
    let blocks = indices(h, &down);
    let channels = blocks
        .iter()
        .map(|b| Ok(shape(h, &format!("{down}{b}.{block}.0.conv2.weight"))?[0]))
        .collect::<Result<Vec<i64>>>()?;
    let layers = indices(h, &format!("{down}0.{block}.")).len();
    let conv_in = shape(h, &format!("{root}encoder.conv_in.weight"))?;
    let mid_attn = match layout {
        VaeLayout::Original { prefix } => format!("{prefix}encoder.mid.attn_1.q.weight"),
        VaeLayout::Diffusers => "encoder.mid_block.attentions.0.to_q.weight".into(),
    };
    Ok(json!({
        "in_channels": conv_in[1],
        "out_channels": shape(h, &format!("{root}decoder.conv_out.weight"))?[0],
        "down_block_types": vec!["DownEncoderBlock2D"; channels.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; channels.len()],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": shape(h, &format!("{root}decoder.conv_in.weight"))?[1],
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": h.contains(&mid_attn) || h.contains("encoder.mid_block.attentions.0.query.weight"),
    }))
}

/// The diffusers name of one VAE tensor (without the file's prefix), and how to convert it.
fn rename(key: &str, blocks: usize) -> Option<(String, Op)> {
    let fixed = [
        ("encoder.norm_out.", "encoder.conv_norm_out."),
        ("decoder.norm_out.", "decoder.conv_norm_out."),
        ("encoder.conv_in.", "encoder.conv_in."),
        ("encoder.conv_out.", "encoder.conv_out."),
        ("decoder.conv_in.", "decoder.conv_in."),
        ("decoder.conv_out.", "decoder.conv_out."),
        ("quant_conv.", "quant_conv."),
        ("post_quant_conv.", "post_quant_conv."),
    ];
    for (old, new) in fixed {
        if let Some(rest) = key.strip_prefix(old) {
            return Some((format!("{new}{rest}"), Op::Copy));
        }
    }
    let (coder, rest) = key.split_once('.')?;
    let resnet = |leaf: &str| leaf.replace("nin_shortcut", "conv_shortcut");
    if let Some(rest) = rest.strip_prefix("mid.") {
        let (sub, leaf) = rest.split_once('.')?;
        return Some(match sub {
            "block_1" | "block_2" => {
                let i = if sub == "block_1" { 0 } else { 1 };
                (format!("{coder}.mid_block.resnets.{i}.{}", resnet(leaf)), Op::Copy)
            }
            "attn_1" => {
                let (name, param) = leaf.split_once('.')?;
                let name = match name {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return None,
                };
                let op = if name == "group_norm" { Op::Copy } else { Op::Squeeze };
                (format!("{coder}.mid_block.attentions.0.{name}.{param}"), op)
            }
            _ => return None,
        });
    }
    let (side, rest) = match coder {
        "encoder" => ("down", rest.strip_prefix("down.")?),
        "decoder" => ("up", rest.strip_prefix("up.")?),
        _ => return None,
    };
    let (b, rest) = rest.split_once('.')?;
    let b: usize = b.parse().ok()?;
    // The original decoder numbers its blocks from the lowest resolution up.
    let block = if side == "up" { blocks.checked_sub(b + 1)? } else { b };
    let base = format!("{coder}.{side}_blocks.{block}");
    if let Some(leaf) = rest.strip_prefix("block.") {
        return Some((format!("{base}.resnets.{}", resnet(leaf)), Op::Copy));
    }
    let sampler = if side == "down" { "downsample.conv." } else { "upsample.conv." };
    let leaf = rest.strip_prefix(sampler)?;
    Some((format!("{base}.{side}samplers.0.conv.{leaf}"), Op::Copy))
}

/// The plan that turns the VAE's tensors into diffusers' names.
pub fn plan(h: &Header, layout: &VaeLayout) -> Result<Plan> {
    let mut plan = Plan::default();
    match layout {
        VaeLayout::Diffusers => {
            for key in h.tensors.keys() {
                plan.push(key.clone(), key.clone(), Op::Copy);
            }
        }
        VaeLayout::Original { prefix } => {
            let blocks = indices(h, &format!("{prefix}decoder.up.")).len();
            let keys: Vec<&str> = if prefix.is_empty() {
                h.tensors.keys().map(String::as_str).collect()
            } else {
                h.names_with_prefix(prefix).collect()
            };
            for key in keys {
                let short = &key[prefix.len()..];
                match rename(short, blocks) {
                    Some((target, op)) => plan.push(target, key, op),
                    // A standalone VAE file may hold other tensors; training checkpoints may
                    // keep the autoencoder's loss (LPIPS, discriminator) next to it.
                    None if prefix.is_empty() || short.starts_with("loss.") => {}
                    None => bail!("{}: VAE tensor `{key}` has no diffusers counterpart", h.path.display()),
                }
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::{rename, Op};

    #[test]
    fn renames_follow_diffusers() {
        let cases = [
            ("encoder.down.1.block.0.nin_shortcut.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
            ("encoder.down.0.downsample.conv.bias", "encoder.down_blocks.0.downsamplers.0.conv.bias"),
            ("decoder.up.3.block.2.conv1.weight", "decoder.up_blocks.0.resnets.2.conv1.weight"),
            ("decoder.up.1.upsample.conv.weight", "decoder.up_blocks.2.upsamplers.0.conv.weight"),
            ("decoder.mid.block_2.norm1.bias", "decoder.mid_block.resnets.1.norm1.bias"),
            ("encoder.norm_out.weight", "encoder.conv_norm_out.weight"),
        ];
        for (old, new) in cases {
            assert_eq!(rename(old, 4), Some((new.to_string(), Op::Copy)), "{old}");
        }
        let attn = rename("decoder.mid.attn_1.proj_out.weight", 4);
        assert_eq!(attn, Some(("decoder.mid_block.attentions.0.to_out.0.weight".into(), Op::Squeeze)));
    }
}
