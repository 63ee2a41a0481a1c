//! Self-describing checkpoints: safetensors files whose `__metadata__` holds the model config.
//!
//! Metadata fields (all strings, as safetensors requires):
//!
//! | key | value |
//! |---|---|
//! | `format` | [`FORMAT`] |
//! | `config` | the [`ModelConfig`] as JSON |
//! | `stage` | what produced the weights (`pretrain`, `finetune`, `import`, ...) |
//! | `step` | global step (decimal) |
//! | `producer` | crate name and version that wrote the file |
//! | `digest` | `sha256:<hex>` of every tensor (name, dtype, shape, bytes) and every other field |
//! | anything else | free-form extra fields, kept as they are |
//!
//! The tensors are exactly the variables of the configured model (this crate's names, f32).
//! [`load`] rebuilds the model from the file alone; a file whose tensors do not match the
//! config (missing, unexpected, wrong shape) is rejected with the tensor's name. [`save`]
//! writes to a temporary file in the destination directory, syncs it and renames it over the
//! destination, so a crash never leaves a half-written checkpoint under the final name.
//!
//! The digest makes a checkpoint that was damaged after it was written (a flipped bit on disk,
//! a file patched by hand) fail to load with [`CheckpointError::DigestMismatch`] instead of
//! training or evaluating on silently wrong weights; the trainer's resume then falls back to an
//! older checkpoint of the same run. Files without the field (written before it existed, or by
//! other tools) still load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use safetensors::{SafeTensors, View};
use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::model::SimclrModel;
use crate::params::parameter_shapes;

/// Value of the `format` metadata field.
pub const FORMAT: &str = "simclr-rs/checkpoint/v1";

const KEY_FORMAT: &str = "format";
const KEY_CONFIG: &str = "config";
const KEY_STAGE: &str = "stage";
const KEY_STEP: &str = "step";
const KEY_PRODUCER: &str = "producer";
const KEY_DIGEST: &str = "digest";
const RESERVED: [&str; 6] = [
    KEY_FORMAT,
    KEY_CONFIG,
    KEY_STAGE,
    KEY_STEP,
    KEY_PRODUCER,
    KEY_DIGEST,
];

/// Extra metadata field holding the class names of a supervised head, as a JSON list in
/// label order (written by the stages that train one; absent in older files and imports).
pub const CLASS_NAMES: &str = "class_names";

/// Names of training-state tensors (optimizer slots, queues) stored beside the model's.
pub const STATE_PREFIX: &str = "train_state/";

/// A crash-test hook: when the environment variable `SIMCLR_CRASH_AT` equals `point`, the
/// process kills itself with SIGKILL on the spot (no destructor, no flush, as a power cut or
/// the OOM killer would). The crash tests (`xtask/tests/crash.rs`) name the points: a stage's
/// step (`pretrain:step:2`), a checkpoint write after its temporary file is complete and before
/// the rename (`finetune:checkpoint:3`), and the end of a pipeline stage
/// (`pipeline:after:distill`). Unset, it costs one cached lookup.
pub fn crash_point(point: impl FnOnce() -> String) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let Some(at) = AT.get_or_init(|| std::env::var("SIMCLR_CRASH_AT").ok()) else {
        return;
    };
    if *at == point() {
        #[cfg(unix)]
        // SAFETY: signalling our own process; nothing is borrowed across the call.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}

/// Whether the loaders accept tensors holding NaN or infinity; see [`set_allow_non_finite`].
static ALLOW_NON_FINITE: AtomicBool = AtomicBool::new(false);

/// Lets [`load`] and [`load_tensors`] accept checkpoints whose tensors hold NaN or infinity
/// (for inspecting a diverged run; `--allow-non-finite` on the command line). Off by default:
/// such a network only ever produces NaN, and a stage that started from it would say nothing.
pub fn set_allow_non_finite(allow: bool) {
    ALLOW_NON_FINITE.store(allow, Ordering::Relaxed);
}

/// The name of the first of `tensors` (in the order given) that holds a NaN or an infinity.
/// Integer tensors are skipped.
pub fn first_non_finite<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> candle_core::Result<Option<String>> {
    for (name, t) in tensors {
        if !t.dtype().is_float() {
            continue;
        }
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Ok(Some(name.to_string()));
        }
    }
    Ok(None)
}

