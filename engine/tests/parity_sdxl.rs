//! SDXL against diffusers (tests/fixtures/ref_sdxl.py, a tiny random SDXL-architecture
//! model): both text encoders and the pooled embedding, the UNet with its added
//! conditioning, whole txt2img/img2img images for every scheduler (3/255 max, 0.5/255
//! mean), exact Grad-SAM against torch.autograd (rel. L2 ≤ 1e-3), and bit-exact protected
//! regions in whole jobs.
mod common;

use frisket_engine::explain::{self, ExplainMode, ExplainParams, SubjectSpec};
use frisket_engine::image_io;
use frisket_engine::model::{is_sdxl_folder, Family, SizeConditioning, StableDiffusion};
use frisket_engine::pipeline::{self, Flow, GenerateParams};
use frisket_engine::protect::ProtectParams;
use frisket_engine::schedulers::SchedulerKind;
use frisket_engine::unet::{AddedCond, Capture, CrossContext};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn load() -> StableDiffusion {
    StableDiffusion::load(&common::model_dir("sdxl"), Device::Cpu).unwrap()
}

fn json(name: &str) -> Vec<Value> {
    let path = common::fixtures().join("ref/sdxl").join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn folder_is_detected_as_sdxl() {
    let dir = common::model_dir("sdxl");
    assert!(is_sdxl_folder(&dir));
    assert!(!is_sdxl_folder(&common::model_dir("sd1")));
    let model = load();
    assert_eq!(model.family(), Family::Sdxl);
    assert!(model.force_zeros_for_empty_prompt);
    // sample_size 8 × a 4-level VAE (factor 8).
    assert_eq!(model.native_size(), (64, 64));
    assert_eq!(model.vae.config().scaling_factor, 0.13025);
    assert_eq!(load_sd1().family(), Family::Sd1);
}

/// In float16 an SDXL model keeps its `force_upcast` VAE in float32 (as diffusers' SDXL
/// pipelines decode and encode); SD 1.x keeps the model's dtype. Loading alone runs no
/// half-precision kernel, so this holds on the CPU too.
#[test]
fn force_upcast_vae_stays_float32_in_half_precision() {
    let sdxl = StableDiffusion::load_with_kind(&common::model_dir("sdxl"), Device::Cpu, Kind::Half).unwrap();
    assert!(sdxl.vae.config().force_upcast);
    assert_eq!(sdxl.vae.kind(), Kind::Float);
    let sd1 = StableDiffusion::load_with_kind(&common::model_dir("sd1"), Device::Cpu, Kind::Half).unwrap();
    assert_eq!(sd1.vae.kind(), Kind::Half);
}

fn load_sd1() -> StableDiffusion {
    StableDiffusion::load(&common::model_dir("sd1"), Device::Cpu).unwrap()
}

#[test]
fn text_encoders_match_diffusers() {
    let model = load();
    let r = common::read_ref("sdxl/text.safetensors");
    let second = model.text_encoder_2.as_ref().expect("SDXL has a second encoder");
    let size = SizeConditioning { original: (64, 48), crop_top_left: (0, 0), target: (64, 48) };
    let cases = json("text.json");
    assert_eq!(cases.len(), 3);
    for (i, case) in cases.iter().enumerate() {
        let prompt = case["prompt"].as_str().unwrap();
        let negative = case["negative_prompt"].as_str().unwrap();
        // Both tokenizers give the reference's ids.
        let ids_1 = model.tokenizer.encode_padded(prompt);
        let ids_2 = second.tokenizer.encode_padded(prompt);
        assert_eq!(Tensor::from_slice(&ids_1), r[&format!("{i}.ids_1")], "tokenizer ids");
        assert_eq!(Tensor::from_slice(&ids_2), r[&format!("{i}.ids_2")], "tokenizer_2 ids");
        // They agree token for token up to the padding, except that tokenizer_2 reads "!"
        // (its pad token) as that special token, not as the word "!</w>" (as transformers
        // does): a lone "!" keeps the positions aligned, "!!" does not.
        let words = model.tokenizer.encode(prompt).len();
        if prompt.contains("!!") {
            assert!(second.tokenizer.encode(prompt).len() > words);
        } else {
            let bang_word = model.tokenizer.encode("!")[1];
            for (a, b) in ids_1[..words].iter().zip(&ids_2[..words]) {
                assert!(a == b || (*a == bang_word && *b == second.tokenizer.pad_id()), "{ids_1:?} vs {ids_2:?}");
            }
            assert!(ids_2[words..].iter().all(|&id| id == second.tokenizer.pad_id()));
        }

        let context = tch::no_grad(|| model.text_context(prompt, Some(negative), &size));
        let states = context.states();
        let added = context.added().expect("SDXL context carries the added conditioning");
        let check = |what: &str, ours: &Tensor, key: &str| {
            let theirs = &r[&format!("{i}.{key}")];
            if theirs.abs().max().double_value(&[]) == 0.0 {
                assert_eq!(ours.abs().max().double_value(&[]), 0.0, "{what} must be zeros");
                println!("case {i} {what}: zeros, as diffusers");
            } else {
                common::assert_rel_l2(&format!("case {i} {what}"), ours, theirs, 1e-5);
            }
        };
        check("negative embeds", &states.narrow(0, 0, 1), "negative_embeds");
        check("embeds", &states.narrow(0, 1, 1), "embeds");
        check("negative pooled", &added.text_embeds.narrow(0, 0, 1), "negative_pooled");
        check("pooled", &added.text_embeds.narrow(0, 1, 1), "pooled");
        let ids: Vec<f32> = Vec::try_from(added.time_ids.flatten(0, -1)).unwrap();
        assert_eq!(ids, [48.0, 64.0, 0.0, 0.0, 48.0, 64.0].repeat(2));
        // The cache gives the same rows again, and encode_prompt agrees with the context.
        let again = tch::no_grad(|| model.encode_prompt(prompt));
        assert_eq!(again, states.narrow(0, 1, 1));
    }
}

#[test]
fn unet_with_added_conditioning_matches_diffusers() {
    let model = load();
    let r = common::read_ref("sdxl/unet.safetensors");
    assert_eq!(model.unet.cross_attention_layer_count(), 17);
    let added = AddedCond { text_embeds: r["text_embeds"].shallow_clone(), time_ids: r["time_ids"].shallow_clone() };
    let context = CrossContext::with_added(&r["encoder_hidden_states"], added);
    let t = r["timestep"].double_value(&[0]);
    let out = tch::no_grad(|| model.unet.forward(&r["sample"], t, &context, Capture::NONE).sample);
    common::assert_rel_l2("SDXL UNet (t=437, two rows of time ids)", &out, &r["out"], 1e-4);
}

#[test]
fn images_match_diffusers() {
    let expected = common::read_ref("sdxl/images.safetensors");
    let model = load();
    let mut failures = Vec::new();
    let cases = json("cases.json");
    for case in &cases {
        let key = case["key"].as_str().unwrap();
        let p = common::case_params(case, "sdxl");
        let job = model.prepare(&p).unwrap_or_else(|e| panic!("{key}: {e:#}"));
        let out = model.generate(job, &mut |_| Flow::Continue).unwrap_or_else(|e| panic!("{key}: {e:#}"));
        let diff = (out.image.permute([1, 2, 0]) - &expected[key]).abs();
        let (max, mean) = (diff.max().double_value(&[]) * 255.0, diff.mean(None).double_value(&[]) * 255.0);
        println!("sdxl {key}: max |Δ| {max:.4}/255, mean {mean:.5}/255");
        if max > 3.0 || mean > 0.5 {
            failures.push(format!("{key}: max {max:.3}/255 mean {mean:.4}/255"));
        }
    }
    assert_eq!(cases.len(), 10, "five schedulers × txt2img/img2img");
    assert!(failures.is_empty(), "images differ from diffusers:\n{}", failures.join("\n"));
}

struct ExplainCase {
    key: String,
    scheduler: SchedulerKind,
    steps: usize,
    step_index: usize,
    timestep: f64,
    size: SizeConditioning,
    prompt: String,
    words: Vec<String>,
    subjects: Vec<usize>,
    layers: Vec<usize>,
}

fn explain_cases() -> Vec<ExplainCase> {
    json("explain.json")
        .iter()
        .map(|c| {
            let list =
                |k: &str| c[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect::<Vec<_>>();
            let (w, h) = (c["width"].as_i64().unwrap(), c["height"].as_i64().unwrap());
            ExplainCase {
                key: c["key"].as_str().unwrap().into(),
                scheduler: c["scheduler"].as_str().unwrap().parse().unwrap(),
                steps: c["steps"].as_u64().unwrap() as usize,
                step_index: c["step_index"].as_u64().unwrap() as usize,
                timestep: c["timestep"].as_f64().unwrap(),
                size: SizeConditioning { original: (w, h), crop_top_left: (0, 0), target: (w, h) },
                prompt: c["prompt"].as_str().unwrap().into(),
                words: c["words"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect(),
                subjects: list("subjects"),
                layers: list("layer_list"),
            }
        })
        .collect()
}

fn maps(model: &StableDiffusion, case: &ExplainCase, z: &Tensor, mode: ExplainMode) -> Tensor {
    let (scheduler, _) = pipeline::schedule(&model.scheduler_config, case.scheduler, false, case.steps, None).unwrap();
    assert_eq!(scheduler.timesteps()[case.step_index], case.timestep, "{}: timestep", case.key);
    let cond = model.text_context(&case.prompt, None, &case.size);
    explain::attribute(
        model,
        &*scheduler,
        z,
        case.step_index,
        case.timestep,
        &cond,
        &case.layers,
        &case.subjects,
        mode,
        None,
    )
    .unwrap_or_else(|e| panic!("{}: {e:#}", case.key))
}

#[test]
fn exact_grad_sam_matches_pytorch_autograd() {
    let expected = common::read_ref("sdxl/explain.safetensors");
    let model = load();
    let cases = explain_cases();
    for case in &cases {
        let specs: Vec<SubjectSpec> = case.words.iter().map(|w| SubjectSpec::Word(w.clone())).collect();
        let (subjects, _) = explain::resolve_subjects(&model.tokenizer, &case.prompt, &specs).unwrap();
        assert_eq!(subjects.iter().map(|s| s.token_index).collect::<Vec<_>>(), case.subjects, "{}", case.key);
        let z = &expected[&format!("{}.z", case.key)];
        let exact = &expected[&format!("{}.map", case.key)];
        let ours = maps(&model, case, z, ExplainMode::Exact);
        common::assert_rel_l2(&format!("sdxl {} exact ({} layers)", case.key, case.layers.len()), &ours, exact, 1e-3);
        // Fast mode: SDXL's last up block has no attention, so no layer factorises and
        // every layer is the one-backward estimate; reported against the definition.
        let fast = maps(&model, case, z, ExplainMode::Fast);
        assert_eq!(fast.size(), exact.size());
        assert!(fast.isfinite().all().int64_value(&[]) == 1 && fast.min().double_value(&[]) >= 0.0);
        let mask = |m: &Tensor| explain::mask::build_mask(m, &explain::MaskParams::default());
        println!(
            "sdxl {}: fast map rel L2 vs exact {:.3}, mask IoU {:.3}",
            case.key,
            common::rel_l2(&fast, exact),
            explain::mask::iou(&mask(&fast), &mask(exact))
        );
    }
    assert_eq!(cases.len(), 3);
}

/// A rectangle mask [H, W] u8 (255 inside [y0, y1) × [x0, x1)).
fn rect(w: i64, h: i64, (x0, y0, x1, y1): (i64, i64, i64, i64)) -> Tensor {
    let m = Tensor::zeros([h, w], (Kind::Uint8, Device::Cpu));
    let _ = m.narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0).fill_(255);
    m
}

#[test]
fn protected_pixels_are_bit_exact_with_grad_sam() {
    let model = load();
    let img = image_io::read_rgb(&common::fixtures().join("ref/sdxl/reference.png")).unwrap();
    let (w, h) = (img.width() as i64, img.height() as i64);
    let region = (5, 3, 27, 21);
    for (scheduler, mode, feather) in
        [(SchedulerKind::Ddim, ExplainMode::Fast, 0), (SchedulerKind::Euler, ExplainMode::Exact, 2)]
    {
        let p = GenerateParams {
            prompt: "a small yellow star at the top left".into(),
            seed: 11,
            steps: 10,
            guidance: 6.0,
            scheduler,
            width: w,
            height: h,
            reference: Some(image_io::rgb_to_tensor(&img)),
            strength: 0.9,
            explain: Some(ExplainParams {
                mode,
                subjects: vec![SubjectSpec::Word("star".into())],
                ..Default::default()
            }),
            protect: Some(ProtectParams { mask: rect(w, h, region), feather }),
            ..Default::default()
        };
        let mut manipulated = 0;
        let out = model
            .generate(model.prepare(&p).unwrap(), &mut |e| {
                manipulated += e.manipulation.is_some() as usize;
                Flow::Continue
            })
            .unwrap();
        let rgb = image_io::tensor_to_rgb(&out.image).unwrap();
        let (mut inside_diff, mut outside_changed, mut outside) = (0, 0, 0);
        for (x, y, px) in rgb.enumerate_pixels() {
            let inside = (region.0..region.2).contains(&(x as i64)) && (region.1..region.3).contains(&(y as i64));
            let want = img.get_pixel(x, y);
            if inside {
                inside_diff += (px != want) as usize;
            } else {
                outside += 1;
                outside_changed += (px != want) as usize;
            }
        }
        println!(
            "sdxl {scheduler} {mode}: {manipulated} manipulated steps, {outside_changed}/{outside} outside changed"
        );
        assert_eq!(inside_diff, 0, "{scheduler}: protected pixels differ from the reference");
        assert!(outside_changed > outside / 2, "{scheduler}: only {outside_changed}/{outside} pixels outside changed");
        assert_eq!(manipulated, 3, "the default timesteps 780, 520, 320");
        assert_eq!(out.comparison.unwrap().psnr_protected, Some(f64::INFINITY));
    }
}

#[test]
fn text_time_config_needs_its_widths_and_other_added_embeddings_are_refused() {
    use frisket_engine::unet::UNetConfig;
    let base = std::fs::read_to_string(common::model_dir("sdxl").join("unet/config.json")).unwrap();
    let with = |field: &str, value: &str| {
        let mut json: serde_json::Value = serde_json::from_str(&base).unwrap();
        json[field] = serde_json::from_str(value).unwrap();
        serde_json::from_value::<UNetConfig>(json).unwrap()
    };
    let cfg = with("addition_embed_type", r#""text_time""#);
    cfg.validate().unwrap();
    // 88 inputs = 6 time ids × 8 + a pooled embedding of 40.
    assert_eq!(cfg.text_time_dims(6), Some((8, 40)));
    for (field, value, named) in [
        ("addition_embed_type", r#""text""#, "addition_embed_type"),
        ("addition_time_embed_dim", "null", "addition_time_embed_dim"),
        ("projection_class_embeddings_input_dim", "null", "projection_class_embeddings_input_dim"),
    ] {
        let err = format!("{:#}", with(field, value).validate().unwrap_err());
        assert!(err.contains(named), "error for {field} = {value} does not name {named}: {err}");
    }
}

/// The prompt cache hands out fresh rows: zeroing an empty negative prompt in one job's
/// context leaves the cached encoding of "" alone, and cached, batched and single
/// encodings agree (states and pooled).
#[test]
fn prompt_cache_keeps_sdxl_rows_apart() {
    let model = load();
    let size = SizeConditioning { original: (64, 48), crop_top_left: (0, 0), target: (64, 48) };
    let (empty, empty_pooled) = tch::no_grad(|| model.encode_prompts_pooled(&[""]));
    let context = tch::no_grad(|| model.text_context("a duck", Some(""), &size));
    assert_eq!(context.states().narrow(0, 0, 1).abs().max().double_value(&[]), 0.0);
    let (again, again_pooled) = tch::no_grad(|| model.encode_prompts_pooled(&[""]));
    assert!(again.abs().max().double_value(&[]) > 0.0, "the cached empty prompt was zeroed");
    assert_eq!(again, empty);
    assert_eq!(again_pooled, empty_pooled);

    let (batch, pooled) = tch::no_grad(|| model.encode_prompts_pooled(&["a red circle", "a duck", "a red circle"]));
    let pooled = pooled.expect("SDXL pools");
    // Each prompt alone, on a second copy of the model whose cache is empty.
    let fresh = load();
    for (row, prompt) in ["a red circle", "a duck", "a red circle"].iter().enumerate() {
        let (single, single_pooled) = tch::no_grad(|| fresh.encode_prompts_pooled(&[prompt]));
        let row = row as i64;
        common::assert_rel_l2(&format!("states of {prompt:?}"), &batch.narrow(0, row, 1), &single, 1e-6);
        common::assert_rel_l2(
            &format!("pooled of {prompt:?}"),
            &pooled.narrow(0, row, 1),
            &single_pooled.unwrap(),
            1e-6,
        );
    }
}
