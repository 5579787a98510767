//! Shared helpers for the parity tests: where the fixtures are and how to compare.
#![allow(dead_code)]
use frisket_engine::tch::{self, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// The fixtures directory written by `make fixtures` (tests/fixtures/*.py).
pub fn fixtures() -> PathBuf {
    match std::env::var("FRISKET_FIXTURES") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures"),
    }
}

/// A fixture model, or the shipped tiny model ("shapes", in the repo's models/).
pub fn model_dir(name: &str) -> PathBuf {
    if name == "shapes" {
        return PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/shapes");
    }
    fixtures().join("models").join(name)
}

/// Reads a reference safetensors file into a name → tensor map.
pub fn read_ref(rel: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("ref").join(rel);
    let tensors = Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e} (run `make fixtures`)", path.display()));
    tensors.into_iter().collect()
}

/// ‖a − b‖₂ / ‖b‖₂, in f64.
pub fn rel_l2(actual: &Tensor, expected: &Tensor) -> f64 {
    let a = actual.to_kind(tch::Kind::Double);
    let b = expected.to_kind(tch::Kind::Double);
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let num = (&a - &b).norm().double_value(&[]);
    let den = b.norm().double_value(&[]);
    num / den.max(1e-30)
}

pub fn assert_rel_l2(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let err = rel_l2(actual, expected);
    println!("{what}: rel L2 error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: rel L2 error {err:.3e} exceeds {tol:.0e}");
}
