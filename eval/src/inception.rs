//! The user's Inception network, loaded from a file (nothing is downloaded):
//! - NVIDIA's TorchScript `inception-2015-12-05.pt` (clean-fid's network), called through its
//!   `forward(img, return_features=True)` on 299 px input in [0, 255];
//! - pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth`: the network is built here
//!   (torchvision's Inception v3 with pytorch-fid's FID blocks: average pools that exclude padding,
//!   a max pool in the last block) and run up to the 2,048-d pool features.
//!
//! Both return [N, 2048] float32 pool features. The state-dict network also gives torch-fidelity's
//! "64" features (the stem up to the first max pool, averaged over space), which the paper's
//! per-pair number uses (`pair64`).
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::nn::{self, ModuleT};
use tch::{CModule, IValue, Kind, Tensor};

pub const FEATURES: i64 = 2048;
pub const INPUT_SIZE: usize = 299;

pub enum Inception {
    TorchScript(CModule),
    StateDict { _vs: nn::VarStore, stem: nn::SequentialT, rest: nn::SequentialT },
}

impl Inception {
    /// A `.pth` file is read as pytorch-fid's state dict, anything else as TorchScript.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            bail!("Inception weights not found: {} (give NVIDIA's inception-2015-12-05.pt or pytorch-fid's pt_inception-2015-12-05-6726825d.pth)", path.display());
        }
        if path.extension().and_then(|e| e.to_str()) == Some("pth") {
            Self::load_state_dict(path)
        } else {
            let mut module =
                CModule::load(path).with_context(|| format!("{} is not a TorchScript module", path.display()))?;
            module.set_eval();
            Ok(Inception::TorchScript(module))
        }
    }

    fn load_state_dict(path: &Path) -> Result<Self> {
        let mut vs = nn::VarStore::new(tch::Device::Cpu);
        let (stem, rest) = fid_inception(&vs.root());
        let tensors = crate::load_state_dict(path)?;
        tch::no_grad(|| -> Result<()> {
            for (name, mut var) in vs.variables() {
                let src = tensors
                    .get(&name)
                    .with_context(|| format!("{} has no tensor {name}: not pytorch-fid's Inception", path.display()))?;
                if src.size() != var.size() {
                    bail!("{}: {name} has shape {:?}, expected {:?}", path.display(), src.size(), var.size());
                }
                var.copy_(&src.to_kind(var.kind()));
            }
            Ok(())
        })?;
        vs.freeze();
        Ok(Inception::StateDict { _vs: vs, stem, rest })
    }

    /// [N, 3, 299, 299] float32 pixels as `mode` prepares them (crate::Mode::preprocess) → [N, 2048].
    /// clean mode gives [0, 255]: the TorchScript network's own entry (`forward(img,
    /// return_features=True)`) normalises to (x − 128) / 128, the state-dict network gets that
    /// normalisation here. The other modes give [-1, 1], for pytorch-fid's network only.
    pub fn features(&self, x: &Tensor, mode: crate::Mode) -> Result<Tensor> {
        let n = x.size()[0];
        let out = tch::no_grad(|| -> Result<Tensor> {
            match (self, mode) {
                (Inception::TorchScript(module), crate::Mode::Clean) => {
                    match module.forward_is(&[IValue::Tensor(x.shallow_clone()), IValue::Bool(true)])? {
                        IValue::Tensor(t) => Ok(t),
                        _ => bail!(
                            "the TorchScript network did not return a tensor (not clean-fid's Inception interface)"
                        ),
                    }
                }
                (Inception::TorchScript(_), crate::Mode::PytorchFid | crate::Mode::Torchmetrics) => {
                    bail!("{} mode runs pytorch-fid's network: give its pt_inception-*.pth state dict", mode.name())
                }
                (Inception::StateDict { stem, rest, .. }, crate::Mode::Clean) => {
                    Ok(rest.forward_t(&stem.forward_t(&((x - 128.0) / 128.0), false), false))
                }
                (Inception::StateDict { stem, rest, .. }, crate::Mode::PytorchFid | crate::Mode::Torchmetrics) => {
                    Ok(rest.forward_t(&stem.forward_t(x, false), false))
                }
            }
        })?;
        Ok(out.to_kind(Kind::Float).view([n, FEATURES]))
    }
}

/// The width of torch-fidelity's "64" features.
pub const FEATURES_64: i64 = 64;

impl Inception {
    /// torch-fidelity's "64" features (torchmetrics' `FrechetInceptionDistance(feature=64)`):
    /// [N, 3, 299, 299] in [-1, 1] (`Mode::Torchmetrics` preprocessing) → the stem's output after
    /// the first max pool, averaged over space, [N, 64]. pytorch-fid's state dict only (NVIDIA's
    /// TorchScript file exposes no intermediate layer).
    pub fn features_64(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Inception::StateDict { stem, .. } => Ok(tch::no_grad(|| {
                stem.forward_t(x, false).adaptive_avg_pool2d([1, 1]).flatten(1, -1).to_kind(Kind::Float)
            })),
            Inception::TorchScript(_) => {
                bail!("the 64-feature layer needs pytorch-fid's pt_inception-*.pth state dict (the network torchmetrics loads)")
            }
        }
    }
}

