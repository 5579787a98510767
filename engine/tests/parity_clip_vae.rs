//! The text encoder and the VAE against transformers/diffusers on the fixture models
//! (references from tests/fixtures/ref_clip_vae.py).
mod common;

use common::{assert_rel_l2, model_dir, read_ref};
use frisket_engine::clip::{ClipTextConfig, ClipTextModel};
use frisket_engine::vae::{AutoencoderKl, VaeConfig};
use frisket_engine::weights::Weights;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn check_model(name: &str) {
    let r = read_ref(&format!("clip_vae/{name}.safetensors"));
    let dir = model_dir(name);
    let _guard = tch::no_grad_guard();

    let clip = ClipTextModel::load(&dir.join("text_encoder"), Device::Cpu, Kind::Float).unwrap();
    let hidden = clip.forward(&r["input_ids"]);
    assert_rel_l2(&format!("{name} text encoder hidden states"), &hidden, &r["hidden"], 1e-5);

    let vae = AutoencoderKl::load(&dir.join("vae"), Device::Cpu, Kind::Float).unwrap();
    let dist = vae.encode(&r["image"]);
    assert_rel_l2(&format!("{name} vae encode mean"), &dist.mean, &r["mean"], 1e-4);
    assert_rel_l2(&format!("{name} vae encode std"), &dist.std(), &r["std"], 1e-4);
    assert_rel_l2(&format!("{name} vae decode"), &vae.decode(&r["latent"]), &r["decoded"], 1e-4);
}

#[test]
fn sd1_matches_diffusers() {
    check_model("sd1");
}

#[test]
fn sd2_matches_diffusers() {
    check_model("sd2");
}

#[test]
fn vae_config_scale_factor() {
    assert_eq!(VaeConfig::from_dir(&model_dir("sd1").join("vae")).unwrap().scale_factor(), 4);
    let sd2 = VaeConfig::from_dir(&model_dir("sd2").join("vae")).unwrap();
    assert_eq!((sd2.scale_factor(), sd2.scaling_factor, sd2.shift_factor), (2, 0.13025, None));
}

/// A copy of sd1's vae folder whose weights went through `edit`, in a fresh temp dir.
fn broken_vae(tag: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let src = model_dir("sd1").join("vae");
    let dir = std::env::temp_dir().join(format!("frisket-broken-vae-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = Tensor::read_safetensors(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    let result = AutoencoderKl::load(dir, Device::Cpu, Kind::Float);
    std::fs::remove_dir_all(dir).ok();
    format!("{:#}", result.err().expect("loading a broken vae must fail"))
}

#[test]
fn missing_tensor_is_named() {
    let name = "decoder.up_blocks.1.resnets.1.conv2.weight";
    let dir = broken_vae("missing", |t| t.retain(|(k, _)| k != name));
    let err = load_error(&dir);
    assert!(err.contains(name) && err.contains("missing"), "error does not name `{name}`: {err}");
}

#[test]
fn reshaped_tensor_is_named() {
    let name = "encoder.mid_block.attentions.0.to_k.weight";
    let dir = broken_vae("reshaped", |t| {
        let (_, w) = t.iter_mut().find(|(k, _)| k == name).expect("tensor in sd1 vae");
        *w = w.reshape([-1, 16]);
    });
    let err = load_error(&dir);
    assert!(err.contains(name) && err.contains("shape"), "error does not name `{name}`: {err}");
}

#[test]
fn old_and_new_attention_layouts_agree() {
    // sd2 stores query/key/value/proj_attn as [out, in]; the new names, and the old ones as
    // 1×1 conv weights [out, in, 1, 1], must give the same model.
    let dir = model_dir("sd2").join("vae");
    let cfg = VaeConfig::from_dir(&dir).unwrap();
    let file = dir.join("diffusion_pytorch_model.fp16.safetensors");
    let variant = |edit: &dyn Fn(String, Tensor) -> (String, Tensor)| {
        let map = Tensor::read_safetensors(&file).unwrap().into_iter().map(|(k, v)| edit(k, v.to_kind(Kind::Float)));
        AutoencoderKl::new(&Weights::from_map(map.collect(), Device::Cpu, Kind::Float).root(), &cfg).unwrap()
    };
    let old = ["query", "key", "value", "proj_attn"].map(|o| format!(".attentions.0.{o}.weight"));
    let renamed = variant(&|k, v| {
        let k = [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")]
            .iter()
            .fold(k, |k, (o, n)| k.replace(&format!(".attentions.0.{o}."), &format!(".attentions.0.{n}.")));
        (k, v)
    });
    let conv = variant(&|k, v| {
        if old.iter().any(|o| k.ends_with(o.as_str())) {
            (k, v.unsqueeze(-1).unsqueeze(-1))
        } else {
            (k, v)
        }
    });
    let fixture = AutoencoderKl::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let _guard = tch::no_grad_guard();
    let z = Tensor::randn([1, 4, 6, 4], (Kind::Float, Device::Cpu));
    let x = Tensor::rand([1, 3, 8, 6], (Kind::Float, Device::Cpu)) * 2 - 1;
    for other in [&renamed, &conv] {
        assert_eq!(common::rel_l2(&other.decode(&z), &fixture.decode(&z)), 0.0);
        assert_eq!(common::rel_l2(&other.encode(&x).mean, &fixture.encode(&x).mean), 0.0);
    }
}

#[test]
fn text_encoder_loads_transformers4_names() {
    // Published SD checkpoints (transformers 4) prefix every key with `text_model.`;
    // the fixtures are saved by transformers 5, which does not.
    let dir = model_dir("sd1").join("text_encoder");
    let cfg = ClipTextConfig::from_dir(&dir).unwrap();
    let prefixed = Tensor::read_safetensors(dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, v)| (format!("text_model.{k}"), v))
        .collect();
    let old = ClipTextModel::new(&Weights::from_map(prefixed, Device::Cpu, Kind::Float).root(), &cfg).unwrap();
    let new = ClipTextModel::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let ids = Tensor::from_slice(&[49406i64, 320, 1929, 49407, 49407]).unsqueeze(0);
    let _guard = tch::no_grad_guard();
    assert_eq!(common::rel_l2(&old.forward(&ids), &new.forward(&ids)), 0.0);
}
