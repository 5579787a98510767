//! Detached jobs (`GenerateRequest.detach`): each keeps a [`Journal`] of its latest state
//! that WatchJob replays before the live events, and its end (Result or status) that
//! GetResult returns for the retention time after the job ends.
//!
//! A journal is bounded by the job itself: one Queued, Step, Latent and Preview (each the
//! newest), every Mask and Heatmap (a few per manipulated step), Started and the end.
//! Finished journals are kept for [`Retention::keep`], at most [`Retention::max_count`] of
//! them and [`Retention::max_bytes`] in all; the oldest go first.
use super::jobs::{EventResult, Events};
use frisket_proto::v1::{generate_event::Event, GenerateEvent, Result as JobResult};
use prost::Message;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tonic::Status;

/// How long and how many finished detached jobs are kept (`serve --keep-results*`).
#[derive(Clone, Debug)]
pub struct Retention {
    /// After its end; zero turns detach off.
    pub keep: Duration,
    pub max_count: usize,
    /// Encoded bytes of the kept journals (images, previews, heatmaps, masks).
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self { keep: Duration::from_secs(600), max_count: 100, max_bytes: 512 << 20 }
    }
}

/// The event kinds of which a journal keeps only the newest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Newest {
    Queued,
    Step,
    Latent,
    Preview,
}

impl Newest {
    fn of(event: &GenerateEvent) -> Option<Self> {
        match event.event.as_ref()? {
            Event::Queued(_) => Some(Self::Queued),
            Event::Step(_) => Some(Self::Step),
            Event::Latent(_) => Some(Self::Latent),
            Event::Preview(_) => Some(Self::Preview),
            _ => None,
        }
    }
}

pub struct Journal {
    pub job_id: String,
    record: Mutex<Record>,
}

#[derive(Default)]
struct Record {
    /// The job's latest state in the order it was sent.
    replay: Vec<(GenerateEvent, Option<Newest>)>,
    /// WatchJob streams following the job.
    watchers: Vec<Arc<Events>>,
    /// The Result or the status the job ended with.
    end: Option<EventResult>,
    ended_at: Option<Instant>,
    bytes: u64,
}

fn encoded_len(msg: &EventResult) -> u64 {
    match msg {
        Ok(event) => event.encoded_len() as u64,
        Err(status) => status.message().len() as u64,
    }
}