fn conv_bn(p: nn::Path, c_in: i64, c_out: i64, ksize: [i64; 2], pad: [i64; 2], stride: i64) -> nn::SequentialT {
    let cfg =
        nn::ConvConfigND::<[i64; 2]> { stride: [stride, stride], padding: pad, bias: false, ..Default::default() };
    let bn = nn::BatchNormConfig { eps: 0.001, ..Default::default() };
    nn::seq_t()
        .add(nn::conv(&p / "conv", c_in, c_out, ksize, cfg))
        .add(nn::batch_norm2d(&p / "bn", c_out, bn))
        .add_fn(|xs| xs.relu())
}

fn sq(p: nn::Path, c_in: i64, c_out: i64, k: i64, pad: i64, stride: i64) -> nn::SequentialT {
    conv_bn(p, c_in, c_out, [k, k], [pad, pad], stride)
}

fn max_pool(xs: &Tensor, stride: i64, pad: i64) -> Tensor {
    xs.max_pool2d([3, 3], [stride, stride], [pad, pad], [1, 1], false)
}

/// pytorch-fid's pools: 3x3, stride 1, padding 1, count_include_pad=False.
fn avg_pool(xs: &Tensor) -> Tensor {
    xs.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>)
}

fn chain(xs: &Tensor, layers: &[&nn::SequentialT]) -> Tensor {
    layers.iter().fold(xs.shallow_clone(), |x, l| x.apply_t(*l, false))
}

fn inception_a(p: nn::Path, c_in: i64, c_pool: i64) -> impl ModuleT {
    let b1 = sq(&p / "branch1x1", c_in, 64, 1, 0, 1);
    let b2_1 = sq(&p / "branch5x5_1", c_in, 48, 1, 0, 1);
    let b2_2 = sq(&p / "branch5x5_2", 48, 64, 5, 2, 1);
    let b3_1 = sq(&p / "branch3x3dbl_1", c_in, 64, 1, 0, 1);
    let b3_2 = sq(&p / "branch3x3dbl_2", 64, 96, 3, 1, 1);
    let b3_3 = sq(&p / "branch3x3dbl_3", 96, 96, 3, 1, 1);
    let bpool = sq(&p / "branch_pool", c_in, c_pool, 1, 0, 1);
    nn::func_t(move |xs, _| {
        Tensor::cat(
            &[
                chain(xs, &[&b1]),
                chain(xs, &[&b2_1, &b2_2]),
                chain(xs, &[&b3_1, &b3_2, &b3_3]),
                chain(&avg_pool(xs), &[&bpool]),
            ],
            1,
        )
    })
}

fn inception_b(p: nn::Path, c_in: i64) -> impl ModuleT {
    let b1 = sq(&p / "branch3x3", c_in, 384, 3, 0, 2);
    let b2_1 = sq(&p / "branch3x3dbl_1", c_in, 64, 1, 0, 1);
    let b2_2 = sq(&p / "branch3x3dbl_2", 64, 96, 3, 1, 1);
    let b2_3 = sq(&p / "branch3x3dbl_3", 96, 96, 3, 0, 2);
    nn::func_t(move |xs, _| Tensor::cat(&[chain(xs, &[&b1]), chain(xs, &[&b2_1, &b2_2, &b2_3]), max_pool(xs, 2, 0)], 1))
}

fn inception_c(p: nn::Path, c_in: i64, c7: i64) -> impl ModuleT {
    let b1 = sq(&p / "branch1x1", c_in, 192, 1, 0, 1);
    let b2_1 = sq(&p / "branch7x7_1", c_in, c7, 1, 0, 1);
    let b2_2 = conv_bn(&p / "branch7x7_2", c7, c7, [1, 7], [0, 3], 1);
    let b2_3 = conv_bn(&p / "branch7x7_3", c7, 192, [7, 1], [3, 0], 1);
    let b3_1 = sq(&p / "branch7x7dbl_1", c_in, c7, 1, 0, 1);
    let b3_2 = conv_bn(&p / "branch7x7dbl_2", c7, c7, [7, 1], [3, 0], 1);
    let b3_3 = conv_bn(&p / "branch7x7dbl_3", c7, c7, [1, 7], [0, 3], 1);
    let b3_4 = conv_bn(&p / "branch7x7dbl_4", c7, c7, [7, 1], [3, 0], 1);
    let b3_5 = conv_bn(&p / "branch7x7dbl_5", c7, 192, [1, 7], [0, 3], 1);
    let bpool = sq(&p / "branch_pool", c_in, 192, 1, 0, 1);
    nn::func_t(move |xs, _| {
        Tensor::cat(
            &[
                chain(xs, &[&b1]),
                chain(xs, &[&b2_1, &b2_2, &b2_3]),
                chain(xs, &[&b3_1, &b3_2, &b3_3, &b3_4, &b3_5]),
                chain(&avg_pool(xs), &[&bpool]),
            ],
            1,
        )
    })
}

