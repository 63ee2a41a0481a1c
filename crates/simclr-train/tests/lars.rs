//! LARS against hand computations and an independent float64 implementation of the official
//! update (the official tf2/lars_optimizer.py).

mod common;

use common::*;
use simclr_train::optim::{Lars, LarsConfig, LarsRules, NamedVar, Optimizer};
use simclr_train::{param_group, ParamGroup};

/// What the official optimizer does to one variable, in float64.
#[derive(Clone, Copy)]
struct Treatment {
    decay: bool,
    adapt: bool,
    l2_in_loss: bool,
}

const ADAPTED: Treatment = Treatment {
    decay: true,
    adapt: true,
    l2_in_loss: false,
};
const EXCLUDED: Treatment = Treatment {
    decay: false,
    adapt: false,
    l2_in_loss: false,
};
const HEAD_KERNEL: Treatment = Treatment {
    decay: false,
    adapt: false,
    l2_in_loss: true,
};

struct Hyper {
    momentum: f64,
    wd: f64,
    eeta: f64,
    nesterov: bool,
}

/// Classic-momentum LARS, lr inside the buffer: returns (w', v').
fn official_step(
    w: &[f64],
    v: &[f64],
    g: &[f64],
    lr: f64,
    t: Treatment,
    h: &Hyper,
) -> (Vec<f64>, Vec<f64>) {
    let mut g: Vec<f64> = g.to_vec();
    if h.wd != 0.0 && (t.decay || t.l2_in_loss) {
        for (gi, wi) in g.iter_mut().zip(w) {
            *gi += h.wd * wi;
        }
    }
    let trust = if t.adapt {
        let (wn, gn) = (norm(w), norm(&g));
        if wn > 0.0 && gn > 0.0 {
            h.eeta * wn / gn
        } else {
            1.0
        }
    } else {
        1.0
    };
    let next_v: Vec<f64> = v
        .iter()
        .zip(&g)
        .map(|(vi, gi)| h.momentum * vi + lr * trust * gi)
        .collect();
    let w_new = w
        .iter()
        .zip(&next_v)
        .zip(&g)
        .map(|((wi, vi), gi)| {
            let update = if h.nesterov {
                h.momentum * vi + lr * trust * gi
            } else {
                *vi
            };
            wi - update
        })
        .collect();
    (w_new, next_v)
}

/// The PyTorch-style placement, lr outside the buffer: v ← m·v + trust·g; w ← w − lr·v.
fn pytorch_style_step(
    w: &[f64],
    v: &[f64],
    g: &[f64],
    lr: f64,
    t: Treatment,
    h: &Hyper,
) -> (Vec<f64>, Vec<f64>) {
    let mut g: Vec<f64> = g.to_vec();
    if h.wd != 0.0 && (t.decay || t.l2_in_loss) {
        for (gi, wi) in g.iter_mut().zip(w) {
            *gi += h.wd * wi;
        }
    }
    let trust = if t.adapt && norm(w) > 0.0 && norm(&g) > 0.0 {
        h.eeta * norm(w) / norm(&g)
    } else {
        1.0
    };
    let next_v: Vec<f64> = v
        .iter()
        .zip(&g)
        .map(|(vi, gi)| h.momentum * vi + trust * gi)
        .collect();
    let w_new = w.iter().zip(&next_v).map(|(wi, vi)| wi - lr * vi).collect();
    (w_new, next_v)
}

#[test]
fn official_table_and_defaults() {
    let c = LarsConfig::default();
    assert_eq!(c.momentum, 0.9);
    assert_eq!(c.eeta, 0.001);
    assert!(!c.use_nesterov);
    assert!(c.classic_momentum);
    let r = LarsRules::OFFICIAL;
    let adapted = r.rule(ParamGroup::Adapted).unwrap();
    assert!(adapted.decay && adapted.adapt && !adapted.l2_in_loss);
    for g in [ParamGroup::BatchNorm, ParamGroup::Bias] {
        let rule = r.rule(g).unwrap();
        assert!(!rule.decay && !rule.adapt && !rule.l2_in_loss, "{g:?}");
    }
    let head = r.rule(ParamGroup::SupervisedHead).unwrap();
    assert!(!head.decay && !head.adapt && head.l2_in_loss);
    assert!(r.rule(ParamGroup::RunningStat).is_none());
}

