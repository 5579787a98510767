//! Request bytes → the server's protobuf decoding (`frisket_proto::codec`, INVALID_ARGUMENT
//! for what does not decode) → the libtorch-free part of admission: the limits' checks,
//! the images' headers and their limited decode. The rest of `prepare` (models, schedulers, Grad-SAM options)
//! needs the server crate and libtorch; proptest covers it (server/tests/prop_request.rs).
#![no_main]
mod shared;

use frisket_proto::codec::decode_message;
use frisket_proto::v1::{CancelRequest, GenerateRequest, TokenizeRequest};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(status) = decode_message::<CancelRequest>(data) {
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().len() < 1024, "a {}-byte status", status.message().len());
    }
    let _ = decode_message::<TokenizeRequest>(data);
    let Ok(req) = decode_message::<GenerateRequest>(data) else { return };
    // The limits' checks (the same functions the server's admission and the client run).
    if let Err(status) = frisket_proto::limits::Limits::default().check_request(&req, None) {
        assert!(status.message().len() < 1024, "a {}-byte status", status.message().len());
    }
    for image in [&req.reference_image, &req.protected_mask] {
        if !image.is_empty() {
            shared::load(image);
        }
    }
});
