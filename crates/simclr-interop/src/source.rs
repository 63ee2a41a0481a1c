//! What every importer shares: the converter's file-name convention ([`SourceName`]), what
//! the tensor shapes say about the architecture (`Inferred`) and the one place where the two
//! are checked against each other and turned into a [`ModelConfig`] (`resolve_config`), and
//! the imported model ([`ImportedModel`]). The `.pth` and TF1 importers each read their own
//! format into an `Inferred` and call `resolve_config`.

use std::path::{Path, PathBuf};

use candle_nn::VarMap;
use simclr_models::{
    BlockKind, CheckpointMeta, ModelConfig, ProjHeadMode, SimclrModel, Stage, StemKind,
};
use simclr_models::{SK1_RATIO, SUPPORTED_DEPTHS};

use crate::error::InteropError;

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
    pub fn parse(file_name: &str) -> Result<Self, InteropError> {
        let base = Path::new(file_name)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| file_name.to_string());
        let err = |reason: &str| InteropError::FileName {
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
    /// A `.pth` file of the TF1 -> PyTorch converter ([`crate::import_pth()`]).
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
        let meta = CheckpointMeta::new(self.config.clone(), Stage::Import, 0)
            .with_extra("source_file", file)
            .with_extra("source_format", self.format.as_str())
            .with_extra("source_ema", self.source.ema.to_string());
        match self.global_step {
            Some(step) => meta.with_extra("source_global_step", step.to_string()),
            None => meta,
        }
    }
}

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
) -> Result<ModelConfig, InteropError> {
    let contradiction =
        |what: &str, from_name: String, from_shapes: String| InteropError::Contradiction {
            path: path.to_path_buf(),
            what: what.to_string(),
            from_name,
            from_shapes,
        };
    let depth = depth_for(inf.block, inf.blocks).ok_or_else(|| {
        InteropError::unsupported(
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
