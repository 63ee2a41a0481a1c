//! The assembled network: shapes, initialisation, zero-init residuals, heads and
//! `fine_tune_after_block`.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{max_abs_diff, pseudo_random, values};
use simclr_models::init::TRUNCATED_NORMAL_STD;
use simclr_models::SK1_RATIO;
use simclr_models::{ForwardOptions, ModelConfig, ProjHeadMode, SimclrModel};

fn tiny(depth: usize, sk: bool, cifar: bool, base_width: usize) -> ModelConfig {
    ModelConfig {
        resnet_depth: depth,
        sk_ratio: if sk { SK1_RATIO } else { 0.0 },
        cifar_stem: cifar,
        base_width,
        num_classes: Some(10),
        proj_out_dim: 16,
        ..ModelConfig::default()
    }
}

fn build(config: &ModelConfig, seed: u64) -> (VarMap, SimclrModel) {
    let varmap = VarMap::new();
    let model = SimclrModel::init(config, &varmap, seed, &Device::Cpu).unwrap();
    (varmap, model)
}

fn var_values(varmap: &VarMap) -> HashMap<String, Vec<f64>> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), values(v.as_tensor())))
        .collect()
}

#[test]
fn output_shapes_of_the_three_reference_topologies() {
    // (config, input size, expected spatial size after stem and each group)
    let cases = [
        (tiny(18, false, true, 8), 32, [32, 32, 16, 8, 4]),
        (tiny(50, false, false, 8), 64, [16, 16, 8, 4, 2]),
        (tiny(50, true, false, 8), 66, [17, 17, 9, 5, 3]),
    ];
    for (config, size, spatial) in cases {
        let (_vm, model) = build(&config, 1);
        let x = pseudo_random(&[2, 3, size, size], 2, 0.0, 1.0);
        for train in [false, true] {
            let (e, out) = model
                .forward_endpoints(&x, ForwardOptions::mode(train))
                .unwrap();
            let name = config.name();
            assert_eq!(e.initial_max_pool.dims()[2], spatial[0], "{name}");
            for (g, t) in e.block_groups.iter().enumerate() {
                assert_eq!(
                    t.dims(),
                    &[
                        2,
                        config.stage_out_channels(g),
                        spatial[g + 1],
                        spatial[g + 1]
                    ],
                    "{name} g{g}"
                );
            }
            let d = config.feature_dim();
            assert_eq!(out.final_avg_pool.dims(), &[2, d], "{name}");
            assert_eq!(out.hiddens.len(), 4);
            assert_eq!(out.hiddens[1].dims(), &[2, d]);
            assert_eq!(out.hiddens[2].dims(), &[2, d]);
            assert_eq!(out.proj_head_output.dims(), &[2, 16]);
            assert_eq!(out.logits_sup.as_ref().unwrap().dims(), &[2, 10]);
            assert_eq!(max_abs_diff(&out.hiddens[0], &out.final_avg_pool), 0.0);
            assert_eq!(
                max_abs_diff(&out.supervised_input, &out.final_avg_pool),
                0.0
            );
        }
    }
    assert_eq!(tiny(18, false, true, 8).feature_dim(), 64);
    assert_eq!(tiny(50, false, false, 8).feature_dim(), 256);
}

