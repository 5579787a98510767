//! Frisket client library: a typed async API over the gRPC stubs of
//! `proto/frisket/v1/frisket.proto`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), frisket::Error> {
//! use frisket::{Client, Event, GenerateRequestBuilder};
//! use tokio_stream::StreamExt;
//!
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//! let request = GenerateRequestBuilder::new("sd1", "a yellow star").seed(42).steps(8).build();
//! let mut events = client.generate(request).await?;
//! while let Some(event) = events.next().await {
//!     match event?.event {
//!         Event::Step(s) => println!("step {}/{}", s.index + 1, s.total),
//!         Event::Result(r) => std::fs::write("out.png", &r.image).unwrap(),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
pub use frisket_proto as proto;

pub mod dump;
pub mod events;
pub mod request;
pub mod tensor;

pub use events::{Event, GenerateResult, JobEvent, MaskKind};
pub use request::GenerateRequestBuilder;
pub use tensor::{DType, Tensor};

use proto::v1 as pb;
use proto::v1::frisket_client::FrisketClient;
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio_stream::Stream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;

/// Largest message either way (results, previews and latents of big images).
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
/// The CLI's default server address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// What can go wrong talking to a Frisket server.
#[derive(Debug)]
pub enum Error {
    /// The server (or the transport under a call) answered with a gRPC status.
    Status { code: tonic::Code, message: String },
    /// The server could not be reached.
    Connect { url: String, message: String },
    /// Bad input from the caller: an invalid URL, an unreadable or undecodable file.
    InvalidInput(String),
    /// A local file could not be written.
    Io { path: PathBuf, source: std::io::Error },
    /// The server broke the protocol (a malformed tensor, a stream without a result).
    Protocol(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }

    /// The gRPC status code, for [`Error::Status`].
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A short upper-case name: the canonical gRPC code name (`INVALID_ARGUMENT`, ...) for
    /// statuses, `UNAVAILABLE` for an unreachable server, `INVALID_INPUT`, `IO` or
    /// `PROTOCOL` for client-side failures.
    pub fn code_name(&self) -> &'static str {
        match self {
            Error::Status { code, .. } => code_name(*code),
            Error::Connect { .. } => "UNAVAILABLE",
            Error::InvalidInput(_) => "INVALID_INPUT",
            Error::Io { .. } => "IO",
            Error::Protocol(_) => "PROTOCOL",
        }
    }

    /// The message without the code.
    pub fn message(&self) -> String {
        match self {
            Error::Status { message, .. } => message.clone(),
            Error::Connect { url, message } => format!("cannot connect to {url}: {message}"),
            Error::InvalidInput(m) | Error::Protocol(m) => m.clone(),
            Error::Io { path, source } => format!("{}: {source}", path.display()),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code_name(), self.message())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        let mut message = s.message().to_string();
        if let Some(n) = s.metadata().get(frisket_proto::DROPPED_EVENTS_TRAILER).and_then(|v| v.to_str().ok()) {
            message
                .push_str(&format!(" ({n} progress events were replaced by newer ones while this client was behind)"));
        }
        Error::Status { code: s.code(), message }
    }
}

/// The canonical name of a gRPC code (`tonic::Code`'s Display is a description instead).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A message with its causes: "transport error: tcp connect error: Connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// Health of a service (grpc.health.v1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    Unknown,
    Serving,
    NotServing,
    ServiceUnknown,
}

impl HealthStatus {
    pub fn name(self) -> &'static str {
        match self {
            HealthStatus::Unknown => "UNKNOWN",
            HealthStatus::Serving => "SERVING",
            HealthStatus::NotServing => "NOT_SERVING",
            HealthStatus::ServiceUnknown => "SERVICE_UNKNOWN",
        }
    }
}

/// A connection to a Frisket server. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    frisket: FrisketClient<Channel>,
    health: HealthClient<Channel>,
}

