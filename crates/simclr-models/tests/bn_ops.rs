//! The fused BN kernels against candle-op compositions in f64, and global BN over simulated
//! replicas against one replica on the combined batch.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use simclr_collective::{Collective, ThreadGroup};
use simclr_kernels::bn_ops::{
    bn_apply, bn_apply_add, bn_apply_reference, channel_moments, channel_moments_reference,
    moments_to_stats,
};
use simclr_models::batch_norm::{BatchNorm, BatchNormOptions, BnMode};

const SHAPES: [&[usize]; 5] = [
    &[3, 5, 7, 9],
    &[2, 4, 1, 1],
    &[5, 3, 11, 6],
    &[7, 13],
    &[1, 2, 17],
];

fn random(dims: &[usize], seed: u64, offset: f32) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * 2.0 + offset)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (values(got), values(want));
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{what}[{i}]: {a} vs {b} (scale {scale})"
        );
    }
}

#[test]
fn moments_match_a_float64_sum() {
    for (k, dims) in SHAPES.iter().enumerate() {
        // An offset mean checks that the f64 accumulation keeps Σx² accurate.
        let x = random(dims, k as u64, 3.0);
        let m = channel_moments(&x).unwrap();
        assert_eq!(m.dtype(), DType::F64);
        let (n, c) = (dims[0], dims[1]);
        let p: usize = dims[2..].iter().product();
        let xv = values(&x);
        let mut want = vec![0f64; 2 * c];
        for i in 0..n {
            for ch in 0..c {
                for j in 0..p {
                    let v = xv[(i * c + ch) * p + j];
                    want[ch] += v;
                    want[c + ch] += v * v;
                }
            }
        }
        let got = values(&m);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{dims:?}[{i}]: {a} vs {b}"
            );
        }
    }
}

/// The whole training-mode BN (moments, statistics, apply) with `relu`, and a loss
/// `Σ y·r`; returns the output and the gradients of x, γ and β.
fn bn_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    r: &Tensor,
    relu: bool,
    reference: bool,
) -> (Tensor, Tensor, Tensor, Tensor) {
    let dtype = x.dtype();
    let (xv, gv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(gamma).unwrap(),
        Var::from_tensor(beta).unwrap(),
    );
    let moments = if reference {
        channel_moments_reference(xv.as_tensor()).unwrap()
    } else {
        channel_moments(xv.as_tensor()).unwrap()
    };
    let count = x.elem_count() / x.dim(1).unwrap();
    let (stats, _, _) = moments_to_stats(&moments, count, 1e-3, gamma.dtype()).unwrap();
    let affine = Tensor::stack(&[gv.as_tensor(), bv.as_tensor()], 0).unwrap();
    let y = if reference {
        bn_apply_reference(xv.as_tensor(), &stats, &affine, relu).unwrap()
    } else {
        bn_apply(xv.as_tensor(), &stats, &affine, relu).unwrap()
    };
    let loss = (&y * r.to_dtype(dtype).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
    (y, grad(&xv), grad(&gv), grad(&bv))
}

#[test]
fn fused_training_bn_matches_a_float64_composition() {
    for (k, dims) in SHAPES.iter().enumerate() {
        for relu in [false, true] {
            let seed = 10 * k as u64;
            let x = random(dims, seed, 0.5);
            let c = dims[1];
            let gamma = random(&[c], seed + 1, 1.0);
            let beta = random(&[c], seed + 2, 0.0);
            let r = random(dims, seed + 3, 0.0);
            let fast = bn_train(&x, &gamma, &beta, &r, relu, false);
            let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let want = bn_train(&f64_(&x), &f64_(&gamma), &f64_(&beta), &r, relu, true);
            let what = format!("{dims:?} relu={relu}");
            assert_close(&format!("{what} y"), &fast.0, &want.0, 2e-5);
            assert_close(&format!("{what} dx"), &fast.1, &want.1, 1e-4);
            assert_close(&format!("{what} dgamma"), &fast.2, &want.2, 1e-4);
            assert_close(&format!("{what} dbeta"), &fast.3, &want.3, 1e-4);
        }
    }
}

#[test]
fn f64_gradient_of_the_composition_matches_finite_differences() {
    // The reference composition is the yardstick above; check it once against central
    // differences so that the chain (moments → statistics → apply) is itself right.
    let dims = [3usize, 2, 3, 2];
    let x = random(&dims, 99, 0.3).to_dtype(DType::F64).unwrap();
    let gamma = random(&[2], 98, 1.0).to_dtype(DType::F64).unwrap();
    let beta = random(&[2], 97, 0.0).to_dtype(DType::F64).unwrap();
    let r = random(&dims, 96, 0.0).to_dtype(DType::F64).unwrap();
    let (_, dx, _, _) = bn_train(&x, &gamma, &beta, &r, true, true);
    let loss = |xs: &Tensor| {
        let m = channel_moments_reference(xs).unwrap();
        let (stats, _, _) = moments_to_stats(&m, 18, 1e-3, DType::F64).unwrap();
        let affine = Tensor::stack(&[&gamma, &beta], 0).unwrap();
        let y = bn_apply_reference(xs, &stats, &affine, true).unwrap();
        values(&(&y * &r).unwrap().sum_all().unwrap())[0]
    };
    let base = values(&x);
    let g = values(&dx);
    let h = 1e-6;
    for i in 0..base.len() {
        let at = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            loss(&Tensor::from_vec(v, &dims[..], &Device::Cpu).unwrap())
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "x[{i}]: {} vs {fd}",
            g[i]
        );
    }
}

