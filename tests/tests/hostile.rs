//! Hostile bytes and strings against a real server process over loopback: what a careless
//! or malicious client can send with a raw gRPC call, and what it gets back and leaves in
//! the server's log.
use frisket_e2e::*;
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Sends a request body as given, bytes unchecked; the reply is decoded as `R`.
struct RawCodec<R>(std::marker::PhantomData<R>);

struct RawEncoder;
struct RawDecoder<R>(std::marker::PhantomData<R>);

impl<R: Message + Default + Send + 'static> Codec for RawCodec<R> {
    type Encode = Vec<u8>;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder<R>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder<R> {
        RawDecoder(std::marker::PhantomData)
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl<R: Message + Default> Decoder for RawDecoder<R> {
    type Item = R;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
        R::decode(src).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

async fn raw_unary<R: Message + Default + Send + 'static>(server: &Server, method: &str, body: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let path = format!("/frisket.v1.Frisket/{method}").parse().unwrap();
    match grpc.unary(tonic::Request::new(body), path, RawCodec::<R>(std::marker::PhantomData)).await {
        Ok(_) => Status::new(Code::Ok, "answered"),
        Err(status) => status,
    }
}

#[tokio::test]
async fn undecodable_messages_are_invalid_argument() {
    let server = Server::start(&[]).await;
    // A length-delimited field 1 whose two bytes are not UTF-8 (job_id, a string).
    let bad_utf8 = vec![0x0a, 0x02, 0xff, 0xfe];
    // A varint that never ends.
    let truncated = vec![0x08, 0xff];
    for (what, body) in [("invalid UTF-8", bad_utf8), ("truncated varint", truncated)] {
        let status = raw_unary::<pb::CancelResponse>(&server, "Cancel", body).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }
    // The server goes on serving.
    let status = raw_unary::<pb::ListModelsResponse>(&server, "ListModels", Vec::new()).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
}

#[tokio::test]
async fn huge_hostile_job_ids_are_refused_briefly_and_logged_escaped() {
    let server = Server::start(&[]).await;
    let mut client = server.client().await;
    let forged = "x\n2026-01-01T00:00:00Z  INFO frisket: forged line\u{1b}[31m";
    let huge = forged.repeat((1 << 20) / forged.len() + 1);
    assert!(huge.len() >= 1 << 20);
    let before = server.logs().len();

    let err = client.cancel(pb::CancelRequest { job_id: huge.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() < 1024, "a {}-byte status", err.message().len());
    assert!(err.message().contains(&format!("{} bytes", huge.len())), "{}", err.message());

    let mut req = txt2img("sd1", "a cat", 1, 2, 64, 64);
    req.job_id = huge.clone();
    let err = client.generate(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() < 1024, "a {}-byte status", err.message().len());

    let mut req = txt2img("sd1", "a cat", 1, 2, 64, 64);
    req.scheduler = forged.to_string();
    let err = client.generate(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let logs = server.logs();
    let written = &logs[before..];
    assert!(written.len() < 4096, "the log grew by {} bytes:\n{written}", written.len());
    assert!(!written.contains('\u{1b}'), "a raw escape byte in the log:\n{written}");
    assert!(!written.contains("\n2026-01-01"), "a forged log line:\n{written}");
}

/// A client that keeps its stream open but stops reading does not hold the engine: the
/// next client's job runs to its end meanwhile, and the unread events wait for the first
/// client, who then gets every one of them and its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_a_long_step_and_exits_cleanly() {
    // Exact attribution at 128² is over the default work budget: this server allows it.
    let mut server = Server::start(&["--grace-period", "0.5", "--max-work", "100000000"]).await;
    let mut client = server.client().await;
    let mut req = txt2img("sd1", "a red circle", 3, 2, 128, 128);
    req.reference_image = png(128, 128);
    req.strength = Some(1.0);
    req.explain = Some(pb::ExplainOptions {
        mode: Some(pb::ExplainMode::Exact as i32),
        layers: "all".into(),
        subject_words: vec!["circle".into()],
        // One backward pass per latent element: 4096 of them, far longer than the grace.
        exact_batch: Some(1),
        ..Default::default()
    });
    let mut stream = client.generate(req).await.unwrap().into_inner();
    next_matching(&mut stream, |e| matches!(e, Event::Started(_))).await;
    let signalled = std::time::Instant::now();
    server.signal("TERM");
    let rest = collect(stream).await;
    assert_eq!(rest.code(), Code::Unavailable, "{:?}", rest.error);
    assert!(rest.steps().is_empty(), "the manipulated first step finished");
    let status = server.wait_exit(std::time::Duration::from_secs(60)).await.expect("the server exits");
    assert!(status.success(), "exit status {status:?}");
    let seconds = signalled.elapsed().as_secs_f64();
    println!("exited {seconds:.2}s after SIGTERM");
    assert!(seconds < 15.0, "exit took {seconds:.1}s after SIGTERM with a 0.5 s grace period");
}

/// Limits are flags, GetServerInfo reports them, and a job over the work budget (a huge
/// image with many steps, exact Grad-SAM on a large latent) is refused before it is queued,
/// naming the limit.
#[tokio::test]
async fn the_work_budget_refuses_jobs_before_they_queue() {
    let server = Server::start(&["--max-work", "400000", "--max-steps", "300"]).await;
    let mut client = server.client().await;
    let info = client.get_server_info(pb::GetServerInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.max_work, info.max_steps, info.max_side), (400_000, 300, 4096));
    assert!(info.max_loras > 0 && info.max_prompt_bytes > 0 && info.max_message_bytes > 0);

    // sd1's latent is 1/4 of the image per side: 512² is 16,384 positions, × 2 rows (guidance)
    // × 20 steps = 655,360 units.
    let big = txt2img("sd1", "a red circle", 1, 20, 512, 512);
    let err = client.generate(big).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("655360 work units") && err.message().contains("400000"), "{}", err.message());
    let over_steps = txt2img("sd1", "a red circle", 1, 301, 64, 64);
    let err = client.generate(over_steps).await.unwrap_err();
    assert!(err.message().contains("limit of 300"), "{}", err.message());

    // Exact attribution at 128² (1,024 positions): 8 × 1,024² per manipulation.
    let mut exact = txt2img("sd1", "a red circle", 1, 2, 128, 128);
    exact.reference_image = png(128, 128);
    exact.strength = Some(1.0);
    exact.explain = Some(pb::ExplainOptions { mode: Some(pb::ExplainMode::Exact as i32), ..Default::default() });
    let err = client.generate(exact.clone()).await.unwrap_err();
    assert!(err.message().contains("or fast Grad-SAM"), "{}", err.message());
    // Fast mode at the same size fits, and runs.
    exact.explain.as_mut().unwrap().mode = Some(pb::ExplainMode::Fast as i32);
    let done = generate(&mut client, exact).await;
    assert_eq!(done.code(), Code::Ok, "{:?}", done.error);
}
