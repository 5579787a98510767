//! `serve --metrics-listen`: a real server runs jobs (finished, refused, cancelled while
//! queued and while running, batched), calls at its edge (an unknown method, a request that
//! is not gRPC); its /metrics text passes `promtool check metrics` and its values are what
//! the test did.
use frisket_e2e::*;
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use prost::Message;
use tonic::Code;

/// Steps of each job that runs to its end.
const STEPS: u32 = 12;

/// `name`'s samples of Generate calls (with `code`, when given).
fn generate_calls(scrape: &Scrape, name: &str, code: Option<&str>) -> f64 {
    let mut labels = vec![("grpc_service", "frisket.v1.Frisket"), ("grpc_method", "Generate")];
    labels.extend(code.map(|c| ("grpc_code", c)));
    scrape.value(name, &labels)
}

/// `promtool check metrics` on `text`: the linter Prometheus ships. Its absence fails the
/// test (Debian's `prometheus` package has it: `make deps-promtool`).
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!("promtool not found ({e}): install Debian's prometheus package (`make deps-promtool`)"),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn long_job(model: &str, id: &str) -> pb::GenerateRequest {
    pb::GenerateRequest { job_id: id.into(), ..txt2img(model, "a long job", 7, 400, 64, 48) }
}

fn previewed_job(seed: u64) -> pb::GenerateRequest {
    let previews = pb::PreviewOptions { enabled: true, every: 1, ..Default::default() };
    pb::GenerateRequest {
        stream: Some(pb::StreamOptions { previews: Some(previews), ..Default::default() }),
        ..txt2img("sd1", "a cat", seed, STEPS, 64, 48)
    }
}

