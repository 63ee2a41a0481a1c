//! NT-Xent against independent float64 computations.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use simclr_pretrain::{l2_normalize, nt_xent, NtXentConfig, SingleReplica};

fn config(temperature: f64, hidden_norm: bool) -> NtXentConfig {
    NtXentConfig {
        temperature,
        hidden_norm,
    }
}

#[test]
fn defaults_are_the_official_ones() {
    let c = NtXentConfig::default();
    assert_eq!(c.temperature, 0.1);
    assert!(c.hidden_norm);
}

#[test]
fn value_matches_float64_reference() {
    let (n, d) = (5, 7);
    for (seed, &tau) in [0.1, 0.5].iter().enumerate() {
        for hidden_norm in [true, false] {
            let h = Rng::new(100 + seed as u64).matrix(2 * n, d);
            let want = reference_nt_xent(&h, tau, hidden_norm);
            let cfg = config(tau, hidden_norm);

            let out = nt_xent(&tensor(&h, DType::F64), &cfg, &SingleReplica).unwrap();
            assert_eq!(out.loss.dims(), &[] as &[usize]);
            assert_close(scalar(&out.loss), want, 1e-12, "f64 loss");

            let out32 = nt_xent(&tensor(&h, DType::F32), &cfg, &SingleReplica).unwrap();
            assert_eq!(out32.loss.dtype(), DType::F32);
            assert_close(scalar(&out32.loss), want, 2e-5, "f32 loss");

            let (acc, entropy) = reference_metrics(&h, tau, hidden_norm);
            assert_close(out.contrast_acc, acc, 1e-12, "contrast_acc");
            assert_close(out.contrast_entropy, entropy, 1e-10, "contrast_entropy");
            assert_eq!(out.labels, (0..n).collect::<Vec<_>>());
            assert_eq!(out.logits_ab.dims(), &[n, n]);
        }
    }
}

#[test]
fn perfect_alignment_gives_full_accuracy_and_low_loss() {
    // View 2 equals view 1 and the images are orthogonal: the positive dominates.
    let n = 4;
    let mut h = vec![vec![0.0; 6]; 2 * n];
    for i in 0..n {
        h[i][i] = 3.0;
        h[n + i][i] = 3.0;
    }
    let out = nt_xent(&tensor(&h, DType::F64), &config(0.1, true), &SingleReplica).unwrap();
    assert_eq!(out.contrast_acc, 1.0);
    // Each direction: −log(e^10 / (e^10 + 2(n−1))) with 2n−2 = 6 zero logits.
    let per_dir = -(10f64.exp() / (10f64.exp() + 6.0)).ln();
    assert_close(scalar(&out.loss), 2.0 * per_dir, 1e-12, "aligned loss");
    assert!(out.contrast_entropy < 1e-2);
}

/// The loss as a function of the flat input, in f64.
fn loss_at(values: &[f64], rows: usize, cols: usize, cfg: &NtXentConfig) -> f64 {
    let h = Tensor::from_vec(values.to_vec(), (rows, cols), &Device::Cpu).unwrap();
    scalar(&nt_xent(&h, cfg, &SingleReplica).unwrap().loss)
}

#[test]
fn gradient_matches_central_finite_differences() {
    let (n, d) = (5, 7);
    for (seed, &tau) in [0.1, 0.5].iter().enumerate() {
        for hidden_norm in [true, false] {
            let cfg = config(tau, hidden_norm);
            let h = Rng::new(200 + seed as u64).matrix(2 * n, d);
            let flat: Vec<f64> = h.iter().flatten().copied().collect();
            let var = Var::from_tensor(&tensor(&h, DType::F64)).unwrap();
            let out = nt_xent(var.as_tensor(), &cfg, &SingleReplica).unwrap();
            let grads = out.loss.backward().unwrap();
            let grad = to_matrix(grads.get(var.as_tensor()).unwrap());

            let eps = 1e-6;
            let mut fd = vec![vec![0.0; d]; 2 * n];
            for (idx, row) in fd.iter_mut().flatten().enumerate() {
                let mut plus = flat.clone();
                plus[idx] += eps;
                let mut minus = flat.clone();
                minus[idx] -= eps;
                *row = (loss_at(&plus, 2 * n, d, &cfg) - loss_at(&minus, 2 * n, d, &cfg))
                    / (2.0 * eps);
            }
            assert_matrix_close(
                &grad,
                &fd,
                1e-6,
                &format!("gradient tau={tau} hidden_norm={hidden_norm}"),
            );
        }
    }
}

#[test]
fn f32_gradient_matches_f64_gradient() {
    let (n, d) = (5, 7);
    let cfg = config(0.1, true);
    let h = Rng::new(300).matrix(2 * n, d);
    let grad_of = |dtype| {
        let var = Var::from_tensor(&tensor(&h, dtype)).unwrap();
        let out = nt_xent(var.as_tensor(), &cfg, &SingleReplica).unwrap();
        to_matrix(out.loss.backward().unwrap().get(var.as_tensor()).unwrap())
    };
    assert_matrix_close(&grad_of(DType::F32), &grad_of(DType::F64), 1e-4, "f32 grad");
}

#[test]
fn initial_loss_is_about_two_ln_two_n_minus_one() {
    // Random high-dimensional embeddings are nearly orthogonal: every logit is ≈ 0, so each
    // direction is ≈ ln(2N − 1) and the official 2× loss ≈ 2·ln(2N − 1).
    let (n, d) = (64, 4096);
    let want = 2.0 * ((2 * n - 1) as f64).ln();
    for tau in [0.1, 0.5] {
        let h = Tensor::randn(0f32, 1.0, (2 * n, d), &Device::Cpu).unwrap();
        let out = nt_xent(&h, &config(tau, true), &SingleReplica).unwrap();
        let got = scalar(&out.loss);
        assert!(
            (got - want).abs() < 0.03 * want,
            "tau {tau}: initial loss {got}, expected ≈ {want}"
        );
        assert!(out.contrast_acc < 0.2);
    }
}

#[test]
fn l2_normalize_has_tf_epsilon_semantics() {
    let x = Tensor::new(&[[3.0f64, 4.0], [0.0, 0.0], [1e-8, 0.0]], &Device::Cpu).unwrap();
    let y = to_matrix(&l2_normalize(&x).unwrap());
    assert_close(y[0][0], 0.6, 1e-15, "3-4-5 row");
    assert_close(y[0][1], 0.8, 1e-15, "3-4-5 row");
    // A zero row stays zero instead of becoming NaN.
    assert_eq!(y[1], vec![0.0, 0.0]);
    // |x|² = 1e-16 < 1e-12: divided by sqrt(1e-12) = 1e-6, not by its norm.
    assert_close(y[2][0], 1e-2, 1e-12, "tiny row");
}

#[test]
fn rejects_bad_inputs() {
    let odd = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(nt_xent(&odd, &NtXentConfig::default(), &SingleReplica).is_err());
    let empty = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(nt_xent(&empty, &NtXentConfig::default(), &SingleReplica).is_err());
    let ok = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(nt_xent(&ok, &config(0.0, true), &SingleReplica).is_err());
    assert!(nt_xent(&ok, &config(0.1, true), &SingleReplica).is_ok());
}