/// [`first_non_finite`] over a name -> tensor map, in name order, as a load error.
fn refuse_non_finite(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), CheckpointError> {
    if ALLOW_NON_FINITE.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut sorted: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    sorted.sort_by_key(|(k, _)| *k);
    match first_non_finite(sorted).map_err(candle_err(path))? {
        Some(name) => Err(CheckpointError::NonFinite {
            path: path.to_path_buf(),
            name,
        }),
        None => Ok(()),
    }
}

/// `"simclr-models <version>"`, the default `producer`.
pub fn producer() -> String {
    format!("{} {}", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
}

/// The metadata of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointMeta {
    /// Architecture of the stored model.
    pub config: ModelConfig,
    /// Which stage wrote it (`pretrain`, `finetune`, `distill`, `import`, ...).
    pub stage: String,
    /// Global step.
    pub step: u64,
    /// What wrote it (crate name and version).
    pub producer: String,
    /// Extra string fields (must not use the reserved keys).
    pub extra: BTreeMap<String, String>,
}

impl CheckpointMeta {
    /// Metadata with this crate as producer and no extra field.
    pub fn new(config: ModelConfig, stage: impl Into<String>, step: u64) -> Self {
        Self {
            config,
            stage: stage.into(),
            step,
            producer: producer(),
            extra: BTreeMap::new(),
        }
    }

    /// Adds an extra field.
    pub fn with_extra(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }
}

/// A loaded checkpoint: its metadata, the variables and the model built on them.
pub struct Checkpoint {
    /// The metadata.
    pub meta: CheckpointMeta,
    /// Every variable, as trainable `Var`s (f32).
    pub varmap: VarMap,
    /// The model, sharing its variables with `varmap`.
    pub model: SimclrModel,
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened, written or renamed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a readable safetensors file (truncated, corrupt header, bad offsets).
    #[error("{}: not a readable safetensors file (truncated or corrupt): {reason}", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A required metadata field is absent (e.g. a plain safetensors file).
    #[error("{}: metadata field `{key}` is missing (not a simclr-rs checkpoint?)", .path.display())]
    MissingMetadata {
        /// The file.
        path: PathBuf,
        /// The missing field.
        key: String,
    },
    /// A metadata field has a value that cannot be used.
    #[error("{}: metadata field `{key}` is invalid: {reason}", .path.display())]
    InvalidMetadata {
        /// The file.
        path: PathBuf,
        /// The field.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A variable of the configured model is not in the file (or not in the `VarMap` to save).
    #[error("{}: tensor `{name}` is missing", .path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The variable name.
        name: String,
    },
    /// A tensor has another shape than the config implies.
    #[error("{}: tensor `{name}` has shape {found:?} but the config expects {expected:?} (another architecture?)", .path.display())]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The variable name.
        name: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A tensor that the configured model does not have.
    #[error("{}: tensor `{name}` is not a variable of the configured model (another architecture?)", .path.display())]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor is not of a floating-point type.
    #[error("{}: tensor `{name}` has dtype {dtype}, expected a floating-point type", .path.display())]
    InvalidDtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// A tensor holds NaN or infinite values (the run that wrote it diverged).
    #[error("{}: tensor `{name}` holds NaN or infinite values (written by a diverged run?); pass --allow-non-finite to load it anyway", .path.display())]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// The first such tensor, in name order.
        name: String,
    },
    /// The tensors or metadata are not what was written: the stored digest does not match.
    #[error("{}: contents do not match the stored digest (damaged after it was written?)", .path.display())]
    DigestMismatch {
        /// The file.
        path: PathBuf,
    },
    /// The stored config is not valid.
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
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn candle_err(path: &Path) -> impl FnOnce(candle_core::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Candle {
        path: path.to_path_buf(),
        source,
    }
}

