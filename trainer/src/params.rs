//! Trainable parameters for the engine's model code.
//!
//! The engine's layers (server/src/engine) hold plain tensors that they fetch by diffusers'
//! names from a `Weights` map. We hand them a map of *leaf tensors that require grad*: every
//! layer keeps a shallow clone (same storage, same autograd leaf), so a forward through the
//! engine records a graph back to these leaves, `backward` fills their `.grad()`, and an
//! in-place optimizer update is seen by the model without rebuilding it.
//!
//! The one trap: on the CPU `nn::Conv2d::load` turns a float weight channels-last with a copy
//! unless it already is. A copy would be a non-leaf computed once at load time (no grad to the
//! leaf after the first step, and stale after updates). So 4-d leaves are created channels-last,
//! which makes that call a shallow clone.
//!
//! The parameter list is *discovered* from the engine itself: build the model from an empty
//! map, take the name of the first missing tensor from its `WeightError::Missing`, insert an empty
//! stand-in of shape [0], rebuild, take the shape the config implies from the `WeightError::Shape`,
//! insert a properly initialised tensor, and repeat until the model builds. The result is exactly the set of
//! tensors (diffusers' names and shapes) the engine reads for that config.
use crate::engine::nn::channels_last;
use crate::engine::weights::{WeightError, Weights};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub struct Params {
    /// Sorted by name (deterministic iteration for init, optimizer and saving).
    pub tensors: BTreeMap<String, Tensor>,
    pub device: Device,
}

/// PyTorch's default init (what diffusers/transformers models start from, up to their own
/// tweaks): weights of conv/linear U(±1/√fan_in) (kaiming_uniform a=√5), biases U(±1/√fan_in),
/// norms 1/0, embeddings N(0, 0.02) as CLIP's `_init_weights`.
fn init_tensor(name: &str, shape: &[i64], siblings: &HashMap<String, Vec<i64>>, device: Device) -> Tensor {
    let opts = (Kind::Float, device);
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let stem = name.strip_suffix(leaf).unwrap_or("");
    let weight_shape = siblings.get(&format!("{stem}weight"));
    let is_norm = weight_shape.map_or(shape.len() == 1 && leaf == "weight", |w| w.len() == 1);
    let t = if name.contains("embedding") && leaf == "weight" && shape.len() == 2 && !name.contains("time_embedding") {
        Tensor::randn(shape, opts) * 0.02
    } else if is_norm {
        if leaf == "weight" {
            Tensor::ones(shape, opts)
        } else {
            Tensor::zeros(shape, opts)
        }
    } else {
        let fan_in: i64 = match (leaf, weight_shape) {
            ("weight", _) => shape[1..].iter().product(),
            (_, Some(w)) => w[1..].iter().product(),
            _ => shape.iter().product(),
        };
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        Tensor::rand(shape, opts) * (2.0 * bound) - bound
    };
    if shape.len() == 4 {
        channels_last(&t)
    } else {
        t
    }
}

impl Params {
    /// Discovers the parameters `build` reads (see the module doc) and initialises them.
    /// Call `tch::manual_seed` first: initial values come from libtorch's generator, drawn in
    /// the order the engine asks for tensors (deterministic for a given config).
    pub fn discover<T>(device: Device, build: impl Fn(&Weights) -> Result<T>) -> Result<Self> {
        let mut shapes: HashMap<String, Vec<i64>> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for _ in 0..100_000 {
            let w = Weights::from_map(
                map.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect(),
                device,
                Kind::Float,
            );
            let err = match build(&w) {
                Ok(_) => {
                    // Initialise in discovery order so the values do not depend on HashMap order.
                    let mut tensors = BTreeMap::new();
                    for name in &order {
                        let t = init_tensor(name, &shapes[name], &shapes, device).set_requires_grad(true);
                        tensors.insert(name.clone(), t);
                    }
                    return Ok(Self { tensors, device });
                }
                Err(e) => e,
            };
            match err.downcast_ref::<WeightError>() {
                Some(WeightError::Shape { name, actual, expected, .. }) if actual.as_slice() == [0] => {
                    // Placeholder of the right shape; the real values are drawn at the end.
                    map.insert(name.clone(), Tensor::zeros(expected.as_slice(), (Kind::Float, device)));
                    shapes.insert(name.clone(), expected.clone());
                    order.push(name.clone());
                }
                Some(WeightError::Missing { name, .. }) => {
                    map.insert(name.clone(), Tensor::zeros([0], (Kind::Float, device)));
                }
                _ => bail!("building the model failed for another reason than a missing tensor: {err:#}"),
            }
        }
        bail!("parameter discovery did not converge")
    }

