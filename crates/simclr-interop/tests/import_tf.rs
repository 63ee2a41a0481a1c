//! Import of the official TF1 checkpoints (tensor bundles): parity of the fixture bundle's
//! online and `ema_model/` copies with the independent reference outputs in tests/fixtures
//! (see its README), the reader itself, and the errors for bad bundles.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{fixture, rel_err};
use simclr_interop::tf_bundle::{write_bundle, RawTensor, TfDtype};
use simclr_interop::{
    import_pth, import_tf1, import_tf1_named, ImportedModel, InteropError, SourceFormat,
    SourceName, TfBundle, TfBundleError,
};
use simclr_models::{ForwardOptions, StemKind};

const OUTPUTS: [(&str, &str); 5] = [
    ("final_avg_pool", "final_avg_pool"),
    ("proj_head_hidden_1", "proj_head_1"),
    ("proj_head_hidden_2", "proj_head_2"),
    ("proj_head_output", "proj_head_output"),
    ("logits_sup", "logits_sup"),
];

const BUNDLE_DIR: &str = "r18_1x_sk0_tf1";
const PREFIX: &str = "model.ckpt-1234";

fn index_path() -> PathBuf {
    fixture(BUNDLE_DIR).join(format!("{PREFIX}.index"))
}

fn data_path() -> PathBuf {
    fixture(BUNDLE_DIR).join(format!("{PREFIX}.data-00000-of-00001"))
}

fn input() -> Tensor {
    let io =
        candle_core::safetensors::load(fixture("r18_1x_sk0_io.safetensors"), &Device::Cpu).unwrap();
    io["input"].clone()
}

/// Runs the model on the fixture input and compares the five head and pool outputs with
/// `io_file` (and the intermediate taps when the file has them).
fn check_outputs(m: &ImportedModel, io_file: &str, label: &str) {
    let io = candle_core::safetensors::load(fixture(io_file), &Device::Cpu).unwrap();
    let x = &io["input"];
    let (endpoints, out) = m
        .model
        .forward_endpoints(x, ForwardOptions::mode(false))
        .unwrap();
    let mut taps = vec![
        ("initial_conv", endpoints.initial_conv.clone()),
        ("initial_max_pool", endpoints.initial_max_pool.clone()),
    ];
    for (i, t) in endpoints.block_groups.iter().enumerate() {
        let key = [
            "block_group1",
            "block_group2",
            "block_group3",
            "block_group4",
        ][i];
        taps.push((key, t.clone()));
    }
    for (key, t) in &taps {
        if let Some(r) = io.get(*key) {
            let e = rel_err(t, r);
            assert!(e < 1e-4, "{label} {key}: rel err {e:e}");
        }
    }
    for (key, ours) in OUTPUTS {
        let t = out.get(ours).unwrap_or_else(|| panic!("output {ours}"));
        let e = rel_err(t, &io[key]);
        eprintln!("{label} {key}: rel err {e:.2e}");
        assert!(e < 1e-4, "{label} {key}: rel err {e:e}");
    }
}

fn check_r18_config(m: &ImportedModel) {
    let c = &m.config;
    assert_eq!(c.resnet_depth, 18);
    assert_eq!(c.stem_kind(), StemKind::Cifar);
    assert_eq!((c.width_multiplier, c.base_width), (1, 4));
    assert!(!c.sk_enabled());
    assert_eq!(c.num_classes, Some(10));
    assert_eq!((c.num_proj_layers, c.proj_out_dim), (3, 16));
    assert_eq!(m.format, SourceFormat::Tf1Bundle);
    assert_eq!(m.global_step, Some(1234));
}

#[test]
fn online_weights_match_reference_outputs() {
    let m = import_tf1(index_path(), false, &Device::Cpu).expect("import");
    check_r18_config(&m);
    assert_eq!(m.source.to_name(), "r18_1x_sk0");
    check_outputs(&m, "r18_1x_sk0_io.safetensors", "online");
}

