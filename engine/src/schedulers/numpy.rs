//! The numpy computations diffusers' `set_timesteps` makes, reproduced bit for bit
//! (numpy 2.x algorithms: the float64 ones are plain IEEE arithmetic; float32 `log` is
//! numpy's own SIMD kernel on x86, which is not glibc's).

/// `np.linspace(start, stop, num)`: `i * step + start`, the last value exactly `stop`.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num <= 1 {
        return vec![start; num];
    }
    let div = (num - 1) as f64;
    let step = (stop - start) / div;
    let mut y: Vec<f64> = if step == 0.0 {
        (0..num).map(|i| i as f64 / div * (stop - start) + start).collect()
    } else {
        (0..num).map(|i| i as f64 * step + start).collect()
    };
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, then
/// numpy's fill — `start + i * ((start + step) - start)`.
pub fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)` with float32 `fp`, in float64.
pub fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    let slope = (y1 - y0) / 1.0;
    let r = slope * (x - j as f64) + y0;
    if r.is_nan() {
        let r = slope * (x - (j + 1) as f64) + y1;
        return if r.is_nan() && y0 == y1 { y0 } else { r };
    }
    r
}

/// `np.log` on float32. numpy uses its own AVX2/AVX512F kernel (range reduction and a
/// rational P5/Q5 polynomial, up to ~4 ulp off) where the CPU has it, libm's `logf`
/// otherwise; diffusers takes log of the float32 train sigmas this way, and the result
/// moves the karras timesteps by more than a float32 ulp, so it is reproduced.
pub fn logf(x: f32) -> f32 {
    if simd_log_available() {
        simd_logf(x)
    } else {
        x.ln()
    }
}

fn simd_log_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            || (std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// numpy's `simd_log_FLOAT` (npy_simd_data.h constants), one lane.
#[allow(clippy::excessive_precision)] // numpy's literals, kept verbatim
fn simd_logf(x_in: f32) -> f32 {
    const P: [f32; 6] = [
        0.0,
        9.999999999999998702752e-01,
        2.112677543073053063722e+00,
        1.480000633576506585156e+00,
        3.808837741388407920751e-01,
        2.589979117907922693523e-02,
    ];
    const Q: [f32; 6] = [
        1.0,
        2.612677543073109236779e+00,
        2.453006071784736363091e+00,
        9.864942958519418960339e-01,
        1.546476374983906719538e-01,
        5.875095403124574342950e-03,
    ];
    if x_in.is_nan() {
        return f32::NAN;
    }
    if x_in < 0.0 {
        return -f32::NAN;
    }
    if x_in == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x_in == f32::INFINITY {
        return f32::INFINITY;
    }
    // Denormals are pre-scaled by 2^100 (exponent corrected below).
    let (x, extra) = if x_in < f32::MIN_POSITIVE { (x_in * 2f32.powi(100), -100.0) } else { (x_in, 0.0) };
    let bits = x.to_bits();
    // x = m · 2^e with m in [0.5, 1), then m in (√½, √2].
    let mut exponent = ((bits >> 23) as i32 - 126) as f32 + extra;
    let mut m = f32::from_bits((bits & 0x007F_FFFF) | (126 << 23));
    if m <= std::f32::consts::FRAC_1_SQRT_2 {
        m = m + m;
        exponent -= 1.0;
    }
    let y = m - 1.0;
    let num = P[5].mul_add(y, P[4]).mul_add(y, P[3]).mul_add(y, P[2]).mul_add(y, P[1]).mul_add(y, P[0]);
    let den = Q[5].mul_add(y, Q[4]).mul_add(y, Q[3]).mul_add(y, Q[2]).mul_add(y, Q[1]).mul_add(y, Q[0]);
    exponent.mul_add(std::f32::consts::LN_2, num / den)
}

/// diffusers' `_sigma_to_t`: the fractional train timestep of `sigma` by interpolating
/// log-sigma between its neighbours. `log_sigmas` is the float32 `np.log(train sigmas)`;
/// note `low - high` is a float32 subtraction there.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of cumsum(dists >= 0): the last index with log_sigmas[i] <= log_sigma, else 0.
    let low_idx = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0).min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// diffusers' `_convert_to_karras` (rho 7) in float64.
pub fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv_rho, max_inv_rho) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_and_linspace_match_numpy() {
        // np.arange(1000, 0, -1000/61) has 62 entries, the last -5.7e-13.
        let a = arange(1000.0, 0.0, -1000.0 / 61.0);
        assert_eq!(a.len(), 62);
        assert_eq!(a[61], -5.684341886080801e-13);
        assert_eq!(linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(linspace(0.0, 999.0, 7)[3], 499.5);
    }

    #[test]
    fn interp_hits_and_between() {
        let fp = [1.0f32, 2.0, 4.0];
        assert_eq!(interp(1.0, &fp), 2.0);
        assert_eq!(interp(1.5, &fp), 3.0);
        assert_eq!(interp(-1.0, &fp), 1.0);
        assert_eq!(interp(2.0, &fp), 4.0);
    }
}
