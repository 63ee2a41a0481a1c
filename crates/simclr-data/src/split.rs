//! Label-fraction splits: the labelled subset for fine-tuning, and the official split-file format.
//!
//! In SimCLRv2 every training image is unlabeled data; a fraction of them also keeps its label.
//! The official ImageNet subsets (`1percent.txt`, `10percent.txt`) are lists of file names, one per
//! line, `<wnid>_<id>.JPEG`, the class being the part before the first `_`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{DataError, Dataset, Result};

/// Rejects fractions outside (0, 1], NaN included.
pub fn validate_fraction(fraction: f64) -> Result<f64> {
    if fraction.is_finite() && fraction > 0.0 && fraction <= 1.0 {
        Ok(fraction)
    } else {
        Err(DataError::Fraction(fraction))
    }
}

/// A deterministic, class-balanced labelled subset: per class `round(F·n_c)` images, at least
/// one, drawn by `seed`. Returns sorted dataset indices.
pub fn class_balanced_subset(
    labels: &[usize],
    num_classes: usize,
    fraction: f64,
    seed: u64,
) -> Result<Vec<usize>> {
    let fraction = validate_fraction(fraction)?;
    let mut per_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        per_class[l].push(i);
    }
    let mut chosen = Vec::new();
    for (class, members) in per_class.iter_mut().enumerate() {
        if members.is_empty() {
            continue;
        }
        // One stream per class, so a class's choice does not depend on the others' sizes.
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (class as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        members.shuffle(&mut rng);
        let k = ((fraction * members.len() as f64).round() as usize).clamp(1, members.len());
        chosen.extend_from_slice(&members[..k]);
    }
    chosen.sort_unstable();
    Ok(chosen)
}

/// A class-balanced validation split carved out of a training set: `per_class` images of each
/// class, drawn by `seed` on a stream of their own (so the labelled split drawn from the rest
/// with the same seed is not correlated with it). Returns `(rest, validation)`, both sorted.
/// Errors if a class has `per_class` images or fewer: nothing of it would be left to train on.
pub fn validation_split(
    labels: &[usize],
    num_classes: usize,
    per_class: usize,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        members[l].push(i);
    }
    let (mut rest, mut val) = (Vec::new(), Vec::new());
    for (class, m) in members.iter_mut().enumerate() {
        if m.len() <= per_class {
            return Err(DataError::Config {
                name: "validation_per_class",
                value: per_class.to_string(),
                reason: format!(
                    "class {class} has only {} training images; the validation split must leave \
                     some to train on",
                    m.len()
                ),
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(
            (seed ^ 0x5641_4C49_4441_5445).wrapping_add((class as u64).wrapping_mul(0x2545_F491)),
        );
        m.shuffle(&mut rng);
        val.extend_from_slice(&m[..per_class]);
        rest.extend_from_slice(&m[per_class..]);
    }
    rest.sort_unstable();
    val.sort_unstable();
    Ok((rest, val))
}

/// Errors if a class of the dataset has no labelled image in `indices`.
pub fn check_all_classes_labelled(dataset: &dyn Dataset, indices: &[usize]) -> Result<()> {
    let mut seen = vec![false; dataset.num_classes()];
    for &i in indices {
        seen[dataset.label(i)] = true;
    }
    match seen.iter().position(|s| !s) {
        Some(index) => Err(DataError::ClassWithoutLabels {
            class: dataset.class_names()[index].clone(),
            index,
        }),
        None => Ok(()),
    }
}

/// Writes the split as a split file (one sample name per line), atomically.
pub fn write_split_file(path: &Path, dataset: &dyn Dataset, indices: &[usize]) -> Result<()> {
    let mut text = String::new();
    for &i in indices {
        text.push_str(&dataset.sample_name(i));
        text.push('\n');
    }
    crate::write_atomic(path, text.as_bytes())
}

/// Reads a split file against `dataset`; returns sorted indices.
///
/// Blank lines are ignored. Unknown names, names whose class is not in the dataset, and
/// duplicates are errors that give the line.
pub fn read_split_file(path: &Path, dataset: &dyn Dataset) -> Result<Vec<usize>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|_| DataError::SplitFile {
        path: path.into(),
        line: 0,
        reason: "not UTF-8 text".into(),
    })?;
    let index = dataset.name_index();
    let classes: HashSet<String> = index
        .keys()
        .filter_map(|k| k.split_once('_').map(|(c, _)| c.to_string()))
        .collect();
    let mut first_seen: HashMap<usize, usize> = HashMap::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let name = line.trim();
        if name.is_empty() {
            continue;
        }
        let err = |reason: String| DataError::SplitFile {
            path: path.into(),
            line: n + 1,
            reason,
        };
        let Some(&i) = index.get(name) else {
            let class = name.split_once('_').map(|(c, _)| c);
            return Err(err(match class {
                Some(c) if !classes.contains(c) => {
                    format!(
                        "{name:?}: class {c:?} is not in the dataset ({})",
                        dataset.describe()
                    )
                }
                _ => format!(
                    "{name:?} is not an image of the dataset ({})",
                    dataset.describe()
                ),
            }));
        };
        if let Some(prev) = first_seen.insert(i, n + 1) {
            return Err(err(format!(
                "{name:?} is listed twice (first on line {prev})"
            )));
        }
        out.push(i);
    }
    if out.is_empty() {
        return Err(DataError::SplitFile {
            path: path.into(),
            line: 0,
            reason: "the split file lists no image".into(),
        });
    }
    out.sort_unstable();
    Ok(out)
}
