//! Fast Grad-SAM: the exact map of the final cross-attention layer from one forward pass,
//! by factorising its Jacobian; an estimate for the other layers from one backward pass.
//!
//! **The final layer (exact up to rounding).** In SD-style UNets the last attn2 sits in the
//! last transformer of the last up block, and what follows it is per token (to_out,
//! residual, LayerNorm + GEGLU feed-forward, proj_out, residual) and then the output head
//! GroupNorm → SiLU → conv_out. So A[h,q,s] reaches x̂0 only through the head input u at
//! its own token q, and with u's per-token Jacobian
//!
//! ```text
//! M[k,h,q] = ∂u[k,q] / ∂A[h,q,s]                      (K channels of u, per token)
//! ```
//!
//! the head's Jacobian is known in closed form. With û = (u − μ_g)/σ_g the group-normalised
//! input, D[k,q] = act'(γ_k·û[k,q] + β_k)·γ_k/σ_g(k), N_g the elements of a group, W the
//! conv_out weights (padding p) and b the x̂0 coefficient of the model output:
//!
//! ```text
//! ∂x̂0[c,i,j]/∂A[h,q,s] = b·( Σ_k W[c,k,Δ]·D[k,q]·M[k,h,q]                  (q = (i,j)+Δ−p, local)
//!                            − Σ_g α_g[c,i,j]·m_g[h,q] − Σ_g β_g[c,i,j]·n_g[h,q] )   (GroupNorm statistics)
//! α_g = conv_W(D ⊙ 1_g),  β_g = conv_W(D ⊙ û ⊙ 1_g),
//! m_g[h,q] = Σ_{k∈g} M[k,h,q] / N_g,  n_g[h,q] = Σ_{k∈g} û[k,q]·M[k,h,q] / N_g
//! ```
//!
//! and `I_s[e] = Σ_{h,q} A[h,q,s]·|that|` is evaluated directly: a dense [N, H·Q] product
//! of rank 2G (chunked) for the statistics term, plus a correction at the kh·kw local
//! offsets. M comes from autograd without the per-element loop: with v a free tensor
//! shaped like u, g = ∂⟨v, u⟩/∂A (create_graph) and ∂(Σ_q g[h,q,s])/∂v = M[·,h,·], because
//! tokens do not mix between A and u — one small double-backward per head and subject,
//! through that last transformer block only. Cost: one batch-1 UNet forward with grad,
//! H·S double-backward passes of one transformer block, and tensor algebra of
//! O(N·H·Q·G) — against N backward passes for the definition.
//!
//! **Other layers (an estimate).** There the path to x̂0 crosses self-attention and many
//! GroupNorms; no cheap exact form exists. One backward pass of y = Σ_e r_e·x̂0[e] with a
//! fixed ±1 pattern r gives g = ∂y/∂A_l, whose square is an unbiased estimate of the
//! column norm Σ_e (∂x̂0[e]/∂A_l[h,q,s])²; the map is then placed by locality, query q ↔
//! the latent positions under it: `I_s[c,i,j] ≈ Σ_l Σ_h A_l[h,q(i,j),s]·|g_l[h,q(i,j),s]|`
//! for every channel c. Measured against the definition it is much weaker than the final
//! layer's exact term (engine/tests/parity_explain.rs prints both against the definition).
use super::super::unet::{Capture, UNet2DConditionModel, UNetOutput};
use super::AttributionPoint;
use super::{layer_grid, output_coefficient};
use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// Whether the last cross-attention layer feeds the output head through per-token
/// operations only (the final up block is a cross-attention block, as in SD 1.x/2.x).
/// SDXL's final up block has no attention (convolutions and an upsampler lie between its
/// last attn2 and the head), so there every layer, the last included, is the estimate.
pub fn final_layer_factorises(unet: &UNet2DConditionModel) -> bool {
    unet.config().up_block_types.last().is_some_and(|t| t == "CrossAttnUpBlock2D")
}

