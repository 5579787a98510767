//! Kernel Inception Distance as clean-fid's `kernel_distance`: the cubic polynomial kernel
//! k(x, y) = (x·y / d + 1)³, the unbiased MMD² estimate averaged over `subsets` random subsets of
//! m = min(n_a, n_b, max_subset_size) images drawn without replacement from each set, in f64.
//! When both sets have m images every subset is the whole set and the result is exactly clean-fid's;
//! otherwise the draws come from a seeded generator here, not numpy's, so values agree only in
//! expectation.
use crate::rng::SplitMix;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

pub const SUBSETS: usize = 100;
pub const MAX_SUBSET_SIZE: usize = 1000;

pub struct KidConfig {
    pub subsets: usize,
    pub max_subset_size: usize,
    pub seed: u64,
}

impl Default for KidConfig {
    fn default() -> Self {
        KidConfig { subsets: SUBSETS, max_subset_size: MAX_SUBSET_SIZE, seed: 0 }
    }
}

/// The unbiased MMD² of one pair of equal-size subsets, times m (clean-fid's per-subset `t` term).
fn subset_term(x: &Tensor, y: &Tensor) -> f64 {
    let (m, d) = x.size2().expect("[m, d]");
    let kernel = |p: &Tensor, q: &Tensor| (p.matmul(&q.transpose(0, 1)) / d as f64 + 1.0).pow_tensor_scalar(3);
    let a = kernel(x, x) + kernel(y, y);
    let b = kernel(x, y);
    let m = m as f64;
    let a_off = a.sum(Kind::Double).double_value(&[]) - a.diagonal(0, 0, 1).sum(Kind::Double).double_value(&[]);
    a_off / (m - 1.0) - b.sum(Kind::Double).double_value(&[]) * 2.0 / m
}

/// KID between feature sets `a` (clean-fid's feats1) and `b` (feats2), [n, d] each.
pub fn kernel_distance(a: &Tensor, b: &Tensor, config: &KidConfig) -> Result<f64> {
    let (na, d) = a.size2()?;
    let (nb, db) = b.size2()?;
    if d != db {
        bail!("feature sizes differ: {d} vs {db}");
    }
    let m = (na.min(nb) as usize).min(config.max_subset_size);
    if m < 2 || config.subsets == 0 {
        bail!("KID needs at least 2 images per set and 1 subset");
    }
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let whole = na as usize == m && nb as usize == m;
    let mut rng = SplitMix(config.seed);
    let mut t = 0.0;
    if whole {
        t = subset_term(&b, &a) * config.subsets as f64;
    } else {
        for _ in 0..config.subsets {
            let x = b.index_select(0, &Tensor::from_slice(&rng.choose(nb as usize, m)));
            let y = a.index_select(0, &Tensor::from_slice(&rng.choose(na as usize, m)));
            t += subset_term(&x, &y);
        }
    }
    Ok(t / config.subsets as f64 / m as f64)
}
