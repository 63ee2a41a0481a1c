//! Export: the converter `.pth` round trip through the importer (bit for bit), an independent
//! PyTorch forward of the exported file (when torch is installed), the Hugging Face folder, and
//! the refusals.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::fixture;
use simclr_interop::export::CONFIG_KEY;
use simclr_interop::onnx::output_names;
use simclr_interop::pth::{read_float_tensors, write_pth, PthEntry, PthReader};
use simclr_interop::{export_hf, export_onnx, export_pth, import_pth, pth_file_name, InteropError};
use simclr_models::checkpoint::{self, CheckpointMeta};
use simclr_models::{ModelConfig, ProjHeadMode, SimclrModel};

const FIXTURES: [&str; 3] = ["r18_1x_sk0", "r50_1x_sk0", "r50_1x_sk1"];

/// A fixture network with the settings the tensors cannot tell changed from the importer's
/// defaults, so that a round trip that dropped them would show.
fn fixture_model(name: &str) -> (ModelConfig, VarMap, SimclrModel) {
    let imported = import_pth(fixture(&format!("{name}.pth")), &Device::Cpu).unwrap();
    let config = ModelConfig {
        ft_proj_selector: 1,
        fine_tune_after_block: 2,
        batch_norm_decay: 0.95,
        ..imported.config.clone()
    };
    let model = SimclrModel::new(
        &config,
        VarBuilder::from_varmap(&imported.varmap, candle_core::DType::F32, &Device::Cpu),
    )
    .unwrap();
    (config, imported.varmap, model)
}

fn input_of(name: &str) -> Tensor {
    let io =
        candle_core::safetensors::load(fixture(&format!("{name}_io.safetensors")), &Device::Cpu)
            .unwrap();
    io["input"].clone()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn variables(varmap: &VarMap) -> BTreeMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

const OUTPUTS: [&str; 5] = [
    "final_avg_pool",
    "proj_head_1",
    "proj_head_2",
    "proj_head_output",
    "logits_sup",
];

#[test]
fn an_exported_pth_imports_back_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let (config, varmap, model) = fixture_model(name);
        let path = dir.path().join(pth_file_name(&config));
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            format!("{name}.pth")
        );
        export_pth(&path, &config, &varmap).unwrap();

        let back = import_pth(&path, &Device::Cpu).unwrap();
        assert_eq!(back.config, config, "{name}: configuration");
        let (ours, theirs) = (variables(&varmap), variables(&back.varmap));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, t) in &ours {
            assert_eq!(bits(t), bits(&theirs[k]), "{name}: {k}");
        }
        let x = input_of(name);
        let (a, b) = (
            model.forward(&x, false).unwrap(),
            back.model.forward(&x, false).unwrap(),
        );
        for o in OUTPUTS {
            assert_eq!(
                bits(a.get(o).unwrap()),
                bits(b.get(o).unwrap()),
                "{name}: {o}"
            );
        }
        // The supervised head reads head layer 1 after the round trip too: its logits are not
        // those of the encoder output.
        let from_encoder = SimclrModel::new(
            &ModelConfig {
                ft_proj_selector: 0,
                ..config.clone()
            },
            VarBuilder::from_varmap(&back.varmap, candle_core::DType::F32, &Device::Cpu),
        )
        .unwrap()
        .forward(&x, false)
        .unwrap();
        assert_ne!(
            bits(b.get("logits_sup").unwrap()),
            bits(from_encoder.get("logits_sup").unwrap()),
            "{name}"
        );
    }
}

