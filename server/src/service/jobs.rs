//! Jobs and the bounded queue between the gRPC handlers and the worker thread.
//!
//! The queue is a bounded channel with two extras a plain channel lacks: a waiting job
//! can be taken out (Cancel, a client that left, a passed deadline) so it frees its
//! slot at once, and each new job learns how many are ahead of it.
use super::request::JobSpec;
use frisket_proto::v1::{generate_event, GenerateEvent, Queued};
use prost::Message;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
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
    /// The client kept the stream open but stopped reading it ([`STALLED_CLIENT`] without
    /// taking a message, or [`MAX_UNREAD_BYTES`] waiting for it).
    Stalled,
}

impl StopReason {
    /// The status the stream ends with (none when nobody is listening).
    pub fn status(self) -> Option<Status> {
        match self {
            Self::ClientGone => None,
            Self::Cancelled => Some(Status::cancelled("job cancelled by a Cancel request")),
            Self::Deadline => {
                Some(Status::deadline_exceeded("the request's deadline (grpc-timeout) passed before the job finished"))
            }
            Self::Shutdown => Some(Status::unavailable("the server shut down before the job finished")),
            Self::Stalled => Some(Status::cancelled("the client stopped reading the event stream")),
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

/// How long a message may wait for a client that keeps its stream open but reads nothing
/// before the job is stopped as stalled. The engine never waits for it: messages the
/// stream's buffer cannot take queue behind it (`Job::push`).
pub const STALLED_CLIENT: Duration = Duration::from_secs(60);

/// The most bytes of a job's messages that may wait for its client beyond the stream's
/// buffer; past it the job is stopped as stalled.
pub const MAX_UNREAD_BYTES: usize = 256 << 20;

pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    events: mpsc::Sender<EventResult>,
    /// Messages waiting for room in `events`, in order, and a task feeding them to it.
    unread: Mutex<Unread>,
    stop: watch::Sender<Option<StopReason>>,
    pub deadline: Option<Instant>,
    pub accepted: Instant,
    rt: tokio::runtime::Handle,
}

#[derive(Default)]
struct Unread {
    messages: VecDeque<(EventResult, usize)>,
    bytes: usize,
    /// A task is feeding `messages` to the stream.
    draining: bool,
}

impl Job {
    pub fn new(
        id: String,
        spec: JobSpec,
        events: mpsc::Sender<EventResult>,
        deadline: Option<Instant>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            id,
            spec,
            events,
            unread: Mutex::new(Unread::default()),
            stop: watch::channel(None).0,
            deadline,
            accepted: Instant::now(),
            rt,
        }
    }

    /// Sends a message on the job's stream without blocking: when the stream's buffer is
    /// full it waits, in order, behind the ones already waiting, and a task hands them to
    /// the stream as the client reads. Err when the client left, or when its unread
    /// messages pass [`MAX_UNREAD_BYTES`] (the job should stop).
    pub fn push(self: &Arc<Self>, msg: EventResult) -> Result<(), StopReason> {
        let mut unread = self.unread.lock().unwrap_or_else(|p| p.into_inner());
        let msg = if unread.draining {
            msg
        } else {
            match self.events.try_send(msg) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(StopReason::ClientGone),
                Err(mpsc::error::TrySendError::Full(msg)) => msg,
            }
        };
        let size = match &msg {
            Ok(event) => event.encoded_len(),
            Err(status) => status.message().len(),
        };
        unread.bytes += size;
        unread.messages.push_back((msg, size));
        if !unread.draining {
            unread.draining = true;
            let job = self.clone();
            self.rt.spawn(async move { job.drain().await });
        }
        if unread.bytes > MAX_UNREAD_BYTES {
            return Err(StopReason::Stalled);
        }
        Ok(())
    }

    /// Hands the waiting messages to the stream in order; gives up (the job stopped) when
    /// the client left or took nothing for [`STALLED_CLIENT`].
    async fn drain(&self) {
        loop {
            let msg = {
                let mut unread = self.unread.lock().unwrap_or_else(|p| p.into_inner());
                match unread.messages.pop_front() {
                    Some((msg, size)) => {
                        unread.bytes -= size;
                        msg
                    }
                    None => {
                        unread.draining = false;
                        return;
                    }
                }
            };
            let reason = match tokio::time::timeout(STALLED_CLIENT, self.events.send(msg)).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => StopReason::ClientGone,
                Err(_) => StopReason::Stalled,
            };
            self.stop(reason);
            let mut unread = self.unread.lock().unwrap_or_else(|p| p.into_inner());
            *unread = Unread::default();
            return;
        }
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

    /// Whether the job must stop now: asked to, its client left, or its deadline passed.
    pub fn check_stop(&self) -> Option<StopReason> {
        if self.stop_reason().is_none() {
            if self.events.is_closed() {
                self.stop(StopReason::ClientGone);
            } else if self.deadline_passed() {
                self.stop(StopReason::Deadline);
            }
        }
        self.stop_reason()
    }