#[test]
fn inference_mode_uses_the_moving_statistics() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = BatchNorm::new(vb, 3, BatchNormOptions::new(1e-5, 0.9)).unwrap();
    let x = random(&[4, 3, 5, 5], 5, 1.0);
    bn.forward(&x, true).unwrap();
    let (mm, mv) = (values(&bn.moving_mean()), values(&bn.moving_variance()));
    let y = bn.forward_relu(&x, false).unwrap();
    let xv = values(&x);
    for (i, &got) in values(&y).iter().enumerate() {
        let ch = (i / 25) % 3;
        let want = ((xv[i] - mm[ch]) / (mv[ch] + 1e-5).sqrt()).max(0.0);
        assert!((got - want).abs() < 1e-5, "y[{i}]: {got} vs {want}");
    }
}

/// A BN layer over `x` in training mode (optionally global) with the loss `Σ y·r`: the output,
/// the gradients of x, γ and β, and the moving mean and variance after the update.
fn bn_layer_step(x: &Tensor, r: &Tensor, replicas: Option<&dyn Collective>) -> Vec<Tensor> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let c = x.dim(1).unwrap();
    let bn = BatchNorm::new(vb, c, BatchNormOptions::new(1e-3, 0.9)).unwrap();
    let xv = Var::from_tensor(x).unwrap();
    let mode = BnMode {
        train: true,
        replicas,
    };
    let y = bn.forward_relu(xv.as_tensor(), mode).unwrap();
    let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let grad = |name: &str| g.get(data[name].as_tensor()).unwrap().clone();
    vec![
        y.clone(),
        g.get(xv.as_tensor()).unwrap().clone(),
        grad("gamma"),
        grad("beta"),
        bn.moving_mean(),
        bn.moving_variance(),
    ]
}

/// A BN layer of `dtype` in training mode on this replica alone, with random γ and β, ending
/// `relu?(bn(x) [+ residual])`, and the loss `Σ y·w`: the output, the gradients of x, γ, β
/// (and the residual), and the moving statistics after the update.
fn local_bn_layer(
    x: &Tensor,
    residual: Option<&Tensor>,
    w: &Tensor,
    relu: bool,
    dtype: DType,
) -> Vec<Tensor> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let c = x.dim(1).unwrap();
    let bn = BatchNorm::new(vb, c, BatchNormOptions::new(1e-3, 0.9)).unwrap();
    let data = varmap.data().lock().unwrap();
    let to = |t: Tensor| t.to_dtype(dtype).unwrap();
    data["gamma"].set(&to(random(&[c], 7, 1.0))).unwrap();
    data["beta"].set(&to(random(&[c], 8, 0.0))).unwrap();
    let xv = Var::from_tensor(&to(x.clone())).unwrap();
    let rv = residual.map(|r| Var::from_tensor(&to(r.clone())).unwrap());
    let y = match (&rv, relu) {
        (Some(r), _) => bn
            .forward_add_relu(xv.as_tensor(), r.as_tensor(), true)
            .unwrap(),
        (None, true) => bn.forward_relu(xv.as_tensor(), true).unwrap(),
        (None, false) => bn.forward(xv.as_tensor(), true).unwrap(),
    };
    let g = (&y * to(w.clone()))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = |t: &Tensor| g.get(t).unwrap().clone();
    let mut out = vec![
        y.clone(),
        grad(xv.as_tensor()),
        grad(data["gamma"].as_tensor()),
        grad(data["beta"].as_tensor()),
        bn.moving_mean(),
        bn.moving_variance(),
    ];
    out.extend(rv.map(|r| grad(r.as_tensor())));
    out
}