pub(super) fn importance(at: &AttributionPoint, layers: &[usize], subjects: &[usize]) -> Result<Tensor> {
    let AttributionPoint { model, scheduler, latents, step_index, timestep, cond } = *at;
    let unet = &model.unet;
    let last = unet.cross_attention_layer_count() - 1;
    let factorise = layers.contains(&last) && final_layer_factorises(unet);
    let (_, c, h, w) = latents.size4()?;
    let device = latents.device();
    let s = subjects.len() as i64;
    let subject_index = Tensor::from_slice(&subjects.iter().map(|&s| s as i64).collect::<Vec<_>>()).to_device(device);

    let model_in = scheduler.scale_model_input(latents, step_index);
    let capture = Capture { layers, head_input: true };
    let UNetOutput { sample: out, probs, head_input } = unet.try_forward(&model_in, timestep, cond, capture)?;
    let features = head_input.context("the UNet returns its head input when asked")?;
    ensure!(probs.len() == layers.len(), "captured {} cross-attention layers, asked for {}", probs.len(), layers.len());
    let mut maps = Tensor::zeros([s, c, h, w], (Kind::Float, device));

    let others: Vec<Tensor> =
        probs.iter().filter(|(l, _)| !(factorise && *l == last)).map(|(_, p)| p.shallow_clone()).collect();
    if !others.is_empty() {
        let x0 = scheduler.pred_original(&out, step_index, latents);
        let signs = rademacher(&x0.size(), device).to_kind(x0.kind());
        let y = (&x0 * signs).sum(Kind::Float);
        let grads = Tensor::run_backward(&[y], &others, factorise, false);
        for (a, g) in others.iter().zip(&grads) {
            let a_s = a.detach().get(0).index_select(2, &subject_index).to_kind(Kind::Float);
            let g_s = g.get(0).index_select(2, &subject_index).to_kind(Kind::Float).abs();
            let m = (a_s * g_s).sum_dim_intlist([0i64].as_slice(), false, Kind::Float).tr(); // [S, Q]
            let (hl, wl, f) = layer_grid(m.size()[1], h, w)?;
            let grid = m
                .reshape([s, 1, hl, wl])
                .repeat_interleave_self_int(f, 2, None)
                .repeat_interleave_self_int(f, 3, None)
                .narrow(2, 0, h)
                .narrow(3, 0, w);
            maps += grid;
        }
    }
    if factorise {
        let a_last = &probs.iter().find(|(l, _)| *l == last).context("the last layer was not captured")?.1;
        let b = output_coefficient(scheduler, step_index).abs();
        maps += final_layer(unet, &features, a_last, subjects)? * b;
    }
    Ok(maps)
}

