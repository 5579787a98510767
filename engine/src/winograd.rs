//! 3×3 convolutions (stride 1, padding 1) on the CPU as Winograd F(2×2, 3×3): the
//! transforms in `frisket_kernels::winograd`, the 16 matrix products as one libtorch
//! batched product (MKL). Where the channel counts are large enough this needs far fewer
//! multiplications than oneDNN's direct convolution and wins despite the transforms' memory
//! passes; where they are small, the transforms cost more than they save. The values equal
//! the direct convolution's up to float32 rounding (relative 1e-6 here).
use crate::nn::{self, KernelChoice};
pub use frisket_kernels::winograd::Shape;
use frisket_kernels::winograd::{self as kernels, POSITIONS};
use std::cell::RefCell;
use tch::{Device, Kind, Tensor};

/// How float32 3×3 convolutions (stride 1, padding 1) run on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuConv {
    /// oneDNN's direct convolution for every shape.
    Direct,
    /// Winograd for every such convolution.
    Winograd,
    /// Winograd where both channel counts reach `min_channels` and the batch has at least
    /// [`MIN_TILES`] output tiles, oneDNN elsewhere: this machine's choice.
    Auto { min_channels: usize },
}

/// Output tiles (2×2 pixels each) below which the 16 products are too short for MKL and
/// the direct convolution wins.
pub const MIN_TILES: usize = 64;

impl KernelChoice for CpuConv {
    const ENV: &'static str = "FRISKET_CPU_CONV";

    /// `direct`, `winograd` or `auto` (the machine's choice).
    fn parse(forced: &str) -> Result<CpuConv, String> {
        match forced.to_ascii_lowercase().as_str() {
            "direct" => Ok(CpuConv::Direct),
            "winograd" => Ok(CpuConv::Winograd),
            "auto" => Ok(Self::for_machine()),
            other => Err(Self::unknown(other, "direct, winograd or auto")),
        }
    }

    fn for_machine() -> CpuConv {
        Self::for_isa(nn::onednn_avx512())
    }
}

impl CpuConv {
    /// This process's choice (see [`nn::choice_once`]).
    pub fn current() -> CpuConv {
        static CHOICE: std::sync::OnceLock<CpuConv> = std::sync::OnceLock::new();
        nn::choice_once(&CHOICE)
    }

    /// Where oneDNN runs its AVX-512 kernels, its direct convolution is fast enough that
    /// Winograd wins only from 512 channels on (SD's deeper levels, its VAE decoder); with its
    /// AVX2 kernels, from 192 (measured per shape on both: `make bench` prints the table).
    pub fn for_isa(onednn_avx512: bool) -> CpuConv {
        CpuConv::Auto { min_channels: if onednn_avx512 { 512 } else { 192 } }
    }

    /// Whether a convolution of the image `x` to `c_out` channels runs as Winograd.
    pub fn winograd_for(self, x: Shape, c_out: usize) -> bool {
        match self {
            CpuConv::Direct => false,
            CpuConv::Winograd => true,
            CpuConv::Auto { min_channels } => x.c.min(c_out) >= min_channels && x.tiles() >= MIN_TILES,
        }
    }
}

/// Whether `x ⋆ weight` (stride 1, padding 1) runs as Winograd here: a float32 3×3
/// convolution on the CPU, with no gradient to record (the transforms are not libtorch
/// operations), of a shape the process's [`CpuConv`] gives to Winograd.
pub fn applies(x: &Tensor, weight: &Tensor) -> bool {
    let (Ok((n, c_in, h, w)), Ok((c_out, _, kh, kw))) = (x.size4(), weight.size4()) else { return false };
    kh == 3
        && kw == 3
        && x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && weight.kind() == Kind::Float
        && !x.requires_grad()
        && !weight.requires_grad()
        && CpuConv::current().winograd_for(Shape { n: dim(n), h: dim(h), w: dim(w), c: dim(c_in) }, dim(c_out))
}

/// Values of V and M per band (8 MiB together), so that the buffers stay in the caches
/// between the transforms and the product where the channels are few; at least
/// [`MIN_BAND`] tiles.
const BAND_VALUES: usize = 2 << 20;

/// The fewest tiles a band has (the products' rows): MKL packs U once per product, which
/// shorter bands would repeat too often for the larger channel counts.
const MIN_BAND: usize = 512;

thread_local! {
    /// U, V and M, kept per thread between calls: fresh buffers of this size come from
    /// the kernel page by page, which costs about as much as the transforms.
    static SCRATCH: RefCell<[Vec<f32>; 3]> = RefCell::default();
}

/// A dense float32 CPU tensor's values.
///
/// # Safety
/// `t` must be a contiguous float32 CPU tensor, alive and not written to while the slice is.
unsafe fn values(t: &Tensor) -> &[f32] {
    std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel())
}

