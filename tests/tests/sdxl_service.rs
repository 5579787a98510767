//! SDXL over the service: the fixture SDXL model (tests/fixtures/ref_sdxl.py) renders
//! diffusers' images with its size conditioning sent as `size_conditioning`, and the field
//! is refused where it does not apply.
use frisket_e2e::{fixtures_dir, generate, read_f32, Server};
use frisket_proto::v1 as pb;
use tonic::Code;

fn cases() -> Vec<serde_json::Value> {
    let path = fixtures_dir().join("ref/sdxl/cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn request(case: &serde_json::Value) -> pb::GenerateRequest {
    let pair = |v: &serde_json::Value| (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32);
    let original = case["original_size"].as_array().map(|_| pair(&case["original_size"]));
    pb::GenerateRequest {
        model: "sdxl".into(),
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
        seed: case["seed"].as_u64(),
        steps: case["steps"].as_u64().map(|s| s as u32),
        guidance: case["guidance"].as_f64(),
        scheduler: case["scheduler"].as_str().unwrap().into(),
        width: case["width"].as_u64().unwrap() as u32,
        height: case["height"].as_u64().unwrap() as u32,
        size_conditioning: frisket_proto::size_conditioning(original, Some(pair(&case["crop_top_left"]))),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_size_conditioning_renders_as_diffusers() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let images = fixtures_dir().join("ref/sdxl/images.safetensors");
    let conditioned: Vec<_> = cases()
        .into_iter()
        .filter(|c| c["mode"] == "txt2img" && (!c["original_size"].is_null() || c["crop_top_left"][0] != 0))
        .collect();
    assert_eq!(conditioned.len(), 2, "the fixture has an original-size case and a crop case");
    for case in &conditioned {
        let key = case["key"].as_str().unwrap();
        let got = generate(&mut client, request(case)).await;
        assert_eq!(got.code(), Code::Ok, "{key}: {:?}", got.error);
        let ours = image::load_from_memory(&got.result().unwrap().image).unwrap().to_rgb8();
        let theirs = read_f32(&images, key);
        let diffs: Vec<f64> =
            ours.as_raw().iter().zip(&theirs).map(|(&a, &b)| (a as f64 - b as f64 * 255.0).abs()).collect();
        let max = diffs.iter().cloned().fold(0.0, f64::max);
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        println!("{key}: max |Δ| {max:.3}/255, mean {mean:.4}/255");
        assert!(max <= 3.0 && mean <= 0.5, "{key}: max {max}/255 mean {mean}/255");
        // Without the conditioning the image is another one.
        let plain = generate(&mut client, pb::GenerateRequest { size_conditioning: None, ..request(case) }).await;
        assert_ne!(plain.result().unwrap().image, got.result().unwrap().image, "{key}: the conditioning did nothing");
    }

    let refused = [
        (
            pb::GenerateRequest { model: "sd1".into(), ..request(&conditioned[0]) },
            "size_conditioning applies to SDXL models",
        ),
        (
            pb::GenerateRequest {
                size_conditioning: Some(pb::SizeConditioning { original_width: 128, ..Default::default() }),
                ..request(&conditioned[0])
            },
            "both set or both 0",
        ),
        (
            pb::GenerateRequest {
                size_conditioning: Some(pb::SizeConditioning { crop_top: 1 << 20, ..Default::default() }),
                ..request(&conditioned[0])
            },
            "at most 16384",
        ),
    ];
    for (req, needle) in refused {
        let status = generate(&mut client, req).await.error.expect("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(status.message().contains(needle), "{:?} lacks {needle:?}", status.message());
    }
}