fn inception_d(p: nn::Path, c_in: i64) -> impl ModuleT {
    let b1_1 = sq(&p / "branch3x3_1", c_in, 192, 1, 0, 1);
    let b1_2 = sq(&p / "branch3x3_2", 192, 320, 3, 0, 2);
    let b2_1 = sq(&p / "branch7x7x3_1", c_in, 192, 1, 0, 1);
    let b2_2 = conv_bn(&p / "branch7x7x3_2", 192, 192, [1, 7], [0, 3], 1);
    let b2_3 = conv_bn(&p / "branch7x7x3_3", 192, 192, [7, 1], [3, 0], 1);
    let b2_4 = sq(&p / "branch7x7x3_4", 192, 192, 3, 0, 2);
    nn::func_t(move |xs, _| {
        Tensor::cat(&[chain(xs, &[&b1_1, &b1_2]), chain(xs, &[&b2_1, &b2_2, &b2_3, &b2_4]), max_pool(xs, 2, 0)], 1)
    })
}

/// pytorch-fid's FIDInceptionE_1 (`last == false`, average pool) and FIDInceptionE_2 (max pool).
fn inception_e(p: nn::Path, c_in: i64, last: bool) -> impl ModuleT {
    let b1 = sq(&p / "branch1x1", c_in, 320, 1, 0, 1);
    let b2_1 = sq(&p / "branch3x3_1", c_in, 384, 1, 0, 1);
    let b2_2a = conv_bn(&p / "branch3x3_2a", 384, 384, [1, 3], [0, 1], 1);
    let b2_2b = conv_bn(&p / "branch3x3_2b", 384, 384, [3, 1], [1, 0], 1);
    let b3_1 = sq(&p / "branch3x3dbl_1", c_in, 448, 1, 0, 1);
    let b3_2 = sq(&p / "branch3x3dbl_2", 448, 384, 3, 1, 1);
    let b3_3a = conv_bn(&p / "branch3x3dbl_3a", 384, 384, [1, 3], [0, 1], 1);
    let b3_3b = conv_bn(&p / "branch3x3dbl_3b", 384, 384, [3, 1], [1, 0], 1);
    let bpool = sq(&p / "branch_pool", c_in, 192, 1, 0, 1);
    nn::func_t(move |xs, _| {
        let b2 = chain(xs, &[&b2_1]);
        let b2 = Tensor::cat(&[chain(&b2, &[&b2_2a]), chain(&b2, &[&b2_2b])], 1);
        let b3 = chain(xs, &[&b3_1, &b3_2]);
        let b3 = Tensor::cat(&[chain(&b3, &[&b3_3a]), chain(&b3, &[&b3_3b])], 1);
        let pooled = if last { max_pool(xs, 1, 1) } else { avg_pool(xs) };
        Tensor::cat(&[chain(xs, &[&b1]), b2, b3, chain(&pooled, &[&bpool])], 1)
    })
}

/// pytorch-fid's `InceptionV3` blocks 0-3 (to the pool features), torchvision's parameter names.
/// The network in two parts: the stem up to the first max pool (torch-fidelity's "64" features
/// are its spatial mean) and the rest up to the pool features.
fn fid_inception(p: &nn::Path) -> (nn::SequentialT, nn::SequentialT) {
    let stem = nn::seq_t()
        .add(sq(p / "Conv2d_1a_3x3", 3, 32, 3, 0, 2))
        .add(sq(p / "Conv2d_2a_3x3", 32, 32, 3, 0, 1))
        .add(sq(p / "Conv2d_2b_3x3", 32, FEATURES_64, 3, 1, 1))
        .add_fn(|xs| max_pool(xs, 2, 0));
    let rest = nn::seq_t()
        .add(sq(p / "Conv2d_3b_1x1", FEATURES_64, 80, 1, 0, 1))
        .add(sq(p / "Conv2d_4a_3x3", 80, 192, 3, 0, 1))
        .add_fn(|xs| max_pool(xs, 2, 0))
        .add(inception_a(p / "Mixed_5b", 192, 32))
        .add(inception_a(p / "Mixed_5c", 256, 64))
        .add(inception_a(p / "Mixed_5d", 288, 64))
        .add(inception_b(p / "Mixed_6a", 288))
        .add(inception_c(p / "Mixed_6b", 768, 128))
        .add(inception_c(p / "Mixed_6c", 768, 160))
        .add(inception_c(p / "Mixed_6d", 768, 160))
        .add(inception_c(p / "Mixed_6e", 768, 192))
        .add(inception_d(p / "Mixed_7a", 768))
        .add(inception_e(p / "Mixed_7b", 1280, false))
        .add(inception_e(p / "Mixed_7c", 2048, true))
        .add_fn(|xs| xs.adaptive_avg_pool2d([1, 1]));
    (stem, rest)
}
