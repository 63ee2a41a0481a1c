//! The fused NT-Xent kernels (f32) against the reference compositions run in f64: values and
//! gradients, on shapes with a replica offset, extra negatives and odd sizes.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_matrix_close, to_matrix, Rng};
use simclr_kernels::ntxent::{
    contrastive_ce, contrastive_ce_reference, l2_normalize, l2_normalize_reference, ContrastLayout,
};

fn var(m: &[Vec<f64>], dtype: DType) -> Var {
    Var::from_tensor(&common::tensor(m, dtype)).unwrap()
}

/// `(value, gradient)` of `Σ_r w_r·f(x)_r…` for a random upstream weight per output element.
fn value_and_grad(
    x: &[Vec<f64>],
    weights: &Tensor,
    dtype: DType,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let v = var(x, dtype);
    let out = f(v.as_tensor()).unwrap();
    let weighted = (out.to_dtype(DType::F64).unwrap() * weights)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = weighted.backward().unwrap();
    let g = grads.get(v.as_tensor()).unwrap();
    let values = out
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    (values, to_matrix(g))
}

fn assert_values_close(got: &[f64], want: &[f64], rel: f64, what: &str) {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale, "{what}[{i}]: {g} vs {w}");
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

#[test]
fn contrastive_ce_kernel_matches_the_reference() {
    let mut rng = Rng::new(11);
    // (n, offset, global, extra, τ): one replica; rank 1 of 3 with 7 extra negatives; odd n.
    for (n, offset, global, extra, tau) in
        [(4, 0, 4, 0, 0.1), (5, 5, 15, 7, 0.07), (3, 6, 9, 1, 0.5)]
    {
        let layout = ContrastLayout {
            n,
            offset,
            global,
            inv_t: 1.0 / tau,
        };
        let w = 2 * global + extra;
        // Cosine-like similarities in [-1, 1], as after normalisation.
        let s: Vec<Vec<f64>> = (0..2 * n)
            .map(|_| (0..w).map(|_| (rng.normal() * 0.4).tanh()).collect())
            .collect();
        let weights: Vec<f64> = (0..2 * n).map(|_| rng.uniform() + 0.5).collect();
        let weights = Tensor::new(weights, &Device::Cpu).unwrap();
        let (v32, g32) = value_and_grad(&s, &weights, DType::F32, |t| contrastive_ce(t, layout));
        let (v64, g64) = value_and_grad(&s, &weights, DType::F64, |t| {
            contrastive_ce_reference(t, layout)
        });
        let what = format!("n {n} offset {offset} global {global} extra {extra}");
        assert_values_close(&v32, &v64, 1e-5, &format!("loss {what}"));
        assert_matrix_close(&g32, &g64, 1e-5, &format!("gradient {what}"));
        // The masked column gets no gradient, the positive a negative one.
        for (r, row) in g32.iter().enumerate() {
            let (pos, masked) = layout.columns(r);
            assert_eq!(row[masked], 0.0, "{what}: masked column of row {r}");
            assert!(row[pos] < 0.0, "{what}: positive of row {r}");
        }
    }
}

#[test]
fn contrastive_ce_rejects_a_matrix_that_does_not_fit_its_layout() {
    let layout = ContrastLayout {
        n: 4,
        offset: 0,
        global: 4,
        inv_t: 10.0,
    };
    for dims in [(6, 8), (8, 7)] {
        let s = Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        let err = contrastive_ce(&s, layout).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{dims:?}: {err}");
    }
}

#[test]
fn l2_normalize_kernel_matches_the_reference() {
    let mut rng = Rng::new(5);
    for (rows, d) in [(6, 128), (5, 3), (9, 33)] {
        let mut x = rng.matrix(rows, d);
        // A zero row and a row under the epsilon take the clamped branch.
        x[1].iter_mut().for_each(|v| *v = 0.0);
        x[2].iter_mut().for_each(|v| *v *= 1e-8);
        let weights = common::tensor(&rng.matrix(rows, d), DType::F64);
        let (v32, g32) = value_and_grad(&x, &weights, DType::F32, l2_normalize);
        let (v64, g64) = value_and_grad(&x, &weights, DType::F64, l2_normalize_reference);
        assert_values_close(&v32, &v64, 1e-6, &format!("{rows}x{d} values"));
        // Per row: the clamped rows' gradients (×1e6) would swamp the others' scale.
        for r in 0..rows {
            assert_matrix_close(
                &g32[r..=r],
                &g64[r..=r],
                1e-5,
                &format!("{rows}x{d} gradient row {r}"),
            );
        }
    }
}
