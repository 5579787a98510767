//! Jobs, their event streams, and the bounded queue between the gRPC handlers and the
//! worker thread.
//!
//! The queue is a bounded channel with two extras a plain channel lacks: a waiting job
//! can be taken out (Cancel, a client that left, a passed deadline) so it frees its
//! slot at once, and each new job learns how many are ahead of it.
//!
//! Each job's events go through its [`Events`] buffer, which the engine never waits on: a
//! message the client has not taken yet is replaced by a newer one of the same kind
//! ([`Replaceable`]) and counted. What waits for a slow client is bounded without a byte
//! cap: [`STREAM_SLACK`] messages, one of each replaceable kind, and the small messages
//! never dropped (Queued, Started, a Step per step, the protected mask, the final one). A
//! client that takes nothing for the stalled-client time is dropped.
use super::clients::JobSlot;
use super::detached::Journal;
use super::lifecycle::{self, Command};
use super::positions::{self, StepClock};
use super::request::JobSpec;
use frisket_proto::v1::{generate_event, GenerateEvent, MaskKind};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch, Notify};
use tokio_stream::Stream;
use tonic::Status;

pub type EventResult = Result<GenerateEvent, Status>;

/// Why a job stops before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The Generate stream was dropped (client disconnected or cancelled the call).
    ClientGone,
    /// Cancel(job_id).
    Cancelled,
    /// The request's grpc-timeout passed.
    Deadline,
    /// The server shut down before the job could finish.
    Shutdown,
    /// The client kept the stream open but took no message for the stalled-client time.
    Stalled,
}

impl StopReason {
    /// The status the stream ends with (none when nobody is listening, and none for a
    /// stalled client: its stream already holds the status that says so).
    pub fn status(self) -> Option<Status> {
        match self {
            Self::ClientGone | Self::Stalled => None,
            Self::Cancelled => Some(Status::cancelled("job cancelled by a Cancel request")),
            Self::Deadline => {
                Some(Status::deadline_exceeded("the request's deadline (grpc-timeout) passed before the job finished"))
            }
            Self::Shutdown => Some(Status::unavailable("the server shut down before the job finished")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientGone => "client left",
            Self::Cancelled => "cancelled",
            Self::Deadline => "deadline exceeded",
            Self::Shutdown => "server shutdown",
            Self::Stalled => "client stopped reading",
        }
    }
}

/// Messages at the head of a stream's buffer that are never replaced: a client that reads
/// promptly but runs a few messages behind (a busy runtime) misses nothing; replacement
/// applies to the messages waiting behind these.
pub const STREAM_SLACK: usize = 16;

/// The kinds of event a newer one of the same kind replaces while it waits for its
/// client: the client still ends with the newest of each. Heatmaps are per subject token
/// (one per subject streams at each manipulated step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replaceable {
    Preview,
    Latent,
    ManipulationMask,
    Heatmap { token_index: u32 },
}

impl Replaceable {
    /// The kind of `msg`, None for messages that are never dropped (Queued, Started, Step,
    /// the PROTECTED mask, Result, statuses).
    pub fn of(msg: &EventResult) -> Option<Self> {
        use generate_event::Event;
        match msg.as_ref().ok()?.event.as_ref()? {
            Event::Preview(_) => Some(Self::Preview),
            Event::Latent(_) => Some(Self::Latent),
            Event::Mask(m) if m.kind == MaskKind::Manipulation as i32 => Some(Self::ManipulationMask),
            Event::Heatmap(h) => Some(Self::Heatmap { token_index: h.token_index }),
            _ => None,
        }
    }
}

/// The last message of a stream: its Result, or a status.
fn is_final(msg: &EventResult) -> bool {
    match msg {
        Ok(event) => matches!(event.event, Some(generate_event::Event::Result(_))),
        Err(_) => true,
    }
}

/// A job's outgoing messages, shared by the job (which pushes) and the response stream
/// ([`EventStream`], which tonic polls as the client's HTTP/2 window allows).
pub struct Events {
    job_id: String,
    stalled_after: Duration,
    state: Mutex<Outbox>,
    /// Wakes the stall watchdog when messages start waiting or the stream ends.
    watch: Notify,
    rt: tokio::runtime::Handle,
}

