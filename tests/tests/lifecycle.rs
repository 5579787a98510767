//! Model lifecycle against a real server: `--preload` holds health at NOT_SERVING until the
//! model is loaded, a per-model health status, ListModels' states, a model that fails to
//! load, the `Loading` event of a cold model, and UnloadModel freeing memory.
//!
//! Loading is made observable without timing: a model whose VAE weights are a named pipe
//! blocks the worker's load until the test writes to the pipe.
use frisket_e2e::{copy_dir, generate, models_dir, txt2img, Server};
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;

/// A fresh folder under the target dir (removed on drop).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = frisket_e2e::workspace_root().join("target/test-tmp").join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `models/NAME`: the fixture sd1 model whose VAE weights are the named pipe returned
/// (a one-shard index naming it), so loading it blocks until something writes the pipe.
fn gated_model(models: &Path, name: &str) -> PathBuf {
    let dir = models.join(name);
    copy_dir(&models_dir().join("sd1"), &dir);
    let vae = dir.join("vae");
    for entry in std::fs::read_dir(&vae).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let fifo = vae.join("gate.safetensors");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("running mkfifo");
    assert!(made.success(), "mkfifo failed");
    std::fs::write(
        vae.join("diffusion_pytorch_model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"decoder.conv_in.weight": "gate.safetensors"}}"#,
    )
    .unwrap();
    fifo
}

fn model<'a>(list: &'a pb::ListModelsResponse, name: &str) -> &'a pb::ModelInfo {
    list.models.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("{name} not listed: {list:?}"))
}

async fn list(server: &Server) -> pb::ListModelsResponse {
    server.client().await.list_models(pb::ListModelsRequest {}).await.expect("ListModels").into_inner()
}