impl Client {
    /// Connects to `http://host:port` (a bare `host:port` gets `http://`), failing fast
    /// with [`Error::Connect`] when nothing listens there.
    pub async fn connect(url: impl AsRef<str>) -> Result<Self, Error> {
        let url = url.as_ref().trim();
        let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Error::InvalidInput(format!("invalid server URL {url:?}: {}", error_chain(&e))))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        let channel =
            endpoint.connect().await.map_err(|e| Error::Connect { url: url.clone(), message: error_chain(&e) })?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps an existing channel (e.g. a lazily connected one).
    pub fn from_channel(channel: Channel) -> Self {
        let frisket = FrisketClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let health = HealthClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Client { frisket, health }
    }

    /// The underlying generated client, for anything this API does not wrap.
    pub fn raw(&self) -> FrisketClient<Channel> {
        self.frisket.clone()
    }

    /// Starts a job, after checking it against the server's limits ([`Client::check_limits`]):
    /// a request over one is refused here with the status the server would give, and is
    /// never sent. The stream yields the job's events and ends after the last `Result` event (one per image); a
    /// failed job ends with an [`Error::Status`] item. Dropping the stream cancels the job.
    pub async fn generate(&self, request: pb::GenerateRequest) -> Result<EventStream, Error> {
        self.check_limits(&request).await?;
        self.generate_unchecked(request).await
    }

    /// Checks `request` against the limits the server reports (GetServerInfo) and its
    /// model (ListModels, for the default size and the latent factor of the work budget),
    /// with the server's own checks (`proto::limits`): INVALID_ARGUMENT (RESOURCE_EXHAUSTED
    /// for the message size) naming the limit and the value, as the server would answer.
    pub async fn check_limits(&self, request: &pb::GenerateRequest) -> Result<(), Error> {
        let limits = proto::limits::Limits::from_server_info(&self.server_info().await?);
        let models = self.list_models().await?;
        let model = models.iter().find(|m| m.name == request.model);
        limits.check_request(request, model).map_err(Error::from)
    }

    /// Starts a job without checking it first: the server's own checks decide.
    pub async fn generate_unchecked(&self, request: pb::GenerateRequest) -> Result<EventStream, Error> {
        let job_id = (!request.job_id.is_empty()).then(|| request.job_id.clone());
        let results_left = proto::defaults::num_images(&request);
        let inner = self.frisket.clone().generate(request).await?.into_inner();
        Ok(EventStream { inner, job_id, results_left: Some(results_left), done: false })
    }

    /// Follows a detached job (started with `detach`) from this connection: its latest
    /// state (every image's, with `num_images`), then its live events and its end.
    /// Dropping this stream leaves the job running.
    pub async fn watch_job(&self, job_id: &str) -> Result<EventStream, Error> {
        let req = pb::WatchJobRequest { job_id: job_id.to_string() };
        let inner = self.frisket.clone().watch_job(req).await?.into_inner();
        Ok(EventStream { inner, job_id: Some(job_id.to_string()), results_left: None, done: false })
    }

    /// The result of image `image_index` (0 for a single image) of a detached job that
    /// ended (kept for the server's `keep_results_seconds`); NOT_FOUND once it expired,
    /// OUT_OF_RANGE past the job's images.
    pub async fn get_result(&self, job_id: &str, image_index: u32) -> Result<GenerateResult, Error> {
        let req = pb::GetResultRequest { job_id: job_id.to_string(), image_index };
        Ok(self.frisket.clone().get_result(req).await?.into_inner().into())
    }

    /// The prompt's tokens with their positions (0 is the start token).
    pub async fn tokenize(&self, model: &str, prompt: &str) -> Result<pb::TokenizeResponse, Error> {
        let req = pb::TokenizeRequest { model: model.to_string(), prompt: prompt.to_string() };
        Ok(self.frisket.clone().tokenize(req).await?.into_inner())
    }

    pub async fn list_models(&self) -> Result<Vec<pb::ModelInfo>, Error> {
        Ok(self.frisket.clone().list_models(pb::ListModelsRequest {}).await?.into_inner().models)
    }

    pub async fn server_info(&self) -> Result<pb::ServerInfo, Error> {
        Ok(self.frisket.clone().get_server_info(pb::GetServerInfoRequest {}).await?.into_inner())
    }

