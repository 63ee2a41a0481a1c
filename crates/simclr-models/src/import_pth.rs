//! Import of the PyTorch files written by the widely used TF1 -> PyTorch converter of the
//! official weights (the TF1 → PyTorch converter, Separius/SimCLRv2-Pytorch): `r{depth}_{w}x_sk{0|1}[_ema].pth`, a dict with a
//! `resnet` state dict (encoder + `fc`, the supervised head) and a `head` state dict (the
//! projection head, `layers.{3i}` dense / `layers.{3i+1}` BN).
//!
//! The architecture comes from the file name and the tensor shapes together. The name gives
//! depth, width multiplier and SK; the shapes give the stem kind, the block kind, the blocks
//! per stage, the stem and stage widths (so reduced base widths load), the input channels,
//! the class count and the projection head. Whatever both tell must agree, otherwise the
//! import fails with [`ImportError::Contradiction`].
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
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::checkpoint::CheckpointMeta;
use crate::config::{BlockKind, ModelConfig, ProjHeadMode, StemKind, SK1_RATIO, SUPPORTED_DEPTHS};
use crate::error::ModelError;
use crate::export::CONFIG_KEY;
use crate::model::SimclrModel;
use crate::params::parameter_shapes;
use crate::pth::{read_float_tensors, PthReader, StateDictInfo};
use crate::tf_bundle::TfBundleError;

/// Why an import failed (of a converter `.pth` file, or of a TF1 checkpoint with
/// [`crate::import_tf`]).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be opened or read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a readable PyTorch file (truncated zip, bad pickle, short storage).
    #[error("{}: not a readable PyTorch file (truncated or corrupt): {reason}", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The file name does not follow `r{depth}_{w}x_sk{0|1}[_ema].pth`.
    #[error("file name `{name}` does not match r{{depth}}_{{w}}x_sk{{0|1}}[_ema].pth: {reason}")]
    FileName {
        /// The file name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A top-level key (`resnet` or `head`) is absent.
    #[error("{}: no `{key}` state dict in the file", .path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("{}: tensor `{name}` is missing", .path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The converter's name (`resnet/...` or `head/...`).
        name: String,
    },
    /// A tensor's shape does not fit the architecture.
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected:?}", .path.display())]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The converter's name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A tensor that the architecture does not have.
    #[error("{}: unexpected tensor `{name}`", .path.display())]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The converter's name.
        name: String,
    },
    /// The file name and the tensor shapes disagree.
    #[error("{}: the file name says {from_name} but the tensors say {from_shapes} ({what})", .path.display())]
    Contradiction {
        /// The file.
        path: PathBuf,
        /// What disagrees (depth, SK, width, ...).
        what: String,
        /// What the name says.
        from_name: String,
        /// What the shapes say.
        from_shapes: String,
    },
    /// The tensors do not form a SimCLRv2 network this crate can build.
    #[error("{}: {reason}", .path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The inferred configuration is invalid.
    #[error("{}: {source}", .path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// The validation error.
        source: ModelError,
    },
    /// A tensor operation failed.
    #[error("{}: {source}", .path.display())]
    Candle {
        /// The file.
        path: PathBuf,
        /// The candle error.
        source: candle_core::Error,
    },
    /// A TF tensor bundle could not be read (truncated or corrupt index or data shard, bad
    /// magic, checksum mismatch, unsupported dtype).
    #[error(transparent)]
    Bundle(#[from] TfBundleError),
    /// The `ema_model/` copy was asked for, but the TF1 checkpoint has none.
    #[error("{}: the checkpoint has no `ema_model/` copy of the weights; import the online weights instead (ema = false)", .path.display())]
    NoEmaCopy {
        /// The index file.
        path: PathBuf,
    },
}

/// What a converter file name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceName {
    /// ResNet depth.
    pub depth: usize,
    /// Width multiplier.
    pub width_multiplier: usize,
    /// `sk1`.
    pub sk: bool,
    /// `_ema` suffix: the `ema_model/` copy of the weights.
    pub ema: bool,
}

impl SourceName {
    /// Parses `r{depth}_{w}x_sk{0|1}[_ema]` with an optional `.pth` extension (a directory part
    /// is ignored).
    pub fn parse(file_name: &str) -> Result<Self, ImportError> {
        let base = Path::new(file_name)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| file_name.to_string());
        let err = |reason: &str| ImportError::FileName {
            name: base.clone(),
            reason: reason.to_string(),
        };
        let stem = base.strip_suffix(".pth").unwrap_or(&base);
        let (stem, ema) = match stem.strip_suffix("_ema") {
            Some(s) => (s, true),
            None => (stem, false),
        };
        let parts: Vec<&str> = stem.split('_').collect();
        if parts.len() != 3 {
            return Err(err("expected three `_`-separated parts"));
        }
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let depth = parts[0]
            .strip_prefix('r')
            .filter(|d| digits(d))
            .and_then(|d| d.parse::<usize>().ok())
            .ok_or_else(|| err("the first part must be r{depth}"))?;
        if !SUPPORTED_DEPTHS.contains(&depth) {
            return Err(err(&format!("unsupported depth {depth}")));
        }
        let width_multiplier = parts[1]
            .strip_suffix('x')
            .filter(|w| digits(w))
            .and_then(|w| w.parse::<usize>().ok())
            .filter(|&w| w > 0)
            .ok_or_else(|| err("the second part must be {w}x with w >= 1"))?;
        let sk = match parts[2] {
            "sk0" => false,
            "sk1" => true,
            _ => return Err(err("the third part must be sk0 or sk1")),
        };
        Ok(Self {
            depth,
            width_multiplier,
            sk,
            ema,
        })
    }

    /// `r{depth}_{w}x_sk{0|1}[_ema]`.
    pub fn to_name(&self) -> String {
        format!(
            "r{}_{}x_sk{}{}",
            self.depth,
            self.width_multiplier,
            u8::from(self.sk),
            if self.ema { "_ema" } else { "" }
        )
    }
}

