//! Import of the official TensorFlow 1 checkpoints (`model.ckpt-N.index` +
//! `model.ckpt-N.data-00000-of-00001`), read with [`crate::tf_bundle`], without TensorFlow.
//!
//! Variable names are those of the official TF1 checkpoints; the mapping follows the TF1 → PyTorch converter:
//!
//! * the online weights are `base_model/…`, `head_contrastive/…` and `head_supervised/…`; the
//!   EMA copy (`ema = true`) is `ema_model/base_model/…` and `ema_model/head_contrastive/…`,
//!   with `ema_model/head_supervised/…` when present and the online `head_supervised`
//!   otherwise (the released checkpoints have no EMA supervised head);
//! * optimizer slots (`…/Momentum`, any `<variable>/<slot>`), `global_step` and the other copy
//!   are skipped;
//! * the encoder maps **by order, not by name**: `base_model/conv2d`, `conv2d_1`, … sorted by
//!   their numeric suffix (bare `conv2d` = 0) go to this crate's conv kernels in creation
//!   order (per block: shortcut, then main path; in an SK unit: main conv, its BN, the mixing
//!   convs), and `batch_normalization[_N]` to its BNs likewise (see
//!   [`simclr_models::parameter_shapes`]);
//! * conv kernels are transposed HWIO -> OIHW, dense kernels `[in, out]` -> `[out, in]`;
//!   BN `gamma, beta, moving_mean, moving_variance` keep their names;
//! * the projection head is `head_contrastive/nl_{i}/dense/kernel` plus
//!   `head_contrastive/nl_{i}/batch_normalization/*` (the last layer has no `beta`), or
//!   `head_contrastive/l_0/…` for `proj_head_mode = linear`; the supervised head is
//!   `head_supervised/linear_layer/dense/{kernel,bias}`.
//!
//! The architecture (depth, block kind, SK, stem kind, widths, input channels, classes,
//! projection head) is read from the variable shapes and counts. When the checkpoint's folder
//! is named like the official ones (`r50_1x_sk0`, `r152_3x_sk1`; a further `_suffix` is
//! allowed), or a name is passed to [`import_tf1_named`], it must agree with the shapes
//! exactly as for [`crate::import_pth()`], and it fixes the width multiplier. Without a name the
//! width multiplier is `stem width / 64` when that divides, else 1 (the base width then being
//! the stem width). As the converter does, the importer checks
//! `#vars == #conv + 4·#bn + 2` (plus the projection head).
//!
//! Every tensor's CRC32C is verified on reading. Errors name the file and the variable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::error::InteropError;
use crate::source::{resolve_config, ImportedModel, Inferred, SourceFormat, SourceName};
use crate::tf_bundle::{TfBundle, TfBundleError, TfDtype};
use simclr_models::parameter_shapes;
use simclr_models::SimclrModel;
use simclr_models::{BlockKind, ModelConfig, ProjHeadMode, StemKind, SUPPORTED_DEPTHS};

/// Prefix of the EMA copy of the weights.
pub const EMA_PREFIX: &str = "ema_model/";

const BN_LEAVES: [&str; 4] = ["gamma", "beta", "moving_mean", "moving_variance"];
const VAR_LEAVES: [&str; 6] = [
    "kernel",
    "bias",
    "gamma",
    "beta",
    "moving_mean",
    "moving_variance",
];

/// Imports a TF1 checkpoint onto `device`: its online weights, or the `ema_model/` copy when
/// `ema` is set.
///
/// `path` is the checkpoint prefix (`…/model.ckpt-250228`), its `.index` (or `.data-*`,
/// `.meta`) file, or the folder holding it (read through its `checkpoint` pointer file). A
/// folder named `r{depth}_{w}x_sk{0|1}[_…]` must agree with the shapes and gives the width
/// multiplier.
pub fn import_tf1(
    path: impl AsRef<Path>,
    ema: bool,
    device: &Device,
) -> Result<ImportedModel, InteropError> {
    let bundle = TfBundle::open(path)?;
    let name = name_from_folder(bundle.prefix());
    import_bundle(&bundle, name, ema, device)
}

/// Like [`import_tf1`], with the architecture name given explicitly instead of taken from the
/// folder; `name.ema` chooses the `ema_model/` copy.
pub fn import_tf1_named(
    path: impl AsRef<Path>,
    name: &SourceName,
    device: &Device,
) -> Result<ImportedModel, InteropError> {
    let bundle = TfBundle::open(path)?;
    import_bundle(&bundle, Some(*name), name.ema, device)
}