/// The interpreter for the Python checks: `SIMCLR_PYTHON`, else `python3`, if it imports
/// `modules`.
fn python_with(modules: &str) -> Option<String> {
    let python = std::env::var("SIMCLR_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

/// Runs `script` from the fixtures folder on `args`; its output must report "max rel err".
fn run_check(python: &str, script: &str, args: &[&Path], what: &str) {
    let run = Command::new(python)
        .arg(fixtures_dir().join(script))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    eprintln!("{what}: {text}");
    assert!(run.status.success(), "{what}: {text}");
    assert!(text.contains("max rel err"), "{what}: {text}");
}

/// `input` and the named outputs of `model` on the fixture's input, to a safetensors file.
fn save_outputs(model: &SimclrModel, name: &str, outputs: &[&str], path: &Path) {
    let x = input_of(name);
    let out = model.forward(&x, false).unwrap();
    let mut tensors = vec![("input".to_string(), x.clone())];
    for o in outputs {
        tensors.push((o.to_string(), out.get(o).unwrap().clone()));
    }
    candle_core::safetensors::save(&tensors.into_iter().collect(), path).unwrap();
}

fn fixtures_dir() -> PathBuf {
    simclr_fs::manifest_dir(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn torch_loads_the_exported_pth_and_its_own_forward_agrees() {
    let Some(python) = python_with("torch, safetensors") else {
        eprintln!(
            "SKIPPED: no python with torch and safetensors (set SIMCLR_PYTHON to one; \
             `pip install torch numpy safetensors`)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let (config, varmap, model) = fixture_model(name);
        let path = dir.path().join(pth_file_name(&config));
        export_pth(&path, &config, &varmap).unwrap();
        let ours = dir.path().join(format!("{name}_ours.safetensors"));
        save_outputs(&model, name, &OUTPUTS, &ours);
        run_check(&python, "check_export.py", &[&path, &ours], name);
    }
}

#[test]
fn onnxruntime_runs_the_exported_graph_and_agrees() {
    let Some(python) = python_with("onnxruntime, numpy, safetensors") else {
        eprintln!(
            "SKIPPED: no python with onnxruntime (set SIMCLR_PYTHON to one; \
             `pip install onnxruntime numpy safetensors onnx`)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let (config, varmap, model) = fixture_model(name);
        let path = dir.path().join(format!("{name}.onnx"));
        export_onnx(&path, &config, &varmap).unwrap();
        let names = output_names(&config);
        assert_eq!(
            names,
            [
                "final_avg_pool",
                "proj_head_1",
                "proj_head_2",
                "proj_head_output",
                "logits_sup"
            ]
        );
        let ours = dir.path().join(format!("{name}_ours.safetensors"));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        save_outputs(&model, name, &names, &ours);
        run_check(&python, "check_onnx.py", &[&path, &ours], name);
    }
}

/// A freshly initialised R18 (base width 4, CIFAR stem) with projection head `mode` and the
/// supervised head on the encoder output.
fn head_variant(mode: ProjHeadMode) -> (ModelConfig, VarMap, SimclrModel) {
    let config = ModelConfig {
        resnet_depth: 18,
        base_width: 4,
        proj_head_mode: mode,
        num_classes: Some(10),
        ..ModelConfig::default()
    }
    .with_image_size(32);
    let varmap = VarMap::new();
    let model = SimclrModel::init(&config, &varmap, 3, &Device::Cpu).unwrap();
    (config, varmap, model)
}

#[test]
fn onnx_of_linear_and_headless_models_gives_their_proj_head_output() {
    let Some(python) = python_with("onnxruntime, numpy, safetensors") else {
        eprintln!("SKIPPED: no python with onnxruntime (set SIMCLR_PYTHON to one)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for mode in [ProjHeadMode::Linear, ProjHeadMode::None] {
        let (config, varmap, model) = head_variant(mode);
        let path = dir.path().join(format!("{mode:?}.onnx"));
        export_onnx(&path, &config, &varmap).unwrap();
        let names = output_names(&config);
        assert_eq!(names, ["final_avg_pool", "proj_head_output", "logits_sup"]);
        let ours = dir.path().join(format!("{mode:?}.safetensors"));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        save_outputs(&model, "r18_1x_sk0", &names, &ours);
        run_check(
            &python,
            "check_onnx.py",
            &[&path, &ours],
            &format!("{mode:?}"),
        );
    }
}

#[test]
fn a_pth_of_a_model_without_the_nonlinear_head_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (config, varmap, _) = head_variant(ProjHeadMode::Linear);
    let path = dir.path().join(pth_file_name(&config));
    let err = export_pth(&path, &config, &varmap).unwrap_err().to_string();
    assert!(
        err.contains("nonlinear projection head") && err.contains("ONNX"),
        "{err}"
    );
    assert!(!path.exists());
}

#[test]
fn a_pth_named_otherwise_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (config, varmap, _) = fixture_model("r18_1x_sk0");
    for bad in ["model.pth", "r50_1x_sk0.pth", "r18_2x_sk0.pth"] {
        let path = dir.path().join(bad);
        let err = export_pth(&path, &config, &varmap).unwrap_err();
        assert!(
            matches!(err, InteropError::Unsupported { .. }),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains("r18_1x_sk0.pth"), "{err}");
        assert!(!path.exists(), "{bad}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_stored_configuration_that_contradicts_the_tensors_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (config, varmap, _) = fixture_model("r18_1x_sk0");
    let path = dir.path().join("r18_1x_sk0.pth");
    export_pth(&path, &config, &varmap).unwrap();
    let mut reader = PthReader::open(&path).unwrap();
    let dicts = reader.state_dicts().unwrap();
    let mut entries = Vec::new();
    for key in ["resnet", "head"] {
        let t = read_float_tensors(&mut reader, &dicts[key]).unwrap();
        entries.push((
            key.to_string(),
            PthEntry::StateDict(t.into_iter().collect()),
        ));
    }
    let cases = [
        (
            "another base width",
            serde_json::to_string(&ModelConfig {
                base_width: config.base_width * 2,
                ..config.clone()
            })
            .unwrap(),
        ),
        ("not a configuration", "[1, 2]".to_string()),
    ];
    for (what, text) in cases {
        let mut e = entries.clone();
        e.push((CONFIG_KEY.to_string(), PthEntry::Text(text)));
        write_pth(&path, &e).unwrap();
        let err = import_pth(&path, &Device::Cpu).err().unwrap();
        assert!(
            matches!(
                err,
                InteropError::Unsupported { .. } | InteropError::Corrupt { .. }
            ),
            "{what}: {err}"
        );
        assert!(err.to_string().contains(CONFIG_KEY), "{what}: {err}");
    }
    // Without the entry the file imports as a converter file does: selector 0.
    write_pth(&path, &entries).unwrap();
    let plain = import_pth(&path, &Device::Cpu).unwrap();
    assert_eq!(plain.config.ft_proj_selector, 0);
    assert_eq!(plain.config.base_width, config.base_width);
}

#[test]
fn the_hugging_face_folder_holds_the_weights_the_config_and_a_card() {
    let dir = tempfile::tempdir().unwrap();
    let (config, varmap, model) = fixture_model("r50_1x_sk1");
    let meta = CheckpointMeta::new(config.clone(), "finetune", 782).with_extra("fraction", "0.1");
    let figures = vec![("test top-1".to_string(), "85.30 %".to_string())];
    let out = dir.path().join("hf");
    export_hf(&out, &meta, &varmap, &figures).unwrap();

    let weights = checkpoint::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(weights.meta.config, config);
    assert_eq!(weights.meta.stage, "finetune");
    assert_eq!(weights.meta.step, 782);
    assert_eq!(
        weights.meta.extra.get("fraction").map(String::as_str),
        Some("0.1")
    );
    let (ours, theirs) = (variables(&varmap), variables(&weights.varmap));
    assert_eq!(ours.len(), theirs.len());
    for (k, t) in &ours {
        assert_eq!(bits(t), bits(&theirs[k]), "{k}");
    }
    let x = input_of("r50_1x_sk1");
    assert_eq!(
        bits(&model.forward(&x, false).unwrap().logits_sup.unwrap()),
        bits(
            &weights
                .model
                .forward(&x, false)
                .unwrap()
                .logits_sup
                .unwrap()
        )
    );
    // Weights only: no training state.
    let (_, all) = checkpoint::load_tensors(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(all.len(), ours.len());

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["model_type"], "simclrv2");
    let stored: ModelConfig = serde_json::from_value(json["simclr"].clone()).unwrap();
    assert_eq!(stored, config);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nlibrary_name: simclr-rs\n"), "{card}");
    assert!(card.contains("| test top-1 | 85.30 % |"), "{card}");
    assert!(card.contains("| ft_proj_selector | 1 |"), "{card}");
}
