//! Import of the PyTorch files written by the widely used TF1 -> PyTorch converter of the
//! official weights (the TF1 → PyTorch converter, Separius/SimCLRv2-Pytorch): `r{depth}_{w}x_sk{0|1}[_ema].pth`, a dict with a
//! `resnet` state dict (encoder + `fc`, the supervised head) and a `head` state dict (the
//! projection head, `layers.{3i}` dense / `layers.{3i+1}` BN).
//!
//! The architecture comes from the file name and the tensor shapes together. The name gives
//! depth, width multiplier and SK; the shapes give the stem kind, the block kind, the blocks
//! per stage, the stem and stage widths (so reduced base widths load), the input channels,
//! the class count and the projection head. Whatever both tell must agree, otherwise the
//! import fails with [`InteropError::Contradiction`].
//!
//! Key mapping (converter name -> this crate's name), BN leaves `weight, bias, running_mean,
//! running_var` -> `gamma, beta, moving_mean, moving_variance`:
//!
//! | converter | here |
//! |---|---|
//! | `net.0.0`, `net.0.1.0` | `resnet.stem.conv0`, `resnet.stem.bn0` |
//! | `net.0.2`, `net.0.3.0`, `net.0.4`, `net.0.5.0` (deep stem) | `resnet.stem.conv1`, `bn1`, `conv2`, `bn2` |
//! | `net.S.blocks.B.projection.shortcut[.2]`, `...projection.bn.0` | `resnet.block_groupS.blockB.shortcut_conv`, `shortcut_bn` |
//! | basic: `net.0`, `net.1.0`, `net.2`, `net.3.0` | `conv1`, `bn1`, `conv2`, `bn2` |
//! | bottleneck: `net.0`, `net.1.0`, `net.2`, `net.3.0`, `net.4`, `net.5.0` | `conv1`, `bn1`, `conv2`, `bn2`, `conv3`, `bn3` |
//! | SK: `net.0`, `net.1.0`, `net.2.main_conv.0`, `net.2.main_conv.1.0`, `net.2.mixing_conv.0`, `net.2.mixing_conv.1.0`, `net.2.mixing_conv.2`, `net.3`, `net.4.0` | `conv1`, `bn1`, `sk.conv`, `sk.bn`, `sk.mix_reduce`, `sk.mix_bn`, `sk.mix_expand`, `conv3`, `bn3` |
//! | `fc` | `head_supervised` |
//! | `layers.{3i}`, `layers.{3i+1}` | `projection_head.nl_i.dense`, `projection_head.nl_i.bn` |
//!
//! The last head BN has no beta in TF; the converter leaves a zero `bias` there, which is
//! dropped (a non-zero one is an error, as this architecture cannot represent it).
//! `num_batches_tracked` counters are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::error::InteropError;
use crate::export::CONFIG_KEY;
use crate::pth::{read_float_tensors, PthReader, StateDictInfo};
use crate::source::{resolve_config, ImportedModel, Inferred, SourceFormat, SourceName};
use simclr_models::parameter_shapes;
use simclr_models::SimclrModel;
use simclr_models::{BlockKind, ModelConfig, StemKind};

type Shapes = BTreeMap<String, Vec<usize>>;

fn shape_of<'a>(
    path: &Path,
    shapes: &'a Shapes,
    dict: &str,
    key: &str,
) -> Result<&'a Vec<usize>, InteropError> {
    shapes.get(key).ok_or_else(|| InteropError::MissingTensor {
        path: path.to_path_buf(),
        name: format!("{dict}/{key}"),
    })
}

/// The first dimension of tensor `key` (its output channels or features).
fn dim0_of(path: &Path, shapes: &Shapes, dict: &str, key: &str) -> Result<usize, InteropError> {
    shape_of(path, shapes, dict, key)?
        .first()
        .copied()
        .ok_or_else(|| {
            InteropError::unsupported(path, format!("{dict}/{key} is a scalar, expected a weight"))
        })
}

