//! Feature statistics and the Fréchet distance, in f64.
//!
//! The trace term tr √(Σa Σb) is computed as Σ √λ over the eigenvalues of the symmetric
//! Σa^½ Σb Σa^½ (two symmetric eigen-decompositions, negative round-off clamped to 0). clean-fid and
//! pytorch-fid take scipy's `sqrtm` of the non-symmetric Σa Σb instead, torchmetrics the real part
//! of Σ √λ over `eigvals(Σa Σb)`; all are the same number for positive semi-definite covariances,
//! but `sqrtm` fails (complex result) when there are fewer images than features, where the
//! symmetric route stays exact.
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// Below this many images per set the covariance of 2,048 features is singular and FID is
/// biased upwards; the tools warn (clean-fid and pytorch-fid recommend at least this many).
pub const RECOMMENDED_IMAGES: usize = 2048;

/// Mean and covariance (n − 1 denominator, as `np.cov`) of [n, d] features.
pub struct Stats {
    pub mu: Tensor,
    pub sigma: Tensor,
    pub n: usize,
}

impl Stats {
    pub fn from_features(features: &Tensor) -> Result<Self> {
        let (n, _) = features.size2().context("features must be [n, d]")?;
        if n < 2 {
            bail!("a covariance needs at least 2 images, got {n}");
        }
        let x = features.to_kind(Kind::Double);
        let mu = x.mean_dim(0, false, Kind::Double);
        let centred = &x - &mu;
        let sigma = centred.transpose(0, 1).matmul(&centred) / (n - 1) as f64;
        Ok(Stats { mu, sigma, n: n as usize })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let n = Tensor::from_slice(&[self.n as i64]);
        let tmp = path.with_extension("partial");
        Tensor::save_multi(&[("mu", &self.mu), ("sigma", &self.sigma), ("n", &n)], &tmp)?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let map: std::collections::HashMap<_, _> = Tensor::load_multi(path)?.into_iter().collect();
        let get =
            |k: &str| map.get(k).map(|t| t.shallow_clone()).with_context(|| format!("{} has no {k}", path.display()));
        Ok(Stats { mu: get("mu")?, sigma: get("sigma")?, n: get("n")?.int64_value(&[0]) as usize })
    }
}

/// tr √(A B) for symmetric positive semi-definite A, B.
pub fn trace_sqrt_product(a: &Tensor, b: &Tensor) -> f64 {
    let (lambda, v) = Tensor::linalg_eigh(a, "L");
    let root_a = (&v * lambda.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&v.transpose(0, 1));
    let m = root_a.matmul(b).matmul(&root_a);
    let m = (&m + m.transpose(0, 1)) / 2.0;
    let (mu, _) = Tensor::linalg_eigh(&m, "L");
    mu.clamp_min(0.0).sqrt().sum(Kind::Double).double_value(&[])
}

/// ‖μa − μb‖² + tr Σa + tr Σb − 2 tr √(Σa Σb).
pub fn frechet_distance(a: &Stats, b: &Stats) -> Result<f64> {
    if a.mu.size() != b.mu.size() {
        bail!("feature sizes differ: {:?} vs {:?}", a.mu.size(), b.mu.size());
    }
    let diff = &a.mu - &b.mu;
    let d2 = diff.dot(&diff).double_value(&[]);
    let tr = a.sigma.trace().double_value(&[]) + b.sigma.trace().double_value(&[]);
    Ok(d2 + tr - 2.0 * trace_sqrt_product(&a.sigma, &b.sigma))
}