/// A float32 tensor over the first values of `buffer`.
///
/// # Safety
/// `buffer` must outlive the tensor and hold at least `size`'s product of values; Rust
/// must not read or write those values while libtorch does.
unsafe fn tensor_over(buffer: &mut [f32], size: &[i64]) -> Tensor {
    let strides: Vec<i64> = (0..size.len()).map(|d| size[d + 1..].iter().product()).collect();
    debug_assert!(size.iter().product::<i64>() as usize <= buffer.len());
    Tensor::f_from_blob(buffer.as_mut_ptr() as *const u8, size, &strides, Kind::Float, Device::Cpu)
        .expect("a float32 CPU tensor over a buffer")
}

fn dim(v: i64) -> usize {
    usize::try_from(v).expect("tensor sizes are not negative")
}

/// `x ⋆ weight + bias` with stride 1 and padding 1, for `x` [N, C, H, W] and `weight`
/// [C_out, C, 3, 3] as [`applies`] accepts them: the result is channels-last, as oneDNN's.
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let (n, c, h, w) = x.size4().expect("[N, C, H, W] input");
    let (c_out, _, _, _) = weight.size4().expect("[C_out, C, 3, 3] weight");
    let s = Shape { n: dim(n), h: dim(h), w: dim(w), c: dim(c) };
    let out_shape = Shape { c: dim(c_out), ..s };
    let tiles = s.tiles();
    let band = (BAND_VALUES / (POSITIONS * (s.c + out_shape.c))).max(MIN_BAND).min(tiles);
    // NHWC copies (no-ops for the channels-last tensors the models keep).
    let x = x.permute([0, 2, 3, 1]).contiguous();
    let weight = weight.permute([0, 2, 3, 1]).contiguous();
    let bias = bias.map(|b| b.to_kind(Kind::Float).contiguous());
    let y = Tensor::empty([n, h, w, c_out], (Kind::Float, Device::Cpu));
    SCRATCH.with(|scratch| {
        let [u, v, m] = &mut *scratch.borrow_mut();
        for (buffer, len) in [
            (&mut *u, POSITIONS * s.c * out_shape.c),
            (&mut *v, POSITIONS * band * s.c),
            (&mut *m, POSITIONS * band * out_shape.c),
        ] {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
        }
        // SAFETY: `x`, `weight`, `bias` and `y` are contiguous float32 CPU tensors made
        // above and alive to the end; `y` is fresh and only written here. The scratch
        // buffers outlive the tensors over them, and each is either in Rust's hands (a
        // transform) or libtorch's (the product), never both at once.
        unsafe {
            kernels::transform_weights(values(&weight), s.c, out_shape.c, &mut u[..POSITIONS * s.c * out_shape.c]);
            let u_t = tensor_over(u, &[POSITIONS as i64, c_out, c]).transpose(1, 2);
            let y_values = std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, y.numel());
            let bias = bias.as_ref().map(|b| values(b));
            for start in (0..tiles).step_by(band) {
                let tiles_here = start..tiles.min(start + band);
                let rows = tiles_here.len();
                kernels::transform_input(values(&x), s, tiles_here.clone(), &mut v[..POSITIONS * rows * s.c]);
                let product = tensor_over(m, &[POSITIONS as i64, rows as i64, c_out]);
                let _ = tensor_over(v, &[POSITIONS as i64, rows as i64, c]).bmm_out(&product, &u_t);
                drop(product);
                kernels::transform_output(&m[..POSITIONS * rows * out_shape.c], out_shape, tiles_here, bias, y_values);
            }
        }
    });
    y.permute([0, 3, 1, 2])
}

#[cfg(test)]
mod tests {
    use super::CpuConv::{self, Auto, Direct, Winograd};
    use super::Shape;
    use crate::nn::KernelChoice;

    #[test]
    fn the_choice_follows_the_override_then_the_isa() {
        assert_eq!(CpuConv::parse("Direct"), Ok(Direct));
        assert_eq!(CpuConv::parse("winograd"), Ok(Winograd));
        assert!(CpuConv::parse("fft").unwrap_err().contains("expected direct, winograd or auto"));
        assert_eq!(CpuConv::for_isa(true), Auto { min_channels: 512 });
        assert_eq!(CpuConv::for_isa(false), Auto { min_channels: 192 });
        let avx2 = CpuConv::for_isa(false);
        let image = |n, side, c| Shape { n, h: side, w: side, c };
        assert!(avx2.winograd_for(image(2, 64, 320), 320), "2048 tiles");
        assert!(!avx2.winograd_for(image(2, 64, 320), 128), "both channel counts must reach the threshold");
        assert!(!avx2.winograd_for(image(2, 8, 1280), 1280), "32 tiles: too few");
        assert!(avx2.winograd_for(image(1, 15, 320), 320), "an odd side's half-used tiles count: 8 × 8 = 64");
        assert!(Winograd.winograd_for(image(1, 2, 4), 4));
        assert!(!Direct.winograd_for(image(4, 64, 1280), 1280));
    }
}
