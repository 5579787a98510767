//! The few layers Stable Diffusion needs, as plain tensors plus functional libtorch ops.
//! Parameters are leaves without grad; Grad-SAM differentiates activations, not weights.
use super::weights::WeightPath;
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// Whether the CPU fast paths below apply: float32 tensors on the CPU, where libtorch runs
/// convolutions through oneDNN but matrix products through MKL.
fn cpu_float(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::Float
}

/// How float32 linear layers run on the CPU: as oneDNN 1×1 convolutions or as libtorch's
/// matrix product (MKL). Which is faster depends on the machine: with oneDNN's AVX-512
/// kernels the convolution is much faster on these shapes, with its AVX2 kernels slower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuLinear {
    OneDnn,
    Mkl,
}

/// A CPU kernel choice: this machine's unless an environment variable forces one.
pub trait KernelChoice: Copy {
    /// The variable that overrides the choice.
    const ENV: &'static str;

    /// The override's value, in any case; Err names the variable and the values it takes.
    fn parse(forced: &str) -> Result<Self, String>;

    /// The choice for this machine when nothing is forced.
    fn for_machine() -> Self;

    /// [`KernelChoice::ENV`] when set, otherwise [`KernelChoice::for_machine`]. Err for an
    /// unknown override; binaries call this at start to refuse it there.
    fn from_env() -> Result<Self, String> {
        match std::env::var(Self::ENV) {
            Ok(forced) => Self::parse(&forced),
            Err(_) => Ok(Self::for_machine()),
        }
    }

    /// The Err of [`KernelChoice::parse`].
    fn unknown(value: &str, expected: &str) -> String {
        format!("{}={value}: expected {expected}", Self::ENV)
    }
}

/// [`KernelChoice::from_env`], made once per process in `cell` (an unknown override falls
/// back to the machine's choice here; the binaries have refused it at start).
pub fn choice_once<T: KernelChoice + Send + Sync>(cell: &'static std::sync::OnceLock<T>) -> T {
    *cell.get_or_init(|| T::from_env().unwrap_or_else(|_| T::for_machine()))
}

impl CpuLinear {
    /// This process's choice (see [`choice_once`]).
    pub fn current() -> CpuLinear {
        static CHOICE: std::sync::OnceLock<CpuLinear> = std::sync::OnceLock::new();
        choice_once(&CHOICE)
    }
}

impl KernelChoice for CpuLinear {
    const ENV: &'static str = "FRISKET_CPU_LINEAR";

    /// `onednn` or `mkl`.
    fn parse(forced: &str) -> Result<CpuLinear, String> {
        match forced.to_ascii_lowercase().as_str() {
            "onednn" => Ok(CpuLinear::OneDnn),
            "mkl" => Ok(CpuLinear::Mkl),
            other => Err(Self::unknown(other, "onednn or mkl")),
        }
    }

    /// oneDNN where it runs its AVX-512 kernels ([`onednn_avx512`]), MKL otherwise.
    fn for_machine() -> CpuLinear {
        if onednn_avx512() {
            CpuLinear::OneDnn
        } else {
            CpuLinear::Mkl
        }
    }
}

/// Whether oneDNN runs its AVX-512 kernels in this process: the CPU has AVX-512 and
/// `ONEDNN_MAX_CPU_ISA` does not hold oneDNN below it ([`onednn_isa_is_avx512`]).
pub fn onednn_avx512() -> bool {
    onednn_isa_is_avx512(avx512_core(), std::env::var("ONEDNN_MAX_CPU_ISA").ok().as_deref())
}

/// True when the CPU has AVX-512 (F, BW, VL, DQ: oneDNN's `avx512_core`) and `max_isa`
/// (`ONEDNN_MAX_CPU_ISA`) does not hold oneDNN below it.
pub fn onednn_isa_is_avx512(avx512_core: bool, max_isa: Option<&str>) -> bool {
    let isa_allows = max_isa
        .map(str::to_ascii_uppercase)
        .is_none_or(|isa| isa == "ALL" || isa.starts_with("AVX512") || isa.starts_with("AVX10") || isa.contains("AMX"));
    avx512_core && isa_allows
}

#[cfg(target_arch = "x86_64")]
fn avx512_core() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512dq")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_core() -> bool {
    false
}