/// Validates the stored `config` and checks that the file's tensors are exactly its variables,
/// from the header alone (nothing is allocated).
fn validate_layout(
    path: &Path,
    config: &ModelConfig,
    st: &SafeTensors,
) -> Result<Vec<(String, Vec<usize>)>, CheckpointError> {
    config
        .validate()
        .map_err(|source| CheckpointError::Config {
            path: path.to_path_buf(),
            source,
        })?;
    let shapes: HashMap<String, Vec<usize>> = st
        .iter()
        .map(|(name, view)| (name.to_string(), view.shape().to_vec()))
        .collect();
    check_layout(path, config, &shapes)
}

/// Checks that `tensors` (name -> shape) are exactly the variables of `config`.
fn check_layout(
    path: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Vec<usize>>,
) -> Result<Vec<(String, Vec<usize>)>, CheckpointError> {
    let expected = parameter_shapes(config).map_err(|source| CheckpointError::Config {
        path: path.to_path_buf(),
        source,
    })?;
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => {
                return Err(CheckpointError::MissingTensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                })
            }
            Some(found) if found != shape => {
                return Err(CheckpointError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: shape.clone(),
                    found: found.clone(),
                })
            }
            Some(_) => {}
        }
    }
    let known: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|n| !known.contains(n.as_str()) && !n.starts_with(STATE_PREFIX))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(CheckpointError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: (*name).clone(),
        });
    }
    Ok(expected)
}

/// Writes `varmap` (which must hold exactly the variables of `meta.config`) with `meta` to
/// `path`, atomically (temporary file in the same directory, fsync, rename).
pub fn save(
    path: impl AsRef<Path>,
    varmap: &VarMap,
    meta: &CheckpointMeta,
) -> Result<(), CheckpointError> {
    save_with_state(path, varmap, meta, &[])
}

/// [`save`] plus training state (optimizer slots, a memory queue, …): tensors whose names start
/// with [`STATE_PREFIX`]. Model loaders skip them, so a training checkpoint is also a model
/// checkpoint; [`load_tensors`] returns them.
pub fn save_with_state(
    path: impl AsRef<Path>,
    varmap: &VarMap,
    meta: &CheckpointMeta,
    state: &[(String, Tensor)],
) -> Result<(), CheckpointError> {
    let path = path.as_ref();
    if let Some((name, _)) = state.iter().find(|(n, _)| !n.starts_with(STATE_PREFIX)) {
        return Err(CheckpointError::InvalidMetadata {
            path: path.to_path_buf(),
            key: name.clone(),
            reason: format!("training-state tensors must be named {STATE_PREFIX}…"),
        });
    }
    for key in meta.extra.keys() {
        if RESERVED.contains(&key.as_str()) {
            return Err(CheckpointError::InvalidMetadata {
                path: path.to_path_buf(),
                key: key.clone(),
                reason: "reserved key used as an extra field".into(),
            });
        }
    }
    let tensors: Vec<(String, Tensor)> = {
        let data = varmap.data().lock().map_err(|_| CheckpointError::Candle {
            path: path.to_path_buf(),
            source: candle_core::Error::Msg("variable store lock poisoned".into()),
        })?;
        let mut v: Vec<(String, Tensor)> = data
            .iter()
            .map(|(k, var)| (k.clone(), var.as_tensor().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let model_shapes: HashMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    check_layout(path, &meta.config, &model_shapes)?;
    let tensors: Vec<(String, Tensor)> = tensors
        .into_iter()
        .chain(state.iter().map(|(k, t)| (k.clone(), t.clone())))
        .collect();

    let config_json =
        serde_json::to_string(&meta.config).map_err(|e| CheckpointError::InvalidMetadata {
            path: path.to_path_buf(),
            key: KEY_CONFIG.into(),
            reason: e.to_string(),
        })?;
    let mut md: HashMap<String, String> = meta.extra.clone().into_iter().collect();
    md.insert(KEY_FORMAT.into(), FORMAT.into());
    md.insert(KEY_CONFIG.into(), config_json);
    md.insert(KEY_STAGE.into(), meta.stage.clone());
    md.insert(KEY_STEP.into(), meta.step.to_string());
    md.insert(KEY_PRODUCER.into(), meta.producer.clone());
    // The bytes are taken once (from the device if need be), hashed, then written.
    let owned: Vec<(String, HostTensor)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                HostTensor {
                    dtype: View::dtype(&t),
                    shape: t.dims().to_vec(),
                    bytes: View::data(&t).into_owned(),
                },
            )
        })
        .collect();
    let digest = content_digest(owned.iter().map(|(k, t)| (k.as_str(), t)), &md);
    md.insert(KEY_DIGEST.into(), digest);

    let views = owned.iter().map(|(k, t)| (k.as_str(), t));
    let bytes = safetensors::serialize(views, Some(md)).map_err(|e| CheckpointError::Candle {
        path: path.to_path_buf(),
        source: candle_core::Error::Msg(e.to_string()),
    })?;
    let write = || -> std::io::Result<()> {
        let mut file = simclr_fs::AtomicFile::create(path)?;
        std::io::Write::write_all(file.file(), &bytes)?;
        crash_point(|| format!("{}:checkpoint:{}", meta.stage, meta.step));
        file.commit()
    };
    write().map_err(io_err(path))
}

