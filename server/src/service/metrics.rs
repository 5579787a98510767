//! Prometheus metrics: every gRPC call (go-grpc-prometheus's names and labels, counted by
//! a tower layer in front of every service, so refusals at the edge count too) and the
//! worker's own figures. Recorded always (a counter bump is cheap); served as Prometheus
//! text at `/metrics` on its own port when `serve --metrics-listen ADDR` is given.
//!
//! The worker reports through the free functions here ([`step_batch`], [`step_yielded`], [`first_preview`],
//! [`model_loaded`], [`model_evicted`], [`loaded_model_bytes`], [`job_ended`]; [`job_stopped`] from `Job::end_stopped`, which every
//! job that stops early goes through, waiting or running); queue depth, running jobs and
//! resident memory are read when scraped.
use super::jobs::{Queue, StopReason};
use http::{Request, Response};
use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use prost::Message;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;
use tracing::{info, warn};

/// Buckets of `grpc_server_handling_seconds`: go-grpc-prometheus's defaults, extended to
/// the minutes a Generate stream can last.
const HANDLING_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];
/// Buckets of the per-step and per-job times (a step on a small CPU model takes
/// milliseconds, on SD 1.5 at 512 px on a CPU tens of seconds).
const SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
/// Buckets of the step batch size (`--max-batch` is at most 64).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0];

/// The labels go-grpc-prometheus gives a method.
const GRPC_LABELS: &[&str] = &["grpc_type", "grpc_service", "grpc_method"];

pub struct Metrics {
    registry: Registry,
    grpc_started: IntCounterVec,
    grpc_handled: IntCounterVec,
    grpc_handling: HistogramVec,
    queue_waiting: IntGauge,
    running_jobs: IntGauge,
    jobs: IntCounterVec,
    batch_size: Histogram,
    step_seconds: Histogram,
    step_yields: IntCounter,
    step_yield_seconds: Counter,
    first_preview_seconds: Histogram,
    model_load_seconds: Histogram,
    model_evictions: IntCounterVec,
    loaded_model_bytes: IntGaugeVec,
    device_running_jobs: IntGaugeVec,
    resident_memory: IntGauge,
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid histogram")
}

