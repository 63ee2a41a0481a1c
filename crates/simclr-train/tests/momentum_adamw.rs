//! Nesterov momentum SGD and AdamW: two steps against float64 formulas.

mod common;

use common::*;
use simclr_train::optim::{AdamW, AdamWConfig, MomentumConfig, MomentumSgd, NamedVar, Optimizer};
use simclr_train::ParamGroup;

#[test]
fn nesterov_momentum_two_steps_match_float64() {
    // Official `momentum`: g ← g + wd·w for every non-BN variable (biases included);
    // v ← m·v + lr·g; w ← w − (m·v + lr·g).
    let (m, wd) = (0.9, 0.05);
    let k0 = [0.5f32, -1.0, 2.0, 0.25];
    let gamma0 = [1.0f32, 0.8];
    let bias0 = [0.3f32, -0.6];
    let k = var(&k0, &[2, 2]);
    let gamma = var(&gamma0, &[2]);
    let bias = var(&bias0, &[2]);
    let named = vec![
        NamedVar::new("head_supervised.weight", k.clone()),
        NamedVar::new("resnet.batch_norm.gamma", gamma.clone()),
        NamedVar::new("head_supervised.bias", bias.clone()),
    ];
    assert_eq!(named[1].group, ParamGroup::BatchNorm);
    let mut opt = MomentumSgd::new(
        named,
        MomentumConfig {
            momentum: m,
            weight_decay: wd,
            nesterov: true,
        },
    )
    .unwrap();
    let decayed = [true, false, true];
    let mut w = [f64s(&k0), f64s(&gamma0), f64s(&bias0)];
    let mut v = [vec![0.0; 4], vec![0.0; 2], vec![0.0; 2]];
    let steps: [([&[f32]; 3], f64); 2] = [
        ([&[0.1, -0.2, 0.3, 0.4], &[0.5, -0.5], &[0.2, 0.1]], 0.4),
        ([&[-0.3, 0.1, 0.2, -0.1], &[0.1, 0.3], &[-0.4, 0.2]], 1.3),
    ];
    let vars = [&k, &gamma, &bias];
    for (gs, lr) in steps {
        let want_wd: f64 = (0..3)
            .filter(|&i| decayed[i])
            .map(|i| 0.5 * wd * norm(&w[i]).powi(2))
            .sum();
        let stats = opt
            .step(
                &grads(&[(vars[0], gs[0]), (vars[1], gs[1]), (vars[2], gs[2])]),
                lr,
            )
            .unwrap();
        assert!((stats.weight_decay_loss_value().unwrap() - want_wd).abs() < 1e-6);
        for i in 0..3 {
            let g: Vec<f64> = f64s(gs[i])
                .iter()
                .zip(&w[i])
                .map(|(g, wi)| if decayed[i] { g + wd * wi } else { *g })
                .collect();
            v[i] = v[i]
                .iter()
                .zip(&g)
                .map(|(vi, gi)| m * vi + lr * gi)
                .collect();
            w[i] = w[i]
                .iter()
                .zip(&v[i])
                .zip(&g)
                .map(|((wi, vi), gi)| wi - (m * vi + lr * gi))
                .collect();
            assert_close(
                &values(vars[i].as_tensor()),
                &w[i],
                1e-5,
                &format!("sgd w{i}"),
            );
            assert_close(
                &values(&opt.state_tensors()[i].1),
                &v[i],
                1e-5,
                &format!("sgd v{i}"),
            );
        }
    }
}

#[test]
fn plain_momentum_without_nesterov() {
    let w = var(&[1.0, 2.0], &[2]);
    let mut opt = MomentumSgd::new(
        vec![NamedVar::new("resnet.conv2d.weight", w.clone())],
        MomentumConfig {
            momentum: 0.5,
            weight_decay: 0.0,
            nesterov: false,
        },
    )
    .unwrap();
    opt.step(&grads(&[(&w, &[1.0, 1.0])]), 0.1).unwrap(); // v = 0.1, w = [0.9, 1.9]
    opt.step(&grads(&[(&w, &[1.0, 1.0])]), 0.2).unwrap(); // v = 0.05 + 0.2 = 0.25
    assert_close(&values(w.as_tensor()), &[0.65, 1.65], 1e-6, "w");
}

#[test]
fn adamw_two_steps_match_float64() {
    let (b1, b2, eps, wd) = (0.9, 0.999, 1e-8, 0.1);
    let k0 = [0.5f32, -1.0, 2.0, 0.25, -0.75, 1.5];
    let bias0 = [0.3f32, -0.6];
    let k = var(&k0, &[2, 3]);
    let bias = var(&bias0, &[2]);
    let mut opt = AdamW::new(
        vec![
            NamedVar::new("resnet.conv2d.weight", k.clone()),
            NamedVar::new("resnet.dense.bias", bias.clone()),
        ],
        AdamWConfig {
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
        },
    )
    .unwrap();
    let decayed = [true, false];
    let mut w = [f64s(&k0), f64s(&bias0)];
    let mut m1 = [vec![0.0; 6], vec![0.0; 2]];
    let mut m2 = m1.clone();
    let steps: [([&[f32]; 2], f64); 2] = [
        ([&[0.1, -0.2, 0.3, 0.4, -0.5, 0.05], &[0.2, -0.1]], 0.01),
        ([&[-0.3, 0.1, 0.2, -0.1, 0.6, 0.0], &[-0.4, 0.2]], 0.03),
    ];
    let vars = [&k, &bias];
    for (t, (gs, lr)) in steps.into_iter().enumerate() {
        let t = (t + 1) as i32;
        opt.step(&grads(&[(vars[0], gs[0]), (vars[1], gs[1])]), lr)
            .unwrap();
        for i in 0..2 {
            let g = f64s(gs[i]);
            m1[i] = m1[i]
                .iter()
                .zip(&g)
                .map(|(m, g)| b1 * m + (1.0 - b1) * g)
                .collect();
            m2[i] = m2[i]
                .iter()
                .zip(&g)
                .map(|(v, g)| b2 * v + (1.0 - b2) * g * g)
                .collect();
            let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            w[i] = (0..w[i].len())
                .map(|j| {
                    let decayed_w = if decayed[i] {
                        w[i][j] * (1.0 - lr * wd)
                    } else {
                        w[i][j]
                    };
                    let mhat = m1[i][j] / bc1;
                    let vhat = m2[i][j] / bc2;
                    decayed_w - lr * mhat / (vhat.sqrt() + eps)
                })
                .collect();
            assert_close(
                &values(vars[i].as_tensor()),
                &w[i],
                1e-5,
                &format!("adamw w{i} t{t}"),
            );
        }
        let state = opt.state_tensors();
        assert_eq!(state[0].0, "adamw/m/resnet.conv2d.weight");
        assert_close(&values(&state[0].1), &m1[0], 1e-5, "adamw m");
        assert_close(&values(&state[1].1), &m2[0], 1e-4, "adamw v");
        assert_eq!(opt.steps(), &[t as u64, t as u64]);
    }
}