impl Journal {
    fn lock(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a message the job sent and passes it to the watchers (a watcher whose
    /// stream is gone or stalled is dropped; the job runs on).
    pub fn record(&self, msg: &EventResult) {
        let mut r = self.lock();
        if r.end.is_some() {
            return;
        }
        r.watchers.retain(|w| w.push(msg.clone()).is_ok());
        let final_message = match msg {
            Ok(event) => matches!(event.event, Some(Event::Result(_))),
            Err(_) => true,
        };
        if final_message {
            r.bytes += encoded_len(msg);
            r.end = Some(msg.clone());
            r.ended_at = Some(Instant::now());
            r.watchers.clear();
            return;
        }
        let Ok(event) = msg else { return };
        let kind = Newest::of(event);
        if let Some(kind) = kind {
            if let Some(i) = r.replay.iter().position(|(_, k)| *k == Some(kind)) {
                let (old, _) = r.replay.remove(i);
                r.bytes -= old.encoded_len() as u64;
            }
        }
        r.bytes += event.encoded_len() as u64;
        r.replay.push((event.clone(), kind));
    }

    /// A WatchJob stream: the latest state, then (under the same lock, so nothing is
    /// missed or repeated) the live events or the end.
    pub fn attach(&self, events: &Arc<Events>) {
        let mut r = self.lock();
        for (event, _) in &r.replay {
            if events.push(Ok(event.clone())).is_err() {
                return;
            }
        }
        match &r.end {
            Some(end) => {
                let _ = events.push(end.clone());
            }
            None => r.watchers.push(events.clone()),
        }
    }

    /// GetResult: the Result, the status the job ended with, or FAILED_PRECONDITION
    /// while it has not ended.
    pub fn result(&self) -> Result<JobResult, Status> {
        match &self.lock().end {
            Some(Ok(GenerateEvent { event: Some(Event::Result(result)), .. })) => Ok(result.clone()),
            Some(Ok(_)) => Err(Status::internal("a detached job ended with an event that is not a Result")),
            Some(Err(status)) => Err(Status::new(status.code(), status.message())),
            None => Err(Status::failed_precondition(format!(
                "job {:?} has not ended yet (WatchJob follows it)",
                self.job_id
            ))),
        }
    }

    /// When it ended, and the bytes it holds.
    fn ended(&self) -> Option<(Instant, u64)> {
        let r = self.lock();
        r.ended_at.map(|at| (at, r.bytes))
    }
}

/// The detached jobs, running and kept, by id.
pub struct Detached {
    pub retention: Retention,
    /// In the order they were accepted.
    jobs: Mutex<VecDeque<Arc<Journal>>>,
}

impl Detached {
    pub fn new(retention: Retention) -> Self {
        Self { retention, jobs: Mutex::new(VecDeque::new()) }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Arc<Journal>>> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut jobs);
        jobs
    }

    /// Drops finished journals past the retention time, then the oldest finished ones
    /// while more than the count or bytes are kept.
    fn expire(&self, jobs: &mut VecDeque<Arc<Journal>>) {
        let keep = self.retention.keep;
        // Each journal's end, read once: None while running (never dropped).
        let ends: Vec<Option<(Instant, u64)>> = jobs.iter().map(|j| j.ended()).collect();
        let mut kept: Vec<bool> = ends.iter().map(|e| e.is_none_or(|(at, _)| at.elapsed() < keep)).collect();
        let finished: Vec<u64> = ends.iter().zip(&kept).filter_map(|(e, k)| e.filter(|_| *k).map(|(_, b)| b)).collect();
        let (mut count, mut bytes) = (finished.len(), finished.iter().sum::<u64>());
        for (i, end) in ends.iter().enumerate() {
            if count <= self.retention.max_count && bytes <= self.retention.max_bytes {
                break;
            }
            if let (Some((_, b)), true) = (end, kept[i]) {
                kept[i] = false;
                count -= 1;
                bytes -= b;
            }
        }
        let mut kept = kept.into_iter();
        jobs.retain(|_| kept.next().unwrap_or(true));
    }

    /// A journal for a new detached job; None when a detached job with that id is running
    /// or kept.
    pub fn register(&self, job_id: &str) -> Option<Arc<Journal>> {
        let mut jobs = self.lock();
        if jobs.iter().any(|j| j.job_id == job_id) {
            return None;
        }
        let journal = Arc::new(Journal { job_id: job_id.to_string(), record: Mutex::new(Record::default()) });
        jobs.push_back(journal.clone());
        Some(journal)
    }

    /// Forgets a job that was never queued.
    pub fn unregister(&self, journal: &Arc<Journal>) {
        self.lock().retain(|j| !Arc::ptr_eq(j, journal));
    }

    pub fn get(&self, job_id: &str) -> Option<Arc<Journal>> {
        self.lock().iter().find(|j| j.job_id == job_id).cloned()
    }

    /// Drops what is past the retention time (the server calls this periodically, so an
    /// idle server frees kept results too).
    pub fn expire_now(&self) {
        drop(self.lock());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use frisket_proto::v1::{Heatmap, Preview, Step};
    use tokio_stream::StreamExt;

    fn ev(event: Event) -> EventResult {
        Ok(GenerateEvent { job_id: "j".into(), event: Some(event), ..Default::default() })
    }

    fn result(image: &[u8]) -> EventResult {
        ev(Event::Result(JobResult { image: image.to_vec(), ..Default::default() }))
    }

    async fn names(events: &Arc<Events>) -> Vec<String> {
        let mut stream = events.stream();
        let mut out = Vec::new();
        while let Some(msg) = stream.next().await {
            out.push(match msg {
                Ok(GenerateEvent { event: Some(Event::Step(s)), .. }) => format!("step {}", s.index),
                Ok(GenerateEvent { event: Some(Event::Preview(p)), .. }) => format!("preview {}", p.step),
                Ok(GenerateEvent { event: Some(Event::Heatmap(h)), .. }) => format!("heatmap {}", h.step),
                Ok(GenerateEvent { event: Some(Event::Result(_)), .. }) => "result".into(),
                Ok(_) => "other".into(),
                Err(s) => format!("status {:?}", s.code()),
            });
        }
        out
    }

    fn watcher() -> Arc<Events> {
        Events::new("j".into(), Duration::from_secs(60), tokio::runtime::Handle::current())
    }

    #[tokio::test]
    async fn a_watcher_gets_the_latest_state_then_the_live_events() {
        let detached = Detached::new(Retention::default());
        let journal = detached.register("j").unwrap();
        assert!(detached.register("j").is_none(), "a second job with the id");
        for s in 0..3 {
            journal.record(&ev(Event::Step(Step { index: s, ..Default::default() })));
            journal.record(&ev(Event::Preview(Preview { step: s, ..Default::default() })));
            journal.record(&ev(Event::Heatmap(Heatmap { step: s, ..Default::default() })));
        }
        let w = watcher();
        journal.attach(&w);
        journal.record(&ev(Event::Step(Step { index: 3, ..Default::default() })));
        assert!(journal.result().unwrap_err().code() == tonic::Code::FailedPrecondition);
        journal.record(&result(b"png"));
        let expected = ["heatmap 0", "heatmap 1", "step 2", "preview 2", "heatmap 2", "step 3", "result"];
        assert_eq!(names(&w).await, expected);
        assert_eq!(journal.result().unwrap().image, b"png");
        // After the end a watcher gets the same state and the end at once.
        let late = watcher();
        journal.attach(&late);
        assert_eq!(names(&late).await, ["heatmap 0", "heatmap 1", "preview 2", "heatmap 2", "step 3", "result"]);
    }

    #[tokio::test]
    async fn kept_results_are_bounded_by_count_bytes_and_time() {
        let retention = Retention { keep: Duration::from_secs(60), max_count: 2, max_bytes: 10_000 };
        let detached = Detached::new(retention);
        for id in ["a", "b", "c"] {
            detached.register(id).unwrap().record(&result(b"x"));
        }
        assert!(detached.get("a").is_none(), "the oldest of three went");
        assert!(detached.get("b").is_some() && detached.get("c").is_some());
        // A running job is never dropped; a large result pushes the older ones out.
        let running = detached.register("running").unwrap();
        detached.register("big").unwrap().record(&result(&[0; 9_990]));
        assert!(detached.get("b").is_none() && detached.get("c").is_none());
        assert!(detached.get("big").is_some() && detached.get("running").is_some());
        running.record(&Err(Status::cancelled("cancelled")));
        assert_eq!(running.result().unwrap_err().code(), tonic::Code::Cancelled);

        let short = Detached::new(Retention { keep: Duration::from_millis(20), ..Retention::default() });
        short.register("gone").unwrap().record(&result(b"x"));
        std::thread::sleep(Duration::from_millis(40));
        assert!(short.get("gone").is_none());
        assert!(short.register("gone").is_some(), "an expired id is free again");
    }
}