    /// grpc.health.v1 Check of `service` ("" for the server as a whole).
    pub async fn health(&self, service: &str) -> Result<HealthStatus, Error> {
        use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
        let resp = self.health.clone().check(HealthCheckRequest { service: service.to_string() }).await?;
        Ok(match ServingStatus::try_from(resp.into_inner().status) {
            Ok(ServingStatus::Serving) => HealthStatus::Serving,
            Ok(ServingStatus::NotServing) => HealthStatus::NotServing,
            Ok(ServingStatus::ServiceUnknown) => HealthStatus::ServiceUnknown,
            _ => HealthStatus::Unknown,
        })
    }

    /// Loads (and warms) `model` on the server unless it is loaded; answers once it is.
    pub async fn load_model(&self, model: &str) -> Result<pb::LoadModelResponse, Error> {
        Ok(self.frisket.clone().load_model(pb::LoadModelRequest { model: model.to_string() }).await?.into_inner())
    }

    /// Frees `model` on the server; `false` when it was not loaded. FAILED_PRECONDITION
    /// while a running job uses it.
    pub async fn unload_model(&self, model: &str) -> Result<bool, Error> {
        let req = pb::UnloadModelRequest { model: model.to_string() };
        Ok(self.frisket.clone().unload_model(req).await?.into_inner().was_loaded)
    }

    /// Stops a queued or running job; `false` when no such job is queued or running.
    pub async fn cancel(&self, job_id: &str) -> Result<bool, Error> {
        Ok(self.frisket.clone().cancel(pb::CancelRequest { job_id: job_id.to_string() }).await?.into_inner().found)
    }
}

/// The events of one job (a [`tokio_stream::Stream`] of `Result<JobEvent, Error>`).
///
/// Ends after the last `Result` event (one per image, `num_images`). A stream that ends without one yields a final
/// [`Error::Protocol`]; a failed job yields its [`Error::Status`]. Events of kinds this
/// client does not know are skipped.
pub struct EventStream {
    inner: tonic::Streaming<pb::GenerateEvent>,
    job_id: Option<String>,
    /// Results still to come (one per image); a watcher learns the count from the first
    /// Started.
    results_left: Option<u32>,
    done: bool,
}

impl EventStream {
    /// The job's id: the requested one, else the server's once the first event arrived.
    pub fn job_id(&self) -> Option<&str> {
        self.job_id.as_deref()
    }

    /// Consumes the stream up to the result (of image 0 for a request of several images).
    pub async fn result(self) -> Result<GenerateResult, Error> {
        Ok(self.results().await?.swap_remove(0))
    }

    /// Consumes the stream up to its end: one result per image, in image order.
    pub async fn results(mut self) -> Result<Vec<GenerateResult>, Error> {
        use tokio_stream::StreamExt;
        let mut results = Vec::new();
        while let Some(item) = self.next().await {
            let event = item?;
            if let Event::Result(r) = event.event {
                results.push((event.image_index, *r));
            }
        }
        if results.is_empty() {
            return Err(Error::Protocol("stream ended without a result".into()));
        }
        results.sort_by_key(|(index, _)| *index);
        Ok(results.into_iter().map(|(_, r)| r).collect())
    }
}

impl Stream for EventStream {
    type Item = Result<JobEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let polled = Pin::new(&mut self.inner).poll_next(cx);
            let item = match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::Protocol("the event stream ended without a result".into()))));
                }
                Poll::Ready(Some(Err(status))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(status.into())));
                }
                Poll::Ready(Some(Ok(event))) => event,
            };
            match JobEvent::from_proto(item) {
                Ok(None) => continue,
                Ok(Some(event)) => {
                    if self.job_id.is_none() && !event.job_id.is_empty() {
                        self.job_id = Some(event.job_id.clone());
                    }
                    match &event.event {
                        Event::Started(s) if self.results_left.is_none() => {
                            self.results_left = Some(s.num_images.max(1));
                        }
                        Event::Result(_) => {
                            let left = self.results_left.unwrap_or(1).saturating_sub(1);
                            self.results_left = Some(left);
                            self.done = left == 0;
                        }
                        _ => {}
                    }
                    return Poll::Ready(Some(Ok(event)));
                }
                Err(e) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}
