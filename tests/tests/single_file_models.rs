//! A models folder holding a diffusers folder, single-file checkpoints (`.safetensors` and
//! `.ckpt`) and broken or malicious files side by side (fixtures from
//! tests/fixtures/ref_single_file.py): ListModels reports each, the broken ones with their
//! errors, names cannot escape the folder, and jobs on the single files run while the
//! broken files are refused.
use frisket_e2e::{copy_dir, fixtures_dir, generate, models_dir, render, txt2img, Server};
use frisket_proto::v1 as pb;
use std::path::PathBuf;
use tonic::Code;

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("frisket-single-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn single(name: &str) -> PathBuf {
    let path = fixtures_dir().join("models/single").join(name);
    assert!(path.is_file(), "{} missing (run tests/fixtures/ref_single_file.py)", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folders_single_files_and_broken_files_side_by_side() {
    let root = tempdir("models");
    copy_dir(&models_dir().join("sd1"), &root.join("sd1"));
    std::fs::copy(single("sd1.safetensors"), root.join("illustrated.safetensors")).unwrap();
    let bytes = std::fs::read(single("sd2.safetensors")).unwrap();
    std::fs::write(root.join("broken.safetensors"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::write(root.join("notes.txt"), "not a model").unwrap();
    std::fs::copy(single("sd1.ckpt"), root.join("pickled.ckpt")).unwrap();
    let pickle = std::fs::read(single("sd2.ckpt")).unwrap();
    std::fs::write(root.join("broken-pickle.ckpt"), &pickle[..pickle.len() / 2]).unwrap();
    std::fs::copy(single("evil_system.ckpt"), root.join("evil.ckpt")).unwrap();
    let pwned = std::path::Path::new("/tmp/frisket-pwned-system");
    let _ = std::fs::remove_file(pwned);
    // A link that resolves outside the models folder is not a model of it.
    #[cfg(unix)]
    std::os::unix::fs::symlink(single("sd2.safetensors"), root.join("escape.safetensors")).unwrap();

    let server = Server::start_on(&root, &[]).await;
    let mut client = server.client().await;
    let models = client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["broken", "broken-pickle", "evil", "illustrated", "pickled", "sd1"]);

    let broken = &models[0];
    assert!(broken.error.contains("truncated") && broken.error.contains("broken.safetensors"), "{}", broken.error);
    assert_eq!(broken.format, "single-file");
    let (broken_pickle, evil) = (&models[1], &models[2]);
    assert!(
        broken_pickle.error.contains("broken-pickle.ckpt") && broken_pickle.error.contains("zip"),
        "{}",
        broken_pickle.error
    );
    assert!(evil.error.contains("posix.system") && evil.error.contains("refused"), "{}", evil.error);
    assert!(!pwned.exists(), "listing the malicious pickle ran it");
    for file in [&models[3], &models[4]] {
        assert!(file.error.is_empty(), "{}: {}", file.name, file.error);
        assert_eq!(
            (file.format.as_str(), file.architecture.as_str(), file.prediction_type.as_str()),
            ("single-file", "sd1", "epsilon")
        );
        assert_eq!((file.native_width, file.native_height, file.size_multiple), (512, 512, 8));
        assert!(file.img2img && file.explain && file.protected_regions);
    }
    assert_eq!(models[5].format, "diffusers");

    // A job on the single file runs to its result; the broken file is refused.
    let images = images_of(&mut client, &["illustrated", "pickled"]).await;
    assert_eq!(images[0], images[1], "the .ckpt and the .safetensors of the same weights differ");
    for name in ["broken", "broken-pickle", "evil"] {
        let refused = generate(&mut client, txt2img(name, "a red circle", 3, 3, 64, 64)).await;
        assert_eq!(refused.code(), Code::FailedPrecondition, "{name}: {:?}", refused.error);
    }
    assert!(!pwned.exists(), "a job on the malicious pickle ran it");
    let escaped = generate(&mut client, txt2img("escape", "a red circle", 3, 3, 64, 64)).await;
    assert_eq!(escaped.code(), Code::NotFound, "{:?}", escaped.error);

    let tokens = client
        .tokenize(pb::TokenizeRequest { model: "illustrated".into(), prompt: "a red cat".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(tokens.tokens.iter().any(|t| t.text == "cat</w>"));
    drop(server);
    std::fs::remove_dir_all(&root).ok();
}

/// `render --model FILE --vae FILE` renders a single file with a separate VAE.
#[test]
fn render_takes_a_single_file_and_a_vae() {
    let dir = tempdir("render");
    let out = dir.join("out.png");
    let sd1 = single("sd1.safetensors");
    let run = render(&[
        "--model",
        sd1.to_str().unwrap(),
        "--vae",
        sd1.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(image::image_dimensions(&out).unwrap(), (64, 64));
    std::fs::remove_dir_all(&dir).ok();
}

/// SD 2.x files cannot tell ε from v-prediction; `--prediction MODEL=TYPE` says it, and
/// the model is listed, scheduled and run with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prediction_override_for_a_single_file() {
    let root = tempdir("prediction");
    std::fs::copy(single("sd2.safetensors"), root.join("v21.safetensors")).unwrap();
    std::fs::copy(single("sd2.safetensors"), root.join("base.safetensors")).unwrap();
    let server = Server::start_on(&root, &["--prediction", "base=epsilon"]).await;
    let mut client = server.client().await;
    let models = client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    let listed: Vec<(&str, &str, u32)> =
        models.iter().map(|m| (m.name.as_str(), m.prediction_type.as_str(), m.native_width)).collect();
    assert_eq!(listed, [("base", "epsilon", 512), ("v21", "v_prediction", 768)]);
    let images = images_of(&mut client, &["base", "v21"]).await;
    assert_ne!(images[0], images[1], "the same weights under ε and v-prediction gave the same image");
}

/// One 3-step job on each model, each run to its result: the images.
async fn images_of(
    client: &mut pb::frisket_client::FrisketClient<tonic::transport::Channel>,
    names: &[&str],
) -> Vec<Vec<u8>> {
    let mut images = Vec::new();
    for name in names {
        let done = generate(client, txt2img(name, "a red circle", 3, 3, 64, 64)).await;
        assert_eq!(done.code(), Code::Ok, "{name}: {:?}", done.error);
        images.push(done.result().expect("a result").image.clone());
    }
    images
}