impl Metrics {
    fn new() -> Self {
        let grpc_started = IntCounterVec::new(
            Opts::new("grpc_server_started_total", "Total number of RPCs started on the server."),
            GRPC_LABELS,
        )
        .expect("valid counter");
        let grpc_handled = IntCounterVec::new(
            Opts::new(
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
            ),
            &[GRPC_LABELS, &["grpc_code"]].concat(),
        )
        .expect("valid counter");
        let grpc_handling = HistogramVec::new(
            HistogramOpts::new(
                "grpc_server_handling_seconds",
                "Histogram of response latency (seconds) of gRPC that had been application-level handled by \
                 the server.",
            )
            .buckets(HANDLING_BUCKETS.to_vec()),
            GRPC_LABELS,
        )
        .expect("valid histogram");
        let queue_waiting =
            IntGauge::new("frisket_queue_waiting_jobs", "Generate jobs waiting in the queue.").expect("valid gauge");
        let running_jobs =
            IntGauge::new("frisket_running_jobs", "Generate jobs the workers are running, all devices together.")
                .expect("valid gauge");
        let jobs = IntCounterVec::new(
            Opts::new(
                "frisket_jobs_total",
                "Generate jobs ended after they were queued, by outcome: ok, failed, or why the job \
                 stopped (cancelled, client_gone, deadline, stalled_client, shutdown).",
            ),
            &["outcome"],
        )
        .expect("valid counter");
        let batch_size = histogram(
            "frisket_step_batch_size",
            "Jobs stepped together in one batched UNet step (one per step and latent size).",
            BATCH_BUCKETS,
        );
        let step_seconds = histogram(
            "frisket_step_seconds",
            "Seconds one batched step took, its jobs' events included.",
            SECONDS_BUCKETS,
        );
        let step_yields = IntCounter::new(
            "frisket_step_yields_total",
            "Batched steps stopped before any job moved, so that a new job could take its first step.",
        )
        .expect("valid counter");
        let step_yield_seconds = Counter::new(
            "frisket_step_yield_seconds_total",
            "Seconds the stopped steps had run: work done again when they are made again.",
        )
        .expect("valid counter");
        let first_preview_seconds = histogram(
            "frisket_time_to_first_preview_seconds",
            "Seconds from a job's acceptance to its first preview being queued for its client.",
            SECONDS_BUCKETS,
        );
        let model_load_seconds =
            histogram("frisket_model_load_seconds", "Seconds loading a model onto its device took.", SECONDS_BUCKETS);
        let model_evictions = IntCounterVec::new(
            Opts::new(
                "frisket_model_evictions_total",
                "Models unloaded to make room for another within the model memory budget (--model-memory-mib).",
            ),
            &["device"],
        )
        .expect("valid counter");
        let loaded_model_bytes = IntGaugeVec::new(
            Opts::new("frisket_loaded_model_bytes", "Bytes of the weight tensors of the models loaded on a device."),
            &["device"],
        )
        .expect("valid gauge");
        let device_running_jobs = IntGaugeVec::new(
            Opts::new("frisket_device_running_jobs", "Generate jobs a device's worker is running (its batch)."),
            &["device"],
        )
        .expect("valid gauge");
        let resident_memory =
            IntGauge::new("process_resident_memory_bytes", "Resident memory size in bytes.").expect("valid gauge");

        let registry = Registry::new();
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(grpc_started.clone()),
            Box::new(grpc_handled.clone()),
            Box::new(grpc_handling.clone()),
            Box::new(queue_waiting.clone()),
            Box::new(running_jobs.clone()),
            Box::new(jobs.clone()),
            Box::new(batch_size.clone()),
            Box::new(step_seconds.clone()),
            Box::new(step_yields.clone()),
            Box::new(step_yield_seconds.clone()),
            Box::new(first_preview_seconds.clone()),
            Box::new(model_load_seconds.clone()),
            Box::new(model_evictions.clone()),
            Box::new(loaded_model_bytes.clone()),
            Box::new(device_running_jobs.clone()),
            Box::new(resident_memory.clone()),
        ];
        for c in collectors {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            grpc_started,
            grpc_handled,
            grpc_handling,
            queue_waiting,
            running_jobs,
            jobs,
            batch_size,
            step_seconds,
            step_yields,
            step_yield_seconds,
            first_preview_seconds,
            model_load_seconds,
            model_evictions,
            loaded_model_bytes,
            device_running_jobs,
            resident_memory,
        }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// One batched step of `size` jobs took `seconds`.
pub fn step_batch(size: usize, seconds: f64) {
    METRICS.batch_size.observe(size as f64);
    METRICS.step_seconds.observe(seconds);
}

/// A batched step was stopped after `seconds` for a new job's first step.
pub fn step_yielded(seconds: f64) {
    METRICS.step_yields.inc();
    METRICS.step_yield_seconds.inc_by(seconds);
}

/// A job's first preview went out `seconds` after the job was accepted.
pub fn first_preview(seconds: f64) {
    METRICS.first_preview_seconds.observe(seconds);
}

/// A model loaded in `seconds`.
pub fn model_loaded(seconds: f64) {
    METRICS.model_load_seconds.observe(seconds);
}

/// A model on `device` was unloaded to make room for another.
pub fn model_evicted(device: &str) {
    METRICS.model_evictions.with_label_values(&[device]).inc();
}

/// The models loaded on `device` hold `bytes` of weights now (also makes the device's
/// eviction count visible from 0).
pub fn loaded_model_bytes(device: &str, bytes: u64) {
    METRICS.model_evictions.with_label_values(&[device]);
    METRICS.loaded_model_bytes.with_label_values(&[device]).set(bytes.try_into().unwrap_or(i64::MAX));
}

/// `device`'s worker runs `jobs` jobs now.
pub fn device_running_jobs(device: &str, jobs: usize) {
    METRICS.device_running_jobs.with_label_values(&[device]).set(jobs.try_into().unwrap_or(i64::MAX));
}

/// The worker ended a job with its result ("ok") or an error status ("failed").
pub fn job_ended(outcome: &str) {
    METRICS.jobs.with_label_values(&[outcome]).inc();
}

/// A job (waiting or running) stopped before its result was delivered.
pub fn job_stopped(reason: StopReason) {
    job_ended(match reason {
        StopReason::ClientGone => "client_gone",
        StopReason::Cancelled => "cancelled",
        StopReason::Deadline => "deadline",
        StopReason::Shutdown => "shutdown",
        StopReason::Stalled => "stalled_client",
    });
}

/// This process's resident set (VmRSS in /proc/self/status), where the OS tells.
fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: i64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// The Prometheus text exposition of every metric, the gauges read now.
pub fn render(queue: &Queue) -> String {
    let (waiting, running) = queue.counts();
    METRICS.queue_waiting.set(waiting.into());
    METRICS.running_jobs.set(running.into());
    if let Some(rss) = resident_bytes() {
        METRICS.resident_memory.set(rss);
    }
    let mut text = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&METRICS.registry.gather(), &mut text) {
        warn!("encoding metrics failed: {e}");
    }
    String::from_utf8(text).unwrap_or_default()
}

/// Serves `render` at `/metrics` over HTTP/1.1 on `listener` until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, queue: Arc<Queue>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!("metrics listener: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let queue = queue.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let queue = queue.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &queue)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                info!("metrics connection: {e}");
            }
        });
    }
}

