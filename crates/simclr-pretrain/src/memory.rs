//! SimCLRv2's optional momentum encoder and memory buffer (described in the SimCLRv2 paper; the
//! official code does not include it).
//!
//! The SimCLRv2 paper adds a MoCo-style memory: a second, moving-average ("momentum") copy of
//! the encoder and projection head produces *keys*, and the keys of past batches are kept in a
//! FIFO queue as extra negatives. The paper sets the buffer to 64K keys and the EMA decay to
//! 0.999 (following MoCo) and reports ≈1% better linear evaluation and 1%-label fine-tuning.
//! The official code never released this part, so what follows is this crate's definition;
//! `docs/pretraining.md` ("Memory buffer") gives the same formula.
//!
//! # The loss
//!
//! Per step, on each replica: queries `q` are the `2n × d` online projections (view-1 rows then
//! view-2 rows, as for NT-Xent); keys `k` are the momentum encoder's projections of the same
//! `2n` images, with no gradient. With `hidden_norm` both are L2-normalised row by row
//! (`x / sqrt(max(Σx², 1e-12))`). Split `q1, q2, k1, k2` (`n × d` each), gather the keys over
//! the `R` replicas: `K1 = all_gather(k1)`, `K2 = all_gather(k2)` (`Rn × d`). Let `M` be the
//! `m × d` queue contents *before* this step's keys are added, `idx_i = i + rank·n`, `mask` the
//! `n × Rn` one-hot of `idx` and `τ` the temperature:
//!
//! ```text
//! logits_a = [ q1·K2ᵀ/τ | q1·K1ᵀ/τ − 1e9·mask | q1·Mᵀ/τ ]      (n × (2Rn + m))
//! logits_b = [ q2·K1ᵀ/τ | q2·K2ᵀ/τ − 1e9·mask | q2·Mᵀ/τ ]
//! loss     = (1/n) Σ_i ( CE(logits_a,i, idx_i) + CE(logits_b,i, idx_i) )
//! ```
//!
//! For a view-1 anchor the positive is the momentum key of view 2 of the same image; the
//! negatives are every other in-batch momentum key of both views (over all replicas) and the
//! whole queue; the momentum key of the anchor's own view of the same image is masked with
//! `−1e9`, as NT-Xent masks the self-similarity. View-2 anchors are symmetric. The temperature
//! and the "2×" normalisation (mean over local images of the sum of both directions) are those
//! of NT-Xent, so with an empty queue and keys equal to the queries the value is the NT-Xent
//! value (the gradient differs: keys carry none). Gradients reach the queries only.
//!
//! After the loss, every replica enqueues the gathered keys `[K1; K2]` (`2Rn` rows, returned in
//! [`MemoryLossOutput::keys`]), so the replicas' queues stay identical and each step adds
//! `2·R·n` keys.
//!
//! # The momentum encoder
//!
//! Initialise it as a copy of the online network ([`copy_variables`]), then after every
//! optimizer step apply [`ema_update`]: `target ← decay·target + (1 − decay)·online` for every
//! variable, matched by name. Batch-norm moving statistics (names ending in `moving_mean`,
//! `moving_variance`, `running_mean` or `running_var`, see [`is_bn_statistic`]) follow a
//! [`BnStatisticsPolicy`]; the default, [`BnStatisticsPolicy::Ema`], averages them like the
//! weights, so the momentum encoder is exactly the moving average of the online network's whole
//! state, independent of whether its own forward passes update its statistics. When keys are
//! computed the momentum encoder normalises with batch statistics (training mode), as MoCo's key
//! encoder does; its moving statistics only matter when it is evaluated or exported.

use std::collections::HashMap;

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::objective::{
    half_rows, l2_normalize, two_way_contrastive, ContrastiveOutput, NtXentConfig,
};
use simclr_collective::Collective;

/// Settings of the momentum encoder and the memory buffer (paper defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryConfig {
    /// Number of keys the queue holds (64K in the paper).
    pub queue_size: usize,
    /// EMA decay of the momentum encoder (0.999 in the paper).
    pub ema_decay: f64,
    /// What the EMA update does with batch-norm moving statistics.
    pub bn_statistics: BnStatisticsPolicy,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            queue_size: 65_536,
            ema_decay: 0.999,
            bn_statistics: BnStatisticsPolicy::Ema,
        }
    }
}

