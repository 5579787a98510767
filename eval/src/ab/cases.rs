//! The A/B data set: shapes protect cases (`frisket_shapes::protect`) from seed ranges disjoint
//! from training (seeds ≥ 2³²) and from the trainer's eval_tiny (700_000..) and tune_probe
//! (800_000..).
use anyhow::{ensure, Context, Result};
use frisket_shapes::protect::{protect_case, ProtectCase};

/// The held-out cases: seeds from here.
pub const HELD_OUT_BASE: u64 = 900_000;
/// The tuning split (SD Tuned's strength is chosen here): seeds from here.
pub const TUNING_BASE: u64 = 950_000;

/// Case `i` of a split and its seed (also the job's seed, the same for every condition).
pub fn cases(base: u64, n: usize) -> Result<Vec<(u64, ProtectCase)>> {
    ensure!(n > 0, "zero cases: pass --cases 1 or more");
    ensure!(n <= (TUNING_BASE - HELD_OUT_BASE) as usize, "at most {} cases", TUNING_BASE - HELD_OUT_BASE);
    (0..n as u64)
        .map(|i| {
            let seed = base + i;
            protect_case(seed).map(|c| (seed, c)).with_context(|| format!("protect case of seed {seed}"))
        })
        .collect()
}
