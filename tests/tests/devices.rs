//! Several workers (`serve --device cpu,cpu`): one queue, one worker thread per listed
//! device, each with its own models. Jobs that one worker cannot take (it is full at
//! `--max-batch 1`) run at the same time on the other, loading their model there too; the
//! image does not depend on the worker; `--preload` loads on every worker; UnloadModel
//! unloads everywhere or nowhere; nonsense `--device` values and CPU kernel overrides
//! (`FRISKET_CPU_LINEAR`, `FRISKET_CPU_CONV`) are refused at start.
use frisket_e2e::*;
use frisket_proto::v1 as pb;

const FLAGS: &[&str] = &["--device", "cpu,cpu", "--max-batch", "1", "--threads", "1"];

/// Starts `a`, waits for its Started, then sends `b` (which `a`'s worker, full at
/// `--max-batch 1`, cannot take); both streams to their end.
async fn together(server: &Server, a: pb::GenerateRequest, b: pb::GenerateRequest) -> (Collected, Collected) {
    let mut a = server.client().await.generate(a).await.expect("first job accepted").into_inner();
    next_matching(&mut a, |e| matches!(e, pb::generate_event::Event::Started(_))).await;
    let b = server.client().await.generate(b).await.expect("second job accepted").into_inner();
    let b = tokio::spawn(collect(b));
    let a = collect(a).await;
    (a, b.await.unwrap())
}

/// Enough steps that the first job still runs when the second starts beside it.
fn job(model: &str, id: &str, steps: u32) -> pb::GenerateRequest {
    let mut req = txt2img(model, "a red circle", 3, steps, 64, 48);
    req.job_id = id.into();
    req
}

/// Where `needle` first appears in the log.
fn at(log: &str, needle: &str) -> usize {
    log.find(needle).unwrap_or_else(|| panic!("log lacks {needle:?}:\n{log}"))
}

