//! Winograd's minimal filtering F(2×2, 3×3) for 3×3 convolutions with stride 1 and
//! padding 1 on channels-last (NHWC) images: each 2×2 output tile is computed from its
//! 4×4 input window as Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A. Summed over input channels, the
//! element-wise products become 16 independent matrix products
//! `M[p] = V[p] · U[p]` ([tiles, C] · [C, C_out]), which the caller runs as one batched
//! product; these are the transforms around it. 16 multiplications per 4 outputs instead
//! of 36: 2.25× fewer. The transform coefficients are 0, ±1 and ±½, so the rounding stays
//! of a direct convolution's order of magnitude.
//!
//! Each transform walks the tiles and, per tile, the channels in chunks of [`LANES`]: a
//! chunk of each of the 16 (or 9) sources is read into fixed-size arrays, combined, and
//! written to its 16 (or 4) destinations, which the compiler turns into vector
//! instructions. On x86-64 the loops are compiled a second time for AVX2, chosen at run time.

/// Window positions per tile (4×4), the batch of the matrix product.
pub const POSITIONS: usize = 16;

use std::ops::Range;

const LANES: usize = 8;
type Lane = [f32; LANES];

/// An NHWC image's dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Shape {
    /// Output tiles per column and row (an odd size ends in a half-used tile).
    pub fn tile_grid(&self) -> (usize, usize) {
        (self.h.div_ceil(2), self.w.div_ceil(2))
    }

    /// Tiles in the whole batch: the rows of each position's matrix.
    pub fn tiles(&self) -> usize {
        let (th, tw) = self.tile_grid();
        self.n * th * tw
    }

    /// Values in the image.
    pub fn len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bᵀ d B of one chunk of a 4×4 window (Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0],
/// [0, 1, 0, −1]]), window and result in row-major order.
#[inline(always)]
fn input_tile(d: &[Lane; POSITIONS]) -> [Lane; POSITIONS] {
    let mut t = [[0.0; LANES]; POSITIONS];
    for j in 0..4 {
        for k in 0..LANES {
            t[j][k] = d[j][k] - d[8 + j][k];
            t[4 + j][k] = d[4 + j][k] + d[8 + j][k];
            t[8 + j][k] = d[8 + j][k] - d[4 + j][k];
            t[12 + j][k] = d[4 + j][k] - d[12 + j][k];
        }
    }
    let mut v = [[0.0; LANES]; POSITIONS];
    for r in [0, 4, 8, 12] {
        for k in 0..LANES {
            v[r][k] = t[r][k] - t[r + 2][k];
            v[r + 1][k] = t[r + 1][k] + t[r + 2][k];
            v[r + 2][k] = t[r + 2][k] - t[r + 1][k];
            v[r + 3][k] = t[r + 1][k] - t[r + 3][k];
        }
    }
    v
}

/// G g Gᵀ of one chunk of a 3×3 filter (G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]),
/// filter and result in row-major order.
#[inline(always)]
fn weight_tile(g: &[Lane; 9]) -> [Lane; POSITIONS] {
    let mut t = [[0.0; LANES]; 12];
    for j in 0..3 {
        for k in 0..LANES {
            t[j][k] = g[j][k];
            t[3 + j][k] = 0.5 * (g[j][k] + g[3 + j][k] + g[6 + j][k]);
            t[6 + j][k] = 0.5 * (g[j][k] - g[3 + j][k] + g[6 + j][k]);
            t[9 + j][k] = g[6 + j][k];
        }
    }
    let mut u = [[0.0; LANES]; POSITIONS];
    for i in 0..4 {
        let (r, o) = (3 * i, 4 * i);
        for k in 0..LANES {
            u[o][k] = t[r][k];
            u[o + 1][k] = 0.5 * (t[r][k] + t[r + 1][k] + t[r + 2][k]);
            u[o + 2][k] = 0.5 * (t[r][k] - t[r + 1][k] + t[r + 2][k]);
            u[o + 3][k] = t[r + 2][k];
        }
    }
    u
}

/// Aᵀ m A of one chunk of a tile's products (Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]), plus
/// the bias: the 2×2 outputs in row-major order.
#[inline(always)]
fn output_tile(m: &[Lane; POSITIONS], bias: &Lane) -> [Lane; 4] {
    let mut t = [[0.0; LANES]; 8];
    for j in 0..4 {
        for k in 0..LANES {
            t[j][k] = m[j][k] + m[4 + j][k] + m[8 + j][k];
            t[4 + j][k] = m[4 + j][k] - m[8 + j][k] - m[12 + j][k];
        }
    }
    let mut y = [[0.0; LANES]; 4];
    for (r, o) in [(0, 0), (4, 2)] {
        for k in 0..LANES {
            y[o][k] = t[r][k] + t[r + 1][k] + t[r + 2][k] + bias[k];
            y[o + 1][k] = t[r + 1][k] - t[r + 2][k] - t[r + 3][k] + bias[k];
        }
    }
    y
}

