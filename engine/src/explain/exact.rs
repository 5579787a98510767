//! Exact Grad-SAM: the definition, one backward pass per latent element.
//!
//! The latent is replicated B times along the batch; one forward pass (with grad) gives B
//! identical copies of x̂0 and of every captured A_l. For a chunk of B elements e_0..e_{B−1}
//! the scalar y = Σ_b x̂0[b, e_b] is differentiated w.r.t. all captured A_l at once: copy
//! b's slice of ∂y/∂A_l is ∂x̂0[e_b]/∂A_l (the copies do not interact: every UNet op is
//! per sample), so one backward gives B element gradients. The forward graph is kept and
//! reused for all ⌈N/B⌉ backward passes.
use super::super::unet::{Capture, UNetOutput};
use super::AttributionPoint;
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// Elements per backward pass for an h×w latent when the request does not say: about
/// 16k latent positions in flight (64 copies of a 16×16 latent, 4 of SD's 64×64).
pub fn default_batch(h: i64, w: i64) -> usize {
    ((16384 / (h * w).max(1)) as usize).clamp(1, 64)
}

pub(super) fn importance(
    at: &AttributionPoint,
    layers: &[usize],
    subjects: &[usize],
    batch: Option<usize>,
) -> Result<Tensor> {
    let AttributionPoint { model, scheduler, latents, step_index, timestep, cond } = *at;
    let (_, c, h, w) = latents.size4()?;
    let n = c * h * w;
    let b = (batch.unwrap_or_else(|| default_batch(h, w)) as i64).clamp(1, n);
    let device = latents.device();
    let subject_index = Tensor::from_slice(&subjects.iter().map(|&s| s as i64).collect::<Vec<_>>()).to_device(device);

    let z = latents.repeat([b, 1, 1, 1]);
    let model_in = scheduler.scale_model_input(&z, step_index);
    let ctx = cond.repeat(b);
    let UNetOutput { sample: out, probs, .. } =
        model.unet.try_forward(&model_in, timestep, &ctx, Capture::layers(layers))?;
    ensure!(probs.len() == layers.len(), "captured {} cross-attention layers, asked for {}", probs.len(), layers.len());
    let x0 = scheduler.pred_original(&out, step_index, &z).reshape([b, n]);
    let attn: Vec<Tensor> = probs.iter().map(|(_, p)| p.shallow_clone()).collect();
    // A_l[·, h, q, s] for the subjects, float32, outside the graph: [B, heads, Q, S].
    let attn_s: Vec<Tensor> =
        attn.iter().map(|p| p.detach().index_select(3, &subject_index).to_kind(Kind::Float)).collect();

    let s = subjects.len() as i64;
    let maps = Tensor::zeros([s, n], (Kind::Float, device));
    let mut start = 0;
    while start < n {
        crate::interrupt::check()?;
        let m = b.min(n - start);
        let idx = Tensor::arange_start(start, start + m, (Kind::Int64, device)).unsqueeze(1);
        let y = x0.narrow(0, 0, m).gather(1, &idx, false).sum(Kind::Float);
        let last = start + m >= n;
        let grads = Tensor::run_backward(&[y], &attn, !last, false);
        let mut chunk = Tensor::zeros([m, s], (Kind::Float, device));
        for (a, g) in attn_s.iter().zip(&grads) {
            let g = g.narrow(0, 0, m).index_select(3, &subject_index).to_kind(Kind::Float).abs();
            chunk += (a.narrow(0, 0, m) * g).sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float);
        }
        maps.narrow(1, start, m).copy_(&chunk.tr());
        start += m;
    }
    Ok(maps.view([s, c, h, w]))
}