#[test]
fn ema_copy_matches_reference_outputs() {
    let m = import_tf1(index_path(), true, &Device::Cpu).expect("import");
    check_r18_config(&m);
    assert_eq!(m.source.to_name(), "r18_1x_sk0_ema");
    check_outputs(&m, "r18_1x_sk0_ema_io.safetensors", "ema");
    // The EMA copy differs from the online weights.
    let online = import_tf1(index_path(), false, &Device::Cpu).unwrap();
    let x = input();
    let a = online.model.forward(&x, false).unwrap();
    let b = m.model.forward(&x, false).unwrap();
    assert!(rel_err(&a.final_avg_pool, &b.final_avg_pool) > 1e-2);
}

#[test]
fn online_weights_equal_the_converter_file_exactly() {
    let tf = import_tf1(index_path(), false, &Device::Cpu).unwrap();
    let pth = import_pth(fixture("r18_1x_sk0.pth"), &Device::Cpu).unwrap();
    assert_eq!(tf.config, pth.config);
    let a = tf.varmap.data().lock().unwrap();
    let b = pth.varmap.data().lock().unwrap();
    let names = |m: &std::collections::HashMap<String, candle_core::Var>| {
        let mut v: Vec<String> = m.keys().cloned().collect();
        v.sort();
        v
    };
    assert_eq!(names(&a), names(&b), "variable names");
    for (name, va) in a.iter() {
        let vb = &b[name];
        assert_eq!(va.dims(), vb.dims(), "{name}");
        let bits = |v: &candle_core::Var| v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(va), bits(vb), "{name}");
    }
}

#[test]
fn every_path_form_opens_the_same_bundle() {
    let dir = fixture(BUNDLE_DIR);
    let forms = [
        dir.clone(),
        dir.join(PREFIX),
        index_path(),
        data_path(),
        dir.join(format!("{PREFIX}.meta")),
    ];
    for p in forms {
        let b = TfBundle::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(b.index_path(), index_path().as_path(), "{}", p.display());
    }
}

#[test]
fn reader_sees_the_whole_bundle() {
    let b = TfBundle::open(index_path()).unwrap();
    assert_eq!(b.header().num_shards, 1);
    assert!(!b.header().big_endian);
    let e = b.entries();
    assert_eq!(e.len(), 254);
    assert_eq!(e.keys().filter(|k| k.ends_with("/Momentum")).count(), 13);
    // 21 convs + 4 x 21 BN leaves + 3 head kernels + 4 + 4 + 3 head BN leaves (there is no
    // `ema_model/head_supervised`).
    assert_eq!(
        e.keys().filter(|k| k.starts_with("ema_model/")).count(),
        119
    );
    let k = &e["base_model/conv2d_20/kernel"];
    assert_eq!(k.dtype, TfDtype::FLOAT);
    assert_eq!(k.shape, vec![3, 3, 32, 32]);
    assert_eq!(b.read_i64("global_step").unwrap(), (vec![1234], vec![]));
    // Every tensor reads back with a valid checksum.
    for name in e.keys() {
        b.read_raw(name)
            .unwrap_or_else(|err| panic!("{name}: {err}"));
    }
}

/// Copies the fixture bundle into `dir/folder/`, letting `edit` change its tensors first.
fn rewrite(
    dir: &Path,
    folder: &str,
    edit: impl FnOnce(&mut BTreeMap<String, RawTensor>),
) -> PathBuf {
    let b = TfBundle::open(index_path()).unwrap();
    let mut tensors: BTreeMap<String, RawTensor> = b
        .entries()
        .keys()
        .map(|k| (k.clone(), b.read_raw(k).unwrap()))
        .collect();
    edit(&mut tensors);
    let out = dir.join(folder);
    std::fs::create_dir_all(&out).unwrap();
    let prefix = out.join(PREFIX);
    write_bundle(&prefix, &tensors).unwrap();
    prefix
}