/// Runs `f(chunk of each source, first channel)` over one tile's channels: each source is the start of
/// `channels` values in `src` (None: zeros), each destination of `channels` values in
/// `dst` (None: dropped). Full chunks are read and written whole; the last partial chunk
/// through zero-padded copies.
#[inline(always)]
fn chunks<const S: usize, const D: usize>(
    src: &[f32],
    sources: &[Option<usize>; S],
    dst: &mut [f32],
    destinations: &[Option<usize>; D],
    channels: usize,
    f: impl Fn(&[Lane; S], usize) -> [Lane; D],
) {
    let mut from = 0;
    while from < channels {
        let len = LANES.min(channels - from);
        let mut input = [[0.0; LANES]; S];
        for (lane, start) in input.iter_mut().zip(sources) {
            if let Some(start) = *start {
                let at = start + from;
                if len == LANES {
                    *lane = src[at..at + LANES].try_into().expect("a full chunk");
                } else {
                    lane[..len].copy_from_slice(&src[at..at + len]);
                }
            }
        }
        let output = f(&input, from);
        for (lane, start) in output.iter().zip(destinations) {
            if let Some(start) = *start {
                let at = start + from;
                if len == LANES {
                    dst[at..at + LANES].copy_from_slice(lane);
                } else {
                    dst[at..at + len].copy_from_slice(&lane[..len]);
                }
            }
        }
        from += len;
    }
}

/// Compiles `$body` (a function of the listed arguments) twice on x86-64, for the baseline
/// and for AVX2, and calls the AVX2 one where the CPU has it.
macro_rules! dispatch {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $name($($arg: $ty),*) {
            $body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { $name($($arg),*) };
        }
        $body($($arg),*)
    };
}

/// Bᵀ d B of the windows of the tiles in `band` (numbered row by row through the batch),
/// with the zero padding of a padding-1 convolution: `x` is the NHWC image, `v` receives
/// [POSITIONS, band.len(), c] (position p = 4·row + column of the transformed window).
pub fn transform_input(x: &[f32], s: Shape, band: Range<usize>, v: &mut [f32]) {
    assert_eq!(x.len(), s.len(), "input length");
    assert!(band.end <= s.tiles(), "tiles {band:?} of {}", s.tiles());
    assert_eq!(v.len(), POSITIONS * band.len() * s.c, "transformed input length");
    dispatch!(input_avx2, input_body, (x: &[f32], s: Shape, band: Range<usize>, v: &mut [f32]));
}

#[inline(always)]
fn input_body(x: &[f32], s: Shape, band: Range<usize>, v: &mut [f32]) {
    let rows = band.len();
    let (th, tw) = s.tile_grid();
    let c = s.c;
    for (tile, index) in band.enumerate() {
        let (n, ty, tx) = (index / (th * tw), index / tw % th, index % tw);
        // The 4×4 window starts one pixel above and left of the tile (padding 1).
        let mut sources = [None; POSITIONS];
        for (q, start) in sources.iter_mut().enumerate() {
            let (y, xx) = ((2 * ty + q / 4).wrapping_sub(1), (2 * tx + q % 4).wrapping_sub(1));
            if y < s.h && xx < s.w {
                *start = Some(((n * s.h + y) * s.w + xx) * c);
            }
        }
        let destinations: [Option<usize>; POSITIONS] = std::array::from_fn(
            #[inline(always)]
            |p| Some((p * rows + tile) * c),
        );
        chunks(
            x,
            &sources,
            v,
            &destinations,
            c,
            #[inline(always)]
            |d, _| input_tile(d),
        );
    }
}

/// G g Gᵀ of every 3×3 filter: `w` holds the weights channels-last, [c_out, 3, 3, c_in]
/// (the memory of libtorch's channels-last [c_out, c_in, 3, 3] tensor); `u` receives
/// [POSITIONS, c_out, c_in], each position's matrix transposed (the caller multiplies by
/// its transpose, a view).
pub fn transform_weights(w: &[f32], c_in: usize, c_out: usize, u: &mut [f32]) {
    assert_eq!(w.len(), c_out * 9 * c_in, "weight length");
    assert_eq!(u.len(), POSITIONS * c_out * c_in, "transformed weight length");
    dispatch!(weights_avx2, weights_body, (w: &[f32], c_in: usize, c_out: usize, u: &mut [f32]));
}

#[inline(always)]
fn weights_body(w: &[f32], c_in: usize, c_out: usize, u: &mut [f32]) {
    let plane = c_out * c_in;
    for o in 0..c_out {
        let sources: [Option<usize>; 9] = std::array::from_fn(
            #[inline(always)]
            |q| Some((o * 9 + q) * c_in),
        );
        let destinations: [Option<usize>; POSITIONS] = std::array::from_fn(
            #[inline(always)]
            |p| Some(p * plane + o * c_in),
        );
        chunks(
            w,
            &sources,
            u,
            &destinations,
            c_in,
            #[inline(always)]
            |g, _| weight_tile(g),
        );
    }
}