fn infer(path: &Path, resnet: &Shapes, head: &Shapes) -> Result<Inferred, InteropError> {
    let stem0 = shape_of(path, resnet, "resnet", "net.0.0.weight")?;
    if stem0.len() != 4 {
        return Err(InteropError::unsupported(
            path,
            format!("net.0.0.weight has rank {}, expected 4", stem0.len()),
        ));
    }
    let in_channels = stem0[1];
    let (stem, stem_width) = if resnet.contains_key("net.0.2.weight") {
        (
            StemKind::Deep,
            dim0_of(path, resnet, "resnet", "net.0.4.weight")?,
        )
    } else {
        match stem0[2] {
            7 => (StemKind::Standard, stem0[0]),
            3 => (StemKind::Cifar, stem0[0]),
            k => {
                return Err(InteropError::unsupported(
                    path,
                    format!("stem conv net.0.0 is {k}x{k}; expected 7x7, 3x3 or a deep stem"),
                ))
            }
        }
    };
    let mut blocks = [0usize; 4];
    for (s, count) in blocks.iter_mut().enumerate() {
        let prefix = format!("net.{}.blocks.", s + 1);
        let n = resnet
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter_map(|rest| rest.split('.').next())
            .filter_map(|b| b.parse::<usize>().ok())
            .map(|b| b + 1)
            .max()
            .unwrap_or(0);
        if n == 0 {
            return Err(InteropError::MissingTensor {
                path: path.to_path_buf(),
                name: format!("resnet/net.{}.blocks.0.*", s + 1),
            });
        }
        *count = n;
    }
    let first = shape_of(path, resnet, "resnet", "net.1.blocks.0.net.0.weight")?;
    let block = match first.get(2) {
        Some(3) => BlockKind::Basic,
        Some(1) => BlockKind::Bottleneck,
        _ => {
            return Err(InteropError::unsupported(
                path,
                format!("net.1.blocks.0.net.0.weight has shape {first:?}; expected a 3x3 (basic) or 1x1 (bottleneck) conv"),
            ))
        }
    };
    let sk = resnet.contains_key("net.1.blocks.0.net.2.main_conv.0.weight");
    let num_classes = resnet.get("fc.weight").and_then(|s| s.first().copied());
    let mut num_proj_layers = 0;
    while head.contains_key(&format!("layers.{}.weight", 3 * num_proj_layers)) {
        num_proj_layers += 1;
    }
    let proj_out_dim = if num_proj_layers > 0 {
        dim0_of(
            path,
            head,
            "head",
            &format!("layers.{}.weight", 3 * (num_proj_layers - 1)),
        )?
    } else {
        0
    };
    Ok(Inferred {
        stem,
        block,
        blocks,
        sk,
        in_channels,
        stem_width,
        num_classes,
        num_proj_layers,
        proj_out_dim,
    })
}

/// The configuration an exported file stores under [`CONFIG_KEY`], which must describe the
/// same tensors as `inferred` (what the name and shapes say); it adds what they cannot say
/// (`ft_proj_selector`, `fine_tune_after_block`, BN decay and epsilon).
fn stored_config(
    path: &Path,
    json: &str,
    inferred: &ModelConfig,
) -> Result<ModelConfig, InteropError> {
    let stored: ModelConfig = serde_json::from_str(json).map_err(|e| {
        InteropError::corrupt(
            path,
            format!("`{CONFIG_KEY}` is not a model configuration: {e}"),
        )
    })?;
    let shapes = |c: &ModelConfig| parameter_shapes(c).ok();
    if stored.name() != inferred.name()
        || stored.cifar_stem != inferred.cifar_stem
        || shapes(&stored).is_none()
        || shapes(&stored) != shapes(inferred)
    {
        return Err(InteropError::unsupported(
            path,
            format!(
                "the configuration stored under `{CONFIG_KEY}` ({}, base width {}) does not describe the tensors ({}, base width {})",
                stored.name(),
                stored.base_width,
                inferred.name(),
                inferred.base_width
            ),
        ));
    }
    Ok(stored)
}

const BN_LEAVES: [(&str, &str); 4] = [
    ("weight", "gamma"),
    ("bias", "beta"),
    ("running_mean", "moving_mean"),
    ("running_var", "moving_variance"),
];

