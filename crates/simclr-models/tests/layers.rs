//! BatchNorm, TF SAME pooling and fixed-padding convolutions against hand computations.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{max_abs_diff, pseudo_random, values};
use simclr_models::batch_norm::{BatchNorm, BatchNormOptions};
use simclr_models::init::SeededInit;
use simclr_models::layers::Conv2d;
use simclr_models::pool::{avg_pool_fixed_valid, avg_pool_same, max_pool_same, same_padding};

const EPS: f64 = 1e-5;

fn t1(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
}

fn bn_from(gamma: &[f32], beta: Option<&[f32]>, mm: &[f32], mv: &[f32]) -> BatchNorm {
    let mut ts = HashMap::new();
    ts.insert("bn.gamma".to_string(), t1(gamma));
    if let Some(b) = beta {
        ts.insert("bn.beta".to_string(), t1(b));
    }
    ts.insert("bn.moving_mean".to_string(), t1(mm));
    ts.insert("bn.moving_variance".to_string(), t1(mv));
    let vb = VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
    let opts = BatchNormOptions::new(EPS, 0.9).center(beta.is_some());
    BatchNorm::new(vb.pp("bn"), gamma.len(), opts).unwrap()
}

/// Per-channel mean and biased variance in f64, over every axis but 1, of an NCHW (or NC)
/// tensor given as values + dims.
fn channel_stats(v: &[f64], dims: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let c = dims[1];
    let inner: usize = dims[2..].iter().product();
    let n = dims[0];
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    let count = (n * inner) as f64;
    for (k, m) in mean.iter_mut().enumerate() {
        for b in 0..n {
            for i in 0..inner {
                *m += v[(b * c + k) * inner + i];
            }
        }
        *m /= count;
    }
    for (k, s) in var.iter_mut().enumerate() {
        for b in 0..n {
            for i in 0..inner {
                let d = v[(b * c + k) * inner + i] - mean[k];
                *s += d * d;
            }
        }
        *s /= count;
    }
    (mean, var)
}

fn expected_bn(
    v: &[f64],
    dims: &[usize],
    mean: &[f64],
    var: &[f64],
    g: &[f32],
    b: &[f32],
) -> Vec<f64> {
    let c = dims[1];
    let inner: usize = dims[2..].iter().product();
    v.iter()
        .enumerate()
        .map(|(idx, &x)| {
            let k = (idx / inner) % c;
            (x - mean[k]) / (var[k] + EPS).sqrt() * g[k] as f64 + b[k] as f64
        })
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

#[test]
fn batch_norm_train_eval_and_moving_update_match_f64() {
    let gamma = [1.5f32, -0.5, 2.0];
    let beta = [0.1f32, 0.2, -0.3];
    let mm0 = [0.3f32, -1.0, 2.0];
    let mv0 = [0.5f32, 2.0, 1.5];
    for dims in [vec![4usize, 3, 5, 5], vec![6, 3], vec![2, 3, 1, 1]] {
        let bn = bn_from(&gamma, Some(&beta), &mm0, &mv0);
        let x = (pseudo_random(&dims, 7, -2.0, 3.0) * 1.7).unwrap();
        let xv = values(&x);
        let (mean, var) = channel_stats(&xv, &dims);

        // Training mode: batch statistics, biased variance.
        let y = bn.forward(&x, true).unwrap();
        assert_close(
            &values(&y),
            &expected_bn(&xv, &dims, &mean, &var, &gamma, &beta),
            2e-5,
            "train",
        );
        // Moving statistics: 0.9 * old + 0.1 * batch (biased batch variance).
        let mm: Vec<f64> = (0..3)
            .map(|k| 0.9 * mm0[k] as f64 + 0.1 * mean[k])
            .collect();
        let mv: Vec<f64> = (0..3).map(|k| 0.9 * mv0[k] as f64 + 0.1 * var[k]).collect();
        assert_close(&values(&bn.moving_mean()), &mm, 1e-6, "moving_mean");
        assert_close(&values(&bn.moving_variance()), &mv, 1e-6, "moving_variance");

        // Inference mode: the (updated) moving statistics, which it does not change.
        let y = bn.forward(&x, false).unwrap();
        assert_close(
            &values(&y),
            &expected_bn(&xv, &dims, &mm, &mv, &gamma, &beta),
            2e-5,
            "eval",
        );
        assert_close(
            &values(&bn.moving_mean()),
            &mm,
            1e-6,
            "moving_mean after eval",
        );
        // The two modes differ here (batch != moving statistics).
        let y_train = bn.forward(&x, true).unwrap();
        assert!(max_abs_diff(&y_train, &y) > 1e-2);
    }
}

#[test]
fn batch_norm_without_beta_creates_no_beta() {
    let varmap = VarMap::new();
    let vb = SeededInit::var_builder(&varmap, 0, DType::F32, &Device::Cpu);
    let bn = BatchNorm::new(
        vb.pp("bn"),
        4,
        BatchNormOptions::new(EPS, 0.9).center(false),
    )
    .unwrap();
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["bn.gamma", "bn.moving_mean", "bn.moving_variance"]);
    // gamma = 1, no beta: a standardised output with zero mean per channel.
    let x = pseudo_random(&[8, 4], 1, 0.0, 5.0);
    let y = bn.forward(&x, true).unwrap();
    let m = values(&y.mean(0).unwrap());
    assert!(m.iter().all(|v| v.abs() < 1e-5), "{m:?}");
}

