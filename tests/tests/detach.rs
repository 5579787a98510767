//! Detached jobs against a real server: a client whose connection drops mid-job leaves
//! the job running; WatchJob from another connection replays its state and delivers a
//! result byte-identical to an uninterrupted run; GetResult returns it after the stream
//! ended; expired, unknown and not-detached ids get NOT_FOUND / FAILED_PRECONDITION; a
//! detached request of two images is watched and fetched image by image.
use frisket_e2e::{collect, generate, next_matching, txt2img, Server};
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use std::time::{Duration, Instant};
use tonic::Code;

/// 64 px sd1, a preview every step: long enough to drop the client in the middle.
fn job(id: &str, detach: bool) -> pb::GenerateRequest {
    let mut req = txt2img("sd1", "a red fox in the snow", 7, 12, 64, 64);
    req.job_id = id.into();
    req.detach = detach;
    req.stream = Some(pb::StreamOptions {
        previews: Some(pb::PreviewOptions { enabled: true, every: 1, ..Default::default() }),
        ..Default::default()
    });
    req
}

#[tokio::test]
async fn a_detached_job_outlives_its_client_and_its_result_is_kept() {
    let server = Server::start(&["--keep-results", "4s"]).await;
    let mut client = server.client().await;

    // The reference: the same job, not detached, read to its end. While it runs it cannot
    // be watched.
    let mut stream = client.generate(job("plain", false)).await.unwrap().into_inner();
    next_matching(&mut stream, |e| matches!(e, Event::Step(_))).await;
    let watch = client.watch_job(pb::WatchJobRequest { job_id: "plain".into() }).await;
    assert_eq!(watch.err().map(|s| s.code()), Some(Code::FailedPrecondition));
    let plain = collect(stream).await;
    let expected = plain.result().expect("the plain job's result").image.clone();

    // The detached job's client drops its connection after two steps.
    {
        let mut gone = server.client().await;
        let mut stream = gone.generate(job("detached", true)).await.unwrap().into_inner();
        next_matching(&mut stream, |e| matches!(e, Event::Step(s) if s.index == 1)).await;
    }
    let mut watcher = client.watch_job(pb::WatchJobRequest { job_id: "detached".into() }).await.unwrap().into_inner();
    let first = next_matching(&mut watcher, |_| true).await;
    let watched = collect(watcher).await;
    let mut events = vec![first];
    events.extend(watched.events);
    assert!(watched.error.is_none(), "{:?}", watched.error);
    let result = events.iter().find_map(|e| if let Event::Result(r) = e { Some(r) } else { None }).unwrap();
    assert_eq!(result.image, expected, "the detached job's image differs from the uninterrupted run's");
    assert!(events.iter().any(|e| matches!(e, Event::Started(_))), "the replay starts with Started");
    assert!(events.iter().any(|e| matches!(e, Event::Preview(_))), "the replay has the latest preview");
    let logs = server.logs();
    assert!(!logs.contains("job_id=detached reason=\"client left\""), "the job stopped with its client:\n{logs}");

    // GetResult returns the same bytes after the stream ended.
    let kept = client
        .get_result(pb::GetResultRequest { job_id: "detached".into(), image_index: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.image, expected);
    assert_eq!(kept.seed, 7);
    // Its id stays taken while it is kept.
    let again = generate(&mut client, job("detached", false)).await;
    assert_eq!(again.code(), Code::AlreadyExists);

    for (id, code) in [("never-ran", Code::NotFound), ("plain", Code::NotFound), ("bad id!", Code::InvalidArgument)] {
        let got = client.get_result(pb::GetResultRequest { job_id: id.into(), image_index: 0 }).await.unwrap_err();
        assert_eq!(got.code(), code, "{id}: {}", got.message());
    }

    // After --keep-results it is gone.
    let waited = Instant::now();
    loop {
        match client.get_result(pb::GetResultRequest { job_id: "detached".into(), image_index: 0 }).await {
            Ok(_) => assert!(waited.elapsed() < Duration::from_secs(60), "the result was never dropped"),
            Err(status) => {
                assert_eq!(status.code(), Code::NotFound, "{}", status.message());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let watch = client.watch_job(pb::WatchJobRequest { job_id: "detached".into() }).await;
    assert_eq!(watch.err().map(|s| s.code()), Some(Code::NotFound));
}

#[tokio::test]
async fn a_cancelled_detached_job_reports_its_end_and_detach_can_be_turned_off() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let mut stream = client.generate(job("to-cancel", true)).await.unwrap().into_inner();
    next_matching(&mut stream, |e| matches!(e, Event::Step(_))).await;
    let found = client.cancel(pb::CancelRequest { job_id: "to-cancel".into() }).await.unwrap().into_inner().found;
    assert!(found);
    assert_eq!(collect(stream).await.code(), Code::Cancelled);
    let got = client.get_result(pb::GetResultRequest { job_id: "to-cancel".into(), image_index: 0 }).await.unwrap_err();
    assert_eq!(got.code(), Code::Cancelled, "{}", got.message());
    let info = client.get_server_info(pb::GetServerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.keep_results_seconds, 600.0);

    let off = Server::start(&["--keep-results", "0"]).await;
    let refused = generate(&mut off.client().await, job("off", true)).await;
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.error.unwrap().message().contains("--keep-results 0"));
}

/// The Result events of `events` by seed (image i has seed + i), each image as a hash.
fn results_by_seed(events: &[Event]) -> Vec<(u64, u64)> {
    use std::hash::{Hash, Hasher};
    let hash = |bytes: &[u8]| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        h.finish()
    };
    let mut out: Vec<_> = events
        .iter()
        .filter_map(|e| if let Event::Result(r) = e { Some((r.seed, hash(&r.image))) } else { None })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_detached_request_of_two_images_is_watched_and_fetched_per_image() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let two = |id: &str, detach: bool| pb::GenerateRequest { num_images: Some(2), ..job(id, detach) };

    // The reference: the same two images, not detached, read to the end.
    let plain = collect(client.generate(two("plain-2", false)).await.unwrap().into_inner()).await;
    assert!(plain.error.is_none(), "{:?}", plain.error);
    let expected = results_by_seed(&plain.events);
    assert_eq!(expected.iter().map(|(seed, _)| *seed).collect::<Vec<_>>(), [7, 8]);

    // The detached one's client leaves after two steps; a watcher gets both images.
    {
        let mut gone = server.client().await;
        let mut stream = gone.generate(two("detached-2", true)).await.unwrap().into_inner();
        next_matching(&mut stream, |e| matches!(e, Event::Step(s) if s.index == 1)).await;
    }
    let get = |index: u32| pb::GetResultRequest { job_id: "detached-2".into(), image_index: index };
    let watcher = client.watch_job(pb::WatchJobRequest { job_id: "detached-2".into() }).await.unwrap().into_inner();
    let watched = collect(watcher).await;
    assert!(watched.error.is_none(), "{:?}", watched.error);
    let started: Vec<u32> = watched
        .events
        .iter()
        .filter_map(|e| if let Event::Started(s) = e { Some(s.num_images) } else { None })
        .collect();
    assert_eq!(started, [2, 2], "each image's Started, saying how many images");
    assert_eq!(results_by_seed(&watched.events), expected, "the watched images differ from the uninterrupted run's");

    // GetResult per image; past the last one is OUT_OF_RANGE.
    for index in 0..expected.len() {
        let kept = client.get_result(get(index as u32)).await.unwrap().into_inner();
        assert_eq!(results_by_seed(&[Event::Result(kept)]), expected[index..=index], "image {index}");
    }
    let past = client.get_result(get(2)).await.unwrap_err();
    assert_eq!(past.code(), Code::OutOfRange, "{}", past.message());

    // A watcher after the end gets the same two results.
    let late = client.watch_job(pb::WatchJobRequest { job_id: "detached-2".into() }).await.unwrap().into_inner();
    assert_eq!(results_by_seed(&collect(late).await.events), expected);
}
