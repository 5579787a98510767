//! Queue positions that move: a waiting job gets `Queued` when it is queued and again
//! whenever the jobs ahead of it change, each time with an estimate of when it starts.
//!
//! The estimate is the work ahead in steps (the running jobs' remaining steps, then the
//! steps of each waiting job ahead) times the recent seconds per worker step (one step of
//! every running job). It counts the jobs ahead as running one after another, so with
//! `--max-batch` above 1 it is an upper bound; an img2img job ahead counts all its requested
//! steps.
use super::jobs::Job;
use frisket_proto::v1::{generate_event::Event, Queued};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Weight of the newest step in the running mean of step seconds.
const NEWEST_STEP_WEIGHT: f64 = 0.2;

/// Recent seconds per worker step: an exponential moving mean, none until a step is timed.
#[derive(Debug, Default)]
pub struct StepClock(AtomicU64);

impl StepClock {
    /// The worker took `seconds` for one step of its running jobs.
    pub fn record(&self, seconds: f64) {
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

/// The `Queued` event of the job at `position` in `waiting`.
pub fn queued(position: usize, waiting: &VecDeque<Arc<Job>>, running: &[Arc<Job>], clock: &StepClock) -> Queued {
    let estimated_start_seconds = clock.seconds().map(|step| {
        let running_left: u64 = running.iter().map(|job| u64::from(job.steps_left())).sum();
        let ahead: u64 = waiting.iter().take(position).map(|job| job.spec.steps as u64).sum();
        step * (running_left + ahead) as f64
    });
    Queued { position: position as u32, estimated_start_seconds }
}

/// Sends `Queued` again to every waiting job from `from` on (their positions changed).
pub fn announce(from: usize, waiting: &VecDeque<Arc<Job>>, running: &[Arc<Job>], clock: &StepClock) {
    for (position, job) in waiting.iter().enumerate().skip(from) {
        let event = Event::Queued(queued(position, waiting, running, clock));
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
        clock.record(1.0);
        assert_eq!(clock.seconds(), Some(1.0));
        clock.record(2.0);
        assert!((clock.seconds().unwrap() - 1.2).abs() < 1e-12);
    }
}
