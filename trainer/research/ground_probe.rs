//! ground_probe MODEL_DIR UNET_CKPT STEPS: can this UNet learn absolute position at all?
//! A research tool for the training recipe (docs/shapes-model-journal.md), not part of the product.
//! Trains only the attention grounding loss (src/grounding.rs) at t ∈ [950, 1000), where the
//! noisy latent shows nothing and only the words say where the object is, and prints the
//! grounding loss per layer on a fixed batch at t = 999 (true vs position-swapped caption).
//! UNET_CKPT: the UNet's weights to start from, as train_tiny's checkpoints hold them.
//!   cargo run -p frisket-trainer --example ground_probe -- models/shapes target/train-tiny/unet_ckpt/unet.safetensors 150
use frisket_trainer::data::{self, BatchSpec};
use frisket_trainer::engine::model::StableDiffusion;
use frisket_trainer::engine::unet::{Capture, CrossContext};
use frisket_trainer::{grounding, params::AdamW};
use tch::{Device, Kind, Tensor};
fn main() -> anyhow::Result<()> {
    tch::set_num_threads(1);
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::Path::new(&args[1]);
    let m = StableDiffusion::load(dir, Device::Cpu)?;
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("unet/config.json"))?)?;
    let (p, unet, _) = frisket_trainer::unet(&cfg, Device::Cpu)?;
    p.load(std::path::Path::new(&args[2]))?;
    let steps: u64 = args[3].parse()?;
    let mut opt = AdamW::new(&p, 2e-4, 0.0);
    let held = std::collections::HashSet::new();
    let layers: Vec<usize> = (0..unet.cross_attention_layer_count()).collect();
    let (_, test_owners, test_caps) = data::batch_with_objects(&BatchSpec {
        run_seed: 99,
        step: 7,
        size: 32,
        single_object: true,
        held_out: &held,
        focus: &[],
    });
    tch::manual_seed(0);
    let test_noise = Tensor::randn([32, 4, 16, 16], (Kind::Float, Device::Cpu));
    let per_layer = |caps: &[String]| -> Vec<f64> {
        let refs: Vec<&str> = caps.iter().map(|s| s.as_str()).collect();
        let ctx = tch::no_grad(|| m.encode_prompts(&refs)).to_kind(Kind::Float);
        let t = Tensor::full([32], 999.0, (Kind::Float, Device::Cpu));
        let probs =
            tch::no_grad(|| unet.forward(&test_noise, &t, &CrossContext::new(&ctx), Capture::layers(&layers))).probs;
        let t = grounding::targets(&refs, &test_owners, &m.tokenizer, Device::Cpu);
        probs.iter().map(|pr| grounding::loss(std::slice::from_ref(pr), &t).double_value(&[])).collect()
    };
    let swapped: Vec<String> =
        test_caps.iter().map(|c| c.replace("left", "LEFT").replace("right", "left").replace("LEFT", "right")).collect();
    for step in 0..=steps {
        if step % 25 == 0 {
            let f = |v: Vec<f64>| v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(" ");
            println!(
                "step {step}: per-layer grounding at t=999 true [{}]  left/right swapped [{}]",
                f(per_layer(&test_caps)),
                f(per_layer(&swapped))
            );
        }
        let (_, owners, caps) = data::batch_with_objects(&BatchSpec {
            run_seed: 5,
            step,
            size: 16,
            single_object: true,
            held_out: &held,
            focus: &[],
        });
        let refs: Vec<&str> = caps.iter().map(|s| s.as_str()).collect();
        let ctx = tch::no_grad(|| m.encode_prompts(&refs)).to_kind(Kind::Float);
        let noise = Tensor::randn([16, 4, 16, 16], (Kind::Float, Device::Cpu));
        let t = Tensor::randint_low(950, 1000, [16], (Kind::Int64, Device::Cpu)).to_kind(Kind::Float);
        let probs = unet.forward(&noise, &t, &CrossContext::new(&ctx), Capture::layers(&layers)).probs;
        let loss = grounding::loss(&probs, &grounding::targets(&refs, &owners, &m.tokenizer, Device::Cpu));
        p.zero_grad();
        loss.backward();
        opt.step(&p);
    }
    Ok(())
}
