//! The NT-Xent contrastive objective, exactly as the official `add_contrastive_loss`
//! (the official tf2/objective.py, `add_contrastive_loss`), with cross-replica negatives (`tpu_cross_replica_concat`).
//!
//! Input: `h`, the `2n × d` projection-head outputs of this replica, the `n` view-1 rows first
//! and then the `n` view-2 rows of the same images (the two views are stacked along the batch
//! axis before the encoder). With `R` replicas, this replica's rank `r` and temperature `τ`:
//!
//! 1. if `hidden_norm`: `h ← h / sqrt(max(Σ_j h_j², 1e-12))` row by row (TF's `l2_normalize`,
//!    whose epsilon bounds the *squared* norm), see [`l2_normalize`];
//! 2. `h1 = h[0..n]`, `h2 = h[n..2n]`;
//! 3. `H1 = all_gather(h1)`, `H2 = all_gather(h2)` (each `Rn × d`, rank order), labels
//!    `idx_i = i + r·n`, `mask = one_hot(idx, Rn)`;
//! 4. logits (`LARGE_NUM = 1e9`): `aa = h1·H1ᵀ/τ − 1e9·mask`, `bb = h2·H2ᵀ/τ − 1e9·mask`,
//!    `ab = h1·H2ᵀ/τ`, `ba = h2·H1ᵀ/τ`;
//! 5. `loss_a = CE(one_hot(idx, 2Rn), [ab | aa])`, `loss_b = CE(one_hot(idx, 2Rn), [ba | bb])`
//!    (softmax cross-entropy over the `2Rn` columns, computed as a numerically stable
//!    log-sum-exp; the self-similarity has been pushed to `−1e9`);
//! 6. **`loss = (1/n) Σ_i (loss_a,i + loss_b,i)`**, the mean over the *local* `n` images of the
//!    *sum* of the two directions. This is the official "2×" NT-Xent: twice the
//!    "mean over the 2N anchors" form of the v1 paper's Algorithm 1 that the PyTorch libraries
//!    return. The initial loss is ≈ `2·ln(2N − 1)` for a global batch of `N` images.
//!
//! Steps 4–5 run as one similarity GEMM and the fused masked cross-entropy of
//! [`simclr_kernels::ntxent`] (step 1 is its fused normalisation); for f64 inputs, the reference
//! compositions there, which follow these formulas op for op.
//!
//! The caller divides the loss by the number of replicas before `backward()` and sums the
//! parameter gradients over the replicas (the official tf2/objective.py, `add_contrastive_loss` step 7); the sum of the replicas'
//! divided losses is the loss of one replica on the combined batch.
//!
//! Metrics (as tf2's `metrics.py` logs them, from `logits_ab` only):
//! * `contrast_acc`: the fraction of local anchors whose arg-max over `ab` (first maximum on
//!   ties) is the label `idx_i`;
//! * `contrast_entropy`: the mean over local anchors of the entropy (nats) of `softmax(ab)`,
//!   computed exactly from a log-softmax (the official metric adds `1e-8` inside the logarithm,
//!   which lowers the value by less than `1e-8` per column).

use candle_core::{bail, DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use simclr_collective::Collective;

use simclr_kernels::ntxent::{contrastive_ce, ContrastLayout};
pub use simclr_kernels::ntxent::{l2_normalize, L2_NORMALIZE_EPSILON, LARGE_NUM};

/// NT-Xent settings, with the official flag names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NtXentConfig {
    /// Softmax temperature `τ` (official default 0.1; the README's CIFAR-10 command uses 0.5).
    pub temperature: f64,
    /// L2-normalise the projections before the dot products (official default `true`).
    pub hidden_norm: bool,
}

impl Default for NtXentConfig {
    fn default() -> Self {
        Self {
            temperature: 0.1,
            hidden_norm: true,
        }
    }
}

impl NtXentConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "temperature must be finite and positive, got {}",
                self.temperature
            )
        }
        Ok(())
    }
}

/// The loss and its metrics.
#[derive(Debug, Clone)]
pub struct ContrastiveOutput {
    /// Scalar loss, differentiable with respect to the input rows (and, through the collective,
    /// the other replicas' rows). Not yet divided by the number of replicas.
    pub loss: Tensor,
    /// `ab = h1·H2ᵀ/τ`, `n × Rn`, detached.
    pub logits_ab: Tensor,
    /// The positive column of each local anchor: `idx_i = i + rank·n`.
    pub labels: Vec<usize>,
    /// Fraction of local anchors whose arg-max over `logits_ab` is the label.
    pub contrast_acc: f64,
    /// Mean entropy (nats) of `softmax(logits_ab)` over the local anchors.
    pub contrast_entropy: f64,
}