/// The same values as an NCHW tensor with NHWC strides ("channels last"), the layout in
/// which oneDNN convolutions need no reordering. A no-op when already so laid out.
pub fn channels_last(x: &Tensor) -> Tensor {
    if is_channels_last(x) {
        return x.shallow_clone();
    }
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// True when a 4-d tensor is densely stored in NHWC order.
pub fn is_channels_last(x: &Tensor) -> bool {
    let (Ok((_, c, h, w)), stride) = (x.size4(), x.stride()) else { return false };
    stride[1] == 1 && (w == 1 || stride[3] == c) && (h == 1 || stride[2] == c * w) && stride[0] == c * h * w
}

/// The layout convolution weights are kept in: float32 4-d tensors on the CPU
/// channels-last, which makes oneDNN run the convolution (and return its output)
/// channels-last, faster on the CPU and letting the layers in between keep that layout
/// without copies (the values are the same up to rounding). Other tensors as they are.
pub fn conv_layout(t: Tensor) -> Tensor {
    if t.dim() == 4 && cpu_float(&t) {
        channels_last(&t)
    } else {
        t
    }
}

/// Rows of a linear layer at and above which the oneDNN path multiplies through a 1×1
/// convolution (below it MKL's call overhead is the smaller one).
const ONEDNN_MIN_ROWS: i64 = 32;

/// Whether libtorch runs a 1×1 convolution of a [1, C, rows, 1] input through oneDNN; the
/// condition is its `ConvParams::use_mkldnn` for that shape (otherwise it would take its
/// slow reference path, and a plain matrix product is better).
fn onednn_runs_1x1(rows: i64, in_dim: i64) -> bool {
    rows >= ONEDNN_MIN_ROWS && rows * in_dim > 20480 && tch::get_num_threads() > 1
}

pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(p: &WeightPath, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = p.get("weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(p.get("bias", &[out_dim])?) } else { None };
        Ok(Self { weight, bias })
    }

    /// A 1×1 convolution's weights used as a linear layer (old VAE attention checkpoints
    /// store `proj_attn`/`query` as [out, in] or as [out, in, 1, 1]).
    pub fn load_squeezable(p: &WeightPath, in_dim: i64, out_dim: i64) -> Result<Self> {
        // Try [out, in] first so that a missing or misshapen tensor is reported as such.
        let w = match p.get("weight", &[out_dim, in_dim]) {
            Ok(w) => w,
            Err(e) => match p.get("weight", &[out_dim, in_dim, 1, 1]) {
                Ok(w) => w.reshape([out_dim, in_dim]),
                Err(_) => return Err(e),
            },
        };
        Ok(Self { weight: w, bias: Some(p.get("bias", &[out_dim])?) })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (&in_dim, lead) = size.split_last().expect("linear input has at least one dimension");
        let rows: i64 = lead.iter().product();
        if cpu_float(x)
            && cpu_float(&self.weight)
            && onednn_runs_1x1(rows, in_dim)
            && CpuLinear::current() == CpuLinear::OneDnn
        {
            // x·Wᵀ + b as a 1×1 convolution of the rows laid out as a [1, in, rows, 1]
            // channels-last image (a view of contiguous rows), whose channels-last output
            // is the [rows, out] result: oneDNN instead of MKL, same values up to rounding.
            let (out_dim, _) = self.weight.size2().expect("[out, in] weight");
            let img = x.contiguous().view([1, rows, 1, in_dim]).permute([0, 3, 1, 2]);
            let w = self.weight.reshape([out_dim, in_dim, 1, 1]);
            let y = img.conv2d(&w, self.bias.as_ref(), [1, 1], [0, 0], [1, 1], 1);
            let mut out_size = lead.to_vec();
            out_size.push(out_dim);
            return y.permute([0, 2, 3, 1]).reshape(out_size);
        }
        x.linear(&self.weight, self.bias.as_ref())
    }
}

pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: i64,
    pub padding: i64,
}

impl Conv2d {
    pub fn load(p: &WeightPath, in_ch: i64, out_ch: i64, kernel: i64, stride: i64, padding: i64) -> Result<Self> {
        let weight = p.get("weight", &[out_ch, in_ch, kernel, kernel])?;
        let bias = Some(p.get("bias", &[out_ch])?);
        let weight = conv_layout(weight);
        Ok(Self { weight, bias, stride, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.stride == 1 && self.padding == 1 && super::winograd::applies(x, &self.weight) {
            return super::winograd::conv3x3(x, &self.weight, self.bias.as_ref());
        }
        x.conv2d(&self.weight, self.bias.as_ref(), [self.stride, self.stride], [self.padding, self.padding], [1, 1], 1)
    }
}

pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(p: &WeightPath, groups: i64, channels: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: p.get("weight", &[channels])?, bias: p.get("bias", &[channels])?, groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub dim: i64,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(p: &WeightPath, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: p.get("weight", &[dim])?, bias: p.get("bias", &[dim])?, dim, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn load(p: &WeightPath, count: i64, dim: i64) -> Result<Self> {
        Ok(Self { weight: p.get("weight", &[count, dim])? })
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// Activation functions by their diffusers/transformers config names.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Silu,
    Gelu,
    GeluTanh,
    QuickGelu,
    Relu,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            other => anyhow::bail!("unsupported activation `{other}`"),
        })
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
            Self::Relu => x.relu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::onednn_isa_is_avx512;
    use super::CpuLinear::{self, Mkl, OneDnn};
    use super::KernelChoice;

    #[test]
    fn cpu_linear_override_parses() {
        assert_eq!(CpuLinear::parse("MKL"), Ok(Mkl));
        assert_eq!(CpuLinear::parse("onednn"), Ok(OneDnn));
        assert!(CpuLinear::parse("blas").unwrap_err().contains("expected onednn or mkl"));
    }

    #[test]
    fn onednn_avx512_needs_the_cpu_and_the_isa_cap() {
        assert!(onednn_isa_is_avx512(true, None));
        assert!(!onednn_isa_is_avx512(false, None));
        assert!(!onednn_isa_is_avx512(true, Some("AVX2")));
        assert!(onednn_isa_is_avx512(true, Some("avx512_core_vnni")));
        assert!(onednn_isa_is_avx512(true, Some("ALL")));
        assert!(!onednn_isa_is_avx512(false, Some("ALL")));
    }
}