/// The architecture name of a checkpoint folder `r{depth}_{w}x_sk{0|1}[_anything]`, if the
/// folder is named that way.
pub fn name_from_folder(prefix: &Path) -> Option<SourceName> {
    let parent = prefix.parent()?;
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let folder = std::fs::canonicalize(parent)
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .or_else(|| parent.file_name().map(|f| f.to_string_lossy().into_owned()))?;
    let parts: Vec<&str> = folder.splitn(4, '_').collect();
    if parts.len() < 3 {
        return None;
    }
    SourceName::parse(&parts[..3].join("_"))
        .ok()
        .map(|n| SourceName { ema: false, ..n })
}

/// How a TF variable is laid out relative to this crate's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// HWIO -> OIHW.
    Conv,
    /// `[in, out]` -> `[out, in]`.
    Dense,
    /// Unchanged.
    Vector,
}

impl Layout {
    /// The TF shape of a variable whose shape here is `ours`.
    fn tf_shape(self, ours: &[usize]) -> Vec<usize> {
        match (self, ours) {
            (Layout::Conv, [o, i, h, w]) => vec![*h, *w, *i, *o],
            (Layout::Dense, [o, i]) => vec![*i, *o],
            _ => ours.to_vec(),
        }
    }
}

/// One selected variable: its full name in the bundle and its TF shape.
#[derive(Debug, Clone)]
struct TfVar {
    full: String,
    shape: Vec<usize>,
    dtype: TfDtype,
}

/// The variables of one copy (online or EMA), by logical name (without `ema_model/`).
struct Selection {
    vars: BTreeMap<String, TfVar>,
    /// Prefix of the copy's encoder and projection head in the bundle.
    prefix: &'static str,
    /// Prefix of the supervised head in the bundle.
    sup_prefix: &'static str,
}

impl Selection {
    /// The full bundle name of a logical name (for error messages about absent variables).
    fn full_name(&self, logical: &str) -> String {
        if logical.starts_with("head_supervised/") {
            format!("{}{logical}", self.sup_prefix)
        } else {
            format!("{}{logical}", self.prefix)
        }
    }

    fn missing(&self, path: &Path, logical: &str) -> InteropError {
        InteropError::MissingTensor {
            path: path.to_path_buf(),
            name: self.full_name(logical),
        }
    }
}

fn is_model_scope(logical: &str) -> bool {
    ["base_model/", "head_contrastive/", "head_supervised/"]
        .iter()
        .any(|s| logical.starts_with(s))
}

/// Whether `logical` is an optimizer slot or another per-variable copy
/// (`<scope>/…/<leaf>/<slot>`, e.g. `…/kernel/Momentum`).
fn is_slot(logical: &str) -> bool {
    if logical.ends_with("/Momentum") {
        return true;
    }
    let mut it = logical.rsplit('/');
    let (last, parent) = (it.next(), it.next());
    matches!((last, parent), (Some(l), Some(p)) if !VAR_LEAVES.contains(&l) && VAR_LEAVES.contains(&p))
}

fn select(bundle: &TfBundle, ema: bool) -> Result<Selection, InteropError> {
    let path = bundle.index_path();
    let entries = bundle.entries();
    let (prefix, sup_prefix) = if ema {
        if !entries.keys().any(|k| k.starts_with(EMA_PREFIX)) {
            return Err(InteropError::NoEmaCopy {
                path: path.to_path_buf(),
            });
        }
        let ema_sup = entries
            .keys()
            .any(|k| k.starts_with("ema_model/head_supervised/") && !is_slot(k));
        (EMA_PREFIX, if ema_sup { EMA_PREFIX } else { "" })
    } else {
        ("", "")
    };
    let mut vars = BTreeMap::new();
    for (full, entry) in entries {
        let logical = if let Some(rest) = full.strip_prefix(EMA_PREFIX) {
            if !ema {
                continue;
            }
            if rest.starts_with("head_supervised/") && sup_prefix.is_empty() {
                continue;
            }
            rest
        } else {
            if ema && !(full.starts_with("head_supervised/") && sup_prefix.is_empty()) {
                continue;
            }
            full.as_str()
        };
        if !is_model_scope(logical) || is_slot(logical) {
            continue;
        }
        vars.insert(
            logical.to_string(),
            TfVar {
                full: full.clone(),
                shape: entry.shape.clone(),
                dtype: entry.dtype,
            },
        );
    }
    if !vars.keys().any(|k| k.starts_with("base_model/")) {
        return Err(InteropError::MissingTensor {
            path: path.to_path_buf(),
            name: format!("{prefix}base_model/conv2d/kernel"),
        });
    }
    Ok(Selection {
        vars,
        prefix,
        sup_prefix,
    })
}