#[test]
fn batch_norm_updates_the_variable_store_in_place() {
    let varmap = VarMap::new();
    let vb = SeededInit::var_builder(&varmap, 0, DType::F32, &Device::Cpu);
    let bn = BatchNorm::new(vb.pp("bn"), 2, BatchNormOptions::new(EPS, 0.9)).unwrap();
    let x = (pseudo_random(&[4, 2, 3, 3], 3, 0.0, 1.0) + 5.0).unwrap();
    bn.forward(&x, true).unwrap();
    let stored = varmap.data().lock().unwrap()["bn.moving_mean"]
        .as_tensor()
        .clone();
    let v = values(&stored);
    assert!(v.iter().all(|m| (m - 0.55).abs() < 0.06), "{v:?}"); // 0.1 * ~5.5
}

#[test]
fn batch_norm_gradient_flows_through_batch_statistics() {
    // sum(BN(x)) with gamma = 1, beta = 0 is identically 0 in training mode, so dL/dx = 0;
    // with detached statistics it would be 1/sqrt(var + eps).
    let bn = bn_from(&[1.0, 1.0], Some(&[0.0, 0.0]), &[0.0, 0.0], &[1.0, 1.0]);
    let x = Var::from_tensor(&pseudo_random(&[3, 2, 2, 2], 5, -1.0, 1.0)).unwrap();
    let y = bn.forward(x.as_tensor(), true).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g = values(grads.get(x.as_tensor()).unwrap());
    assert!(g.iter().all(|v| v.abs() < 1e-4), "{g:?}");
    // In inference mode the gradient is gamma / sqrt(moving_var + eps) (the moving variance
    // was just updated by the training-mode pass).
    let mv = values(&bn.moving_variance());
    let y = bn.forward(x.as_tensor(), false).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g = values(grads.get(x.as_tensor()).unwrap());
    for (i, v) in g.iter().enumerate() {
        let k = (i / 4) % 2;
        assert!(
            (v - 1.0 / (mv[k] + EPS).sqrt()).abs() < 1e-5,
            "{g:?} {mv:?}"
        );
    }
}

fn arange(h: usize, w: usize) -> Tensor {
    Tensor::arange(0f32, (h * w) as f32, &Device::Cpu)
        .unwrap()
        .reshape((1, 1, h, w))
        .unwrap()
}

#[test]
fn same_padding_splits_like_tf() {
    assert_eq!(same_padding(112, 3, 2), (0, 1, 56));
    assert_eq!(same_padding(33, 3, 2), (1, 1, 17));
    assert_eq!(same_padding(4, 3, 2), (0, 1, 2));
    assert_eq!(same_padding(5, 3, 2), (1, 1, 3));
    assert_eq!(same_padding(17, 2, 1), (0, 1, 17));
    assert_eq!(same_padding(7, 3, 1), (1, 1, 7));
}

