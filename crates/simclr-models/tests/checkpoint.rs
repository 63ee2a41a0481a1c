//! Self-describing checkpoints: round trip, atomic write, and typed errors for bad files.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use common::{max_abs_diff, pseudo_random};
use simclr_models::checkpoint::{self, CheckpointError, CheckpointMeta, FORMAT};
use simclr_models::{ModelConfig, SimclrModel};

fn tiny(base_width: usize) -> ModelConfig {
    ModelConfig {
        resnet_depth: 18,
        cifar_stem: true,
        base_width,
        num_classes: Some(10),
        proj_out_dim: 8,
        ..ModelConfig::default()
    }
}

fn trained_model(config: &ModelConfig) -> (VarMap, SimclrModel) {
    let varmap = VarMap::new();
    let model = SimclrModel::init(config, &varmap, 3, &Device::Cpu).unwrap();
    // Move the BN statistics and the zero gammas away from their initial values so that the
    // round trip is tested on non-trivial state.
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.ends_with(".gamma") {
            var.set(&(var.ones_like().unwrap() * 0.7).unwrap()).unwrap();
        }
    }
    model
        .forward(&pseudo_random(&[4, 3, 16, 16], 1, 0.0, 1.0), true)
        .unwrap();
    (varmap, model)
}

/// Writes a safetensors file directly (bypassing `save`'s checks).
fn write_raw(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) {
    let mut v: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::serialize_to_file(v, metadata, path).unwrap();
}

fn tensors_of(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect()
}

fn metadata_for(config: &ModelConfig) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("config".to_string(), serde_json::to_string(config).unwrap()),
        ("stage".to_string(), "pretrain".to_string()),
        ("step".to_string(), "7".to_string()),
        ("producer".to_string(), "test".to_string()),
    ])
}

fn saved(dir: &Path) -> (PathBuf, ModelConfig, VarMap) {
    let config = tiny(4);
    let (varmap, _) = trained_model(&config);
    let path = dir.join("model.safetensors");
    checkpoint::save(
        &path,
        &varmap,
        &CheckpointMeta::new(config.clone(), "pretrain", 100),
    )
    .unwrap();
    (path, config, varmap)
}

#[test]
fn round_trip_gives_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let config = ModelConfig {
        sk_ratio: 0.0625,
        resnet_depth: 50,
        cifar_stem: false,
        ft_proj_selector: 1,
        ..tiny(4)
    };
    let (varmap, model) = trained_model(&config);
    let meta = CheckpointMeta::new(config.clone(), "finetune", 12_345)
        .with_extra("dataset", "cifar10")
        .with_extra("note", "round trip");
    let path = dir.path().join("ck.safetensors");
    checkpoint::save(&path, &varmap, &meta).unwrap();
    // Nothing but the checkpoint is left in the directory (the temporary file was renamed).
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ck.safetensors"]);

    let loaded = checkpoint::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.meta, meta);
    assert_eq!(
        loaded.meta.producer,
        format!("simclr-models {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(checkpoint::read_meta(&path).unwrap(), meta);
    let x = pseudo_random(&[2, 3, 20, 20], 2, 0.0, 1.0);
    let a = model.forward(&x, false).unwrap();
    let b = loaded.model.forward(&x, false).unwrap();
    assert_eq!(max_abs_diff(&a.final_avg_pool, &b.final_avg_pool), 0.0);
    for (ha, hb) in a.hiddens.iter().zip(&b.hiddens) {
        assert_eq!(max_abs_diff(ha, hb), 0.0);
    }
    assert_eq!(
        max_abs_diff(
            a.logits_sup.as_ref().unwrap(),
            b.logits_sup.as_ref().unwrap()
        ),
        0.0
    );
    // Every variable, moving statistics included, is restored.
    let (ta, tb) = (tensors_of(&varmap), tensors_of(&loaded.varmap));
    assert_eq!(ta.len(), tb.len());
    for (k, t) in &ta {
        assert_eq!(max_abs_diff(t, &tb[k]), 0.0, "{k}");
    }
    // Overwriting an existing checkpoint works and keeps it loadable.
    checkpoint::save(
        &path,
        &loaded.varmap,
        &CheckpointMeta::new(config, "finetune", 12_346),
    )
    .unwrap();
    assert_eq!(checkpoint::read_meta(&path).unwrap().step, 12_346);
}

#[test]
fn truncated_or_corrupt_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = saved(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.path().join("bad.safetensors");
    for cut in [0usize, 5, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        match checkpoint::load(&bad, &Device::Cpu) {
            Err(e @ CheckpointError::Corrupt { .. }) => {
                assert!(e.to_string().contains("bad.safetensors"), "{e}")
            }
            Err(e) => panic!("cut {cut}: expected Corrupt, got {e}"),
            Ok(_) => panic!("cut {cut}: loaded a truncated file"),
        }
    }
    std::fs::write(&bad, b"this is not a safetensors file at all").unwrap();
    assert!(matches!(
        checkpoint::load(&bad, &Device::Cpu),
        Err(CheckpointError::Corrupt { .. })
    ));
    let missing = dir.path().join("nope.safetensors");
    assert!(matches!(
        checkpoint::load(&missing, &Device::Cpu),
        Err(CheckpointError::Io { .. })
    ));
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_, config, varmap) = saved(dir.path());
    let mut tensors = tensors_of(&varmap);
    let victim = "resnet.block_group2.block1.bn1.moving_variance";
    tensors.remove(victim).unwrap();
    let path = dir.path().join("missing.safetensors");
    write_raw(&path, &tensors, Some(metadata_for(&config)));
    match checkpoint::load(&path, &Device::Cpu) {
        Err(CheckpointError::MissingTensor { name, path: p }) => {
            assert_eq!(name, victim);
            assert_eq!(p, path);
        }
        Err(e) => panic!("expected MissingTensor, got {e}"),
        Ok(_) => panic!("loaded a checkpoint with a missing tensor"),
    }
    // save refuses a VarMap that does not hold the whole model.
    varmap.data().lock().unwrap().remove(victim);
    let err = checkpoint::save(
        dir.path().join("x.safetensors"),
        &varmap,
        &CheckpointMeta::new(config, "x", 0),
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, CheckpointError::MissingTensor { ref name, .. } if name == victim),
        "{err}"
    );
}