#[test]
fn hand_computed_adapted_step() {
    // w = [3, 4] (‖w‖ = 5), g = [0.3, 0.4], wd = 0.1 → g + wd·w = [0.6, 0.8], ‖·‖ = 1,
    // trust = 0.001·5/1 = 0.005, lr = 2 → v = 2·0.005·[0.6, 0.8] = [0.006, 0.008],
    // w' = [2.994, 3.992].
    let w = var(&[3.0, 4.0], &[1, 2]);
    let mut opt = Lars::new(
        vec![NamedVar::new("resnet.conv2d.weight", w.clone())],
        LarsConfig {
            weight_decay: 0.1,
            ..LarsConfig::default()
        },
    )
    .unwrap();
    assert_eq!(opt.vars()[0].group, ParamGroup::Adapted);
    let stats = opt.step(&grads(&[(&w, &[0.3, 0.4])]), 2.0).unwrap();
    assert_close(&values(w.as_tensor()), &[2.994, 3.992], 1e-6, "w");
    let state = opt.state_tensors();
    assert_eq!(state[0].0, "lars/momentum/resnet.conv2d.weight");
    assert_close(&values(&state[0].1), &[0.006, 0.008], 1e-5, "v");
    // ½·wd·‖w‖² = 0.5·0.1·25
    assert!((stats.weight_decay_loss_value().unwrap() - 1.25).abs() < 1e-6);
    assert_eq!(stats.num_updated, 1);
}

/// Two steps with different learning rates on an adapted kernel, a BN gamma, and the
/// supervised head's kernel and bias; the second step starts from a non-zero buffer.
#[test]
fn two_steps_match_float64_and_keep_lr_inside_the_buffer() {
    let h = Hyper {
        momentum: 0.9,
        wd: 0.05,
        eeta: 0.3,
        nesterov: false,
    };
    let conv_w = [0.5f32, -1.0, 0.25, 2.0, -0.75, 1.5, 0.1, -0.2];
    let gamma_w = [1.0f32, 0.5, 1.5];
    let head_w = [0.2f32, -0.4, 0.6, -0.8, 1.0, -1.2];
    let head_b = [0.1f32, -0.3];
    let conv = var(&conv_w, &[2, 1, 2, 2]);
    let gamma = var(&gamma_w, &[3]);
    let hw = var(&head_w, &[2, 3]);
    let hb = var(&head_b, &[2]);
    let named = vec![
        NamedVar::new("resnet.block_group1.conv2d.weight", conv.clone()),
        NamedVar::new("resnet.block_group1.batch_norm.gamma", gamma.clone()),
        NamedVar::new("head_supervised.weight", hw.clone()),
        NamedVar::new("head_supervised.bias", hb.clone()),
    ];
    let groups: Vec<_> = named.iter().map(|v| v.group).collect();
    assert_eq!(
        groups,
        [
            ParamGroup::Adapted,
            ParamGroup::BatchNorm,
            ParamGroup::SupervisedHead,
            ParamGroup::Bias
        ]
    );
    let treat = [ADAPTED, EXCLUDED, HEAD_KERNEL, EXCLUDED];
    let mut opt = Lars::new(
        named,
        LarsConfig {
            momentum: h.momentum,
            weight_decay: h.wd,
            eeta: h.eeta,
            ..LarsConfig::default()
        },
    )
    .unwrap();

    let g1: [&[f32]; 4] = [
        &[0.3, 0.1, -0.2, 0.4, 0.05, -0.6, 0.2, 0.1],
        &[0.2, -0.1, 0.3],
        &[0.05, 0.1, -0.15, 0.2, -0.25, 0.3],
        &[0.4, -0.2],
    ];
    let g2: [&[f32]; 4] = [
        &[-0.1, 0.2, 0.3, -0.4, 0.5, 0.1, -0.3, 0.2],
        &[-0.3, 0.2, 0.1],
        &[0.1, -0.1, 0.2, -0.2, 0.3, -0.3],
        &[-0.1, 0.5],
    ];
    let (lr1, lr2) = (0.5, 2.0);
    let vars = [&conv, &gamma, &hw, &hb];
    let store = |gs: &[&[f32]; 4]| {
        grads(&[
            (vars[0], gs[0]),
            (vars[1], gs[1]),
            (vars[2], gs[2]),
            (vars[3], gs[3]),
        ])
    };

    let initial = [f64s(&conv_w), f64s(&gamma_w), f64s(&head_w), f64s(&head_b)];
    let mut want_w = initial.clone();
    let mut want_v: Vec<Vec<f64>> = initial.iter().map(|w| vec![0.0; w.len()]).collect();
    let mut torch_w = initial.clone();
    let mut torch_v = want_v.clone();
    let mut want_wd_loss = 0.0;
    for (step, (gs, lr)) in [(&g1, lr1), (&g2, lr2)].into_iter().enumerate() {
        want_wd_loss = 0.5 * h.wd * (norm(&want_w[0]).powi(2) + norm(&want_w[2]).powi(2));
        let stats = opt.step(&store(gs), lr).unwrap();
        assert_eq!(stats.num_updated, 4);
        for i in 0..4 {
            let (w, v) = official_step(&want_w[i], &want_v[i], &f64s(gs[i]), lr, treat[i], &h);
            want_w[i] = w;
            want_v[i] = v;
            let (w, v) =
                pytorch_style_step(&torch_w[i], &torch_v[i], &f64s(gs[i]), lr, treat[i], &h);
            torch_w[i] = w;
            torch_v[i] = v;
        }
        let state = opt.state_tensors();
        for i in 0..4 {
            let what = format!("step {} var {i}", step + 1);
            assert_close(
                &values(vars[i].as_tensor()),
                &want_w[i],
                1e-5,
                &format!("{what} w"),
            );
            assert_close(&values(&state[i].1), &want_v[i], 1e-5, &format!("{what} v"));
        }
        let got = stats.weight_decay_loss_value().unwrap();
        assert!(
            (got - want_wd_loss).abs() <= 1e-5 * want_wd_loss,
            "wd loss {got} vs {want_wd_loss}"
        );
    }
    assert!(want_wd_loss > 0.0);

    // The bias and the BN gamma are plain momentum SGD with lr inside the buffer:
    // v2 = m·lr1·g1 + lr2·g2.
    let expect_bias_v: Vec<f64> = f64s(g1[3])
        .iter()
        .zip(f64s(g2[3]))
        .map(|(a, b)| 0.9 * lr1 * a + lr2 * b)
        .collect();
    assert_close(
        &values(&opt.state_tensors()[3].1),
        &expect_bias_v,
        1e-5,
        "bias v",
    );

    // After an lr change the two placements disagree, for every group.
    for i in 0..4 {
        let got = values(vars[i].as_tensor());
        let diff = max_abs_diff(&got, &torch_w[i]);
        assert!(
            diff > 1e-3,
            "var {i}: PyTorch-style placement gives the same weights ({diff})"
        );
    }
}