#[test]
fn max_pool_same_on_odd_and_even_maps() {
    // 5x5 (odd): pads 1/1; window i covers rows 2i-1..2i+1.
    // 6x6 (even): pads 0/1; window i covers rows 2i..2i+2 (PyTorch padding=1 would shift it).
    // 4x4: pads 0/1.
    let cases: [(usize, &[f64]); 3] = [
        (5, &[6., 8., 9., 16., 18., 19., 21., 23., 24.]),
        (6, &[14., 16., 17., 26., 28., 29., 32., 34., 35.]),
        (4, &[10., 11., 14., 15.]),
    ];
    for (n, want) in cases {
        // Negate so that -inf padding (not zero padding) matters: the maxima move to the
        // top-left of each window.
        let x = arange(n, n);
        for differentiable in [false, true] {
            let y = max_pool_same(&x, 3, 2, differentiable).unwrap();
            assert_eq!(values(&y), want, "n={n} differentiable={differentiable}");
            let yn = max_pool_same(&x.neg().unwrap(), 3, 2, differentiable).unwrap();
            let first = |i: usize| {
                let (b, _, _) = same_padding(n, 3, 2);
                (2 * i).saturating_sub(b)
            };
            let out = n.div_ceil(2);
            let want_neg: Vec<f64> = (0..out)
                .flat_map(|i| (0..out).map(move |j| (i, j)))
                .map(|(i, j)| -((first(i) * n + first(j)) as f64))
                .collect();
            assert_eq!(
                values(&yn),
                want_neg,
                "negated n={n} differentiable={differentiable}"
            );
        }
    }
}

