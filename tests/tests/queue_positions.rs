//! A waiting job hears its queue position each time it changes, with an estimate of when
//! it starts once the server has timed a step.
use frisket_e2e::*;
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use tonic::Code;

fn long_job(id: &str) -> pb::GenerateRequest {
    pb::GenerateRequest { job_id: id.into(), ..txt2img("sd1", "a long job", 7, 400, 64, 48) }
}

async fn cancel(server: &Server, id: &str) {
    let found = server.client().await.cancel(pb::CancelRequest { job_id: id.into() }).await.unwrap();
    assert!(found.into_inner().found, "Cancel({id}) found no job");
}

/// The next Queued or Started event of `stream`.
async fn next_position(stream: &mut tonic::Streaming<pb::GenerateEvent>) -> Event {
    next_matching(stream, |e| matches!(e, Event::Queued(_) | Event::Started(_))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_sees_its_position_fall_to_its_start() {
    // One job at a time, so b, c and d wait behind a instead of joining it.
    let server = Server::start(&["--queue-capacity", "4", "--max-batch", "1"]).await;
    // a runs (its first step timed: the worker times a step after its events, so a's
    // second Step comes after), b and c wait, d waits behind them.
    let mut a = server.client().await.generate(long_job("pos-a")).await.unwrap().into_inner();
    next_matching(&mut a, |e| matches!(e, Event::Step(s) if s.index >= 1)).await;
    let mut waiting = Vec::new();
    for (id, ahead) in [("pos-b", 0), ("pos-c", 1)] {
        let mut s = server.client().await.generate(long_job(id)).await.unwrap().into_inner();
        match next_position(&mut s).await {
            Event::Queued(q) => assert_eq!(q.position, ahead, "{id}"),
            other => panic!("{id}: {other:?}"),
        }
        waiting.push(s);
    }
    let mut d = server.client().await.generate(long_job("pos-d")).await.unwrap().into_inner();

    // Each job ahead that ends moves d up one place; the last one lets it start.
    let mut seen = Vec::new();
    let mut estimates = Vec::new();
    for ahead in ["pos-a", "pos-b", "pos-c", ""] {
        match next_position(&mut d).await {
            Event::Queued(q) => {
                seen.push(q.position.to_string());
                let estimate = q.estimated_start_seconds.expect("an estimate once a step has been timed");
                assert!(estimate.is_finite() && estimate > 0.0, "estimate {estimate}");
                estimates.push(estimate);
            }
            Event::Started(_) => seen.push("started".into()),
            other => panic!("{other:?}"),
        }
        if !ahead.is_empty() {
            cancel(&server, ahead).await;
        }
    }
    assert_eq!(seen, ["2", "1", "0", "started"]);
    println!("d's estimated start: {estimates:?} s");

    // The jobs ahead ended cancelled; c, which waited behind b, heard its move to 0.
    assert_eq!(collect(a).await.code(), Code::Cancelled);
    let [b, c] = <[_; 2]>::try_from(waiting).unwrap();
    assert_eq!(collect(b).await.code(), Code::Cancelled);
    let c = collect(c).await;
    assert_eq!(c.code(), Code::Cancelled);
    let c_positions: Vec<u32> =
        c.events.iter().filter_map(|e| if let Event::Queued(q) = e { Some(q.position) } else { None }).collect();
    assert_eq!(c_positions, [0], "c's positions after its first");
    cancel(&server, "pos-d").await;
    assert_eq!(collect(d).await.code(), Code::Cancelled);
}
