//! Paired statistics for the A/B report: per-condition means with paired bootstrap 95 %
//! intervals, the Wilcoxon signed-rank test (normal approximation) and Holm's correction.
//!
//! Wilcoxon follows scipy's `wilcoxon(d, zero_method="wilcox", correction=False,
//! method="approx")`: zero differences are dropped, |d| ranked with average ranks for ties,
//! the variance reduced by the tie term Σ(t³ − t)/48, and the two-sided p-value 2·Φ(−|z|).
//! The normal approximation is used at every n (scipy's "auto" switches to the exact
//! distribution for small n without ties; the report states the method).
use crate::rng::SplitMix;
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// The confidence level of the bootstrap intervals.
pub const LEVEL: f64 = 0.95;
/// Bootstrap resamples per interval.
pub const RESAMPLES: usize = 2000;
/// The bootstrap's fixed seed, so a report is reproducible.
pub const SEED: u64 = 0x00ab_5eed;

/// numpy's default `percentile` (linear interpolation) of sorted values, q in [0, 100].
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    match sorted.get(lo + 1) {
        Some(next) => sorted[lo] + (next - sorted[lo]) * frac,
        None => sorted[lo],
    }
}

/// The percentile interval (LEVEL) of the means of `values` resampled by each row of `indices`.
pub fn interval_from_indices(values: &[f64], indices: &[Vec<usize>]) -> (f64, f64) {
    let mut means: Vec<f64> =
        indices.iter().map(|row| row.iter().map(|&i| values[i]).sum::<f64>() / row.len() as f64).collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - LEVEL) / 2.0 * 100.0;
    (percentile_sorted(&means, tail), percentile_sorted(&means, 100.0 - tail))
}

/// Resample rows of n item indices, drawn with replacement. The same rows serve every condition
/// and every paired difference (a paired bootstrap: an item's numbers move together).
pub fn resample_indices(n: usize, resamples: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = SplitMix(seed);
    (0..resamples).map(|_| (0..n).map(|_| (rng.next() % n as u64) as usize).collect()).collect()
}

/// Mean and paired bootstrap interval of `values`.
pub fn mean_interval(values: &[f64], indices: &[Vec<usize>]) -> Result<(f64, (f64, f64))> {
    ensure!(!values.is_empty(), "no values to average");
    Ok((values.iter().sum::<f64>() / values.len() as f64, interval_from_indices(values, indices)))
}

/// Average ranks (1-based) of `values`, ties sharing the mean of their ranks; also Σ(t³ − t)
/// over the tie groups.
fn average_ranks(values: &[f64]) -> (Vec<f64>, f64) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut ties = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        i = j + 1;
    }
    (ranks, ties)
}

/// Two-sided Wilcoxon signed-rank p-value of paired differences (see the module comment);
/// 1 when every difference is zero.
pub fn wilcoxon(diffs: &[f64]) -> f64 {
    let nonzero: Vec<f64> = diffs.iter().copied().filter(|d| *d != 0.0).collect();
    if nonzero.is_empty() {
        return 1.0;
    }
    let n = nonzero.len() as f64;
    let (ranks, ties) = average_ranks(&nonzero.iter().map(|d| d.abs()).collect::<Vec<_>>());
    let r_plus: f64 = nonzero.iter().zip(&ranks).filter(|(d, _)| **d > 0.0).map(|(_, r)| r).sum();
    let mean = n * (n + 1.0) / 4.0;
    let var = (n * (n + 1.0) * (2.0 * n + 1.0) - ties / 2.0) / 24.0;
    if var <= 0.0 {
        return 1.0;
    }
    let z = (r_plus - mean) / var.sqrt();
    // 2·Φ(−|z|) = erfc(|z| / √2).
    Tensor::from(z.abs() / std::f64::consts::SQRT_2).to_kind(Kind::Double).erfc().double_value(&[]).min(1.0)
}

/// Holm's step-down adjustment of a family of p-values, in their input order.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut adjusted = vec![0.0; m];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max((p[i] * (m - rank) as f64).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}