    /// A `Weights` map over the leaves, to build an engine model from (`X::new(&w.root(), &cfg)`).
    pub fn weights(&self) -> Weights {
        let map = self.tensors.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        Weights::from_map(map, self.device, Kind::Float)
    }

    pub fn count(&self) -> i64 {
        self.tensors.values().map(|t| t.numel() as i64).sum()
    }

    pub fn zero_grad(&self) {
        for t in self.tensors.values() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Writes a diffusers/transformers safetensors file (contiguous tensors; `kind` Half for
    /// the shipped fp16 files, Float for checkpoints).
    pub fn save(&self, path: &Path, kind: Kind) -> Result<()> {
        let list: Vec<(String, Tensor)> =
            self.tensors.iter().map(|(k, v)| (k.clone(), v.detach().to_kind(kind).contiguous())).collect();
        Tensor::write_safetensors(&list, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Loads values saved by `save` into the leaves (resuming).
    pub fn load(&self, path: &Path) -> Result<()> {
        let loaded: HashMap<String, Tensor> = Tensor::read_safetensors(path)?.into_iter().collect();
        tch::no_grad(|| -> Result<()> {
            for (k, v) in &self.tensors {
                let src = loaded.get(k).with_context(|| format!("{} lacks `{k}`", path.display()))?;
                let mut dst = v.shallow_clone();
                dst.copy_(&src.to_kind(Kind::Float));
            }
            Ok(())
        })
    }
}

/// AdamW (decoupled weight decay) with global-norm gradient clipping, over a `Params`.
/// Own implementation rather than tch::nn::Optimizer: that one only takes VarStore variables,
/// whose names cannot contain the '.' of diffusers' names and whose 4-d variables are not
/// channels-last.
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub clip_norm: Option<f64>,
    step: i64,
    state: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(params: &Params, lr: f64, weight_decay: f64) -> Self {
        let state = params.tensors.values().map(|p| (p.zeros_like().detach(), p.zeros_like().detach())).collect();
        Self { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, clip_norm: Some(1.0), step: 0, state }
    }

    /// One update from the gradients in `params`; returns the gradient norm before clipping.
    pub fn step(&mut self, params: &Params) -> f64 {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let grads: Vec<Option<Tensor>> = params
            .tensors
            .values()
            .map(|p| {
                let g = p.grad();
                if g.defined() {
                    Some(g)
                } else {
                    None
                }
            })
            .collect();
        let sq: f64 = grads.iter().flatten().map(|g| g.square().sum(Kind::Double).double_value(&[])).sum();
        let norm = sq.sqrt();
        let scale = match self.clip_norm {
            Some(c) if norm > c => c / (norm + 1e-6),
            _ => 1.0,
        };
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for ((p, g), (m, v)) in params.tensors.values().zip(&grads).zip(self.state.iter_mut()) {
            let Some(g) = g else { continue };
            let g = g * scale;
            let mut p = p.shallow_clone();
            if self.weight_decay > 0.0 && p.dim() > 1 {
                let _ = p.g_mul_scalar_(1.0 - self.lr * self.weight_decay);
            }
            let _ = m.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
            let _ = v.g_mul_scalar_(b2).g_add_(&(g.square() * (1.0 - b2)));
            let denom = (v.shallow_clone() / bc2).sqrt() + self.eps;
            let upd = (m.shallow_clone() / bc1) / denom * self.lr;
            let _ = p.g_sub_(&upd);
        }
        norm
    }
}
