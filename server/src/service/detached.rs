//! Detached jobs (`GenerateRequest.detach`): each keeps a [`Journal`] of its latest state
//! that WatchJob replays before the live events, and its end (Result or status) that
//! GetResult returns for the retention time after the job ends.
//!
//! A journal is bounded by the job itself: per image (`num_images`), one Queued, Step,
//! Latent and Preview (each the newest), every Mask and Heatmap (a few per manipulated
//! step), Started and its Result; the journal ends with the last image's Result or the
//! first failure.
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
    /// The job's latest state in the order it was sent (the newest of a kind per image).
    replay: Vec<(GenerateEvent, Option<(Newest, u32)>)>,
    /// WatchJob streams following the job.
    watchers: Vec<Arc<Events>>,
    /// Each image's Result once it came.
    results: Vec<Option<JobResult>>,
    /// The last image's Result, or the status the job ended with.
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

    /// Records a message one of the job's images sent and passes it to the watchers (a
    /// watcher whose stream is gone or stalled is dropped; the job runs on). False once
    /// the journal has ended without this image's Result (another image failed): the
    /// image should stop.
    pub fn record(&self, msg: &EventResult) -> bool {
        let mut r = self.lock();
        if r.end.is_some() {
            return false;
        }
        r.watchers.retain(|w| w.push(msg.clone()).is_ok());
        let event = match msg {
            Err(_) => {
                self.end(&mut r, msg);
                return false;
            }
            Ok(event) => event,
        };
        if let Some(Event::Result(result)) = &event.event {
            if let Some(slot) = r.results.get_mut(event.image_index as usize) {
                *slot = Some(result.clone());
            }
            if r.results.iter().all(Option::is_some) {
                self.end(&mut r, msg);
                return true;
            }
        }
        let kind = Newest::of(event).map(|kind| (kind, event.image_index));
        if let Some(kind) = kind {
            if let Some(i) = r.replay.iter().position(|(_, k)| *k == Some(kind)) {
                let (old, _) = r.replay.remove(i);
                r.bytes -= old.encoded_len() as u64;
            }
        }
        r.bytes += event.encoded_len() as u64;
        r.replay.push((event.clone(), kind));
        true
    }

    fn end(&self, r: &mut Record, msg: &EventResult) {
        r.bytes += encoded_len(msg);
        r.end = Some(msg.clone());
        r.ended_at = Some(Instant::now());
        r.watchers.clear();
    }

    /// Image `image` ends without having sent its Result (its job was dropped): the
    /// journal ends with ABORTED unless it has ended or has that Result.
    pub fn abandoned(&self, image: u32) {
        let mut r = self.lock();
        let has_result = r.results.get(image as usize).is_some_and(Option::is_some);
        if r.end.is_none() && !has_result {
            let aborted = Err(Status::aborted("the job ended without a result"));
            r.watchers.retain(|w| w.push(aborted.clone()).is_ok());
            self.end(&mut r, &aborted);
        }
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

    /// GetResult: image `image`'s Result, the status the job ended with (a failure of
    /// any image), FAILED_PRECONDITION while that image runs, OUT_OF_RANGE past the
    /// job's images.
    pub fn result(&self, image: u32) -> Result<JobResult, Status> {
        let r = self.lock();
        if let Some(Err(status)) = &r.end {
            return Err(Status::new(status.code(), status.message()));
        }
        match r.results.get(image as usize) {
            Some(Some(result)) => Ok(result.clone()),
            Some(None) => Err(Status::failed_precondition(format!(
                "job {:?} image {image} has not ended yet (WatchJob follows it)",
                self.job_id
            ))),
            None => Err(Status::out_of_range(format!(
                "job {:?} has {} image(s); image_index {image} is past them",
                self.job_id,
                r.results.len()
            ))),
        }
    }

    /// How many images the job makes.
    pub fn images(&self) -> u32 {
        self.lock().results.len() as u32
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

    /// A journal for a new detached job of `images` images; None when a detached job with
    /// that id is running or kept.
    pub fn register(&self, job_id: &str, images: u32) -> Option<Arc<Journal>> {
        let mut jobs = self.lock();
        if jobs.iter().any(|j| j.job_id == job_id) {
            return None;
        }
        let record = Record { results: vec![None; images.max(1) as usize], ..Record::default() };
        let journal = Arc::new(Journal { job_id: job_id.to_string(), record: Mutex::new(record) });
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
        let journal = detached.register("j", 1).unwrap();
        assert!(detached.register("j", 1).is_none(), "a second job with the id");
        for s in 0..3 {
            journal.record(&ev(Event::Step(Step { index: s, ..Default::default() })));
            journal.record(&ev(Event::Preview(Preview { step: s, ..Default::default() })));
            journal.record(&ev(Event::Heatmap(Heatmap { step: s, ..Default::default() })));
        }
        let w = watcher();
        journal.attach(&w);
        journal.record(&ev(Event::Step(Step { index: 3, ..Default::default() })));
        assert!(journal.result(0).unwrap_err().code() == tonic::Code::FailedPrecondition);
        journal.record(&result(b"png"));
        let expected = ["heatmap 0", "heatmap 1", "step 2", "preview 2", "heatmap 2", "step 3", "result"];
        assert_eq!(names(&w).await, expected);
        assert_eq!(journal.result(0).unwrap().image, b"png");
        // After the end a watcher gets the same state and the end at once.
        let late = watcher();
        journal.attach(&late);
        assert_eq!(names(&late).await, ["heatmap 0", "heatmap 1", "preview 2", "heatmap 2", "step 3", "result"]);
    }

    fn image_event(image: u32, event: Event) -> EventResult {
        Ok(GenerateEvent { job_id: "j".into(), event: Some(event), image_index: image })
    }

    #[tokio::test]
    async fn two_images_end_with_the_last_result_or_the_first_failure() {
        let detached = Detached::new(Retention::default());
        let journal = detached.register("j", 2).unwrap();
        for image in [0, 1] {
            journal.record(&image_event(image, Event::Step(Step { index: 0, ..Default::default() })));
        }
        let done = JobResult { image: b"zero".to_vec(), ..Default::default() };
        assert!(journal.record(&image_event(0, Event::Result(done))));
        assert_eq!(journal.result(0).unwrap().image, b"zero", "image 0 is fetchable while 1 runs");
        assert_eq!(journal.result(1).unwrap_err().code(), tonic::Code::FailedPrecondition);
        assert_eq!(journal.result(2).unwrap_err().code(), tonic::Code::OutOfRange);
        // Image 0's job is dropped after its Result: that is not an abort.
        journal.abandoned(0);
        let w = watcher();
        w.expect_results(journal.images());
        journal.attach(&w);
        journal.record(&image_event(1, Event::Step(Step { index: 1, ..Default::default() })));
        let last = JobResult { image: b"one".to_vec(), ..Default::default() };
        journal.record(&image_event(1, Event::Result(last)));
        assert_eq!(names(&w).await, ["step 0", "step 0", "result", "step 1", "result"]);
        assert_eq!(journal.result(1).unwrap().image, b"one");

        // A failure of one image ends the request: the other's next message is refused.
        let failing = detached.register("k", 2).unwrap();
        failing.record(&Err(Status::internal("image 1 failed")));
        assert!(!failing.record(&image_event(0, Event::Step(Step::default()))), "image 0 should stop");
        assert_eq!(failing.result(0).unwrap_err().code(), tonic::Code::Internal);
    }

    #[tokio::test]
    async fn kept_results_are_bounded_by_count_bytes_and_time() {
        let retention = Retention { keep: Duration::from_secs(60), max_count: 2, max_bytes: 10_000 };
        let detached = Detached::new(retention);
        for id in ["a", "b", "c"] {
            detached.register(id, 1).unwrap().record(&result(b"x"));
        }
        assert!(detached.get("a").is_none(), "the oldest of three went");
        assert!(detached.get("b").is_some() && detached.get("c").is_some());
        // A running job is never dropped; a large result pushes the older ones out.
        let running = detached.register("running", 1).unwrap();
        detached.register("big", 1).unwrap().record(&result(&[0; 9_990]));
        assert!(detached.get("b").is_none() && detached.get("c").is_none());
        assert!(detached.get("big").is_some() && detached.get("running").is_some());
        running.record(&Err(Status::cancelled("cancelled")));
        assert_eq!(running.result(0).unwrap_err().code(), tonic::Code::Cancelled);

        let short = Detached::new(Retention { keep: Duration::from_millis(20), ..Retention::default() });
        short.register("gone", 1).unwrap().record(&result(b"x"));
        std::thread::sleep(Duration::from_millis(40));
        assert!(short.get("gone").is_none());
        assert!(short.register("gone", 1).is_some(), "an expired id is free again");
    }
}