/// The format an [`ImportedModel`] was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// A `.pth` file of the TF1 -> PyTorch converter ([`import_pth`]).
    ConverterPth,
    /// An official TF1 checkpoint, TF's tensor-bundle format ([`crate::import_tf1`]).
    Tf1Bundle,
}

impl SourceFormat {
    /// The value recorded as `source_format` in checkpoint metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::ConverterPth => "simclrv2-pytorch-converter",
            SourceFormat::Tf1Bundle => "tf1-tensor-bundle",
        }
    }
}

/// The result of an import.
pub struct ImportedModel {
    /// The inferred configuration.
    pub config: ModelConfig,
    /// The variables, in this crate's names (f32, trainable `Var`s).
    pub varmap: VarMap,
    /// The model built on `varmap`.
    pub model: SimclrModel,
    /// What the file name said (for a TF1 checkpoint: its folder name, or what the shapes
    /// say when the folder is not named `r{depth}_{w}x_sk{0|1}`); `ema` tells whether the
    /// EMA copy of the weights was imported.
    pub source: SourceName,
    /// The file imported (the `.index` file of a TF1 checkpoint).
    pub path: PathBuf,
    /// The format it was read from.
    pub format: SourceFormat,
    /// The training step the source records (`global_step` of a TF1 checkpoint).
    pub global_step: Option<u64>,
}

impl ImportedModel {
    /// Checkpoint metadata for the imported weights (stage `import`, step 0, the source
    /// file, format, EMA choice and, when known, the source's `global_step` recorded as extra
    /// fields).
    pub fn checkpoint_meta(&self) -> CheckpointMeta {
        let file = self
            .path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let meta = CheckpointMeta::new(self.config.clone(), "import", 0)
            .with_extra("source_file", file)
            .with_extra("source_format", self.format.as_str())
            .with_extra("source_ema", self.source.ema.to_string());
        match self.global_step {
            Some(step) => meta.with_extra("source_global_step", step.to_string()),
            None => meta,
        }
    }
}

type Shapes = BTreeMap<String, Vec<usize>>;

/// What the tensor shapes say about the architecture (shared with the TF1 importer).
pub(crate) struct Inferred {
    pub(crate) stem: StemKind,
    pub(crate) block: BlockKind,
    pub(crate) blocks: [usize; 4],
    pub(crate) sk: bool,
    pub(crate) in_channels: usize,
    pub(crate) stem_width: usize,
    pub(crate) num_classes: Option<usize>,
    pub(crate) num_proj_layers: usize,
    pub(crate) proj_out_dim: usize,
}

fn unsupported(path: &Path, reason: impl Into<String>) -> ImportError {
    ImportError::Unsupported {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn shape_of<'a>(
    path: &Path,
    shapes: &'a Shapes,
    dict: &str,
    key: &str,
) -> Result<&'a Vec<usize>, ImportError> {
    shapes.get(key).ok_or_else(|| ImportError::MissingTensor {
        path: path.to_path_buf(),
        name: format!("{dict}/{key}"),
    })
}

/// The first dimension of tensor `key` (its output channels or features).
fn dim0_of(path: &Path, shapes: &Shapes, dict: &str, key: &str) -> Result<usize, ImportError> {
    shape_of(path, shapes, dict, key)?
        .first()
        .copied()
        .ok_or_else(|| unsupported(path, format!("{dict}/{key} is a scalar, expected a weight")))
}

