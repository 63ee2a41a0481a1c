//! Image datasets published on the Hugging Face Hub as parquet (e.g. `zalando-datasets/fashion_mnist`,
//! `uoft-cs/cifar10`): an image column holding `{bytes, path}` and an integer label column.
//!
//! Files are looked up in the local Hub cache first (`HF_HUB_CACHE`, `HF_HOME/hub`, or
//! `~/.cache/huggingface/hub`, in the standard `datasets--owner--name/{refs,snapshots}` layout);
//! the network is used only when the cache lacks them and `HF_HUB_OFFLINE` is not set.
//!
//! The images are read lazily: opening a split reads the files' metadata and the label column
//! only; an image's row group is read (its encoded bytes, not decoded) when one of its images is
//! asked for, and kept in a cache bounded by [`HubOptions::max_cache_bytes`], least recently
//! used out first. Each image is decoded when asked for, as an ImageFolder's are. The loader's
//! shuffle visits a few row groups at a time ([`crate::Dataset::read_block`]), so that a
//! dataset larger than memory is read about once per epoch.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::{DataError, Dataset, Image, Result};

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
    /// The most encoded image bytes kept in memory at once; `None`: [`DEFAULT_CACHE_BYTES`].
    /// Row groups are read when an image of theirs is asked for and dropped, least recently
    /// used first, beyond this.
    pub max_cache_bytes: Option<usize>,
}

/// The default of [`HubOptions::max_cache_bytes`]: 1 GiB.
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

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
pub fn read_hub_dataset(repo_id: &str, split: &str, opts: &HubOptions) -> Result<HubDataset> {
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
    let mut index = HubIndex::default();
    for (k, f) in files.iter().enumerate() {
        guarded(f, || index_file(k, f, &mut index, opts))?;
    }
    if index.labels.is_empty() {
        return Err(DataError::format(&files[0], "no rows in the parquet files"));
    }
    // A row of the dataset as (its file, its row in that file), for errors.
    let place = |row: usize| {
        let g = index.groups.partition_point(|g| g.first + g.rows <= row);
        let file = index.groups.get(g).map_or(0, |g| g.file);
        let first = index
            .groups
            .iter()
            .find(|g| g.file == file)
            .map_or(0, |g| g.first);
        (&files[file], row - first)
    };
    let class_names = match index.class_names.clone() {
        Some(names) => names,
        None => {
            // Without names the classes are 0..=max label; a label from a damaged file must not
            // size that list (one such label asked for 2^60 names).
            let (row, max) = index
                .labels
                .iter()
                .enumerate()
                .max_by_key(|(_, &l)| l)
                .map_or((0, 0), |(i, &l)| (i, l));
            if max >= MAX_UNNAMED_CLASSES {
                let (file, row) = place(row);
                return Err(DataError::format(
                    file,
                    format!(
                        "row {row}: label {max} with no class names in the file's metadata; \
                         more than {MAX_UNNAMED_CLASSES} classes is not a plausible label set"
                    ),
                ));
            }
            (0..=max).map(|i| i.to_string()).collect()
        }
    };
    if let Some((i, &l)) = index
        .labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l >= class_names.len())
    {
        let (file, i) = place(i);
        return Err(DataError::format(
            file,
            format!(
                "row {i}: label {l} is out of range ({} class names)",
                class_names.len()
            ),
        ));
    }
    let budget = opts.max_cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES).max(1);
    let largest = index
        .groups
        .iter()
        .map(|g| g.bytes)
        .max()
        .unwrap_or(1)
        .max(1);
    let window = (budget / largest).clamp(1, index.groups.len().max(1));
    let slots = (0..index.groups.len()).map(|_| Mutex::new(())).collect();
    Ok(HubDataset {
        source: format!("hf:{repo_id} ({split}, {} parquet files)", files.len()),
        files,
        groups: index.groups,
        labels: index.labels,
        class_names,
        image_column: opts.image_column.clone(),
        budget,
        window,
        cache: Mutex::new(GroupCache::default()),
        slots,
    })
}

/// The most classes a dataset without class names in its metadata may have (ImageNet-21k has
/// 21,841).
const MAX_UNNAMED_CLASSES: usize = 1 << 20;

/// One row group of one file: the rows `first..first + rows` of the dataset.
#[derive(Debug, Clone, Copy)]
struct RowGroup {
    file: usize,
    group: usize,
    first: usize,
    rows: usize,
    /// The row group's uncompressed size as its metadata gives it (what sizes the window).
    bytes: usize,
}

#[derive(Default)]
struct HubIndex {
    groups: Vec<RowGroup>,
    labels: Vec<usize>,
    class_names: Option<Vec<String>>,
}

/// The encoded images of one row group, in row order.
type GroupImages = Arc<Vec<Vec<u8>>>;

/// The row groups read lately as `(group, images, bytes)`, least recently used first.
#[derive(Default)]
struct GroupCache {
    entries: Vec<(usize, GroupImages, usize)>,
    bytes: usize,
}