/// `conv2d` -> 0, `conv2d_7` -> 7.
fn numbered(scope: &str, base: &str) -> Option<usize> {
    if scope == base {
        return Some(0);
    }
    let n = scope.strip_prefix(base)?.strip_prefix('_')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.starts_with('0') {
        return None;
    }
    n.parse().ok()
}

/// TF's auto-numbered name: index 0 is the bare name.
fn tf_numbered(base: &str, i: usize) -> String {
    if i == 0 {
        base.to_string()
    } else {
        format!("{base}_{i}")
    }
}

/// The variables of the selection, sorted into their roles.
struct Grouped {
    /// TF shape of `conv2d_N/kernel`, by N.
    convs: BTreeMap<usize, Vec<usize>>,
    /// `batch_normalization_N` leaves, by N.
    bns: BTreeMap<usize, BTreeMap<String, Vec<usize>>>,
    /// `head_contrastive/nl_{i}/dense/kernel` shapes, by i.
    head_kernels: BTreeMap<usize, Vec<usize>>,
    /// `head_contrastive/l_0/dense/kernel` (linear projection head).
    linear_head_kernel: Option<Vec<usize>>,
    /// Number of projection-head variables (kernels and BN leaves).
    head_vars: usize,
    /// `head_supervised/linear_layer/dense/{kernel,bias}`.
    sup_kernel: Option<Vec<usize>>,
    sup_bias: Option<Vec<usize>>,
}

fn group(path: &Path, sel: &Selection) -> Result<Grouped, InteropError> {
    let mut g = Grouped {
        convs: BTreeMap::new(),
        bns: BTreeMap::new(),
        head_kernels: BTreeMap::new(),
        linear_head_kernel: None,
        head_vars: 0,
        sup_kernel: None,
        sup_bias: None,
    };
    for (logical, v) in &sel.vars {
        let parts: Vec<&str> = logical.split('/').collect();
        let unexpected = || InteropError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: v.full.clone(),
        };
        let duplicate = |what: String| InteropError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("two variables claim {what} (`{}`)", v.full),
        };
        match parts.as_slice() {
            ["base_model", scope, "kernel"] => {
                let n = numbered(scope, "conv2d").ok_or_else(unexpected)?;
                if g.convs.insert(n, v.shape.clone()).is_some() {
                    return Err(duplicate(format!("conv number {n}")));
                }
            }
            ["base_model", scope, leaf] if BN_LEAVES.contains(leaf) => {
                let n = numbered(scope, "batch_normalization").ok_or_else(unexpected)?;
                if g.bns
                    .entry(n)
                    .or_default()
                    .insert(leaf.to_string(), v.shape.clone())
                    .is_some()
                {
                    return Err(duplicate(format!("batch norm number {n}")));
                }
            }
            ["head_contrastive", layer, "dense", "kernel"] => {
                if *layer == "l_0" {
                    g.linear_head_kernel = Some(v.shape.clone());
                } else {
                    let i = layer
                        .strip_prefix("nl_")
                        .and_then(|i| i.parse::<usize>().ok())
                        .ok_or_else(unexpected)?;
                    g.head_kernels.insert(i, v.shape.clone());
                }
                g.head_vars += 1;
            }
            ["head_contrastive", _, "batch_normalization", leaf] if BN_LEAVES.contains(leaf) => {
                // Checked against the architecture's own list below.
                g.head_vars += 1;
            }
            ["head_supervised", "linear_layer", "dense", "kernel"] => {
                g.sup_kernel = Some(v.shape.clone())
            }
            ["head_supervised", "linear_layer", "dense", "bias"] => {
                g.sup_bias = Some(v.shape.clone())
            }
            _ => return Err(unexpected()),
        }
    }
    // Gaps in the numbering and incomplete BNs name the absent variable.
    for (i, (&n, _)) in g.convs.iter().enumerate() {
        if n != i {
            return Err(sel.missing(
                path,
                &format!("base_model/{}/kernel", tf_numbered("conv2d", i)),
            ));
        }
    }
    for (i, (&n, leaves)) in g.bns.iter().enumerate() {
        let scope = tf_numbered("batch_normalization", i);
        if n != i {
            return Err(sel.missing(path, &format!("base_model/{scope}/gamma")));
        }
        for leaf in BN_LEAVES {
            if !leaves.contains_key(leaf) {
                return Err(sel.missing(path, &format!("base_model/{scope}/{leaf}")));
            }
        }
    }
    for (i, (&n, _)) in g.head_kernels.iter().enumerate() {
        if n != i {
            return Err(sel.missing(path, &format!("head_contrastive/nl_{i}/dense/kernel")));
        }
    }
    match (&g.sup_kernel, &g.sup_bias) {
        (Some(_), None) => return Err(sel.missing(path, "head_supervised/linear_layer/dense/bias")),
        (None, Some(_)) => {
            return Err(sel.missing(path, "head_supervised/linear_layer/dense/kernel"))
        }
        _ => {}
    }
    // The converter's assertion: #vars == #conv + 4·#bn + 2 (here plus the projection head,
    // and with 0 instead of 2 when there is no supervised head).
    let n_sup = 2 * usize::from(g.sup_kernel.is_some());
    let expected = g.convs.len() + 4 * g.bns.len() + n_sup + g.head_vars;
    if sel.vars.len() != expected {
        return Err(InteropError::Unsupported {
            path: path.to_path_buf(),
            reason: format!(
                "{} variables, but {} convs + 4 x {} batch norms + {n_sup} supervised-head + {} projection-head variables make {expected}",
                sel.vars.len(),
                g.convs.len(),
                g.bns.len(),
                g.head_vars
            ),
        });
    }
    Ok(g)
}