#[test]
fn local_training_bn_layer_matches_a_float64_composition() {
    // The whole layer on this replica alone (moments, statistics, apply, moving averages),
    // ending in a ReLU and a residual or not: in f32 through the fused kernels, in f64 through
    // candle's ops. Odd sizes, one value per channel and image, an offset mean.
    let names = [
        "y",
        "dx",
        "dgamma",
        "dbeta",
        "moving_mean",
        "moving_var",
        "dresidual",
    ];
    for (k, dims) in SHAPES.iter().enumerate() {
        for (relu, with_residual) in [(false, false), (true, false), (true, true)] {
            let seed = 500 + 10 * k as u64;
            let x = random(dims, seed, 1.5);
            let res = random(dims, seed + 1, 0.0);
            let w = random(dims, seed + 2, 0.3);
            let residual = with_residual.then_some(&res);
            let fast = local_bn_layer(&x, residual, &w, relu, DType::F32);
            let want = local_bn_layer(&x, residual, &w, relu, DType::F64);
            assert_eq!(fast.len(), want.len());
            for ((name, a), b) in names.iter().zip(&fast).zip(&want) {
                let what = format!("{dims:?} relu={relu} residual={with_residual} {name}");
                assert_close(&what, a, b, 1e-4);
            }
        }
    }
}

#[test]
fn global_bn_over_replicas_equals_one_replica_on_the_combined_batch() {
    for world in [2usize, 3] {
        let dims = [2 * world, 4, 3, 5];
        let x = random(&dims, 40 + world as u64, 0.7);
        let r = random(&dims, 50 + world as u64, 0.0);
        let whole = bn_layer_step(&x, &r, None);
        let parts = ThreadGroup::run(world, |rep| {
            let k = rep.rank();
            let xs = x.narrow(0, 2 * k, 2).unwrap();
            let rs = r.narrow(0, 2 * k, 2).unwrap();
            let mut out = bn_layer_step(&xs, &rs, Some(&rep));
            // Parameter gradients are summed over the replicas by the training loop.
            out[2] = rep.all_reduce_sum(&out[2]).unwrap();
            out[3] = rep.all_reduce_sum(&out[3]).unwrap();
            out
        });
        for (i, what) in ["y", "dx"].iter().enumerate() {
            let cat: Vec<Tensor> = parts.iter().map(|p| p[i].clone()).collect();
            let cat = Tensor::cat(&cat, 0).unwrap();
            assert_close(&format!("world {world} {what}"), &cat, &whole[i], 1e-5);
        }
        for (i, what) in [
            (2, "dgamma"),
            (3, "dbeta"),
            (4, "moving_mean"),
            (5, "moving_var"),
        ] {
            for p in &parts {
                assert_close(&format!("world {world} {what}"), &p[i], &whole[i], 1e-5);
            }
        }
    }
}

