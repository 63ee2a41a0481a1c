//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Tensor};

/// `max|a - b| / max|b|` over all elements, in f64 (the parity measure of the fixtures README).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let flat = |t: &Tensor| -> Vec<f64> {
        let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        t.to_vec1::<f64>().unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    diff / scale.max(1e-30)
}

/// A file of `tests/fixtures`, found where the tests run (cargo sets `CARGO_MANIFEST_DIR` for
/// them), not where this binary was compiled: CI shares one target folder between checkouts.
pub fn fixture(name: &str) -> std::path::PathBuf {
    simclr_fs::manifest_dir(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}