/// `(dict, converter key, our name)` for every tensor of `config`; the last head BN's `bias`
/// maps to `None` (it must be zero).
pub(crate) fn key_map(config: &ModelConfig) -> Vec<(&'static str, String, Option<String>)> {
    let mut m = Vec::new();
    let conv = |m: &mut Vec<_>, src: String, dst: String| {
        m.push((
            "resnet",
            format!("{src}.weight"),
            Some(format!("{dst}.weight")),
        ));
    };
    let bn = |m: &mut Vec<(&'static str, String, Option<String>)>,
              dict: &'static str,
              src: String,
              dst: String,
              center: bool| {
        for (s, d) in BN_LEAVES {
            let ours = if d == "beta" && !center {
                None
            } else {
                Some(format!("{dst}.{d}"))
            };
            m.push((dict, format!("{src}.{s}"), ours));
        }
    };
    match config.stem_kind() {
        StemKind::Standard | StemKind::Cifar => {
            conv(&mut m, "net.0.0".into(), "resnet.stem.conv0".into());
            bn(
                &mut m,
                "resnet",
                "net.0.1.0".into(),
                "resnet.stem.bn0".into(),
                true,
            );
        }
        StemKind::Deep => {
            for i in 0..3 {
                conv(
                    &mut m,
                    format!("net.0.{}", 2 * i),
                    format!("resnet.stem.conv{i}"),
                );
                bn(
                    &mut m,
                    "resnet",
                    format!("net.0.{}.0", 2 * i + 1),
                    format!("resnet.stem.bn{i}"),
                    true,
                );
            }
        }
    }
    for (s, &n) in config.blocks_per_stage().iter().enumerate() {
        for b in 0..n {
            let p = format!("net.{}.blocks.{b}.", s + 1);
            let q = format!("resnet.block_group{}.block{b}.", s + 1);
            if b == 0 {
                let sc = if config.sk_enabled() {
                    "projection.shortcut.2"
                } else {
                    "projection.shortcut"
                };
                conv(&mut m, format!("{p}{sc}"), format!("{q}shortcut_conv"));
                bn(
                    &mut m,
                    "resnet",
                    format!("{p}projection.bn.0"),
                    format!("{q}shortcut_bn"),
                    true,
                );
            }
            let layers: Vec<(&str, &str, bool)> = match (config.block_kind(), config.sk_enabled()) {
                (BlockKind::Basic, _) => vec![
                    ("net.0", "conv1", false),
                    ("net.1.0", "bn1", true),
                    ("net.2", "conv2", false),
                    ("net.3.0", "bn2", true),
                ],
                (BlockKind::Bottleneck, false) => vec![
                    ("net.0", "conv1", false),
                    ("net.1.0", "bn1", true),
                    ("net.2", "conv2", false),
                    ("net.3.0", "bn2", true),
                    ("net.4", "conv3", false),
                    ("net.5.0", "bn3", true),
                ],
                (BlockKind::Bottleneck, true) => vec![
                    ("net.0", "conv1", false),
                    ("net.1.0", "bn1", true),
                    ("net.2.main_conv.0", "sk.conv", false),
                    ("net.2.main_conv.1.0", "sk.bn", true),
                    ("net.2.mixing_conv.0", "sk.mix_reduce", false),
                    ("net.2.mixing_conv.1.0", "sk.mix_bn", true),
                    ("net.2.mixing_conv.2", "sk.mix_expand", false),
                    ("net.3", "conv3", false),
                    ("net.4.0", "bn3", true),
                ],
            };
            for (src, dst, is_bn) in layers {
                if is_bn {
                    bn(
                        &mut m,
                        "resnet",
                        format!("{p}{src}"),
                        format!("{q}{dst}"),
                        true,
                    );
                } else {
                    conv(&mut m, format!("{p}{src}"), format!("{q}{dst}"));
                }
            }
        }
    }
    if config.num_classes.is_some() {
        m.push((
            "resnet",
            "fc.weight".into(),
            Some("head_supervised.weight".into()),
        ));
        m.push((
            "resnet",
            "fc.bias".into(),
            Some("head_supervised.bias".into()),
        ));
    }
    let n = config.num_head_layers();
    for i in 0..n {
        m.push((
            "head",
            format!("layers.{}.weight", 3 * i),
            Some(format!("projection_head.nl_{i}.dense.weight")),
        ));
        bn(
            &mut m,
            "head",
            format!("layers.{}", 3 * i + 1),
            format!("projection_head.nl_{i}.bn"),
            i + 1 < n,
        );
    }
    m
}

fn ignorable(key: &str) -> bool {
    key.ends_with("num_batches_tracked")
}

/// Imports a converter `.pth` file onto `device`.
pub fn import_pth(path: impl AsRef<Path>, device: &Device) -> Result<ImportedModel, InteropError> {
    let path = path.as_ref();
    let file_name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = SourceName::parse(&file_name)?;
    let mut reader = PthReader::open(path)?;
    let dicts = reader.state_dicts()?;
    let get = |key: &str| -> Result<&StateDictInfo, InteropError> {
        dicts.get(key).ok_or_else(|| InteropError::MissingKey {
            path: path.to_path_buf(),
            key: key.to_string(),
        })
    };
    let resnet_info = get("resnet")?;
    let head_info = get("head")?;
    let shapes = |d: &StateDictInfo| -> Shapes {
        d.iter()
            .map(|(k, v)| (k.clone(), v.layout.dims().to_vec()))
            .collect()
    };
    let (resnet_shapes, head_shapes) = (shapes(resnet_info), shapes(head_info));
    let inferred = infer(path, &resnet_shapes, &head_shapes)?;
    let mut config = resolve_config(path, &name, &inferred)?;
    if let Some(json) = reader.texts()?.remove(CONFIG_KEY) {
        config = stored_config(path, &json, &config)?;
    }
    config.validate().map_err(|source| InteropError::Config {
        path: path.to_path_buf(),
        source,
    })?;

    let expected: BTreeMap<String, Vec<usize>> = parameter_shapes(&config)
        .map_err(|source| InteropError::Config {
            path: path.to_path_buf(),
            source,
        })?
        .into_iter()
        .collect();
    let map = key_map(&config);

    // Check names and shapes before reading any data.
    let mut used: BTreeSet<(&str, String)> = BTreeSet::new();
    for (dict, key, ours) in &map {
        let shapes = if *dict == "resnet" {
            &resnet_shapes
        } else {
            &head_shapes
        };
        let found = shapes.get(key).ok_or_else(|| InteropError::MissingTensor {
            path: path.to_path_buf(),
            name: format!("{dict}/{key}"),
        })?;
        if let Some(ours) = ours {
            let want = expected.get(ours).ok_or_else(|| {
                InteropError::unsupported(
                    path,
                    format!("internal: {ours} is not a variable of the inferred model"),
                )
            })?;
            if found != want {
                return Err(InteropError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: format!("{dict}/{key}"),
                    expected: want.clone(),
                    found: found.clone(),
                });
            }
        }
        used.insert((dict, key.clone()));
    }
    for (dict, shapes) in [("resnet", &resnet_shapes), ("head", &head_shapes)] {
        for key in shapes.keys() {
            if !ignorable(key) && !used.contains(&(dict, key.clone())) {
                return Err(InteropError::UnexpectedTensor {
                    path: path.to_path_buf(),
                    name: format!("{dict}/{key}"),
                });
            }
        }
    }
    if map.iter().filter(|(_, _, o)| o.is_some()).count() != expected.len() {
        return Err(InteropError::unsupported(
            path,
            "internal: the key map does not cover the model",
        ));
    }

    let resnet_t = read_float_tensors(&mut reader, resnet_info)?;
    let head_t = read_float_tensors(&mut reader, head_info)?;
    let candle_err = |source: candle_core::Error| InteropError::Candle {
        path: path.to_path_buf(),
        source,
    };
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().map_err(|_| {
            candle_err(candle_core::Error::Msg(
                "variable store lock poisoned".into(),
            ))
        })?;
        for (dict, key, ours) in &map {
            let tensors = if *dict == "resnet" {
                &resnet_t
            } else {
                &head_t
            };
            let t: &Tensor = tensors
                .get(key)
                .ok_or_else(|| InteropError::MissingTensor {
                    path: path.to_path_buf(),
                    name: format!("{dict}/{key}"),
                })?;
            match ours {
                Some(ours) => {
                    let t = t.to_device(device).map_err(candle_err)?;
                    data.insert(ours.clone(), Var::from_tensor(&t).map_err(candle_err)?);
                }
                None => {
                    let max = t
                        .abs()
                        .and_then(|a| a.max_all())
                        .and_then(|m| m.to_scalar::<f32>())
                        .map_err(candle_err)?;
                    if max != 0.0 {
                        return Err(InteropError::unsupported(
                            path,
                            format!("{dict}/{key} (beta of the last head BN, absent in TF) is not zero (max |x| = {max})"),
                        ));
                    }
                }
            }
        }
    }
    let model = SimclrModel::new(
        &config,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )
    .map_err(|source| InteropError::Config {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(ImportedModel {
        config,
        varmap,
        model,
        source: name,
        path: path.to_path_buf(),
        format: SourceFormat::ConverterPth,
        global_step: None,
    })
}
