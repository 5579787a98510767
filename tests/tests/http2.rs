//! Raw HTTP/2 against a real server process: gRPC framing a client library would never
//! send (a 4 GB length prefix, a compressed flag without an encoding, a message cut short,
//! the wrong content-type, a message over `--max-message-bytes`) and bytes that are not
//! HTTP/2 at all. Each gets a clear gRPC status (or, for non-HTTP/2 bytes, a closed
//! connection), and the server goes on serving: a normal call on a new connection after
//! each one succeeds.
use frisket_e2e::*;
use frisket_proto::v1 as pb;
use prost::Message;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const CANCEL: &str = "/frisket.v1.Frisket/Cancel";
const GENERATE: &str = "/frisket.v1.Frisket/Generate";
const GRPC: &str = "application/grpc";

/// Small enough that a 100 KB reference image is over it.
const MAX_MESSAGE: &str = "65536";

async fn still_serving(server: &Server) {
    let info = server.client().await.get_server_info(pb::GetServerInfoRequest {}).await;
    assert!(info.is_ok(), "the server stopped serving: {info:?}\n{}", server.logs());
}

fn cancel_message() -> Vec<u8> {
    pb::CancelRequest { job_id: "no-such-job".into() }.encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_framing_gets_a_clear_status() {
    let server = Server::start(&["--max-message-bytes", MAX_MESSAGE]).await;
    let addr = server.addr;

    // The frame's length prefix declares 4 GB; a few bytes follow.
    let mut frame = vec![0u8, 0xff, 0xff, 0xff, 0xff];
    frame.extend_from_slice(&[0u8; 16]);
    let reply = raw_h2_call(addr, CANCEL, GRPC, &[], frame, false).await.unwrap();
    println!("4 GB length prefix: {reply:?}");
    assert_eq!(reply.code(), Some(Code::ResourceExhausted), "{reply:?}");
    assert!(reply.status.as_ref().unwrap().message().contains("too large"), "{reply:?}");
    still_serving(&server).await;

    // The compressed flag without a grpc-encoding: gRPC's compression spec requires INTERNAL.
    let mut frame = grpc_frame(&cancel_message());
    frame[0] = 1;
    let reply = raw_h2_call(addr, CANCEL, GRPC, &[], frame, true).await.unwrap();
    println!("compressed flag, no grpc-encoding: {reply:?}");
    assert_eq!(reply.code(), Some(Code::Internal), "{reply:?}");
    assert!(reply.status.as_ref().unwrap().message().contains("compressed-flag"), "{reply:?}");
    still_serving(&server).await;

    // A flag that is neither 0 nor 1.
    let mut frame = grpc_frame(&cancel_message());
    frame[0] = 0x80;
    let reply = raw_h2_call(addr, CANCEL, GRPC, &[], frame, true).await.unwrap();
    println!("flag 0x80: {reply:?}");
    assert_eq!(reply.code(), Some(Code::InvalidArgument), "{reply:?}");
    still_serving(&server).await;

    // The length prefix declares more bytes than the stream carries before END_STREAM.
    let mut frame = grpc_frame(&cancel_message());
    frame[1..5].copy_from_slice(&1000u32.to_be_bytes());
    let reply = raw_h2_call(addr, CANCEL, GRPC, &[], frame, true).await.unwrap();
    println!("short message: {reply:?}");
    assert_eq!(reply.code(), Some(Code::InvalidArgument), "{reply:?}");
    assert!(reply.status.as_ref().unwrap().message().contains("ended inside a message"), "{reply:?}");
    still_serving(&server).await;

    // No message at all on a unary call.
    let reply = raw_h2_call(addr, CANCEL, GRPC, &[], Vec::new(), true).await.unwrap();
    println!("no message: {reply:?}");
    assert_eq!(reply.code(), Some(Code::InvalidArgument), "{reply:?}");
    still_serving(&server).await;

    // A compression the server does not offer.
    let reply = raw_h2_call(addr, CANCEL, GRPC, &[("grpc-encoding", "gzip")], grpc_frame(&cancel_message()), true)
        .await
        .unwrap();
    println!("grpc-encoding gzip: {reply:?}");
    assert_eq!(reply.code(), Some(Code::Unimplemented), "{reply:?}");
    still_serving(&server).await;

    // A message over --max-message-bytes.
    let big = pb::GenerateRequest { reference_image: vec![7u8; 100_000], ..txt2img("sd1", "x", 1, 2, 64, 48) };
    let reply = raw_h2_call(addr, GENERATE, GRPC, &[], grpc_frame(&big.encode_to_vec()), true).await.unwrap();
    println!("message over the limit: {reply:?}");
    assert_eq!(reply.code(), Some(Code::ResourceExhausted), "{reply:?}");
    assert!(reply.status.as_ref().unwrap().message().contains(MAX_MESSAGE), "{reply:?}");
    still_serving(&server).await;

    // The well-formed call, raw, for comparison: OK.
    let reply = raw_h2_call(addr, CANCEL, GRPC, &[], grpc_frame(&cancel_message()), true).await.unwrap();
    assert_eq!(reply.code(), Some(Code::Ok), "{reply:?}");
    assert_eq!(reply.http_status, 200);
}

/// gRPC over HTTP/2 says a server answers a content-type that is not application/grpc with
/// HTTP 415, so that a plain HTTP client does not read a gRPC error as success; Frisket
/// adds a grpc-status, so gRPC clients see INVALID_ARGUMENT naming the content-type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_content_type_is_refused() {
    let server = Server::start(&[]).await;
    for content_type in ["application/json", "text/plain", ""] {
        let reply =
            raw_h2_call(server.addr, CANCEL, content_type, &[], grpc_frame(&cancel_message()), true).await.unwrap();
        println!("content-type {content_type:?}: {reply:?}");
        assert_eq!(reply.http_status, 415, "{reply:?}");
        assert_eq!(reply.code(), Some(Code::InvalidArgument), "{reply:?}");
        assert!(reply.status.as_ref().unwrap().message().contains("content-type"), "{reply:?}");
        still_serving(&server).await;
    }
    // application/grpc+proto is gRPC too.
    let reply = raw_h2_call(server.addr, CANCEL, "application/grpc+proto", &[], grpc_frame(&cancel_message()), true)
        .await
        .unwrap();
    assert_eq!(reply.code(), Some(Code::Ok), "{reply:?}");
}

/// Reads until the server closes the connection; what it sent first (a GOAWAY, or
/// nothing) is returned. Panics when it is still open after 30 s.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection is still open after 30 s of garbage; got {} bytes", got.len());
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_http2_close_the_connection() {
    let server = Server::start(&[]).await;
    let garbage: [(&str, Vec<u8>); 3] = [
        ("HTTP/1.1", b"GET / HTTP/1.1\r\nHost: frisket\r\n\r\n".to_vec()),
        ("random bytes", (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()),
        // The preface, then a frame header whose length is over any frame size.
        ("oversize frame", {
            let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            b.extend_from_slice(&[0xff, 0xff, 0xff, 0x04, 0, 0, 0, 0, 0]);
            b
        }),
    ];
    for (what, bytes) in garbage {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let start = Instant::now();
        // The server may close before it has read everything.
        let _ = tcp.write_all(&bytes).await;
        let got = read_until_closed(&mut tcp).await;
        println!("{what}: closed after {:.3}s, {} bytes back", start.elapsed().as_secs_f64(), got.len());
        still_serving(&server).await;
    }
}
