//! Queue positions that move: a waiting job gets `Queued` when it is queued and again
//! whenever the jobs ahead of it change, each time with an estimate of when it starts.
//!
//! The estimate is the work ahead in job steps (the running jobs' remaining steps, then the
//! steps of each waiting job ahead) times the recent seconds per job step (a worker step's
//! seconds over the jobs it stepped, so batching's gain is in it), shared among the
//! workers, which run side by side. An img2img job ahead counts all its requested steps, so
//! the estimate leans late.
use super::jobs::Job;
use frisket_proto::v1::{generate_event::Event, Queued};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Weight of the newest step in the running mean of step seconds.
const NEWEST_STEP_WEIGHT: f64 = 0.2;

/// Recent seconds per job step: an exponential moving mean, none until a step is timed.
#[derive(Debug, Default)]
pub struct StepClock(AtomicU64);

impl StepClock {
    /// A worker took `seconds` for one step of its `jobs` running jobs.
    pub fn record(&self, seconds: f64, jobs: usize) {
        let seconds = seconds / jobs.max(1) as f64;
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            let mean = match self.seconds_of(bits) {
                Some(mean) => mean + NEWEST_STEP_WEIGHT * (seconds - mean),
                None => seconds,
            };
            Some(mean.to_bits())
        });
    }

    fn seconds_of(&self, bits: u64) -> Option<f64> {
        (bits != 0).then(|| f64::from_bits(bits))
    }

    pub fn seconds(&self) -> Option<f64> {
        self.seconds_of(self.0.load(Ordering::Relaxed))
    }
}

/// What the estimates need besides the jobs: the recent step time and how many workers
/// share the work.
#[derive(Clone, Copy)]
pub struct Pace<'a> {
    pub clock: &'a StepClock,
    pub workers: usize,
}

/// The `Queued` event of the job at `position` in `waiting`.
pub fn queued(position: usize, waiting: &VecDeque<Arc<Job>>, running: &[Arc<Job>], pace: Pace) -> Queued {
    let estimated_start_seconds = pace.clock.seconds().map(|step| {
        let running_left: u64 = running.iter().map(|job| u64::from(job.steps_left())).sum();
        let ahead: u64 = waiting.iter().take(position).map(|job| job.spec.steps as u64).sum();
        step * (running_left + ahead) as f64 / pace.workers.max(1) as f64
    });
    Queued { position: position as u32, estimated_start_seconds }
}

/// Sends `Queued` again to every waiting job from `from` on (their positions changed).
pub fn announce(from: usize, waiting: &VecDeque<Arc<Job>>, running: &[Arc<Job>], pace: Pace) {
    for (position, job) in waiting.iter().enumerate().skip(from) {
        let event = Event::Queued(queued(position, waiting, running, pace));
        // A job whose client left is dropped by the next sweep.
        let _ = job.push(Ok(job.event(event)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_follows_recent_steps() {
        let clock = StepClock::default();
        assert_eq!(clock.seconds(), None);
        clock.record(1.0, 1);
        assert_eq!(clock.seconds(), Some(1.0));
        clock.record(4.0, 2);
        assert!((clock.seconds().unwrap() - 1.2).abs() < 1e-12);
    }
}