#[test]
fn another_architecture_is_a_shape_mismatch_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, varmap) = saved(dir.path());
    // Same names, but the metadata claims a wider network.
    let path = dir.path().join("wider.safetensors");
    write_raw(&path, &tensors_of(&varmap), Some(metadata_for(&tiny(8))));
    match checkpoint::load(&path, &Device::Cpu) {
        Err(e @ CheckpointError::ShapeMismatch { .. }) => {
            let CheckpointError::ShapeMismatch {
                name,
                expected,
                found,
                ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(name, "resnet.stem.conv0.weight");
            assert_eq!(expected, &vec![8, 3, 3, 3]);
            assert_eq!(found, &vec![4, 3, 3, 3]);
            assert!(e.to_string().contains("resnet.stem.conv0.weight"), "{e}");
        }
        Err(e) => panic!("expected ShapeMismatch, got {e}"),
        Ok(_) => panic!("loaded a checkpoint of another architecture"),
    }
    // An R18 with the ResNet-D deep stem over CIFAR-stem tensors: the first stem conv has
    // half the width.
    let deep = ModelConfig {
        sk_ratio: 0.0625,
        cifar_stem: false,
        ..tiny(4)
    };
    write_raw(&path, &tensors_of(&varmap), Some(metadata_for(&deep)));
    let err = checkpoint::load(&path, &Device::Cpu).err().unwrap();
    assert!(
        matches!(err, CheckpointError::ShapeMismatch { ref name, .. } if name == "resnet.stem.conv0.weight"),
        "{err}"
    );
    // A deeper net: its extra blocks are missing.
    let deeper = ModelConfig {
        resnet_depth: 34,
        ..tiny(4)
    };
    write_raw(&path, &tensors_of(&varmap), Some(metadata_for(&deeper)));
    let err = checkpoint::load(&path, &Device::Cpu).err().unwrap();
    assert!(
        matches!(err, CheckpointError::MissingTensor { ref name, .. } if name.starts_with("resnet.block_group1.block2.")),
        "{err}"
    );
    // A tensor the model does not have.
    let mut tensors = tensors_of(&varmap);
    tensors.insert(
        "resnet.extra.weight".into(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    write_raw(&path, &tensors, Some(metadata_for(&tiny(4))));
    let err = checkpoint::load(&path, &Device::Cpu).err().unwrap();
    assert!(
        matches!(err, CheckpointError::UnexpectedTensor { ref name, .. } if name == "resnet.extra.weight"),
        "{err}"
    );
}

#[test]
fn missing_or_invalid_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (_, config, varmap) = saved(dir.path());
    // A plain safetensors file (e.g. VarMap::save) has no metadata at all.
    let plain = dir.path().join("plain.safetensors");
    varmap.save(&plain).unwrap();
    let err = checkpoint::load(&plain, &Device::Cpu).err().unwrap();
    assert!(
        matches!(err, CheckpointError::MissingMetadata { ref key, .. } if key == "format"),
        "{err}"
    );
    assert!(err.to_string().contains("plain.safetensors"));

    let path = dir.path().join("meta.safetensors");
    for (key, value, missing) in [
        ("config", None, true),
        ("stage", None, true),
        ("step", None, true),
        ("producer", None, true),
        ("step", Some("seven"), false),
        ("config", Some("{not json"), false),
        ("config", Some(r#"{"resnet_depth": 19}"#), false),
        ("format", Some("something-else"), false),
    ] {
        let mut md = metadata_for(&config);
        match value {
            None => {
                md.remove(key);
            }
            Some(v) => {
                md.insert(key.to_string(), v.to_string());
            }
        }
        write_raw(&path, &tensors_of(&varmap), Some(md));
        let err = checkpoint::load(&path, &Device::Cpu).err().unwrap();
        match (&err, missing) {
            (CheckpointError::MissingMetadata { key: k, .. }, true) => assert_eq!(k, key),
            (CheckpointError::InvalidMetadata { key: k, .. }, false) => assert_eq!(k, key),
            (CheckpointError::Config { .. }, false) => assert_eq!(key, "config"),
            _ => panic!("{key}={value:?}: unexpected error {err}"),
        }
    }
    // Extra fields may not shadow the reserved ones.
    let meta = CheckpointMeta::new(config, "x", 0).with_extra("step", "3");
    let err = checkpoint::save(dir.path().join("r.safetensors"), &varmap, &meta)
        .err()
        .unwrap();
    assert!(
        matches!(err, CheckpointError::InvalidMetadata { ref key, .. } if key == "step"),
        "{err}"
    );
}

#[test]
fn training_state_travels_with_the_model_and_is_skipped_by_model_loaders() {
    use candle_core::{DType, Device, Tensor};
    use simclr_models::checkpoint::{load, load_tensors, save_with_state, STATE_PREFIX};
    let dir = tempfile::tempdir().unwrap();
    let config = simclr_models::ModelConfig {
        resnet_depth: 18,
        base_width: 4,
        num_classes: Some(3),
        ..Default::default()
    }
    .with_image_size(32);
    let varmap = candle_nn::VarMap::new();
    simclr_models::SimclrModel::init(&config, &varmap, 1, &Device::Cpu).unwrap();
    let meta = simclr_models::CheckpointMeta::new(config.clone(), "pretrain", 7);
    let slot = Tensor::arange(0f32, 6.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let step = Tensor::new(&[5i64], &Device::Cpu).unwrap();
    let path = dir.path().join("run.safetensors");
    let state = vec![
        (format!("{STATE_PREFIX}optimizer/slot"), slot.clone()),
        (format!("{STATE_PREFIX}optimizer/step"), step),
    ];
    save_with_state(&path, &varmap, &meta, &state).unwrap();
    // A model loader sees a plain model checkpoint.
    let ckpt = load(&path, &Device::Cpu).unwrap();
    assert_eq!(ckpt.meta.step, 7);
    // The state comes back with its values and dtypes.
    let (meta2, all) = load_tensors(&path, &Device::Cpu).unwrap();
    assert_eq!(meta2.stage, "pretrain");
    let got = &all[&format!("{STATE_PREFIX}optimizer/slot")];
    assert_eq!(
        got.to_vec2::<f32>().unwrap(),
        slot.to_vec2::<f32>().unwrap()
    );
    assert_eq!(
        all[&format!("{STATE_PREFIX}optimizer/step")].dtype(),
        DType::I64
    );
    // State must be namespaced, so it can never shadow a model variable.
    let e = save_with_state(&path, &varmap, &meta, &[("resnet.x".into(), slot)]).unwrap_err();
    assert!(e.to_string().contains("train_state/"), "{e}");
}

#[test]
fn a_config_claiming_another_width_is_refused_before_anything_is_built() {
    // The metadata claims a network 4096 times as wide as the tensors: a loader that trusted it
    // would allocate tens of GiB (the fine-tuning and distillation paths did, and aborted).
    let dir = tempfile::tempdir().unwrap();
    let (path, config, varmap) = saved(dir.path());
    let huge = ModelConfig {
        width_multiplier: 4096,
        ..config
    };
    write_raw(&path, &tensors_of(&varmap), Some(metadata_for(&huge)));
    for result in [
        checkpoint::load_tensors(&path, &Device::Cpu).map(|_| ()),
        checkpoint::load(&path, &Device::Cpu).map(|_| ()),
    ] {
        match result.unwrap_err() {
            e @ CheckpointError::ShapeMismatch { .. } => {
                assert!(e.to_string().contains(&path.display().to_string()), "{e}")
            }
            other => panic!("expected a shape mismatch, got {other}"),
        }
    }
}

#[test]
fn non_finite_tensors_are_refused_on_load_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, varmap) = saved(dir.path());
    let meta = checkpoint::read_meta(&path).unwrap();
    let mut tensors = tensors_of(&varmap);
    let name = tensors
        .keys()
        .find(|k| k.ends_with("moving_variance"))
        .unwrap()
        .clone();
    let t = &tensors[&name];
    let mut values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let middle = values.len() / 2;
    values[middle] = f32::INFINITY;
    tensors.insert(
        name.clone(),
        Tensor::from_vec(values, t.shape(), &Device::Cpu).unwrap(),
    );
    write_raw(&path, &tensors, Some(metadata_for(&meta.config)));
    for result in [
        checkpoint::load_tensors(&path, &Device::Cpu).map(|_| ()),
        checkpoint::load(&path, &Device::Cpu).map(|_| ()),
    ] {
        match result.unwrap_err() {
            CheckpointError::NonFinite { name: n, .. } => assert_eq!(n, name),
            other => panic!("expected NonFinite, got {other}"),
        }
    }
    // Inspecting a diverged run stays possible.
    checkpoint::set_allow_non_finite(true);
    let loaded = checkpoint::load_tensors(&path, &Device::Cpu);
    checkpoint::set_allow_non_finite(false);
    assert!(loaded.is_ok());
}

#[cfg(unix)]
#[test]
fn saving_over_a_symlink_or_a_socket_is_refused_and_leaves_them_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (_, config, varmap) = saved(dir.path());
    let meta = CheckpointMeta::new(config, "test", 1);
    let target = dir.path().join("elsewhere.txt");
    std::fs::write(&target, b"keep me").unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let sock = dir.path().join("sock.safetensors");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    for path in [&link, &sock] {
        let e = checkpoint::save(path, &varmap, &meta).unwrap_err();
        assert!(e.to_string().contains("refusing to replace"), "{e}");
    }
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&sock)
        .unwrap()
        .file_type()
        .is_socket());
}

