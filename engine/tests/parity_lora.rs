//! LoRAs (tests/fixtures/ref_lora.py) merged into the fixture models render as diffusers
//! renders them: every pixel within 3/255 and the mean within 0.5/255. Taking them out
//! gives the plain model back bit for bit; a LoRA for another model is refused by key.
mod common;

use frisket_engine::lora::{Component, Header, Lora, LoraError, ParamIndex};
use frisket_engine::model::StableDiffusion;
use frisket_engine::pipeline::Flow;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Instant;
use tch::{Device, Tensor};

fn cases() -> Vec<Value> {
    let path = common::fixtures().join("ref/lora/cases.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn lora_path(name: &str) -> std::path::PathBuf {
    common::fixtures().join("lora").join(format!("{name}.safetensors"))
}

/// The image as [H, W, 3] in 0..1.
fn render(model: &StableDiffusion, case: &Value) -> Tensor {
    let out =
        model.generate(model.prepare(&common::case_params(case, "lora")).unwrap(), &mut |_| Flow::Continue).unwrap();
    out.image.permute([1, 2, 0]).contiguous()
}

/// (max, mean) |a − b| in 1/255 units.
fn diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let d = (a - b).abs();
    (d.max().double_value(&[]) * 255.0, d.mean(None).double_value(&[]) * 255.0)
}

fn check_model(model_name: &str) {
    let expected = common::read_ref("lora/images.safetensors");
    let mut model = StableDiffusion::load(&common::model_dir(model_name), Device::Cpu).unwrap();
    let mut loaded: HashMap<String, Lora> = HashMap::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases().iter().filter(|c| c["model"] == model_name) {
        let key = case["key"].as_str().unwrap();
        // The plain image first: its prompt encodings are cached, and a text-encoder LoRA
        // must not reuse them.
        model.set_loras(&[]).unwrap();
        let plain = render(&model, case);
        let specs = case["loras"].as_array().unwrap();
        for l in specs {
            let name = l[0].as_str().unwrap();
            loaded.entry(name.to_string()).or_insert_with(|| Lora::load(&lora_path(name)).unwrap());
        }
        let set: Vec<(&Lora, f32)> =
            specs.iter().map(|l| (&loaded[l[0].as_str().unwrap()], l[1].as_f64().unwrap() as f32)).collect();
        let t = Instant::now();
        model.set_loras(&set).unwrap_or_else(|e| panic!("{key}: {e:#}"));
        let merge = t.elapsed();
        let ours = render(&model, case);
        let (max, mean) = diff(&ours, &expected[key]);
        let (_, effect) = diff(&plain, &expected[key]);
        println!(
            "{key}: max |Δ| {max:.4}/255, mean {mean:.5}/255 (plain model: mean {effect:.2}/255); merge {merge:?}"
        );
        if max > 3.0 || mean > 0.5 {
            failures.push(format!("{key}: max {max:.3}/255 mean {mean:.4}/255"));
        }
        assert!(effect > 2.0, "{key}: the LoRA changes the image by only {effect:.3}/255 on average");
        let t = Instant::now();
        model.set_loras(&[]).unwrap();
        let unmerge = t.elapsed();
        let again = render(&model, case);
        assert!(again.equal(&plain), "{key}: without LoRAs the image differs from the plain model's");
        println!("{key}: unmerge {unmerge:?}, plain image bit-identical after");
        checked += 1;
    }
    assert!(checked >= 1, "no LoRA cases for {model_name}");
    assert!(failures.is_empty(), "images differ from diffusers:\n{}", failures.join("\n"));
}

#[test]
fn sd1_loras_match_diffusers() {
    check_model("sd1");
}

#[test]
fn sd2_lora_matches_diffusers() {
    check_model("sd2");
}

