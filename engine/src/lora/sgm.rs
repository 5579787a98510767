//! kohya's SDXL LoRAs name UNet modules as the original (SGM/LDM) UNet does:
//! `input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `middle_block_0_in_layers_2`,
//! `output_blocks_2_2_conv`. This maps such a name to the diffusers module it means, with
//! the block layout read from the model's own parameter names.
use std::collections::{BTreeMap, BTreeSet};

/// What each numbered SGM block is in the diffusers UNet.
#[derive(Debug, Default)]
pub struct SgmLayout {
    /// `input_blocks.i` for i ≥ 1: a layer (down block, resnet index) or a downsampler.
    input: Vec<(usize, Option<usize>)>,
    /// `output_blocks.i`: (up block, layer index).
    output: Vec<(usize, usize)>,
    /// Up blocks with attentions (their inner index 1 is an attention, else the upsampler).
    up_attention: BTreeSet<usize>,
    /// Last layer index of each up block (where its upsampler sits).
    up_last: BTreeMap<usize, usize>,
}

impl SgmLayout {
    /// From the UNet's module names (dotted, without `.weight`).
    pub fn new<'a>(modules: impl Iterator<Item = &'a str>) -> Self {
        let mut down_layers: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        let mut down_sample: BTreeSet<usize> = BTreeSet::new();
        let mut up_layers: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        let mut up_attention = BTreeSet::new();
        for m in modules {
            let parts: Vec<&str> = m.split('.').collect();
            let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
            match (parts.first().copied(), num(1), parts.get(2).copied(), num(3)) {
                (Some("down_blocks"), Some(b), Some("resnets"), Some(j)) => {
                    down_layers.entry(b).or_default().insert(j);
                }
                (Some("down_blocks"), Some(b), Some("downsamplers"), _) => {
                    down_sample.insert(b);
                }
                (Some("up_blocks"), Some(b), Some("resnets"), Some(j)) => {
                    up_layers.entry(b).or_default().insert(j);
                }
                (Some("up_blocks"), Some(b), Some("attentions"), _) => {
                    up_attention.insert(b);
                }
                _ => {}
            }
        }
        let mut layout = Self { up_attention, ..Self::default() };
        for (b, layers) in &down_layers {
            layout.input.extend(layers.iter().map(|j| (*b, Some(*j))));
            if down_sample.contains(b) {
                layout.input.push((*b, None));
            }
        }
        for (b, layers) in &up_layers {
            layout.output.extend(layers.iter().map(|j| (*b, *j)));
            layout.up_last.insert(*b, layers.iter().copied().max().unwrap_or(0));
        }
        layout
    }

    /// The diffusers module (underscored) an SGM name (underscored) means, if any.
    pub fn to_diffusers(&self, name: &str) -> Option<String> {
        let fixed = [
            ("time_embed_0", "time_embedding_linear_1"),
            ("time_embed_2", "time_embedding_linear_2"),
            ("label_emb_0_0", "add_embedding_linear_1"),
            ("label_emb_0_2", "add_embedding_linear_2"),
            ("input_blocks_0_0", "conv_in"),
            ("out_2", "conv_out"),
        ];
        if let Some((_, d)) = fixed.iter().find(|(s, _)| *s == name) {
            return Some(d.to_string());
        }
        if let Some(rest) = name.strip_prefix("input_blocks_") {
            let (i, k, rest) = two_numbers(rest)?;
            let (b, layer) = *self.input.get(i.checked_sub(1)?)?;
            return match (layer, k) {
                (None, 0) => Some(format!("down_blocks_{b}_downsamplers_0_{}", rest.replace("op", "conv"))),
                (Some(j), 0) => Some(format!("down_blocks_{b}_resnets_{j}_{}", resnet_leaf(rest)?)),
                (Some(j), 1) => Some(format!("down_blocks_{b}_attentions_{j}_{rest}")),
                _ => None,
            };
        }
        if let Some(rest) = name.strip_prefix("middle_block_") {
            let (k, rest) = rest.split_once('_')?;
            return match k {
                "0" => Some(format!("mid_block_resnets_0_{}", resnet_leaf(rest)?)),
                "1" => Some(format!("mid_block_attentions_0_{rest}")),
                "2" => Some(format!("mid_block_resnets_1_{}", resnet_leaf(rest)?)),
                _ => None,
            };
        }
        if let Some(rest) = name.strip_prefix("output_blocks_") {
            let (i, k, rest) = two_numbers(rest)?;
            let (b, j) = *self.output.get(i)?;
            let attention = self.up_attention.contains(&b);
            let upsampler = || (self.up_last.get(&b) == Some(&j)).then(|| format!("up_blocks_{b}_upsamplers_0_{rest}"));
            return match k {
                0 => Some(format!("up_blocks_{b}_resnets_{j}_{}", resnet_leaf(rest)?)),
                1 if attention => Some(format!("up_blocks_{b}_attentions_{j}_{rest}")),
                1 | 2 => upsampler(),
                _ => None,
            };
        }
        None
    }
}

