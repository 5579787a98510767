//! The worker's model memory budget (`serve --model-memory-mib`) against a real server:
//! with room for one fixture model (sd1 or sd2, about 16 MiB of float32 weights each) a
//! job on another model evicts the least recently used one (ListModels, the log and the
//! eviction counter show it), a job on the evicted model loads it again and makes the same
//! image, and a model larger than the whole budget (sdxl, about 28 MiB) is
//! RESOURCE_EXHAUSTED with the sizes while the loaded model keeps serving, as is a model that
//! does not fit beside a running job's.
use frisket_e2e::*;
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use tonic::Code;

const BUDGET_MIB: &str = "24";

fn state(list: &pb::ListModelsResponse, name: &str) -> (i32, String) {
    let m = list.models.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("{name} not listed"));
    (m.state, m.error.clone())
}

async fn list(server: &Server) -> pb::ListModelsResponse {
    server.client().await.list_models(pb::ListModelsRequest {}).await.expect("ListModels").into_inner()
}

fn loaded_cold(done: &Collected) -> bool {
    done.events.iter().any(|e| matches!(e, Event::Loading(_)))
}

async fn evictions(url: &str) -> (f64, f64) {
    let s = scrape(url).await;
    (
        s.value("frisket_model_evictions_total", &[("device", "cpu")]),
        s.value("frisket_loaded_model_bytes", &[("device", "cpu")]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_for_one_model_evicts_the_least_recently_used_and_refuses_a_larger_model() {
    let server =
        Server::start(&["--model-memory-mib", BUDGET_MIB, "--threads", "1", "--metrics-listen", "127.0.0.1:0"]).await;
    let url = metrics_url(&server);
    // The worker logs its thread count when it starts, which may follow the listening line.
    server.wait_for_log(&["worker started", "threads=1"]).await;
    assert_eq!(evictions(&url).await, (0.0, 0.0), "nothing loaded or evicted yet");
    let mut client = server.client().await;
    let request = txt2img("sd1", "a red circle", 5, 2, 64, 48);

    let first = generate(&mut client, request.clone()).await;
    let first_image = first.result().unwrap_or_else(|| panic!("sd1: {:?}", first.error)).image.clone();
    assert!(loaded_cold(&first));
    let (_, sd1_bytes) = evictions(&url).await;
    assert!(sd1_bytes > 0.0 && sd1_bytes <= 24.0 * 1048576.0, "sd1 holds {sd1_bytes} bytes");

    // sd2 does not fit beside sd1: sd1 goes back to disk.
    let other = generate(&mut client, txt2img("sd2", "a blue square", 6, 2, 64, 48)).await;
    assert!(other.result().is_some(), "sd2: {:?}", other.error);
    assert!(loaded_cold(&other));
    let listed = list(&server).await;
    assert_eq!(state(&listed, "sd1").0, pb::ModelState::OnDisk as i32, "sd1 evicted");
    assert_eq!(state(&listed, "sd2").0, pb::ModelState::Loaded as i32);
    let (evicted, sd2_bytes) = evictions(&url).await;
    assert_eq!(evicted, 1.0);
    assert!(sd2_bytes > 0.0 && sd2_bytes + sd1_bytes > 24.0 * 1048576.0, "sd1 {sd1_bytes} + sd2 {sd2_bytes} bytes");
    let logs = server.logs();
    let line = logs.lines().find(|l| l.contains("model evicted")).expect("the eviction is logged");
    assert!(line.contains("model=sd1") && line.contains(&format!("bytes={sd1_bytes}")), "{line}");

    // sd1 again: loaded again (Loading), evicting sd2, and the very same image.
    let again = generate(&mut client, request.clone()).await;
    let again_image = again.result().unwrap_or_else(|| panic!("sd1 again: {:?}", again.error)).image.clone();
    assert!(loaded_cold(&again), "the evicted model is loaded again");
    assert!(first_image == again_image, "a reloaded model makes the same image");
    assert_eq!(evictions(&url).await, (2.0, sd1_bytes));

    // sdxl alone is larger than the budget: refused with the sizes, listed as failed, and
    // nothing is evicted for it.
    let big = generate(&mut client, txt2img("sdxl", "a red circle", 1, 2, 64, 64)).await;
    assert_eq!(big.code(), Code::ResourceExhausted, "{:?}", big.error);
    let message = big.error.as_ref().unwrap().message().to_string();
    assert!(
        message.contains("sdxl") && message.contains("24.0 MiB") && message.contains("--model-memory-mib"),
        "{message}"
    );
    let listed = list(&server).await;
    assert_eq!(state(&listed, "sdxl"), (pb::ModelState::Failed as i32, message.clone()));
    assert_eq!(state(&listed, "sd1").0, pb::ModelState::Loaded as i32);
    // LoadModel knows its size now and refuses it the same way.
    let load = client.load_model(pb::LoadModelRequest { model: "sdxl".into() }).await.unwrap_err();
    assert_eq!(load.code(), Code::ResourceExhausted, "{load:?}");
    assert_eq!(load.message(), message);

    // The loaded model keeps serving, without a load.
    let served = generate(&mut client, request).await;
    assert!(served.result().is_some(), "sd1 after the refusal: {:?}", served.error);
    assert!(!loaded_cold(&served), "sd1 stayed loaded");
    assert_eq!(evictions(&url).await, (2.0, sd1_bytes));

    // A running job's model is never evicted: LoadModel of sd2 meanwhile is refused, sd2
    // stays on disk, and the job runs on.
    let long = pb::GenerateRequest { job_id: "long".into(), ..txt2img("sd1", "a long job", 7, 400, 64, 48) };
    let mut stream = server.client().await.generate(long).await.expect("long job accepted").into_inner();
    next_matching(&mut stream, |e| matches!(e, Event::Started(_))).await;
    let refused = client.load_model(pb::LoadModelRequest { model: "sd2".into() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("[\"sd1\"]") && refused.message().contains("running jobs"), "{refused:?}");
    assert_eq!(state(&list(&server).await, "sd2").0, pb::ModelState::OnDisk as i32);
    next_matching(&mut stream, |e| matches!(e, Event::Step(_))).await;
    client.cancel(pb::CancelRequest { job_id: "long".into() }).await.expect("Cancel");
    assert_eq!(evictions(&url).await, (2.0, sd1_bytes));
    eprintln!("weights: sd1 {sd1_bytes} bytes, sd2 {sd2_bytes} bytes; budget {BUDGET_MIB} MiB");
}