fn rank_error(path: &Path, name: String, shape: &[usize], rank: usize) -> InteropError {
    InteropError::Unsupported {
        path: path.to_path_buf(),
        reason: format!("`{name}` has shape {shape:?}; expected rank {rank}"),
    }
}

/// Reads the architecture off the grouped shapes.
fn infer(path: &Path, sel: &Selection, g: &Grouped) -> Result<(Inferred, bool), InteropError> {
    let conv_name =
        |i: usize| sel.full_name(&format!("base_model/{}/kernel", tf_numbered("conv2d", i)));
    let convs: Vec<&Vec<usize>> = g.convs.values().collect();
    for (i, s) in convs.iter().enumerate() {
        if s.len() != 4 || s[0] != s[1] {
            return Err(InteropError::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "`{}` has shape {s:?}; expected a square HWIO conv kernel",
                    conv_name(i)
                ),
            });
        }
    }
    let (nc, nb) = (convs.len(), g.bns.len());
    let too_few = || InteropError::Unsupported {
        path: path.to_path_buf(),
        reason: format!("{nc} conv kernels and {nb} batch norms are too few for a ResNet"),
    };
    let c0 = convs.first().ok_or_else(too_few)?;
    let in_channels = c0[2];
    let (stem, n_stem, stem_width) = match c0[0] {
        7 => (StemKind::Standard, 1, c0[3]),
        3 if convs.get(1).is_some_and(|c| c[0] == 3) => {
            (StemKind::Deep, 3, convs.get(2).ok_or_else(too_few)?[3])
        }
        3 => (StemKind::Cifar, 1, c0[3]),
        k => {
            return Err(InteropError::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "the stem conv `{}` is {k}x{k}; expected 7x7, 3x3 or a deep stem",
                    conv_name(0)
                ),
            })
        }
    };
    // Block 1 of stage 1: the shortcut conv, then the first main conv.
    let first = convs.get(n_stem + 1).ok_or_else(too_few)?;
    let block = match first[0] {
        3 => BlockKind::Basic,
        1 => BlockKind::Bottleneck,
        k => {
            return Err(InteropError::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "`{}` (the first block's first conv) is {k}x{k}; expected 3x3 (basic) or 1x1 (bottleneck)",
                    conv_name(n_stem + 1)
                ),
            })
        }
    };
    if nc < nb {
        // Every BN follows a conv: the highest-numbered conv is absent.
        return Err(sel.missing(
            path,
            &format!("base_model/{}/kernel", tf_numbered("conv2d", nc)),
        ));
    }
    let fixed = n_stem + 4; // stem convs + one projection shortcut per stage
    let bad_counts = || {
        InteropError::Unsupported {
        path: path.to_path_buf(),
        reason: format!(
            "{nc} conv kernels and {nb} batch norms do not form a {block:?}-block ResNet with a {stem:?} stem (is a variable missing?)"
        ),
    }
    };
    let body = nc.checked_sub(fixed).ok_or_else(bad_counts)?;
    let (sk, total_blocks) = match block {
        BlockKind::Basic => {
            if nc != nb || body % 2 != 0 {
                return Err(bad_counts());
            }
            (stem == StemKind::Deep, body / 2)
        }
        BlockKind::Bottleneck if nc == nb => {
            if body % 3 != 0 {
                return Err(bad_counts());
            }
            (false, body / 3)
        }
        BlockKind::Bottleneck => {
            // SK: conv1, SK conv, mixing reduce, mixing expand (no BN), conv3 per block.
            let b = nc - nb;
            if body != 5 * b {
                return Err(bad_counts());
            }
            (true, b)
        }
    };
    let depth = SUPPORTED_DEPTHS
        .into_iter()
        .find(|&d| {
            let c = ModelConfig {
                resnet_depth: d,
                ..ModelConfig::default()
            };
            c.block_kind() == block && c.blocks_per_stage().iter().sum::<usize>() == total_blocks
        })
        .ok_or_else(|| InteropError::Unsupported {
            path: path.to_path_buf(),
            reason: format!(
                "{total_blocks} {block:?} blocks ({nc} conv kernels, {nb} batch norms) is not a known ResNet depth"
            ),
        })?;
    let blocks = ModelConfig {
        resnet_depth: depth,
        ..ModelConfig::default()
    }
    .blocks_per_stage();
    let num_classes = match &g.sup_kernel {
        Some(s) if s.len() == 2 => Some(s[1]),
        Some(s) => {
            return Err(rank_error(
                path,
                sel.full_name("head_supervised/linear_layer/dense/kernel"),
                s,
                2,
            ))
        }
        None => None,
    };
    let (linear_head, num_proj_layers, last_kernel) = match &g.linear_head_kernel {
        Some(k) if g.head_kernels.is_empty() => (true, 1, Some(("l_0".to_string(), k))),
        Some(_) => {
            return Err(InteropError::Unsupported {
                path: path.to_path_buf(),
                reason: "the projection head has both `l_0` (linear) and `nl_i` layers".into(),
            })
        }
        None => (
            false,
            g.head_kernels.len(),
            g.head_kernels
                .iter()
                .next_back()
                .map(|(i, k)| (format!("nl_{i}"), k)),
        ),
    };
    let proj_out_dim = match last_kernel {
        Some((_, k)) if k.len() == 2 => k[1],
        Some((layer, k)) => {
            return Err(rank_error(
                path,
                sel.full_name(&format!("head_contrastive/{layer}/dense/kernel")),
                k,
                2,
            ))
        }
        None => 0,
    };
    Ok((
        Inferred {
            stem,
            block,
            blocks,
            sk,
            in_channels,
            stem_width,
            num_classes,
            num_proj_layers,
            proj_out_dim,
        },
        linear_head,
    ))
}

