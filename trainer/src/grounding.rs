//! Attention grounding loss (TokenCompose, Wang et al. 2024), with the generator's exact
//! object masks as the segmentation.
//!
//! The diffusion loss alone does not teach the UNet the position words: where the noisy latent
//! shows the object, the UNet need not read where it is; where it does not, the gain from
//! placing a blurry mean object right is tiny. This loss asks, at every timestep and every
//! cross-attention layer, that the attention of an object's words (colour, shape, size,
//! position) fall on that object's cells. At high noise only the words can say where that is,
//! so the queries must learn absolute position. It is also what Grad-SAM reads: the heatmaps
//! are these probabilities times their gradients.
use crate::engine::tokenizer::ClipTokenizer;
use tch::{Device, Kind, Tensor};

/// Object slots per caption (scenes have 1–3 objects).
pub const SLOTS: i64 = 3;

/// Words that belong to no object in particular.
const FUNCTION_WORDS: [&str; 7] = ["a", "an", "at", "the", "on", "in", "and"];

/// The word indices of each object's phrase in a caption (in caption order = the scene's
/// object order), without function words. The background phrase is not an object.
pub fn object_words(caption: &str) -> Vec<Vec<usize>> {
    let words: Vec<&str> = caption.split_whitespace().collect();
    // The background phrase is the only "on a(n)": object positions say "on the left/right".
    let end = (0..words.len())
        .rev()
        .find(|&i| words[i] == "on" && matches!(words.get(i + 1), Some(&"a") | Some(&"an")))
        .unwrap_or(words.len());
    let mut objects = vec![Vec::new()];
    for i in 0..end {
        if words[i] == "and" && matches!(words.get(i + 1), Some(&"a") | Some(&"an")) {
            objects.push(Vec::new());
        } else if !FUNCTION_WORDS.contains(&words[i]) {
            objects.last_mut().unwrap().push(i);
        }
    }
    objects.retain(|o| !o.is_empty());
    objects
}

/// What the loss compares, for one batch.
pub struct Targets {
    /// [B, K, L]: 1/n on the n tokens of object k's words.
    tokens: Tensor,
    /// [B, K, H, W]: object k's visible pixels (image resolution).
    masks: Tensor,
    /// [B, K]: 1 where caption b names object k.
    valid: Tensor,
}

/// `owners` [B, 1, H, W]: 0 background, k + 1 object k (the generator's owner map).
pub fn targets(texts: &[&str], owners: &Tensor, tokenizer: &ClipTokenizer, device: Device) -> Targets {
    let b = texts.len() as i64;
    let l = tokenizer.max_length() as i64;
    let mut tokens = vec![0f32; (b * SLOTS * l) as usize];
    let mut valid = vec![0f32; (b * SLOTS) as usize];
    for (i, text) in texts.iter().enumerate() {
        let infos = tokenizer.tokens(text);
        for (k, words) in object_words(text).iter().take(SLOTS as usize).enumerate() {
            let positions: Vec<usize> =
                infos.iter().filter(|t| t.word_index.is_some_and(|w| words.contains(&w))).map(|t| t.position).collect();
            for &p in &positions {
                tokens[(i as i64 * SLOTS * l + k as i64 * l) as usize + p] = 1.0 / positions.len() as f32;
            }
            valid[i * SLOTS as usize + k] = (!positions.is_empty()) as u8 as f32;
        }
    }
    let ids = Tensor::arange_start(1, SLOTS + 1, (Kind::Float, owners.device())).view([1, SLOTS, 1, 1]);
    let masks = owners.eq_tensor(&ids).to_kind(Kind::Float).to_device(device);
    Targets {
        tokens: Tensor::from_slice(&tokens).view([b, SLOTS, l]).to_device(device),
        masks,
        valid: Tensor::from_slice(&valid).view([b, SLOTS]).to_device(device),
    }
}

/// Mean over named objects and layers of 1 − (attention mass of the object's words inside its
/// cells). `probs`: captured cross-attention probabilities [B, heads, H·W, L] per layer.
pub fn loss(probs: &[(usize, Tensor)], t: &Targets) -> Tensor {
    let n_valid = t.valid.sum(Kind::Float).clamp_min(1.0);
    let per_layer: Vec<Tensor> = probs
        .iter()
        .map(|(_, p)| {
            let (b, _, n, _) = p.size4().expect("[B, heads, H·W, L]");
            let side = (n as f64).sqrt().round() as i64;
            // Attention of each spatial cell to object k's words: [B, K, H·W].
            let att = p.mean_dim(1, false, Kind::Float).matmul(&t.tokens.transpose(1, 2)).transpose(1, 2);
            // A cell belongs to the object if any of its pixels does.
            let cells = t.masks.adaptive_max_pool2d([side, side]).0.view([b, SLOTS, n]);
            let inside = (&att * cells).sum_dim_intlist(-1, false, Kind::Float)
                / (att.sum_dim_intlist(-1, false, Kind::Float) + 1e-8);
            ((-inside + 1.0) * &t.valid).sum(Kind::Float) / &n_valid
        })
        .collect();
    Tensor::stack(&per_layer, 0).mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_words_split_objects_and_drop_the_background() {
        let c = "a small yellow star at the top left and an orange ring on the right on a dark blue background";
        assert_eq!(object_words(c), vec![vec![1, 2, 3, 6, 7], vec![10, 11, 14]]);
        assert_eq!(object_words("a red circle in the centre"), vec![vec![1, 2, 5]]);
        assert!(object_words("").is_empty());
        // A gradient background says "and" too, after the background's "on a".
        assert_eq!(
            object_words("a red circle on the left on a white and grey gradient background"),
            vec![vec![1, 2, 5]]
        );
    }
}
