//! text_probe MODEL_DIR: does a trained shapes model listen to each part of its caption?
//! A research tool for the training recipe (docs/shapes-model-journal.md), not part of the product.
//! For 32 single-object training-distribution scenes, noised to t, the x₀ error of the UNet's
//! prediction with the true caption, with the position phrase swapped, with the colour
//! swapped, and with an empty caption. A part the model uses raises the error when swapped.
//! Also checks that `forward` (inference, one t) equals it with one timestep per row (training).
//!   cargo run -p frisket-trainer --example text_probe -- models/shapes
use frisket_trainer::data::{self, BatchSpec};
use frisket_trainer::engine::model::StableDiffusion;
use frisket_trainer::engine::unet::{Capture, CrossContext};
use tch::{Device, Kind, Tensor};
fn main() -> anyhow::Result<()> {
    tch::set_num_threads(2);
    let m = StableDiffusion::load(std::path::Path::new(&std::env::args().nth(1).unwrap()), Device::Cpu)?;
    let m_kind = m.kind;
    // The model's own training schedule (its scheduler config says which).
    let sched: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        std::path::Path::new(&std::env::args().nth(1).unwrap()).join("scheduler/scheduler_config.json"),
    )?)?;
    let zero_snr = sched["rescale_betas_zero_snr"].as_bool().unwrap_or(false);
    let held = std::collections::HashSet::new();
    let (x, owners, caps) = data::batch_with_objects(&BatchSpec {
        run_seed: 99,
        step: 7,
        size: 32,
        single_object: true,
        held_out: &held,
        focus: &[],
    });
    let sf = m.vae.config().scaling_factor;
    let lat = tch::no_grad(|| m.vae.encode(&x.to_kind(m_kind)).mean * sf);
    let alphas: Vec<f32> = frisket_trainer::configs::alphas_cumprod(zero_snr).iter().map(|&v| v as f32).collect();
    let swap_pos = |c: &str| {
        for (a, b) in [
            ("at the top left", "at the bottom right"),
            ("at the top right", "at the bottom left"),
            ("at the bottom left", "at the top right"),
            ("at the bottom right", "at the top left"),
            ("at the top", "at the bottom"),
            ("at the bottom", "at the top"),
            ("on the left", "on the right"),
            ("on the right", "on the left"),
            ("in the centre", "at the top left"),
        ] {
            if c.contains(a) {
                return c.replacen(a, b, 1);
            }
        }
        c.to_string()
    };
    let swap_col = |c: &str| {
        for (a, b) in [
            (" red ", " blue "),
            (" blue ", " red "),
            (" green ", " pink "),
            (" pink ", " green "),
            (" yellow ", " purple "),
            (" purple ", " yellow "),
            (" orange ", " cyan "),
            (" cyan ", " orange "),
            (" brown ", " red "),
        ] {
            if c.contains(a) {
                return c.replacen(a, b, 1);
            }
        }
        c.to_string()
    };
    tch::manual_seed(0);
    let noise = lat.randn_like();
    for t in [200i64, 500, 800, 950, 999] {
        let ac = alphas[t as usize] as f64;
        let noisy = &lat * ac.sqrt() + &noise * (1.0 - ac).sqrt();
        let x0_err = |captions: Vec<String>| -> f64 {
            let refs: Vec<&str> = captions.iter().map(|s| s.as_str()).collect();
            let ctx = m.encode_prompts(&refs);
            let v = tch::no_grad(|| m.unet.forward(&noisy, t as f64, &CrossContext::new(&ctx), Capture::NONE).sample)
                .to_kind(Kind::Float);
            let x0 = &noisy.to_kind(Kind::Float) * ac.sqrt() - v * (1.0 - ac).sqrt();
            (x0 - lat.to_kind(Kind::Float)).square().mean(Kind::Float).double_value(&[])
        };
        let truth = x0_err(caps.clone());
        // Attention grounding (src/grounding.rs) over all cross-attention layers: 1 − the share of
        // each object's word attention that falls on its cells; true vs position-swapped words.
        let ground = |captions: Vec<String>| -> f64 {
            let refs: Vec<&str> = captions.iter().map(|s| s.as_str()).collect();
            let ctx = m.encode_prompts(&refs);
            let layers: Vec<usize> = (0..m.unet.cross_attention_layer_count()).collect();
            let probs = m.unet.forward(&noisy, t as f64, &CrossContext::new(&ctx), Capture::layers(&layers)).probs;
            let targets = frisket_trainer::grounding::targets(&refs, &owners, &m.tokenizer, Device::Cpu);
            let probs: Vec<(usize, Tensor)> =
                probs.into_iter().map(|(l, p)| (l, p.detach().to_kind(Kind::Float))).collect();
            frisket_trainer::grounding::loss(&probs, &targets).double_value(&[])
        };
        let g_true = ground(caps.clone());
        let g_pos = ground(caps.iter().map(|c| swap_pos(c)).collect());
        let pos = x0_err(caps.iter().map(|c| swap_pos(c)).collect());
        let col = x0_err(caps.iter().map(|c| swap_col(c)).collect());
        let empty = x0_err(caps.iter().map(|_| String::new()).collect());
        // training path vs inference path
        let ctx = m.encode_prompts(&caps.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let per_row = Tensor::full([32], t as f64, (Kind::Float, Device::Cpu));
        let a = tch::no_grad(|| m.unet.forward(&noisy, t as f64, &CrossContext::new(&ctx), Capture::NONE).sample);
        let b = tch::no_grad(|| m.unet.forward(&noisy, &per_row, &CrossContext::new(&ctx), Capture::NONE).sample);
        let d = (a - b).abs().max().double_value(&[]);
        println!("t {t}: x0 mse true {truth:.4}  position swapped {pos:.4}  colour swapped {col:.4}  empty {empty:.4}  | grounding loss true {g_true:.3} position swapped {g_pos:.3} | shared vs per-row timesteps max diff {d:.2e}");
    }
    Ok(())
}
