//! Weighted k-nearest-neighbour classification on L2-normalised features, the usual monitor of
//! a self-supervised encoder: a bank of labelled (training) features votes for the class of each
//! query (test) feature.
//!
//! For a query `q` and bank features `b_i` (all scaled to unit length), the similarity is the
//! cosine `s_i = q · b_i`. The `k` most similar bank points vote for their label, each with
//! weight `exp(s_i / τ)` ([`KnnVote::Weighted`]) or weight 1 ([`KnnVote::Majority`]); the class
//! with the most votes is the prediction. The votes also serve as per-class scores for top-k
//! accuracy.
//!
//! Similarities are computed with candle matmuls on the bank's device, a chunk of queries at a
//! time, so memory stays at `chunk_size × bank size` similarities whatever the number of
//! queries; neighbour selection and voting run on the CPU in f64.
//!
//! **Ties.** Among equally similar bank points the lower bank index is taken first; among
//! classes with equal votes the lower class index wins (the rule of
//! [`ClassificationMetrics`]). Classes that got no vote all score 0 and so fill the top-k in
//! index order after the voted ones.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::labels::{check_range, LabelSource};
use crate::metrics::{argmax, ClassificationMetrics};

/// Settings of the kNN classifier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KnnConfig {
    /// Neighbours per query (default 200); capped at the bank size.
    pub k: usize,
    /// Temperature τ of the weights `exp(similarity / τ)` (default 0.1); unused by
    /// [`KnnVote::Majority`].
    pub temperature: f64,
    /// Queries per similarity matmul (default 256): memory holds `chunk_size × bank size`
    /// similarities at a time.
    pub chunk_size: usize,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            k: 200,
            temperature: 0.1,
            chunk_size: 256,
        }
    }
}

impl KnnConfig {
    /// Checks that `k` and `chunk_size` are positive and `temperature` is finite and positive.
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(EvalError::Config {
                name: "k",
                value: "0".into(),
                reason: "the number of neighbours must be at least 1",
            });
        }
        if self.chunk_size == 0 {
            return Err(EvalError::Config {
                name: "chunk_size",
                value: "0".into(),
                reason: "the query chunk size must be at least 1",
            });
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(EvalError::Config {
                name: "temperature",
                value: self.temperature.to_string(),
                reason: "the temperature must be a finite number above 0",
            });
        }
        Ok(())
    }
}

/// How neighbours vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum KnnVote {
    /// Each neighbour votes `exp(similarity / τ)`. The votes of one query are all scaled by the
    /// same factor `exp(-s_max / τ)`, where `s_max` is its highest neighbour similarity, so the
    /// weights cannot overflow; the scaling changes no ranking.
    #[default]
    Weighted,
    /// Each neighbour votes 1.
    Majority,
}

/// Each row of a `[N, D]` tensor at unit L2 norm, as f32 on the tensor's device: the project's
/// one normalisation (TF's `l2_normalize`, the fused kernel of `simclr-kernels`).
fn l2_normalize(features: &Tensor) -> Result<Tensor> {
    let x = features.to_dtype(DType::F32)?;
    Ok(simclr_kernels::ntxent::l2_normalize(&x)?)
}

/// The labelled features that vote: normalised once, kept (transposed) on their device.
#[derive(Debug, Clone)]
pub struct KnnBank {
    /// `[D, N]` f32, unit columns.
    bank_t: Tensor,
    labels: Vec<usize>,
    num_classes: usize,
    dim: usize,
}

/// Predictions and metrics of a kNN evaluation.
#[derive(Debug, Clone)]
pub struct KnnResult {
    /// The predicted class of each query, in query order.
    pub predictions: Vec<usize>,
    /// Top-1 / top-k (top-5 when there are at least 5 classes), per-class accuracy and the
    /// confusion matrix, with the votes as scores.
    pub metrics: ClassificationMetrics,
}

impl KnnResult {
    /// Top-1 accuracy as a fraction.
    pub fn top1(&self) -> f64 {
        self.metrics.top1()
    }