/// Merging and taking out a LoRA costs a fraction of loading the model (printed).
/// SDXL: a kohya file for the UNet and both text encoders (`lora_te1_`, `lora_te2_`),
/// against diffusers' SDXL pipeline (tests/fixtures/ref_sdxl.py); a single file of the same
/// model takes it too.
#[test]
fn sdxl_lora_on_both_text_encoders_matches_diffusers() {
    let path = common::fixtures().join("ref/sdxl/lora.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let case = &cases[0];
    let expected = common::read_ref("sdxl/lora.safetensors");
    let lora = Lora::load(&lora_path(case["lora"].as_str().unwrap())).unwrap();
    let mut model = StableDiffusion::load(&common::model_dir("sdxl"), Device::Cpu).unwrap();
    let p = common::case_params(case, "sdxl");
    let job = |model: &StableDiffusion| {
        let out = model.generate(model.prepare(&p).unwrap(), &mut |_| Flow::Continue).unwrap();
        out.image.permute([1, 2, 0]).contiguous()
    };
    let plain = job(&model);
    assert_eq!(lora.components(), [Component::Unet, Component::TextEncoder, Component::TextEncoder2]);
    let te2_weight = "text_model.encoder.layers.0.self_attn.q_proj.weight";
    let before = model.param(Component::TextEncoder2, te2_weight).expect("a bigG weight").copy();
    model.set_loras(&[(&lora, case["weight"].as_f64().unwrap() as f32)]).unwrap();
    let after = model.param(Component::TextEncoder2, te2_weight).unwrap();
    assert!(!after.equal(&before), "the second text encoder's weights did not change");
    let ours = job(&model);
    let key = case["key"].as_str().unwrap();
    let (max, mean) = diff(&ours, &expected[key]);
    let (_, effect) = diff(&plain, &expected[key]);
    println!("{key}: max |Δ| {max:.4}/255, mean {mean:.5}/255 (plain model: mean {effect:.2}/255)");
    assert!(max <= 3.0 && mean <= 0.5, "{key}: max {max:.3}/255 mean {mean:.4}/255");
    assert!(effect > 2.0, "{key}: the LoRA changes the image by only {effect:.3}/255 on average");
    model.set_loras(&[]).unwrap();
    assert!(model.param(Component::TextEncoder2, te2_weight).unwrap().equal(&before));
    assert!(job(&model).equal(&plain), "without the LoRA the image differs from the plain model's");
}

#[test]
fn merge_is_cheaper_than_loading() {
    let t = Instant::now();
    let mut model = StableDiffusion::load(&common::model_dir("sd1"), Device::Cpu).unwrap();
    let load = t.elapsed();
    let lora = Lora::load(&lora_path("sd1_kohya")).unwrap();
    let t = Instant::now();
    for _ in 0..10 {
        model.set_loras(&[(&lora, 1.0)]).unwrap();
        model.set_loras(&[]).unwrap();
    }
    let switch = t.elapsed() / 10;
    println!("sd1 fixture: load {load:?}, merge + unmerge {switch:?}");
    // The same set again is a no-op.
    model.set_loras(&[(&lora, 1.0)]).unwrap();
    let t = Instant::now();
    model.set_loras(&[(&lora, 1.0)]).unwrap();
    assert!(t.elapsed() < switch, "setting the merged set again did work");
}

/// A LoRA made for the sd2 fixture does not fit sd1: the error names the first key that
/// does not fit, the header-only check names the same key, and the model is unchanged.
#[test]
fn lora_for_another_model_is_refused_by_key() {
    let mut model = StableDiffusion::load(&common::model_dir("sd1"), Device::Cpu).unwrap();
    let case = &cases()[0];
    let plain = render(&model, case);
    let path = lora_path("sd2_kohya");
    let other = Lora::load(&path).unwrap();
    let err = model.set_loras(&[(&other, 1.0)]).unwrap_err();
    let lora_err = err.chain().find_map(|e| e.downcast_ref::<LoraError>()).expect("a LoraError in the chain");
    let key = match lora_err {
        LoraError::Shape { key, .. } | LoraError::NoTarget { key, .. } => key.clone(),
        other => panic!("unexpected error {other}"),
    };
    println!("{err:#}");
    assert!(format!("{err:#}").contains(&key));
    assert!(Header::read(&path).unwrap().shapes.contains_key(&key), "{key} is not a key of the file");
    let index = ParamIndex::from_model_dir(&common::model_dir("sd1")).unwrap();
    assert_eq!(Lora::check_header(&Header::read(&path).unwrap(), &index).unwrap_err(), *lora_err);
    for fits in ["sd1_kohya", "sd1_kohya_sgm", "sd1_peft"] {
        Lora::check_header(&Header::read(&lora_path(fits)).unwrap(), &index).unwrap();
    }
    assert!(model.loras().is_empty());
    assert!(render(&model, case).equal(&plain), "a refused LoRA changed the model");
}

/// kohya's SDXL-style keys (the original UNet's input_blocks/middle_block/output_blocks
/// numbering) reach the same parameters as the diffusers-named keys: the same file in
/// both spellings renders the same image, bit for bit.
#[test]
fn sgm_named_keys_reach_the_same_parameters() {
    let mut model = StableDiffusion::load(&common::model_dir("sd1"), Device::Cpu).unwrap();
    let case = &cases()[0];
    let diffusers_named = Lora::load(&lora_path("sd1_kohya")).unwrap();
    let sgm_named = Lora::load(&lora_path("sd1_kohya_sgm")).unwrap();
    let mut a = diffusers_named.targets(model.param_index()).unwrap();
    let mut b = sgm_named.targets(model.param_index()).unwrap();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    model.set_loras(&[(&diffusers_named, 0.8)]).unwrap();
    let expected = render(&model, case);
    model.set_loras(&[(&sgm_named, 0.8)]).unwrap();
    assert!(render(&model, case).equal(&expected));
}