fn answer<B>(req: &Request<B>, queue: &Queue) -> Response<String> {
    let reply = |status: http::StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let value = http::HeaderValue::from_str(content_type).expect("a valid content type");
        response.headers_mut().insert(http::header::CONTENT_TYPE, value);
        response
    };
    if req.uri().path() != "/metrics" {
        return reply(http::StatusCode::NOT_FOUND, "text/plain", "only /metrics is served here\n".into());
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return reply(http::StatusCode::METHOD_NOT_ALLOWED, "text/plain", "/metrics answers GET\n".into());
    }
    reply(http::StatusCode::OK, prometheus::TEXT_FORMAT, render(queue))
}

/// A method's labels: (grpc_type, grpc_service, grpc_method).
type MethodLabels = [String; 3];

/// Every served method by its path (`/package.Service/Method`), read from the services'
/// file descriptor sets, so a method added to the proto is labelled without a change here.
static METHODS: LazyLock<HashMap<String, Arc<MethodLabels>>> = LazyLock::new(|| {
    let sets: [&[u8]; 4] = [
        frisket_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = HashMap::new();
    for set in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else { continue };
        for file in &set.file {
            for service in &file.service {
                let service_name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let kind = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => "unary",
                        (true, false) => "client_stream",
                        (false, true) => "server_stream",
                        (true, true) => "bidi_stream",
                    };
                    let labels = [kind.to_string(), service_name.clone(), method.name().to_string()];
                    methods.insert(format!("/{service_name}/{}", method.name()), Arc::new(labels));
                }
            }
        }
    }
    methods
});

/// Labels of a path no service has: one series for all of them, whatever a client sends.
static UNKNOWN_METHOD: LazyLock<Arc<MethodLabels>> =
    LazyLock::new(|| Arc::new(["unknown".into(), "unknown".into(), "unknown".into()]));

/// gRPC's name for a status code, as grpc-go spells it (go-grpc-prometheus's `grpc_code`).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers.get("grpc-status").map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// One call being counted: started on creation, handled once with its code.
struct Call {
    labels: Arc<MethodLabels>,
    began: Instant,
    handled: bool,
}

impl Call {
    fn start(path: &str) -> Self {
        let labels = METHODS.get(path).cloned().unwrap_or_else(|| UNKNOWN_METHOD.clone());
        METRICS.grpc_started.with_label_values(&labels[..]).inc();
        Self { labels, began: Instant::now(), handled: false }
    }

    fn handled(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.handled, true) {
            return;
        }
        let labels = &self.labels;
        METRICS.grpc_handled.with_label_values(&[&labels[0], &labels[1], &labels[2], code_name(code)]).inc();
        METRICS.grpc_handling.with_label_values(&labels[..]).observe(self.began.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    /// A response dropped before its status went out: the client went away (reset the
    /// stream or closed the connection), which gRPC reports as CANCELLED.
    fn drop(&mut self) {
        self.handled(tonic::Code::Cancelled);
    }
}

/// Counts every call through the services behind it (outermost, so it sees the status the
/// client gets): `grpc_server_started_total` when the request arrives, and when its status
/// goes out (in the response headers for a trailers-only answer, else in the trailers at
/// the end of the response stream) `grpc_server_handled_total` and
/// `grpc_server_handling_seconds`.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics(inner)
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetrics<S>(S);

impl<S, B> tower::Service<Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let mut call = Call::start(request.uri().path());
        let response = self.0.call(request);
        Box::pin(async move {
            let response = match response.await {
                Ok(response) => response,
                Err(e) => {
                    call.handled(tonic::Code::Internal);
                    return Err(e);
                }
            };
            if let Some(code) = grpc_status(response.headers()) {
                call.handled(code);
                return Ok(response);
            }
            Ok(response.map(|body| tonic::body::Body::new(CountedBody { body, call })))
        })
    }
}

/// A response body that counts its call handled when its trailers (or its end) go out.
struct CountedBody {
    body: tonic::body::Body,
    call: Call,
}

impl http_body::Body for CountedBody {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.call.handled(code);
                }
            }
            Poll::Ready(Some(Err(status))) => self.call.handled(status.code()),
            // A gRPC response that ends without a status is a broken one.
            Poll::Ready(None) => self.call.handled(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_come_from_the_descriptor_sets() {
        let generate = &METHODS["/frisket.v1.Frisket/Generate"];
        assert_eq!(generate.as_slice(), ["server_stream", "frisket.v1.Frisket", "Generate"]);
        let cancel = &METHODS["/frisket.v1.Frisket/Cancel"];
        assert_eq!(cancel[0], "unary");
        assert_eq!(METHODS["/grpc.health.v1.Health/Watch"][0], "server_stream");
        assert_eq!(METHODS["/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"][0], "bidi_stream");
    }

    #[test]
    fn code_names_are_grpc_go_s() {
        assert_eq!(code_name(tonic::Code::Cancelled), "Canceled");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "InvalidArgument");
        assert_eq!(code_name(tonic::Code::Ok), "OK");
    }
}