#[test]
fn nesterov_two_steps_match_float64() {
    let h = Hyper {
        momentum: 0.9,
        wd: 0.01,
        eeta: 0.2,
        nesterov: true,
    };
    let w0 = [1.0f32, -2.0, 0.5, 0.25];
    let b0 = [0.5f32, -0.5];
    let w = var(&w0, &[2, 2]);
    let b = var(&b0, &[2]);
    let mut opt = Lars::new(
        vec![
            NamedVar::new("projection_head.linear_0.weight", w.clone()),
            NamedVar::new("projection_head.linear_0.bias", b.clone()),
        ],
        LarsConfig {
            momentum: h.momentum,
            weight_decay: h.wd,
            eeta: h.eeta,
            use_nesterov: true,
            ..LarsConfig::default()
        },
    )
    .unwrap();
    let gs: [[&[f32]; 2]; 2] = [
        [&[0.1, 0.2, -0.3, 0.4], &[0.2, 0.1]],
        [&[-0.2, 0.1, 0.4, -0.1], &[-0.3, 0.3]],
    ];
    let mut ww = f64s(&w0);
    let mut wb = f64s(&b0);
    let mut vw = vec![0.0; 4];
    let mut vb = vec![0.0; 2];
    for (g, lr) in gs.iter().zip([0.3, 1.1]) {
        opt.step(&grads(&[(&w, g[0]), (&b, g[1])]), lr).unwrap();
        (ww, vw) = official_step(&ww, &vw, &f64s(g[0]), lr, ADAPTED, &h);
        (wb, vb) = official_step(&wb, &vb, &f64s(g[1]), lr, EXCLUDED, &h);
        assert_close(&values(w.as_tensor()), &ww, 1e-5, "nesterov w");
        assert_close(&values(b.as_tensor()), &wb, 1e-5, "nesterov b");
    }
}

