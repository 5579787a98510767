//! Parity with the reference implementations (tests/fixtures/ref_eval.py): clean-fid's resize,
//! features, FID and KID; pytorch-fid's features and FID; each reference's statistics stage.
use frisket_eval::inception::{Inception, FEATURES};
use frisket_eval::kid::{kernel_distance, KidConfig};
use frisket_eval::stats::{frechet_distance, Stats};
use frisket_eval::{folder_features, folder_stats, resize, Mode};
use serde_json::Value;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// The fixtures written by `make fixtures` (tests/fixtures/ref_eval.py).
fn dir() -> PathBuf {
    let root = match std::env::var("FRISKET_FIXTURES") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures"),
    };
    root.join("eval")
}

fn reference() -> Value {
    let path = dir().join("ref.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn f32_file(name: &str, cols: i64) -> Tensor {
    let bytes = std::fs::read(dir().join(name)).unwrap();
    let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    Tensor::from_slice(&v).reshape([-1, cols])
}

fn f64_file(name: &str, cols: i64) -> Tensor {
    let bytes = std::fs::read(dir().join(name)).unwrap();
    let v: Vec<f64> = bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
    Tensor::from_slice(&v).reshape([-1, cols])
}

fn rel(actual: f64, expected: f64) -> f64 {
    (actual - expected).abs() / expected.abs()
}

/// Largest |a − b| over the largest |b|.
fn max_rel(actual: &Tensor, expected: &Tensor) -> f64 {
    let diff = (actual - expected).abs().max().double_value(&[]);
    diff / expected.abs().max().double_value(&[])
}

#[test]
fn resize_is_bit_exact_with_clean_fid() {
    for case in reference()["resize"].as_array().unwrap() {
        let (h, w) = (case["height"].as_u64().unwrap() as usize, case["width"].as_u64().unwrap() as usize);
        let input = std::fs::read(dir().join("resize").join(case["input"].as_str().unwrap())).unwrap();
        let expected = std::fs::read(dir().join("resize").join(case["output"].as_str().unwrap())).unwrap();
        let ours = resize::resize_clean(&input, w, h, 299);
        let ours: Vec<u8> = ours.iter().flat_map(|v| v.to_le_bytes()).collect();
        let differing = ours.chunks(4).zip(expected.chunks(4)).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{h}x{w}: {differing} of {} values differ from PIL", 299 * 299 * 3);
    }
}

#[test]
fn clean_mode_matches_clean_fid() {
    let r = reference();
    let net = Inception::load(&dir().join("inception/inception-2015-12-05.pt")).unwrap();
    let a = folder_features(&dir().join("a"), &net, Mode::Clean, 10).unwrap();
    let b = folder_features(&dir().join("b"), &net, Mode::Clean, 10).unwrap();
    let (fa, fb) = (f32_file("clean_a.f32", FEATURES), f32_file("clean_b.f32", FEATURES));
    let feat_err = max_rel(&a, &fa).max(max_rel(&b, &fb));
    let fid = frechet_distance(&Stats::from_features(&a).unwrap(), &Stats::from_features(&b).unwrap()).unwrap();
    let kid = kernel_distance(&a, &b, &KidConfig::default()).unwrap();
    let (fid_ref, kid_ref) = (r["clean_fid_exact"].as_f64().unwrap(), r["clean_kid"].as_f64().unwrap());
    println!("clean: features max rel {feat_err:.2e}; FID {fid} vs {fid_ref} (rel {:.2e}); KID {kid} vs {kid_ref} (rel {:.2e})", rel(fid, fid_ref), rel(kid, kid_ref));
    assert!(feat_err < 1e-5, "features differ from clean-fid's: {feat_err:.2e}");
    assert!(rel(fid, fid_ref) <= 1e-4, "FID {fid} vs {fid_ref}");
    assert!(rel(kid, kid_ref) <= 1e-4, "KID {kid} vs {kid_ref}");
}

#[test]
fn pytorch_fid_mode_matches_pytorch_fid() {
    let r = reference();
    let net = Inception::load(&dir().join("pt_inception-2015-12-05-6726825d.pth")).unwrap();
    let cache = std::env::temp_dir().join(format!("frisket-eval-test-{}", std::process::id()));
    let weights = dir().join("pt_inception-2015-12-05-6726825d.pth");
    let a = folder_stats(&dir().join("a"), &net, &weights, Mode::PytorchFid, 16, Some(&cache)).unwrap();
    let b = folder_stats(&dir().join("b"), &net, &weights, Mode::PytorchFid, 16, Some(&cache)).unwrap();
    let fid = frechet_distance(&a, &b).unwrap();
    // The second call reads the cache: same numbers, one entry per folder.
    let again = folder_stats(&dir().join("a"), &net, &weights, Mode::PytorchFid, 16, Some(&cache)).unwrap();
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
    assert!(again.sigma.equal(&a.sigma));
    std::fs::remove_dir_all(&cache).unwrap();
    let features = folder_features(&dir().join("a"), &net, Mode::PytorchFid, 16).unwrap();
    let feat_err = max_rel(&features, &f32_file("pytorch_fid_a.f32", FEATURES));
    let fid_ref = r["pytorch_fid_exact"].as_f64().unwrap();
    println!("pytorch-fid: features max rel {feat_err:.2e}; FID {fid} vs {fid_ref} (rel {:.2e})", rel(fid, fid_ref));
    assert!(feat_err < 1e-5, "features differ from pytorch-fid's: {feat_err:.2e}");
    assert!(rel(fid, fid_ref) <= 1e-4, "FID {fid} vs {fid_ref}");
}

#[test]
fn statistics_stage_matches_each_reference() {
    let r = &reference()["synthetic"];
    let dims = r["dims"].as_i64().unwrap();
    let (xa, xb) = (f64_file("synthetic_a.f64", dims), f64_file("synthetic_b.f64", dims));
    let fid = frechet_distance(&Stats::from_features(&xa).unwrap(), &Stats::from_features(&xb).unwrap()).unwrap();
    let kid = kernel_distance(&xa, &xb, &KidConfig::default()).unwrap();
    for key in ["clean_fid", "pytorch_fid"] {
        let expected = r[key].as_f64().unwrap();
        println!("synthetic {key}: {fid} vs {expected} (rel {:.2e})", rel(fid, expected));
        assert!(rel(fid, expected) <= 1e-4, "{key}: {fid} vs {expected}");
    }
    let kid_ref = r["clean_kid"].as_f64().unwrap();
    println!("synthetic KID: {kid} vs {kid_ref} (rel {:.2e})", rel(kid, kid_ref));
    assert!(rel(kid, kid_ref) <= 1e-4);
    // Identical sets are at distance 0 (up to round-off), whatever the conventions.
    let same = frechet_distance(&Stats::from_features(&xa).unwrap(), &Stats::from_features(&xa).unwrap()).unwrap();
    assert!(same.abs() < 1e-9, "FID of a set with itself: {same}");
    assert_eq!(xa.kind(), Kind::Double);
}

#[test]
fn bad_input_is_a_clear_error() {
    let missing = Inception::load(&dir().join("no-such-inception.pt")).err().unwrap().to_string();
    assert!(missing.contains("Inception weights not found"), "{missing}");
    let mixed = std::env::temp_dir().join(format!("frisket-eval-bad-{}", std::process::id()));
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(dir().join("a/000.png"), mixed.join("000.png")).unwrap();
    std::fs::copy(dir().join("a/001.png"), mixed.join("001.png")).unwrap();
    std::fs::write(mixed.join("notes.txt"), "not an image").unwrap();
    let err = frisket_eval::image_files(&mixed).err().unwrap().to_string();
    assert!(err.contains("notes.txt") && err.contains("not an image"), "{err}");
    std::fs::remove_file(mixed.join("notes.txt")).unwrap();
    std::fs::remove_file(mixed.join("001.png")).unwrap();
    let err = frisket_eval::image_files(&mixed).err().unwrap().to_string();
    assert!(err.contains("at least 2"), "{err}");
    let net = Inception::load(&dir().join("inception/inception-2015-12-05.pt")).unwrap();
    let err = folder_features(&dir().join("a"), &net, Mode::PytorchFid, 4).err().unwrap().to_string();
    assert!(err.contains("pt_inception"), "{err}");
    std::fs::remove_dir_all(&mixed).unwrap();
}

#[test]
fn masked_psnr_and_ssim_match_torchmetrics() {
    use frisket_eval::preservation::{masked_psnr, masked_ssim, read_image, read_mask, ssim_map};
    let r = &reference()["preservation"];
    let pred = read_image(&dir().join("pred.png")).unwrap();
    let target = read_image(&dir().join("target.png")).unwrap();
    let mask = read_mask(&dir().join("mask.png")).unwrap();
    let psnr = masked_psnr(&pred, &target, &mask).unwrap();
    let ssim = masked_ssim(&pred, &target, &mask).unwrap();
    let whole = ssim_map(&pred, &target).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    for (name, ours, key) in [("PSNR", psnr, "psnr"), ("SSIM", ssim, "ssim"), ("SSIM whole", whole, "ssim_whole")] {
        let expected = r[key].as_f64().unwrap();
        println!("{name}: {ours} vs {expected} (abs {:.2e})", (ours - expected).abs());
        assert!((ours - expected).abs() <= 1e-5, "{name}: {ours} vs {expected}");
    }
    // The edit lies mostly outside the mask: the masked SSIM is higher than the whole image's.
    assert!(ssim > whole);
    let other = Tensor::zeros([3, 10, 10], (Kind::Float, tch::Device::Cpu));
    let err = masked_ssim(&pred, &other, &mask).err().unwrap().to_string();
    assert!(err.contains("differ in size"), "{err}");
    let empty = mask.zeros_like();
    let err = masked_psnr(&pred, &target, &empty).err().unwrap().to_string();
    assert!(err.contains("mask is empty"), "{err}");
}

#[test]
fn masked_lpips_matches_the_lpips_package() {
    use frisket_eval::lpips::Lpips;
    use frisket_eval::preservation::{read_image, read_mask};
    let expected = reference()["preservation"]["lpips"].as_f64().unwrap();
    let net = Lpips::load(&dir().join("lpips_alex.pth")).unwrap();
    let pred = read_image(&dir().join("pred.png")).unwrap();
    let target = read_image(&dir().join("target.png")).unwrap();
    let mask = read_mask(&dir().join("mask.png")).unwrap();
    let ours = net.masked(&pred, &target, &mask).unwrap();
    println!("LPIPS: {ours} vs {expected} (abs {:.2e})", (ours - expected).abs());
    assert!((ours - expected).abs() <= 1e-5, "{ours} vs {expected}");
    assert_eq!(net.masked(&target, &target, &mask).unwrap(), 0.0);
    // The Inception state dict is not an LPIPS one.
    let err = Lpips::load(&dir().join("pt_inception-2015-12-05-6726825d.pth")).err().unwrap().to_string();
    assert!(err.contains("not an AlexNet LPIPS state dict"), "{err}");
    // The same weights as torch.save(state_dict()) writes them, and in the legacy format,
    // read without unpickling; a pickle that would run a command is refused.
    for name in ["lpips_alex_ordereddict.pth", "lpips_alex_legacy.pth"] {
        let again = Lpips::load(&dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(again.masked(&pred, &target, &mask).unwrap(), ours, "{name}");
    }
    let err =
        format!("{:#}", frisket_engine::checkpoint::torch_file::read(&dir().join("runs_command.pth")).err().unwrap());
    assert!(err.contains("posix.system") || err.contains("os.system"), "{err}");
}

#[test]
fn torchmetrics_mode_matches_torchmetrics() {
    let r = reference();
    let net = Inception::load(&dir().join("pt_inception-2015-12-05-6726825d.pth")).unwrap();
    let a = folder_features(&dir().join("a"), &net, Mode::Torchmetrics, 12).unwrap();
    let b = folder_features(&dir().join("b"), &net, Mode::Torchmetrics, 12).unwrap();
    let feat_err = max_rel(&a, &f32_file("torchmetrics_a.f32", FEATURES))
        .max(max_rel(&b, &f32_file("torchmetrics_b.f32", FEATURES)));
    let fid = frechet_distance(&Stats::from_features(&a).unwrap(), &Stats::from_features(&b).unwrap()).unwrap();
    let fid_ref = r["torchmetrics_fid"].as_f64().unwrap();
    println!("torchmetrics: features max rel {feat_err:.2e}; FID {fid} vs {fid_ref} (rel {:.2e})", rel(fid, fid_ref));
    assert!(feat_err < 1e-5, "features differ from torchmetrics': {feat_err:.2e}");
    assert!(rel(fid, fid_ref) <= 1e-4, "FID {fid} vs {fid_ref}");
}

#[test]
fn clip_score_matches_torchmetrics() {
    use frisket_engine::image_io::read_rgb;
    use frisket_eval::clip::{bounding_box, clip_score, crop_rgb, directional, pair_scores, read_prompts, Clip};
    let r = &reference()["clip"];
    let net = Clip::load(&dir().join("clip")).unwrap();
    let files = frisket_eval::list_images(&dir().join("clip_images")).unwrap();
    let prompts = read_prompts(&dir().join("clip_prompts.txt")).unwrap();
    let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let images: Vec<_> = files.iter().map(|f| read_rgb(f).unwrap()).collect();
    let pixels: Vec<Tensor> = images
        .iter()
        .map(|img| net.preprocessing.apply(img.as_raw(), img.width() as usize, img.height() as usize))
        .collect();
    let pixels = Tensor::stack(&pixels, 0);
    let expected = f32_file("clip_pixels.f32", 3 * 224 * 224).view([-1, 3, 224, 224]);
    let pixel_err = (&pixels - &expected).abs().max().double_value(&[]);
    println!("CLIP pixel values: max abs difference {pixel_err:.2e}");
    assert!(pixel_err <= 1e-5, "preprocessing differs from CLIPImageProcessor's: {pixel_err:.2e}");

    let image_emb = net.image_embeddings(&pixels);
    let text_emb = net.text_embeddings(&texts);
    let scores = pair_scores(&image_emb, &text_emb);
    let (ours, expected) = (clip_score(&scores), r["score"].as_f64().unwrap());
    println!("CLIP score: {ours} vs {expected} (abs {:.2e}); pairs {scores:?}", (ours - expected).abs());
    assert!((ours - expected).abs() <= 1e-3, "{ours} vs {expected}");

    // The edited region: image 0 cropped to the bounding box of its mask.
    let mask = frisket_eval::preservation::read_mask(&dir().join("clip_mask.png")).unwrap();
    let bbox = bounding_box(&mask).unwrap();
    assert_eq!(bbox, (7, 10, 23, 31));
    let (rgb, w, h) = crop_rgb(images[0].as_raw(), images[0].width() as usize, bbox);
    let region = clip_score(&pair_scores(&net.embed_image(&rgb, w, h), &text_emb.narrow(0, 0, 1)));
    let expected = r["region_score"].as_f64().unwrap();
    println!("CLIP region score: {region} vs {expected} (abs {:.2e})", (region - expected).abs());
    assert!((region - expected).abs() <= 1e-3, "{region} vs {expected}");

    // Image 1 as the edit of image 0, prompt 1 as the target of prompt 0.
    let e = |t: &Tensor, i: i64| t.narrow(0, i, 1);
    let ours = directional(&e(&image_emb, 1), &e(&image_emb, 0), &e(&text_emb, 1), &e(&text_emb, 0))[0];
    let expected = r["directional"].as_f64().unwrap();
    println!("directional CLIP: {ours} vs {expected} (abs {:.2e})", (ours - expected).abs());
    assert!((ours - expected).abs() <= 1e-4, "{ours} vs {expected}");

    // Too long a prompt is cut to 77 tokens keeping the end token: whatever follows the cut is ignored.
    let long = net.text_embeddings(&[&"red circle ".repeat(60), &"red circle ".repeat(90)]);
    assert!(long.narrow(0, 0, 1).allclose(&long.narrow(0, 1, 1), 0.0, 0.0, false));
    assert!(!long.narrow(0, 0, 1).allclose(&text_emb.narrow(0, 0, 1), 1e-3, 1e-3, false));

    let err = Clip::load(&dir().join("no-such-clip")).err().unwrap().to_string();
    assert!(err.contains("CLIP folder not found"), "{err}");
    let err = format!("{:#}", Clip::load(&dir().join("inception")).err().unwrap());
    assert!(err.contains("config.json"), "{err}");
    let empty = std::env::temp_dir().join(format!("frisket-eval-prompts-{}", std::process::id()));
    std::fs::write(&empty, "\n\n").unwrap();
    let err = read_prompts(&empty).err().unwrap().to_string();
    assert!(err.contains("is empty"), "{err}");
    std::fs::write(&empty, "one\n\nthree\n").unwrap();
    let err = read_prompts(&empty).err().unwrap().to_string();
    assert!(err.contains("line 2"), "{err}");
    std::fs::remove_file(&empty).unwrap();
    let err = bounding_box(&mask.zeros_like()).err().unwrap().to_string();
    assert!(err.contains("mask is empty"), "{err}");
}

#[test]
fn pair64_matches_torchmetrics_fid_with_each_image_fed_twice() {
    use frisket_engine::image_io::read_rgb;
    use frisket_eval::pair64::pair64;
    let path = dir().join("pair64.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures` or tests/fixtures/ref_pair64.py)", path.display()));
    let r: Value = serde_json::from_str(&text).unwrap();
    let net = Inception::load(&dir().join("pt_inception-2015-12-05-6726825d.pth")).unwrap();
    for p in r["pairs"].as_array().unwrap() {
        let a = read_rgb(&dir().join("a").join(p["a"].as_str().unwrap())).unwrap();
        let b = read_rgb(&dir().join("b").join(p["b"].as_str().unwrap())).unwrap();
        let x = |img: &image::RgbImage| {
            Mode::Torchmetrics.preprocess(img.as_raw(), img.width() as usize, img.height() as usize)
        };
        let feats = net.features_64(&Tensor::stack(&[x(&a), x(&b)], 0)).unwrap().to_kind(Kind::Double);
        let expected: Vec<f64> = p["features"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect();
        let feat_err = max_rel(&feats, &Tensor::from_slice(&expected).view([2, 64]));
        let (ours, theirs) = (pair64(&net, &a, &b).unwrap(), p["value"].as_f64().unwrap());
        println!(
            "pair64 {}: {ours} vs torchmetrics {theirs} (rel {:.2e}); features rel {feat_err:.2e}",
            p["a"],
            rel(ours, theirs)
        );
        assert!(feat_err < 1e-5, "64 features differ from torchmetrics': {feat_err:.2e}");
        // torchmetrics returns its float64 result as float32.
        assert!(rel(ours, theirs) <= 1e-6, "{ours} vs {theirs}");
        assert_eq!(pair64(&net, &a, &a).unwrap(), 0.0);
    }
    let ts = Inception::load(&dir().join("inception").join("inception-2015-12-05.pt")).unwrap();
    let err =
        ts.features_64(&Tensor::zeros([1, 3, 299, 299], (Kind::Float, tch::Device::Cpu))).unwrap_err().to_string();
    assert!(err.contains("needs pytorch-fid's pt_inception"), "{err}");
}
