//! The A/B report's domain FID: per condition, the Fréchet distance between a CLIP's image
//! embeddings of its outputs and of the references (the method's claim is better fidelity to
//! the reference, which the paper measures with FID). With the shapes CLIP the features mean
//! something in the shapes world, where Inception's do not; the embeddings are few (64-d for
//! the shapes CLIP), so a couple of hundred cases estimate the covariances, unlike Inception's
//! 2,048 features. Point estimates only: a bootstrap resample repeats images, which biases FID
//! upwards (the replicates lie above the estimate), so its percentile interval is not one.
use super::conditions::Condition;
use super::run::ItemResult;
use crate::clip::Clip;
use crate::stats::{frechet_distance, Stats};
use anyhow::{ensure, Context, Result};
use image::RgbImage;
use serde_json::{json, Value};
use tch::Tensor;

/// The CLIP image embeddings [n, d] of `images`.
pub fn embeddings(clip: &Clip, images: &[&RgbImage]) -> Tensor {
    let rows: Vec<Tensor> = images
        .iter()
        .map(|im| {
            let (w, h) = im.dimensions();
            clip.embed_image(im.as_raw(), w as usize, h as usize)
        })
        .collect();
    Tensor::cat(&rows, 0)
}

/// Domain FID of each condition's outputs (their `clip_embedding`s, from the same CLIP) against
/// the references (`references[case]`), and each condition's difference against `paper` when
/// it ran.
pub fn summarise(
    clip: &Clip,
    items: &[ItemResult],
    references: &[&RgbImage],
    conditions: &[Condition],
) -> Result<Value> {
    let n = references.len();
    ensure!(n >= 2, "the domain FID needs at least 2 cases");
    let reference_features = embeddings(clip, references);
    let reference_stats = Stats::from_features(&reference_features)?;
    let mut values: Vec<(&str, f64)> = Vec::new();
    for &c in conditions {
        let outputs: Vec<&Tensor> = items
            .iter()
            .filter(|i| i.condition == c.name())
            .map(|i| i.clip_embedding.as_ref().context("an item without its CLIP embedding"))
            .collect::<Result<_>>()?;
        ensure!(outputs.len() == n, "{} has {} outputs for {n} cases", c.name(), outputs.len());
        let features = Tensor::cat(&outputs, 0);
        values.push((c.name(), frechet_distance(&Stats::from_features(&features)?, &reference_stats)?));
    }
    let paper = values.iter().find(|(c, _)| *c == Condition::Paper.name()).map(|&(_, v)| v);
    let diffs: Vec<Value> = match paper {
        Some(p) => values
            .iter()
            .filter(|(c, _)| *c != Condition::Paper.name())
            .map(|(c, v)| json!({"condition": c, "minus_paper": v - p}))
            .collect(),
        None => Vec::new(),
    };
    let values: serde_json::Map<String, Value> = values.into_iter().map(|(c, v)| (c.to_string(), json!(v))).collect();
    Ok(json!({
        "features": format!("CLIP image embeddings ({} dimensions)", reference_features.size()[1]),
        "cases": n,
        "values": values,
        "vs_paper": diffs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ab::run::Metrics;
    use frisket_shapes::generate_default;

    fn item(clip: &Clip, case: usize, condition: Condition, image: RgbImage) -> ItemResult {
        let metrics = Metrics {
            adherence: 1.0,
            psnr_background: 0.0,
            ssim_background: 0.0,
            psnr_kept: 0.0,
            lpips_background: None,
            clip_score: None,
            clip_score_region: None,
            pair64: None,
        };
        let clip_embedding = Some(embeddings(clip, &[&image]));
        ItemResult { case, seed: 0, condition: condition.name().into(), metrics, image, clip_embedding }
    }

    /// With the shipped shapes CLIP: outputs equal to the references are at distance 0, other
    /// scenes are not, and the difference against paper is theirs.
    #[test]
    fn outputs_equal_to_the_references_are_at_distance_zero() {
        let clip = Clip::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shapes-clip")).unwrap();
        let n = 80;
        let references: Vec<RgbImage> = (0..n).map(|i| generate_default(900_000 + i).image).collect();
        let mut items: Vec<ItemResult> =
            references.iter().enumerate().map(|(i, r)| item(&clip, i, Condition::Paper, r.clone())).collect();
        items.extend(
            (0..n as usize).map(|i| item(&clip, i, Condition::Sd09, generate_default(700_000 + i as u64).image)),
        );
        let refs: Vec<&RgbImage> = references.iter().collect();
        let d = summarise(&clip, &items, &refs, &[Condition::Paper, Condition::Sd09]).unwrap();
        println!("{d:#}");
        let paper = d["values"]["paper"].as_f64().unwrap();
        let sd = d["values"]["sd-0.9"].as_f64().unwrap();
        assert!(paper.abs() < 1e-6, "paper {paper}");
        assert!(sd > 1.0, "sd-0.9 {sd}");
        assert_eq!(d["vs_paper"][0]["condition"], "sd-0.9");
        assert!((d["vs_paper"][0]["minus_paper"].as_f64().unwrap() - (sd - paper)).abs() < 1e-9);
    }
}