#[test]
fn fused_residual_add_matches_a_float64_composition() {
    // y = relu?(bn(x) + r): values and the gradients of x, the statistics, γ, β and r.
    let run =
        |x: &Tensor, res: &Tensor, params: &[Tensor; 4], w: &Tensor, relu: bool, fast: bool| {
            let vars: Vec<Var> = [x, res, &params[0], &params[1], &params[2], &params[3]]
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let t = |i: usize| vars[i].as_tensor();
            let stats = Tensor::stack(&[t(2), t(3)], 0).unwrap();
            let affine = Tensor::stack(&[t(4), t(5)], 0).unwrap();
            let y = if fast {
                bn_apply_add(t(0), &stats, &affine, Some(t(1)), relu).unwrap()
            } else {
                let y = (bn_apply_reference(t(0), &stats, &affine, false).unwrap() + t(1)).unwrap();
                if relu {
                    y.relu().unwrap()
                } else {
                    y
                }
            };
            let g = (&y * w.to_dtype(x.dtype()).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut out = vec![y.clone()];
            out.extend(vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
            out
        };
    for (k, dims) in SHAPES.iter().enumerate() {
        for relu in [false, true] {
            let seed = 100 + 10 * k as u64;
            let c = dims[1];
            let x = random(dims, seed, 0.2);
            let res = random(dims, seed + 1, 0.0);
            let w = random(dims, seed + 2, 0.0);
            let params = [
                random(&[c], seed + 3, 0.0),
                random(&[c], seed + 4, 3.0),
                random(&[c], seed + 5, 1.0),
                random(&[c], seed + 6, 0.0),
            ];
            let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let fast = run(&x, &res, &params, &w, relu, true);
            let want = run(
                &f64_(&x),
                &f64_(&res),
                &params.clone().map(|p| f64_(&p)),
                &w,
                relu,
                false,
            );
            let names = [
                "y",
                "dx",
                "dresidual",
                "dmean",
                "dinvstd",
                "dgamma",
                "dbeta",
            ];
            for ((name, a), b) in names.iter().zip(&fast).zip(&want) {
                assert_close(&format!("{dims:?} relu={relu} {name}"), a, b, 1e-4);
            }
        }
    }
}

#[test]
fn kernels_give_the_same_bits_for_any_thread_count() {
    // Reductions sum per-image partials in image order, so work stealing cannot change a bit
    // (resumed runs must repeat uninterrupted ones exactly).
    let dims = [37usize, 6, 5, 7];
    let x = random(&dims, 300, 0.4);
    let r = random(&dims, 301, 0.0);
    let gamma = random(&[6], 302, 1.0);
    let beta = random(&[6], 303, 0.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let out = bn_train(&x, &gamma, &beta, &r, true, false);
            let m = channel_moments(&x).unwrap();
            [out.0, out.1, out.2, out.3, m].map(|t| values(&t))
        })
    };
    let one = run(1);
    for threads in [2, 3, 5] {
        assert_eq!(run(threads), one, "{threads} threads");
    }
}

#[test]
fn relu_gradient_at_exactly_zero_matches_between_kernel_and_reference() {
    // A block's last BN at initialisation (γ = β = 0) makes the sum equal the shortcut, which
    // is exactly 0 wherever the previous ReLU cut: both paths must give those points no
    // gradient (TF's and PyTorch's convention).
    let dims = [4usize, 3, 5, 5];
    let x = random(&dims, 400, 0.3);
    let res = random(&dims, 401, 0.0).relu().unwrap();
    let w = random(&dims, 402, 0.0);
    let zeros = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let ones = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    let stats = Tensor::stack(&[&zeros, &ones], 0).unwrap();
    let grads = |fast: bool| {
        let rv = Var::from_tensor(&res).unwrap();
        let gv = Var::from_tensor(&zeros).unwrap();
        let affine = Tensor::stack(&[gv.as_tensor(), &zeros], 0).unwrap();
        let y = if fast {
            bn_apply_add(&x, &stats, &affine, Some(rv.as_tensor()), true).unwrap()
        } else {
            let xs = x.to_dtype(DType::F64).unwrap();
            let st = stats.to_dtype(DType::F64).unwrap();
            let af = affine.to_dtype(DType::F64).unwrap();
            let r64 = rv.as_tensor().to_dtype(DType::F64).unwrap();
            bn_apply_add(&xs, &st, &af, Some(&r64), true).unwrap()
        };
        let g = (&y * w.to_dtype(y.dtype()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        [
            g.get(rv.as_tensor()).unwrap().clone(),
            g.get(gv.as_tensor()).unwrap().clone(),
        ]
    };
    let (fast, reference) = (grads(true), grads(false));
    assert!(
        values(&res).contains(&0.0),
        "the residual must hold exact zeros"
    );
    assert_close("dresidual", &fast[0], &reference[0], 1e-5);
    assert_close("dgamma", &fast[1], &reference[1], 1e-5);
}
