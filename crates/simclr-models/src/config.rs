//! The model configuration: the official flag names, their defaults, validation and the
//! quantities derived from them (stage widths, block counts, SK mid width, feature width).

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// `min_dim` of the selective-kernel mixing layer (the official tf2/resnet.py, `SK_Conv2D`): the hidden width of the
/// SK attention is `max(int(f * sk_ratio), SK_MIN_DIM)`.
pub const SK_MIN_DIM: usize = 32;

/// The `sk_ratio` of the released "SK1" models (the flag help's recommendation).
pub const SK1_RATIO: f64 = 0.0625;

/// Depths of the official ResNet family.
pub const SUPPORTED_DEPTHS: [usize; 6] = [18, 34, 50, 101, 152, 200];

/// `proj_head_mode` of the official code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProjHeadMode {
    /// No projection head: `hiddens_list = [h]` and the head output is the encoder output.
    None,
    /// One dense layer (no bias) + BN without beta, to `proj_out_dim`.
    Linear,
    /// `num_proj_layers` dense+BN layers, ReLU on all but the last.
    #[default]
    Nonlinear,
}

/// Residual block type, fixed by the depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34).
    Basic,
    /// 1x1 -> 3x3 (or SK) -> 1x1 with 4x expansion (ResNet-50 and deeper).
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a block whose filter count is `filters`.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Which stem the network uses (the official tf2/resnet.py, `Resnet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StemKind {
    /// conv 7x7/s2, BN-ReLU, max-pool 3x3/s2 SAME.
    Standard,
    /// ResNet-D deep stem: three 3x3 convs (s2, s1, s1), BN-ReLU after each, max-pool.
    Deep,
    /// conv 3x3/s1, BN-ReLU, no max-pool.
    Cifar,
}

fn default_width_multiplier() -> usize {
    1
}
fn default_base_width() -> usize {
    64
}
fn default_in_channels() -> usize {
    3
}
fn default_num_proj_layers() -> usize {
    3
}
fn default_proj_out_dim() -> usize {
    128
}
fn default_num_classes() -> Option<usize> {
    Some(1000)
}
fn default_fine_tune_after_block() -> i32 {
    -1
}
fn default_batch_norm_decay() -> f64 {
    0.9
}
fn default_batch_norm_epsilon() -> f64 {
    1e-5
}
fn default_resnet_depth() -> usize {
    50
}

/// Architecture of a SimCLRv2 model. Field names follow the official flags; the JSON form of
/// this struct is what checkpoints store in their metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// 18, 34, 50, 101, 152 or 200.
    #[serde(default = "default_resnet_depth")]
    pub resnet_depth: usize,
    /// Integer width multiplier `w`: stage widths are `base_width * w * (1, 2, 4, 8)`.
    #[serde(default = "default_width_multiplier")]
    pub width_multiplier: usize,
    /// Selective-kernel ratio; 0 turns SK off. Any value > 0 also switches on the ResNet-D deep
    /// stem and the ResNet-D (avg-pool) projection shortcut ("SK1").
    #[serde(default)]
    pub sk_ratio: f64,
    /// Width of the first stage before the multiplier (64 in every official model). Smaller
    /// values build the same topology at a tiny size for tests.
    #[serde(default = "default_base_width")]
    pub base_width: usize,
    /// CIFAR stem (3x3/s1 conv, no max-pool); the official code chooses it when
    /// `image_size <= 32`, and it takes precedence over the SK deep stem.
    #[serde(default)]
    pub cifar_stem: bool,
    /// Input channels (3 for RGB).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Projection head kind.
    #[serde(default)]
    pub proj_head_mode: ProjHeadMode,
    /// Number of dense layers of the nonlinear projection head.
    #[serde(default = "default_num_proj_layers")]
    pub num_proj_layers: usize,
    /// Output width of the projection head.
    #[serde(default = "default_proj_out_dim")]
    pub proj_out_dim: usize,
    /// Classes of the supervised head (`head_supervised`); `None` builds no supervised head.
    #[serde(default = "default_num_classes")]
    pub num_classes: Option<usize>,
    /// Which `hiddens_list` entry feeds the supervised head; negative values count from the
    /// end as in Python (-1 = the projection head output).
    #[serde(default)]
    pub ft_proj_selector: i32,
    /// -1 trains everything; k >= 0 freezes the stem and block groups 1..=k (BN in inference
    /// mode, no gradient). 4 freezes the whole encoder.
    #[serde(default = "default_fine_tune_after_block")]
    pub fine_tune_after_block: i32,
    /// BN moving-average decay (Keras `momentum`): `moving = decay*moving + (1-decay)*batch`.
    #[serde(default = "default_batch_norm_decay")]
    pub batch_norm_decay: f64,
    /// BN epsilon.
    #[serde(default = "default_batch_norm_epsilon")]
    pub batch_norm_epsilon: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            resnet_depth: default_resnet_depth(),
            width_multiplier: default_width_multiplier(),
            sk_ratio: 0.0,
            base_width: default_base_width(),
            cifar_stem: false,
            in_channels: default_in_channels(),
            proj_head_mode: ProjHeadMode::default(),
            num_proj_layers: default_num_proj_layers(),
            proj_out_dim: default_proj_out_dim(),
            num_classes: default_num_classes(),
            ft_proj_selector: 0,
            fine_tune_after_block: default_fine_tune_after_block(),
            batch_norm_decay: default_batch_norm_decay(),
            batch_norm_epsilon: default_batch_norm_epsilon(),
        }
    }
}

impl ModelConfig {
    /// A released configuration `r{depth}_{width}x_sk{0|1}` with the official defaults.
    pub fn released(depth: usize, width_multiplier: usize, sk: bool) -> Self {
        Self {
            resnet_depth: depth,
            width_multiplier,
            sk_ratio: if sk { SK1_RATIO } else { 0.0 },
            ..Self::default()
        }
    }

    /// Sets `cifar_stem` the way the official code does: `image_size <= 32`.
    pub fn with_image_size(mut self, image_size: usize) -> Self {
        self.cifar_stem = image_size <= 32;
        self
    }

    /// Checks every field; the model constructors call this.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad =
            |field: &'static str, reason: String| Err(ModelError::InvalidConfig { field, reason });
        if !SUPPORTED_DEPTHS.contains(&self.resnet_depth) {
            return Err(ModelError::UnsupportedDepth(self.resnet_depth));
        }
        if self.width_multiplier == 0 {
            return bad("width_multiplier", "must be at least 1".into());
        }
        if self.base_width == 0 {
            return bad("base_width", "must be at least 1".into());
        }
        if !self.sk_ratio.is_finite() || self.sk_ratio < 0.0 {
            return bad(
                "sk_ratio",
                format!("must be a finite number >= 0, got {}", self.sk_ratio),
            );
        }
        if self.stem_kind() == StemKind::Deep && !self.stem_width().is_multiple_of(2) {
            return bad(
                "base_width",
                format!(
                    "the ResNet-D deep stem needs an even base_width * width_multiplier, got {}",
                    self.stem_width()
                ),
            );
        }
        if self.in_channels == 0 {
            return bad("in_channels", "must be at least 1".into());
        }
        if self.proj_head_mode != ProjHeadMode::None && self.proj_out_dim == 0 {
            return bad("proj_out_dim", "must be at least 1".into());
        }
        if self.proj_head_mode == ProjHeadMode::Nonlinear && self.num_proj_layers == 0 {
            return bad(
                "num_proj_layers",
                "the nonlinear head needs at least one layer".into(),
            );
        }
        if self.num_classes == Some(0) {
            return bad("num_classes", "must be at least 1 (or absent)".into());
        }
        let n = self.num_hiddens() as i64;
        let sel = self.ft_proj_selector as i64;
        if sel >= n || sel < -n {
            return bad(
                "ft_proj_selector",
                format!(
                    "{sel} is out of range for a projection head with {n} hiddens (valid: {} ..= {})",
                    -n,
                    n - 1
                ),
            );
        }
        if !(-1..=4).contains(&self.fine_tune_after_block) {
            return bad(
                "fine_tune_after_block",
                format!("must be in -1..=4, got {}", self.fine_tune_after_block),
            );
        }
        if !(self.batch_norm_decay >= 0.0 && self.batch_norm_decay < 1.0) {
            return bad(
                "batch_norm_decay",
                format!("must be in [0, 1), got {}", self.batch_norm_decay),
            );
        }
        if !(self.batch_norm_epsilon.is_finite() && self.batch_norm_epsilon > 0.0) {
            return bad(
                "batch_norm_epsilon",
                format!("must be > 0, got {}", self.batch_norm_epsilon),
            );
        }
        Ok(())
    }

    /// Whether selective kernels (and with them the ResNet-D stem and shortcut) are on.
    pub fn sk_enabled(&self) -> bool {
        self.sk_ratio > 0.0
    }

    /// Block type for this depth.
    pub fn block_kind(&self) -> BlockKind {
        if self.resnet_depth < 50 {
            BlockKind::Basic
        } else {
            BlockKind::Bottleneck
        }
    }

    /// Blocks per stage (the official tf2/resnet.py). Unsupported depths give an empty list.
    pub fn blocks_per_stage(&self) -> [usize; 4] {
        match self.resnet_depth {
            18 => [2, 2, 2, 2],
            34 | 50 => [3, 4, 6, 3],
            101 => [3, 4, 23, 3],
            152 => [3, 8, 36, 3],
            200 => [3, 24, 36, 3],
            _ => [0; 4],
        }
    }

    /// The stem in use; the CIFAR stem takes precedence over the deep stem.
    pub fn stem_kind(&self) -> StemKind {
        if self.cifar_stem {
            StemKind::Cifar
        } else if self.sk_enabled() {
            StemKind::Deep
        } else {
            StemKind::Standard
        }
    }

    /// Output channels of the stem: `64 * w` at the official base width.
    pub fn stem_width(&self) -> usize {
        self.base_width * self.width_multiplier
    }

    /// Filter count `f` of stage `stage` (0-based): `base_width * w * 2^stage`.
    pub fn stage_filters(&self, stage: usize) -> usize {
        self.base_width * self.width_multiplier * (1 << stage)
    }

    /// Output channels of stage `stage` (0-based).
    pub fn stage_out_channels(&self, stage: usize) -> usize {
        self.stage_filters(stage) * self.block_kind().expansion()
    }

    /// Stride of the first block of stage `stage` (0-based): 1, 2, 2, 2.
    pub fn stage_stride(stage: usize) -> usize {
        if stage == 0 {
            1
        } else {
            2
        }
    }

    /// Width of `final_avg_pool` (`2048 * w` for bottleneck nets at base width 64).
    pub fn feature_dim(&self) -> usize {
        self.stage_out_channels(3)
    }

    /// Hidden width of the SK attention for a block with `filters` filters, computed exactly as
    /// the official code: `max(int(filters * sk_ratio), 32)`.
    pub fn sk_mid_dim(&self, filters: usize) -> usize {
        ((filters as f64 * self.sk_ratio) as usize).max(SK_MIN_DIM)
    }

    /// Number of projection-head layers actually built.
    pub fn num_head_layers(&self) -> usize {
        match self.proj_head_mode {
            ProjHeadMode::None => 0,
            ProjHeadMode::Linear => 1,
            ProjHeadMode::Nonlinear => self.num_proj_layers,
        }
    }

    /// Length of `hiddens_list`: the head input plus one entry per head layer.
    pub fn num_hiddens(&self) -> usize {
        self.num_head_layers() + 1
    }

    /// Width of `hiddens_list[i]` (`i` in `0..num_hiddens()`).
    pub fn hidden_dim(&self, i: usize) -> usize {
        if i == 0 || i < self.num_head_layers() {
            self.feature_dim()
        } else {
            self.proj_out_dim
        }
    }

    /// `ft_proj_selector` resolved to an index into `hiddens_list` (Python semantics for
    /// negative values). Only meaningful on a validated config.
    pub fn supervised_input_index(&self) -> usize {
        let n = self.num_hiddens() as i64;
        let sel = self.ft_proj_selector as i64;
        (if sel < 0 { n + sel } else { sel }) as usize
    }

    /// Width of the supervised head's input.
    pub fn supervised_input_dim(&self) -> usize {
        self.hidden_dim(self.supervised_input_index())
    }

    /// Whether the stem runs frozen (BN in inference mode, output detached).
    pub fn stem_frozen(&self) -> bool {
        self.fine_tune_after_block >= 0
    }

    /// Whether block group `stage` (0-based; `block_group{stage+1}`) runs frozen.
    pub fn stage_frozen(&self, stage: usize) -> bool {
        self.fine_tune_after_block > stage as i32
    }

    /// Official checkpoint-folder style name, `r{depth}_{w}x_sk{0|1}`.
    pub fn name(&self) -> String {
        format!(
            "r{}_{}x_sk{}",
            self.resnet_depth,
            self.width_multiplier,
            u8::from(self.sk_enabled())
        )
    }
}

/// Parses the names [`ModelConfig::name`] writes, plus a base width:
/// `r<depth>[_<w>x][_sk0|_sk1][_w<base width>]` (`r50`, `r50_2x_sk1`, `r18_w16`), the official
/// defaults for whatever the name leaves out. The image size is not part of a name
/// ([`ModelConfig::with_image_size`]).
impl std::str::FromStr for ModelConfig {
    type Err = ModelError;

    fn from_str(name: &str) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::InvalidConfig {
            field: "model",
            reason: format!(
                "{name:?}: {reason} (expected r<depth>[_<w>x][_sk0|_sk1][_w<base width>])"
            ),
        };
        let mut c = ModelConfig::default();
        for (i, part) in name.split('_').enumerate() {
            if i == 0 {
                c.resnet_depth = part
                    .strip_prefix('r')
                    .and_then(|d| d.parse().ok())
                    .ok_or_else(|| bad(format!("bad depth {part:?}")))?;
            } else if let Some(w) = part.strip_suffix('x') {
                c.width_multiplier = w.parse().map_err(|_| bad(format!("bad width {part:?}")))?;
            } else if part == "sk1" {
                c.sk_ratio = SK1_RATIO;
            } else if part == "sk0" {
                c.sk_ratio = 0.0;
            } else if let Some(b) = part.strip_prefix('w') {
                c.base_width = b
                    .parse()
                    .map_err(|_| bad(format!("bad base width {part:?}")))?;
            } else {
                return Err(bad(format!("unknown part {part:?}")));
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_to_the_architecture_they_name() {
        for (depth, width, sk) in [
            (50, 1, false),
            (50, 2, true),
            (101, 3, true),
            (18, 1, false),
        ] {
            let c = ModelConfig {
                resnet_depth: depth,
                width_multiplier: width,
                sk_ratio: if sk { SK1_RATIO } else { 0.0 },
                ..ModelConfig::default()
            };
            let back: ModelConfig = c.name().parse().unwrap();
            assert_eq!(back, c, "{}", c.name());
        }
        let w16: ModelConfig = "r18_w16".parse().unwrap();
        assert_eq!((w16.resnet_depth, w16.base_width), (18, 16));
        for bad in ["x50", "r50_2y", "r50_wide", "r", ""] {
            assert!(bad.parse::<ModelConfig>().is_err(), "{bad}");
        }
    }

    fn err_field(c: &ModelConfig) -> &'static str {
        match c.validate() {
            Err(ModelError::InvalidConfig { field, .. }) => field,
            Err(ModelError::UnsupportedDepth(_)) => "resnet_depth",
            Err(e) => panic!("unexpected error {e}"),
            Ok(()) => "ok",
        }
    }

    #[test]
    fn defaults_are_the_official_flags() {
        let c = ModelConfig::default();
        assert_eq!(c.resnet_depth, 50);
        assert_eq!(c.width_multiplier, 1);
        assert_eq!(c.sk_ratio, 0.0);
        assert_eq!(c.base_width, 64);
        assert_eq!(c.proj_head_mode, ProjHeadMode::Nonlinear);
        assert_eq!(c.num_proj_layers, 3);
        assert_eq!(c.proj_out_dim, 128);
        assert_eq!(c.ft_proj_selector, 0);
        assert_eq!(c.fine_tune_after_block, -1);
        assert_eq!(c.batch_norm_decay, 0.9);
        assert_eq!(c.batch_norm_epsilon, 1e-5);
        assert_eq!(c.validate().ok(), Some(()));
        assert_eq!(c.feature_dim(), 2048);
        assert_eq!(ModelConfig::released(152, 3, true).feature_dim(), 6144);
    }

    #[test]
    fn json_uses_flag_names_and_fills_defaults() {
        let c: ModelConfig =
            serde_json::from_str(r#"{"resnet_depth": 18, "proj_head_mode": "linear"}"#).unwrap();
        assert_eq!(c.resnet_depth, 18);
        assert_eq!(c.proj_head_mode, ProjHeadMode::Linear);
        assert_eq!(c.num_classes, Some(1000));
        let json = serde_json::to_string(&ModelConfig::released(50, 2, true)).unwrap();
        for key in [
            "resnet_depth",
            "width_multiplier",
            "sk_ratio",
            "ft_proj_selector",
            "fine_tune_after_block",
        ] {
            assert!(json.contains(key), "{key} in {json}");
        }
        let back: ModelConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ModelConfig::released(50, 2, true));
        let none: ModelConfig = serde_json::from_str(r#"{"num_classes": null}"#).unwrap();
        assert_eq!(none.num_classes, None);
    }

    #[test]
    fn invalid_values_name_their_field() {
        let ok = ModelConfig::default();
        let cases: Vec<(ModelConfig, &str)> = vec![
            (
                ModelConfig {
                    resnet_depth: 42,
                    ..ok.clone()
                },
                "resnet_depth",
            ),
            (
                ModelConfig {
                    width_multiplier: 0,
                    ..ok.clone()
                },
                "width_multiplier",
            ),
            (
                ModelConfig {
                    base_width: 0,
                    ..ok.clone()
                },
                "base_width",
            ),
            (
                ModelConfig {
                    sk_ratio: -0.1,
                    ..ok.clone()
                },
                "sk_ratio",
            ),
            (
                ModelConfig {
                    sk_ratio: f64::NAN,
                    ..ok.clone()
                },
                "sk_ratio",
            ),
            (
                ModelConfig {
                    sk_ratio: 0.0625,
                    base_width: 3,
                    ..ok.clone()
                },
                "base_width",
            ),
            (
                ModelConfig {
                    in_channels: 0,
                    ..ok.clone()
                },
                "in_channels",
            ),
            (
                ModelConfig {
                    proj_out_dim: 0,
                    ..ok.clone()
                },
                "proj_out_dim",
            ),
            (
                ModelConfig {
                    num_proj_layers: 0,
                    ..ok.clone()
                },
                "num_proj_layers",
            ),
            (
                ModelConfig {
                    num_classes: Some(0),
                    ..ok.clone()
                },
                "num_classes",
            ),
            (
                ModelConfig {
                    ft_proj_selector: 4,
                    ..ok.clone()
                },
                "ft_proj_selector",
            ),
            (
                ModelConfig {
                    ft_proj_selector: -5,
                    ..ok.clone()
                },
                "ft_proj_selector",
            ),
            (
                ModelConfig {
                    fine_tune_after_block: 5,
                    ..ok.clone()
                },
                "fine_tune_after_block",
            ),
            (
                ModelConfig {
                    fine_tune_after_block: -2,
                    ..ok.clone()
                },
                "fine_tune_after_block",
            ),
            (
                ModelConfig {
                    batch_norm_decay: 1.0,
                    ..ok.clone()
                },
                "batch_norm_decay",
            ),
            (
                ModelConfig {
                    batch_norm_epsilon: 0.0,
                    ..ok.clone()
                },
                "batch_norm_epsilon",
            ),
        ];
        for (c, field) in cases {
            assert_eq!(err_field(&c), field, "{c:?}");
        }
        // An odd base width is fine where the deep stem is not used.
        assert_eq!(
            err_field(&ModelConfig {
                base_width: 3,
                ..ok.clone()
            }),
            "ok"
        );
        assert_eq!(
            err_field(&ModelConfig {
                sk_ratio: 0.0625,
                base_width: 3,
                cifar_stem: true,
                ..ok
            }),
            "ok"
        );
    }

    #[test]
    fn derived_quantities() {
        let mut c = ModelConfig::released(50, 1, true);
        assert_eq!(c.block_kind(), BlockKind::Bottleneck);
        assert_eq!(c.stem_kind(), StemKind::Deep);
        assert_eq!(c.blocks_per_stage(), [3, 4, 6, 3]);
        assert_eq!(
            (0..4).map(|s| c.stage_filters(s)).collect::<Vec<_>>(),
            [64, 128, 256, 512]
        );
        // SK mid dims of the official tf2/resnet.py, `SK_Conv2D`.
        let mids = |c: &ModelConfig| {
            (0..4)
                .map(|s| c.sk_mid_dim(c.stage_filters(s)))
                .collect::<Vec<_>>()
        };
        assert_eq!(mids(&c), [32, 32, 32, 32]);
        assert_eq!(mids(&ModelConfig::released(50, 2, true)), [32, 32, 32, 64]);
        assert_eq!(mids(&ModelConfig::released(152, 3, true)), [32, 32, 48, 96]);
        // Tiny base width still uses the official formula (min_dim branch).
        c.base_width = 4;
        assert_eq!(mids(&c), [32, 32, 32, 32]);
        assert_eq!(
            ModelConfig::default().with_image_size(32).stem_kind(),
            StemKind::Cifar
        );
        assert_eq!(
            ModelConfig::released(50, 1, true)
                .with_image_size(32)
                .stem_kind(),
            StemKind::Cifar
        );
        assert_eq!(
            ModelConfig::default().with_image_size(224).stem_kind(),
            StemKind::Standard
        );
        assert_eq!(
            ModelConfig {
                resnet_depth: 18,
                ..ModelConfig::default()
            }
            .feature_dim(),
            512
        );
        assert_eq!(
            ModelConfig::released(200, 1, false).blocks_per_stage(),
            [3, 24, 36, 3]
        );
        assert_eq!(ModelConfig::released(152, 3, true).name(), "r152_3x_sk1");
    }

    #[test]
    fn selector_and_freezing() {
        let mut c = ModelConfig::default();
        assert_eq!((c.num_hiddens(), c.supervised_input_index()), (4, 0));
        c.ft_proj_selector = -1;
        assert_eq!(
            (c.supervised_input_index(), c.supervised_input_dim()),
            (3, 128)
        );
        c.ft_proj_selector = 1;
        assert_eq!(
            (c.supervised_input_index(), c.supervised_input_dim()),
            (1, 2048)
        );
        c.proj_head_mode = ProjHeadMode::None;
        assert_eq!(c.num_hiddens(), 1);
        assert!(c.validate().is_err());
        c.ft_proj_selector = 0;
        c.fine_tune_after_block = 2;
        assert!(c.stem_frozen() && c.stage_frozen(0) && c.stage_frozen(1));
        assert!(!c.stage_frozen(2) && !c.stage_frozen(3));
        c.fine_tune_after_block = -1;
        assert!(!c.stem_frozen() && !c.stage_frozen(0));
        c.fine_tune_after_block = 0;
        assert!(c.stem_frozen() && !c.stage_frozen(0));
    }
}
