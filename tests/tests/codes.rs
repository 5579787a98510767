//! The README's table of gRPC status codes, checked: the test reads the table and, for
//! every row, drives a real server process to return that code. A row without a case here,
//! or a case without a row, fails the test.
use frisket_e2e::*;
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use prost::Message;
use std::collections::BTreeSet;
use std::time::Duration;
use tonic::{Code, Status};

/// The codes this test drives the server to.
const CASES: [Code; 10] = [
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Cancelled,
    Code::DeadlineExceeded,
    Code::Unimplemented,
    Code::Internal,
    // Last: it shuts the server down.
    Code::Unavailable,
];

/// The codes of the README's "Status codes" table, in its order.
fn readme_codes() -> Vec<Code> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("reading README.md");
    let section = readme.split("\n### Status codes\n").nth(1).expect("README.md has a '### Status codes' section");
    let rows = section.lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|'));
    rows.filter_map(|row| {
        let name = row.split('|').nth(1)?.trim().strip_prefix('`')?.strip_suffix('`')?;
        // INVALID_ARGUMENT → InvalidArgument, as tonic's Code prints.
        let camel: String = name.split('_').map(|w| w[..1].to_string() + &w[1..].to_lowercase()).collect();
        let code = (0..=16).map(Code::from).find(|c| format!("{c:?}") == camel);
        Some(code.unwrap_or_else(|| panic!("README.md's status table names {name}, not a gRPC code")))
    })
    .collect()
}

fn long_job(id: &str) -> pb::GenerateRequest {
    pb::GenerateRequest { job_id: id.into(), ..txt2img("sd1", "a long job", 7, 400, 64, 48) }
}

/// Starts a long job and waits for its Started event.
async fn running(server: &Server, id: &str) -> tonic::Streaming<pb::GenerateEvent> {
    let mut stream = server.client().await.generate(long_job(id)).await.unwrap().into_inner();
    next_matching(&mut stream, |e| matches!(e, Event::Started(_))).await;
    stream
}

async fn cancel(server: &Server, id: &str) {
    server.client().await.cancel(pb::CancelRequest { job_id: id.into() }).await.unwrap();
}

/// The status of a Generate call: its refusal, or the status its stream ended with.
async fn generate_status(server: &Server, req: impl tonic::IntoRequest<pb::GenerateRequest>) -> Status {
    let got = generate(&mut server.client().await, req).await;
    got.error.unwrap_or_else(|| Status::ok("finished"))
}

fn raw_status(reply: RawReply) -> Status {
    match reply.status {
        Some(status) => status,
        None => panic!("no grpc-status: HTTP {}, {} body bytes", reply.http_status, reply.body.len()),
    }
}

