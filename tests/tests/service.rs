//! `frisket-server serve` end to end: a real server process on a loopback port with the
//! fixture models (tiny, so a 64×48 step takes milliseconds; "long" jobs use 400 steps).
use frisket_e2e::{collect, generate, job_log_lines, next_matching, txt2img, Collected, Server};
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use std::time::{Duration, Instant};
use tonic::Code;

const PROMPT: &str = "A small yellow STAR, top-left!";
const LONG: u32 = 400;

/// The event's kind. Sequences leave "loading" out: whether a job found its model loaded
/// depends on the jobs before it.
fn kind(e: &Event) -> &'static str {
    match e {
        Event::Queued(_) => "queued",
        Event::Started(_) => "started",
        Event::Step(_) => "step",
        Event::Preview(_) => "preview",
        Event::Latent(_) => "latent",
        Event::Mask(_) => "mask",
        Event::Heatmap(_) => "heatmap",
        Event::Result(_) => "result",
        Event::Loading(_) => "loading",
    }
}

fn long_job(id: &str) -> pb::GenerateRequest {
    pb::GenerateRequest { job_id: id.into(), ..txt2img("sd1", "a long job", 7, LONG, 64, 48) }
}

fn short_job(id: &str) -> pb::GenerateRequest {
    pb::GenerateRequest { job_id: id.into(), ..txt2img("sd1", "a short job", 8, 3, 64, 48) }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("frisket-service-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The "steps_done=N" the engine logs when it stops a job early.
fn steps_done_in_log(server: &Server, job_id: &str) -> Option<usize> {
    job_log_lines(&server.logs(), job_id).iter().find_map(|l| {
        let rest = &l[l.find("steps_done=")? + "steps_done=".len()..];
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    })
}

async fn wait_for_log(server: &Server, job_id: &str) -> usize {
    let start = Instant::now();
    loop {
        if let Some(n) = steps_done_in_log(server, job_id) {
            return n;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no 'job stopped' log for {job_id}:\n{}", server.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assert_good_request_works(server: &Server) {
    let mut client = server.client().await;
    let got = generate(&mut client, txt2img("sd1", "still serving", 3, 2, 64, 48)).await;
    assert_eq!(got.code(), Code::Ok, "{:?}", got.error);
    assert!(got.result().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_come_in_order_and_the_result_equals_render() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let mut req = txt2img("sd1", PROMPT, 1000, 8, 64, 48);
    req.negative_prompt = "blurry".into();
    req.guidance = Some(7.5);
    req.scheduler = "ddim".into();
    req.stream = Some(pb::StreamOptions {
        previews: Some(pb::PreviewOptions {
            enabled: true,
            every: 3,
            format: pb::ImageFormat::Png as i32,
            max_size: 0,
            method: pb::PreviewMethod::Approx as i32,
        }),
        latents: Some(pb::LatentOptions { enabled: true, every: 2 }),
        explain: None,
    });
    let got = generate(&mut client, req).await;
    assert_eq!(got.code(), Code::Ok, "{:?}", got.error);

    // Queued, Started, then per step k: Latent (entering k, every 2nd), Step k, Preview
    // (every 3rd and the last); Result last.
    let mut expected = vec!["queued", "started"];
    for k in 0..8 {
        if k % 2 == 0 {
            expected.push("latent");
        }
        expected.push("step");
        if (k + 1) % 3 == 0 || k == 7 {
            expected.push("preview");
        }
    }
    expected.push("result");
    let kinds: Vec<_> = got.events.iter().map(kind).filter(|k| *k != "loading").collect();
    assert_eq!(kinds, expected);

    let Event::Queued(q) = &got.events[0] else { unreachable!() };
    assert_eq!(q.position, 0);
    let started = got.started().unwrap();
    assert_eq!((started.total_steps, started.seed, started.width, started.height), (8, 1000, 64, 48));
    assert_eq!(started.timesteps.len(), 8);
    assert!(started.timesteps.windows(2).all(|w| w[0] > w[1]), "timesteps descend: {:?}", started.timesteps);

    let steps = got.steps();
    let mut last_elapsed = 0.0;
    for (k, s) in steps.iter().enumerate() {
        assert_eq!((s.index as usize, s.total), (k, 8));
        assert_eq!(s.timestep, started.timesteps[k]);
        assert!(s.elapsed_seconds >= last_elapsed);
        last_elapsed = s.elapsed_seconds;
    }

    let previews = got.previews();
    assert_eq!(previews.iter().map(|p| p.step).collect::<Vec<_>>(), [2, 5, 7]);
    for p in &previews {
        assert_eq!(p.mime_type, "image/png");
        assert_eq!(p.timestep, started.timesteps[p.step as usize]);
        let img = image::load_from_memory_with_format(&p.image, image::ImageFormat::Png).unwrap();
        // APPROX previews are at latent resolution (the fixture VAE's factor is 4).
        assert_eq!((img.width(), img.height()), (16, 12));
        assert_eq!((p.width, p.height), (16, 12));
    }

    let latents = got.latents();
    assert_eq!(latents.iter().map(|l| l.step).collect::<Vec<_>>(), [0, 2, 4, 6]);
    let mut first_values = None;
    for l in &latents {
        let t = l.latent.as_ref().unwrap();
        assert_eq!(t.shape, [1, 4, 12, 16]);
        assert_eq!(t.dtype, "float32");
        assert_eq!(t.data.len(), 4 * 12 * 16 * 4);
        let values: Vec<f32> = t.data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert!(values.iter().all(|v| v.is_finite()));
        assert_eq!(l.timestep, started.timesteps[l.step as usize]);
        match &first_values {
            None => first_values = Some(values),
            Some(first) => assert_ne!(first, &values, "latents change between steps"),
        }
    }

    let result = got.result().unwrap();
    assert_eq!((result.mime_type.as_str(), result.seed), ("image/png", 1000));
    let s = result.settings.as_ref().unwrap();
    assert_eq!((s.model.as_str(), s.prompt.as_str(), s.negative_prompt.as_str()), ("sd1", PROMPT, "blurry"));
    assert_eq!(
        (s.seed, s.steps, s.guidance, s.scheduler.as_str(), s.width, s.height, s.img2img),
        (1000, 8, 7.5, "ddim", 64, 48, false)
    );
    let t = result.timings.as_ref().unwrap();
    assert!(
        t.total_seconds > 0.0 && t.seconds_per_step > 0.0 && t.queued_seconds >= 0.0 && t.decode_seconds >= 0.0,
        "{t:?}"
    );

    // Byte for byte what `frisket-server render` writes for the same settings.
    let dir = tempdir("render");
    let out = dir.join("render.png");
    let model = frisket_e2e::models_dir().join("sd1");
    let run = frisket_e2e::render(&[
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--negative-prompt",
        "blurry",
        "--seed",
        "1000",
        "--steps",
        "8",
        "--guidance",
        "7.5",
        "--scheduler",
        "ddim",
        "--width",
        "64",
        "--height",
        "48",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(run.status.success(), "render failed: {}", String::from_utf8_lossy(&run.stderr));
    let rendered = std::fs::read(&out).unwrap();
    assert!(
        rendered == result.image,
        "the service's PNG ({} bytes) differs from render's ({} bytes)",
        result.image.len(),
        rendered.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vae_jpeg_previews_and_a_drawn_seed() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let mut req = txt2img("sd2", "a blue square", 0, 3, 64, 48);
    req.seed = None;
    req.scheduler = "euler-a".into();
    req.stream = Some(pb::StreamOptions {
        previews: Some(pb::PreviewOptions {
            enabled: true,
            every: 0,
            format: pb::ImageFormat::Jpeg as i32,
            max_size: 32,
            method: pb::PreviewMethod::Vae as i32,
        }),
        ..Default::default()
    });
    let got = generate(&mut client, req.clone()).await;
    assert_eq!(got.code(), Code::Ok, "{:?}", got.error);
    let previews = got.previews();
    assert_eq!(previews.iter().map(|p| p.step).collect::<Vec<_>>(), [0, 1, 2], "every 0 means every step");
    for p in previews {
        assert_eq!(p.mime_type, "image/jpeg");
        let img = image::load_from_memory_with_format(&p.image, image::ImageFormat::Jpeg).unwrap();
        // A full VAE decode (64×48) shrunk to a longest side of 32.
        assert_eq!((img.width(), img.height(), p.width, p.height), (32, 24, 32, 24));
    }
    let drawn = got.started().unwrap().seed;
    let result = got.result().unwrap();
    assert_eq!(result.seed, drawn, "Started and Result report the drawn seed");
    assert_eq!(result.settings.as_ref().unwrap().seed, drawn);

    // The reported seed reproduces the image.
    req.seed = Some(drawn);
    req.stream = None;
    let again = generate(&mut client, req).await;
    assert_eq!(again.result().unwrap().image, result.image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_tokens_and_server_info() {
    let server = Server::start(&["--queue-capacity", "3"]).await;
    let mut client = server.client().await;

    let models = client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    let names: Vec<_> = models.iter().map(|m| m.name.as_str()).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted by name: {names:?}");
    let model =
        |name: &str| models.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("{name} not in {names:?}"));
    // Native size = unet sample_size × VAE factor: sd1 16 × 4 (3 VAE blocks), sd2 8 × 2 (2 blocks).
    // The fixture text encoders are narrow (32/48), so the prediction type decides the architecture.
    for (m, arch, prediction, native, multiple) in
        [(model("sd1"), "sd1", "epsilon", 64, 4), (model("sd2"), "sd2", "v_prediction", 16, 2)]
    {
        assert_eq!(m.architecture, arch);
        assert_eq!(m.prediction_type, prediction);
        assert_eq!((m.native_width, m.native_height, m.size_multiple), (native, native, multiple), "{}", m.name);
        assert_eq!(
            m.schedulers,
            [
                "ddim",
                "ddpm",
                "euler",
                "euler-karras",
                "euler-a",
                "dpm++",
                "dpm++-karras",
                "dpm++-sde",
                "dpm++-sde-karras",
                "unipc",
                "unipc-karras"
            ]
        );
        assert!(m.img2img && m.explain && m.protected_regions);
    }

    let tokens = client
        .tokenize(pb::TokenizeRequest { model: "sd1".into(), prompt: "A red cat, sleeping".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!tokens.truncated);
    let texts: Vec<_> = tokens.tokens.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(texts.first(), Some(&"<|startoftext|>"));
    assert_eq!(texts.last(), Some(&"<|endoftext|>"));
    assert!(texts.contains(&"cat</w>"), "{texts:?}");
    for (i, t) in tokens.tokens.iter().enumerate() {
        assert_eq!(t.index as usize, i);
    }
    let cat = tokens.tokens.iter().find(|t| t.text == "cat</w>").unwrap();
    assert_eq!((cat.word.as_str(), cat.word_index), ("cat", Some(2)));
    assert_eq!((tokens.tokens[0].word.as_str(), tokens.tokens[0].word_index), ("", None));

    let long: String = (0..100).map(|i| format!("word{i} ")).collect();
    let cut = client.tokenize(pb::TokenizeRequest { model: "sd2".into(), prompt: long }).await.unwrap().into_inner();
    assert!(cut.truncated);
    assert_eq!(cut.tokens.len(), 77);

    let missing = client.tokenize(pb::TokenizeRequest { model: "nope".into(), prompt: "x".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let info = client.get_server_info(pb::GetServerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.device, "cpu");
    assert!(info.devices.contains(&"cpu".to_string()));
    assert_eq!((info.queue_capacity, info.queued_jobs, info.running_jobs), (3, 0, 0));
    assert_eq!((info.max_steps, info.max_pixels), (500, 2048 * 2048));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_the_engine() {
    // One job at a time, so B waits in the queue behind A instead of joining it.
    let server = Server::start(&["--max-batch", "1"]).await;
    let (mut c1, mut c2) = (server.client().await, server.client().await);
    let mut a = c1.generate(long_job("drop-a")).await.unwrap().into_inner();
    next_matching(&mut a, |e| matches!(e, Event::Started(_))).await;
    // B waits behind A.
    let mut b = c2.generate(short_job("drop-b")).await.unwrap().into_inner();
    let Event::Queued(q) = next_matching(&mut b, |_| true).await else { panic!("Queued first") };
    assert_eq!(q.position, 0);
    next_matching(&mut a, |e| matches!(e, Event::Step(_))).await;
    drop(a);
    drop(c1);

    let got = collect(b).await;
    assert_eq!(got.code(), Code::Ok, "B runs once A's client left: {:?}", got.error);
    assert!(got.started().is_some() && got.result().is_some());
    // A stopped after a handful of its 400 steps, so B started long before A could have
    // finished. The engine notices the closed stream at the next step; the slack is for
    // the steps it may run ahead of a reading client (the stream buffers 16 events) and
    // those running while the disconnect travels.
    let done = wait_for_log(&server, "drop-a").await;
    println!("A stopped after {done} of {LONG} steps");
    assert!(done < 40, "A ran {done} steps after its client left");
    let info = server.client().await.get_server_info(pb::GetServerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.queued_jobs, info.running_jobs), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_queued_and_running_jobs() {
    // One job at a time, so B waits in the queue behind A instead of joining it.
    let server = Server::start(&["--max-batch", "1"]).await;
    let (mut c1, mut c2, mut ctl) = (server.client().await, server.client().await, server.client().await);
    let mut a = c1.generate(long_job("cancel-a")).await.unwrap().into_inner();
    next_matching(&mut a, |e| matches!(e, Event::Step(_))).await;
    let mut b = c2.generate(long_job("cancel-b")).await.unwrap().into_inner();
    next_matching(&mut b, |e| matches!(e, Event::Queued(_))).await;

    // Job ids are unique among queued and running jobs.
    let dup = ctl.generate(long_job("cancel-a")).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");

    // A queued job leaves the queue without starting.
    assert!(ctl.cancel(pb::CancelRequest { job_id: "cancel-b".into() }).await.unwrap().into_inner().found);
    let b = collect(b).await;
    assert_eq!(b.code(), Code::Cancelled, "{:?}", b.error);
    assert!(b.started().is_none());

    // A running job stops before its next step: at most the one step in flight when the
    // cancel arrived runs without being reported.
    assert!(ctl.cancel(pb::CancelRequest { job_id: "cancel-a".into() }).await.unwrap().into_inner().found);
    let a = collect(a).await;
    assert_eq!(a.code(), Code::Cancelled, "{:?}", a.error);
    assert!(a.result().is_none());
    let reported = 1 + a.steps().len(); // the first Step was read above
    let done = wait_for_log(&server, "cancel-a").await;
    println!("A stopped after {done} of {LONG} steps, {reported} reported");
    assert!(done <= reported + 1 && done < LONG as usize, "A ran {done} steps, reported {reported}");

    assert!(!ctl.cancel(pb::CancelRequest { job_id: "cancel-a".into() }).await.unwrap().into_inner().found);
    assert!(!ctl.cancel(pb::CancelRequest { job_id: "no-such-job".into() }).await.unwrap().into_inner().found);
    assert_good_request_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_resource_exhausted() {
    // One job at a time, so B waits in the queue behind A instead of joining it.
    let server = Server::start(&["--queue-capacity", "1", "--max-batch", "1"]).await;
    let (mut c1, mut c2, mut ctl) = (server.client().await, server.client().await, server.client().await);
    let mut a = c1.generate(long_job("full-a")).await.unwrap().into_inner();
    next_matching(&mut a, |e| matches!(e, Event::Started(_))).await;
    let mut b = c2.generate(long_job("full-b")).await.unwrap().into_inner();
    next_matching(&mut b, |e| matches!(e, Event::Queued(_))).await;

    let refused = ctl.generate(long_job("full-c")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let info = ctl.get_server_info(pb::GetServerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.queue_capacity, info.queued_jobs, info.running_jobs), (1, 1, 1));

    // Freed slots are usable again.
    drop(b);
    let mut d = loop {
        match ctl.generate(short_job("full-d")).await {
            Ok(resp) => break resp.into_inner(),
            Err(s) if s.code() == Code::ResourceExhausted => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(s) => panic!("{s:?}"),
        }
    };
    let Event::Queued(q) = next_matching(&mut d, |_| true).await else { panic!("Queued first") };
    assert_eq!(q.position, 0);
    assert!(ctl.cancel(pb::CancelRequest { job_id: "full-a".into() }).await.unwrap().into_inner().found);
    assert_eq!(collect(a).await.code(), Code::Cancelled);
    let d = collect(d).await;
    assert_eq!(d.code(), Code::Ok, "{:?}", d.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_status_and_the_server_keeps_serving() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let good = || txt2img("sd1", "a cat", 1, 4, 64, 48);
    let reference = frisket_e2e::png(64, 48);
    let img2img = |strength: Option<f64>| pb::GenerateRequest {
        reference_image: reference.clone(),
        strength,
        width: 0,
        height: 0,
        ..good()
    };
    let mut truncated_png = reference.clone();
    truncated_png.truncate(60);
    let cases: Vec<(&str, pb::GenerateRequest, Code)> = vec![
        ("no model", pb::GenerateRequest { model: "".into(), ..good() }, Code::InvalidArgument),
        ("unknown model", pb::GenerateRequest { model: "sd9".into(), ..good() }, Code::NotFound),
        ("path escape", pb::GenerateRequest { model: "../models/sd1".into(), ..good() }, Code::InvalidArgument),
        ("dot dot", pb::GenerateRequest { model: "..".into(), ..good() }, Code::InvalidArgument),
        ("empty prompt", pb::GenerateRequest { prompt: "  ".into(), ..good() }, Code::InvalidArgument),
        ("width not a multiple", pb::GenerateRequest { width: 66, ..good() }, Code::InvalidArgument),
        ("height not a multiple", pb::GenerateRequest { height: 50, ..good() }, Code::InvalidArgument),
        ("absurd size", pb::GenerateRequest { width: 4096, height: 4096, ..good() }, Code::InvalidArgument),
        ("zero steps", pb::GenerateRequest { steps: Some(0), ..good() }, Code::InvalidArgument),
        ("too many steps", pb::GenerateRequest { steps: Some(501), ..good() }, Code::InvalidArgument),
        ("unknown scheduler", pb::GenerateRequest { scheduler: "plms".into(), ..good() }, Code::InvalidArgument),
        ("negative guidance", pb::GenerateRequest { guidance: Some(-1.0), ..good() }, Code::InvalidArgument),
        ("NaN guidance", pb::GenerateRequest { guidance: Some(f64::NAN), ..good() }, Code::InvalidArgument),
        ("huge guidance", pb::GenerateRequest { guidance: Some(1000.0), ..good() }, Code::InvalidArgument),
        (
            "corrupt image",
            pb::GenerateRequest { reference_image: b"not an image".to_vec(), ..good() },
            Code::InvalidArgument,
        ),
        ("strength 0", img2img(Some(0.0)), Code::InvalidArgument),
        ("strength 1.5", img2img(Some(1.5)), Code::InvalidArgument),
        ("strength leaves no step", img2img(Some(0.1)), Code::InvalidArgument),
        (
            "mask size differs",
            pb::GenerateRequest { protected_mask: frisket_e2e::grey_png(32, 32), ..img2img(None) },
            Code::InvalidArgument,
        ),
        (
            "mask without reference",
            pb::GenerateRequest { protected_mask: frisket_e2e::grey_png(64, 48), ..good() },
            Code::InvalidArgument,
        ),
        (
            "blank protected mask",
            pb::GenerateRequest { protected_mask: frisket_e2e::mask_png(64, 48, |_, _| false), ..img2img(None) },
            Code::InvalidArgument,
        ),
        (
            "explain without a reference",
            pb::GenerateRequest {
                explain: Some(pb::ExplainOptions { mode: Some(pb::ExplainMode::Fast as i32), ..Default::default() }),
                ..good()
            },
            Code::InvalidArgument,
        ),
        (
            "unknown preview format",
            pb::GenerateRequest {
                stream: Some(pb::StreamOptions {
                    previews: Some(pb::PreviewOptions { enabled: true, format: 7, ..Default::default() }),
                    ..Default::default()
                }),
                ..good()
            },
            Code::InvalidArgument,
        ),
        ("control character in job_id", pb::GenerateRequest { job_id: "a\nb".into(), ..good() }, Code::InvalidArgument),
    ];
    for (what, req, code) in cases {
        let got = generate(&mut client, req).await;
        let status = got.error.unwrap_or_else(|| panic!("{what}: expected {code:?}, the job ran"));
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(got.events.is_empty(), "{what}: refused before any event");
        assert!(!status.message().is_empty(), "{what}: the status says why");
        println!("{what}: {:?} {}", status.code(), status.message());
    }

    // A PNG whose header is whole but whose pixels are cut off passes admission (only
    // headers are read before queueing) and is refused when the job is about to run.
    let got = generate(&mut client, pb::GenerateRequest { reference_image: truncated_png, ..good() }).await;
    assert_eq!(got.code(), Code::InvalidArgument, "{:?}", got.error);
    assert!(got.error.as_ref().unwrap().message().contains("reference_image"), "{:?}", got.error);
    assert_eq!(got.events.iter().map(kind).filter(|k| *k != "loading").collect::<Vec<_>>(), ["queued"]);

    // Still serving: txt2img and img2img (the reference's size is the default size).
    assert_good_request_works(&server).await;
    let got = generate(&mut client, img2img(Some(0.5))).await;
    assert_eq!(got.code(), Code::Ok, "{:?}", got.error);
    let result = got.result().unwrap();
    let s = result.settings.as_ref().unwrap();
    assert_eq!((s.img2img, s.strength, s.width, s.height), (true, 0.5, 64, 48));
    assert_eq!(got.started().unwrap().total_steps, 2, "strength 0.5 of 4 steps runs 2");
    let change = image::load_from_memory(&result.change_map).unwrap();
    assert_eq!((change.width(), change.height()), (64, 48));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_is_resource_exhausted() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    // Over the default 4 MiB but under the 64 MiB limit: accepted and then judged.
    let big = pb::GenerateRequest { reference_image: vec![7u8; 10 << 20], ..txt2img("sd1", "x", 1, 2, 64, 48) };
    let got = generate(&mut client, big).await;
    assert_eq!(got.code(), Code::InvalidArgument, "{:?}", got.error);
    // Over the limit.
    let huge = pb::GenerateRequest { reference_image: vec![7u8; 65 << 20], ..txt2img("sd1", "x", 1, 2, 64, 48) };
    let got = generate(&mut client, huge).await;
    assert_eq!(got.code(), Code::ResourceExhausted, "{:?}", got.error);
    let huge_prompt = pb::TokenizeRequest { model: "sd1".into(), prompt: "a".repeat(65 << 20) };
    let status = client.tokenize(huge_prompt).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_good_request_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let server = Server::start(&[]).await;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(server.health("").await.unwrap(), serving);
    assert_eq!(server.health("frisket.v1.Frisket").await.unwrap(), serving);
    assert_eq!(server.health("no.such.Service").await.unwrap_err().code(), Code::NotFound);

    use tonic_reflection::pb::v1 as r1;
    let mut reflection = r1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let requests = vec![
        r1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(String::new())),
        },
        r1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(r1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "frisket.v1.Frisket".into(),
            )),
        },
    ];
    let mut answers = reflection.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let first = answers.message().await.unwrap().unwrap().message_response.unwrap();
    let r1::server_reflection_response::MessageResponse::ListServicesResponse(list) = first else {
        panic!("expected a service list, got {first:?}")
    };
    let services: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in ["frisket.v1.Frisket", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(services.contains(&want), "{want} missing from {services:?}");
    }
    let second = answers.message().await.unwrap().unwrap().message_response.unwrap();
    let r1::server_reflection_response::MessageResponse::FileDescriptorResponse(files) = second else {
        panic!("expected a file descriptor, got {second:?}")
    };
    let file = &files.file_descriptor_proto[0];
    assert!(String::from_utf8_lossy(file).contains("frisket/v1/frisket.proto"));
    assert!(String::from_utf8_lossy(file).contains("GenerateRequest"));

    use tonic_reflection::pb::v1alpha as ra;
    let mut old = ra::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = ra::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(ra::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers = old.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let Some(ra::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a v1alpha service list")
    };
    assert!(list.service.iter().any(|s| s.name == "frisket.v1.Frisket"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_running_and_queued_jobs() {
    // One job at a time, so B waits in the queue behind A instead of joining its steps.
    let server = Server::start(&["--max-batch", "1"]).await;
    let (mut c1, mut c2, mut ctl) = (server.client().await, server.client().await, server.client().await);

    // B waits behind a long job A; B's deadline passes while it waits.
    let mut a = c1.generate(long_job("deadline-a")).await.unwrap().into_inner();
    next_matching(&mut a, |e| matches!(e, Event::Step(_))).await;
    let mut req = tonic::Request::new(short_job("deadline-b"));
    req.set_timeout(Duration::from_millis(300));
    let b = collect(c2.generate(req).await.unwrap().into_inner()).await;
    assert_eq!(b.code(), Code::DeadlineExceeded, "{:?}", b.error);
    assert_eq!(b.events.iter().map(kind).filter(|k| *k != "loading").collect::<Vec<_>>(), ["queued"]);
    assert!(ctl.cancel(pb::CancelRequest { job_id: "deadline-a".into() }).await.unwrap().into_inner().found);
    assert_eq!(collect(a).await.code(), Code::Cancelled);

    // C's deadline passes while it runs (the model is loaded, so C starts at once).
    let mut req = tonic::Request::new(long_job("deadline-c"));
    req.set_timeout(Duration::from_millis(1000));
    let c: Collected = collect(c1.generate(req).await.unwrap().into_inner()).await;
    assert_eq!(c.code(), Code::DeadlineExceeded, "{:?}", c.error);
    assert!(c.started().is_some(), "C started before its deadline");
    assert!(c.result().is_none() && c.steps().len() < LONG as usize);
    assert_good_request_works(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_jobs_then_exits() {
    let mut server = Server::start(&["--grace-period", "60"]).await;
    let mut client = server.client().await;
    let mut req = long_job("term-a");
    req.steps = Some(20);
    let mut a = client.generate(req).await.unwrap().into_inner();
    next_matching(&mut a, |e| matches!(e, Event::Step(_))).await;
    server.signal("TERM");

    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    let start = Instant::now();
    while server.health("").await.unwrap() != not_serving {
        assert!(start.elapsed() < Duration::from_secs(10), "health still SERVING after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.health("frisket.v1.Frisket").await.unwrap(), not_serving);
    let refused = server.client().await.generate(short_job("term-b")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    let a = collect(a).await;
    assert_eq!(a.code(), Code::Ok, "the running job completes: {:?}", a.error);
    assert_eq!(1 + a.steps().len(), 20, "every step ran (the first was read above)");
    assert!(a.result().is_some());
    let status = server.wait_exit(Duration::from_secs(30)).await.expect("server exits after draining");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_bounds_the_drain() {
    let mut server = Server::start(&["--grace-period", "0.5"]).await;
    let mut client = server.client().await;
    let mut a = client.generate(long_job("grace-a")).await.unwrap().into_inner();
    next_matching(&mut a, |e| matches!(e, Event::Step(_))).await;
    let signalled = Instant::now();
    server.signal("INT");
    let a = collect(a).await;
    assert_eq!(a.code(), Code::Unavailable, "{:?}", a.error);
    assert!(a.result().is_none());
    let status = server.wait_exit(Duration::from_secs(30)).await.expect("server exits after the grace period");
    assert!(status.success(), "exit status {status:?}");
    println!("exited {:.2}s after SIGINT", signalled.elapsed().as_secs_f64());
}