/// How [`ema_update_with`] treats batch-norm moving statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BnStatisticsPolicy {
    /// Average them with the same decay as the weights (the default).
    #[default]
    Ema,
    /// Copy the online network's statistics.
    Copy,
    /// Leave them alone: the momentum encoder's own forward passes maintain them.
    Keep,
}

/// Whether `name` is a batch-norm moving statistic (`…moving_mean`, `…moving_variance`, or
/// candle-nn's `…running_mean`, `…running_var`).
pub fn is_bn_statistic(name: &str) -> bool {
    [
        "moving_mean",
        "moving_variance",
        "running_mean",
        "running_var",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// `(name, target, online)` for every variable, sorted by name; errors unless both maps hold
/// the same names with the same shapes and dtypes.
fn matched_variables(target: &VarMap, online: &VarMap) -> Result<Vec<(String, Var, Var)>> {
    let snapshot = |m: &VarMap, what: &str| -> Result<HashMap<String, Var>> {
        match m.data().lock() {
            Ok(g) => Ok(g.clone()),
            Err(_) => bail!("{what} variable map is poisoned"),
        }
    };
    let online = snapshot(online, "online")?;
    let mut target = snapshot(target, "target")?;
    let mut names: Vec<&String> = online.keys().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let Some(t) = target.remove(name) else {
            bail!("momentum encoder has no variable `{name}`")
        };
        let o = &online[name];
        if t.shape() != o.shape() || t.dtype() != o.dtype() {
            bail!(
                "variable `{name}`: momentum encoder {:?} {:?}, online {:?} {:?}",
                t.shape(),
                t.dtype(),
                o.shape(),
                o.dtype()
            )
        }
        out.push((name.clone(), t, o.clone()));
    }
    if let Some(extra) = target.keys().min() {
        bail!("momentum encoder has a variable `{extra}` the online network lacks")
    }
    Ok(out)
}

/// Sets every variable of `target` to the value of the online variable of the same name (the
/// momentum encoder's initialisation).
pub fn copy_variables(target: &VarMap, online: &VarMap) -> Result<()> {
    for (_, t, o) in matched_variables(target, online)? {
        t.set(&o.as_tensor().detach())?;
    }
    Ok(())
}

/// [`ema_update_with`] with the default [`BnStatisticsPolicy::Ema`].
pub fn ema_update(target: &VarMap, online: &VarMap, decay: f64) -> Result<()> {
    ema_update_with(target, online, decay, BnStatisticsPolicy::default())
}

/// `target ← decay·target + (1 − decay)·online` for every variable, matched by name, in the
/// variables' own dtype; batch-norm moving statistics follow `bn_statistics`, and non-float
/// variables are copied. Nothing is changed when the names, shapes or dtypes do not match.
pub fn ema_update_with(
    target: &VarMap,
    online: &VarMap,
    decay: f64,
    bn_statistics: BnStatisticsPolicy,
) -> Result<()> {
    if !(0.0..=1.0).contains(&decay) {
        bail!("EMA decay must lie in [0, 1], got {decay}")
    }
    for (name, t, o) in matched_variables(target, online)? {
        let online_value = o.as_tensor().detach();
        let policy = if is_bn_statistic(&name) {
            bn_statistics
        } else {
            BnStatisticsPolicy::Ema
        };
        match policy {
            BnStatisticsPolicy::Keep => {}
            BnStatisticsPolicy::Copy => t.set(&online_value)?,
            BnStatisticsPolicy::Ema if !t.dtype().is_float() => t.set(&online_value)?,
            BnStatisticsPolicy::Ema => {
                let old = t.as_tensor().detach();
                let new = (old.affine(decay, 0.0)? + online_value.affine(1.0 - decay, 0.0)?)?;
                t.set(&new)?;
            }
        }
    }
    Ok(())
}

/// Checkpoint name of the queue's key matrix.
pub const QUEUE_KEYS: &str = "memory_queue.keys";
/// Checkpoint name of the queue's write pointer (I64, shape `[1]`).
pub const QUEUE_POINTER: &str = "memory_queue.pointer";
/// Checkpoint name of the queue's number of filled slots (I64, shape `[1]`).
pub const QUEUE_FILLED: &str = "memory_queue.filled";

/// A FIFO queue of (L2-normalised) keys used as extra negatives.
///
/// Keys are written at the pointer, which wraps around, so the oldest keys are overwritten
/// first. Until the queue is full, [`negatives`](Self::negatives) returns only the filled
/// slots. Enqueueing replaces the internal tensor rather than writing into it, so a tensor
/// returned by `negatives()` (for instance one held by a loss graph awaiting `backward()`) never
/// changes afterwards.
#[derive(Debug, Clone)]
pub struct MemoryQueue {
    keys: Tensor,
    pointer: usize,
    filled: usize,
}

impl MemoryQueue {
    /// An empty queue of `capacity` keys of dimension `dim`.
    pub fn new(capacity: usize, dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        if capacity == 0 || dim == 0 {
            bail!("memory queue needs capacity > 0 and dim > 0, got {capacity} × {dim}")
        }
        Ok(Self {
            keys: Tensor::zeros((capacity, dim), dtype, device)?,
            pointer: 0,
            filled: 0,
        })
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.keys.dims()[0]
    }

    /// Key dimension.
    pub fn dim(&self) -> usize {
        self.keys.dims()[1]
    }

    /// Number of filled slots.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// Whether no key has been enqueued yet.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Whether every slot holds a key.
    pub fn is_full(&self) -> bool {
        self.filled == self.capacity()
    }

    /// The slot the next key goes to.
    pub fn pointer(&self) -> usize {
        self.pointer
    }

    /// The whole `capacity × dim` slot matrix (unfilled slots are zero), in slot order.
    pub fn slots(&self) -> &Tensor {
        &self.keys
    }

    /// Appends the rows of `keys` (`b × dim`, detached and converted to the queue's dtype and
    /// device), row `j` going to slot `(pointer + j) mod capacity`; when `b` exceeds the
    /// capacity only the last `capacity` rows remain.
    pub fn enqueue(&mut self, keys: &Tensor) -> Result<()> {
        let (b, d) = keys.dims2()?;
        if d != self.dim() {
            bail!("memory queue holds {}-d keys, got {d}-d", self.dim())
        }
        if b == 0 {
            return Ok(());
        }
        let cap = self.capacity();
        let keys = keys
            .detach()
            .to_device(self.keys.device())?
            .to_dtype(self.keys.dtype())?;
        let skip = b.saturating_sub(cap);
        let m = b - skip;
        let rows = keys.narrow(0, skip, m)?;
        let slot = (self.pointer + skip) % cap;
        let first = m.min(cap - slot);
        let rest = m - first;
        let mut pieces: Vec<Tensor> = Vec::with_capacity(3);
        let mut push = |t: Tensor| {
            if t.dims()[0] > 0 {
                pieces.push(t)
            }
        };
        if rest == 0 {
            push(self.keys.narrow(0, 0, slot)?);
            push(rows.narrow(0, 0, first)?);
            push(self.keys.narrow(0, slot + first, cap - slot - first)?);
        } else {
            // The write wraps: rows[first..] land at slots 0..rest, rows[..first] at slot..cap.
            push(rows.narrow(0, first, rest)?);
            push(self.keys.narrow(0, rest, slot - rest)?);
            push(rows.narrow(0, 0, first)?);
        }
        self.keys = Tensor::cat(&pieces, 0)?;
        self.pointer = (self.pointer + b) % cap;
        self.filled = (self.filled + b).min(cap);
        Ok(())
    }

    /// The filled slots, `len() × dim`, in slot order (all slots once full).
    pub fn negatives(&self) -> Result<Tensor> {
        self.keys.narrow(0, 0, self.filled)
    }

    /// The queue's state for a checkpoint: [`QUEUE_KEYS`] (`capacity × dim`), [`QUEUE_POINTER`]
    /// and [`QUEUE_FILLED`] (I64, shape `[1]`, on the CPU).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let scalar = |v: usize| Tensor::new(&[v as i64], &Device::Cpu);
        let mut m = HashMap::new();
        m.insert(QUEUE_KEYS.to_string(), self.keys.clone());
        m.insert(QUEUE_POINTER.to_string(), scalar(self.pointer)?);
        m.insert(QUEUE_FILLED.to_string(), scalar(self.filled)?);
        Ok(m)
    }

    /// Restores the state written by [`state_tensors`](Self::state_tensors); the keys must
    /// have this queue's shape. Nothing changes on error.
    pub fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let get = |name: &str| match tensors.get(name) {
            Some(t) => Ok(t),
            None => bail!("memory queue state lacks `{name}`"),
        };
        let read_index = |name: &str| -> Result<usize> {
            let v = get(name)?
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1::<i64>()?;
            match v.as_slice() {
                [x] if *x >= 0 => Ok(*x as usize),
                _ => bail!("memory queue state `{name}` must be one non-negative integer"),
            }
        };
        let keys = get(QUEUE_KEYS)?;
        let cap = self.capacity();
        if keys.dims() != [cap, self.dim()] {
            bail!(
                "memory queue state has keys {:?}, the queue is {cap} × {}",
                keys.dims(),
                self.dim()
            )
        }
        let pointer = read_index(QUEUE_POINTER)?;
        let filled = read_index(QUEUE_FILLED)?;
        if pointer >= cap || filled > cap || (filled < cap && pointer != filled) {
            bail!("inconsistent memory queue state: pointer {pointer}, filled {filled}, capacity {cap}")
        }
        let keys = keys
            .detach()
            .to_device(self.keys.device())?
            .to_dtype(self.keys.dtype())?;
        self.keys = keys;
        self.pointer = pointer;
        self.filled = filled;
        Ok(())
    }
}