async fn cancel(server: &Server, id: &str) {
    let found = server.client().await.cancel(pb::CancelRequest { job_id: id.into() }).await.unwrap();
    assert!(found.into_inner().found, "Cancel({id}) found no job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_server_did() {
    let server = Server::start(&["--metrics-listen", "127.0.0.1:0", "--max-batch", "2"]).await;
    let url = metrics_url(&server);

    // Refused before queueing: INVALID_ARGUMENT (0 steps) and NOT_FOUND (unknown model).
    let refused = generate(&mut server.client().await, txt2img("sd1", "x", 1, 0, 64, 48)).await;
    assert_eq!(refused.code(), Code::InvalidArgument);
    let unknown = generate(&mut server.client().await, txt2img("no-such-model", "x", 1, 2, 64, 48)).await;
    assert_eq!(unknown.code(), Code::NotFound);

    // Cancelled: one running (sd1), one waiting behind it (sd2 cannot join sd1's batch).
    let mut a = server.client().await.generate(long_job("sd1", "metrics-a")).await.unwrap().into_inner();
    next_matching(&mut a, |e| matches!(e, Event::Started(_))).await;
    let mut b = server.client().await.generate(long_job("sd2", "metrics-b")).await.unwrap().into_inner();
    next_matching(&mut b, |e| matches!(e, Event::Queued(_))).await;
    cancel(&server, "metrics-b").await;
    assert_eq!(collect(b).await.code(), Code::Cancelled);
    cancel(&server, "metrics-a").await;
    assert_eq!(collect(a).await.code(), Code::Cancelled);

    // At the edge: a method no service has, and a call that is not gRPC.
    let nothing = grpc_frame(&pb::CancelRequest { job_id: "x".into() }.encode_to_vec());
    let unimplemented =
        raw_h2_call(server.addr, "/frisket.v1.Frisket/NoSuchMethod", "application/grpc", &[], nothing.clone(), true)
            .await
            .unwrap();
    assert_eq!(unimplemented.code(), Some(Code::Unimplemented));
    let not_grpc =
        raw_h2_call(server.addr, "/frisket.v1.Frisket/Cancel", "text/plain", &[], nothing, true).await.unwrap();
    assert_eq!(not_grpc.code(), Some(Code::InvalidArgument));

    let before = scrape(&url).await;

    // Two jobs at once with --max-batch 2: their steps share UNet calls where they overlap.
    let (c1, c2) = tokio::join!(async { generate(&mut server.client().await, previewed_job(1)).await }, async {
        generate(&mut server.client().await, previewed_job(2)).await
    },);
    for c in [&c1, &c2] {
        assert_eq!(c.code(), Code::Ok, "{:?}", c.error);
        assert_eq!(c.steps().len(), STEPS as usize);
    }

    // The worker counts a finished job just after queuing its Result, which the client may
    // read first: scrape until both are counted (a missing count fails after 30 s).
    let mut after = scrape(&url).await;
    for _ in 0..300 {
        if after.value("frisket_jobs_total", &[("outcome", "ok")]) >= 2.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        after = scrape(&url).await;
    }
    promtool_check(&after.text);
    println!("{}", after.text);

    // Generate: 2 refused, 2 cancelled, 2 finished; every call started was handled.
    assert_eq!(generate_calls(&after, "grpc_server_started_total", None), 6.0);
    assert_eq!(generate_calls(&after, "grpc_server_handled_total", Some("InvalidArgument")), 1.0);
    assert_eq!(generate_calls(&after, "grpc_server_handled_total", Some("NotFound")), 1.0);
    assert_eq!(generate_calls(&after, "grpc_server_handled_total", Some("Canceled")), 2.0);
    assert_eq!(generate_calls(&after, "grpc_server_handled_total", Some("OK")), 2.0);
    assert_eq!(generate_calls(&after, "grpc_server_handling_seconds_count", None), 6.0);
    let generate_type = [("grpc_method", "Generate"), ("grpc_type", "server_stream")];
    assert_eq!(after.value("grpc_server_started_total", &generate_type), 6.0);
    // Cancel: two that found their job, one refused at the edge for its content-type.
    let cancel = |code| {
        after.value(
            "grpc_server_handled_total",
            &[("grpc_method", "Cancel"), ("grpc_type", "unary"), ("grpc_code", code)],
        )
    };
    assert_eq!((cancel("OK"), cancel("InvalidArgument")), (2.0, 1.0));
    let unknown_method = [("grpc_service", "unknown"), ("grpc_method", "unknown"), ("grpc_code", "Unimplemented")];
    assert_eq!(after.value("grpc_server_handled_total", &unknown_method), 1.0);
    // Health checks count too; nothing is in flight while the test scrapes.
    assert!(after.value("grpc_server_started_total", &[("grpc_service", "grpc.health.v1.Health")]) >= 1.0);
    assert_eq!(after.value("grpc_server_started_total", &[]), after.value("grpc_server_handled_total", &[]));

    // Jobs as the worker and the queue ended them.
    assert_eq!(after.value("frisket_jobs_total", &[("outcome", "ok")]), 2.0);
    assert_eq!(after.value("frisket_jobs_total", &[("outcome", "cancelled")]), 2.0);
    assert_eq!(after.value("frisket_queue_waiting_jobs", &[]), 0.0);
    assert_eq!(after.value("frisket_running_jobs", &[]), 0.0);
    assert_eq!(after.value("frisket_device_running_jobs", &[("device", "cpu")]), 0.0);
    // sd1 loaded once (job a); sd2 never (job b was cancelled while it waited).
    assert_eq!(after.value("frisket_model_load_seconds_count", &[]), 1.0);

    // The two finished jobs' steps: every step of each is one row of one batched call.
    let delta = |name: &str| after.value(name, &[]) - before.value(name, &[]);
    let (rows, calls) = (delta("frisket_step_batch_size_sum"), delta("frisket_step_batch_size_count"));
    assert_eq!(rows, 2.0 * STEPS as f64, "batched rows");
    assert!((STEPS as f64..=2.0 * STEPS as f64).contains(&calls), "{calls} batched calls for {rows} rows");
    assert_eq!(delta("frisket_step_seconds_count"), calls);
    assert_eq!(
        after.value("frisket_step_batch_size_bucket", &[("le", "1")]),
        before.value("frisket_step_batch_size_bucket", &[("le", "1")]) + (2.0 * calls - rows)
    );
    // The job that came second may have stopped the first one's step once to take its
    // own first step, never more.
    let (yields, yielded_seconds) = (delta("frisket_step_yields_total"), delta("frisket_step_yield_seconds_total"));
    assert!(yields <= 1.0, "{yields} yields");
    assert_eq!(yields == 0.0, yielded_seconds == 0.0, "{yields} yields took {yielded_seconds} s");
    assert_eq!(delta("frisket_time_to_first_preview_seconds_count"), 2.0);
    assert!(after.value("process_resident_memory_bytes", &[]) > 0.0);
    println!("finished jobs' {rows} step rows ran in {calls} UNet calls");
}