    /// Top-k accuracy (top-5 when there are at least 5 classes) as a fraction.
    pub fn top_k_accuracy(&self) -> Option<f64> {
        self.metrics.top_k_accuracy()
    }
}

impl KnnBank {
    /// A bank from features `[N, D]` (any float dtype, any device; computations stay on that
    /// device) and their `N` labels in `0..num_classes`.
    pub fn new<L: LabelSource + ?Sized>(
        features: &Tensor,
        labels: &L,
        num_classes: usize,
    ) -> Result<Self> {
        if num_classes == 0 {
            return Err(EvalError::NoClasses);
        }
        let (n, dim) = matrix_dims("bank features", features)?;
        if n == 0 {
            return Err(EvalError::EmptyBank);
        }
        let labels = labels.to_labels()?.into_owned();
        if labels.len() != n {
            return Err(EvalError::LengthMismatch {
                what: "bank labels (one per bank feature row)",
                expected: n,
                got: labels.len(),
            });
        }
        check_range(&labels, num_classes)?;
        let bank_t = l2_normalize(features)?.t()?.contiguous()?;
        Ok(Self {
            bank_t,
            labels,
            num_classes,
            dim,
        })
    }

    /// The number of bank points.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Always false: an empty bank is refused by [`new`](Self::new).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The feature dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The bank labels.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The device the similarities are computed on.
    pub fn device(&self) -> &Device {
        self.bank_t.device()
    }

    /// The votes of every query, row-major `[N × num_classes]` (see [`KnnVote`] for their
    /// scale). Holds all of them in memory; meant for small query sets and inspection.
    pub fn votes(&self, queries: &Tensor, config: &KnnConfig, vote: KnnVote) -> Result<Vec<f64>> {
        let mut all = Vec::new();
        self.for_each_chunk(queries, config, vote, |_, votes| {
            all.extend_from_slice(votes);
            Ok(())
        })?;
        Ok(all)
    }

    /// The predicted class of each query `[N, D]`.
    pub fn predict(
        &self,
        queries: &Tensor,
        config: &KnnConfig,
        vote: KnnVote,
    ) -> Result<Vec<usize>> {
        let c = self.num_classes;
        let mut predictions = Vec::new();
        self.for_each_chunk(queries, config, vote, |start, votes| {
            for (i, row) in votes.chunks_exact(c).enumerate() {
                let p = argmax(row).ok_or(EvalError::NotANumber {
                    what: "kNN votes",
                    row: start + i,
                })?;
                predictions.push(p);
            }
            Ok(())
        })?;
        Ok(predictions)
    }

    /// Classifies the queries `[N, D]` and scores them against their `N` labels.
    pub fn evaluate<L: LabelSource + ?Sized>(
        &self,
        queries: &Tensor,
        labels: &L,
        config: &KnnConfig,
        vote: KnnVote,
    ) -> Result<KnnResult> {
        let mut metrics = ClassificationMetrics::new(self.num_classes)?;
        let predictions = self.evaluate_into(queries, labels, config, vote, &mut metrics)?;
        Ok(KnnResult {
            predictions,
            metrics,
        })
    }

    /// Like [`evaluate`](Self::evaluate), but adds the results to an existing accumulator (for
    /// queries that arrive batch by batch) and returns the predictions. On error the
    /// accumulator is unchanged.
    pub fn evaluate_into<L: LabelSource + ?Sized>(
        &self,
        queries: &Tensor,
        labels: &L,
        config: &KnnConfig,
        vote: KnnVote,
        metrics: &mut ClassificationMetrics,
    ) -> Result<Vec<usize>> {
        if metrics.num_classes() != self.num_classes {
            return Err(EvalError::ClassCountMismatch {
                what: "metrics",
                expected: self.num_classes,
                got: metrics.num_classes(),
            });
        }
        let (n, _) = matrix_dims("query features", queries)?;
        let labels = labels.to_labels()?;
        if labels.len() != n {
            return Err(EvalError::LengthMismatch {
                what: "query labels (one per query feature row)",
                expected: n,
                got: labels.len(),
            });
        }
        check_range(&labels, self.num_classes)?;
        let c = self.num_classes;
        let mut local = metrics.clone();
        local.reset();
        let mut predictions = Vec::with_capacity(n);
        self.for_each_chunk(queries, config, vote, |start, votes| {
            let rows = votes.len() / c;
            local.update_scores(votes, &labels[start..start + rows])?;
            for (i, row) in votes.chunks_exact(c).enumerate() {
                let p = argmax(row).ok_or(EvalError::NotANumber {
                    what: "kNN votes",
                    row: start + i,
                })?;
                predictions.push(p);
            }
            Ok(())
        })?;
        metrics.merge(&local)?;
        Ok(predictions)
    }

