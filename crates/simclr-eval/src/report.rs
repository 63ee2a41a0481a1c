use std::fmt;

use serde::{Deserialize, Serialize};

use crate::confusion::ConfusionMatrix;
use crate::table::{escape, markdown_table, percent, Align};

/// [`EvalReport::to_markdown`] includes the confusion matrix only up to this many classes (a
/// 1000-class matrix is not readable as a table); the JSON form always holds it.
pub const MAX_RENDERED_CONFUSION_CLASSES: usize = 50;

/// One class's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassAccuracy {
    /// The class index.
    pub class: usize,
    /// The class name (its index when no names were given).
    pub name: String,
    /// Samples whose true class is this one.
    pub support: u64,
    /// Of those, the samples predicted as this class.
    pub correct: u64,
    /// Samples predicted as this class, whatever their true class.
    pub predicted: u64,
    /// `correct / support` (recall), or `None` when the class has no sample.
    pub accuracy: Option<f64>,
    /// `correct / predicted`, or `None` when nothing was predicted as this class.
    pub precision: Option<f64>,
}

/// A snapshot of [`ClassificationMetrics`](crate::ClassificationMetrics) with class names,
/// serialisable with serde (for `report.json`) and renderable as Markdown (for `report.md` or
/// a terminal). Accuracies are fractions in `[0, 1]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The number of samples evaluated.
    pub num_samples: u64,
    /// The number of classes.
    pub num_classes: usize,
    /// One name per class.
    pub class_names: Vec<String>,
    /// Top-1 accuracy.
    pub top1: f64,
    /// The `k` of `top_k_accuracy`, when tracked.
    pub top_k: Option<usize>,
    /// Top-k accuracy, when tracked.
    pub top_k_accuracy: Option<f64>,
    /// The mean of the per-class accuracies over classes with samples (balanced accuracy).
    pub mean_per_class_accuracy: Option<f64>,
    /// The sample-weighted mean loss, when losses were fed.
    pub mean_loss: Option<f64>,
    /// Per-class results, in class order.
    pub per_class: Vec<ClassAccuracy>,
    /// Rows = true class, columns = predicted class.
    pub confusion_matrix: ConfusionMatrix,
}

impl EvalReport {
    /// A bullet list of the headline numbers.
    pub fn summary_markdown(&self) -> String {
        let mut out = format!(
            "- samples: {}\n- classes: {}\n- top-1 accuracy: {}\n",
            self.num_samples,
            self.num_classes,
            percent(self.top1)
        );
        if let (Some(k), Some(acc)) = (self.top_k, self.top_k_accuracy) {
            out.push_str(&format!("- top-{k} accuracy: {}\n", percent(acc)));
        }
        if let Some(acc) = self.mean_per_class_accuracy {
            out.push_str(&format!("- mean per-class accuracy: {}\n", percent(acc)));
        }
        if let Some(loss) = self.mean_loss {
            out.push_str(&format!("- mean loss: {loss:.4}\n"));
        }
        out
    }

    /// A Markdown table with one row per class: support, correct, accuracy (recall), predicted
    /// count and precision. A dash marks an accuracy or precision with no denominator.
    pub fn per_class_markdown(&self) -> String {
        let headers: Vec<String> = [
            "class",
            "name",
            "support",
            "correct",
            "accuracy",
            "predicted",
            "precision",
        ]
        .iter()
        .map(|h| h.to_string())
        .collect();
        let align = [
            Align::Right,
            Align::Left,
            Align::Right,
            Align::Right,
            Align::Right,
            Align::Right,
            Align::Right,
        ];
        let dash = || "-".to_string();
        let rows: Vec<Vec<String>> = self
            .per_class
            .iter()
            .map(|c| {
                vec![
                    c.class.to_string(),
                    escape(&c.name),
                    c.support.to_string(),
                    c.correct.to_string(),
                    c.accuracy.map(percent).unwrap_or_else(dash),
                    c.predicted.to_string(),
                    c.precision.map(percent).unwrap_or_else(dash),
                ]
            })
            .collect();
        markdown_table(&headers, &align, &rows)
    }

    /// The confusion matrix as a Markdown table (rows = true class, columns = predicted).
    pub fn confusion_markdown(&self) -> String {
        self.confusion_matrix.to_markdown(&self.class_names)
    }

    /// Summary, per-class table and confusion matrix (the latter only up to
    /// [`MAX_RENDERED_CONFUSION_CLASSES`] classes), under `###` headings.
    pub fn to_markdown(&self) -> String {
        let mut out = format!(
            "### Summary\n\n{}\n### Per-class accuracy\n\n{}\n### Confusion matrix\n\n",
            self.summary_markdown(),
            self.per_class_markdown()
        );
        if self.num_classes <= MAX_RENDERED_CONFUSION_CLASSES {
            out.push_str("Rows are true classes, columns predicted classes.\n\n");
            out.push_str(&self.confusion_markdown());
        } else {
            out.push_str(&format!(
                "Not rendered for {} classes (more than {MAX_RENDERED_CONFUSION_CLASSES}); \
                 the JSON report holds it.\n",
                self.num_classes
            ));
        }
        out
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_markdown())
    }
}