#[test]
fn wrong_input_is_an_error_not_a_panic() {
    let (_vm, model) = build(&tiny(18, false, true, 4), 1);
    let x = Tensor::zeros((2, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(model.forward(&x, false).is_err());
    let x = Tensor::zeros((2, 3, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(model.forward(&x, false).is_err());
}

#[test]
fn every_block_starts_as_its_shortcut() {
    // Zero-initialised gamma on the last BN: residual(x) == 0, so block(x) == relu(shortcut(x)),
    // and blocks without projection are the identity on their (non-negative) input.
    for config in [
        tiny(18, false, true, 4),
        tiny(50, false, false, 4),
        tiny(50, true, false, 4),
    ] {
        let (_vm, model) = build(&config, 3);
        let x = pseudo_random(&[2, 3, 34, 34], 4, 0.0, 1.0);
        for train in [false, true] {
            let mut y = model.resnet().stem().forward(&x, train).unwrap();
            for group in model.resnet().groups() {
                for (b, block) in group.blocks().iter().enumerate() {
                    let r = block.residual(&y, train).unwrap();
                    assert_eq!(values(&r.abs().unwrap().max_all().unwrap())[0], 0.0);
                    let out = block.forward(&y, train).unwrap();
                    let sc = block.shortcut(&y, train).unwrap().relu().unwrap();
                    assert_eq!(max_abs_diff(&out, &sc), 0.0);
                    if b > 0 {
                        assert_eq!(max_abs_diff(&out, &y), 0.0);
                    }
                    y = out;
                }
            }
        }
    }
}

fn std_of(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn initial_values_follow_the_official_initialisers() {
    let config = tiny(50, true, false, 32);
    let (varmap, _model) = build(&config, 11);
    let vars = var_values(&varmap);
    let shapes: HashMap<String, Vec<usize>> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    let mut checked_conv = 0;
    for (name, v) in &vars {
        let shape = &shapes[name];
        let leaf = name.rsplit('.').next().unwrap();
        if name.starts_with("resnet.") && leaf == "weight" {
            // VarianceScaling(1.0, fan_in, truncated normal): std sqrt(1/fan_in) after
            // truncation at 2 sigma of the underlying normal.
            let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
            let target = (1.0 / fan_in).sqrt();
            let bound = 2.0 * target / TRUNCATED_NORMAL_STD;
            assert!(
                v.iter().all(|x| x.abs() <= bound * (1.0 + 1e-6)),
                "{name} exceeds 2 sigma"
            );
            if v.len() >= 20_000 {
                let (mean, std) = std_of(v);
                assert!(
                    (std / target - 1.0).abs() < 0.03,
                    "{name}: std {std} vs {target}"
                );
                assert!(mean.abs() < 0.03 * target, "{name}: mean {mean}");
                checked_conv += 1;
            }
        } else if leaf == "weight" {
            // Dense layers of both heads: N(0, 0.01).
            if v.len() >= 4_000 {
                let (mean, std) = std_of(v);
                assert!((std / 0.01 - 1.0).abs() < 0.05, "{name}: std {std}");
                assert!(mean.abs() < 1e-3, "{name}");
                // Not truncated: some values beyond 2 sigma.
                assert!(v.iter().any(|x| x.abs() > 0.02), "{name}");
            }
        } else {
            let expected = match leaf {
                "gamma" if name.ends_with("bn3.gamma") => 0.0,
                "gamma" => 1.0,
                "moving_variance" => 1.0,
                _ => 0.0, // beta, moving_mean, bias
            };
            assert!(
                v.iter().all(|&x| x == expected),
                "{name} should be {expected}"
            );
        }
    }
    assert!(checked_conv > 20, "{checked_conv}");
    // Each block's last BN (and only that one) starts at gamma 0.
    let zero: Vec<&String> = vars
        .keys()
        .filter(|n| n.ends_with(".gamma") && vars[*n][0] == 0.0)
        .collect();
    assert_eq!(zero.len(), 16);
    assert!(zero.iter().all(|n| n.ends_with("bn3.gamma")));
}

#[test]
fn initialisation_is_deterministic_in_the_seed() {
    let config = tiny(18, false, true, 4);
    let a = var_values(&build(&config, 5).0);
    let b = var_values(&build(&config, 5).0);
    let c = var_values(&build(&config, 6).0);
    assert_eq!(a, b);
    let name = "resnet.stem.conv0.weight";
    assert_ne!(a[name], c[name]);
}

#[test]
fn projection_head_layers_and_selector() {
    let mut config = tiny(18, false, true, 4);
    config.ft_proj_selector = 1;
    let (varmap, model) = build(&config, 2);
    let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    let has = |n: &str| names.iter().any(|x| x == n);
    assert!(has("projection_head.nl_0.bn.beta") && has("projection_head.nl_1.bn.beta"));
    assert!(!has("projection_head.nl_2.bn.beta") && has("projection_head.nl_2.bn.gamma"));
    assert!(!names
        .iter()
        .any(|n| n.starts_with("projection_head") && n.ends_with(".bias")));
    assert!(has("head_supervised.bias"));
    let x = pseudo_random(&[4, 3, 32, 32], 9, 0.0, 1.0);
    let out = model.forward(&x, true).unwrap();
    // Middle layers end with ReLU, the last has none.
    for h in &out.hiddens[1..3] {
        assert!(values(h).iter().all(|&v| v >= 0.0));
    }
    assert!(values(&out.proj_head_output).iter().any(|&v| v < 0.0));
    // Training-mode BN without beta and gamma 1: each output column has zero batch mean.
    let m = values(&out.proj_head_output.mean(0).unwrap());
    assert!(m.iter().all(|v| v.abs() < 1e-4), "{m:?}");
    assert_eq!(max_abs_diff(&out.supervised_input, &out.hiddens[1]), 0.0);
    assert_eq!(
        out.get("proj_head_1").unwrap().dims(),
        out.hiddens[1].dims()
    );

    // -1 selects the head output (proj_out_dim wide).
    config.ft_proj_selector = -1;
    let (varmap, model) = build(&config, 2);
    let w = varmap.data().lock().unwrap()["head_supervised.weight"]
        .dims()
        .to_vec();
    assert_eq!(w, vec![10, 16]);
    let out = model.forward(&x, false).unwrap();
    assert_eq!(
        max_abs_diff(&out.supervised_input, &out.proj_head_output),
        0.0
    );

    // linear and none modes.
    config.ft_proj_selector = 0;
    config.proj_head_mode = ProjHeadMode::Linear;
    let (varmap, model) = build(&config, 2);
    assert!(varmap
        .data()
        .lock()
        .unwrap()
        .contains_key("projection_head.l_0.dense.weight"));
    assert!(!varmap
        .data()
        .lock()
        .unwrap()
        .contains_key("projection_head.l_0.bn.beta"));
    assert_eq!(model.forward(&x, false).unwrap().hiddens.len(), 2);
    config.proj_head_mode = ProjHeadMode::None;
    let (_vm, model) = build(&config, 2);
    let out = model.forward(&x, false).unwrap();
    assert_eq!(out.hiddens.len(), 1);
    assert_eq!(
        max_abs_diff(&out.proj_head_output, &out.final_avg_pool),
        0.0
    );

    // No supervised head.
    config.num_classes = None;
    let (varmap, model) = build(&config, 2);
    assert!(!varmap
        .data()
        .lock()
        .unwrap()
        .keys()
        .any(|k| k.starts_with("head_supervised")));
    assert!(model.forward(&x, false).unwrap().logits_sup.is_none());
}

/// A scalar loss that depends on everything the model outputs.
fn loss(out: &simclr_models::ModelOutput) -> Tensor {
    let a = out.proj_head_output.sqr().unwrap().sum_all().unwrap();
    let b = out
        .logits_sup
        .as_ref()
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    (a + b).unwrap()
}

fn make_blocks_nontrivial(varmap: &VarMap) {
    // Zero gammas would stop the gradient inside the residual branches; set them to 1.
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.ends_with(".gamma") {
            var.set(&var.ones_like().unwrap()).unwrap();
        }
    }
}

#[test]
fn training_mode_backward_reaches_every_trainable_variable() {
    // R50 SK1 on an odd input exercises the strided convs, SAME max-pool and both ResNet-D
    // pools in the differentiable path.
    let config = tiny(50, true, false, 4);
    let (varmap, model) = build(&config, 8);
    make_blocks_nontrivial(&varmap);
    let x = pseudo_random(&[2, 3, 33, 33], 10, 0.0, 1.0);
    let out = model.forward(&x, true).unwrap();
    let grads = loss(&out).backward().unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let g = grads.get(var.as_tensor());
        if name.contains("moving_") {
            assert!(g.is_none(), "{name} must get no gradient");
        } else {
            let g = g.unwrap_or_else(|| panic!("{name} has no gradient"));
            assert_eq!(g.dims(), var.dims(), "{name}");
            let n = values(&g.abs().unwrap().max_all().unwrap())[0];
            assert!(n.is_finite(), "{name}");
        }
    }
    let stem = grads
        .get(varmap.data().lock().unwrap()["resnet.stem.conv0.weight"].as_tensor())
        .unwrap()
        .clone();
    assert!(values(&stem.abs().unwrap().max_all().unwrap())[0] > 0.0);
}

#[test]
fn fine_tune_after_block_freezes_the_early_parts() {
    let mut config = tiny(18, false, true, 4);
    config.fine_tune_after_block = 2;
    let (varmap, model) = build(&config, 12);
    make_blocks_nontrivial(&varmap);
    let x = pseudo_random(&[4, 3, 16, 16], 13, 0.0, 1.0);
    let before = var_values(&varmap);
    let eval_endpoints = model
        .forward_endpoints(&x, ForwardOptions::mode(false))
        .unwrap()
        .0;
    let (train_endpoints, out) = model
        .forward_endpoints(&x, ForwardOptions::mode(true))
        .unwrap();
    // The frozen part runs BN in inference mode even in a training pass.
    assert_eq!(
        max_abs_diff(
            &train_endpoints.block_groups[1],
            &eval_endpoints.block_groups[1]
        ),
        0.0
    );
    assert!(
        max_abs_diff(
            &train_endpoints.block_groups[2],
            &eval_endpoints.block_groups[2]
        ) > 1e-4
    );
    let grads = loss(&out).backward().unwrap();
    let after = var_values(&varmap);
    let frozen = |n: &str| {
        n.starts_with("resnet.stem.")
            || n.starts_with("resnet.block_group1.")
            || n.starts_with("resnet.block_group2.")
    };
    let mut n_frozen = 0;
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let g = grads.get(var.as_tensor());
        if frozen(name) {
            n_frozen += 1;
            assert!(g.is_none(), "{name} is frozen but got a gradient");
            assert_eq!(before[name], after[name], "{name} changed");
        } else if name.contains("moving_") {
            assert!(g.is_none(), "{name}");
            assert_ne!(before[name], after[name], "{name} should have been updated");
        } else {
            assert!(g.is_some(), "{name} is trainable but got no gradient");
        }
    }
    assert!(n_frozen > 30, "{n_frozen}");

    // -1: the stem is trained too.
    config.fine_tune_after_block = -1;
    let (varmap, model) = build(&config, 12);
    let grads = loss(&model.forward(&x, true).unwrap()).backward().unwrap();
    assert!(grads
        .get(varmap.data().lock().unwrap()["resnet.stem.conv0.weight"].as_tensor())
        .is_some());

    // 4: the whole encoder is frozen (linear evaluation).
    config.fine_tune_after_block = 4;
    let (varmap, model) = build(&config, 12);
    let grads = loss(&model.forward(&x, true).unwrap()).backward().unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.starts_with("resnet.") {
            assert!(grads.get(var.as_tensor()).is_none(), "{name}");
        }
    }
}

#[test]
fn online_probe_input_can_be_detached() {
    let config = tiny(18, false, true, 4);
    let (varmap, model) = build(&config, 14);
    let x = pseudo_random(&[4, 3, 16, 16], 15, 0.0, 1.0);
    let opts = ForwardOptions {
        train: true,
        stop_gradient_supervised_input: true,
        ..ForwardOptions::default()
    };
    let out = model.forward_with(&x, opts).unwrap();
    let l = out
        .logits_sup
        .as_ref()
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = l.backward().unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let g = grads.get(var.as_tensor());
        if name.starts_with("head_supervised") {
            assert!(g.is_some(), "{name}");
        } else {
            assert!(g.is_none(), "{name}");
        }
    }
}

