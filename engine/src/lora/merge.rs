//! Merging LoRA updates into the model's weights in place, keeping the original values of
//! the tensors they touch so that another set (or none) starts from the exact originals.
use super::keys::Component;
use super::params::ParamIndex;
use super::{Lora, LoraModule};
use crate::weights::Weights;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// LoRAs with their weights (the update of each is scaled by its weight).
pub type LoraSet = [(Arc<Lora>, f32)];

/// The LoRA set merged into a model, and the original values of the tensors it changed.
#[derive(Default)]
pub struct AppliedLoras {
    set: Vec<(Arc<Lora>, f32)>,
    originals: HashMap<(Component, String), Tensor>,
}

fn same_set(a: &LoraSet, b: &LoraSet) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((la, wa), (lb, wb))| Arc::ptr_eq(la, lb) && wa.to_bits() == wb.to_bits())
}

impl AppliedLoras {
    pub fn set(&self) -> &LoraSet {
        &self.set
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
            let mut merged = t.to_kind(Kind::Float);
            for (module, factor) in updates {
                merged += update(module, &t) * factor;
            }
            self.originals.insert((component, name), t.copy());
            t.copy_(&merged);
        }
        self.set = set.to_vec();
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