#[derive(Default)]
struct Outbox {
    messages: VecDeque<(EventResult, Option<Replaceable>)>,
    /// Messages replaced by newer ones before the client took them.
    dropped: u64,
    /// The final message is queued (or the job ended without one): nothing more is taken.
    closed: bool,
    /// Results still to come before the stream ends (a WatchJob stream of a request of
    /// several images takes one per image; a job's own stream, one).
    results_left: u32,
    /// The client read nothing for the stalled-client time; its messages were dropped.
    stalled: bool,
    /// The client dropped its stream.
    gone: bool,
    /// Since when the client has taken nothing while messages wait.
    waiting_since: Option<Instant>,
    watchdog: bool,
    waker: Option<Waker>,
}

impl Events {
    pub fn new(job_id: String, stalled_after: Duration, rt: tokio::runtime::Handle) -> Arc<Self> {
        let state = Mutex::new(Outbox { results_left: 1, ..Outbox::default() });
        Arc::new(Self { job_id, stalled_after, state, watch: Notify::new(), rt })
    }

    /// The stream ends after `n` Results (or a status), not the first.
    pub fn expect_results(&self, n: u32) {
        self.lock().results_left = n.max(1);
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The response stream; tonic polls it.
    pub fn stream(self: &Arc<Self>) -> EventStream {
        EventStream { events: self.clone() }
    }

    /// Queues a message without blocking. A [`Replaceable`] message replaces the waiting
    /// one of its kind behind the first [`STREAM_SLACK`] (counted as dropped, the new one
    /// goes last: what the client gets is the stream in order, less the replaced ones).
    /// The final message carries the dropped count. Err when the client left or stalled.
    pub fn push(self: &Arc<Self>, mut msg: EventResult) -> Result<(), StopReason> {
        let mut out = self.lock();
        if out.gone {
            return Err(StopReason::ClientGone);
        }
        if out.stalled {
            return Err(StopReason::Stalled);
        }
        if out.closed {
            return Ok(());
        }
        let kind = Replaceable::of(&msg);
        if let Some(kind) = kind {
            let behind_slack = out.messages.iter().skip(STREAM_SLACK).position(|(_, k)| *k == Some(kind));
            if let Some(i) = behind_slack {
                out.messages.remove(STREAM_SLACK + i);
                out.dropped += 1;
            }
        }
        let last = match &msg {
            Ok(GenerateEvent { event: Some(generate_event::Event::Result(_)), .. }) => {
                out.results_left = out.results_left.saturating_sub(1);
                out.results_left == 0
            }
            Ok(_) => false,
            Err(_) => true,
        };
        if last {
            out.closed = true;
            let dropped = out.dropped;
            match &mut msg {
                Ok(GenerateEvent { event: Some(generate_event::Event::Result(r)), .. }) => r.dropped_events = dropped,
                Err(status) if dropped > 0 => {
                    if let Ok(value) = dropped.to_string().parse() {
                        status.metadata_mut().insert(frisket_proto::DROPPED_EVENTS_TRAILER, value);
                    }
                }
                _ => {}
            }
        }
        out.messages.push_back((msg, kind));
        if out.waiting_since.is_none() {
            out.waiting_since = Some(Instant::now());
            self.watch.notify_one();
        }
        if let Some(waker) = out.waker.take() {
            waker.wake();
        }
        if !out.watchdog {
            out.watchdog = true;
            let events = self.clone();
            self.rt.spawn(async move { events.watchdog().await });
        }
        Ok(())
    }

    /// No more messages: the stream ends after the waiting ones.
    pub fn close(&self) {
        let mut out = self.lock();
        out.closed = true;
        if let Some(waker) = out.waker.take() {
            waker.wake();
        }
        self.watch.notify_one();
    }

    pub fn client_gone(&self) -> bool {
        self.lock().gone
    }

    pub fn stalled(&self) -> bool {
        self.lock().stalled
    }

    /// Messages replaced so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Drops a client that has taken nothing for `stalled_after` while messages wait: its
    /// messages go, and one status saying so waits in their place (a client that wakes
    /// up gets it); the job stops (`Job::check_stop`).
    async fn watchdog(self: Arc<Self>) {
        loop {
            let wait = {
                let mut out = self.lock();
                if out.gone || (out.closed && out.messages.is_empty()) {
                    return;
                }
                match out.waiting_since {
                    None => None,
                    Some(since) if since.elapsed() >= self.stalled_after => {
                        out.messages.clear();
                        out.stalled = true;
                        out.closed = true;
                        out.waiting_since = None;
                        let seconds = self.stalled_after.as_secs_f64();
                        let status = Status::cancelled(format!(
                            "the client read nothing for {seconds} s (the server's stalled-client time): \
                             the job was stopped and its events dropped"
                        ));
                        out.messages.push_back((Err(status), None));
                        if let Some(waker) = out.waker.take() {
                            waker.wake();
                        }
                        drop(out);
                        tracing::warn!(
                            job_id = %self.job_id,
                            seconds,
                            "client read nothing for the stalled-client time: job stopped, its events dropped"
                        );
                        return;
                    }
                    Some(since) => Some(self.stalled_after - since.elapsed()),
                }
            };
            match wait {
                Some(wait) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.watch.notified() => {}
                    }
                }
                None => self.watch.notified().await,
            }
        }
    }
}

