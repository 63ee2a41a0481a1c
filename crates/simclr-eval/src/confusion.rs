use serde::{Deserialize, Serialize};

use crate::table::{escape, markdown_table, Align};

/// A confusion matrix: `counts[t][p]` is the number of samples of true class `t` predicted as
/// class `p` (rows = true class, columns = predicted class).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    /// One row per true class, one column per predicted class.
    pub counts: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    /// The number of classes.
    pub fn num_classes(&self) -> usize {
        self.counts.len()
    }

    /// The number of samples of class `true_class` predicted as `predicted` (0 out of range).
    pub fn get(&self, true_class: usize, predicted: usize) -> u64 {
        self.counts
            .get(true_class)
            .and_then(|row| row.get(predicted))
            .copied()
            .unwrap_or(0)
    }

    /// The number of samples of each true class (row sums).
    pub fn support(&self) -> Vec<u64> {
        self.counts.iter().map(|row| row.iter().sum()).collect()
    }

    /// The number of samples predicted as each class (column sums).
    pub fn predicted(&self) -> Vec<u64> {
        let mut sums = vec![0; self.num_classes()];
        for row in &self.counts {
            for (sum, &count) in sums.iter_mut().zip(row) {
                *sum += count;
            }
        }
        sums
    }

    /// The total number of samples.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// A Markdown table: one row per true class (labelled `index name`), one column per
    /// predicted class (labelled by index), and a row-total column. `class_names` may be empty,
    /// in which case rows are labelled by index only.
    pub fn to_markdown<S: AsRef<str>>(&self, class_names: &[S]) -> String {
        let c = self.num_classes();
        let mut headers = vec!["true \\ predicted".to_string()];
        headers.extend((0..c).map(|i| i.to_string()));
        headers.push("total".to_string());
        let mut align = vec![Align::Left];
        align.extend(std::iter::repeat_n(Align::Right, c + 1));
        let rows: Vec<Vec<String>> = self
            .counts
            .iter()
            .enumerate()
            .map(|(t, row)| {
                let label = match class_names.get(t) {
                    Some(name) if !name.as_ref().is_empty() && name.as_ref() != t.to_string() => {
                        format!("{t} {}", escape(name.as_ref()))
                    }
                    _ => t.to_string(),
                };
                let mut cells = vec![label];
                cells.extend(row.iter().map(u64::to_string));
                cells.push(row.iter().sum::<u64>().to_string());
                cells
            })
            .collect();
        markdown_table(&headers, &align, &rows)
    }
}