#[test]
fn training_gradients_match_finite_differences() {
    // f64 model, training mode: backprop through BN batch statistics, SK attention, the
    // differentiable SAME max-pool and both ResNet-D pools vs central differences. The input
    // size keeps every map at least 3x3 (1x1 maps with BN over 4 samples are too badly
    // conditioned for finite differences); 34 gives even maps into the stride-2 ResNet-D
    // pools (17 -> 18 after padding is fine, 34 -> 17 -> 9 -> 5 -> 3 exercises odd ones).
    let config = tiny(50, true, false, 4);
    let varmap = VarMap::new();
    let dev = Device::Cpu;
    let vb = simclr_models::init::SeededInit::var_builder(&varmap, 21, DType::F64, &dev);
    let model = SimclrModel::new(&config, vb).unwrap();
    // Residual branches switched on but small, so the net stays well conditioned.
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.ends_with("bn3.gamma") {
            var.set(&(var.ones_like().unwrap() * 0.3).unwrap()).unwrap();
        }
    }
    let dims = [4usize, 3, 34, 34];
    let x0 = pseudo_random(&dims, 22, 0.0, 1.0)
        .to_dtype(DType::F64)
        .unwrap();
    let proj_w = pseudo_random(&[4, 16], 23, -1.0, 1.0)
        .to_dtype(DType::F64)
        .unwrap();
    let logit_w = pseudo_random(&[4, 10], 24, -1.0, 1.0)
        .to_dtype(DType::F64)
        .unwrap();
    let f = |x: &Tensor| -> Tensor {
        let out = model.forward(x, true).unwrap();
        let a = (&out.proj_head_output * &proj_w)
            .unwrap()
            .sum_all()
            .unwrap();
        let b = (out.logits_sup.as_ref().unwrap() * &logit_w)
            .unwrap()
            .sum_all()
            .unwrap();
        (a + b).unwrap()
    };
    let xv = candle_core::Var::from_tensor(&x0).unwrap();
    let grads = f(xv.as_tensor()).backward().unwrap();
    let gx = values(grads.get(xv.as_tensor()).unwrap());
    let base = values(&x0);
    let h = 1e-6;
    let eval = |v: Vec<f64>| values(&f(&Tensor::from_vec(v, &dims[..], &dev).unwrap()))[0];
    for idx in [0usize, 35, 600, 1157, 5000, 13000] {
        let mut p = base.clone();
        p[idx] += h;
        let mut m = base.clone();
        m[idx] -= h;
        let fd = (eval(p) - eval(m)) / (2.0 * h);
        assert!(
            (fd - gx[idx]).abs() <= 1e-5 * (1.0 + fd.abs()),
            "x[{idx}]: backprop {} vs fd {fd}",
            gx[idx]
        );
    }
    // A weight deep inside: the stage-1 SK mixing conv and the stage-3 ResNet-D shortcut.
    for name in [
        "resnet.block_group1.block0.sk.mix_expand.weight",
        "resnet.block_group3.block0.shortcut_conv.weight",
    ] {
        let var = varmap.data().lock().unwrap()[name].clone();
        let g = values(grads.get(var.as_tensor()).unwrap());
        let w0 = var.as_tensor().copy().unwrap();
        let wv = values(&w0);
        for idx in [0usize, 5] {
            let set = |delta: f64| {
                let mut v = wv.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &dev).unwrap())
                    .unwrap();
                values(&f(&x0))[0]
            };
            let fd = (set(h) - set(-h)) / (2.0 * h);
            var.set(&w0).unwrap();
            assert!(
                (fd - g[idx]).abs() <= 1e-5 * (1.0 + fd.abs()),
                "{name}[{idx}]: backprop {} vs fd {fd}",
                g[idx]
            );
        }
    }
}

