//! Helpers shared by the integration tests: building variables and gradient stores, reading
//! tensors back as f64, and tolerant comparisons.
#![allow(dead_code)]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

pub fn var(values: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_slice(values, shape, &Device::Cpu).unwrap()).unwrap()
}

pub fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
}

/// A gradient store holding `grad` for each variable.
pub fn grads(pairs: &[(&Var, &[f32])]) -> GradStore {
    let mut store = GradStore::default();
    for (v, g) in pairs {
        store.insert(v.as_tensor(), tensor(g, v.dims()));
    }
    store
}

pub fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

pub fn f64s(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| x as f64).collect()
}

pub fn assert_close(got: &[f64], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(1e-3);
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (|diff| {} > {tol})",
            (g - w).abs()
        );
    }
}

pub fn norm(xs: &[f64]) -> f64 {
    xs.iter().map(|x| x * x).sum::<f64>().sqrt()
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