/// Both jobs started before either finished, on two distinct workers.
fn ran_at_once_on_two_workers(log: &str, a: &str, b: &str) {
    let started = |id: &str| at(log, &format!("job_id={id}}}: frisket_server::service::worker: job started"));
    let finished = |id: &str| at(log, &format!("job_id={id}}}: frisket_server::service::worker: job finished"));
    assert!(started(a).max(started(b)) < finished(a).min(finished(b)), "{a} and {b} did not overlap:\n{log}");
    let worker_of = |id: &str| {
        let line = job_log_lines(log, id).into_iter().find(|l| l.contains("job started")).expect("a start line");
        ["worker=cpu#0 ", "worker=cpu#1 "].into_iter().find(|w| line.contains(w)).map(str::to_string)
    };
    let (wa, wb) = (worker_of(a), worker_of(b));
    assert!(wa.is_some() && wb.is_some() && wa != wb, "{a} on {wa:?}, {b} on {wb:?}:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_run_two_jobs_at_once_and_agree_byte_for_byte() {
    let server = Server::start(FLAGS).await;
    let info = server.client().await.get_server_info(pb::GetServerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.device, "cpu#0,cpu#1");

    // Two models, one per worker.
    let (a, b) = together(&server, job("sd1", "dev-a", 200), job("sd2", "dev-b", 10)).await;
    assert_eq!((a.code(), b.code()), (tonic::Code::Ok, tonic::Code::Ok), "{:?} {:?}", a.error, b.error);
    server.wait_for_log(&["job_id=dev-b}", "job finished"]).await;
    let log = server.wait_for_log(&["job_id=dev-a}", "job finished"]).await;
    ran_at_once_on_two_workers(&log, "dev-a", "dev-b");

    // The same request twice: the model loads on the second worker too, and both images
    // are the same bytes.
    let (c, d) = together(&server, job("sd1", "dev-c", 100), job("sd1", "dev-d", 100)).await;
    assert_eq!((c.code(), d.code()), (tonic::Code::Ok, tonic::Code::Ok), "{:?} {:?}", c.error, d.error);
    server.wait_for_log(&["job_id=dev-c}", "job finished"]).await;
    let log = server.wait_for_log(&["job_id=dev-d}", "job finished"]).await;
    ran_at_once_on_two_workers(&log, "dev-c", "dev-d");
    assert_eq!(c.result().unwrap().image, d.result().unwrap().image, "worker 0 and worker 1 images differ");

    let listed = server.client().await.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
    let sd1 = listed.models.iter().find(|m| m.name == "sd1").expect("sd1 listed");
    assert_eq!(sd1.state, pb::ModelState::Loaded as i32);
    assert_eq!(sd1.devices, ["cpu#0", "cpu#1"]);

    // UnloadModel unloads it from every worker.
    let unloaded = server.client().await.unload_model(pb::UnloadModelRequest { model: "sd1".into() }).await;
    assert!(unloaded.expect("UnloadModel").into_inner().was_loaded);
    let listed = server.client().await.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
    let sd1 = listed.models.iter().find(|m| m.name == "sd1").expect("sd1 listed");
    assert_eq!(sd1.state, pb::ModelState::OnDisk as i32, "{sd1:?}");
    assert!(sd1.devices.is_empty(), "{sd1:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preloaded_model_is_on_every_worker_and_a_refused_unload_leaves_it_there() {
    let server = Server::start(&[FLAGS, &["--preload", "sd1"]].concat()).await;
    server.wait_for_log(&["preloading done: serving"]).await;
    let listed = server.client().await.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
    let sd1 = listed.models.iter().find(|m| m.name == "sd1").expect("sd1 listed");
    assert_eq!(sd1.state, pb::ModelState::Loaded as i32, "{sd1:?}");
    assert_eq!(sd1.devices, ["cpu#0", "cpu#1"], "{sd1:?}");

    // While a job uses sd1 on the second worker (an sd2 job keeps the first busy),
    // UnloadModel is refused and no worker unloads it.
    let mut busy = server.client().await.generate(job("sd2", "busy", 400)).await.unwrap().into_inner();
    next_matching(&mut busy, |e| matches!(e, pb::generate_event::Event::Step(_))).await;
    let mut running = server.client().await.generate(job("sd1", "in-use", 400)).await.unwrap().into_inner();
    next_matching(&mut running, |e| matches!(e, pb::generate_event::Event::Step(_))).await;
    let refused = server.client().await.unload_model(pb::UnloadModelRequest { model: "sd1".into() }).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let listed = server.client().await.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
    let sd1 = listed.models.iter().find(|m| m.name == "sd1").expect("sd1 listed");
    assert_eq!(sd1.devices, ["cpu#0", "cpu#1"], "a refused unload unloaded somewhere: {sd1:?}");
    for (id, stream) in [("busy", busy), ("in-use", running)] {
        server.client().await.cancel(pb::CancelRequest { job_id: id.into() }).await.unwrap();
        assert_eq!(collect(stream).await.code(), tonic::Code::Cancelled, "{id}");
    }
}

#[test]
fn nonsense_devices_are_refused() {
    for bad in ["", "cpu,", "cpu,,cpu", "gpu", "cuda:x", "auto,cpu", "cpu,all", "cuda:99"] {
        let out = std::process::Command::new(server_binary())
            .args(["serve", "--listen", "127.0.0.1:0", "--device", bad, "--models"])
            .arg(models_dir())
            .output()
            .expect("running frisket-server");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--device {bad:?} accepted");
        assert!(stderr.contains("--device"), "--device {bad:?}: {stderr}");
    }
}

#[test]
fn unknown_kernel_overrides_are_refused_at_start() {
    for (var, bad) in [("FRISKET_CPU_LINEAR", "blas"), ("FRISKET_CPU_CONV", "fft")] {
        // `render` of a fixture model, which would succeed were the override ignored.
        let out = std::process::Command::new(server_binary())
            .args(["render", "--prompt", "a red circle", "--steps", "2", "--quiet", "--model"])
            .arg(models_dir().join("sd1"))
            .arg("--out")
            .arg(std::env::temp_dir().join(format!("frisket-kernel-override-{}.png", std::process::id())))
            .env(var, bad)
            .output()
            .expect("running frisket-server");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={bad} accepted");
        assert!(stderr.contains(&format!("{var}={bad}: expected")), "{var}={bad}: {stderr}");
    }
}