impl GroupCache {
    fn get(&mut self, group: usize) -> Option<GroupImages> {
        let at = self.entries.iter().position(|(g, _, _)| *g == group)?;
        let entry = self.entries.remove(at);
        let images = entry.1.clone();
        self.entries.push(entry);
        Some(images)
    }

    /// Adds `images`, then drops the least recently used groups while over `budget` (the new
    /// one stays, whatever its size).
    fn insert(&mut self, group: usize, images: GroupImages, budget: usize) {
        let size: usize = images.iter().map(Vec::len).sum();
        self.entries.push((group, images, size));
        self.bytes += size;
        while self.bytes > budget && self.entries.len() > 1 {
            let (_, _, dropped) = self.entries.remove(0);
            self.bytes -= dropped;
        }
    }
}

/// A Hub dataset split read lazily from its parquet files (see the module documentation).
pub struct HubDataset {
    files: Vec<PathBuf>,
    groups: Vec<RowGroup>,
    labels: Vec<usize>,
    class_names: Vec<String>,
    image_column: Option<String>,
    source: String,
    budget: usize,
    window: usize,
    cache: Mutex<GroupCache>,
    /// One lock per row group, held while it is read, so that threads asking for images of the
    /// same group read it once.
    slots: Vec<Mutex<()>>,
}

impl HubDataset {
    /// The row group holding row `index`.
    fn group_of(&self, index: usize) -> usize {
        self.groups.partition_point(|g| g.first + g.rows <= index)
    }

