//! Image datasets published on the Hugging Face Hub as parquet (e.g. `zalando-datasets/fashion_mnist`,
//! `uoft-cs/cifar10`): an image column holding `{bytes, path}` and an integer label column.
//!
//! Files are looked up in the local Hub cache first (`HF_HUB_CACHE`, `HF_HOME/hub`, or
//! `~/.cache/huggingface/hub`, in the standard `datasets--owner--name/{refs,snapshots}` layout);
//! the network is used only when the cache lacks them and `HF_HUB_OFFLINE` is not set.

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::{DataError, Image, InMemoryDataset, Result};

/// Revisions tried in the cache: the repository's own files, then the Hub's parquet conversion.
const REVISIONS: [&str; 2] = ["main", "refs/convert/parquet"];

#[derive(Clone, Debug, Default)]
pub struct HubOptions {
    /// Cache root; `None` follows the Hub's environment variables.
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network (also set by `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// A branch, tag or commit; `None` tries `main` then `refs/convert/parquet`.
    pub revision: Option<String>,
    /// The column holding the encoded images (an `{bytes, path}` struct or raw bytes); `None`:
    /// `image` or `img`, or any struct column with a `bytes` field.
    pub image_column: Option<String>,
    /// The integer label column; `None`: a column whose name contains `label`, else the first
    /// integer column.
    pub label_column: Option<String>,
}

pub fn default_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return Path::new(&p).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    Path::new(&home).join(".cache/huggingface/hub")
}

fn env_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

fn split_repo(repo_id: &str) -> Result<(&str, &str)> {
    match repo_id.split_once('/') {
        Some((o, n)) if !o.is_empty() && !n.is_empty() && !n.contains('/') => Ok((o, n)),
        _ => Err(DataError::Config {
            name: "dataset",
            value: format!("hf:{repo_id}"),
            reason: "a Hub dataset is named hf:<owner>/<name>".into(),
        }),
    }
}

fn walk_parquet(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk_parquet(&p, out);
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
}

/// Whether a parquet file in a Hub repository belongs to `split` (`train-00000-of-00001.parquet`,
/// `plain_text/test-….parquet`, `train/0000.parquet`).
fn is_split_file(relative: &str, split: &str) -> bool {
    relative.split('/').any(|part| {
        part == split
            || part.starts_with(&format!("{split}-"))
            || part.starts_with(&format!("{split}."))
    })
}

/// The cached parquet files of `split`, if the cache holds a snapshot for one of the revisions.
fn cached_files(
    cache: &Path,
    owner: &str,
    name: &str,
    split: &str,
    revisions: &[&str],
) -> Vec<PathBuf> {
    let repo = cache.join(format!("datasets--{owner}--{name}"));
    for rev in revisions {
        let commit = std::fs::read_to_string(repo.join("refs").join(rev))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| rev.to_string());
        let snapshot = repo.join("snapshots").join(&commit);
        let mut files = Vec::new();
        walk_parquet(&snapshot, &mut files);
        files.retain(|f| {
            f.strip_prefix(&snapshot)
                .ok()
                .and_then(|r| r.to_str())
                .is_some_and(|r| is_split_file(r, split))
        });
        if !files.is_empty() {
            files.sort();
            return files;
        }
    }
    Vec::new()
}

#[cfg(not(feature = "hub"))]
fn download_files(
    owner: &str,
    name: &str,
    _split: &str,
    revision: &str,
    _cache: &Path,
) -> Result<Vec<PathBuf>> {
    Err(DataError::Hub(format!(
        "{owner}/{name}@{revision} is not in the local Hub cache, and this build cannot download \
         it (simclr-data without its `hub` feature)"
    )))
}

#[cfg(feature = "hub")]
fn download_files(
    owner: &str,
    name: &str,
    split: &str,
    revision: &str,
    cache: &Path,
) -> Result<Vec<PathBuf>> {
    let hub = |e: hf_hub::HFError| DataError::Hub(format!("{owner}/{name}@{revision}: {e}"));
    let client = hf_hub::HFClient::builder()
        .cache_dir(cache)
        .build_sync()
        .map_err(hub)?;
    let repo = client.dataset(owner, name);
    let info = repo.info().revision(revision).send().map_err(hub)?;
    let mut names: Vec<String> = info
        .siblings
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| f.ends_with(".parquet") && is_split_file(f, split))
        .collect();
    names.sort();
    names
        .iter()
        .map(|f| {
            repo.download_file()
                .filename(f)
                .revision(revision)
                .send()
                .map_err(hub)
        })
        .collect()
}

/// Reads split `split` ("train", "test", …) of Hub dataset `repo_id` ("owner/name").
pub fn read_hub_dataset(repo_id: &str, split: &str, opts: &HubOptions) -> Result<InMemoryDataset> {
    let (owner, name) = split_repo(repo_id)?;
    let cache = opts.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let revisions: Vec<&str> = match &opts.revision {
        Some(r) => vec![r.as_str()],
        None => REVISIONS.to_vec(),
    };
    let mut files = cached_files(&cache, owner, name, split, &revisions);
    if files.is_empty() {
        if opts.offline || env_offline() {
            return Err(DataError::NotFound {
                name: format!("hf:{repo_id} ({split})"),
                help: format!(
                    "offline mode and no cached parquet files for split {split:?} under {} (revisions {revisions:?}); \
                     download them once with network access, or point HF_HUB_CACHE at a cache that has them",
                    cache.join(format!("datasets--{owner}--{name}")).display()
                ),
            });
        }
        files = download_files(owner, name, split, revisions[revisions.len() - 1], &cache)?;
        if files.is_empty() {
            return Err(DataError::NotFound {
                name: format!("hf:{repo_id} ({split})"),
                help: format!(
                    "the dataset has no parquet files for split {split:?} at revision {:?}; \
                     check the split name (the test split is read for kNN monitoring and evaluation)",
                    revisions[revisions.len() - 1]
                ),
            });
        }
    }
    let mut ds: Option<ParquetParts> = None;
    for f in &files {
        read_parquet_file(f, ds.get_or_insert_with(ParquetParts::default), opts)?;
    }
    let parts = ds.unwrap_or_default();
    if parts.images.is_empty() {
        return Err(DataError::format(&files[0], "no rows in the parquet files"));
    }
    let class_names = match parts.class_names.clone() {
        Some(names) => names,
        None => {
            // Without names the classes are 0..=max label; a label from a damaged file must not
            // size that list (one such label asked for 2^60 names).
            let (row, max) = parts
                .labels
                .iter()
                .enumerate()
                .max_by_key(|(_, &l)| l)
                .map_or((0, 0), |(i, &l)| (i, l));
            if max >= MAX_UNNAMED_CLASSES {
                return Err(DataError::format(
                    &files[0],
                    format!(
                        "row {row}: label {max} with no class names in the file's metadata; \
                         more than {MAX_UNNAMED_CLASSES} classes is not a plausible label set"
                    ),
                ));
            }
            (0..=max).map(|i| i.to_string()).collect()
        }
    };
    if let Some((i, &l)) = parts
        .labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l >= class_names.len())
    {
        return Err(DataError::format(
            &files[0],
            format!(
                "row {i}: label {l} is out of range ({} class names)",
                class_names.len()
            ),
        ));
    }
    Ok(InMemoryDataset::new(
        parts.images,
        parts.labels,
        class_names,
        format!("hf:{repo_id} ({split}, {} parquet files)", files.len()),
    ))
}

/// The most classes a dataset without class names in its metadata may have (ImageNet-21k has
/// 21,841).
const MAX_UNNAMED_CLASSES: usize = 1 << 20;

#[derive(Default)]
struct ParquetParts {
    images: Vec<Image>,
    labels: Vec<usize>,
    class_names: Option<Vec<String>>,
}

/// Class names from the `huggingface` key-value metadata the `datasets` library writes
/// (`info.features.<label>.names` of a ClassLabel).
fn class_names_from_metadata(
    reader: &SerializedFileReader<File>,
    label_column: Option<&str>,
) -> Option<Vec<String>> {
    let kv = reader.metadata().file_metadata().key_value_metadata()?;
    let json = kv.iter().find(|k| k.key == "huggingface")?.value.as_ref()?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let features = v.get("info")?.get("features")?.as_object()?;
    features
        .iter()
        .filter(|(name, _)| label_column.is_none_or(|c| c == name.as_str()))
        .map(|(_, f)| f)
        .find_map(|f| {
            (f.get("_type")?.as_str()? == "ClassLabel").then(|| {
                f.get("names")?
                    .as_array()?
                    .iter()
                    .map(|n| n.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
            })?
        })
}

/// [`read_rows`] of one parquet file. The parquet crate panics on some malformed files
/// (slice indices taken from the file without a check, found by `cargo xtask fuzz parquet`):
/// such a panic becomes this file's error instead of taking the process down.
fn read_parquet_file(path: &Path, parts: &mut ParquetParts, opts: &HubOptions) -> Result<()> {
    let mut local = ParquetParts {
        class_names: parts.class_names.take(),
        ..Default::default()
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_rows(path, &mut local, opts)
    }));
    parts.class_names = local.class_names.take();
    match result {
        Ok(Ok(())) => {
            parts.images.append(&mut local.images);
            parts.labels.append(&mut local.labels);
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(DataError::format(
                path,
                format!("malformed parquet data (the reader failed: {what})"),
            ))
        }
    }
}

fn read_rows(path: &Path, parts: &mut ParquetParts, opts: &HubOptions) -> Result<()> {
    let bad = |reason: String| DataError::format(path, reason);
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| bad(format!("not a readable parquet file: {e}")))?;
    if parts.class_names.is_none() {
        parts.class_names = class_names_from_metadata(&reader, opts.label_column.as_deref());
    }
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| bad(format!("cannot read rows: {e}")))?;
    let (image_col, label_col) = (opts.image_column.as_deref(), opts.label_column.as_deref());
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {i}: {e}")))?;
        let mut bytes = None;
        let mut label = None;
        for (col, field) in row.get_column_iter() {
            let col = col.as_str();
            // A named column is the only one read; without a name, the usual guesses.
            let image_here = image_col.is_none_or(|c| c == col);
            let raw_image_here = match image_col {
                Some(c) => c == col,
                None => col == "image" || col == "img",
            };
            let label_here = match label_col {
                Some(c) => c == col,
                None => label.is_none() || col.contains("label"),
            };
            match field {
                Field::Group(g) if image_here => {
                    for (k, v) in g.get_column_iter() {
                        if let (true, Field::Bytes(b)) = (k == "bytes", v) {
                            bytes = Some(b.data().to_vec());
                        }
                    }
                }
                Field::Bytes(b) if raw_image_here => bytes = Some(b.data().to_vec()),
                Field::Long(l) if label_here => label = Some(*l),
                Field::Int(l) if label_here => label = Some(*l as i64),
                _ => {}
            }
        }
        let bytes = bytes.ok_or_else(|| {
            bad(match image_col {
                Some(c) => format!("row {i}: no column {c:?} with encoded image bytes"),
                None => format!("row {i}: no image column with encoded bytes"),
            })
        })?;
        let label = label.ok_or_else(|| {
            bad(match label_col {
                Some(c) => format!("row {i}: no integer column {c:?}"),
                None => format!("row {i}: no integer label column"),
            })
        })?;
        let label =
            usize::try_from(label).map_err(|_| bad(format!("row {i}: negative label {label}")))?;
        let img = crate::folder::decode_encoded(&bytes).map_err(|e| DataError::Decode {
            path: path.to_path_buf(),
            reason: format!("row {i}: {e}"),
        })?;
        let img = if img.color().has_color() {
            let rgb = img.to_rgb8();
            let (w, h) = rgb.dimensions();
            Image::new(h as usize, w as usize, 3, rgb.into_raw())
        } else {
            let l = img.to_luma8();
            let (w, h) = l.dimensions();
            Image::new(h as usize, w as usize, 1, l.into_raw())
        };
        parts.images.push(img);
        parts.labels.push(label);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_file_names() {
        assert!(is_split_file(
            "fashion_mnist/train-00000-of-00001.parquet",
            "train"
        ));
        assert!(is_split_file(
            "plain_text/test-00000-of-00001.parquet",
            "test"
        ));
        assert!(is_split_file("default/train/0000.parquet", "train"));
        assert!(!is_split_file(
            "plain_text/test-00000-of-00001.parquet",
            "train"
        ));
        assert!(!is_split_file("trainer/x.parquet", "train"));
    }
}
