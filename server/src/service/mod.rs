//! `frisket-server serve`: the gRPC service (frisket.v1.Frisket, grpc.health.v1.Health and
//! server reflection v1/v1alpha) in front of one worker thread per device (`--device`).
//!
//! Request flow: a handler validates the request (request.rs), queues a [`jobs::Job`] in
//! the bounded [`jobs::Queue`] (full → RESOURCE_EXHAUSTED) and returns the receiving end
//! of the job's event buffer ([`jobs::Events`]) as the response stream. The queue places
//! each job on the least-loaded worker that can take it (`Queue::take`). A worker thread
//! (worker.rs) owns its device's models, steps up to `--max-batch` jobs of one model
//! together and queues their events without ever waiting on a client: a slow client's waiting previews, latents, masks and heatmaps are
//! replaced by newer ones, and a client that reads nothing for the stalled-client time is
//! dropped. A closed stream, Cancel, the deadline, a stalled client or shutdown stop a
//! job within a fraction of a step. One connection holds at most
//! `--max-jobs-per-connection` jobs ([`clients::JobSlots`]).
//!
//! Models load when a job or LoadModel first needs them, or at startup (`--preload`: health
//! stays NOT_SERVING until those are loaded and warmed); lifecycle.rs keeps each model's
//! state per device for ListModels and its health status (`frisket.v1.Model/NAME`). Each
//! worker keeps its loaded models within `--model-memory-mib` (cache.rs), unloading the
//! least recently used ones to make room.
//!
//! Shutdown (SIGTERM or Ctrl-C): health turns NOT_SERVING and new jobs get UNAVAILABLE;
//! accepted jobs run on for up to the grace period, then whatever is left ends with
//! UNAVAILABLE; then the server stops and the process exits 0.
pub mod cache;
pub mod clients;
pub mod detached;
pub mod edges;
pub mod encoded_image;
pub mod grpc;
pub mod images;
pub mod jobs;
pub mod lifecycle;
pub mod loras;
pub mod metrics;
pub mod models;
pub mod positions;
pub mod preview;
pub mod request;
pub mod worker;

use anyhow::{Context, Result};
use frisket_engine::schedulers::PredictionType;
use frisket_engine::tch;
use frisket_proto::v1::frisket_server::FrisketServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{info, warn};

/// The API's service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "frisket.v1.Frisket";

/// Request limits (`serve --max-*`, the config file's `[limits]`), reported by
/// GetServerInfo and checked by `request::prepare`; defined with the API so that clients
/// check the same limits before sending.
pub use frisket_proto::limits::Limits;

/// What one connection may hold (`serve --stalled-client-seconds`, `--http2-keepalive-*`,
/// `--max-concurrent-streams`, `--max-jobs-per-connection`).
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// A client that takes no message of its job's stream for this long while messages
    /// wait is dropped: its job stops and its events go (a finished job's result waits
    /// this long for it).
    pub stalled_client: Duration,
    /// An HTTP/2 PING goes out after this long without a frame from the peer ...
    pub keepalive_interval: Duration,
    /// ... and a peer that does not answer one within this is disconnected.
    pub keepalive_timeout: Duration,
    /// HTTP/2 streams (calls) open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Generate jobs one connection may have queued or running at once; more get
    /// RESOURCE_EXHAUSTED.
    pub max_jobs_per_connection: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            stalled_client: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 100,
            max_jobs_per_connection: 4,
        }
    }
}

pub struct ServeConfig {
    pub models: PathBuf,
    /// The LoRA folder (`--loras`), if any.
    pub loras: Option<PathBuf>,
    /// Prediction types of single-file models (`--prediction MODEL=TYPE`).
    pub predictions: Vec<(String, PredictionType)>,
    pub listen: String,
    pub device: String,
    pub queue_capacity: usize,
    /// How the worker runs: `--max-batch`, `--model-memory-mib`, `--threads`.
    pub worker: worker::WorkerOptions,
    pub grace_period: Duration,
    pub limits: Limits,
    pub connections: ConnectionLimits,
    /// Detached jobs' kept results (`--keep-results*`).
    pub retention: detached::Retention,
    /// Where to serve Prometheus metrics at /metrics (`--metrics-listen`); None: nowhere.
    pub metrics_listen: Option<String>,
    /// Models loaded and warmed before health turns SERVING (`--preload`), in order.
    pub preload: Vec<String>,
}