#[test]
fn inference_passes_build_no_graph_unless_asked() {
    let config = tiny(50, true, false, 4);
    let (varmap, model) = build(&config, 16);
    make_blocks_nontrivial(&varmap);
    let x = pseudo_random(&[2, 3, 24, 24], 17, 0.0, 1.0);
    let plain = model.forward(&x, false).unwrap();
    let opts = ForwardOptions {
        keep_graph: true,
        ..ForwardOptions::default()
    };
    let kept = model.forward_with(&x, opts).unwrap();
    assert_eq!(
        max_abs_diff(&plain.proj_head_output, &kept.proj_head_output),
        0.0
    );
    assert_eq!(
        max_abs_diff(
            plain.logits_sup.as_ref().unwrap(),
            kept.logits_sup.as_ref().unwrap()
        ),
        0.0
    );
    let conv = varmap.data().lock().unwrap()["resnet.stem.conv0.weight"].clone();
    let g = loss(&plain).backward().unwrap();
    assert!(g.get(conv.as_tensor()).is_none());
    // The heads still get gradients (they sit after the encoder).
    assert!(g
        .get(varmap.data().lock().unwrap()["head_supervised.weight"].as_tensor())
        .is_some());
    let g = loss(&kept).backward().unwrap();
    assert!(g.get(conv.as_tensor()).is_some());
}

