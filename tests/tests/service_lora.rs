//! LoRAs over the service: `serve --loras` with the fixture LoRAs (tests/fixtures/ref_lora.py).
//! ListModels names the LoRAs that fit each model; a job with a LoRA renders diffusers'
//! image; an unknown LoRA, a weight out of range and a LoRA for another model are
//! INVALID_ARGUMENT; the next job without LoRA is the plain model's image again.
use frisket_e2e::{fixtures_dir, generate, read_f32, Server};
use frisket_proto::v1 as pb;
use tonic::Code;

/// The case `sd1/kohya` of ref_lora.py.
fn kohya_case(loras: Vec<pb::LoraSpec>) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: "sd1".into(),
        prompt: "a red circle on a blue background".into(),
        negative_prompt: "blurry".into(),
        seed: Some(11),
        steps: Some(6),
        guidance: Some(7.5),
        scheduler: "ddim".into(),
        width: 64,
        height: 64,
        loras,
        ..Default::default()
    }
}

fn lora(name: &str, weight: f32) -> pb::LoraSpec {
    pb::LoraSpec { name: name.into(), weight: Some(weight) }
}

async fn result_of(server: &Server, req: pb::GenerateRequest) -> pb::Result {
    let mut client = server.client().await;
    let got = generate(&mut client, req).await;
    assert_eq!(got.code(), Code::Ok, "{:?}", got.error);
    got.result().unwrap().clone()
}

async fn image_of(server: &Server, req: pb::GenerateRequest) -> Vec<u8> {
    result_of(server, req).await.image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loras_are_listed_applied_and_refused() {
    let lora_dir = fixtures_dir().join("lora");
    let server = Server::start(&["--loras", lora_dir.to_str().unwrap()]).await;
    let mut client = server.client().await;

    let listed = client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.loras, ["sd1_kohya", "sd1_kohya_sgm", "sd1_peft", "sd2_kohya", "sdxl_kohya"]);
    let fitting = |name: &str| listed.models.iter().find(|m| m.name == name).unwrap().loras.clone();
    assert_eq!(fitting("sd1"), ["sd1_kohya", "sd1_kohya_sgm", "sd1_peft"]);
    assert_eq!(fitting("sd2"), ["sd2_kohya"]);
    // SDXL's file changes both text encoders (lora_te1_, lora_te2_).
    assert_eq!(fitting("sdxl"), ["sdxl_kohya"]);

    let first = result_of(&server, kohya_case(Vec::new())).await;
    let plain = first.image.clone();

    // The LoRA's image is diffusers' (the PNG's 8 bits add at most half a level). It is
    // merged into the loaded model, which is not loaded again.
    let with_lora = result_of(&server, kohya_case(vec![lora("sd1_kohya", 0.8)])).await;
    let (t0, t1) = (first.timings.unwrap(), with_lora.timings.unwrap());
    assert!(t0.model_load_seconds > 0.0 && t0.lora_seconds < t0.model_load_seconds, "{t0:?}");
    assert!(t1.model_load_seconds == 0.0 || t1.model_load_seconds < 1e-3, "the model was loaded again: {t1:?}");
    assert!(t1.lora_seconds > 0.0, "{t1:?}");
    let png = with_lora.image;
    let ours = image::load_from_memory(&png).unwrap().to_rgb8();
    let theirs = read_f32(&fixtures_dir().join("ref/lora/images.safetensors"), "sd1/kohya");
    assert_eq!(ours.as_raw().len(), theirs.len());
    let diffs: Vec<f64> =
        ours.as_raw().iter().zip(&theirs).map(|(&a, &b)| (a as f64 - b as f64 * 255.0).abs()).collect();
    let max = diffs.iter().cloned().fold(0.0, f64::max);
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    println!("sd1/kohya over the service: max |Δ| {max:.3}/255, mean {mean:.4}/255");
    assert!(max <= 3.0 && mean <= 0.5, "max {max}/255 mean {mean}/255");
    assert_ne!(png, plain);

    for (req, needle) in [
        (
            kohya_case(vec![lora("no_such_lora", 1.0)]),
            "available: sd1_kohya, sd1_kohya_sgm, sd1_peft, sd2_kohya, sdxl_kohya",
        ),
        (kohya_case(vec![lora("../sd1_kohya", 1.0)]), "not found"),
        (kohya_case(vec![lora("sd1_kohya", 4.5)]), "within [-4, 4]"),
        (kohya_case(vec![lora("sd1_kohya", f32::NAN)]), "within [-4, 4]"),
        (
            kohya_case(vec![lora("sd2_kohya", 1.0)]),
            "LoRA key `lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`",
        ),
    ] {
        let got = generate(&mut client, req).await;
        let status = got.error.expect("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(status.message().contains(needle), "{:?} lacks {needle:?}", status.message());
    }

    // The model is the plain one again.
    assert_eq!(image_of(&server, kohya_case(Vec::new())).await, plain);
}
