//! Hostile bytes and strings against a real server process over loopback: what a careless
//! or malicious client can send with a raw gRPC call, and what it gets back and leaves in
//! the server's log.
use frisket_e2e::*;
use frisket_proto::v1 as pb;
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