/// A tensor's bytes on the host, as safetensors stores them (little-endian).
struct HostTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// `sha256:<hex>` over each tensor's name, dtype, shape and bytes (in name order) and every
/// metadata field but the digest (in key order), each length-prefixed so that no two different
/// contents hash the same byte stream.
fn content_digest<'a, V: View + 'a>(
    tensors: impl Iterator<Item = (&'a str, V)>,
    md: &HashMap<String, String>,
) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    let mut tensors: Vec<(&str, V)> = tensors.collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    for (name, view) in &tensors {
        field(name.as_bytes());
        field(format!("{:?}", view.dtype()).as_bytes());
        let shape: Vec<u8> = view
            .shape()
            .iter()
            .flat_map(|&d| (d as u64).to_le_bytes())
            .collect();
        field(&shape);
        field(&view.data());
    }
    let mut keys: Vec<&String> = md.keys().filter(|k| *k != KEY_DIGEST).collect();
    keys.sort();
    for k in keys {
        field(k.as_bytes());
        field(md[k].as_bytes());
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Checks the stored digest, when there is one, against the file's contents.
fn verify_digest(
    path: &Path,
    st: &SafeTensors,
    md: Option<&HashMap<String, String>>,
) -> Result<(), CheckpointError> {
    let Some(md) = md else { return Ok(()) };
    let Some(stored) = md.get(KEY_DIGEST) else {
        return Ok(());
    };
    if content_digest(st.iter(), md) != *stored {
        return Err(CheckpointError::DigestMismatch {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn parse_meta(
    path: &Path,
    md: Option<&HashMap<String, String>>,
) -> Result<CheckpointMeta, CheckpointError> {
    let empty = HashMap::new();
    let md = md.unwrap_or(&empty);
    let get = |key: &str| {
        md.get(key).ok_or_else(|| CheckpointError::MissingMetadata {
            path: path.to_path_buf(),
            key: key.to_string(),
        })
    };
    let invalid = |key: &str, reason: String| CheckpointError::InvalidMetadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    let format = get(KEY_FORMAT)?;
    if format != FORMAT {
        return Err(invalid(
            KEY_FORMAT,
            format!("unknown format {format:?} (expected {FORMAT:?})"),
        ));
    }
    let config: ModelConfig =
        serde_json::from_str(get(KEY_CONFIG)?).map_err(|e| invalid(KEY_CONFIG, e.to_string()))?;
    let stage = get(KEY_STAGE)?.clone();
    let step = get(KEY_STEP)?
        .parse::<u64>()
        .map_err(|e| invalid(KEY_STEP, e.to_string()))?;
    let producer = get(KEY_PRODUCER)?.clone();
    let extra = md
        .iter()
        .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(CheckpointMeta {
        config,
        stage,
        step,
        producer,
        extra,
    })
}

fn map_file(path: &Path) -> Result<memmap2::Mmap, CheckpointError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: the map is only read while this function's caller holds it; a checkpoint being
    // rewritten concurrently is replaced by rename (never truncated in place) by `save`.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))
}

type Parsed<'a> = (SafeTensors<'a>, Option<HashMap<String, String>>);

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<Parsed<'a>, CheckpointError> {
    let corrupt = |e: safetensors::SafeTensorError| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(corrupt)?;
    let st = SafeTensors::deserialize(bytes).map_err(corrupt)?;
    Ok((st, header.metadata().clone()))
}

/// Reads only the metadata of a checkpoint.
pub fn read_meta(path: impl AsRef<Path>) -> Result<CheckpointMeta, CheckpointError> {
    let path = path.as_ref();
    let map = map_file(path)?;
    let (_, md) = parse(path, &map)?;
    parse_meta(path, md.as_ref())
}

/// Every tensor of a checkpoint (model variables and training state) on `device`, in its stored
/// dtype, with the metadata.
pub fn load_tensors(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<(CheckpointMeta, HashMap<String, Tensor>), CheckpointError> {
    let path = path.as_ref();
    let map = map_file(path)?;
    let (st, md) = parse(path, &map)?;
    let meta = parse_meta(path, md.as_ref())?;
    // The stored configuration must describe the stored tensors before anything is built from
    // it: a config edited to claim another width would otherwise size the caller's model.
    validate_layout(path, &meta.config, &st)?;
    verify_digest(path, &st, md.as_ref())?;
    let mut out = HashMap::new();
    for (name, view) in st.iter() {
        let t = view.load(device).map_err(candle_err(path))?;
        out.insert(name.to_string(), t);
    }
    refuse_non_finite(path, &out)?;
    Ok((meta, out))
}

/// Loads a checkpoint and rebuilds its model on `device` with no other input.
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Checkpoint, CheckpointError> {
    let path = path.as_ref();
    let map = map_file(path)?;
    let (st, md) = parse(path, &map)?;
    let meta = parse_meta(path, md.as_ref())?;
    let expected = validate_layout(path, &meta.config, &st)?;
    verify_digest(path, &st, md.as_ref())?;

    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().map_err(|_| CheckpointError::Candle {
            path: path.to_path_buf(),
            source: candle_core::Error::Msg("variable store lock poisoned".into()),
        })?;
        for (name, _) in &expected {
            let view = st
                .tensor(name)
                .map_err(|_| CheckpointError::MissingTensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                })?;
            use safetensors::Dtype as D;
            if !matches!(view.dtype(), D::F16 | D::BF16 | D::F32 | D::F64) {
                return Err(CheckpointError::InvalidDtype {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let t = view
                .load(device)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(candle_err(path))?;
            let var = Var::from_tensor(&t).map_err(candle_err(path))?;
            data.insert(name.clone(), var);
        }
    }
    {
        let data = varmap.data().lock().map_err(|_| CheckpointError::Candle {
            path: path.to_path_buf(),
            source: candle_core::Error::Msg("variable store lock poisoned".into()),
        })?;
        let tensors: HashMap<String, Tensor> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        refuse_non_finite(path, &tensors)?;
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = SimclrModel::new(&meta.config, vb).map_err(|source| CheckpointError::Config {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Checkpoint {
        meta,
        varmap,
        model,
    })
}

/// Sets the variables of `varmap` from `tensors` (by name, moved to each variable's device and
/// dtype), except those `skip` selects. A variable without a tensor of its name and shape is an
/// error naming it. Returns how many were set.
pub fn assign_variables(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    skip: impl Fn(&str) -> bool,
) -> candle_core::Result<usize> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("variable store lock poisoned".into()))?;
    let mut set = 0;
    for (name, var) in data.iter().filter(|(n, _)| !skip(n)) {
        let t = tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("tensor `{name}` is missing")))?;
        if t.dims() != var.dims() {
            candle_core::bail!(
                "tensor `{name}` has shape {:?}, the model expects {:?}",
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        set += 1;
    }
    Ok(set)
}
