//! Step-level batching (`serve --max-batch N`) against a real server: a job of the running
//! jobs' model joins them between steps instead of waiting for them to end; a job of
//! another model waits for them; stacked jobs give their lone images up to the kernels'
//! summation order; a job that comes while others step takes its first step before their
//! next one; with `--max-batch 1` jobs run one at a time.
use frisket_e2e::*;
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;

fn job(model: &str, prompt: &str, seed: u64, steps: u32) -> pb::GenerateRequest {
    let mut req = txt2img(model, prompt, seed, steps, 64, 48);
    req.stream = Some(pb::StreamOptions {
        previews: Some(pb::PreviewOptions { enabled: true, every: 1, ..Default::default() }),
        ..Default::default()
    });
    req
}

/// Starts `first`, waits for its Started, then starts `second`; both streams to their end.
async fn second_during_first(
    server: &Server,
    first: pb::GenerateRequest,
    second: pb::GenerateRequest,
) -> (Collected, Collected) {
    let mut a = server.client().await.generate(first).await.expect("first job accepted").into_inner();
    next_matching(&mut a, |e| matches!(e, Event::Started(_))).await;
    let b = server.client().await.generate(second).await.expect("second job accepted").into_inner();
    let b = tokio::spawn(collect(b));
    let a = collect(a).await;
    (a, b.await.unwrap())
}

fn pixels(result: &pb::Result) -> image::RgbImage {
    image::load_from_memory(&result.image).expect("a PNG result").to_rgb8()
}

fn max_level_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

/// The log lines' order: whether `first` (a substring) comes before `second`.
fn logged_before(log: &str, first: &str, second: &str) -> bool {
    match (log.find(first), log.find(second)) {
        (Some(a), Some(b)) => a < b,
        _ => panic!("log lacks {first:?} or {second:?}:\n{log}"),
    }
}

/// The shipped (trained) model: a random-weight fixture with guidance is chaotic enough
/// that the summation-order differences of its first stacked steps double at every later
/// step, while a trained model's steps contract them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_the_same_model_joins_between_steps_and_matches_its_lone_run() {
    let server = Server::start_on(&workspace_root().join("models"), &["--max-batch", "4"]).await;
    let mut a = job("shapes", "a red circle on the left", 1, 20);
    a.job_id = "batch-a".into();
    let mut b = job("shapes", "a blue square on the right", 2, 6);
    b.job_id = "batch-b".into();
    let (a_out, b_out) = second_during_first(&server, a.clone(), b.clone()).await;
    assert_eq!(a_out.code(), tonic::Code::Ok, "{:?}", a_out.error);
    assert_eq!(b_out.code(), tonic::Code::Ok, "{:?}", b_out.error);
    let log = server.wait_for_log(&["job_id=batch-a}", "job finished"]).await;
    // b (6 steps) joined a (20 steps) and finished first.
    assert!(
        logged_before(
            &log,
            "job_id=batch-b}: frisket_server::service::worker: job finished",
            "job_id=batch-a}: frisket_server::service::worker: job finished"
        ),
        "{log}"
    );

    // Alone, one after the other, on the same server: the same images up to summation order
    // (one 8-bit level after PNG rounding).
    let mut diffs = Vec::new();
    for (req, together) in [(a, &a_out), (b, &b_out)] {
        let mut req = req;
        req.job_id = format!("{}-alone", req.job_id);
        let alone = generate(&mut server.client().await, req).await;
        let diff = max_level_diff(&pixels(alone.result().unwrap()), &pixels(together.result().unwrap()));
        println!("stacked vs alone: max {diff} levels");

        diffs.push(diff);
    }
    assert!(diffs.iter().all(|d| *d <= 1), "stacked vs alone differ by {diffs:?} levels");
}

/// The running job's steps are slow (256 px) and the new job's fast (64 px): the step the
/// new job comes into yields to it (nobody moves), the new job steps alone, and its first
/// preview goes out about one slow step before the running job's next Step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_job_takes_its_first_step_before_the_running_jobs_next_one() {
    let server = Server::start_on(&workspace_root().join("models"), &["--max-batch", "4"]).await;
    let mut a = txt2img("shapes", "a red circle on the left", 1, 6, 256, 256);
    a.job_id = "yield-a".into();
    let mut b = job("shapes", "a blue square on the right", 2, 3);
    b.job_id = "yield-b".into();
    let mut a_events = server.client().await.generate(a).await.expect("a accepted").into_inner();
    next_matching(&mut a_events, |e| matches!(e, Event::Step(_))).await;
    let mut b_events = server.client().await.generate(b).await.expect("b accepted").into_inner();
    let b_first = tokio::spawn(async move {
        next_matching(&mut b_events, |e| matches!(e, Event::Preview(_))).await;
        let at = std::time::Instant::now();
        (at, collect(b_events).await)
    });
    let step = next_matching(&mut a_events, |e| matches!(e, Event::Step(_))).await;
    let a_second = std::time::Instant::now();
    let Event::Step(step) = step else { unreachable!() };
    assert_eq!(step.index, 1, "a's second step");
    let (b_preview, b_rest) = b_first.await.unwrap();
    let a_rest = collect(a_events).await;
    assert_eq!(a_rest.code(), tonic::Code::Ok, "{:?}", a_rest.error);
    assert_eq!(b_rest.code(), tonic::Code::Ok, "{:?}", b_rest.error);
    assert!(
        b_preview < a_second,
        "b's first preview came {:?} after a's second step",
        b_preview.duration_since(a_second)
    );
    println!("b's first preview came {:?} before a's second step", a_second.duration_since(b_preview));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_another_model_waits_and_max_batch_1_runs_one_at_a_time() {
    for (flags, model_b) in [(&["--max-batch", "4"][..], "sd2"), (&["--max-batch", "1"][..], "sd1")] {
        let server = Server::start(flags).await;
        let mut a = job("sd1", "a red circle", 1, 20);
        a.job_id = "wait-a".into();
        let mut b = job(model_b, "a blue square", 2, 4);
        b.job_id = "wait-b".into();
        let (a_out, b_out) = second_during_first(&server, a, b).await;
        assert_eq!(a_out.code(), tonic::Code::Ok, "{:?}", a_out.error);
        assert_eq!(b_out.code(), tonic::Code::Ok, "{:?}", b_out.error);
        let log = server.wait_for_log(&["job_id=wait-b}", "job finished"]).await;
        // b starts only once a has finished.
        let a_done = "job_id=wait-a}: frisket_server::service::worker: job finished";
        let b_started = "job_id=wait-b}: frisket_server::service::worker: job started";
        assert!(logged_before(&log, a_done, b_started), "{flags:?} {model_b}:\n{log}");
    }
}