#[test]
fn rewritten_bundle_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = rewrite(dir.path(), "r18_1x_sk0", |_| {});
    let a = TfBundle::open(index_path()).unwrap();
    let b = TfBundle::open(&prefix).unwrap();
    assert_eq!(
        a.entries().keys().collect::<Vec<_>>(),
        b.entries().keys().collect::<Vec<_>>()
    );
    for name in a.entries().keys() {
        assert_eq!(
            a.read_raw(name).unwrap(),
            b.read_raw(name).unwrap(),
            "{name}"
        );
    }
    let m = import_tf1(&prefix, true, &Device::Cpu).unwrap();
    check_outputs(&m, "r18_1x_sk0_ema_io.safetensors", "rewritten ema");
}

#[test]
fn truncated_index_is_a_clear_error() {
    let bytes = std::fs::read(index_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        data_path(),
        dir.path().join(data_path().file_name().unwrap()),
    )
    .unwrap();
    let idx = dir.path().join(format!("{PREFIX}.index"));
    for keep in [0usize, 10, 47, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&idx, &bytes[..keep]).unwrap();
        let err = import_tf1(&idx, false, &Device::Cpu)
            .err()
            .expect("must fail");
        assert!(
            matches!(
                err,
                InteropError::Bundle(TfBundleError::Truncated { .. })
                    | InteropError::Bundle(TfBundleError::BadMagic { .. })
            ),
            "keep {keep}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("model.ckpt-1234.index"), "{msg}");
        assert!(msg.contains("truncated"), "{msg}");
    }
    // A bad magic number on an otherwise complete file.
    let mut bad = bytes.clone();
    *bad.last_mut().unwrap() ^= 0xff;
    std::fs::write(&idx, &bad).unwrap();
    let err = import_tf1(&idx, false, &Device::Cpu).err().unwrap();
    assert!(
        matches!(err, InteropError::Bundle(TfBundleError::BadMagic { .. })),
        "{err}"
    );
    // A corrupted block fails its checksum.
    let mut bad = bytes.clone();
    bad[20] ^= 0x01;
    std::fs::write(&idx, &bad).unwrap();
    let err = import_tf1(&idx, false, &Device::Cpu).err().unwrap();
    assert!(
        matches!(err, InteropError::Bundle(TfBundleError::Corrupt { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn truncated_data_is_a_clear_error() {
    let bytes = std::fs::read(data_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let idx = dir.path().join(format!("{PREFIX}.index"));
    std::fs::copy(index_path(), &idx).unwrap();
    let data = dir.path().join(data_path().file_name().unwrap());
    for keep in [0usize, 1000, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&data, &bytes[..keep]).unwrap();
        // Both copies live in the one shard: the online import fails as well as the EMA one.
        for ema in [false, true] {
            let err = import_tf1(&idx, ema, &Device::Cpu)
                .err()
                .expect("must fail");
            match &err {
                InteropError::Bundle(TfBundleError::Truncated { path, what }) => {
                    assert_eq!(path, &data, "keep {keep}");
                    assert!(what.contains("tensor `"), "{what}");
                }
                other => panic!("keep {keep}: expected Truncated, got {other}"),
            }
            assert!(err.to_string().contains(".data-00000-of-00001"), "{err}");
        }
    }
    std::fs::remove_file(&data).unwrap();
    let err = import_tf1(&idx, false, &Device::Cpu).err().unwrap();
    assert!(
        matches!(err, InteropError::Bundle(TfBundleError::Io { .. })),
        "{err}"
    );
}

#[test]
fn corrupted_data_fails_the_checksum() {
    let b = TfBundle::open(index_path()).unwrap();
    let e = &b.entries()["base_model/conv2d_5/kernel"];
    let mut bytes = std::fs::read(data_path()).unwrap();
    bytes[e.offset as usize + 3] ^= 0x10;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(index_path(), dir.path().join(format!("{PREFIX}.index"))).unwrap();
    std::fs::write(dir.path().join(data_path().file_name().unwrap()), &bytes).unwrap();
    let err = import_tf1(dir.path().join(PREFIX), false, &Device::Cpu)
        .err()
        .unwrap();
    match err {
        InteropError::Bundle(TfBundleError::Checksum { name, .. }) => {
            assert_eq!(name, "base_model/conv2d_5/kernel")
        }
        other => panic!("expected a checksum error, got {other}"),
    }
}

fn expect_missing(prefix: &Path, ema: bool, name: &str) {
    match import_tf1(prefix, ema, &Device::Cpu) {
        Err(InteropError::MissingTensor { name: n, path }) => {
            assert_eq!(n, name);
            assert!(
                path.ends_with(format!("{PREFIX}.index")),
                "{}",
                path.display()
            );
        }
        Err(other) => panic!("{name}: expected MissingTensor, got {other}"),
        Ok(_) => panic!("{name}: import succeeded"),
    }
}

#[test]
fn a_missing_variable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, bool); 8] = [
        ("base_model/conv2d/kernel", false),
        ("base_model/conv2d_7/kernel", false),
        ("base_model/conv2d_20/kernel", false),
        ("base_model/batch_normalization_3/moving_variance", false),
        ("head_contrastive/nl_1/batch_normalization/beta", false),
        ("head_contrastive/nl_2/batch_normalization/gamma", false),
        ("head_supervised/linear_layer/dense/bias", false),
        ("ema_model/base_model/conv2d_11/kernel", true),
    ];
    for (i, (name, ema)) in cases.into_iter().enumerate() {
        let prefix = rewrite(dir.path(), &format!("r18_1x_sk0_case{i}"), |t| {
            assert!(t.remove(name).is_some(), "{name}");
        });
        expect_missing(&prefix, ema, name);
    }
    // Removing the online copy of a variable does not affect the EMA import, and vice versa.
    let prefix = rewrite(dir.path(), "r18_1x_sk0_online_gap", |t| {
        t.remove("base_model/conv2d_7/kernel");
    });
    assert!(import_tf1(&prefix, true, &Device::Cpu).is_ok());
}

#[test]
fn ema_on_a_bundle_without_ema_copy_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = rewrite(dir.path(), "r18_1x_sk0", |t| {
        t.retain(|k, _| !k.starts_with("ema_model/"));
    });
    let err = import_tf1(&prefix, true, &Device::Cpu)
        .err()
        .expect("must fail");
    assert!(matches!(err, InteropError::NoEmaCopy { .. }), "{err}");
    assert!(err.to_string().contains("ema_model/"), "{err}");
    // The online weights still import.
    let m = import_tf1(&prefix, false, &Device::Cpu).unwrap();
    check_outputs(&m, "r18_1x_sk0_io.safetensors", "online without ema");
}

#[test]
fn shape_contradiction_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = rewrite(dir.path(), "r18_1x_sk0", |t| {
        t.insert(
            "base_model/batch_normalization_5/gamma".into(),
            RawTensor::from_f32(vec![5], &[1.0; 5]),
        );
    });
    match import_tf1(&prefix, false, &Device::Cpu) {
        Err(InteropError::ShapeMismatch {
            name,
            expected,
            found,
            ..
        }) => {
            assert_eq!(name, "base_model/batch_normalization_5/gamma");
            assert_eq!((expected, found), (vec![4], vec![5]));
        }
        Err(other) => panic!("expected ShapeMismatch, got {other}"),
        Ok(_) => panic!("import succeeded"),
    }
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = rewrite(dir.path(), "r18_1x_sk0", |t| {
        let k = t.get_mut("head_contrastive/nl_0/dense/kernel").unwrap();
        k.dtype = TfDtype::INT32;
    });
    match import_tf1(&prefix, false, &Device::Cpu) {
        Err(InteropError::Bundle(TfBundleError::UnsupportedDtype { name, dtype, .. })) => {
            assert_eq!(name, "head_contrastive/nl_0/dense/kernel");
            assert_eq!(dtype, TfDtype::INT32);
        }
        Err(other) => panic!("expected UnsupportedDtype, got {other}"),
        Ok(_) => panic!("import succeeded"),
    }
}