/// The Generate response stream: takes messages from the job's [`Events`]; dropping it
/// (the client left) stops the job.
pub struct EventStream {
    events: Arc<Events>,
}

impl Stream for EventStream {
    type Item = EventResult;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EventResult>> {
        let mut out = self.events.lock();
        match out.messages.pop_front() {
            Some((msg, _)) => {
                out.waiting_since = if out.messages.is_empty() { None } else { Some(Instant::now()) };
                Poll::Ready(Some(msg))
            }
            None if out.closed => Poll::Ready(None),
            None => {
                out.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let mut out = self.events.lock();
        out.gone = true;
        out.messages.clear();
        drop(out);
        self.events.watch.notify_one();
    }
}

pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    events: Arc<Events>,
    /// Detached jobs: their journal for WatchJob and GetResult. They run on when their
    /// Generate stream goes.
    journal: Option<Arc<Journal>>,
    /// Which image of its request this job makes, and how many the request makes.
    image: u32,
    pub images: u32,
    /// Counts the job against its client's job limit until its final message is queued.
    slot: Mutex<Option<JobSlot>>,
    stop: watch::Sender<Option<StopReason>>,
    pub deadline: Option<Instant>,
    pub accepted: Instant,
    /// Steps the job has still to run (its requested steps until the worker starts it).
    steps_left: AtomicU32,
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(journal) = &self.journal {
            // A no-op when the job sent its end, as every job does.
            journal.abandoned(self.image);
        }
        self.events.close();
    }
}

impl Job {
    pub fn new(
        id: String,
        spec: JobSpec,
        events: Arc<Events>,
        slot: Option<JobSlot>,
        deadline: Option<Instant>,
        journal: Option<Arc<Journal>>,
    ) -> Self {
        let spec_steps = u32::try_from(spec.steps).unwrap_or(u32::MAX);
        Self {
            id,
            spec,
            events,
            journal,
            image: 0,
            images: 1,
            slot: Mutex::new(slot),
            stop: watch::channel(None).0,
            deadline,
            accepted: Instant::now(),
            steps_left: AtomicU32::new(spec_steps),
        }
    }

    pub fn steps_left(&self) -> u32 {
        self.steps_left.load(Ordering::Relaxed)
    }

    /// Worker side: the job has `n` steps still to run.
    pub fn set_steps_left(&self, n: u32) {
        self.steps_left.store(n, Ordering::Relaxed);
    }

