//! A Generate client in its own process, so a test can stop it (SIGSTOP) as a suspended
//! laptop would be: `stream_client URL JOB_ID STEPS`. It asks the shipped `shapes` model
//! for a job that streams a preview and the latent at every step, over a connection
//! with a 16 KB HTTP/2 receive window (a slow link), and prints one line per event as it
//! reads it: `queued`, `started`, `step N`, `preview N`, `latent N`, then
//! `result dropped=N`, or `status CODE dropped=N MESSAGE` when the stream ends otherwise.
use frisket_e2e::txt2img;
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use std::io::Write;
use tokio_stream::StreamExt;

/// The HTTP/2 receive window, stream and connection.
const WINDOW: u32 = 16 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, job_id, steps] = &args[..] else {
        eprintln!("usage: stream_client URL JOB_ID STEPS");
        std::process::exit(2);
    };
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("a URL")
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .connect()
        .await
        .expect("connecting");
    let mut client = pb::frisket_client::FrisketClient::new(channel).max_decoding_message_size(64 << 20);
    let mut req = txt2img("shapes", "a red circle on the right", 1, steps.parse().expect("steps"), 64, 64);
    req.job_id = job_id.clone();
    req.stream = Some(pb::StreamOptions {
        previews: Some(pb::PreviewOptions { enabled: true, every: 1, ..Default::default() }),
        latents: Some(pb::LatentOptions { enabled: true, every: 1 }),
        ..Default::default()
    });
    let mut out = std::io::stdout();
    let mut say = |line: String| {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    let mut stream = match client.generate(req).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            say(status_line(&status));
            return;
        }
    };
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => say(match event.event {
                Some(Event::Queued(_)) => "queued".into(),
                Some(Event::Started(_)) => "started".into(),
                Some(Event::Step(s)) => format!("step {}", s.index),
                Some(Event::Preview(p)) => format!("preview {}", p.step),
                Some(Event::Latent(l)) => format!("latent {}", l.step),
                Some(Event::Result(r)) => format!("result dropped={}", r.dropped_events),
                Some(other) => format!("other {other:?}"),
                None => "empty".into(),
            }),
            Err(status) => {
                say(status_line(&status));
                return;
            }
        }
    }
}

fn status_line(status: &tonic::Status) -> String {
    let dropped = status.metadata().get(frisket_proto::DROPPED_EVENTS_TRAILER).and_then(|v| v.to_str().ok());
    format!("status {:?} dropped={} {}", status.code(), dropped.unwrap_or("0"), status.message())
}