/// Logs to stderr; RUST_LOG filters (default info).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        tch::Device::Mps => "mps".into(),
        tch::Device::Vulkan => "vulkan".into(),
        _ => "cpu".into(),
    }
}

/// The devices of `--device`, one worker each, with the workers' names: `auto` (CUDA
/// device 0 if there is one, else cpu), `all` (every CUDA device, else cpu), or a comma
/// list of `cpu`, `cuda` and `cuda:N`. A CUDA device may be listed once; `cpu` may repeat
/// (several CPU workers, each best given `--threads` = cores / workers), and then its
/// workers are named `cpu#0`, `cpu#1`, ...
pub fn parse_devices(spec: &str) -> Result<Vec<(tch::Device, String)>> {
    let devices: Vec<tch::Device> = match spec.trim() {
        "all" => match tch::Cuda::device_count() {
            0 => vec![tch::Device::Cpu],
            n => (0..n as usize).map(tch::Device::Cuda).collect(),
        },
        list => {
            let items: Vec<&str> = list.split(',').map(str::trim).collect();
            if items.len() > 1 && items.iter().any(|i| *i == "auto" || *i == "all") {
                anyhow::bail!("--device {spec:?}: auto and all stand alone, not in a list");
            }
            let mut devices = Vec::new();
            for item in items {
                if item.is_empty() {
                    anyhow::bail!("--device {spec:?}: an empty entry (expected e.g. cpu, cuda:0,cuda:1, all or auto)");
                }
                let device = frisket_engine::model::parse_device(item).with_context(|| format!("--device {spec:?}"))?;
                if device != tch::Device::Cpu && devices.contains(&device) {
                    anyhow::bail!("--device {spec:?}: {} is listed twice (only cpu may repeat)", device_name(device));
                }
                devices.push(device);
            }
            devices
        }
    };
    let names = devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let name = device_name(*d);
            let same = |e: &&tch::Device| device_name(**e) == name;
            match devices.iter().filter(same).count() {
                1 => name,
                _ => format!("{name}#{}", devices[..i].iter().filter(same).count()),
            }
        })
        .collect::<Vec<_>>();
    Ok(devices.into_iter().zip(names).collect())
}