/// Polls `check` (up to 60 s) until it holds.
async fn until(what: &str, server: &Server, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < Duration::from_secs(60), "{what}: not within 60 s; log:\n{}", server.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preload_holds_health_until_loaded_and_a_failed_model_leaves_the_others_serving() {
    let tmp = TempDir::new("lifecycle-preload");
    let models = tmp.0.join("models");
    copy_dir(&models_dir().join("sd1"), &models.join("sd1"));
    let fifo = gated_model(&models, "gated");
    let server = Server::start_listening(&models, &["--preload", "sd1,gated"]).await;

    // The overall status stays NOT_SERVING while "gated" cannot finish loading.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health Watch")
        .into_inner();
    let first = watch.next().await.expect("a first health status").expect("health status").status;
    assert_eq!(first, ServingStatus::NotServing as i32, "overall health before the preload finished");
    // sd1 (preloaded first) is loaded and serving by its own name meanwhile.
    until("sd1 SERVING", &server, async || {
        server.health("frisket.v1.Model/sd1").await.is_ok_and(|s| s == ServingStatus::Serving as i32)
    })
    .await;
    until("gated LOADING", &server, async || {
        model(&list(&server).await, "gated").state == pb::ModelState::Loading as i32
    })
    .await;
    let listed = list(&server).await;
    assert_eq!(model(&listed, "sd1").state, pb::ModelState::Loaded as i32);
    assert_eq!(model(&listed, "sd1").devices, ["cpu"]);
    assert_eq!(server.health("").await.unwrap(), ServingStatus::NotServing as i32);
    assert_eq!(server.health("frisket.v1.Frisket").await.unwrap(), ServingStatus::NotServing as i32);

    // Opening the pipe's other end lets the load go on; it reads no safetensors file there
    // and fails, and preloading is over. (The write may find the reader gone already.)
    let pipe = fifo.clone();
    tokio::task::spawn_blocking(move || {
        let _ = std::fs::OpenOptions::new().write(true).open(&pipe).expect("opening the pipe").write_all(b"junk");
    })
    .await
    .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(60), watch.next()).await.expect("a health change in 60 s");
    assert_eq!(next.expect("health status").expect("health status").status, ServingStatus::Serving as i32);

    let listed = list(&server).await;
    let gated = model(&listed, "gated");
    assert_eq!(gated.state, pb::ModelState::Failed as i32, "{gated:?}");
    assert!(gated.error.contains("gate.safetensors"), "the failure names the broken file: {:?}", gated.error);
    assert_eq!(gated.architecture, "sd1", "a failed load keeps the model's description");
    assert_eq!(model(&listed, "sd1").state, pb::ModelState::Loaded as i32);
    assert_eq!(server.health("frisket.v1.Model/gated").await.unwrap(), ServingStatus::NotServing as i32);

    // The others serve: a job on sd1 finishes (its model is loaded: no Loading event).
    let mut client = server.client().await;
    let done = generate(&mut client, txt2img("sd1", "a red circle", 1, 2, 64, 64)).await;
    assert!(done.result().is_some(), "sd1 job: {:?}", done.error);
    assert!(!done.events.iter().any(|e| matches!(e, Event::Loading(_))), "sd1 was preloaded");
    // A job on the broken model (now a plain broken file) fails with the load's reason.
    std::fs::remove_file(&fifo).unwrap();
    std::fs::write(&fifo, b"not a safetensors file").unwrap();
    let failed = generate(&mut client, txt2img("gated", "a red circle", 1, 2, 64, 64)).await;
    assert_eq!(failed.code(), tonic::Code::FailedPrecondition, "{:?}", failed.error);
    assert!(failed.error.as_ref().unwrap().message().contains("gate.safetensors"), "{:?}", failed.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_model_sends_loading_and_unload_frees_its_memory() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let name = "sdxl";
    assert_eq!(model(&list(&server).await, name).state, pb::ModelState::OnDisk as i32);
    assert_eq!(server.health(&format!("frisket.v1.Model/{name}")).await.unwrap_err().code(), tonic::Code::NotFound);

    let rss_cold = server.rss_bytes();
    let first = generate(&mut client, txt2img(name, "a red circle", 1, 2, 64, 64)).await;
    assert!(first.result().is_some(), "{:?}", first.error);
    let kinds: Vec<&str> = first
        .events
        .iter()
        .map(|e| match e {
            Event::Queued(_) => "queued",
            Event::Loading(l) => {
                assert_eq!(l.model, name);
                "loading"
            }
            Event::Started(_) => "started",
            _ => "other",
        })
        .filter(|k| *k != "other")
        .collect();
    assert_eq!(kinds, ["queued", "loading", "started"], "a cold model's job waits with a Loading event");
    let second = generate(&mut client, txt2img(name, "a red circle", 2, 2, 64, 64)).await;
    assert!(second.result().is_some(), "{:?}", second.error);
    assert!(!second.events.iter().any(|e| matches!(e, Event::Loading(_))), "the model stayed loaded");
    let listed = list(&server).await;
    assert_eq!(model(&listed, name).state, pb::ModelState::Loaded as i32);
    assert_eq!(model(&listed, name).devices, ["cpu"]);
    assert_eq!(server.health(&format!("frisket.v1.Model/{name}")).await.unwrap(), ServingStatus::Serving as i32);

    let rss_loaded = server.rss_bytes();
    let unloaded = client.unload_model(pb::UnloadModelRequest { model: name.into() }).await.expect("UnloadModel");
    assert!(unloaded.into_inner().was_loaded);
    let rss_unloaded = server.rss_bytes();
    let weights: u64 = ["unet", "vae", "text_encoder", "text_encoder_2"]
        .iter()
        .flat_map(|c| std::fs::read_dir(models_dir().join(name).join(c)).into_iter().flatten())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    eprintln!(
        "VmRSS: cold {} MiB, loaded {} MiB, unloaded {} MiB; weights {} MiB",
        rss_cold >> 20,
        rss_loaded >> 20,
        rss_unloaded >> 20,
        weights >> 20
    );
    assert!(
        rss_loaded.saturating_sub(rss_unloaded) >= weights / 2,
        "unloading {name} freed {} bytes of its {weights} bytes of weights",
        rss_loaded.saturating_sub(rss_unloaded)
    );
    let listed = list(&server).await;
    assert_eq!(model(&listed, name).state, pb::ModelState::OnDisk as i32);
    assert_eq!(server.health(&format!("frisket.v1.Model/{name}")).await.unwrap(), ServingStatus::NotServing as i32);
    // Unloading again frees nothing; an unknown model is NOT_FOUND.
    let again = client.unload_model(pb::UnloadModelRequest { model: name.into() }).await.expect("UnloadModel");
    assert!(!again.into_inner().was_loaded);
    let unknown = client.unload_model(pb::UnloadModelRequest { model: "no-such-model".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // LoadModel brings it back (and the next job needs no load).
    let loaded = client.load_model(pb::LoadModelRequest { model: name.into() }).await.expect("LoadModel").into_inner();
    assert_eq!(loaded.devices, ["cpu"]);
    assert!(loaded.load_seconds > 0.0);
    eprintln!("LoadModel {name}: {:.3} s (load and warm)", loaded.load_seconds);
    let third = generate(&mut client, txt2img(name, "a red circle", 3, 2, 64, 64)).await;
    assert!(third.result().is_some(), "{:?}", third.error);
    assert!(!third.events.iter().any(|e| matches!(e, Event::Loading(_))), "LoadModel loaded it");
    let again = client.load_model(pb::LoadModelRequest { model: name.into() }).await.expect("LoadModel").into_inner();
    assert_eq!(again.load_seconds, 0.0, "a loaded model is not loaded again");
}