/// Aᵀ m A of the tiles in `band`, plus the bias: `m` holds their products,
/// [POSITIONS, band.len(), c_out]; `y` receives the NHWC output of shape `s` (whose `c` is
/// c_out) at those tiles.
pub fn transform_output(m: &[f32], s: Shape, band: Range<usize>, bias: Option<&[f32]>, y: &mut [f32]) {
    assert!(band.end <= s.tiles(), "tiles {band:?} of {}", s.tiles());
    assert_eq!(m.len(), POSITIONS * band.len() * s.c, "products length");
    assert_eq!(y.len(), s.len(), "output length");
    let zeros;
    let bias = match bias {
        Some(b) => {
            assert_eq!(b.len(), s.c, "bias length");
            b
        }
        None => {
            zeros = vec![0.0; s.c];
            &zeros
        }
    };
    dispatch!(output_avx2, output_body, (m: &[f32], s: Shape, band: Range<usize>, bias: &[f32], y: &mut [f32]));
}

#[inline(always)]
fn output_body(m: &[f32], s: Shape, band: Range<usize>, bias: &[f32], y: &mut [f32]) {
    let rows = band.len();
    let (th, tw) = s.tile_grid();
    let c = s.c;
    for (tile, index) in band.enumerate() {
        let (n, ty, tx) = (index / (th * tw), index / tw % th, index % tw);
        let sources: [Option<usize>; POSITIONS] = std::array::from_fn(
            #[inline(always)]
            |p| Some((p * rows + tile) * c),
        );
        // Output pixels of the tile in row-major order; None past an odd edge.
        let mut destinations = [None; 4];
        for (q, start) in destinations.iter_mut().enumerate() {
            let (yy, xx) = (2 * ty + q / 2, 2 * tx + q % 2);
            if yy < s.h && xx < s.w {
                *start = Some(((n * s.h + yy) * s.w + xx) * c);
            }
        }
        chunks(
            m,
            &sources,
            y,
            &destinations,
            c,
            #[inline(always)]
            |p, from| {
                let len = LANES.min(c - from);
                let mut b = [0.0; LANES];
                b[..len].copy_from_slice(&bias[from..from + len]);
                output_tile(p, &b)
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct padding-1 3×3 convolution, NHWC input, [c_out, 3, 3, c_in] weights.
    fn direct(x: &[f32], s: Shape, w: &[f32], c_out: usize, bias: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f64; s.n * s.h * s.w * c_out];
        for n in 0..s.n {
            for yy in 0..s.h {
                for xx in 0..s.w {
                    for o in 0..c_out {
                        let mut acc = bias[o] as f64;
                        for i in 0..3 {
                            for j in 0..3 {
                                let (sy, sx) = ((yy + i).wrapping_sub(1), (xx + j).wrapping_sub(1));
                                if sy >= s.h || sx >= s.w {
                                    continue;
                                }
                                for k in 0..s.c {
                                    acc += x[((n * s.h + sy) * s.w + sx) * s.c + k] as f64
                                        * w[((o * 3 + i) * 3 + j) * s.c + k] as f64;
                                }
                            }
                        }
                        y[((n * s.h + yy) * s.w + xx) * c_out + o] = acc;
                    }
                }
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    /// A deterministic spread of values in [-1, 1).
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The three transforms around a plain per-position matrix product, band by band, equal
    /// a direct convolution, on even and odd sizes and channel counts that do and do not
    /// fill a chunk of lanes.
    #[test]
    fn transforms_around_the_products_equal_a_direct_convolution() {
        for (s, c_out) in [
            (Shape { n: 2, h: 4, w: 6, c: 3 }, 5),
            (Shape { n: 1, h: 5, w: 3, c: 17 }, 33),
            (Shape { n: 1, h: 1, w: 1, c: 16 }, 2),
            (Shape { n: 3, h: 7, w: 8, c: 40 }, 16),
        ] {
            let x = values(s.len(), 1);
            let w = values(c_out * 9 * s.c, 2);
            let bias = values(c_out, 3);
            let tiles = s.tiles();
            let mut u = vec![f32::NAN; POSITIONS * c_out * s.c];
            transform_weights(&w, s.c, c_out, &mut u);
            let out_shape = Shape { c: c_out, ..s };
            let mut y = vec![f32::NAN; out_shape.len()];
            // Bands of 3 tiles, the last one shorter where 3 does not divide the count.
            for start in (0..tiles).step_by(3) {
                let band = start..tiles.min(start + 3);
                let rows = band.len();
                let mut v = vec![f32::NAN; POSITIONS * rows * s.c];
                transform_input(&x, s, band.clone(), &mut v);
                let mut m = vec![0.0f32; POSITIONS * rows * c_out];
                for p in 0..POSITIONS {
                    for t in 0..rows {
                        for o in 0..c_out {
                            m[(p * rows + t) * c_out + o] =
                                (0..s.c).map(|k| v[(p * rows + t) * s.c + k] * u[(p * c_out + o) * s.c + k]).sum();
                        }
                    }
                }
                transform_output(&m, out_shape, band, Some(&bias), &mut y);
            }
            let want = direct(&x, s, &w, c_out, &bias);
            let worst = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "{s:?} → {c_out}: max difference {worst}");
        }
    }
}
