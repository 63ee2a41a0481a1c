use candle_core::{DType, Device, Tensor};

use crate::confusion::ConfusionMatrix;
use crate::error::{EvalError, Result};
use crate::labels::{check_range, LabelSource};
use crate::report::{ClassAccuracy, EvalReport};

/// The `k` of the top-k accuracy that [`ClassificationMetrics::new`] tracks when there are at
/// least this many classes.
pub const DEFAULT_TOP_K: usize = 5;

/// Accumulates classification results batch by batch.
///
/// Feed it logits (or any per-class scores, higher is better) with the true labels through
/// [`update`](Self::update) or [`update_scores`](Self::update_scores), and optionally batch
/// losses through [`add_loss`](Self::add_loss); read top-1 and top-k accuracy, per-class
/// accuracy, the confusion matrix (rows = true class, columns = predicted class) and the mean
/// loss at any time, or take an [`EvalReport`].
///
/// **Ties.** A sample's predicted class is the highest-scoring class, and among equal scores the
/// one with the *lower class index*. The same rule orders classes for top-k: the true class `y`
/// is in the top k when fewer than k classes rank above it, where class `j` ranks above `y` if
/// `score[j] > score[y]`, or `score[j] == score[y]` and `j < y`. Scores that hold a NaN are
/// rejected; infinities are allowed.
///
/// **Atomic updates.** Each batch is validated in full before anything is counted, so a batch
/// that returns an error leaves the accumulator as it was.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassificationMetrics {
    num_classes: usize,
    top_k: Option<usize>,
    /// Row-major `num_classes × num_classes` counts, `[true * C + predicted]`.
    confusion: Vec<u64>,
    total: u64,
    correct: u64,
    correct_top_k: u64,
    /// False once hard predictions (without scores) have been counted.
    top_k_valid: bool,
    loss_sum: f64,
    loss_count: u64,
}

impl ClassificationMetrics {
    /// An empty accumulator for `num_classes` classes. It tracks top-5 accuracy when
    /// `num_classes >= 5` ([`DEFAULT_TOP_K`]) and no top-k accuracy otherwise.
    pub fn new(num_classes: usize) -> Result<Self> {
        let top_k = (num_classes >= DEFAULT_TOP_K).then_some(DEFAULT_TOP_K);
        Self::build(num_classes, top_k)
    }

    /// An empty accumulator tracking top-`k` accuracy, `k` in `1..=num_classes`.
    pub fn with_top_k(num_classes: usize, k: usize) -> Result<Self> {
        if num_classes > 0 && (k == 0 || k > num_classes) {
            return Err(EvalError::InvalidTopK { k, num_classes });
        }
        Self::build(num_classes, Some(k))
    }

    fn build(num_classes: usize, top_k: Option<usize>) -> Result<Self> {
        if num_classes == 0 {
            return Err(EvalError::NoClasses);
        }
        Ok(Self {
            num_classes,
            top_k,
            confusion: vec![0; num_classes * num_classes],
            total: 0,
            correct: 0,
            correct_top_k: 0,
            top_k_valid: true,
            loss_sum: 0.0,
            loss_count: 0,
        })
    }

    /// Adds a batch of logits `[N, C]` (any floating-point dtype, any device; copied to the CPU
    /// as f32 once) with its `N` labels (a `u32` tensor `[N]`, a `&[usize]`, …).
    pub fn update<L: LabelSource + ?Sized>(&mut self, logits: &Tensor, labels: &L) -> Result<()> {
        let (n, c) = match logits.dims() {
            &[n, c] => (n, c),
            dims => {
                return Err(EvalError::NotMatrix {
                    what: "logits",
                    shape: dims.to_vec(),
                })
            }
        };
        if !logits.dtype().is_float() {
            return Err(EvalError::LogitsDtype(logits.dtype()));
        }
        if c != self.num_classes {
            return Err(EvalError::ClassCountMismatch {
                what: "logits",
                expected: self.num_classes,
                got: c,
            });
        }
        let labels = labels.to_labels()?;
        if labels.len() != n {
            return Err(EvalError::LengthMismatch {
                what: "labels (one per logits row)",
                expected: n,
                got: labels.len(),
            });
        }
        let scores: Vec<f32> = logits
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        self.update_scores(&scores, labels.as_ref())
    }

