//! The model's parameter names and shapes per component, and how a LoRA module's name
//! finds the parameter it changes.
use super::header::Header;
use super::keys::{Component, ModuleName};
use super::sgm::SgmLayout;
use super::LoraError;
use crate::weights::{find_weight_files, Weights};
use anyhow::Result;
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

#[derive(Default)]
struct ComponentIndex {
    /// Parameter name → shape.
    shapes: HashMap<String, Vec<i64>>,
    /// kohya's underscored module name → the dotted module name.
    underscored: HashMap<String, String>,
    /// The UNet's SGM block numbering, made on first use.
    sgm: OnceLock<SgmLayout>,
}

/// Parameter names (diffusers') and shapes of a model's LoRA-able components.
#[derive(Default)]
pub struct ParamIndex {
    components: HashMap<Component, ComponentIndex>,
}

impl ParamIndex {
    pub fn add(&mut self, component: Component, name: &str, shape: Vec<i64>) {
        let c = self.components.entry(component).or_default();
        c.sgm = OnceLock::new();
        if let Some(module) = name.strip_suffix(".weight") {
            c.underscored.insert(module.replace('.', "_"), module.to_string());
        }
        c.shapes.insert(name.to_string(), shape);
    }

    pub fn add_weights(&mut self, component: Component, weights: &Weights) {
        for (name, t) in weights.iter() {
            self.add(component, name, t.size());
        }
    }

    /// From a model's headers, without loading tensors: a diffusers folder
    /// (`from_model_dir`) or a single-file checkpoint (the names it converts to).
    pub fn from_model_path(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Self::from_model_dir(path);
        }
        let mut index = Self::default();
        let parts = [Component::Unet, Component::TextEncoder, Component::TextEncoder2];
        for (component, shapes) in parts.into_iter().zip(crate::checkpoint::parameter_shapes(path)?) {
            for (name, shape) in shapes {
                index.add(component, &name, shape);
            }
        }
        Ok(index)
    }

    /// From the safetensors headers of a diffusers model folder's `unet`, `text_encoder`
    /// and (when present) `text_encoder_2`, without loading tensors.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let mut index = Self::default();
        for component in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
            let sub = dir.join(component.as_str());
            if !sub.is_dir() {
                continue;
            }
            for file in find_weight_files(&sub, false)? {
                for (name, shape) in Header::read(&file)?.shapes {
                    index.add(component, &name, shape);
                }
            }
        }
        Ok(index)
    }

    /// The weight (`<module>.weight`) that the module `module` of `component` names. Text
    /// encoders are found with or without transformers 4's `text_model.` prefix.
    pub fn resolve(&self, component: Component, module: &ModuleName) -> Option<(String, &[i64])> {
        let c = self.components.get(&component)?;
        let dotted = match module {
            ModuleName::Dotted(m) => with_prefix_variants(m, "text_model.", component)
                .into_iter()
                .find(|m| c.shapes.contains_key(&format!("{m}.weight")))?,
            ModuleName::Underscored(u) => with_prefix_variants(u, "text_model_", component)
                .into_iter()
                .find_map(|u| c.underscored.get(&u).cloned())
                .or_else(|| {
                    let sgm = c.sgm.get_or_init(|| SgmLayout::new(c.underscored.values().map(String::as_str)));
                    (component == Component::Unet)
                        .then(|| sgm.to_diffusers(u))
                        .flatten()
                        .and_then(|d| c.underscored.get(&d).cloned())
                })?,
        };
        let name = format!("{dotted}.weight");
        let shape = c.shapes.get(&name)?;
        Some((name, shape.as_slice()))
    }

    /// `resolve`, checking that an update of `shape` fits: the parameter's name, or the
    /// error naming `key`.
    pub fn target(
        &self,
        component: Component,
        module: &ModuleName,
        key: &str,
        shape: &[i64],
    ) -> Result<String, LoraError> {
        let (name, model) = self.resolve(component, module).ok_or_else(|| LoraError::NoTarget {
            key: key.to_string(),
            module: format!("{}.{}", component.as_str(), module.as_str()),
        })?;
        if model != shape {
            return Err(LoraError::Shape {
                key: key.to_string(),
                param: name,
                lora: shape.to_vec(),
                model: model.to_vec(),
            });
        }
        Ok(name)
    }
}

fn with_prefix_variants(name: &str, prefix: &str, component: Component) -> Vec<String> {
    let mut v = vec![name.to_string()];
    if component.is_text_encoder() {
        match name.strip_prefix(prefix) {
            Some(rest) => v.push(rest.to_string()),
            None => v.push(format!("{prefix}{name}")),
        }
    }
    v
}
