//! Optimizer state through a safetensors file: saving after k steps, loading into fresh
//! variables and a fresh optimizer, and continuing gives bit-identical weights and state to an
//! uninterrupted run (CPU).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use simclr_train::optim::{
    build_optimizer, named_vars, NamedVar, Optimizer, OptimizerKind, OptimizerSettings,
};
use simclr_train::schedule::WarmupCosine;
use simclr_train::{ParamGroup, TrainError};

const SHAPES: [(&str, &[usize]); 6] = [
    ("resnet.conv2d.weight", &[4, 3, 3, 3]),
    ("resnet.batch_norm.gamma", &[4]),
    ("resnet.batch_norm.beta", &[4]),
    ("resnet.batch_norm.moving_mean", &[4]),
    ("head_supervised.weight", &[10, 4]),
    ("head_supervised.bias", &[10]),
];

fn init_vars() -> Vec<NamedVar> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let t = Tensor::arange(0u32, n as u32, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .affine(0.37, i as f64)
                .unwrap()
                .sin()
                .unwrap()
                .reshape(*shape)
                .unwrap();
            NamedVar::new(*name, Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// A loss whose gradient depends on the weights and the step: Σ c·(w − target(step))².
fn grads_at(vars: &[NamedVar], step: u64) -> candle_core::backprop::GradStore {
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (i, v) in vars.iter().enumerate() {
        if !v.group.is_trainable() {
            continue;
        }
        let n = v.var.elem_count() as u32;
        let target = Tensor::arange(0u32, n, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(0.11 * (step + 1) as f64, 0.3 * i as f64)
            .unwrap()
            .cos()
            .unwrap()
            .reshape(v.var.shape())
            .unwrap();
        let term = (v.var.as_tensor() - target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .affine(0.5 + i as f64 * 0.25, 0.0)
            .unwrap();
        loss = (loss + term).unwrap();
    }
    loss.backward().unwrap()
}

fn settings(kind: OptimizerKind) -> OptimizerSettings {
    OptimizerSettings {
        optimizer: kind,
        weight_decay: 1e-3,
        ..OptimizerSettings::default()
    }
}

fn run(opt: &mut dyn Optimizer, vars: &[NamedVar], steps: std::ops::Range<u64>) {
    let schedule = WarmupCosine::new(0.8, 2, 6);
    for step in steps {
        let grads = grads_at(vars, step);
        opt.step(&grads, schedule.lr(step)).unwrap();
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn resume_is_bit_identical(kind: OptimizerKind) {
    // Uninterrupted: 6 steps.
    let vars_a = init_vars();
    let mut opt_a = build_optimizer(vars_a.clone(), &settings(kind)).unwrap();
    run(opt_a.as_mut(), &vars_a, 0..6);

    // Interrupted after 3 steps, through a file.
    let vars_b = init_vars();
    let mut opt_b = build_optimizer(vars_b.clone(), &settings(kind)).unwrap();
    run(opt_b.as_mut(), &vars_b, 0..3);
    let mut file: HashMap<String, Tensor> = opt_b.state_tensors().into_iter().collect();
    for v in &vars_b {
        file.insert(
            format!("model/{}", v.name),
            v.var.as_tensor().copy().unwrap(),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    candle_core::safetensors::save(&file, &path).unwrap();
    drop((opt_b, vars_b));

    let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let vars_c: Vec<NamedVar> = SHAPES
        .iter()
        .map(|(name, _)| {
            let t = &loaded[&format!("model/{name}")];
            NamedVar::new(*name, Var::from_tensor(t).unwrap())
        })
        .collect();
    let mut opt_c = build_optimizer(vars_c.clone(), &settings(kind)).unwrap();
    opt_c.load_state_tensors(&loaded).unwrap();
    run(opt_c.as_mut(), &vars_c, 3..6);

    for (a, c) in vars_a.iter().zip(&vars_c) {
        assert_eq!(a.name, c.name);
        assert_eq!(
            bits(a.var.as_tensor()),
            bits(c.var.as_tensor()),
            "{kind:?}: {} differs after resume",
            a.name
        );
    }
    let (sa, sc) = (opt_a.state_tensors(), opt_c.state_tensors());
    assert_eq!(sa.len(), sc.len());
    for ((ka, ta), (kc, tc)) in sa.iter().zip(&sc) {
        assert_eq!(ka, kc);
        assert_eq!(
            bits(ta),
            bits(tc),
            "{kind:?}: state {ka} differs after resume"
        );
    }
    // The run moved the weights at all.
    let start = init_vars();
    assert_ne!(
        bits(start[0].var.as_tensor()),
        bits(vars_c[0].var.as_tensor())
    );
}

#[test]
fn lars_resume_is_bit_identical() {
    resume_is_bit_identical(OptimizerKind::Lars);
}

#[test]
fn momentum_resume_is_bit_identical() {
    resume_is_bit_identical(OptimizerKind::Momentum);
}

#[test]
fn adamw_resume_is_bit_identical() {
    resume_is_bit_identical(OptimizerKind::AdamW);
}

#[test]
fn state_keys_cover_trainable_variables_only() {
    let vars = init_vars();
    let lars = build_optimizer(vars.clone(), &settings(OptimizerKind::Lars)).unwrap();
    let keys: Vec<String> = lars.state_tensors().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), 5);
    assert!(keys.iter().all(|k| !k.contains("moving_mean")));
    assert!(keys.contains(&"lars/momentum/resnet.conv2d.weight".to_string()));
    let adam = build_optimizer(vars, &settings(OptimizerKind::AdamW)).unwrap();
    assert_eq!(adam.state_tensors().len(), 15);
}

#[test]
fn loading_incomplete_or_misshapen_state_fails() {
    let vars = init_vars();
    let mut lars = build_optimizer(vars.clone(), &settings(OptimizerKind::Lars)).unwrap();
    let mut map: HashMap<String, Tensor> = lars.state_tensors().into_iter().collect();

    // Another optimizer's state does not fit.
    let mut sgd = build_optimizer(vars, &settings(OptimizerKind::Momentum)).unwrap();
    assert!(matches!(
        sgd.load_state_tensors(&map),
        Err(TrainError::MissingState { .. })
    ));

    let key = "lars/momentum/head_supervised.bias".to_string();
    map.insert(
        key.clone(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    match lars.load_state_tensors(&map) {
        Err(TrainError::StateShape {
            key: k,
            expected,
            found,
        }) => {
            assert_eq!(k, key);
            assert_eq!(expected, vec![10]);
            assert_eq!(found, vec![3]);
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    map.remove(&key);
    assert!(matches!(
        lars.load_state_tensors(&map),
        Err(TrainError::MissingState { key: k }) if k == key
    ));
}

#[test]
fn optimizers_reject_bad_input() {
    let f64_var = Var::zeros(3, DType::F64, &Device::Cpu).unwrap();
    let err = build_optimizer(
        vec![NamedVar::new("resnet.conv2d.weight", f64_var)],
        &settings(OptimizerKind::Lars),
    );
    assert!(matches!(err, Err(TrainError::UnsupportedDType { .. })));

    let v = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let err = build_optimizer(
        vec![
            NamedVar::new("resnet.conv2d.weight", v.clone()),
            NamedVar::new("resnet.conv2d.weight", v),
        ],
        &settings(OptimizerKind::Momentum),
    );
    assert!(matches!(err, Err(TrainError::DuplicateVar(_))));

    let bad = OptimizerSettings {
        momentum: 1.5,
        ..OptimizerSettings::default()
    };
    assert!(matches!(
        build_optimizer(vec![], &bad),
        Err(TrainError::InvalidConfig(_))
    ));
}

#[test]
fn varmap_variables_are_tagged_and_sorted() {
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    for (name, shape) in SHAPES {
        vb.get_with_hints(shape, name, candle_nn::Init::Const(0.5))
            .unwrap();
    }
    let vars = named_vars(&varmap);
    let names: Vec<&str> = vars.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "head_supervised.bias",
            "head_supervised.weight",
            "resnet.batch_norm.beta",
            "resnet.batch_norm.gamma",
            "resnet.conv2d.weight",
        ]
    );
    let groups: Vec<ParamGroup> = vars.iter().map(|v| v.group).collect();
    assert_eq!(
        groups,
        [
            ParamGroup::Bias,
            ParamGroup::SupervisedHead,
            ParamGroup::BatchNorm,
            ParamGroup::BatchNorm,
            ParamGroup::Adapted,
        ]
    );
}

#[test]
fn optimizer_names_for_flags_and_files() {
    assert_eq!(
        "adamw".parse::<OptimizerKind>().unwrap(),
        OptimizerKind::AdamW
    );
    assert_eq!(
        "momentum".parse::<OptimizerKind>().unwrap(),
        OptimizerKind::Momentum
    );
    assert_eq!(
        serde_json::to_string(&OptimizerKind::Lars).unwrap(),
        "\"lars\""
    );
    assert_eq!(
        serde_json::from_str::<OptimizerKind>("\"adamw\"").unwrap(),
        OptimizerKind::AdamW
    );
    let d = OptimizerSettings::default();
    assert_eq!(d.optimizer, OptimizerKind::Lars);
    assert_eq!((d.momentum, d.weight_decay, d.eeta), (0.9, 1e-6, 0.001));
}