/// One variable of this crate (name, shape) with its logical TF name and layout.
type PlanItem = (String, Vec<usize>, String, Layout);

/// Our variable name -> (logical TF name, layout), in creation order.
fn tf_names(path: &Path, shapes: &[(String, Vec<usize>)]) -> Result<Vec<PlanItem>, InteropError> {
    let mut out = Vec::with_capacity(shapes.len());
    let mut n_conv = 0usize;
    let mut bn_index: BTreeMap<String, usize> = BTreeMap::new();
    for (ours, shape) in shapes {
        let (scope, leaf) = ours.rsplit_once('.').unwrap_or(("", ours.as_str()));
        let (tf, layout) = if ours.starts_with("resnet.") {
            if leaf == "weight" {
                let name = format!("base_model/{}/kernel", tf_numbered("conv2d", n_conv));
                n_conv += 1;
                (name, Layout::Conv)
            } else if BN_LEAVES.contains(&leaf) {
                let next = bn_index.len();
                let i = *bn_index.entry(scope.to_string()).or_insert(next);
                (
                    format!(
                        "base_model/{}/{leaf}",
                        tf_numbered("batch_normalization", i)
                    ),
                    Layout::Vector,
                )
            } else {
                return Err(internal(path, ours));
            }
        } else if let Some(rest) = scope.strip_prefix("projection_head.") {
            match rest.split_once('.') {
                Some((layer, "dense")) if leaf == "weight" => (
                    format!("head_contrastive/{layer}/dense/kernel"),
                    Layout::Dense,
                ),
                Some((layer, "bn")) if BN_LEAVES.contains(&leaf) => (
                    format!("head_contrastive/{layer}/batch_normalization/{leaf}"),
                    Layout::Vector,
                ),
                _ => return Err(internal(path, ours)),
            }
        } else if ours == "head_supervised.weight" {
            (
                "head_supervised/linear_layer/dense/kernel".to_string(),
                Layout::Dense,
            )
        } else if ours == "head_supervised.bias" {
            (
                "head_supervised/linear_layer/dense/bias".to_string(),
                Layout::Vector,
            )
        } else {
            return Err(internal(path, ours));
        };
        out.push((ours.clone(), shape.clone(), tf, layout));
    }
    Ok(out)
}