fn infer(path: &Path, resnet: &Shapes, head: &Shapes) -> Result<Inferred, ImportError> {
    let stem0 = shape_of(path, resnet, "resnet", "net.0.0.weight")?;
    if stem0.len() != 4 {
        return Err(unsupported(
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
                return Err(unsupported(
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
            return Err(ImportError::MissingTensor {
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
            return Err(unsupported(
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

pub(crate) fn depth_for(block: BlockKind, blocks: [usize; 4]) -> Option<usize> {
    SUPPORTED_DEPTHS.into_iter().find(|&d| {
        let c = ModelConfig {
            resnet_depth: d,
            ..ModelConfig::default()
        };
        c.block_kind() == block && c.blocks_per_stage() == blocks
    })
}

/// Builds the configuration from the name and the shapes, checking that they agree.
pub(crate) fn resolve_config(
    path: &Path,
    name: &SourceName,
    inf: &Inferred,
) -> Result<ModelConfig, ImportError> {
    let contradiction =
        |what: &str, from_name: String, from_shapes: String| ImportError::Contradiction {
            path: path.to_path_buf(),
            what: what.to_string(),
            from_name,
            from_shapes,
        };
    let depth = depth_for(inf.block, inf.blocks).ok_or_else(|| {
        unsupported(
            path,
            format!(
                "{:?} blocks with {:?} per stage is not a known ResNet depth",
                inf.block, inf.blocks
            ),
        )
    })?;
    if depth != name.depth {
        return Err(contradiction(
            "depth",
            format!("ResNet-{}", name.depth),
            format!("ResNet-{depth} ({:?} blocks per stage)", inf.blocks),
        ));
    }
    if name.sk != inf.sk {
        return Err(contradiction(
            "selective kernels",
            format!("sk{}", u8::from(name.sk)),
            format!(
                "sk{} (SK conv tensors {})",
                u8::from(inf.sk),
                if inf.sk { "present" } else { "absent" }
            ),
        ));
    }
    if inf.stem == StemKind::Deep && !name.sk {
        return Err(contradiction(
            "stem",
            "sk0 (standard stem)".into(),
            "a ResNet-D deep stem (SK1 only)".into(),
        ));
    }
    if !inf.stem_width.is_multiple_of(name.width_multiplier) {
        return Err(contradiction(
            "width",
            format!("{}x", name.width_multiplier),
            format!(
                "a stem width of {}, not a multiple of {}",
                inf.stem_width, name.width_multiplier
            ),
        ));
    }
    let base_width = inf.stem_width / name.width_multiplier;
    Ok(ModelConfig {
        resnet_depth: depth,
        width_multiplier: name.width_multiplier,
        sk_ratio: if name.sk { SK1_RATIO } else { 0.0 },
        base_width,
        cifar_stem: inf.stem == StemKind::Cifar,
        in_channels: inf.in_channels,
        proj_head_mode: if inf.num_proj_layers == 0 {
            ProjHeadMode::None
        } else {
            ProjHeadMode::Nonlinear
        },
        num_proj_layers: inf.num_proj_layers.max(1),
        proj_out_dim: if inf.num_proj_layers == 0 {
            128
        } else {
            inf.proj_out_dim
        },
        num_classes: inf.num_classes,
        ft_proj_selector: 0,
        fine_tune_after_block: -1,
        ..ModelConfig::default()
    })
}

/// The configuration an exported file stores under [`CONFIG_KEY`], which must describe the
/// same tensors as `inferred` (what the name and shapes say); it adds what they cannot say
/// (`ft_proj_selector`, `fine_tune_after_block`, BN decay and epsilon).
fn stored_config(
    path: &Path,
    json: &str,
    inferred: &ModelConfig,
) -> Result<ModelConfig, ImportError> {
    let stored: ModelConfig = serde_json::from_str(json).map_err(|e| {
        corrupt_entry(
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
        return Err(unsupported(
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

fn corrupt_entry(path: &Path, reason: String) -> ImportError {
    ImportError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
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
pub fn import_pth(path: impl AsRef<Path>, device: &Device) -> Result<ImportedModel, ImportError> {
    let path = path.as_ref();
    let file_name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = SourceName::parse(&file_name)?;
    let mut reader = PthReader::open(path)?;
    let dicts = reader.state_dicts()?;
    let get = |key: &str| -> Result<&StateDictInfo, ImportError> {
        dicts.get(key).ok_or_else(|| ImportError::MissingKey {
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
    config.validate().map_err(|source| ImportError::Config {
        path: path.to_path_buf(),
        source,
    })?;

    let expected: BTreeMap<String, Vec<usize>> = parameter_shapes(&config)
        .map_err(|source| ImportError::Config {
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
        let found = shapes.get(key).ok_or_else(|| ImportError::MissingTensor {
            path: path.to_path_buf(),
            name: format!("{dict}/{key}"),
        })?;
        if let Some(ours) = ours {
            let want = expected.get(ours).ok_or_else(|| {
                unsupported(
                    path,
                    format!("internal: {ours} is not a variable of the inferred model"),
                )
            })?;
            if found != want {
                return Err(ImportError::ShapeMismatch {
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
                return Err(ImportError::UnexpectedTensor {
                    path: path.to_path_buf(),
                    name: format!("{dict}/{key}"),
                });
            }
        }
    }
    if map.iter().filter(|(_, _, o)| o.is_some()).count() != expected.len() {
        return Err(unsupported(
            path,
            "internal: the key map does not cover the model",
        ));
    }

    let resnet_t = read_float_tensors(&mut reader, resnet_info)?;
    let head_t = read_float_tensors(&mut reader, head_info)?;
    let candle_err = |source: candle_core::Error| ImportError::Candle {
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
            let t: &Tensor = tensors.get(key).ok_or_else(|| ImportError::MissingTensor {
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
                        return Err(unsupported(
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
    .map_err(|source| ImportError::Config {
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
