//! UNet parity with diffusers (tests/fixtures/ref_unet.py), including the explicit
//! cross-attention probabilities used by Grad-SAM.
mod common;

use common::{assert_rel_l2, model_dir, read_ref};
use frisket_engine::unet::{Capture, CrossContext, UNet2DConditionModel, UNetConfig, UNetOutput};
use std::collections::HashMap;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn load(name: &str) -> UNet2DConditionModel {
    UNet2DConditionModel::load(&model_dir(name).join("unet"), Device::Cpu, Kind::Float).expect("loading the UNet")
}

fn inputs<'a>(r: &'a HashMap<String, Tensor>, case: &str) -> (&'a Tensor, f64, &'a Tensor, &'a Tensor) {
    (
        &r[&format!("{case}.sample")],
        r[&format!("{case}.timestep")].double_value(&[0]),
        &r[&format!("{case}.encoder_hidden_states")],
        &r[&format!("{case}.out")],
    )
}

fn check_case(unet: &UNet2DConditionModel, r: &HashMap<String, Tensor>, model: &str, case: &str) {
    let (sample, t, ehs, expected) = inputs(r, case);
    let out = tch::no_grad(|| unet.forward(sample, t, &CrossContext::new(ehs), Capture::NONE).sample);
    assert_rel_l2(&format!("{model} UNet `{case}` (t={t})"), &out, expected, 1e-4);
}

#[test]
fn sd1_unet_matches_diffusers() {
    let unet = load("sd1");
    let r = read_ref("unet/sd1.safetensors");
    assert_eq!(unet.cross_attention_layer_count() as i64, r["cross_attention_layers"].int64_value(&[0]));
    check_case(&unet, &r, "sd1", "main");
    check_case(&unet, &r, "sd1", "int_t");

    // Rough timing of one call (batch 2, 16×24 latent), printed with the test output.
    let (sample, t, ehs, _) = inputs(&r, "main");
    let start = Instant::now();
    let runs = 5;
    for _ in 0..runs {
        let _ = tch::no_grad(|| unet.forward(sample, t, &CrossContext::new(ehs), Capture::NONE).sample);
    }
    println!("sd1 UNet forward: {:.1} ms/call", start.elapsed().as_secs_f64() * 1e3 / runs as f64);
}

#[test]
fn sd2_unet_matches_diffusers_including_odd_sizes() {
    let unet = load("sd2");
    let r = read_ref("unet/sd2.safetensors");
    assert_eq!(unet.cross_attention_layer_count() as i64, r["cross_attention_layers"].int64_value(&[0]));
    check_case(&unet, &r, "sd2", "square");
    check_case(&unet, &r, "sd2", "odd");
}

#[test]
fn sd1_captured_cross_attention_probabilities() {
    let unet = load("sd1");
    let r = read_ref("unet/sd1.safetensors");
    let (sample, t, ehs, expected) = inputs(&r, "main");
    let layers: Vec<usize> =
        Vec::<i64>::try_from(&r["probs_layers"]).unwrap().into_iter().map(|l| l as usize).collect();

    // Grad mode on (the default): the probabilities stay in the graph.
    let UNetOutput { sample: out, probs, .. } =
        unet.forward(sample, t, &CrossContext::new(ehs), Capture::layers(&layers));
    let plain = unet.forward(sample, t, &CrossContext::new(ehs), Capture::NONE).sample;
    // Explicit softmax vs SDPA in the captured layers: equal up to float rounding.
    assert_rel_l2("sd1 capturing forward vs forward", &out, &plain, 1e-5);
    assert_rel_l2("sd1 capturing forward vs diffusers", &out, expected, 1e-4);
    assert_eq!(probs.iter().map(|(l, _)| *l).collect::<Vec<_>>(), layers);
    for (layer, p) in &probs {
        assert_rel_l2(&format!("sd1 cross-attention probs, layer {layer}"), p, &r[&format!("probs.{layer}")], 1e-4);
    }

    // Grad-SAM needs d(out)/d(probs).
    for (layer, p) in &probs {
        let grads = Tensor::run_backward(&[out.sum(Kind::Float)], &[p], true, false);
        let norm = grads[0].norm().double_value(&[]);
        println!("sd1 layer {layer}: |d out.sum() / d probs| = {norm:.3e}");
        assert_eq!(grads[0].size(), p.size());
        assert!(norm > 0.0 && norm.is_finite(), "gradient w.r.t. layer {layer} probabilities is {norm}");
    }

    // Capturing under no_grad still returns the probabilities (without a graph).
    let UNetOutput { sample: out_ng, probs: probs_ng, .. } =
        tch::no_grad(|| unet.forward(sample, t, &CrossContext::new(ehs), Capture::layers(&[layers[0]])));
    assert_rel_l2("sd1 capturing forward under no_grad", &out_ng, expected, 1e-4);
    assert_eq!(probs_ng.len(), 1);
}

#[test]
fn unet_config_defaults_and_refusals() {
    // An empty config is diffusers' default (SD 1.x-like) architecture.
    let cfg: UNetConfig = serde_json::from_str("{}").unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!(cfg.mid_block_type.as_deref(), Some("UNetMidBlock2DCrossAttn"));
    let no_mid: UNetConfig = serde_json::from_str(r#"{"mid_block_type": null}"#).unwrap();
    assert!(no_mid.mid_block_type.is_none());

    let base = std::fs::read_to_string(model_dir("sd1").join("unet/config.json")).unwrap();
    for (field, value) in [
        ("class_embed_type", r#""timestep""#),
        ("addition_embed_type", r#""text_time""#),
        ("time_embedding_type", r#""fourier""#),
        ("resnet_time_scale_shift", r#""scale_shift""#),
        ("dual_cross_attention", "true"),
        ("mid_block_type", r#""UNetMidBlock2DSimpleCrossAttn""#),
        ("layers_per_block", "[1, 2]"),
    ] {
        let mut json: serde_json::Value = serde_json::from_str(&base).unwrap();
        json[field] = serde_json::from_str(value).unwrap();
        let cfg: UNetConfig = serde_json::from_value(json).unwrap();
        let err = format!("{:#}", cfg.validate().unwrap_err());
        assert!(err.contains(field), "error for {field} does not name it: {err}");
    }
}