fn internal(path: &Path, ours: &str) -> InteropError {
    InteropError::Unsupported {
        path: path.to_path_buf(),
        reason: format!("internal: no TF1 name for this crate's variable `{ours}`"),
    }
}

fn import_bundle(
    bundle: &TfBundle,
    name: Option<SourceName>,
    ema: bool,
    device: &Device,
) -> Result<ImportedModel, InteropError> {
    let path: PathBuf = bundle.index_path().to_path_buf();
    let sel = select(bundle, ema)?;
    let grouped = group(&path, &sel)?;
    let (inferred, linear_head) = infer(&path, &sel, &grouped)?;
    let name = name.unwrap_or_else(|| {
        let w = if inferred.stem_width % 64 == 0 && inferred.stem_width > 0 {
            inferred.stem_width / 64
        } else {
            1
        };
        // The depth is only a placeholder here: resolve_config computes it from the shapes.
        let depth = crate::source::depth_for(inferred.block, inferred.blocks).unwrap_or(50);
        SourceName {
            depth,
            width_multiplier: w,
            sk: inferred.sk,
            ema,
        }
    });
    let source = SourceName { ema, ..name };
    let mut config = resolve_config(&path, &source, &inferred)?;
    if linear_head {
        config.proj_head_mode = ProjHeadMode::Linear;
    }
    // A supervised head on the projection head's output (`ft_proj_selector = -1`) is the
    // only selector that shows in the shapes.
    if let Some(s) = &grouped.sup_kernel {
        if config.num_head_layers() > 0
            && s[0] == config.proj_out_dim
            && s[0] != config.feature_dim()
        {
            config.ft_proj_selector = -1;
        }
    }
    let config_err = |source| InteropError::Config {
        path: path.clone(),
        source,
    };
    config.validate().map_err(config_err)?;
    let shapes = parameter_shapes(&config).map_err(config_err)?;
    let plan = tf_names(&path, &shapes)?;

    // Names, shapes and dtypes are checked before any data is read.
    let mut used = 0usize;
    let mut reads = Vec::with_capacity(plan.len());
    for (ours, our_shape, logical, layout) in plan {
        let v = sel
            .vars
            .get(&logical)
            .ok_or_else(|| sel.missing(&path, &logical))?;
        let expected = layout.tf_shape(&our_shape);
        if v.shape != expected {
            return Err(InteropError::ShapeMismatch {
                path: path.clone(),
                name: v.full.clone(),
                expected,
                found: v.shape.clone(),
            });
        }
        if v.dtype != TfDtype::FLOAT && v.dtype != TfDtype::DOUBLE {
            return Err(TfBundleError::UnsupportedDtype {
                path: path.clone(),
                name: v.full.clone(),
                dtype: v.dtype,
                expected: "DT_FLOAT or DT_DOUBLE",
            }
            .into());
        }
        used += 1;
        reads.push((ours, v.full.clone(), layout));
    }
    if used != sel.vars.len() {
        let wanted: std::collections::BTreeSet<&str> =
            reads.iter().map(|(_, full, _)| full.as_str()).collect();
        let extra = sel
            .vars
            .values()
            .find(|v| !wanted.contains(v.full.as_str()))
            .map(|v| v.full.clone())
            .unwrap_or_default();
        return Err(InteropError::UnexpectedTensor {
            path: path.clone(),
            name: extra,
        });
    }

    bundle.check_data_files()?;
    let candle_err = |source: candle_core::Error| InteropError::Candle {
        path: path.clone(),
        source,
    };
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().map_err(|_| {
            candle_err(candle_core::Error::Msg(
                "variable store lock poisoned".into(),
            ))
        })?;
        for (ours, full, layout) in reads {
            let (values, shape) = bundle.read_f32(&full)?;
            let t = Tensor::from_vec(values, shape, &Device::Cpu).map_err(candle_err)?;
            let t = match layout {
                Layout::Conv => t.permute((3, 2, 0, 1)).and_then(|t| t.contiguous()),
                Layout::Dense => t.t().and_then(|t| t.contiguous()),
                Layout::Vector => Ok(t),
            }
            .and_then(|t| t.to_device(device))
            .map_err(candle_err)?;
            data.insert(ours, Var::from_tensor(&t).map_err(candle_err)?);
        }
    }
    let global_step = match bundle.entries().get("global_step") {
        Some(e)
            if e.num_elements() == Some(1)
                && (e.dtype == TfDtype::INT64 || e.dtype == TfDtype::INT32) =>
        {
            let (v, _) = bundle.read_i64("global_step")?;
            v.first().and_then(|&s| u64::try_from(s).ok())
        }
        _ => None,
    };
    let model = SimclrModel::new(
        &config,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )
    .map_err(config_err)?;
    Ok(ImportedModel {
        config,
        varmap,
        model,
        source,
        path,
        format: SourceFormat::Tf1Bundle,
        global_step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_follows_tf() {
        assert_eq!(numbered("conv2d", "conv2d"), Some(0));
        assert_eq!(numbered("conv2d_12", "conv2d"), Some(12));
        assert_eq!(numbered("conv2d_", "conv2d"), None);
        assert_eq!(numbered("conv2d_01", "conv2d"), None);
        assert_eq!(numbered("conv2d_x", "conv2d"), None);
        assert_eq!(numbered("conv2dx", "conv2d"), None);
        assert_eq!(tf_numbered("conv2d", 0), "conv2d");
        assert_eq!(
            tf_numbered("batch_normalization", 3),
            "batch_normalization_3"
        );
    }

    #[test]
    fn slots_are_recognised() {
        assert!(is_slot("base_model/conv2d/kernel/Momentum"));
        assert!(is_slot(
            "head_supervised/linear_layer/dense/bias/LARSOptimizer"
        ));
        assert!(!is_slot("base_model/conv2d/kernel"));
        assert!(!is_slot("base_model/batch_normalization_3/moving_mean"));
    }

    #[test]
    fn tf_names_follow_creation_order() {
        let c = ModelConfig {
            resnet_depth: 50,
            base_width: 4,
            sk_ratio: simclr_models::SK1_RATIO,
            num_classes: Some(10),
            ..ModelConfig::default()
        };
        let shapes = parameter_shapes(&c).unwrap();
        let plan = tf_names(Path::new("x"), &shapes).unwrap();
        let find = |ours: &str| {
            plan.iter()
                .find(|p| p.0 == ours)
                .map(|p| p.2.clone())
                .unwrap()
        };
        assert_eq!(find("resnet.stem.conv0.weight"), "base_model/conv2d/kernel");
        assert_eq!(
            find("resnet.stem.conv2.weight"),
            "base_model/conv2d_2/kernel"
        );
        // Stage 1, block 0: shortcut first, then conv1, then the SK unit.
        assert_eq!(
            find("resnet.block_group1.block0.shortcut_conv.weight"),
            "base_model/conv2d_3/kernel"
        );
        assert_eq!(
            find("resnet.block_group1.block0.conv1.weight"),
            "base_model/conv2d_4/kernel"
        );
        assert_eq!(
            find("resnet.block_group1.block0.sk.conv.weight"),
            "base_model/conv2d_5/kernel"
        );
        assert_eq!(
            find("resnet.block_group1.block0.sk.mix_expand.weight"),
            "base_model/conv2d_7/kernel"
        );
        assert_eq!(
            find("resnet.block_group1.block0.sk.mix_bn.gamma"),
            "base_model/batch_normalization_6/gamma"
        );
        assert_eq!(
            find("projection_head.nl_2.bn.moving_variance"),
            "head_contrastive/nl_2/batch_normalization/moving_variance"
        );
        assert_eq!(
            find("head_supervised.weight"),
            "head_supervised/linear_layer/dense/kernel"
        );
    }
}