#[test]
fn non_classic_momentum_matches_float64() {
    // v ← m·v + g (g with decay); u = v; trust = eeta·‖w‖/‖u‖; w ← w − lr·trust·u.
    let (m, wd, eeta) = (0.9, 0.02, 0.1);
    let w0 = [0.5f32, 1.5, -1.0];
    let w = var(&w0, &[3]);
    let name = "resnet.conv2d_1.weight";
    let mut opt = Lars::new(
        vec![NamedVar::new(name, w.clone())],
        LarsConfig {
            momentum: m,
            weight_decay: wd,
            eeta,
            classic_momentum: false,
            ..LarsConfig::default()
        },
    )
    .unwrap();
    let mut ww = f64s(&w0);
    let mut vv = vec![0.0; 3];
    for (g, lr) in [(&[0.2f32, -0.1, 0.3], 0.5), (&[-0.4f32, 0.2, 0.1], 1.5)] {
        opt.step(&grads(&[(&w, g)]), lr).unwrap();
        let gd: Vec<f64> = f64s(g)
            .iter()
            .zip(&ww)
            .map(|(gi, wi)| gi + wd * wi)
            .collect();
        vv = vv.iter().zip(&gd).map(|(vi, gi)| m * vi + gi).collect();
        let trust = eeta * norm(&ww) / norm(&vv);
        ww = ww
            .iter()
            .zip(&vv)
            .map(|(wi, vi)| wi - lr * trust * vi)
            .collect();
        assert_close(&values(w.as_tensor()), &ww, 1e-5, "non-classic w");
        assert_close(
            &values(&opt.state_tensors()[0].1),
            &vv,
            1e-5,
            "non-classic v",
        );
    }
}

#[test]
fn trust_is_one_when_a_norm_is_zero() {
    // ‖w‖ = 0: trust 1, so the update is the plain lr·(g + wd·0) = lr·g.
    let zero = var(&[0.0, 0.0, 0.0], &[3]);
    // ‖g‖ = 0 (and no decay): trust 1 and nothing moves; no NaN from 0/0.
    let still = var(&[3.0, 4.0], &[2]);
    let mut opt = Lars::new(
        vec![
            NamedVar::new("resnet.conv2d.weight", zero.clone()),
            NamedVar::new("resnet.conv2d_1.weight", still.clone()),
        ],
        LarsConfig {
            weight_decay: 0.1,
            ..LarsConfig::default()
        },
    )
    .unwrap();
    opt.step(
        &grads(&[(&zero, &[1.0, -2.0, 0.5]), (&still, &[0.0, 0.0])]),
        0.5,
    )
    .unwrap();
    assert_close(
        &values(zero.as_tensor()),
        &[-0.5, 1.0, -0.25],
        1e-6,
        "zero w",
    );
    // For `still` the decayed gradient is wd·w = [0.3, 0.4] (norm 0.5), trust = 0.001·5/0.5.
    let trust = 0.001 * 5.0 / 0.5;
    assert_close(
        &values(still.as_tensor()),
        &[3.0 - 0.5 * trust * 0.3, 4.0 - 0.5 * trust * 0.4],
        1e-6,
        "still w",
    );

    let mut no_decay = Lars::new(
        vec![NamedVar::new("resnet.conv2d.weight", still.clone())],
        LarsConfig {
            weight_decay: 0.0,
            ..LarsConfig::default()
        },
    )
    .unwrap();
    let before = values(still.as_tensor());
    no_decay
        .step(&grads(&[(&still, &[0.0, 0.0])]), 0.5)
        .unwrap();
    let after = values(still.as_tensor());
    assert_eq!(before, after);
    assert!(values(&no_decay.state_tensors()[0].1)
        .iter()
        .all(|v| *v == 0.0));
}

#[test]
fn variables_without_gradients_and_moving_stats_are_left_alone() {
    let a = var(&[1.0, 2.0], &[2]);
    let b = var(&[3.0, 4.0], &[2]);
    let mm = var(&[0.0, 0.0], &[2]);
    let mut opt = Lars::new(
        vec![
            NamedVar::new("resnet.conv2d.weight", a.clone()),
            NamedVar::new("resnet.conv2d_1.weight", b.clone()),
            NamedVar::new("resnet.batch_norm.moving_mean", mm.clone()),
        ],
        LarsConfig::default(),
    )
    .unwrap();
    assert_eq!(
        param_group("resnet.batch_norm.moving_mean"),
        ParamGroup::RunningStat
    );
    assert_eq!(opt.vars().len(), 2, "moving statistics are not optimised");
    let stats = opt.step(&grads(&[(&a, &[0.1, 0.1])]), 1.0).unwrap();
    assert_eq!(stats.num_updated, 1);
    assert_eq!(values(b.as_tensor()), vec![3.0, 4.0]);
    assert!(values(&opt.state_tensors()[1].1).iter().all(|v| *v == 0.0));
}