    /// Runs the similarity matmul and the vote chunk by chunk, calling `f(first query index,
    /// votes of the chunk row-major)`.
    fn for_each_chunk(
        &self,
        queries: &Tensor,
        config: &KnnConfig,
        vote: KnnVote,
        mut f: impl FnMut(usize, &[f64]) -> Result<()>,
    ) -> Result<()> {
        config.validate()?;
        let (n, dim) = matrix_dims("query features", queries)?;
        if dim != self.dim {
            return Err(EvalError::FeatureDimMismatch {
                what: "query features",
                expected: self.dim,
                got: dim,
            });
        }
        if n == 0 {
            return Ok(());
        }
        let queries = l2_normalize(&queries.to_device(self.device())?)?;
        let bank_size = self.len();
        let k = config.k.min(bank_size);
        let c = self.num_classes;
        let mut order: Vec<usize> = Vec::with_capacity(bank_size);
        let mut votes: Vec<f64> = Vec::new();
        let mut start = 0;
        while start < n {
            let rows = config.chunk_size.min(n - start);
            let sims: Vec<f32> = queries
                .narrow(0, start, rows)?
                .matmul(&self.bank_t)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1()?;
            votes.clear();
            votes.resize(rows * c, 0.0);
            for (i, (sim, out)) in sims
                .chunks_exact(bank_size)
                .zip(votes.chunks_exact_mut(c))
                .enumerate()
            {
                if sim.iter().any(|s| s.is_nan()) {
                    return Err(EvalError::NotANumber {
                        what: "kNN similarities (query features or bank)",
                        row: start + i,
                    });
                }
                nearest(sim, k, &mut order);
                let s_max = f64::from(sim[order[0]]);
                for &j in &order {
                    out[self.labels[j]] += match vote {
                        KnnVote::Weighted => {
                            ((f64::from(sim[j]) - s_max) / config.temperature).exp()
                        }
                        KnnVote::Majority => 1.0,
                    };
                }
            }
            f(start, &votes)?;
            start += rows;
        }
        Ok(())
    }
}

/// Classifies `queries` with a bank built from `bank_features` / `bank_labels` and scores them
/// against `query_labels`: [`KnnBank::new`] followed by [`KnnBank::evaluate`].
pub fn knn_evaluate<B, Q>(
    bank_features: &Tensor,
    bank_labels: &B,
    queries: &Tensor,
    query_labels: &Q,
    num_classes: usize,
    config: &KnnConfig,
    vote: KnnVote,
) -> Result<KnnResult>
where
    B: LabelSource + ?Sized,
    Q: LabelSource + ?Sized,
{
    config.validate()?;
    KnnBank::new(bank_features, bank_labels, num_classes)?.evaluate(
        queries,
        query_labels,
        config,
        vote,
    )
}

/// Fills `order` with the indices of the `k` largest similarities, most similar first, lower
/// index first among equals.
fn nearest(sim: &[f32], k: usize, order: &mut Vec<usize>) {
    let by_similarity = |a: &usize, b: &usize| sim[*b].total_cmp(&sim[*a]).then(a.cmp(b));
    order.clear();
    order.extend(0..sim.len());
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by_similarity);
        order.truncate(k);
    }
    order.sort_unstable_by(by_similarity);
}

fn matrix_dims(what: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    match t.dims() {
        &[n, d] => Ok((n, d)),
        dims => Err(EvalError::NotMatrix {
            what,
            shape: dims.to_vec(),
        }),
    }
}
