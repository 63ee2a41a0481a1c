//! # simclr-eval
//!
//! Owns the model-independent half of evaluation:
//!
//! - **classification metrics**: [`ClassificationMetrics`], an accumulator fed batch by batch
//!   with logits (or any per-class scores) and labels, giving top-1 and top-k accuracy,
//!   per-class accuracy, the confusion matrix and the mean loss;
//! - **kNN evaluation**: [`KnnBank`], the weighted (or majority-vote) k-nearest-neighbour
//!   classifier on L2-normalised features that self-supervised training uses as a monitor;
//! - **evaluation reports**: [`EvalReport`], a serde-serialisable snapshot of the metrics with
//!   class names, and its Markdown rendering (summary, per-class table, confusion matrix).
//!
//! It does not own models, data loading or training: callers run their network (from
//! `simclr-models`) over batches (from `simclr-data`) and hand the resulting logits or features
//! to this crate as candle tensors. Nothing here depends on an architecture or a dataset.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use simclr_eval::{ClassificationMetrics, KnnBank, KnnConfig, KnnVote};
//!
//! # fn main() -> simclr_eval::Result<()> {
//! // Classification metrics, fed batch by batch.
//! let mut metrics = ClassificationMetrics::new(3)?;
//! let logits = Tensor::new(&[[2.0f32, 0.5, 0.1], [0.2, 0.1, 3.0]], &Device::Cpu)?;
//! metrics.update(&logits, &[0usize, 1])?;
//! metrics.add_loss(0.9, 2);
//! assert_eq!(metrics.top1(), 0.5);
//! let report = metrics.report_with_names(&["cat", "dog", "bird"])?;
//! println!("{}", report.to_markdown());
//!
//! // kNN on features: a labelled bank votes for each query.
//! let bank = Tensor::new(&[[1.0f32, 0.0], [0.9, 0.1], [0.0, 1.0]], &Device::Cpu)?;
//! let bank = KnnBank::new(&bank, &[0usize, 0, 1], 2)?;
//! let queries = Tensor::new(&[[1.0f32, 0.2], [0.1, 1.0]], &Device::Cpu)?;
//! let config = KnnConfig { k: 2, ..KnnConfig::default() };
//! let result = bank.evaluate(&queries, &[0usize, 1], &config, KnnVote::Weighted)?;
//! assert_eq!(result.predictions, vec![0, 1]);
//! # Ok(())
//! # }
//! ```
//!
//! Every entry point validates its input (shapes, label ranges, non-finite scores) and returns
//! an [`EvalError`] naming the value at fault rather than panicking; a batch that fails
//! validation leaves an accumulator unchanged.

mod confusion;
mod error;
pub mod extract;
pub mod knn;
mod labels;
mod metrics;
mod report;
mod table;

pub use confusion::ConfusionMatrix;
pub use error::{EvalError, Result};
pub use extract::{evaluate_classifier, features, knn_top1, KnnData};
pub use knn::{knn_evaluate, KnnBank, KnnConfig, KnnResult, KnnVote};
pub use labels::LabelSource;
pub use metrics::{ClassificationMetrics, DEFAULT_TOP_K};
pub use report::{ClassAccuracy, EvalReport, MAX_RENDERED_CONFUSION_CLASSES};
