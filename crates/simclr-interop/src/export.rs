//! Weights out: a model of this crate to the files other tools read.
//!
//! * [`export_pth`]: the `.pth` layout of the TF1 -> PyTorch converter of the official weights
//!   (`{'resnet': state dict, 'head': state dict}`, the converter's key names, PyTorch's OIHW
//!   conv and `[out, in]` dense layouts), which `torch.load` opens and [`crate::import_pth()`]
//!   reads back. The file also holds the model's configuration as a JSON string under
//!   [`CONFIG_KEY`], so that what the tensors cannot say (`ft_proj_selector`,
//!   `fine_tune_after_block`, BN decay) survives a round trip; files without it import as
//!   before.
//! * [`export_hf`]: a Hugging Face-style folder, `config.json` + weights-only
//!   `model.safetensors` (a checkpoint of this crate, so every `simclr` command loads it) + a
//!   `README.md` model card.
//!
//! Both drop training state (optimizer slots, memory queues): only the model's variables leave.
//! The eval-mode graph as ONNX is [`crate::onnx`]'s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::VarMap;

use crate::error::InteropError;
use crate::import_pth::key_map;
use crate::pth::{write_pth, PthEntry};
use crate::source::SourceName;
use simclr_models::checkpoint::{self, CheckpointMeta};
use simclr_models::{ModelConfig, ProjHeadMode};

/// Top-level key of an exported `.pth` holding the [`ModelConfig`] as JSON.
pub const CONFIG_KEY: &str = "simclr_rs_config";

/// The converter's file name for `config`, `r{depth}_{w}x_sk{0|1}.pth`: [`crate::import_pth()`]
/// reads the architecture from it.
pub fn pth_file_name(config: &ModelConfig) -> String {
    format!("{}.pth", pth_source_name(config).to_name())
}

fn pth_source_name(config: &ModelConfig) -> SourceName {
    SourceName {
        depth: config.resnet_depth,
        width_multiplier: config.width_multiplier,
        sk: config.sk_enabled(),
        ema: false,
    }
}

/// Writes the model of `config` held in `varmap` to `path` in the converter's `.pth` layout.
///
/// The file name must be the one [`pth_file_name`] gives (possibly with `_ema`), since the
/// importer reads depth, width and SK from it; another name is refused before anything is
/// written.
pub fn export_pth(path: &Path, config: &ModelConfig, varmap: &VarMap) -> Result<(), InteropError> {
    let unsupported = |reason: String| InteropError::Unsupported {
        path: path.to_path_buf(),
        reason,
    };
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match SourceName::parse(&name) {
        Ok(n) if SourceName { ema: false, ..n } == pth_source_name(config) => {}
        _ => {
            return Err(unsupported(format!(
                "a converter .pth of this model must be named {} (the importer reads the architecture from the name)",
                pth_file_name(config)
            )))
        }
    }
    if config.proj_head_mode != ProjHeadMode::Nonlinear {
        return Err(unsupported(format!(
            "the converter's layout holds a nonlinear projection head, and this model's is {:?}: export it as ONNX or a Hugging Face folder instead",
            config.proj_head_mode
        )));
    }
    let vars = variables(path, varmap)?;
    let mut resnet = Vec::new();
    let mut head = Vec::new();
    for (dict, key, ours) in key_map(config) {
        let t = match &ours {
            Some(ours) => vars
                .get(ours)
                .cloned()
                .ok_or_else(|| unsupported(format!("the model has no variable `{ours}`")))?,
            // The last head BN has no beta in TF; the converter stores a zero bias there.
            None => {
                let gamma = key.replace(".bias", ".weight");
                let like = head
                    .iter()
                    .find(|(k, _): &&(String, Tensor)| *k == gamma)
                    .map(|(_, t)| t.clone())
                    .ok_or_else(|| unsupported(format!("no `{gamma}` before `{key}`")))?;
                like.zeros_like().map_err(|source| InteropError::Candle {
                    path: path.to_path_buf(),
                    source,
                })?
            }
        };
        if dict == "resnet" {
            resnet.push((key, t));
        } else {
            head.push((key, t));
        }
    }
    let config_json = serde_json::to_string(config).map_err(|e| unsupported(e.to_string()))?;
    write_pth(
        path,
        &[
            ("resnet".into(), PthEntry::StateDict(resnet)),
            ("head".into(), PthEntry::StateDict(head)),
            (CONFIG_KEY.into(), PthEntry::Text(config_json)),
        ],
    )
}

