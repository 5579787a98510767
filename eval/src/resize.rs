//! PIL's bicubic resize, as clean-fid's "clean" mode runs it: each channel of the uint8 image
//! becomes a float32 ("F" mode) PIL image, is resized with `Image.BICUBIC` and clipped to [0, 255];
//! the output stays float32 (no re-quantisation). This follows Pillow's `Resample.c` for 32-bit
//! float images: coefficients in f64 normalised to sum 1, a horizontal then a vertical pass, f64
//! accumulation stored as f32 after each pass (pass order: `resize_plane`).

/// Pillow's bicubic kernel (a = -0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One output position's input window and weights.
struct Tap {
    start: usize,
    weights: Vec<f64>,
}

/// Pillow's `precompute_coeffs` for the box [0, in_size].
fn coefficients(in_size: usize, out_size: usize) -> Vec<Tap> {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    // Pillow multiplies by the reciprocal (not a division: the rounding differs).
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut weights: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
            let sum: f64 = weights.iter().sum();
            if sum != 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            Tap { start: xmin, weights }
        })
        .collect()
}

fn horizontal(src: &[f32], w: usize, h: usize, out_w: usize) -> Vec<f32> {
    let taps = coefficients(w, out_w);
    let mut out = vec![0f32; out_w * h];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for (x, tap) in taps.iter().enumerate() {
            let mut ss = 0f64;
            for (i, k) in tap.weights.iter().enumerate() {
                ss += row[tap.start + i] as f64 * k;
            }
            out[y * out_w + x] = ss as f32;
        }
    }
    out
}

fn vertical(src: &[f32], w: usize, h: usize, out_h: usize) -> Vec<f32> {
    let taps = coefficients(h, out_h);
    let mut out = vec![0f32; w * out_h];
    for (y, tap) in taps.iter().enumerate() {
        for x in 0..w {
            let mut ss = 0f64;
            for (i, k) in tap.weights.iter().enumerate() {
                ss += src[(tap.start + i) * w + x] as f64 * k;
            }
            out[y * w + x] = ss as f32;
        }
    }
    out
}

/// Resizes one float plane (row-major `h` x `w`) to `out_h` x `out_w`. Pillow runs the vertical
/// pass first when it shrinks the image, and shrinks it more than the horizontal pass does;
/// otherwise the horizontal pass first (the order changes the float32 intermediate).
fn resize_plane(plane: &[f32], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<f32> {
    let (scale_h, scale_v) = (w as f64 / out_w as f64, h as f64 / out_h as f64);
    let vertical_first = scale_v > 1.0 && scale_v > scale_h;
    let mut cur = plane.to_vec();
    if vertical_first {
        if out_h != h {
            cur = vertical(&cur, w, h, out_h);
        }
        if out_w != w {
            cur = horizontal(&cur, w, out_h, out_w);
        }
    } else {
        if out_w != w {
            cur = horizontal(&cur, w, h, out_w);
        }
        if out_h != h {
            cur = vertical(&cur, out_w, h, out_h);
        }
    }
    cur
}

/// Interleaved RGB8 (`h` x `w` x 3) → interleaved float32 (`size` x `size` x 3) in [0, 255],
/// bit-exact with clean-fid's `make_resizer("PIL", False, "bicubic", (size, size))`.
pub fn resize_clean(rgb: &[u8], w: usize, h: usize, size: usize) -> Vec<f32> {
    assert_eq!(rgb.len(), w * h * 3, "RGB buffer does not match {w}x{h}");
    let mut out = vec![0f32; size * size * 3];
    for c in 0..3 {
        let plane: Vec<f32> = rgb.iter().skip(c).step_by(3).map(|&v| v as f32).collect();
        let resized = resize_plane(&plane, w, h, size, size);
        for (i, v) in resized.into_iter().enumerate() {
            out[i * 3 + c] = v.clamp(0.0, 255.0);
        }
    }
    out
}