#[test]
fn max_pool_gradient_goes_to_the_first_maximum() {
    // All-equal 4x4 input: every window ties; TF routes each window's gradient to its first
    // (top-left) real cell. Windows start at rows/cols 0 and 2.
    let x =
        Var::from_tensor(&Tensor::ones((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let y = max_pool_same(x.as_tensor(), 3, 2, true).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let g = values(g.get(x.as_tensor()).unwrap());
    let mut want = vec![0.0; 16];
    for (r, c) in [(0, 0), (0, 2), (2, 0), (2, 2)] {
        want[r * 4 + c] = 1.0;
    }
    assert_eq!(g, want);
}

#[test]
fn avg_pool_same_divides_by_real_cells() {
    // 2x2/s1 on 3x3: pads 0/1, the last row/column average 2 cells, the corner 1.
    let x = arange(3, 3);
    let want3 = [2.0, 3.0, 3.5, 5.0, 6.0, 6.5, 6.5, 7.5, 8.0];
    // 2x2/s1 on 4x4 (even size).
    let want4 = [
        2.5, 3.5, 4.5, 5.0, 6.5, 7.5, 8.5, 9.0, 10.5, 11.5, 12.5, 13.0, 12.5, 13.5, 14.5, 15.0,
    ];
    // 3x3/s2 on 5x5: pads 1/1; the corner window holds 4 real cells.
    let want5 = [3.0, 4.5, 6.0, 10.5, 12.0, 13.5, 18.0, 19.5, 21.0];
    for differentiable in [false, true] {
        let got = values(&avg_pool_same(&x, 2, 1, differentiable).unwrap());
        assert_close(&got, &want3, 1e-6, "3x3");
        let got = values(&avg_pool_same(&arange(4, 4), 2, 1, differentiable).unwrap());
        assert_close(&got, &want4, 1e-6, "4x4");
        let got = values(&avg_pool_same(&arange(5, 5), 3, 2, differentiable).unwrap());
        assert_close(&got, &want5, 1e-6, "5x5");
    }
    // The training path has a gradient: each input cell gets sum over windows of 1/count.
    let v = Var::from_tensor(&x).unwrap();
    let g = avg_pool_same(v.as_tensor(), 2, 1, true)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = values(g.get(v.as_tensor()).unwrap());
    // Cell (0,0) is only in window (0,0) (4 cells): 1/4. Cell (2,2) is in windows (1,1): 1/4,
    // (1,2): 1/2, (2,1): 1/2, (2,2): 1/1 => 2.25.
    assert!(
        (g[0] - 0.25).abs() < 1e-6 && (g[8] - 2.25).abs() < 1e-6,
        "{g:?}"
    );
}

#[test]
fn resnet_d_strided_pool_counts_the_padding() {
    // FixedPadding(2) (0 before / 1 after, zeros) then 2x2/s2 VALID: always divide by 4.
    let x = arange(3, 3);
    for differentiable in [false, true] {
        let got = values(&avg_pool_fixed_valid(&x, 2, 2, differentiable).unwrap());
        assert_close(&got, &[2.0, 1.75, 3.25, 2.0], 1e-6, "3x3");
        // Even size: the padded row is never read.
        let got = values(&avg_pool_fixed_valid(&arange(4, 4), 2, 2, differentiable).unwrap());
        assert_close(&got, &[2.5, 4.5, 10.5, 12.5], 1e-6, "4x4");
    }
}

#[test]
fn strided_conv_uses_fixed_padding() {
    let mut ts = HashMap::new();
    ts.insert(
        "c.weight".to_string(),
        Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let vb = VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
    let conv = Conv2d::new(vb.pp("c"), 1, 1, 3, 2).unwrap();
    let ones = |n: usize| Tensor::ones((1, 1, n, n), DType::F32, &Device::Cpu).unwrap();
    // 3x3/s2 pads (1, 1) on odd and even maps alike.
    assert_eq!(
        values(&conv.forward(&ones(5)).unwrap()),
        [4., 6., 4., 6., 9., 6., 4., 6., 4.]
    );
    assert_eq!(values(&conv.forward(&ones(4)).unwrap()), [4., 6., 6., 9.]);
    // Stride 1 is SAME: same size, symmetric padding.
    let mut ts = HashMap::new();
    ts.insert(
        "c.weight".to_string(),
        Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let vb = VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
    let conv = Conv2d::new(vb.pp("c"), 1, 1, 3, 1).unwrap();
    assert_eq!(
        values(&conv.forward(&ones(3)).unwrap()),
        [4., 6., 4., 6., 9., 6., 4., 6., 4.]
    );
}

/// Checks d(sum(f(x) * w))/dx against central differences in f64.
fn check_gradient(name: &str, dims: &[usize], f: &dyn Fn(&Tensor) -> Tensor) {
    let dev = Device::Cpu;
    let x0 = pseudo_random(dims, 3, 0.0, 1.0)
        .to_dtype(DType::F64)
        .unwrap();
    let w = pseudo_random(f(&x0).dims(), 4, -1.0, 1.0)
        .to_dtype(DType::F64)
        .unwrap();
    let loss = |x: &Tensor| (f(x) * &w).unwrap().sum_all().unwrap();
    let xv = Var::from_tensor(&x0).unwrap();
    let g = values(
        loss(xv.as_tensor())
            .backward()
            .unwrap()
            .get(xv.as_tensor())
            .unwrap(),
    );
    let base = values(&x0);
    let h = 1e-6;
    let at = |v: Vec<f64>| values(&loss(&Tensor::from_vec(v, dims, &dev).unwrap()))[0];
    for idx in 0..base.len() {
        let mut p = base.clone();
        p[idx] += h;
        let mut m = base.clone();
        m[idx] -= h;
        let fd = (at(p) - at(m)) / (2.0 * h);
        assert!(
            (fd - g[idx]).abs() < 1e-6 * (1.0 + fd.abs()),
            "{name} x[{idx}]: backprop {} vs fd {fd}",
            g[idx]
        );
    }
}

#[test]
fn training_path_pool_gradients_match_finite_differences() {
    // Even sizes matter for the ResNet-D pool: 4 -> 5 after padding, not a multiple of the
    // stride (candle's own avg-pool backward is wrong there unless the map is cropped).
    for n in [4usize, 5, 6, 7] {
        let dims = [2, 2, n, n];
        check_gradient(&format!("fixed-valid avg {n}"), &dims, &|x| {
            avg_pool_fixed_valid(x, 2, 2, true).unwrap()
        });
        check_gradient(&format!("same avg 2/1 {n}"), &dims, &|x| {
            avg_pool_same(x, 2, 1, true).unwrap()
        });
        check_gradient(&format!("same max 3/2 {n}"), &dims, &|x| {
            max_pool_same(x, 3, 2, true).unwrap()
        });
    }
}
