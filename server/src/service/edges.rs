//! The HTTP/2 edge in front of the services: requests that are not gRPC and gRPC framing
//! errors get the status that says whose fault they are.
//!
//! tonic reads a request's gRPC framing before our codec sees any bytes, and reports a
//! message cut short, a missing message or an unknown compressed flag as INTERNAL; all are
//! the sender's fault: INVALID_ARGUMENT. The one framing error gRPC's compression spec
//! pins to INTERNAL (the compressed flag without a grpc-encoding) stays INTERNAL. These
//! errors come back as trailers-only responses, so their status is in the response
//! headers, where [`framing_errors_are_invalid_argument`] rewrites it.
use http::{HeaderValue, Request, Response, StatusCode};
use std::task::{Context, Poll};
use tonic::Status;

/// tonic's messages for framing errors that are the sender's fault, and what to say instead.
const SENDER_FRAMING_ERRORS: &[(&str, &str)] = &[
    (
        "Unexpected EOF decoding stream",
        "the request ended inside a message (its length prefix declares more bytes than were sent)",
    ),
    ("Missing request message", "the request carried no message"),
    ("invalid compression flag", "a message's compressed flag is neither 0 nor 1"),
];

/// Rewrites tonic's INTERNAL for a sender's framing error to INVALID_ARGUMENT.
pub fn framing_errors_are_invalid_argument<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"13") {
        return response;
    }
    let Some(status) = Status::from_header_map(headers) else { return response };
    let Some((_, said)) = SENDER_FRAMING_ERRORS.iter().find(|(tonic_says, _)| status.message().contains(tonic_says))
    else {
        return response;
    };
    headers.remove("grpc-message");
    headers.remove("grpc-status-details-bin");
    let _ = Status::invalid_argument(format!("malformed gRPC request: {said}")).add_header(headers);
    response
}

/// tonic answers a method no service has with UNIMPLEMENTED and no message; this names it.
fn name_unknown_method<B>(response: &mut Response<B>, path: &str) {
    let headers = response.headers_mut();
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"12") || headers.contains_key("grpc-message") {
        return;
    }
    let status = Status::unimplemented(format!("unknown method {}", frisket_engine::text::quote(path)));
    let _ = status.add_header(headers);
}

/// Whether a request's content-type is gRPC's (`application/grpc`, optionally `+proto` or
/// `;…`).
fn is_grpc(content_type: Option<&HeaderValue>) -> bool {
    content_type.and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.strip_prefix("application/grpc").is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
    })
}

/// Answers a request whose content-type is not gRPC with HTTP 415, as gRPC over HTTP/2
/// asks of servers (so a plain HTTP client does not take the reply for success), plus a
/// grpc-status INVALID_ARGUMENT naming the content-type for gRPC clients; names the
/// method in tonic's UNIMPLEMENTED for an unknown one.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcOnlyLayer;

impl<S> tower::Layer<S> for GrpcOnlyLayer {
    type Service = GrpcOnly<S>;
    fn layer(&self, inner: S) -> GrpcOnly<S> {
        GrpcOnly(inner)
    }
}

#[derive(Clone, Debug)]
pub struct GrpcOnly<S>(S);

impl<S, B> tower::Service<Request<B>> for GrpcOnly<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let content_type = request.headers().get(http::header::CONTENT_TYPE);
        if is_grpc(content_type) {
            let path = request.uri().path().to_string();
            let response = self.0.call(request);
            return Box::pin(async move {
                let mut response = response.await?;
                name_unknown_method(&mut response, &path);
                Ok(response)
            });
        }
        let shown = match content_type {
            Some(v) => frisket_engine::text::quote(&String::from_utf8_lossy(v.as_bytes())),
            None => "missing".to_string(),
        };
        let status = Status::invalid_argument(format!("content-type {shown} is not gRPC (application/grpc)"));
        let mut response = status.into_http::<tonic::body::Body>();
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        Box::pin(std::future::ready(Ok(response)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types() {
        for ok in ["application/grpc", "application/grpc+proto", "application/grpc;charset=utf-8"] {
            assert!(is_grpc(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        for bad in ["application/json", "application/grpcx", "text/plain", ""] {
            assert!(!is_grpc(Some(&HeaderValue::from_static(bad))), "{bad}");
        }
        assert!(!is_grpc(None));
    }

    #[test]
    fn only_sender_framing_errors_are_rewritten() {
        let rewrite = |status: Status| {
            let response = framing_errors_are_invalid_argument(status.into_http::<()>());
            Status::from_header_map(response.headers()).unwrap()
        };
        let cut = rewrite(Status::internal("Unexpected EOF decoding stream."));
        assert_eq!(cut.code(), tonic::Code::InvalidArgument);
        assert!(cut.message().contains("ended inside a message"), "{}", cut.message());
        let flag = Status::internal("protocol error: received message with compressed-flag but no grpc-encoding");
        assert_eq!(rewrite(flag).code(), tonic::Code::Internal);
        assert_eq!(rewrite(Status::internal("the engine failed")).code(), tonic::Code::Internal);
        assert_eq!(rewrite(Status::not_found("Missing request message.")).code(), tonic::Code::NotFound);
    }
}
