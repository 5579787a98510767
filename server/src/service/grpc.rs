//! The `frisket.v1.Frisket` gRPC service.
use super::clients::{ClientKey, JobSlots};
use super::detached::Detached;
use super::images::ImagesStream;
use super::jobs::{EventResult, EventStream, Events, Job, PushError, Queue};
use super::lifecycle::{Command, Lifecycle};
use super::models::Catalog;
use super::request::{self, prepare, JobSpec};
use super::{ConnectionLimits, Limits};
use frisket_engine::text::quote;
use frisket_proto::defaults;
use frisket_proto::v1::frisket_server::Frisket;
use frisket_proto::v1::{
    CancelRequest, CancelResponse, GenerateRequest, GetResultRequest, GetServerInfoRequest, ListModelsRequest,
    ListModelsResponse, LoadModelRequest, LoadModelResponse, ModelInfo, Result as JobResult, ServerInfo, Token,
    TokenizeRequest, TokenizeResponse, UnloadModelRequest, UnloadModelResponse, WatchJobRequest,
};
use prost::Message;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

pub struct FrisketService {
    pub queue: Arc<Queue>,
    pub catalog: Arc<Catalog>,
    pub limits: Limits,
    pub connections: ConnectionLimits,
    /// Jobs per connection, against `connections.max_jobs_per_connection`.
    slots: Arc<JobSlots>,
    /// Detached jobs' journals and kept results.
    pub detached: Arc<Detached>,
    pub device: String,
    pub devices: Vec<String>,
    next_id: AtomicU64,
    /// The models' states (ListModels); the worker writes them.
    lifecycle: Arc<Lifecycle>,
}

impl FrisketService {
    pub fn new(
        queue: Arc<Queue>,
        catalog: Arc<Catalog>,
        limits: Limits,
        connections: ConnectionLimits,
        detached: Arc<Detached>,
        device: String,
        devices: Vec<String>,
    ) -> Self {
        let slots = JobSlots::new(connections.max_jobs_per_connection as usize);
        Self {
            queue,
            catalog,
            limits,
            connections,
            slots,
            detached,
            device,
            devices,
            next_id: AtomicU64::new(1),
            lifecycle: Arc::default(),
        }
    }

    /// Reports the models' states from `lifecycle` (the worker's).
    pub fn with_lifecycle(mut self, lifecycle: Arc<Lifecycle>) -> Self {
        self.lifecycle = lifecycle;
        self
    }

    /// Gives the worker `command` for an existing model and waits for its answer without
    /// holding a thread.
    async fn command<T>(
        &self,
        worker: usize,
        model: &str,
        command: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, Status>>) -> Command,
    ) -> Result<T, Status> {
        self.commandable(model).await?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue.command(worker, command(reply));
        answer.await.map_err(|_| shutting_down())?
    }

    /// Whether a LoadModel / UnloadModel for `model` may go to the workers: the model
    /// exists and the server is not shutting down.
    async fn commandable(&self, model: &str) -> Result<(), Status> {
        let catalog = self.catalog.clone();
        let name = model.to_string();
        blocking(move || catalog.resolve(&name)).await?;
        if !self.queue.is_accepting() {
            return Err(shutting_down());
        }
        Ok(())
    }

    /// Why WatchJob or GetResult cannot follow `id`: it runs without detach, or no such
    /// job is known (never was, or its result expired).
    fn not_detached(&self, id: &str) -> Status {
        match self.queue.find(id) {
            Some(_) => Status::failed_precondition(format!(
                "job {id:?} runs without detach: its Generate stream is its only stream"
            )),
            None => Status::not_found(format!(
                "no detached job {id:?} (unknown, or its result expired after {} s)",
                self.detached.retention.keep.as_secs_f64()
            )),
        }
    }

    fn new_job_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("job-{n}-{:08x}", request::random_seed() as u32)
    }
}

/// The `grpc-timeout` header (gRPC over HTTP/2: up to 8 digits and a unit H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn deadline_of<T>(req: &Request<T>, received: Instant) -> Option<Instant> {
    let value = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    match parse_grpc_timeout(value) {
        Some(d) => Some(received + d),
        None => {
            warn!(value, "ignoring malformed grpc-timeout header");
            None
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("worker failed: {e}")))?
}