    /// Sends a message on the job's stream without blocking ([`Events::push`]). Err when
    /// the client left or stalled (the job should stop); a detached job records the
    /// message in its journal and runs on without its client, until another image of its
    /// request failed (then Err(Cancelled): the request has ended).
    pub fn push(&self, msg: EventResult) -> Result<(), StopReason> {
        let last = is_final(&msg);
        if last {
            // The client may start another job as soon as it sees this one end.
            self.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        match &self.journal {
            Some(journal) => {
                let wanted = journal.record(&msg);
                let _ = self.events.push(msg);
                if wanted || last {
                    Ok(())
                } else {
                    Err(StopReason::Cancelled)
                }
            }
            None => self.events.push(msg),
        }
    }

    pub fn detached(&self) -> bool {
        self.journal.is_some()
    }
    /// Asks the job to stop; the first reason wins. True when this call set it.
    pub fn stop(&self, reason: StopReason) -> bool {
        self.stop.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        })
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        *self.stop.borrow()
    }

    /// Watches for a stop request (for waits that must end when the job is stopped).
    pub fn stop_watch(&self) -> watch::Receiver<Option<StopReason>> {
        self.stop.subscribe()
    }

    pub fn deadline_passed(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Whether the job must stop now: asked to, its client left or stalled (not for a
    /// detached job), or its deadline passed.
    pub fn check_stop(&self) -> Option<StopReason> {
        if self.stop_reason().is_none() {
            if self.detached() {
                if self.deadline_passed() {
                    self.stop(StopReason::Deadline);
                }
            } else if self.events.client_gone() {
                self.stop(StopReason::ClientGone);
            } else if self.events.stalled() {
                self.stop(StopReason::Stalled);
            } else if self.deadline_passed() {
                self.stop(StopReason::Deadline);
            }
        }
        self.stop_reason()
    }

    pub fn event(&self, event: generate_event::Event) -> GenerateEvent {
        GenerateEvent { job_id: self.id.clone(), event: Some(event), image_index: self.image }
    }

    /// Image `index` of the `images` its request makes (`num_images`): its events carry
    /// the index.
    pub fn image(mut self, index: u32, images: u32) -> Self {
        (self.image, self.images) = (index, images);
        self
    }

    /// Ends the stream with `status`, after the messages still waiting, without blocking.
    pub fn end_with(&self, status: Status) {
        let _ = self.push(Err(status));
    }

    /// Ends the stream for `reason` (nothing to send when the client left).
    pub fn end_stopped(&self, reason: StopReason) {
        super::metrics::job_stopped(reason);
        if let Some(status) = reason.status() {
            self.end_with(status);
        }
    }
}

struct State {
    waiting: VecDeque<Arc<Job>>,
    /// The jobs the worker is stepping (several when it batches).
    running: Vec<Arc<Job>>,
    /// False once shutdown began: new jobs are refused.
    accepting: bool,
    /// The worker threads return once this is set and nothing waits.
    exit: bool,
    /// What each worker runs and holds, by worker index (placement reads it).
    workers: Vec<WorkerSlot>,
}

/// The jobs that may run together on one worker: the same model with the same LoRAs
/// (merged into it).
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub model: String,
    pub loras: Vec<(String, f32)>,
}

impl Group {
    pub fn of(spec: &JobSpec) -> Self {
        let (model, loras) = Self::parts(spec);
        Self { model: model.into(), loras: loras.map(|(name, weight)| (name.into(), weight)).collect() }
    }

    /// Whether `spec` is a job of this group (`Group::of(spec) == *self`, without building it:
    /// placement asks between UNet blocks).
    fn is_of(&self, spec: &JobSpec) -> bool {
        let (model, loras) = Self::parts(spec);
        self.model == model && self.loras.iter().map(|(name, weight)| (name.as_str(), *weight)).eq(loras)
    }

    /// A job's group, borrowed from its spec: the model, and each LoRA with its weight.
    fn parts(spec: &JobSpec) -> (&str, impl Iterator<Item = (&str, f32)>) {
        (&spec.meta.name, spec.loras.iter().map(|l| (l.name.as_str(), l.weight)))
    }
}

/// One worker as placement sees it.
#[derive(Default)]
struct WorkerSlot {
    /// Jobs it runs (taken and not finished).
    running: usize,
    /// The group of the jobs it runs; None when it runs none.
    group: Option<Group>,
    /// The models it has loaded.
    loaded: Vec<String>,
    /// Model loads and unloads for it, taken before jobs.
    commands: VecDeque<Command>,
}

pub struct Queue {
    state: Mutex<State>,
    wake: Condvar,
    pub capacity: usize,
    /// Most jobs one worker steps together (`--max-batch`).
    max_batch: usize,
    /// Recent seconds per worker step, for the waiting jobs' start estimates.
    pub clock: StepClock,
}

/// What [`Queue::take`] gave the worker.
pub enum Taken {
    Job(Arc<Job>),
    /// Nothing to start now.
    None,
    /// Shutdown: nothing runs or waits.
    Exit,
    /// A model load or unload, to do before the next job.
    Command(Command),
}

#[derive(Debug)]
pub enum PushError {
    Full,
    ShuttingDown,
    DuplicateId,
}