/// The memory-buffer loss and the keys to enqueue afterwards.
#[derive(Debug, Clone)]
pub struct MemoryLossOutput {
    /// Loss and metrics; `logits_ab` is `q1·K2ᵀ/τ` (`n × Rn`), the metrics are computed from it
    /// as for NT-Xent.
    pub contrastive: ContrastiveOutput,
    /// `[K1; K2]`, the gathered (normalised when `hidden_norm`) keys of this step, `2Rn × d`,
    /// detached: pass them to [`MemoryQueue::enqueue`] after the loss.
    pub keys: Tensor,
}

/// The memory-buffer contrastive loss (see the [module documentation](self) for the formula).
///
/// `queries`: online projections, `2n × d` (view 1 rows, then view 2 rows). `keys`: the
/// momentum encoder's projections of the same images, same shape (detached here).
/// `negatives`: the queue contents before this step ([`MemoryQueue::negatives`]), `m × d`
/// (already normalised: they are keys this function returned), or `None`.
pub fn memory_contrastive_loss(
    queries: &Tensor,
    keys: &Tensor,
    negatives: Option<&Tensor>,
    config: &NtXentConfig,
    collective: &dyn Collective,
) -> Result<MemoryLossOutput> {
    let n = half_rows(queries, "memory_contrastive_loss")?;
    if keys.dims() != queries.dims() {
        bail!(
            "memory_contrastive_loss: keys {:?} and queries {:?} differ in shape",
            keys.dims(),
            queries.dims()
        )
    }
    config.validate()?;
    let d = queries.dim(1)?;
    let keys = keys.detach();
    let (q, k) = if config.hidden_norm {
        (l2_normalize(queries)?, l2_normalize(&keys)?)
    } else {
        (queries.clone(), keys)
    };
    let q1 = q.narrow(0, 0, n)?;
    let q2 = q.narrow(0, n, n)?;
    let big_k1 = collective.all_gather(&k.narrow(0, 0, n)?)?.detach();
    let big_k2 = collective.all_gather(&k.narrow(0, n, n)?)?.detach();
    let negatives = match negatives {
        Some(m) => {
            let (_, md) = m.dims2()?;
            if md != d {
                bail!("memory_contrastive_loss: {d}-d queries but {md}-d negatives")
            }
            Some(m.detach().to_dtype(q.dtype())?)
        }
        None => None,
    };
    let contrastive = two_way_contrastive(
        &q1,
        &q2,
        &big_k1,
        &big_k2,
        negatives.as_ref(),
        config.temperature,
        collective,
    )?;
    let keys = Tensor::cat(&[&big_k1, &big_k2], 0)?;
    Ok(MemoryLossOutput { contrastive, keys })
}
