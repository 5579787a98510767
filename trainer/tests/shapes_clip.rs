//! The shapes CLIP folder that train_clip writes loads in transformers' CLIPModel with every
//! weight used, and the evaluator's CLIP score of it matches torchmetrics' CLIPScore on shapes
//! scenes; the shipped models/shapes-clip meets both bars, as its eval.json says.
use frisket_eval::clip::{clip_score, pair_scores, Clip};
use frisket_shapes::generate_default;
use frisket_trainer::shapes_clip::{
    object_phrase, presence, read_json, retrieval, PRESENCE_BAR, RETRIEVAL_BAR, RETRIEVAL_GROUP, RETRIEVAL_SEED,
};
use std::path::PathBuf;
use std::process::Command;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A folder from a two-step train_clip run (the layout and forward are what matter here).
fn trained_folder(dir: &std::path::Path) -> PathBuf {
    let out = dir.join("clip");
    let status = Command::new(env!("CARGO_BIN_EXE_train_clip"))
        .args(["--steps", "2", "--batch", "8", "--pool", "16", "--warmup", "1", "--out"])
        .arg(&out)
        .current_dir(workspace_root())
        .status()
        .expect("running train_clip");
    assert!(status.success());
    out
}

/// The project's venv (scripts/venv.sh) has transformers and torchmetrics.
fn venv_python() -> PathBuf {
    let out = Command::new(workspace_root().join("scripts/venv.sh")).output().expect("running scripts/venv.sh");
    assert!(out.status.success(), "scripts/venv.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("bin/python")
}

#[test]
fn clip_score_matches_torchmetrics_with_transformers_loading_the_folder() {
    let dir = std::env::temp_dir().join(format!("frisket-shapes-clip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let folder = trained_folder(&dir);
    let clip = Clip::load(&folder).unwrap();
    let scenes: Vec<_> = (RETRIEVAL_SEED..RETRIEVAL_SEED + 4).map(generate_default).collect();
    // Two captions, a present object's phrase and an absent one ("a ... cross" where none is).
    let o = &scenes[2].meta.objects[0];
    let prompts = [
        scenes[0].meta.caption.clone(),
        scenes[1].meta.caption.clone(),
        object_phrase(o.colour, o.shape),
        scenes[2].meta.caption.clone(),
    ];
    let mut ours = Vec::new();
    for (i, (s, p)) in scenes.iter().zip(&prompts).enumerate() {
        s.image.save(dir.join(format!("{i}.png"))).unwrap();
        let (w, h) = s.image.dimensions();
        let img = clip.embed_image(s.image.as_raw(), w as usize, h as usize);
        ours.extend(pair_scores(&img, &clip.text_embeddings(&[p])));
    }
    std::fs::write(dir.join("prompts.txt"), prompts.join("\n") + "\n").unwrap();
    let script = workspace_root().join("trainer/scripts/check_clip.py");
    let out = Command::new(venv_python())
        .args([script, folder, dir.clone(), dir.join("prompts.txt")])
        .output()
        .expect("running check_clip.py");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "check_clip.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = r["score"].as_f64().unwrap();
    println!("CLIP score {} vs torchmetrics {expected}; pairs {ours:?} vs {}", clip_score(&ours), r["pairs"]);
    assert!((clip_score(&ours) - expected).abs() <= 1e-3);
    for (a, b) in ours.iter().zip(r["pairs"].as_array().unwrap()) {
        assert!((a.max(0.0) - b.as_f64().unwrap()).abs() <= 1e-3, "{a} vs {b}");
    }
}

/// eval_clip's measurement of the shipped folder, redone here: the bars hold and the numbers
/// are the ones its eval.json and model card report (to a few questions: another CPU's
/// kernels may round a score near the threshold the other way).
#[test]
fn shipped_model_meets_the_bars_its_eval_json_reports() {
    let dir = workspace_root().join("models/shapes-clip");
    let eval = read_json(&dir.join("eval.json")).unwrap();
    let clip = Clip::load(&dir).unwrap();
    let r = retrieval(&clip, eval["retrieval"]["scenes"].as_u64().unwrap() as usize / RETRIEVAL_GROUP);
    let p = presence(
        &clip,
        eval["presence"]["tune_scenes"].as_u64().unwrap() as usize,
        eval["presence"]["test_scenes"].as_u64().unwrap() as usize,
    );
    println!("retrieval {r:?}\npresence {p:?}");
    assert!(r.image_to_text_top1 >= RETRIEVAL_BAR, "retrieval top-1 {}", r.image_to_text_top1);
    assert!(p.agreement_with_judge >= PRESENCE_BAR, "presence agreement {}", p.agreement_with_judge);
    let reported = |v: &serde_json::Value| v.as_f64().unwrap();
    assert!((r.image_to_text_top1 - reported(&eval["retrieval"]["image_to_text_top1"])).abs() <= 0.005);
    assert!((p.agreement_with_judge - reported(&eval["presence"]["agreement_with_judge"])).abs() <= 0.005);
}
