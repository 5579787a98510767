//! A conversion plan: which stored tensor becomes which diffusers tensor, and how. Plans
//! are built from the header alone, then executed one tensor at a time.
use super::safetensors::{Header, MappedFile};
use anyhow::{Context, Result};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Copy,
    /// Drops the trailing size-1 dimensions of a 1×1 convolution (→ a linear weight).
    Squeeze,
    /// Part `part` of `parts` equal row blocks (a fused q/k/v projection).
    Rows {
        part: i64,
        parts: i64,
    },
    Transpose,
}

#[derive(Clone, Debug)]
pub struct Item {
    pub target: String,
    pub source: String,
    pub op: Op,
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub items: Vec<Item>,
}

impl Plan {
    pub fn push(&mut self, target: impl Into<String>, source: impl Into<String>, op: Op) {
        self.items.push(Item { target: target.into(), source: source.into(), op });
    }

    /// The converted tensors, by diffusers name, as `kind` on `device`.
    pub fn load(&self, file: &MappedFile, device: Device, kind: Kind) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(self.items.len());
        for item in &self.items {
            let t = file.tensor(&item.source, device, kind)?;
            let t = apply(t, item.op).with_context(|| format!("converting `{}` to `{}`", item.source, item.target))?;
            out.insert(item.target.clone(), t);
        }
        Ok(out)
    }

    /// The converted tensors' names and shapes, from the header alone.
    pub fn shapes(&self, h: &Header) -> Result<super::Shapes> {
        self.items
            .iter()
            .map(|item| {
                let size = h
                    .shape(&item.source)
                    .with_context(|| format!("{}: no tensor `{}`", h.path.display(), item.source))?;
                Ok((item.target.clone(), item.op.shape(size)))
            })
            .collect()
    }
}

impl Op {
    /// The shape `apply` gives a tensor of shape `size`.
    fn shape(self, size: &[i64]) -> Vec<i64> {
        match self {
            Op::Copy => size.to_vec(),
            Op::Squeeze => size[..size.len().min(2)].to_vec(),
            Op::Rows { parts, .. } => {
                let mut s = size.to_vec();
                if let Some(rows) = s.first_mut() {
                    *rows /= parts;
                }
                s
            }
            Op::Transpose => {
                let mut s = size.to_vec();
                if s.len() >= 2 {
                    s.swap(0, 1);
                }
                s
            }
        }
    }
}

fn apply(t: Tensor, op: Op) -> Result<Tensor> {
    Ok(match op {
        Op::Copy => t,
        Op::Squeeze => {
            let size = t.size();
            let keep = size.len().min(2);
            anyhow::ensure!(size[keep..].iter().all(|&d| d == 1), "shape {size:?} is not a 1×1 convolution");
            t.reshape(&size[..keep])
        }
        Op::Rows { part, parts } => {
            let rows = t.size()[0];
            anyhow::ensure!(rows % parts == 0, "{rows} rows do not split into {parts} equal parts");
            t.narrow(0, part * rows / parts, rows / parts).contiguous()
        }
        Op::Transpose => t.transpose(0, 1).contiguous(),
    })
}