#[test]
fn bf16_products_stay_close_to_f32_and_train_f32_master_weights() {
    // Mixed precision on the CPU: the same weights, f32 vs bf16 products (BN statistics in f32).
    // BN over a handful of samples amplifies rounding; 32 samples keep the check meaningful.
    let config = tiny(18, false, true, 8);
    let (varmap, model) = build(&config, 31);
    let x = pseudo_random(&[32, 3, 16, 16], 32, 0.0, 1.0);
    let full = model.forward(&x, true).unwrap();
    let half = model
        .clone()
        .with_precision(simclr_models::Precision::Bf16)
        .forward(&x, true)
        .unwrap();
    // The GPU's numerics (bf16 activations, every product's result rounded) on the CPU.
    let gpu_like = model
        .clone()
        .with_precision(simclr_models::Precision::Bf16)
        .with_gpu_bf16_numerics()
        .forward(&x, true)
        .unwrap();
    let differ = (&half.proj_head_output - &gpu_like.proj_head_output)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(differ > 0.0, "the CPU's bf16 should keep f32 activations");
    // Rounding accumulates with depth: the encoder's output within 2%, the projection (three
    // more dense + BN layers) within 5% (measured 1.1% and 3.0% with bf16 activations).
    for (name, a, b, tol) in [
        (
            "final_avg_pool",
            &full.final_avg_pool,
            &half.final_avg_pool,
            2e-2,
        ),
        (
            "proj_head_output",
            &full.proj_head_output,
            &half.proj_head_output,
            5e-2,
        ),
        (
            "final_avg_pool (GPU numerics)",
            &full.final_avg_pool,
            &gpu_like.final_avg_pool,
            2e-2,
        ),
        (
            "proj_head_output (GPU numerics)",
            &full.proj_head_output,
            &gpu_like.proj_head_output,
            5e-2,
        ),
    ] {
        assert_eq!(b.dtype(), DType::F32, "{name} comes back in f32");
        // Relative L2 error: bf16 keeps 8 bits of mantissa (0.4% per rounding).
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        let err = norm(&(a - b).unwrap()) / norm(a);
        eprintln!("bf16 vs f32, {name}: relative L2 error {err}");
        assert!(err <= tol, "{name}: relative L2 error {err}");
        assert!(err > 0.0, "{name}: bf16 should differ from f32 somewhere");
    }
    let loss = half.proj_head_output.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.ends_with("moving_mean") || name.ends_with("moving_variance") {
            continue;
        }
        if name.starts_with("head_supervised") {
            continue;
        }
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(
            g.dtype(),
            DType::F32,
            "{name}: master-weight gradient dtype"
        );
    }
}