/// Drives `server` to answer with `code`; the statuses it got (each must carry `code`).
async fn drive(code: Code, server: &mut Server) -> Vec<Status> {
    match code {
        Code::InvalidArgument => {
            let mut out = vec![generate_status(server, txt2img("sd1", "x", 1, 0, 64, 48)).await];
            // Unknown values of each enum a request carries.
            let img2img = || pb::GenerateRequest { reference_image: png(64, 48), ..txt2img("sd1", "x", 1, 2, 64, 48) };
            let explain = |o: pb::ExplainOptions| pb::GenerateRequest { explain: Some(o), ..img2img() };
            out.push(
                generate_status(server, explain(pb::ExplainOptions { mode: Some(99), ..Default::default() })).await,
            );
            out.push(
                generate_status(server, explain(pb::ExplainOptions { start: Some(-1), ..Default::default() })).await,
            );
            let previews = |p: pb::PreviewOptions| pb::GenerateRequest {
                stream: Some(pb::StreamOptions { previews: Some(p), ..Default::default() }),
                ..img2img()
            };
            let on = || pb::PreviewOptions { enabled: true, every: 1, ..Default::default() };
            out.push(generate_status(server, previews(pb::PreviewOptions { format: 7, ..on() })).await);
            out.push(generate_status(server, previews(pb::PreviewOptions { method: 7, ..on() })).await);
            // Invalid UTF-8 in a string field (CancelRequest.job_id), and a content-type
            // that is not gRPC.
            let bad_utf8 = grpc_frame(&[0x0a, 0x02, 0xff, 0xfe]);
            let cancel = "/frisket.v1.Frisket/Cancel";
            out.push(raw_status(
                raw_h2_call(server.addr, cancel, "application/grpc", &[], bad_utf8, true).await.unwrap(),
            ));
            let good = grpc_frame(&pb::CancelRequest { job_id: "x".into() }.encode_to_vec());
            out.push(raw_status(raw_h2_call(server.addr, cancel, "text/plain", &[], good, true).await.unwrap()));
            out
        }
        Code::NotFound => vec![generate_status(server, txt2img("no-such-model", "x", 1, 2, 64, 48)).await],
        Code::AlreadyExists => {
            let a = running(server, "codes-dup").await;
            let got = generate_status(server, long_job("codes-dup")).await;
            cancel(server, "codes-dup").await;
            collect(a).await;
            vec![got]
        }
        Code::ResourceExhausted => {
            // The server's queue holds one job: one running, one waiting (of another model, so
            // it cannot join the running one), the third refused.
            let a = running(server, "codes-full-a").await;
            let other_model = pb::GenerateRequest { model: "sd2".into(), ..long_job("codes-full-b") };
            let mut b = server.client().await.generate(other_model).await.unwrap().into_inner();
            next_matching(&mut b, |e| matches!(e, Event::Queued(_))).await;
            let full = generate_status(server, long_job("codes-full-c")).await;
            for id in ["codes-full-b", "codes-full-a"] {
                cancel(server, id).await;
            }
            collect(a).await;
            collect(b).await;
            // A message over --max-message-bytes (1 MiB here).
            let big = pb::GenerateRequest { reference_image: vec![1; 2 << 20], ..txt2img("sd1", "x", 1, 2, 64, 48) };
            vec![full, generate_status(server, big).await]
        }
        Code::FailedPrecondition => {
            // A checkpoint that is not one: the model is listed but cannot be used.
            let dir = std::env::temp_dir().join(format!("frisket-codes-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("broken.safetensors"), b"not a safetensors file").unwrap();
            let broken = Server::start_on(&dir, &[]).await;
            let got = generate_status(&broken, txt2img("broken", "x", 1, 2, 64, 48)).await;
            let _ = std::fs::remove_dir_all(&dir);
            vec![got]
        }
        Code::Cancelled => {
            let a = running(server, "codes-cancel").await;
            cancel(server, "codes-cancel").await;
            vec![collect(a).await.error.expect("the cancelled job ends with a status")]
        }
        Code::DeadlineExceeded => {
            let mut req = tonic::Request::new(long_job("codes-deadline"));
            req.set_timeout(Duration::from_millis(500));
            vec![generate_status(server, req).await]
        }
        Code::Unimplemented => {
            let message = grpc_frame(&pb::CancelRequest { job_id: "x".into() }.encode_to_vec());
            let unknown = "/frisket.v1.Frisket/NoSuchMethod";
            let cancel = "/frisket.v1.Frisket/Cancel";
            let gzip = [("grpc-encoding", "gzip")];
            let unknown_method = raw_status(
                raw_h2_call(server.addr, unknown, "application/grpc", &[], message.clone(), true).await.unwrap(),
            );
            assert!(unknown_method.message().contains("NoSuchMethod"), "{unknown_method:?}");
            vec![
                unknown_method,
                raw_status(raw_h2_call(server.addr, cancel, "application/grpc", &gzip, message, true).await.unwrap()),
            ]
        }
        Code::Internal => {
            let mut message = grpc_frame(&pb::CancelRequest { job_id: "x".into() }.encode_to_vec());
            message[0] = 1;
            let cancel = "/frisket.v1.Frisket/Cancel";
            vec![raw_status(raw_h2_call(server.addr, cancel, "application/grpc", &[], message, true).await.unwrap())]
        }
        Code::Unavailable => {
            let a = running(server, "codes-shutdown").await;
            server.signal("TERM");
            let running_job = collect(a).await.error.expect("the job ends with a status");
            assert!(server.wait_exit(Duration::from_secs(60)).await.is_some_and(|s| s.success()));
            vec![running_job]
        }
        other => panic!("README.md's status table lists {other:?}, and this test has no case for it"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_code_in_the_readme_table_is_returned() {
    let table = readme_codes();
    let listed: BTreeSet<i32> = table.iter().map(|&c| c as i32).collect();
    let cased: BTreeSet<i32> = CASES.iter().map(|&c| c as i32).collect();
    assert_eq!(listed.len(), table.len(), "a code listed twice in README.md: {table:?}");
    assert_eq!(listed, cased, "README.md's status table {table:?} and this test's cases {CASES:?} differ");

    let mut server =
        Server::start(&["--queue-capacity", "1", "--max-message-bytes", "1048576", "--grace-period", "0.2"]).await;
    for code in CASES {
        let statuses = drive(code, &mut server).await;
        assert!(!statuses.is_empty());
        for status in &statuses {
            println!("{code:?}: {status:?}");
            assert_eq!(status.code(), code, "{status:?}");
            assert!(!status.message().is_empty() && status.message().len() < 1024, "{status:?}");
        }
    }
}