    /// Adds a batch of per-class scores held row-major in a plain slice (`N × C` values, higher
    /// is better; `f32`, `f64` or any other ordered type) with its `N` labels.
    pub fn update_scores<T, L>(&mut self, scores: &[T], labels: &L) -> Result<()>
    where
        T: Copy + PartialOrd,
        L: LabelSource + ?Sized,
    {
        let labels = labels.to_labels()?;
        let c = self.num_classes;
        if scores.len() != labels.len() * c {
            return Err(EvalError::LengthMismatch {
                what: "scores (labels × classes)",
                expected: labels.len() * c,
                got: scores.len(),
            });
        }
        check_range(&labels, c)?;
        let mut ranked = Vec::with_capacity(labels.len());
        for (row, (&label, values)) in labels.iter().zip(scores.chunks_exact(c)).enumerate() {
            let (predicted, rank) = rank_row(values, label).ok_or(EvalError::NotANumber {
                what: "scores",
                row,
            })?;
            ranked.push((label, predicted, rank));
        }
        for (label, predicted, rank) in ranked {
            self.record(label, predicted, Some(rank));
        }
        Ok(())
    }

    /// Adds hard predictions (class indices) with their labels. Top-k accuracy needs scores,
    /// so it is unavailable ([`top_k_accuracy`](Self::top_k_accuracy) returns `None`) once
    /// this has been called on an accumulator that tracks it.
    pub fn update_predictions<P, L>(&mut self, predictions: &P, labels: &L) -> Result<()>
    where
        P: LabelSource + ?Sized,
        L: LabelSource + ?Sized,
    {
        let predictions = predictions.to_labels()?;
        let labels = labels.to_labels()?;
        if predictions.len() != labels.len() {
            return Err(EvalError::LengthMismatch {
                what: "labels (one per prediction)",
                expected: predictions.len(),
                got: labels.len(),
            });
        }
        check_range(&predictions, self.num_classes)?;
        check_range(&labels, self.num_classes)?;
        for (&label, &predicted) in labels.iter().zip(predictions.iter()) {
            self.record(label, predicted, None);
        }
        if !labels.is_empty() {
            self.top_k_valid = false;
        }
        Ok(())
    }

    fn record(&mut self, label: usize, predicted: usize, rank: Option<usize>) {
        self.confusion[label * self.num_classes + predicted] += 1;
        self.total += 1;
        if label == predicted {
            self.correct += 1;
        }
        if let (Some(k), Some(rank)) = (self.top_k, rank) {
            if rank < k {
                self.correct_top_k += 1;
            }
        }
    }

    /// Adds a batch's mean loss, weighted by its `batch_size` samples, to the running mean.
    pub fn add_loss(&mut self, mean_loss: f64, batch_size: usize) {
        self.loss_sum += mean_loss * batch_size as f64;
        self.loss_count += batch_size as u64;
    }

    /// Adds another accumulator's counts and losses (for example one per data shard or
    /// replica). Both must have the same number of classes and the same top-k.
    pub fn merge(&mut self, other: &ClassificationMetrics) -> Result<()> {
        if other.num_classes != self.num_classes {
            return Err(EvalError::ClassCountMismatch {
                what: "merged metrics",
                expected: self.num_classes,
                got: other.num_classes,
            });
        }
        if other.top_k != self.top_k {
            return Err(EvalError::Config {
                name: "top_k",
                value: format!("{:?}", other.top_k),
                reason: "merged metrics must track the same top-k",
            });
        }
        for (a, b) in self.confusion.iter_mut().zip(&other.confusion) {
            *a += b;
        }
        self.total += other.total;
        self.correct += other.correct;
        self.correct_top_k += other.correct_top_k;
        self.top_k_valid &= other.top_k_valid;
        self.loss_sum += other.loss_sum;
        self.loss_count += other.loss_count;
        Ok(())
    }

    /// Clears all counts and losses, keeping the number of classes and top-k.
    pub fn reset(&mut self) {
        self.confusion.fill(0);
        self.total = 0;
        self.correct = 0;
        self.correct_top_k = 0;
        self.top_k_valid = true;
        self.loss_sum = 0.0;
        self.loss_count = 0;
    }

    /// The number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The `k` of the tracked top-k accuracy, if any.
    pub fn top_k(&self) -> Option<usize> {
        self.top_k
    }

    /// The number of samples seen.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The number of samples whose top-1 prediction was right.
    pub fn correct(&self) -> u64 {
        self.correct
    }

    /// Top-1 accuracy as a fraction in `[0, 1]`; `0.0` before any sample.
    pub fn top1(&self) -> f64 {
        ratio(self.correct, self.total)
    }

    /// Top-k accuracy as a fraction in `[0, 1]` (`0.0` before any sample), or `None` when no
    /// top-k is tracked or hard predictions were fed.
    pub fn top_k_accuracy(&self) -> Option<f64> {
        match self.top_k {
            Some(_) if self.top_k_valid => Some(ratio(self.correct_top_k, self.total)),
            _ => None,
        }
    }