/// `I_K_rest` → (I, K, rest).
fn two_numbers(s: &str) -> Option<(usize, usize, &str)> {
    let (i, rest) = s.split_once('_')?;
    let (k, rest) = rest.split_once('_')?;
    Some((i.parse().ok()?, k.parse().ok()?, rest))
}

fn resnet_leaf(sgm: &str) -> Option<&'static str> {
    Some(match sgm {
        "in_layers_2" => "conv1",
        "out_layers_3" => "conv2",
        "emb_layers_1" => "time_emb_proj",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::SgmLayout;

    /// SDXL's UNet: down blocks of 2 layers (attention in 1 and 2), up blocks of 3 layers
    /// (attention in 0 and 1), downsamplers on blocks 0 and 1, upsamplers on 0 and 1.
    fn sdxl() -> SgmLayout {
        let mut names = Vec::new();
        for b in 0..3 {
            for j in 0..2 {
                names.push(format!("down_blocks.{b}.resnets.{j}.conv1"));
                if b > 0 {
                    names.push(format!("down_blocks.{b}.attentions.{j}.proj_in"));
                }
            }
            if b < 2 {
                names.push(format!("down_blocks.{b}.downsamplers.0.conv"));
            }
            for j in 0..3 {
                names.push(format!("up_blocks.{b}.resnets.{j}.conv1"));
                if b < 2 {
                    names.push(format!("up_blocks.{b}.attentions.{j}.proj_in"));
                }
            }
            if b < 2 {
                names.push(format!("up_blocks.{b}.upsamplers.0.conv"));
            }
        }
        SgmLayout::new(names.iter().map(String::as_str))
    }

    #[test]
    fn sdxl_names() {
        let l = sdxl();
        let cases = [
            ("input_blocks_0_0", "conv_in"),
            ("input_blocks_1_0_in_layers_2", "down_blocks_0_resnets_0_conv1"),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            ("input_blocks_8_0_skip_connection", "down_blocks_2_resnets_1_conv_shortcut"),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            ("middle_block_2_emb_layers_1", "mid_block_resnets_1_time_emb_proj"),
            ("output_blocks_0_1_proj_out", "up_blocks_0_attentions_0_proj_out"),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            ("output_blocks_8_0_out_layers_3", "up_blocks_2_resnets_2_conv2"),
            ("label_emb_0_2", "add_embedding_linear_2"),
            ("out_2", "conv_out"),
        ];
        for (sgm, diffusers) in cases {
            assert_eq!(l.to_diffusers(sgm).as_deref(), Some(diffusers), "{sgm}");
        }
        assert_eq!(l.to_diffusers("output_blocks_1_2_conv"), None);
        assert_eq!(l.to_diffusers("input_blocks_99_0_in_layers_2"), None);
    }
}