#[tonic::async_trait]
impl Frisket for FrisketService {
    type GenerateStream = Pin<Box<dyn Stream<Item = EventResult> + Send>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let received = Instant::now();
        if !self.queue.is_accepting() {
            return Err(Status::unavailable("the server is shutting down and accepts no new jobs"));
        }
        let deadline = deadline_of(&request, received);
        // Taken before the request is validated, so a flood of jobs on one connection costs
        // the server nothing past its limit. A connection without an address (none over
        // TCP) is not counted.
        let slot = match request.remote_addr() {
            Some(addr) => match self.slots.acquire(ClientKey::Connection(addr)) {
                Ok(slot) => Some(slot),
                Err(limit) => {
                    debug!(%addr, limit, "job refused: the connection holds its limit of jobs");
                    return Err(Status::resource_exhausted(format!(
                        "this connection already has {limit} jobs queued or running, the server's limit per \
                         connection; wait for one to end or open another connection"
                    )));
                }
            },
            None => None,
        };
        let req = request.into_inner();
        self.limits.check_message(req.encoded_len())?;
        if req.detach && self.detached.retention.keep.is_zero() {
            return Err(Status::invalid_argument(
                "detach is off on this server (it keeps no results: --keep-results 0)",
            ));
        }
        let images = defaults::num_images(&req);
        let job_id = if req.job_id.is_empty() { self.new_job_id() } else { req.job_id.clone() };
        let detach = req.detach;
        let (catalog, limits) = (self.catalog.clone(), self.limits.clone());
        let spec = blocking(move || prepare(&req, &catalog, &limits, request::random_seed())).await;
        let spec = match spec {
            Ok(spec) => spec,
            Err(status) => {
                info!(job_id = %quote(&job_id), code = ?status.code(), message = ?status.message(), "request refused");
                return Err(status);
            }
        };
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Status::deadline_exceeded("the request's deadline passed before the job was queued"));
        }
        let already_exists =
            || Status::already_exists(format!("a job with id {job_id:?} is already queued, running or kept"));
        // A kept detached job's id stays taken, so WatchJob and GetResult name one job.
        let journal = match detach {
            true => Some(self.detached.register(&job_id, images).ok_or_else(already_exists)?),
            false if self.detached.get(&job_id).is_some() => return Err(already_exists()),
            false => None,
        };
        let new_events =
            || Events::new(job_id.clone(), self.connections.stalled_client, tokio::runtime::Handle::current());
        let (jobs, stream): (_, Self::GenerateStream) = if images == 1 {
            let events = new_events();
            let stream = Box::pin(events.stream());
            (vec![Arc::new(Job::new(job_id.clone(), spec, events, slot, deadline, journal.clone()))], stream)
        } else {
            let (mut jobs, mut streams) = (Vec::new(), Vec::new());
            for index in 0..images {
                let spec = JobSpec { seed: defaults::image_seed(spec.seed, index), ..spec.clone() };
                let events = new_events();
                streams.push(events.stream());
                let job = Job::new(job_id.clone(), spec, events, None, deadline, journal.clone());
                jobs.push(Arc::new(job.image(index, images)));
            }
            (jobs, Box::pin(ImagesStream::new(streams, slot)))
        };
        let pushed = self.queue.push(jobs);
        if let (Err(_), Some(journal)) = (&pushed, &journal) {
            self.detached.unregister(journal);
        }
        match pushed {
            Ok(position) => {
                info!(job_id = %job_id, position, detach, images, "job queued");
                Ok(Response::new(stream))
            }
            Err(PushError::Full) => {
                info!(job_id = %job_id, "queue full, job refused");
                Err(Status::resource_exhausted(format!(
                    "the job queue is full ({} waiting); retry later",
                    self.queue.capacity
                )))
            }
            Err(PushError::ShuttingDown) => {
                Err(Status::unavailable("the server is shutting down and accepts no new jobs"))
            }
            Err(PushError::DuplicateId) => Err(already_exists()),
        }
    }

    type WatchJobStream = EventStream;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = request.into_inner().job_id;
        request::check_job_id(&id)?;
        let journal = self.detached.get(&id).ok_or_else(|| self.not_detached(&id))?;
        let events = Events::new(id.clone(), self.connections.stalled_client, tokio::runtime::Handle::current());
        events.expect_results(journal.images());
        let stream = events.stream();
        journal.attach(&events);
        info!(job_id = %id, "watching a detached job");
        Ok(Response::new(stream))
    }

    async fn get_result(&self, request: Request<GetResultRequest>) -> Result<Response<JobResult>, Status> {
        let GetResultRequest { job_id: id, image_index } = request.into_inner();
        request::check_job_id(&id)?;
        let journal = self.detached.get(&id).ok_or_else(|| self.not_detached(&id))?;
        journal.result(image_index).map(Response::new)
    }

    async fn tokenize(&self, request: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        let req = request.into_inner();
        self.limits.check_prompts(&req.prompt, "")?;
        let catalog = self.catalog.clone();
        blocking(move || {
            let tok = catalog.tokenizer(&req.model)?;
            let infos = tok.tokens(&req.prompt);
            // The tokenizer keeps max_length tokens; a full list whose last word does not
            // end the prompt was cut.
            let full = infos.len() >= tok.max_length();
            let truncated = full && {
                let last = infos.iter().rev().find(|t| t.word.is_some());
                let prompt = req.prompt.to_lowercase();
                !last.is_some_and(|t| {
                    t.text.ends_with("</w>") && t.word.as_deref().is_some_and(|w| prompt.trim_end().ends_with(w))
                })
            };
            let tokens = infos
                .into_iter()
                .map(|t| Token {
                    index: t.position as u32,
                    id: t.id,
                    text: t.text,
                    word: t.word.unwrap_or_default(),
                    word_index: t.word_index.map(|w| w as u32),
                })
                .collect();
            Ok(Response::new(TokenizeResponse { tokens, truncated, max_length: tok.max_length() as u32 }))
        })
        .await
    }

    async fn list_models(&self, _request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let catalog = self.catalog.clone();
        let (models, loras) = blocking(move || {
            let listed = catalog.list();
            let usable: Vec<&std::path::Path> =
                listed.iter().filter_map(|l| l.meta.as_ref().ok().map(|m| m.dir.as_path())).collect();
            let mut fitting = catalog.loras().fitting(&usable).into_iter();
            let models: Vec<_> = listed
                .into_iter()
                .map(|l| (if l.meta.is_ok() { fitting.next().unwrap_or_default() } else { Vec::new() }, l))
                .collect();
            Ok((models, catalog.loras().names()))
        })
        .await?;
        let lifecycle = self.lifecycle.clone();
        let models = models
            .into_iter()
            .map(|(fitting, listed)| (lifecycle.report(&listed.name), fitting, listed))
            .map(|((state, devices, failed), fitting, listed)| match listed.meta {
                Ok(m) => ModelInfo {
                    name: m.name,
                    architecture: m.family.name().to_string(),
                    native_width: m.native_width,
                    native_height: m.native_height,
                    size_multiple: m.size_multiple,
                    prediction_type: m.prediction_type,
                    // Every model accepts every scheduler name (GenerateRequest.scheduler).
                    schedulers: frisket_engine::schedulers::NAMES.iter().map(|s| s.to_string()).collect(),
                    img2img: true,
                    explain: true,
                    protected_regions: true,
                    error: failed.unwrap_or_default(),
                    format: m.format.name().to_string(),
                    loras: fitting,
                    state: state as i32,
                    devices,
                },
                Err(error) => ModelInfo {
                    name: listed.name,
                    error,
                    format: listed.format.name().to_string(),
                    state: frisket_proto::v1::ModelState::Failed as i32,
                    ..Default::default()
                },
            })
            .collect();
        Ok(Response::new(ListModelsResponse { models, loras }))
    }

    async fn get_server_info(&self, _request: Request<GetServerInfoRequest>) -> Result<Response<ServerInfo>, Status> {
        let (queued, running) = self.queue.counts();
        let mut info = ServerInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            devices: self.devices.clone(),
            device: self.device.clone(),
            queue_capacity: self.queue.capacity as u32,
            queued_jobs: queued,
            running_jobs: running,
            max_jobs_per_connection: self.slots.limit() as u32,
            stalled_client_seconds: self.connections.stalled_client.as_secs_f64(),
            keep_results_seconds: self.detached.retention.keep.as_secs_f64(),
            keep_results_count: self.detached.retention.max_count as u32,
            keep_results_bytes: self.detached.retention.max_bytes,
            ..Default::default()
        };
        self.limits.report(&mut info);
        Ok(Response::new(info))
    }

    async fn cancel(&self, request: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        let id = request.into_inner().job_id;
        request::check_job_id(&id)?;
        let found = self.queue.cancel(&id);
        // Unknown ids cost no log at the default level, so a flood of Cancels cannot grow
        // the log; a cancelled job's own lines record its end.
        if found {
            info!(job_id = %id, found, "cancel requested");
        } else {
            debug!(job_id = %id, "cancel of an unknown job");
        }
        Ok(Response::new(CancelResponse { found }))
    }

    async fn load_model(&self, request: Request<LoadModelRequest>) -> Result<Response<LoadModelResponse>, Status> {
        let model = request.into_inner().model;
        let worker = self.queue.load_worker(&model);
        let loaded = self.command(worker, &model, |reply| Command::Load { model: model.clone(), reply }).await?;
        Ok(Response::new(LoadModelResponse { devices: loaded.devices, load_seconds: loaded.seconds }))
    }

    async fn unload_model(
        &self,
        request: Request<UnloadModelRequest>,
    ) -> Result<Response<UnloadModelResponse>, Status> {
        let model = request.into_inner().model;
        self.commandable(&model).await?;
        let mut was_loaded = false;
        for answer in self.queue.unload_everywhere(&model)? {
            was_loaded |= answer.await.map_err(|_| shutting_down())??;
        }
        info!(model = %model, was_loaded, "unload requested");
        Ok(Response::new(UnloadModelResponse { was_loaded }))
    }
}

fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down")
}

#[cfg(test)]
mod tests {
    use super::parse_grpc_timeout;
    use std::time::Duration;

    #[test]
    fn grpc_timeout_header() {
        assert_eq!(parse_grpc_timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "12x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
