//! LPIPS (the `lpips` package, version 0.1, AlexNet) from the user's weights file: the state dict
//! of an `lpips.LPIPS(net="alex")` module (AlexNet's five ReLU stages and the five linear heads),
//! loaded here; nothing is downloaded. Inside a mask: the spatial map (`spatial=True`: each
//! layer's head output resized bilinearly to the image, summed) averaged over the mask's pixels.
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// AlexNet's convolutions as `lpips` slices them: (state-dict prefix, stride, padding, max pool before).
const STAGES: [(&str, i64, i64, bool); 5] = [
    ("net.slice1.0", 4, 2, false),
    ("net.slice2.3", 1, 2, true),
    ("net.slice3.6", 1, 1, true),
    ("net.slice4.8", 1, 1, false),
    ("net.slice5.10", 1, 1, false),
];

pub struct Lpips {
    tensors: HashMap<String, Tensor>,
}

impl Lpips {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            bail!("LPIPS weights not found: {} (the state dict of lpips.LPIPS(net=\"alex\"))", path.display());
        }
        let tensors = crate::load_state_dict(path)?;
        let mut names = vec!["scaling_layer.shift".to_string(), "scaling_layer.scale".to_string()];
        for (i, (prefix, ..)) in STAGES.iter().enumerate() {
            names.extend([format!("{prefix}.weight"), format!("{prefix}.bias"), format!("lin{i}.model.1.weight")]);
        }
        if let Some(missing) = names.iter().find(|n| !tensors.contains_key(*n)) {
            bail!("{} has no tensor {missing}: not an AlexNet LPIPS state dict", path.display());
        }
        Ok(Lpips { tensors })
    }

    fn get(&self, name: &str) -> &Tensor {
        &self.tensors[name]
    }

    /// AlexNet's five ReLU outputs for [1, 3, H, W] in [-1, 1].
    fn stages(&self, x: &Tensor) -> Vec<Tensor> {
        let mut x = (x - self.get("scaling_layer.shift")) / self.get("scaling_layer.scale");
        let mut outs = Vec::new();
        for (prefix, stride, pad, pool) in STAGES {
            if pool {
                x = x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false);
            }
            let w = self.get(&format!("{prefix}.weight"));
            let b = self.get(&format!("{prefix}.bias"));
            x = x.conv2d(w, Some(b), [stride, stride], [pad, pad], [1, 1], 1).relu();
            outs.push(x.shallow_clone());
        }
        outs
    }

    /// The LPIPS map [H, W] between two [3, H, W] images in [0, 1].
    pub fn map(&self, a: &Tensor, b: &Tensor) -> Tensor {
        let (h, w) = (a.size()[1], a.size()[2]);
        tch::no_grad(|| {
            let fa = self.stages(&(a.unsqueeze(0) * 2.0 - 1.0));
            let fb = self.stages(&(b.unsqueeze(0) * 2.0 - 1.0));
            let mut total: Option<Tensor> = None;
            for (i, (x, y)) in fa.iter().zip(&fb).enumerate() {
                let diff = (normalize(x) - normalize(y)).pow_tensor_scalar(2);
                let lin =
                    diff.conv2d(self.get(&format!("lin{i}.model.1.weight")), None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
                let up = lin.upsample_bilinear2d([h, w], false, None, None);
                total = Some(match total {
                    Some(t) => t + up,
                    None => up,
                });
            }
            total.expect("five stages").squeeze_dim(0).squeeze_dim(0)
        })
    }

    /// Mean of the LPIPS map inside the mask ([H, W] bool).
    pub fn masked(&self, a: &Tensor, b: &Tensor, mask: &Tensor) -> Result<f64> {
        crate::preservation::check(a, b, mask)?;
        let map = self.map(a, b);
        Ok(map.masked_select(mask).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]))
    }
}

/// `lpips.normalize_tensor`: unit length along channels (eps 1e-10).
fn normalize(x: &Tensor) -> Tensor {
    let norm = x.pow_tensor_scalar(2).sum_dim_intlist(1, true, Kind::Float).sqrt();
    x / (norm + 1e-10)
}
