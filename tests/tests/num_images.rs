//! Several images per request (`num_images`) against a real server: image i has seed
//! seed + i and is the image a one-image request with that seed gives (exactly with
//! `--max-batch 1`, up to summation order when the images are stepped together); every
//! event names its image; the stream ends after the last Result; Cancel stops them all;
//! more than the limit is refused (detached requests of several images: detach.rs).
use frisket_e2e::*;
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use tokio_stream::StreamExt;
use tonic::Code;

fn request(model: &str, seed: u64, steps: u32, images: u32) -> pb::GenerateRequest {
    let mut req = txt2img(model, "a red circle on the left", seed, steps, 64, 48);
    req.num_images = Some(images);
    req.stream = Some(pb::StreamOptions {
        previews: Some(pb::PreviewOptions { enabled: true, every: 1, ..Default::default() }),
        ..Default::default()
    });
    req
}

/// The whole stream, each event with its image index, and the status it ended with.
async fn run(server: &Server, req: pb::GenerateRequest) -> (Vec<(u32, Event)>, Option<tonic::Status>) {
    let mut stream = match server.client().await.generate(req).await {
        Ok(response) => response.into_inner(),
        Err(status) => return (Vec::new(), Some(status)),
    };
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(e) => events.push((e.image_index, e.event.expect("an event body"))),
            Err(status) => return (events, Some(status)),
        }
    }
    (events, None)
}

fn results(events: &[(u32, Event)]) -> Vec<(u32, pb::Result)> {
    events.iter().filter_map(|(i, e)| if let Event::Result(r) = e { Some((*i, r.clone())) } else { None }).collect()
}

fn max_level_diff(a: &[u8], b: &[u8]) -> u8 {
    let (a, b) = (image::load_from_memory(a).unwrap().to_rgb8(), image::load_from_memory(b).unwrap().to_rgb8());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

/// Runs 3 images of seed 11 and compares each with its one-image run; returns the largest
/// difference in 8-bit levels.
async fn three_images_match_their_lone_runs(server: &Server, model: &str) -> u8 {
    let (events, status) = run(server, request(model, 11, 4, 3)).await;
    assert!(status.is_none(), "{status:?}");
    let started: Vec<(u32, u64)> =
        events.iter().filter_map(|(i, e)| if let Event::Started(s) = e { Some((*i, s.seed)) } else { None }).collect();
    let mut seeds = started.clone();
    seeds.sort();
    assert_eq!(seeds, [(0, 11), (1, 12), (2, 13)]);
    assert!(events.iter().all(|(i, _)| *i < 3));
    for image in 0..3 {
        let steps = events.iter().filter(|(i, e)| *i == image && matches!(e, Event::Step(_))).count();
        assert_eq!(steps, 4, "image {image}");
    }
    let got = results(&events);
    assert_eq!(got.len(), 3);
    assert!(matches!(events.last(), Some((_, Event::Result(_)))), "the stream ends with the last Result");
    let mut worst = 0;
    for (index, result) in got {
        assert_eq!(result.seed, 11 + index as u64);
        let (lone, status) = run(server, request(model, 11 + index as u64, 4, 1)).await;
        assert!(status.is_none(), "{status:?}");
        let lone = &results(&lone)[0].1;
        worst = worst.max(max_level_diff(&lone.image, &result.image));
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_image_is_its_seeds_lone_image() {
    let server = Server::start(&["--max-batch", "1"]).await;
    assert_eq!(three_images_match_their_lone_runs(&server, "sd1").await, 0, "one at a time: exact");

    // Stepped together on the shipped model: the lone images up to summation order.
    let batched = Server::start_on(&workspace_root().join("models"), &["--max-batch", "4"]).await;
    let diff = three_images_match_their_lone_runs(&batched, "shapes").await;
    println!("batched images vs lone runs: max {diff} levels");
    assert!(diff <= 1, "{diff} levels");
    let log = batched.logs();
    let first_end = log.find("job finished").expect("a job finished");
    assert_eq!(log[..first_end].matches("job started").count(), 3, "the images ran together:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_every_image_and_limits_hold() {
    let server = Server::start(&[]).await;
    let mut req = request("sd1", 5, 200, 3);
    req.job_id = "many".into();
    let mut stream = server.client().await.generate(req).await.unwrap().into_inner();
    next_matching(&mut stream, |e| matches!(e, Event::Step(_))).await;
    let cancel = server.client().await.cancel(pb::CancelRequest { job_id: "many".into() }).await.unwrap();
    assert!(cancel.into_inner().found);
    let rest = collect(stream).await;
    assert_eq!(rest.code(), Code::Cancelled);
    server.wait_for_log(&["job_id=many", "job stopped"]).await;
    let waited = std::time::Instant::now();
    loop {
        let info = server.client().await.get_server_info(pb::GetServerInfoRequest {}).await.unwrap().into_inner();
        if info.queued_jobs == 0 && info.running_jobs == 0 {
            assert_eq!(info.max_images, 8);
            break;
        }
        assert!(waited.elapsed().as_secs() < 30, "images still queued or running: {info:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let (_, status) = run(&server, request("sd1", 5, 4, 9)).await;
    let status = status.expect("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("max_images"), "{}", status.message());
    // The work budget counts every image.
    let limited = Server::start(&["--max-work", "2000"]).await;
    let (events, status) = run(&limited, request("sd1", 5, 4, 1)).await;
    assert!(status.is_none() && results(&events).len() == 1, "{status:?}");
    let (_, status) = run(&limited, request("sd1", 5, 4, 2)).await;
    assert!(status.expect("refused").message().contains("max_work"));
}