/// Every variable of `varmap` as f32, by name (what each export writes); errors name `path`.
pub(crate) fn variables(
    path: &Path,
    varmap: &VarMap,
) -> Result<BTreeMap<String, Tensor>, InteropError> {
    let data = varmap.data().lock().map_err(|_| InteropError::Candle {
        path: path.to_path_buf(),
        source: candle_core::Error::Msg("variable store lock poisoned".into()),
    })?;
    data.iter()
        .map(|(k, v)| {
            let t = v
                .as_tensor()
                .to_dtype(DType::F32)
                .map_err(|source| InteropError::Candle {
                    path: path.to_path_buf(),
                    source,
                })?;
            Ok((k.clone(), t))
        })
        .collect()
}

/// The values of `t` as little-endian f32 bytes, in C order (the raw storage the `.pth` and
/// ONNX writers store).
pub(crate) fn f32_le_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// What [`export_hf`] writes into its folder.
pub const HF_FILES: [&str; 3] = ["config.json", "model.safetensors", "README.md"];

/// Writes a Hugging Face-style folder for the model of `meta.config` held in `varmap`:
/// `config.json`, a weights-only `model.safetensors` with `meta` (stage `export` keeps the
/// source's stage and step as extra fields) and a `README.md` model card listing `figures`
/// (name, value) under "Training". The folder is created if needed; each file is written
/// atomically.
pub fn export_hf(
    dir: &Path,
    meta: &CheckpointMeta,
    varmap: &VarMap,
    figures: &[(String, String)],
) -> Result<(), InteropError> {
    let io = |path: PathBuf| move |source: std::io::Error| InteropError::Io { path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let config = &meta.config;
    let hf_config = serde_json::json!({
        "model_type": "simclrv2",
        "library_name": "simclr-rs",
        "architecture": config.name(),
        "simclr": config,
        "source_stage": meta.stage,
        "source_step": meta.step,
        "producer": meta.producer,
    });
    let config_path = dir.join(HF_FILES[0]);
    let text = serde_json::to_string_pretty(&hf_config).map_err(|e| InteropError::Unsupported {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;
    simclr_fs::write_atomic(&config_path, format!("{text}\n").as_bytes())
        .map_err(io(config_path.clone()))?;

    let weights_meta = CheckpointMeta {
        extra: meta.extra.clone(),
        ..CheckpointMeta::new(config.clone(), meta.stage.clone(), meta.step)
    };
    checkpoint::save(dir.join(HF_FILES[1]), varmap, &weights_meta)?;

    let card_path = dir.join(HF_FILES[2]);
    simclr_fs::write_atomic(&card_path, model_card(meta, figures).as_bytes())
        .map_err(io(card_path))?;
    Ok(())
}

fn model_card(meta: &CheckpointMeta, figures: &[(String, String)]) -> String {
    let c = &meta.config;
    let mut s = String::from(
        "---\nlibrary_name: simclr-rs\nlicense: apache-2.0\ntags:\n- simclr\n- simclrv2\n- self-supervised\n- image-classification\n---\n\n",
    );
    s += &format!(
        "# SimCLRv2 {} (base width {}{})\n\n",
        c.name(),
        c.base_width,
        if c.cifar_stem { ", CIFAR stem" } else { "" }
    );
    s += &format!(
        "Written by {} from a `{}` checkpoint at step {}. Weights only (no optimizer state), in \
         simclr-rs names; `config.json` holds the architecture under `simclr`.\n\n",
        meta.producer, meta.stage, meta.step
    );
    s += "Inputs: NCHW float32 images in [0, 1], no mean/std normalisation.\n\n";
    s += "| setting | value |\n|---|---|\n";
    let rows: [(&str, String); 7] = [
        ("ResNet depth", c.resnet_depth.to_string()),
        ("width multiplier", c.width_multiplier.to_string()),
        ("selective kernels (sk_ratio)", c.sk_ratio.to_string()),
        ("input channels", c.in_channels.to_string()),
        (
            "projection head",
            match c.proj_head_mode {
                ProjHeadMode::Nonlinear => {
                    format!("{} layers, output {}", c.num_proj_layers, c.proj_out_dim)
                }
                ProjHeadMode::Linear => format!("one linear layer, output {}", c.proj_out_dim),
                ProjHeadMode::None => "none".to_string(),
            },
        ),
        (
            "supervised head classes",
            c.num_classes
                .map_or_else(|| "none".to_string(), |n| n.to_string()),
        ),
        ("ft_proj_selector", c.ft_proj_selector.to_string()),
    ];
    for (k, v) in rows {
        s += &format!("| {k} | {v} |\n");
    }
    if !figures.is_empty() {
        s += "\n## Training\n\n| figure | value |\n|---|---|\n";
        for (k, v) in figures {
            s += &format!("| {k} | {v} |\n");
        }
    }
    s += "\nLoad it with `simclr eval --checkpoint model.safetensors …` or \
          `safetensors.torch.load_file(\"model.safetensors\")`.\n";
    s
}