/// NT-Xent over this replica's `2n × d` projections, with negatives gathered through
/// `collective`. See the [module documentation](self) for the exact formula.
pub fn nt_xent(
    hidden: &Tensor,
    config: &NtXentConfig,
    collective: &dyn Collective,
) -> Result<ContrastiveOutput> {
    config.validate()?;
    let n = half_rows(hidden, "nt_xent")?;
    let h = if config.hidden_norm {
        l2_normalize(hidden)?
    } else {
        hidden.clone()
    };
    let h1 = h.narrow(0, 0, n)?;
    let h2 = h.narrow(0, n, n)?;
    let big_h1 = collective.all_gather(&h1)?;
    let big_h2 = collective.all_gather(&h2)?;
    two_way_contrastive(
        &h1,
        &h2,
        &big_h1,
        &big_h2,
        None,
        config.temperature,
        collective,
    )
}

/// `n` for a `2n × d` input; errors on anything else.
pub(crate) fn half_rows(x: &Tensor, what: &str) -> Result<usize> {
    let (rows, _) = x.dims2()?;
    if rows == 0 || rows % 2 != 0 {
        bail!("{what}: expected 2n rows (view 1 then view 2) with n >= 1, got {rows}")
    }
    Ok(rows / 2)
}

/// The shared core of NT-Xent and the memory-buffer loss.
///
/// Local anchors `a1`, `a2` (`n × d`, already normalised if wanted), gathered candidates `c1`,
/// `c2` (`Rn × d`, the same views as `a1`, `a2`) and optional extra negatives `extra`
/// (`m × d`):
///
/// * `logits_a = [a1·c2ᵀ/τ | a1·c1ᵀ/τ − 1e9·mask | a1·extraᵀ/τ]`,
/// * `logits_b = [a2·c1ᵀ/τ | a2·c2ᵀ/τ − 1e9·mask | a2·extraᵀ/τ]`,
/// * `loss = mean_i (CE(logits_a,i, idx_i) + CE(logits_b,i, idx_i))`.
pub(crate) fn two_way_contrastive(
    a1: &Tensor,
    a2: &Tensor,
    c1: &Tensor,
    c2: &Tensor,
    extra: Option<&Tensor>,
    temperature: f64,
    collective: &dyn Collective,
) -> Result<ContrastiveOutput> {
    let n = a1.dim(0)?;
    let global = c1.dim(0)?;
    let world = collective.world_size();
    let rank = collective.rank();
    if global != world * n || c2.dim(0)? != global || a2.dim(0)? != n {
        bail!(
            "contrastive loss: {n} local anchors, world size {world}, but {global} gathered \
             candidates; every replica must have the same local batch"
        )
    }
    let labels: Vec<usize> = (0..n).map(|i| i + rank * n).collect();
    let inv_t = 1.0 / temperature;
    // One GEMM for the four blocks (and the extra negatives): rows [a1; a2], columns
    // [c1 | c2 | extra]. The fused cross-entropy knows which column is each row's positive and
    // which its own copy (simclr_kernels::ntxent::ContrastLayout).
    let anchors = Tensor::cat(&[a1, a2], 0)?;
    let mut candidates = vec![c1, c2];
    if let Some(e) = extra.filter(|e| e.dim(0).is_ok_and(|m| m > 0)) {
        candidates.push(e);
    }
    let candidates = Tensor::cat(&candidates, 0)?;
    let similarity = anchors.matmul(&candidates.t()?)?;
    let layout = ContrastLayout {
        n,
        offset: rank * n,
        global,
        inv_t,
    };
    let loss = (contrastive_ce(&similarity, layout)?.sum_all()? / n as f64)?;

    let ab = (similarity.narrow(0, 0, n)?.narrow(1, global, global)? * inv_t)?;
    let logits_ab = ab.detach();
    let (contrast_acc, contrast_entropy) = logit_metrics(&logits_ab, &labels)?;
    Ok(ContrastiveOutput {
        loss,
        logits_ab,
        labels,
        contrast_acc,
        contrast_entropy,
    })
}

/// `(contrast_acc, contrast_entropy)` from `logits_ab` (computed on the host in f64).
pub(crate) fn logit_metrics(logits_ab: &Tensor, labels: &[usize]) -> Result<(f64, f64)> {
    let rows = logits_ab.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    if rows.is_empty() {
        return Ok((0.0, 0.0));
    }
    let mut correct = 0usize;
    let mut entropy = 0.0;
    for (row, &label) in rows.iter().zip(labels) {
        let mut best = 0usize;
        for (j, &x) in row.iter().enumerate() {
            if x > row[best] {
                best = j;
            }
        }
        if best == label {
            correct += 1;
        }
        let max = row[best];
        let lse = max + row.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
        entropy -= row
            .iter()
            .map(|&x| {
                let log_p = x - lse;
                log_p.exp() * log_p
            })
            .sum::<f64>();
    }
    let count = rows.len() as f64;
    Ok((correct as f64 / count, entropy / count))
}