impl Queue {
    /// A queue for `workers` workers that step up to `max_batch` jobs each.
    pub fn new(capacity: usize, workers: usize, max_batch: usize) -> Self {
        Self {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                running: Vec::new(),
                accepting: true,
                exit: false,
                workers: (0..workers.max(1)).map(|_| WorkerSlot::default()).collect(),
            }),
            wake: Condvar::new(),
            capacity,
            max_batch: max_batch.max(1),
            clock: StepClock::default(),
        }
    }

    fn pace<'a>(&'a self, s: &State) -> positions::Pace<'a> {
        positions::Pace { clock: &self.clock, workers: s.workers.len() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a request's jobs (one per image, sharing an id) and sends each its Queued
    /// event (before the engine can see it, so Queued always comes first). The capacity
    /// counts requests, so a request of several images fits whenever one does. Returns
    /// the number of jobs ahead of the first.
    pub fn push(&self, jobs: Vec<Arc<Job>>) -> Result<u32, PushError> {
        let mut s = self.lock();
        self.sweep_locked(&mut s);
        if !s.accepting {
            return Err(PushError::ShuttingDown);
        }
        let Some(id) = jobs.first().map(|j| j.id.clone()) else { return Ok(0) };
        let same_id = |j: &Arc<Job>| j.id == id;
        if s.waiting.iter().any(same_id) || s.running.iter().any(same_id) {
            return Err(PushError::DuplicateId);
        }
        let waiting_requests =
            s.waiting.iter().enumerate().filter(|(i, j)| *i == 0 || s.waiting[i - 1].id != j.id).count();
        if waiting_requests >= self.capacity {
            return Err(PushError::Full);
        }
        let first = s.waiting.len();
        for job in jobs {
            let queued = positions::queued(s.waiting.len(), &s.waiting, &s.running, self.pace(&s));
            let _ = job.push(Ok(job.event(generate_event::Event::Queued(queued))));
            s.waiting.push_back(job);
        }
        drop(s);
        self.wake.notify_all();
        Ok(first as u32)
    }

    /// Drops waiting jobs whose client left or whose deadline passed; the jobs behind them
    /// hear their new positions.
    fn sweep_locked(&self, s: &mut State) {
        let (mut index, mut first_gone) = (0, None);
        s.waiting.retain(|job| {
            let kept = match job.check_stop() {
                None => true,
                Some(reason) => {
                    tracing::info!(job_id = %job.id, reason = reason.as_str(), "queued job dropped");
                    job.end_stopped(reason);
                    false
                }
            };
            if !kept && first_gone.is_none() {
                first_gone = Some(index);
            }
            index += 1;
            kept
        });
        if let Some(from) = first_gone {
            positions::announce(from, &s.waiting, &s.running, self.pace(s));
        }
    }

    pub fn sweep(&self) {
        let mut s = self.lock();
        let before = s.waiting.len();
        self.sweep_locked(&mut s);
        let changed = s.waiting.len() != before;
        drop(s);
        if changed {
            self.wake.notify_all();
        }
    }

    /// Engine side, for worker `worker`: the first waiting job, if this worker is where it
    /// goes (see [`Queue::placed`]). A worker that runs nothing waits for one; a busy
    /// worker gets `Taken::None` at once. Jobs start in the order they came: only the
    /// first waiting job is ever placed. `Taken::Exit` when the worker should return.
    pub fn take(&self, worker: usize) -> Taken {
        let mut s = self.lock();
        loop {
            if let Some(command) = s.workers[worker].commands.pop_front() {
                return Taken::Command(command);
            }
            self.sweep_locked(&mut s);
            let idle = s.workers[worker].running == 0;
            match s.waiting.front() {
                Some(job) if self.placed(&s, worker, &job.spec) => {
                    let job = s.waiting.pop_front().expect("a front job");
                    let slot = &mut s.workers[worker];
                    slot.running += 1;
                    slot.group.get_or_insert_with(|| Group::of(&job.spec));
                    s.running.push(job.clone());
                    positions::announce(0, &s.waiting, &s.running, self.pace(&s));
                    drop(s);
                    self.wake.notify_all();
                    return Taken::Job(job);
                }
                None if s.exit && s.running.is_empty() => return Taken::Exit,
                _ if !idle => return Taken::None,
                _ => {}
            }
            s = self.wake.wait_timeout(s, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Engine side: whether `worker`, while it runs jobs, has a waiting job that its next
    /// [`Queue::take`] would give it (the first waiting job, placed on it and not stopped).
    /// Called between UNet blocks: a worker stops its running jobs' step for such a job
    /// (see `worker`), so this holds the lock only to look.
    pub fn has_joiner(&self, worker: usize) -> bool {
        let s = self.lock();
        s.workers[worker].running > 0
            && s.waiting.front().is_some_and(|job| job.check_stop().is_none() && self.placed(&s, worker, &job.spec))
    }

    /// Placement: whether `worker` takes the first waiting job, `spec`. The workers
    /// that can take it now are those that run fewer than `--max-batch` jobs and run none
    /// or only jobs of its group; of those, the job goes to one with the fewest running
    /// jobs, and among equally loaded ones to one that has its model loaded. Any such
    /// worker takes it, so a job waits only while every worker is full or busy with
    /// another group, and each of those wakes the queue when a job ends.
    fn placed(&self, s: &State, worker: usize, spec: &JobSpec) -> bool {
        let rank = |slot: &WorkerSlot| -> Option<(usize, bool)> {
            let fits = slot.running < self.max_batch && slot.group.as_ref().is_none_or(|g| g.is_of(spec));
            fits.then(|| (slot.running, !slot.loaded.contains(&spec.meta.name)))
        };
        let Some(mine) = rank(&s.workers[worker]) else { return false };
        s.workers.iter().filter_map(rank).all(|other| mine <= other)
    }

    /// Engine side: `job`, run by `worker`, is done (it no longer counts as running).
    pub fn finish(&self, worker: usize, job: &Arc<Job>) {
        let mut s = self.lock();
        s.running.retain(|j| !Arc::ptr_eq(j, job));
        let slot = &mut s.workers[worker];
        slot.running = slot.running.saturating_sub(1);
        if slot.running == 0 {
            slot.group = None;
        }
        drop(s);
        self.wake.notify_all();
    }

    /// Engine side: the models `worker` has loaded now.
    pub fn set_loaded(&self, worker: usize, models: Vec<String>) {
        self.lock().workers[worker].loaded = models;
        self.wake.notify_all();
    }

    /// How many workers take from this queue.
    pub fn workers(&self) -> usize {
        self.lock().workers.len()
    }

    /// Where LoadModel goes: a worker that has `model` loaded, else the one with the
    /// fewest running jobs (the first of equals).
    pub fn load_worker(&self, model: &str) -> usize {
        let s = self.lock();
        let rank = |(_, slot): &(usize, &WorkerSlot)| (!slot.loaded.iter().any(|m| m == model), slot.running);
        s.workers.iter().enumerate().min_by_key(rank).map_or(0, |(i, _)| i)
    }

    /// Cancel(job_id): the request's waiting jobs leave the queue now, its running ones
    /// stop before their next step. False when no such job is queued or running.
    pub fn cancel(&self, id: &str) -> bool {
        let mut s = self.lock();
        let first_waiting = s.waiting.iter().position(|j| j.id == id);
        let mut removed = Vec::new();
        if let Some(first) = first_waiting {
            s.waiting.retain(|j| {
                let keep = j.id != id;
                if !keep {
                    removed.push(j.clone());
                }
                keep
            });
            positions::announce(first, &s.waiting, &s.running, self.pace(&s));
        }
        let mut found = !removed.is_empty();
        for job in s.running.iter().filter(|j| j.id == id) {
            job.stop(StopReason::Cancelled);
            found = true;
        }
        drop(s);
        for job in removed {
            job.stop(StopReason::Cancelled);
            job.end_stopped(StopReason::Cancelled);
        }
        self.wake.notify_all();
        found
    }

    /// The queued or running job with this id.
    pub fn find(&self, id: &str) -> Option<Arc<Job>> {
        let s = self.lock();
        s.waiting.iter().chain(&s.running).find(|j| j.id == id).cloned()
    }

    /// (waiting, running) job counts.
    pub fn counts(&self) -> (u32, u32) {
        let s = self.lock();
        (s.waiting.len() as u32, s.running.len() as u32)
    }

    /// Refuses new jobs from now on.
    pub fn close(&self) {
        self.lock().accepting = false;
    }

    pub fn is_accepting(&self) -> bool {
        self.lock().accepting
    }

    pub fn is_idle(&self) -> bool {
        let s = self.lock();
        s.waiting.is_empty() && s.running.is_empty()
    }

    /// Stops every job: waiting ones end now, running ones inside their step.
    pub fn abort_all(&self, reason: StopReason) {
        let mut s = self.lock();
        let waiting: Vec<_> = s.waiting.drain(..).collect();
        for job in &s.running {
            job.stop(reason);
        }
        drop(s);
        for job in waiting {
            job.stop(reason);
            job.end_stopped(reason);
        }
        self.wake.notify_all();
    }

    /// Gives `worker` a model load or unload (it answers on the command's reply).
    pub fn command(&self, worker: usize, command: Command) {
        self.lock().workers[worker].commands.push_back(command);
        self.wake.notify_all();
    }

    /// UnloadModel: an unload command for every worker, all queued at once, unless a
    /// running job uses `model` (then the refusal, and no worker unloads it). A worker does
    /// its commands before it takes a job, so none starts a job of `model` in between:
    /// the model is unloaded everywhere or nowhere.
    pub fn unload_everywhere(&self, model: &str) -> Result<Vec<oneshot::Receiver<Result<bool, Status>>>, Status> {
        let mut s = self.lock();
        let users = s.running.iter().filter(|j| j.spec.meta.name == model).count();
        if users > 0 {
            return Err(lifecycle::in_use(model, users));
        }
        let answers = s
            .workers
            .iter_mut()
            .map(|slot| {
                let (reply, answer) = oneshot::channel();
                slot.commands.push_back(Command::Unload { model: model.to_string(), reply });
                answer
            })
            .collect();
        drop(s);
        self.wake.notify_all();
        Ok(answers)
    }

    /// Engine side: the next command waiting for `worker`, if any.
    pub fn next_command(&self, worker: usize) -> Option<Command> {
        self.lock().workers[worker].commands.pop_front()
    }

    /// Lets the worker threads return once no job waits.
    pub fn exit_worker(&self) {
        self.lock().exit = true;
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use frisket_proto::v1::{
        generate_event::Event, Heatmap, Latent, Mask, Preview, Result as JobResult, Started, Step,
    };
    use tokio_stream::StreamExt;

    fn event(event: Event) -> EventResult {
        Ok(GenerateEvent { job_id: "j".into(), event: Some(event), ..Default::default() })
    }

    fn preview(step: u32) -> EventResult {
        event(Event::Preview(Preview { step, ..Default::default() }))
    }

    fn latent(step: u32) -> EventResult {
        event(Event::Latent(Latent { step, ..Default::default() }))
    }

    fn step(index: u32) -> EventResult {
        event(Event::Step(Step { index, ..Default::default() }))
    }

    fn heatmap(step: u32, token_index: u32) -> EventResult {
        event(Event::Heatmap(Heatmap { step, token_index, ..Default::default() }))
    }

    /// A short name for each message, e.g. "preview 3", "heatmap 3/5", "status".
    fn name(msg: &EventResult) -> String {
        match msg.as_ref().map(|e| e.event.clone().unwrap()) {
            Ok(Event::Queued(_)) => "queued".into(),
            Ok(Event::Started(_)) => "started".into(),
            Ok(Event::Step(s)) => format!("step {}", s.index),
            Ok(Event::Preview(p)) => format!("preview {}", p.step),
            Ok(Event::Latent(l)) => format!("latent {}", l.step),
            Ok(Event::Heatmap(h)) => format!("heatmap {}/{}", h.step, h.token_index),
            Ok(Event::Mask(m)) => format!("mask {} {}", m.kind, m.step),
            Ok(Event::Result(r)) => format!("result dropped={}", r.dropped_events),
            Ok(Event::Loading(l)) => format!("loading {}", l.model),
            Err(s) => format!("status {:?}", s.code()),
        }
    }

    async fn read_all(events: &Arc<Events>) -> Vec<String> {
        let mut stream = events.stream();
        let mut names = Vec::new();
        while let Some(msg) = stream.next().await {
            names.push(name(&msg));
        }
        names
    }

    /// Fills the slack at the head of the buffer with Steps (never replaced).
    fn fill_slack(events: &Arc<Events>) -> Vec<String> {
        (0..STREAM_SLACK as u32).map(|i| events.push(step(i)).map(|()| format!("step {i}")).unwrap()).collect()
    }

    #[tokio::test]
    async fn a_waiting_event_is_replaced_by_a_newer_one_of_its_kind() {
        let events = Events::new("j".into(), Duration::from_secs(60), tokio::runtime::Handle::current());
        let mut expected = fill_slack(&events);
        events.push(event(Event::Started(Started::default()))).unwrap();
        for s in 100..105 {
            events.push(latent(s)).unwrap();
            events.push(step(s)).unwrap();
            events.push(preview(s)).unwrap();
            for token in [2, 5] {
                events.push(heatmap(s, token)).unwrap();
            }
        }
        let manipulation =
            |step| event(Event::Mask(Mask { step, kind: MaskKind::Manipulation as i32, ..Default::default() }));
        let protected = event(Event::Mask(Mask { kind: MaskKind::Protected as i32, ..Default::default() }));
        events.push(protected).unwrap();
        events.push(manipulation(1)).unwrap();
        events.push(manipulation(2)).unwrap();
        // 4 older of each of latent, preview and both heatmap tokens, 1 mask.
        assert_eq!(events.dropped(), 4 * 4 + 1);
        events.push(event(Event::Result(JobResult::default()))).unwrap();
        // Pushes after the final message are ignored.
        events.push(preview(999)).unwrap();

        expected.extend(["started", "step 100", "step 101", "step 102", "step 103"].map(String::from));
        expected.extend(
            ["latent 104", "step 104", "preview 104", "heatmap 104/2", "heatmap 104/5", "mask 1 0", "mask 0 2"]
                .map(String::from),
        );
        expected.push("result dropped=17".into());
        assert_eq!(read_all(&events).await, expected);
    }

    #[tokio::test]
    async fn nothing_is_replaced_within_the_slack_or_for_a_client_that_keeps_up() {
        let events = Events::new("j".into(), Duration::from_secs(60), tokio::runtime::Handle::current());
        let mut stream = events.stream();
        for s in 0..40 {
            events.push(preview(s)).unwrap();
            assert_eq!(name(&stream.next().await.unwrap()), format!("preview {s}"));
        }
        for s in 40..40 + STREAM_SLACK as u32 {
            events.push(preview(s)).unwrap();
        }
        events.push(Err(Status::cancelled("stop"))).unwrap();
        assert_eq!(events.dropped(), 0);
        let mut rest = Vec::new();
        while let Some(msg) = stream.next().await {
            if let Err(status) = &msg {
                assert!(status.metadata().get(frisket_proto::DROPPED_EVENTS_TRAILER).is_none());
            }
            rest.push(name(&msg));
        }
        let mut expected: Vec<String> = (40..40 + STREAM_SLACK as u32).map(|s| format!("preview {s}")).collect();
        expected.push("status Cancelled".into());
        assert_eq!(rest, expected);
    }

    #[tokio::test]
    async fn a_final_status_carries_the_dropped_count_in_a_trailer() {
        let events = Events::new("j".into(), Duration::from_secs(60), tokio::runtime::Handle::current());
        fill_slack(&events);
        for s in 0..3 {
            events.push(preview(s)).unwrap();
        }
        events.push(Err(Status::unavailable("shutting down"))).unwrap();
        let mut stream = events.stream();
        let mut last = None;
        while let Some(msg) = stream.next().await {
            last = Some(msg);
        }
        let status = last.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let trailer = status.metadata().get(frisket_proto::DROPPED_EVENTS_TRAILER).unwrap();
        assert_eq!(trailer.to_str().unwrap(), "2");
    }

    #[tokio::test]
    async fn a_client_that_takes_nothing_is_dropped_with_a_status() {
        let events = Events::new("j".into(), Duration::from_millis(50), tokio::runtime::Handle::current());
        let mut stream = events.stream();
        events.push(step(0)).unwrap();
        assert_eq!(name(&stream.next().await.unwrap()), "step 0");
        events.push(step(1)).unwrap();
        events.push(event(Event::Result(JobResult::default()))).unwrap();
        let waiting = Instant::now();
        while !events.stalled() {
            assert!(waiting.elapsed() < Duration::from_secs(30), "never dropped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(events.push(step(2)), Err(StopReason::Stalled));
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Cancelled);
        assert!(status.message().contains("read nothing for 0.05 s"), "{}", status.message());
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_dropped_stream_tells_the_job_its_client_left() {
        let events = Events::new("j".into(), Duration::from_secs(30), tokio::runtime::Handle::current());
        drop(events.stream());
        assert!(events.client_gone());
        assert_eq!(events.push(step(0)), Err(StopReason::ClientGone));
    }
}