    /// The sample-weighted mean of the losses fed through [`add_loss`](Self::add_loss), or
    /// `None` if none was fed.
    pub fn mean_loss(&self) -> Option<f64> {
        (self.loss_count > 0).then(|| self.loss_sum / self.loss_count as f64)
    }

    /// The number of samples of true class `true_class` predicted as `predicted`.
    pub fn count(&self, true_class: usize, predicted: usize) -> u64 {
        if true_class < self.num_classes && predicted < self.num_classes {
            self.confusion[true_class * self.num_classes + predicted]
        } else {
            0
        }
    }

    /// The confusion matrix: rows are true classes, columns predicted classes.
    pub fn confusion_matrix(&self) -> ConfusionMatrix {
        ConfusionMatrix {
            counts: self
                .confusion
                .chunks_exact(self.num_classes)
                .map(<[u64]>::to_vec)
                .collect(),
        }
    }

    /// Per-class accuracy (recall: correct / samples of that class) with counts, named by
    /// class index.
    pub fn per_class(&self) -> Vec<ClassAccuracy> {
        self.per_class_named(&default_names(self.num_classes))
    }

    fn per_class_named(&self, names: &[String]) -> Vec<ClassAccuracy> {
        let c = self.num_classes;
        (0..c)
            .map(|class| {
                let support: u64 = self.confusion[class * c..(class + 1) * c].iter().sum();
                let predicted: u64 = (0..c).map(|t| self.confusion[t * c + class]).sum();
                let correct = self.confusion[class * c + class];
                ClassAccuracy {
                    class,
                    name: names[class].clone(),
                    support,
                    correct,
                    predicted,
                    accuracy: (support > 0).then(|| ratio(correct, support)),
                    precision: (predicted > 0).then(|| ratio(correct, predicted)),
                }
            })
            .collect()
    }

    /// The mean of the per-class accuracies over the classes that have samples (balanced
    /// accuracy), or `None` before any sample.
    pub fn mean_per_class_accuracy(&self) -> Option<f64> {
        let accuracies: Vec<f64> = self
            .per_class()
            .into_iter()
            .filter_map(|c| c.accuracy)
            .collect();
        (!accuracies.is_empty()).then(|| accuracies.iter().sum::<f64>() / accuracies.len() as f64)
    }

    /// A report with classes named by their index.
    pub fn report(&self) -> EvalReport {
        self.build_report(default_names(self.num_classes))
    }

    /// A report with the given class names, one per class.
    pub fn report_with_names<S: AsRef<str>>(&self, class_names: &[S]) -> Result<EvalReport> {
        if class_names.len() != self.num_classes {
            return Err(EvalError::LengthMismatch {
                what: "class names",
                expected: self.num_classes,
                got: class_names.len(),
            });
        }
        Ok(self.build_report(class_names.iter().map(|n| n.as_ref().to_string()).collect()))
    }

    fn build_report(&self, class_names: Vec<String>) -> EvalReport {
        EvalReport {
            num_samples: self.total,
            num_classes: self.num_classes,
            top1: self.top1(),
            top_k: self.top_k_accuracy().and(self.top_k),
            top_k_accuracy: self.top_k_accuracy(),
            mean_per_class_accuracy: self.mean_per_class_accuracy(),
            mean_loss: self.mean_loss(),
            per_class: self.per_class_named(&class_names),
            confusion_matrix: self.confusion_matrix(),
            class_names,
        }
    }
}

/// The predicted class (first maximum) and the rank of `label` under the crate's tie rule, or
/// `None` if the row holds a NaN.
pub(crate) fn rank_row<T: Copy + PartialOrd>(row: &[T], label: usize) -> Option<(usize, usize)> {
    let target = row[label];
    let mut best = 0;
    let mut rank = 0;
    for (j, &v) in row.iter().enumerate() {
        // Only NaN is unordered with itself.
        v.partial_cmp(&v)?;
        if v > row[best] {
            best = j;
        }
        if v > target || (v == target && j < label) {
            rank += 1;
        }
    }
    Some((best, rank))
}

/// The predicted class of a score row (first maximum), or `None` if it holds a NaN.
pub(crate) fn argmax<T: Copy + PartialOrd>(row: &[T]) -> Option<usize> {
    rank_row(row, 0).map(|(best, _)| best)
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

fn default_names(num_classes: usize) -> Vec<String> {
    (0..num_classes).map(|i| i.to_string()).collect()
}
