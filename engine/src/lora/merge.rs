//! Merging LoRA updates into the model's weights in place, keeping the original values of
//! the tensors they touch so that another set (or none) starts from the exact originals.
use super::keys::Component;
use super::params::ParamIndex;
use super::{Lora, LoraModule};
use crate::weights::Weights;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashMap};
use tch::{Kind, Tensor};

/// LoRAs with their weights (the update of each is scaled by its weight).
pub type LoraSet<'a> = [(&'a Lora, f32)];

/// The LoRA set merged into a model, and the original values of the tensors it changed.
#[derive(Default)]
pub struct AppliedLoras {
    /// `Lora::id`s and weights, with the names for reporting.
    set: Vec<(u64, String, f32)>,
    originals: HashMap<(Component, String), Tensor>,
}

fn same_set(a: &[(u64, String, f32)], b: &LoraSet) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((id, _, wa), (l, wb))| *id == l.id && wa.to_bits() == wb.to_bits())
}

impl AppliedLoras {
    /// The names and weights of the merged LoRAs.
    pub fn names(&self) -> Vec<(String, f32)> {
        self.set.iter().map(|(_, name, w)| (name.clone(), *w)).collect()
    }

    /// Whether any of the merged LoRAs changes a text encoder.
    pub fn touches_text_encoder(&self) -> bool {
        self.originals.keys().any(|(c, _)| c.is_text_encoder())
    }

    /// Makes `params` hold the original weights plus `set`'s updates. The whole set is
    /// checked against `index` first: on an error nothing changes. False when `set` is the
    /// set already merged (nothing to do).
    pub fn apply(&mut self, params: &HashMap<Component, Weights>, index: &ParamIndex, set: &LoraSet) -> Result<bool> {
        if same_set(&self.set, set) {
            return Ok(false);
        }
        let mut by_param: BTreeMap<(Component, String), Vec<(&LoraModule, f64)>> = BTreeMap::new();
        for (lora, weight) in set {
            let targets = lora.targets(index).with_context(|| format!("LoRA `{}`", lora.name))?;
            for (module, param) in lora.modules.iter().zip(targets) {
                by_param.entry((module.component, param)).or_default().push((module, *weight as f64 * module.scale));
            }
        }
        let _guard = tch::no_grad_guard();
        self.restore(params);
        for ((component, name), updates) in by_param {
            let mut t = param(params, component, &name)?;
            let original = t.copy();
            let delta = updates
                .into_iter()
                .map(|(module, factor)| update(module, &t) * factor)
                .reduce(|a, b| a + b)
                .expect("a parameter is listed with its updates");
            // Out of place: `to_kind` of a float32 tensor is the tensor itself.
            t.copy_(&(original.to_kind(Kind::Float) + delta));
            self.originals.insert((component, name), original);
        }
        self.set = set.iter().map(|(l, w)| (l.id, l.name.clone(), *w)).collect();
        Ok(true)
    }

    /// Puts the original values back (no LoRA merged).
    fn restore(&mut self, params: &HashMap<Component, Weights>) {
        for ((component, name), original) in self.originals.drain() {
            let mut t = param(params, component, &name).expect("a parameter changed before exists");
            t.copy_(&original);
        }
        self.set.clear();
    }
}

fn param(params: &HashMap<Component, Weights>, component: Component, name: &str) -> Result<Tensor> {
    params
        .get(&component)
        .and_then(|w| w.tensor(name))
        .with_context(|| format!("the model has no {} parameter `{name}`", component.as_str()))
}

/// up · down as float32 on `like`'s device, in `like`'s shape (checked by `targets`).
fn update(module: &LoraModule, like: &Tensor) -> Tensor {
    let to = |t: &Tensor| t.to_device(like.device()).to_kind(Kind::Float).flatten(1, -1);
    to(&module.up).matmul(&to(&module.down)).reshape(like.size())
}