/// Runs the service until SIGTERM / Ctrl-C and the drain that follows.
pub fn run(mut cfg: ServeConfig) -> Result<()> {
    init_tracing();
    let devices = parse_devices(&cfg.device)?;
    let catalog = Arc::new(
        models::Catalog::new(&cfg.models)?.with_loras(cfg.loras.as_deref())?.with_predictions(&cfg.predictions)?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("frisket-rt")
        .build()
        .context("starting the async runtime")?;
    if cfg.preload.iter().any(|n| n == "all") {
        cfg.preload = catalog.names();
    }
    for name in &cfg.preload {
        catalog.resolve(name).map_err(|e| anyhow::anyhow!("--preload: {}", e.message()))?;
    }
    let queue = Arc::new(jobs::Queue::new(cfg.queue_capacity, devices.len(), cfg.worker.max_batch));
    let (health_tx, health_rx) = tokio::sync::mpsc::unbounded_channel();
    let lifecycle = Arc::new(lifecycle::Lifecycle::new(health_tx));
    let mut workers = Vec::new();
    for (index, (device, name)) in devices.iter().enumerate() {
        let spawned = worker::spawn(
            index,
            name.clone(),
            queue.clone(),
            catalog.clone(),
            *device,
            cfg.worker.clone(),
            lifecycle.clone(),
        );
        match spawned {
            Ok(worker) => workers.push(worker),
            Err(e) => {
                queue.exit_worker();
                return Err(e).context("starting the worker threads");
            }
        }
    }
    let names: Vec<String> = devices.iter().map(|(_, name)| name.clone()).collect();
    let outcome = runtime.block_on(serve(cfg, names, catalog, queue.clone(), lifecycle, health_rx));
    queue.exit_worker();
    // The drain already waited for the jobs; a job still running here has been told to
    // stop and stops within one UNet block, attribution chunk or decoder block. The
    // process must not exit (and tear libtorch down) while a worker still uses it.
    let waiting = std::time::Instant::now();
    let mut warned = false;
    while !workers.iter().all(|w| w.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        if !warned && waiting.elapsed() >= Duration::from_secs(5) {
            warn!("still waiting for the worker threads to stop their jobs");
            warned = true;
        }
    }
    for worker in workers {
        let _ = worker.join();
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

async fn serve(
    cfg: ServeConfig,
    workers: Vec<String>,
    catalog: Arc<models::Catalog>,
    queue: Arc<jobs::Queue>,
    lifecycle: Arc<lifecycle::Lifecycle>,
    mut model_health: tokio::sync::mpsc::UnboundedReceiver<lifecycle::HealthUpdate>,
) -> Result<()> {
    let limits = cfg.limits.clone();
    let detached = Arc::new(detached::Detached::new(cfg.retention.clone()));
    let mut devices = vec!["cpu".to_string()];
    devices.extend((0..tch::Cuda::device_count()).map(|n| format!("cuda:{n}")));
    let service = grpc::FrisketService::new(
        queue.clone(),
        catalog.clone(),
        limits.clone(),
        cfg.connections.clone(),
        detached.clone(),
        workers.join(","),
        devices,
    )
    .with_lifecycle(lifecycle);
    let frisket = FrisketServer::new(service)
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);

    let (health, health_service) = tonic_health::server::health_reporter();
    let ready = if cfg.preload.is_empty() { ServingStatus::Serving } else { ServingStatus::NotServing };
    health.set_service_status("", ready).await;
    health.set_service_status(SERVICE_NAME, ready).await;
    // Per-model statuses, in the order the worker's state changes made them.
    let model_health_task = {
        let health = health.clone();
        tokio::spawn(async move {
            while let Some((name, status)) = model_health.recv().await {
                health.set_service_status(&name, status).await;
            }
        })
    };
    // Preloads: every worker loads each model, one after another, the workers side by side
    // (a job may then start on any device without a cold load); then SERVING (unless
    // shutdown began). A model that fails to load is logged and listed as FAILED on that
    // device; the others still serve.
    let preload_task = {
        let (health, queue, names) = (health.clone(), queue.clone(), cfg.preload.clone());
        tokio::spawn(async move {
            if names.is_empty() {
                return;
            }
            let mut per_worker = tokio::task::JoinSet::new();
            for worker in 0..queue.workers() {
                let (queue, names) = (queue.clone(), names.clone());
                per_worker.spawn(async move {
                    for name in names {
                        let (reply, answer) = tokio::sync::oneshot::channel();
                        queue.command(worker, lifecycle::Command::Load { model: name.clone(), reply });
                        match answer.await {
                            Ok(Ok(loaded)) => info!(model = %name, worker, seconds = loaded.seconds, "preloaded"),
                            Ok(Err(status)) => warn!(model = %name, worker, "preload failed: {}", status.message()),
                            Err(_) => return false,
                        }
                    }
                    true
                });
            }
            let finished = per_worker.join_all().await;
            if finished.into_iter().all(|done| done) && queue.is_accepting() {
                info!("preloading done: serving");
                health.set_service_status("", ServingStatus::Serving).await;
                health.set_service_status(SERVICE_NAME, ServingStatus::Serving).await;
            }
        })
    };

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(frisket_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(frisket_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;

    let listener =
        tokio::net::TcpListener::bind(&cfg.listen).await.with_context(|| format!("listening on {}", cfg.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            let _ = stream.set_nodelay(true);
        }
        conn
    });

    // Sweep the queue: waiting jobs whose client left or whose deadline passed go now.
    let sweeper = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                queue.sweep();
                detached.expire_now();
            }
        })
    };

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grace = cfg.grace_period;
    let drain = {
        let queue = queue.clone();
        let health = health.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!(grace_seconds = grace.as_secs_f64(), "shutdown requested: refusing new jobs, draining");
            queue.close();
            preload_task.abort();
            health.set_service_status("", ServingStatus::NotServing).await;
            health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
            let idle = async {
                while !queue.is_idle() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            let drained = tokio::select! {
                _ = idle => true,
                _ = tokio::time::sleep(grace) => false,
                _ = wait_for_signal() => { warn!("second signal: not waiting for the grace period"); false }
            };
            if !drained {
                warn!("grace period over: stopping the remaining jobs");
                queue.abort_all(jobs::StopReason::Shutdown);
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while !queue.is_idle() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await;
            }
            // Let the last events reach their clients before the connections close.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = stop_tx.send(());
        })
    };

    let metrics = match &cfg.metrics_listen {
        Some(at) => {
            let listener =
                tokio::net::TcpListener::bind(at).await.with_context(|| format!("metrics: listening on {at}"))?;
            let metrics_addr = listener.local_addr()?;
            println!("frisket-server metrics on http://{metrics_addr}/metrics");
            info!(addr = %metrics_addr, "serving metrics at /metrics");
            Some(tokio::spawn(metrics::serve(listener, queue.clone())))
        }
        None => None,
    };

    println!("frisket-server listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    info!(%addr, models = %cfg.models.display(), devices = %workers.join(","), queue_capacity = queue.capacity, "serving");

    let window = Some(8 << 20);
    let connections = &cfg.connections;
    let server = Server::builder()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .http2_keepalive_interval(Some(connections.keepalive_interval))
        .http2_keepalive_timeout(Some(connections.keepalive_timeout))
        .max_concurrent_streams(Some(connections.max_concurrent_streams))
        .layer(metrics::GrpcMetricsLayer)
        .layer(edges::GrpcOnlyLayer)
        .layer(tower::util::MapResponseLayer::new(limits::over_limit_is_resource_exhausted))
        .layer(tower::util::MapResponseLayer::new(edges::framing_errors_are_invalid_argument))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(frisket)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    // Connections that stay open (a client watching health, say) must not hold the exit.
    let stopped = async {
        while !drain.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    tokio::select! {
        r = server => r.context("serving")?,
        _ = stopped => warn!("connections still open after shutdown; closing them"),
    }
    sweeper.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    model_health_task.abort();
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

mod limits {
    use tonic::Status;

    /// tonic 0.14 answers a request message over `max_decoding_message_size` with
    /// OUT_OF_RANGE ("decoded message length too large"); gRPC's convention (and our
    /// API) is RESOURCE_EXHAUSTED. The error comes back as a trailers-only response, so
    /// its status is in the response headers, where this rewrites it.
    pub fn over_limit_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
        let headers = response.headers_mut();
        if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
            return response;
        }
        let Some(status) = Status::from_header_map(headers) else { return response };
        if !status.message().contains("message length too large") {
            return response;
        }
        let replacement = Status::resource_exhausted(format!("request message too large: {}", status.message()));
        headers.remove("grpc-message");
        headers.remove("grpc-status-details-bin");
        let _ = replacement.add_header(headers);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_devices, tch};

    fn names(spec: &str) -> Vec<String> {
        parse_devices(spec).unwrap().into_iter().map(|(_, name)| name).collect()
    }

    #[test]
    fn device_lists_name_each_worker_distinctly() {
        assert_eq!(names("cpu"), ["cpu"]);
        assert_eq!(names("cpu,cpu"), ["cpu#0", "cpu#1"]);
        assert_eq!(names(" cpu , cpu,cpu"), ["cpu#0", "cpu#1", "cpu#2"]);
        if tch::Cuda::device_count() == 0 {
            assert_eq!(names("all"), ["cpu"]);
            assert_eq!(names("auto"), ["cpu"]);
        }
        for bad in ["", "cpu,", "gpu", "auto,cpu", "cpu,all", "cuda:99"] {
            let err = parse_devices(bad).unwrap_err();
            assert!(format!("{err:#}").contains("--device"), "{bad:?}: {err:#}");
        }
    }
}
