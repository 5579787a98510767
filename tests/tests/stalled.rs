//! Clients that cannot hold the server hostage: one that stops reading (a process stopped
//! with SIGSTOP behind a 16 KB HTTP/2 window), one connection flooding Generate, and a
//! flood of Cancel. Each runs against a real server process on the shipped `shapes`
//! model (64 px).
use frisket_e2e::{collect, generate, next_matching, txt2img, Server};
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tonic::Code;

async fn shapes_server(extra: &[&str]) -> Server {
    Server::start_on(&frisket_e2e::workspace_root().join("models"), extra).await
}

/// `stream_client` (tests/src/bin) in its own process; its stdout lines arrive on
/// `lines`. Resumed and killed on drop.
struct StreamClient {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl StreamClient {
    fn start(server: &Server, job_id: &str, steps: u32) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stream_client"))
            .args([server.url(), job_id.to_string(), steps.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting stream_client");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// The next line, waiting up to 60 s.
    fn next_line(&mut self) -> Option<String> {
        let line = self.lines.recv_timeout(Duration::from_secs(60)).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Every line up to the process's end.
    fn rest(&mut self) -> Vec<String> {
        let mut rest = Vec::new();
        while let Some(line) = self.next_line() {
            rest.push(line);
        }
        let status = self.child.wait().expect("waiting for stream_client");
        assert!(status.success(), "stream_client exited with {status}; it printed {:?}", self.seen);
        rest
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(ok.is_ok_and(|s| s.success()), "kill -{name} failed");
    }
}

impl Drop for StreamClient {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal("CONT");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The step of the last `KIND N` line.
fn last_step(lines: &[String], kind: &str) -> Option<u32> {
    lines.iter().rev().find_map(|l| l.strip_prefix(kind)?.strip_prefix(' ')?.parse().ok())
}

/// The time of day, in seconds, of the first log line with all of `words` (the log's
/// timestamps are RFC 3339, UTC).
fn log_seconds(logs: &str, words: &[&str]) -> f64 {
    let line = logs
        .lines()
        .find(|l| words.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("no log line with {words:?}:\n{logs}"));
    let time = line.split_whitespace().next().and_then(|t| t.split_once('T')).map(|(_, t)| t.trim_end_matches('Z'));
    let parts: Vec<f64> = time.unwrap_or_default().split(':').filter_map(|p| p.parse().ok()).collect();
    assert_eq!(parts.len(), 3, "no timestamp in {line:?}");
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

const STALLED_STEPS: u32 = 40;

/// The stalled reader: a client process with a 16 KB window, stopped after its
/// first event, does not hold the engine: another client's job starts and completes
/// meanwhile. Resumed, the stopped client gets its result, with the newest preview and
/// latent, and the count of the older ones that newer ones replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_client_does_not_hold_the_engine_and_gets_its_result() {
    // The client stays stopped for two jobs' time: on a slow machine that can pass the
    // default stalled-client time and the keepalive's, which would drop it (the next test).
    // One job at a time: the other job starts only once the stopped client's job is done.
    let server =
        shapes_server(&["--stalled-client-seconds", "300", "--http2-keepalive-interval", "300", "--max-batch", "1"])
            .await;
    let mut stalled = StreamClient::start(&server, "stall-a", STALLED_STEPS);
    assert_eq!(stalled.next_line().as_deref(), Some("queued"));
    stalled.signal("STOP");

    let mut other = server.client().await;
    let mut req = txt2img("shapes", "a blue square", 2, 10, 64, 64);
    req.job_id = "other-b".into();
    let done = generate(&mut other, req).await;
    assert_eq!(done.code(), Code::Ok, "{:?}", done.error);
    assert!(done.started().is_some() && done.result().is_some());
    let logs = server.logs();
    let finished = log_seconds(&logs, &["job_id=stall-a", "job finished"]);
    let started = log_seconds(&logs, &["job_id=other-b", "job started"]);
    println!("the other job started {:.4} s after the stopped client's job finished computing", started - finished);

    stalled.signal("CONT");
    let mut rest = stalled.rest();
    let last = rest.pop().expect("the resumed client printed its end");
    let dropped: u64 = last
        .strip_prefix("result dropped=")
        .unwrap_or_else(|| panic!("the resumed client ended with {last:?}"))
        .parse()
        .unwrap();
    let (previews, latents) = (
        rest.iter().filter(|l| l.starts_with("preview ")).count(),
        rest.iter().filter(|l| l.starts_with("latent ")).count(),
    );
    println!("resumed client: {previews} previews, {latents} latents of {STALLED_STEPS} each; {dropped} replaced");
    assert!(dropped > 0, "nothing was replaced for a stopped client");
    assert_eq!(previews + latents + dropped as usize, 2 * STALLED_STEPS as usize, "every event is got or counted");
    // Steps are never dropped, and the newest preview and latent always arrive.
    assert_eq!(rest.iter().filter(|l| l.starts_with("step ")).count(), STALLED_STEPS as usize);
    assert_eq!(last_step(&rest, "preview"), Some(STALLED_STEPS - 1));
    assert_eq!(last_step(&rest, "latent"), Some(STALLED_STEPS - 1));
}

/// A client that never reads again is dropped after --stalled-client-seconds: the log says
/// so, the engine is free, and if it does wake up it gets a status that says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_is_dropped_with_a_clear_status() {
    let server = shapes_server(&["--stalled-client-seconds", "1"]).await;
    let mut stalled = StreamClient::start(&server, "stall-c", STALLED_STEPS);
    assert_eq!(stalled.next_line().as_deref(), Some("queued"));
    stalled.signal("STOP");
    server.wait_for_log(&["job_id=stall-c", "client read nothing for the stalled-client time"]).await;

    let done = generate(&mut server.client().await, txt2img("shapes", "a blue square", 2, 4, 64, 64)).await;
    assert_eq!(done.code(), Code::Ok, "{:?}", done.error);
    let info = server.client().await.get_server_info(pb::GetServerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.queued_jobs, info.running_jobs), (0, 0));
    assert_eq!(info.stalled_client_seconds, 1.0);

    stalled.signal("CONT");
    let rest = stalled.rest();
    let last = rest.last().expect("the resumed client printed its end");
    assert!(
        last.starts_with("status Cancelled") && last.contains("read nothing for 1 s"),
        "the resumed client ended with {last:?}"
    );
    assert!(!rest.iter().any(|l| l.starts_with("result")), "{rest:?}");
}

/// One connection holds at most --max-jobs-per-connection jobs: the next Generate on it is
/// RESOURCE_EXHAUSTED naming the limit, while another connection's job is accepted and
/// completes, and the first connection may start a job again once one of its jobs ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_cannot_flood_the_queue() {
    let server = shapes_server(&["--max-jobs-per-connection", "2", "--queue-capacity", "8"]).await;
    let mut flood = server.client().await; // clones share its one connection
    let info = flood.get_server_info(pb::GetServerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.max_jobs_per_connection, 2);
    let job = |id: &str, steps| {
        let mut req = txt2img("shapes", "a red circle", 1, steps, 64, 64);
        req.job_id = id.into();
        req
    };
    let a = flood.clone().generate(job("flood-1", 30)).await.unwrap().into_inner();
    let b = flood.clone().generate(job("flood-2", 5)).await.unwrap().into_inner();
    let refused = flood.generate(job("flood-3", 5)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("2 jobs") && refused.message().contains("per connection"), "{refused:?}");

    let mut other = server.client().await;
    let done = generate(&mut other, job("other-1", 5)).await;
    assert_eq!(done.code(), Code::Ok, "{:?}", done.error);
    assert!(done.result().is_some());

    for stream in [a, b] {
        let got = collect(stream).await;
        assert_eq!(got.code(), Code::Ok, "{:?}", got.error);
    }
    let again = generate(&mut flood, job("flood-4", 2)).await;
    assert_eq!(again.code(), Code::Ok, "a connection whose jobs ended may start more: {:?}", again.error);
}

/// 5,000 Cancels of unknown (valid) ids from one connection while another client's job
/// runs: each is answered (found = false), the job completes, and the log grows by a
/// bounded amount (an unknown id costs no log line at the default level).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_cancels_costs_no_log_and_holds_no_job() {
    const CANCELS: usize = 5_000;
    const TASKS: usize = 50;
    let server = shapes_server(&[]).await;
    let mut worker = server.client().await;
    let mut req = txt2img("shapes", "a red circle", 1, 20, 64, 64);
    req.job_id = "busy-job".into();
    let mut stream = worker.generate(req).await.unwrap().into_inner();
    next_matching(&mut stream, |e| matches!(e, Event::Started(_))).await;
    let before = server.logs().len();

    let flood = server.client().await;
    let flooding = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let mut client = flood.clone();
        tasks.spawn(async move {
            let mut answered = 0;
            for i in 0..CANCELS / TASKS {
                let id = format!("no-such-job-{t}-{i}-{:x}", (t * 7919 + i * 104729) % 65521);
                let found = client.cancel(pb::CancelRequest { job_id: id }).await.expect("Cancel answered");
                assert!(!found.into_inner().found);
                answered += 1;
            }
            answered
        });
    }
    let mut answered = 0;
    while let Some(n) = tasks.join_next().await {
        answered += n.unwrap();
    }
    assert_eq!(answered, CANCELS);
    println!("{CANCELS} Cancels answered in {:.2} s", flooding.elapsed().as_secs_f64());

    let done = collect(stream).await;
    assert_eq!(done.code(), Code::Ok, "the running job completes: {:?}", done.error);
    assert!(done.result().is_some());
    let grown = server.logs().len() - before;
    println!("the log grew by {grown} bytes");
    assert!(grown < 2048, "the log grew by {grown} bytes:\n{}", &server.logs()[before..]);
}