/// Every bit flip in the tensor data of a saved checkpoint is caught by the stored digest on
/// both loaders, before the damaged values are used; metadata edited after the fact too.
#[test]
fn a_flipped_bit_or_an_edited_field_fails_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (path, config, varmap) = saved(dir.path());
    let clean = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(clean[..8].try_into().unwrap()) as usize;
    let data_start = 8 + header_len;
    assert!(clean.len() > data_start + 64);
    // Positions spread over the data section: first byte, last byte, and between.
    let span = clean.len() - data_start;
    for k in 0..16usize {
        let at = data_start + (k * (span - 1)) / 15;
        for bit in [0u8, 7] {
            let mut bytes = clean.clone();
            bytes[at] ^= 1 << bit;
            let damaged = dir.path().join("damaged.safetensors");
            std::fs::write(&damaged, &bytes).unwrap();
            for result in [
                checkpoint::load_tensors(&damaged, &Device::Cpu).map(|_| ()),
                checkpoint::load(&damaged, &Device::Cpu).map(|_| ()),
            ] {
                match result {
                    Err(CheckpointError::DigestMismatch { path: p }) => assert_eq!(p, damaged),
                    Err(other) => {
                        panic!("byte {at} bit {bit}: expected DigestMismatch, got {other}")
                    }
                    Ok(()) => panic!("byte {at} bit {bit}: a damaged checkpoint loaded"),
                }
            }
        }
    }
    // The step changed in the metadata, the stored digest kept: refused.
    let meta_digest = {
        let st = safetensors::SafeTensors::read_metadata(&clean).unwrap().1;
        st.metadata().clone().unwrap()["digest"].clone()
    };
    assert!(meta_digest.starts_with("sha256:") && meta_digest.len() == 7 + 64);
    let mut md = metadata_for(&config);
    md.insert("step".into(), "100".into());
    md.insert("digest".into(), meta_digest.clone());
    let edited = dir.path().join("edited.safetensors");
    // The fields of `metadata_for` name another producer ("test") than the one that wrote the
    // file, so the stored digest does not cover them…
    write_raw(&edited, &tensors_of(&varmap), Some(md.clone()));
    let m = checkpoint::load(&edited, &Device::Cpu);
    assert!(matches!(m, Err(CheckpointError::DigestMismatch { .. })));
    // …with the real producer these are the tensors and fields that were written: it loads.
    md.insert("producer".into(), checkpoint::producer());
    write_raw(&edited, &tensors_of(&varmap), Some(md.clone()));
    checkpoint::load(&edited, &Device::Cpu).unwrap();
    md.insert("step".into(), "900".into());
    write_raw(&edited, &tensors_of(&varmap), Some(md.clone()));
    assert!(matches!(
        checkpoint::load(&edited, &Device::Cpu),
        Err(CheckpointError::DigestMismatch { .. })
    ));
    // A file without a digest (older writers, other tools) still loads.
    md.remove("digest");
    write_raw(&edited, &tensors_of(&varmap), Some(md));
    checkpoint::load(&edited, &Device::Cpu).unwrap();
}