    /// The encoded images of row group `g`, from the cache or the file.
    fn group_images(&self, g: usize) -> Result<GroupImages> {
        if let Some(images) = self.cache().get(g) {
            return Ok(images);
        }
        let _reading = self.slots[g].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(images) = self.cache().get(g) {
            return Ok(images);
        }
        let group = self.groups[g];
        let path = &self.files[group.file];
        let images = Arc::new(guarded(path, || {
            read_group_images(path, group, self.image_column.as_deref())
        })?);
        self.cache().insert(g, images.clone(), self.budget);
        Ok(images)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, GroupCache> {
        // A panic elsewhere cannot leave the cache inconsistent: each method restores it.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Encoded image bytes held in the cache now.
    pub fn cached_bytes(&self) -> usize {
        self.cache().bytes
    }
}

impl Dataset for HubDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn label(&self, index: usize) -> usize {
        self.labels[index]
    }
    fn class_names(&self) -> &[String] {
        &self.class_names
    }
    fn image(&self, index: usize) -> Result<Image> {
        let g = self.group_of(index);
        let images = self.group_images(g)?;
        let group = self.groups[g];
        let row = index - group.first;
        decode_image(&images[row]).map_err(|reason| DataError::Decode {
            path: self.files[group.file].clone(),
            reason: format!("row {row} of row group {}: {reason}", group.group),
        })
    }
    fn sample_name(&self, index: usize) -> String {
        format!("{}_{index:06}", self.labels[index])
    }
    fn describe(&self) -> String {
        self.source.clone()
    }
    fn read_block(&self, index: usize) -> Option<usize> {
        Some(self.group_of(index))
    }
    fn read_window(&self) -> usize {
        self.window
    }
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

/// Runs `read` on parquet file `path`. The parquet crate panics on some malformed files (slice
/// indices taken from the file without a check, found by `cargo xtask fuzz parquet`): such a
/// panic becomes this file's error instead of taking the process down.
fn guarded<T>(path: &Path, read: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)) {
        Ok(result) => result,
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

fn open_reader(path: &Path) -> Result<SerializedFileReader<File>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    SerializedFileReader::new(file)
        .map_err(|e| DataError::format(path, format!("not a readable parquet file: {e}")))
}

/// The label column: the one named, else the last top-level integer column whose name contains
/// `label`, else the first integer column.
fn label_column(schema: &parquet::schema::types::Type, named: Option<&str>) -> Option<String> {
    use parquet::basic::Type as Physical;
    let integers: Vec<&str> = schema
        .get_fields()
        .iter()
        .filter(|f| {
            f.is_primitive() && matches!(f.get_physical_type(), Physical::INT32 | Physical::INT64)
        })
        .map(|f| f.name())
        .collect();
    match named {
        Some(c) => integers.iter().find(|&&n| n == c).map(|n| n.to_string()),
        None => integers
            .iter()
            .rev()
            .find(|n| n.contains("label"))
            .or(integers.first())
            .map(|n| n.to_string()),
    }
}

/// Adds the row groups and labels of file number `file` to `index` (the label column alone is
/// read).
fn index_file(file: usize, path: &Path, index: &mut HubIndex, opts: &HubOptions) -> Result<()> {
    let bad = |reason: String| DataError::format(path, reason);
    let reader = open_reader(path)?;
    if index.class_names.is_none() {
        index.class_names = class_names_from_metadata(&reader, opts.label_column.as_deref());
    }
    let schema = reader.metadata().file_metadata().schema();
    let column = label_column(schema, opts.label_column.as_deref()).ok_or_else(|| {
        bad(match &opts.label_column {
            Some(c) => format!("no integer column {c:?}"),
            None => "no integer label column".into(),
        })
    })?;
    // The image column is checked here too, so that a wrong name fails before training.
    let image_here = |f: &parquet::schema::types::TypePtr| match opts.image_column.as_deref() {
        Some(c) => f.name() == c,
        None => {
            matches!(f.name(), "image" | "img")
                || (!f.is_primitive() && f.get_fields().iter().any(|c| c.name() == "bytes"))
        }
    };
    if !schema.get_fields().iter().any(image_here) {
        return Err(bad(match &opts.image_column {
            Some(c) => format!("no column {c:?} with encoded image bytes"),
            None => "no image column with encoded bytes".into(),
        }));
    }
    let field = schema
        .get_fields()
        .iter()
        .find(|f| f.name() == column)
        .cloned()
        .ok_or_else(|| bad(format!("no column {column:?}")))?;
    let projection = parquet::schema::types::Type::group_type_builder(schema.name())
        .with_fields(vec![field])
        .build()
        .map_err(|e| bad(format!("column {column:?}: {e}")))?;
    let mut row_in_file = 0usize;
    for g in 0..reader.num_row_groups() {
        let meta = reader.metadata().row_group(g);
        let first = index.labels.len();
        let cannot =
            |e: parquet::errors::ParquetError| bad(format!("row group {g}: cannot read rows: {e}"));
        let group_reader = reader.get_row_group(g).map_err(cannot)?;
        let rows = group_reader
            .get_row_iter(Some(projection.clone()))
            .map_err(cannot)?;
        for row in rows {
            let i = row_in_file;
            row_in_file += 1;
            let row = row.map_err(|e| bad(format!("row {i}: {e}")))?;
            let label = row.get_column_iter().find_map(|(_, f)| match f {
                Field::Long(l) => Some(*l),
                Field::Int(l) => Some(i64::from(*l)),
                _ => None,
            });
            let label =
                label.ok_or_else(|| bad(format!("row {i}: no label in column {column:?}")))?;
            let label = usize::try_from(label)
                .map_err(|_| bad(format!("row {i}: negative label {label}")))?;
            index.labels.push(label);
        }
        let rows = index.labels.len() - first;
        if rows > 0 {
            index.groups.push(RowGroup {
                file,
                group: g,
                first,
                rows,
                bytes: group_bytes(meta, path),
            });
        }
    }
    Ok(())
}

/// What a row group weighs in memory, to size the shuffle's window: its uncompressed size as the
/// metadata gives it, else its compressed size, else the whole file's size (an upper bound: a
/// writer may leave the sizes out, and a window of every group would read each group once per
/// image).
fn group_bytes(meta: &parquet::file::metadata::RowGroupMetaData, path: &Path) -> usize {
    let positive = |v: i64| usize::try_from(v).ok().filter(|&b| b > 0);
    positive(meta.total_byte_size())
        .or_else(|| positive(meta.compressed_size()))
        .unwrap_or_else(|| {
            std::fs::metadata(path).map_or(1, |m| usize::try_from(m.len()).unwrap_or(usize::MAX))
        })
}

/// The encoded image bytes of every row of row group `group`.
fn read_group_images(
    path: &Path,
    group: RowGroup,
    image_col: Option<&str>,
) -> Result<Vec<Vec<u8>>> {
    let bad = |reason: String| DataError::format(path, reason);
    let reader = open_reader(path)?;
    let cannot = |e: parquet::errors::ParquetError| {
        bad(format!("row group {}: cannot read rows: {e}", group.group))
    };
    let group_reader = reader.get_row_group(group.group).map_err(cannot)?;
    let rows = group_reader.get_row_iter(None).map_err(cannot)?;
    let mut out = Vec::with_capacity(group.rows);
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {i} of row group {}: {e}", group.group)))?;
        let mut bytes = None;
        for (col, field) in row.get_column_iter() {
            let col = col.as_str();
            // A named column is the only one read; without a name, the usual guesses.
            let image_here = image_col.is_none_or(|c| c == col);
            let raw_image_here = match image_col {
                Some(c) => c == col,
                None => col == "image" || col == "img",
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
                _ => {}
            }
        }
        out.push(bytes.ok_or_else(|| {
            bad(match image_col {
                Some(c) => format!(
                    "row {i} of row group {}: no column {c:?} with encoded image bytes",
                    group.group
                ),
                None => format!(
                    "row {i} of row group {}: no image column with encoded bytes",
                    group.group
                ),
            })
        })?);
    }
    if out.len() != group.rows {
        return Err(bad(format!(
            "row group {} has {} rows, its label column {}",
            group.group,
            out.len(),
            group.rows
        )));
    }
    Ok(out)
}

/// A decoded image, 1 channel for a grey one, else 3.
fn decode_image(bytes: &[u8]) -> std::result::Result<Image, String> {
    let img = crate::folder::decode_encoded(bytes).map_err(|e| e.to_string())?;
    Ok(if img.color().has_color() {
        let rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        Image::new(h as usize, w as usize, 3, rgb.into_raw())
    } else {
        let l = img.to_luma8();
        let (w, h) = l.dimensions();
        Image::new(h as usize, w as usize, 1, l.into_raw())
    })
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