#[test]
fn an_unknown_variable_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = rewrite(dir.path(), "r18_1x_sk0", |t| {
        t.insert(
            "base_model/dense/kernel".into(),
            RawTensor::from_f32(vec![1, 1], &[0.0]),
        );
    });
    match import_tf1(&prefix, false, &Device::Cpu) {
        Err(InteropError::UnexpectedTensor { name, .. }) => {
            assert_eq!(name, "base_model/dense/kernel")
        }
        Err(other) => panic!("expected UnexpectedTensor, got {other}"),
        Ok(_) => panic!("import succeeded"),
    }
}

#[test]
fn folder_name_must_agree_with_the_shapes() {
    let dir = tempfile::tempdir().unwrap();
    for (folder, what) in [
        ("r50_1x_sk0", "depth"),
        ("r34_1x_sk0_pretrained", "depth"),
        ("r18_1x_sk1", "selective kernels"),
        ("r18_3x_sk0", "width"),
    ] {
        let prefix = rewrite(dir.path(), folder, |_| {});
        match import_tf1(&prefix, false, &Device::Cpu) {
            Err(InteropError::Contradiction { what: w, .. }) => assert_eq!(w, what, "{folder}"),
            Err(other) => panic!("{folder}: expected a contradiction, got {other}"),
            Ok(_) => panic!("{folder}: expected a contradiction"),
        }
    }
    // `2x` reads the 4-channel stem as base width 2.
    let prefix = rewrite(dir.path(), "r18_2x_sk0", |_| {});
    let m = import_tf1(&prefix, false, &Device::Cpu).unwrap();
    assert_eq!((m.config.width_multiplier, m.config.base_width), (2, 2));
    // A folder without the pattern: everything comes from the shapes.
    let prefix = rewrite(dir.path(), "downloaded", |_| {});
    let m = import_tf1(&prefix, false, &Device::Cpu).unwrap();
    check_r18_config(&m);
    assert_eq!(m.source.to_name(), "r18_1x_sk0");
    // An explicit name overrides the folder.
    let name = SourceName::parse("r18_1x_sk0_ema").unwrap();
    let m = import_tf1_named(&prefix, &name, &Device::Cpu).unwrap();
    assert!(m.source.ema);
    check_outputs(&m, "r18_1x_sk0_ema_io.safetensors", "named ema");
    let name = SourceName::parse("r50_1x_sk0").unwrap();
    assert!(matches!(
        import_tf1_named(&prefix, &name, &Device::Cpu),
        Err(InteropError::Contradiction { .. })
    ));
}

#[test]
fn imported_bundle_round_trips_through_a_checkpoint() {
    let dev = Device::Cpu;
    let imported = import_tf1(fixture(BUNDLE_DIR), true, &dev).unwrap();
    let meta = imported.checkpoint_meta();
    assert_eq!(meta.extra["source_format"], "tf1-tensor-bundle");
    assert_eq!(meta.extra["source_global_step"], "1234");
    assert_eq!(meta.extra["source_ema"], "true");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r18_1x_sk0_ema.safetensors");
    simclr_models::checkpoint::save(&p, &imported.varmap, &meta).unwrap();
    let ck = simclr_models::checkpoint::load(&p, &dev).unwrap();
    let io =
        candle_core::safetensors::load(fixture("r18_1x_sk0_ema_io.safetensors"), &dev).unwrap();
    let out = ck.model.forward(&io["input"], false).unwrap();
    for (key, ours) in OUTPUTS {
        let e = rel_err(out.get(ours).unwrap(), &io[key]);
        assert!(e < 1e-4, "{key}: {e:e}");
    }
}