/// A fixed ±1 pattern (splitmix64 of the element index): deterministic, and drawn without
/// touching libtorch's global generator, whose sequence belongs to the jobs' noise.
fn rademacher(size: &[i64], device: Device) -> Tensor {
    let n: i64 = size.iter().product();
    let values: Vec<f32> = (0..n as u64)
        .map(|i| {
            let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            if x & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect();
    Tensor::from_slice(&values).reshape(size).to_device(device)
}

/// y[..., i, j] = x[..., i+dy, j+dx], 0 where that is outside.
fn shift(x: &Tensor, dy: i64, dx: i64) -> Tensor {
    let size = x.size();
    let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
    let p = dy.abs().max(dx.abs());
    if p == 0 {
        return x.shallow_clone();
    }
    x.constant_pad_nd([p, p, p, p]).narrow(-2, p + dy, h).narrow(-1, p + dx, w)
}

/// I_s of the final layer from the head input `u` [1, K, h, w] and its probabilities `a`
/// [1, H, h·w, keys], both in the graph of one forward pass; without the factor |b|.
fn final_layer(unet: &UNet2DConditionModel, u: &Tensor, a: &Tensor, subjects: &[usize]) -> Result<Tensor> {
    let (norm, act, conv) = unet.head();
    let (_, k, h, w) = u.size4()?;
    let q = h * w;
    let (_, heads, queries, _) = a.size4()?;
    ensure!(queries == q, "the last cross-attention layer has {queries} queries, the head input {q} positions");
    ensure!(conv.stride == 1, "conv_out with stride {} is not supported", conv.stride);
    let device = u.device();
    let f32 = (Kind::Float, device);

    // M[k, h, q] per subject, by double backward through the last transformer block.
    let v = Tensor::zeros_like(u).set_requires_grad(true);
    let y = (u * &v).sum(Kind::Float);
    let g = Tensor::run_backward(&[y], &[a], true, true).pop().context("no gradient")?; // [1, H, Q, keys]
    let mut jac: Vec<Tensor> = Vec::with_capacity(subjects.len());
    for &s in subjects {
        let mut per_head = Vec::with_capacity(heads as usize);
        for head in 0..heads {
            let z = g.get(0).get(head).select(1, s as i64).sum(Kind::Float);
            let dv = Tensor::run_backward(&[z], &[&v], true, false).pop().context("no gradient")?;
            per_head.push(dv.detach().to_kind(Kind::Float).reshape([k, q]));
        }
        jac.push(Tensor::stack(&per_head, 0)); // [H, K, Q]
    }

    // The head at u: GroupNorm statistics, the local gain D, the statistics' coefficients.
    let groups = norm.groups;
    ensure!(k % groups == 0, "{k} head channels in {groups} groups");
    let per_group = k / groups;
    let group_size = (per_group * q) as f64;
    let u = u.detach().to_kind(Kind::Float).contiguous();
    let ug = u.reshape([groups, per_group * q]);
    let mu = ug.mean_dim([1i64].as_slice(), true, Kind::Float);
    let var = (&ug - &mu).square().mean_dim([1i64].as_slice(), true, Kind::Float);
    let sigma = (var + norm.eps).sqrt(); // [G, 1]
    let uhat = ((&ug - &mu) / &sigma).reshape([k, q]);
    let gamma = norm.weight.to_kind(Kind::Float).reshape([k, 1]);
    let beta = norm.bias.to_kind(Kind::Float).reshape([k, 1]);
    let pre_act = (&gamma * &uhat + &beta).detach().set_requires_grad(true);
    let dact = Tensor::run_backward(&[act.forward(&pre_act).sum(Kind::Float)], &[&pre_act], false, false)
        .pop()
        .context("no gradient")?;
    let sigma_k = sigma.expand([groups, per_group], false).reshape([k, 1]);
    let d = dact.detach() * &gamma / sigma_k; // [K, Q]
    let weight = conv.weight.to_kind(Kind::Float).contiguous(); // [C, K, kh, kw]
    let (c, wk, kh, kw) = weight.size4()?;
    ensure!(wk == k, "conv_out takes {wk} channels, the head input has {k}");
    let pad = conv.padding;
    let one_hot = Tensor::eye(groups, f32).repeat_interleave_self_int(per_group, 1, None); // [G, K]
    let conv_w = |x: &Tensor| x.conv2d(&weight, None::<Tensor>, [1, 1], [pad, pad], [1, 1], 1);
    let alpha = conv_w(&(one_hot.unsqueeze(2) * d.unsqueeze(0)).reshape([groups, k, h, w]));
    let beta_g = conv_w(&(one_hot.unsqueeze(2) * (&d * &uhat).unsqueeze(0)).reshape([groups, k, h, w]));
    let n = c * h * w;
    let coef = Tensor::cat(&[alpha, beta_g], 0).reshape([2 * groups, n]); // [2G, N]
    let coef4 = coef.reshape([2 * groups, c, h, w]);
    let hq = heads * q;
    let chunk = ((1i64 << 24) / hq).clamp(1, n);

    let mut maps = Vec::with_capacity(subjects.len());
    for (m, &s) in jac.iter().zip(subjects) {
        let mg = m.reshape([heads, groups, per_group, q]).sum_dim_intlist([2i64].as_slice(), false, Kind::Float);
        let ng = (m * uhat.unsqueeze(0)).reshape([heads, groups, per_group, q]).sum_dim_intlist(
            [2i64].as_slice(),
            false,
            Kind::Float,
        );
        let mn = Tensor::cat(&[mg, ng], 1) / group_size; // [H, 2G, Q]
        let mn_flat = mn.permute([1, 0, 2]).reshape([2 * groups, hq]);
        let a_s = a.detach().get(0).select(2, s as i64).to_kind(Kind::Float); // [H, Q]
        let a_flat = a_s.reshape([hq]);

        // Statistics term over all (h, q): Σ_hq A·|coefᵀ·mn| (the sign is immaterial).
        let global = Tensor::zeros([n], f32);
        let mut e0 = 0;
        while e0 < n {
            let ec = chunk.min(n - e0);
            let j = coef.narrow(1, e0, ec).tr().matmul(&mn_flat); // [ec, HQ]
            global.narrow(0, e0, ec).copy_(&(j.abs() * &a_flat).sum_dim_intlist([1i64].as_slice(), false, Kind::Float));
            e0 += ec;
        }

        // Local offsets: replace |statistics| by |statistics + local| where q = e + Δ.
        let dm = m * d.unsqueeze(0); // [H, K, Q]
        let mn4 = mn.permute([1, 0, 2]).reshape([2 * groups, heads, h, w]);
        let a3 = a_s.reshape([heads, h, w]);
        let mut local = Tensor::zeros([c, h, w], f32);
        for di in 0..kh {
            for dj in 0..kw {
                let (dy, dx) = (di - pad, dj - pad);
                let w_off = weight.select(3, dj).select(2, di); // [C, K]
                let l = w_off.matmul(&dm).permute([1, 0, 2]).reshape([c, heads, h, w]); // [C, H, h, w]
                let l = shift(&l, dy, dx);
                let stats = -(coef4.unsqueeze(2) * shift(&mn4, dy, dx).unsqueeze(1)).sum_dim_intlist(
                    [0i64].as_slice(),
                    false,
                    Kind::Float,
                ); // [C, H, h, w]
                let delta = (&stats + l).abs() - stats.abs();
                local +=
                    (delta * shift(&a3, dy, dx).unsqueeze(0)).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
            }
        }
        maps.push(global.reshape([c, h, w]) + local);
    }
    Ok(Tensor::stack(&maps, 0))
}