    pub fn event(&self, event: generate_event::Event) -> GenerateEvent {
        GenerateEvent { job_id: self.id.clone(), event: Some(event) }
    }

    /// Ends the stream with `status`, after the messages still waiting, without blocking.
    pub fn end_with(self: &Arc<Self>, status: Status) {
        let _ = self.push(Err(status));
    }

    /// Ends the stream for `reason` (nothing to send when the client left).
    pub fn end_stopped(self: &Arc<Self>, reason: StopReason) {
        if let Some(status) = reason.status() {
            self.end_with(status);
        }
    }
}

struct State {
    waiting: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    /// False once shutdown began: new jobs are refused.
    accepting: bool,
    /// The worker thread returns once this is set and nothing waits.
    exit: bool,
}

pub struct Queue {
    state: Mutex<State>,
    wake: Condvar,
    pub capacity: usize,
}

#[derive(Debug)]
pub enum PushError {
    Full,
    ShuttingDown,
    DuplicateId,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State { waiting: VecDeque::new(), running: None, accepting: true, exit: false }),
            wake: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job and sends its Queued event (before the engine can see it, so Queued
    /// always comes first). Returns the number of jobs ahead.
    pub fn push(&self, job: Arc<Job>) -> Result<u32, PushError> {
        let mut s = self.lock();
        Self::sweep_locked(&mut s);
        if !s.accepting {
            return Err(PushError::ShuttingDown);
        }
        let same_id = |j: &Arc<Job>| j.id == job.id;
        if s.waiting.iter().any(same_id) || s.running.as_ref().is_some_and(same_id) {
            return Err(PushError::DuplicateId);
        }
        if s.waiting.len() >= self.capacity {
            return Err(PushError::Full);
        }
        let position = s.waiting.len() as u32;
        let _ = job.push(Ok(job.event(generate_event::Event::Queued(Queued { position }))));
        s.waiting.push_back(job);
        drop(s);
        self.wake.notify_all();
        Ok(position)
    }

    /// Drops waiting jobs whose client left or whose deadline passed.
    fn sweep_locked(s: &mut State) {
        s.waiting.retain(|job| match job.check_stop() {
            None => true,
            Some(reason) => {
                tracing::info!(job_id = %job.id, reason = reason.as_str(), "queued job dropped");
                job.end_stopped(reason);
                false
            }
        });
    }

    pub fn sweep(&self) {
        let mut s = self.lock();
        let before = s.waiting.len();
        Self::sweep_locked(&mut s);
        let changed = s.waiting.len() != before;
        drop(s);
        if changed {
            self.wake.notify_all();
        }
    }

    /// Engine side: the next job to run (it becomes the running one), or None when the
    /// engine should exit.
    pub fn next(&self) -> Option<Arc<Job>> {
        let mut s = self.lock();
        s.running = None;
        self.wake.notify_all();
        loop {
            Self::sweep_locked(&mut s);
            if let Some(job) = s.waiting.pop_front() {
                s.running = Some(job.clone());
                return Some(job);
            }
            if s.exit {
                return None;
            }
            s = self.wake.wait_timeout(s, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Engine side: the running job is done.
    pub fn finish(&self) {
        self.lock().running = None;
        self.wake.notify_all();
    }

    /// Cancel(job_id): a waiting job leaves the queue now, a running one stops before its
    /// next step. False when no such job is queued or running.
    pub fn cancel(&self, id: &str) -> bool {
        let mut s = self.lock();
        if let Some(i) = s.waiting.iter().position(|j| j.id == id) {
            let job = s.waiting.remove(i).expect("index from position");
            drop(s);
            job.stop(StopReason::Cancelled);
            job.end_stopped(StopReason::Cancelled);
            self.wake.notify_all();
            return true;
        }
        match &s.running {
            Some(job) if job.id == id => {
                job.stop(StopReason::Cancelled);
                true
            }
            _ => false,
        }
    }

    /// (waiting, running) job counts.
    pub fn counts(&self) -> (u32, u32) {
        let s = self.lock();
        (s.waiting.len() as u32, s.running.is_some() as u32)
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
        s.waiting.is_empty() && s.running.is_none()
    }

    /// Stops every job: waiting ones end now, the running one before its next step.
    pub fn abort_all(&self, reason: StopReason) {
        let mut s = self.lock();
        let waiting: Vec<_> = s.waiting.drain(..).collect();
        if let Some(job) = &s.running {
            job.stop(reason);
        }
        drop(s);
        for job in waiting {
            job.stop(reason);
            job.end_stopped(reason);
        }
        self.wake.notify_all();
    }

    /// Lets the worker thread return once no job waits.
    pub fn exit_worker(&self) {
        self.lock().exit = true;
        self.wake.notify_all();
    }
}
