//! ImageFolder: the ImageNet layout `root/<class>/<file>.JPEG`, and the ILSVRC-2012 validation
//! folder as distributed (all images in one folder, labels in a list).
//!
//! Classes are the sorted folder names (for ImageNet the WNIDs, which is also the TFDS class
//! order); files are listed once, sorted, and decoded on demand so a dataset of any size fits.
//!
//! A flat validation folder takes its labels from `LOC_val_solution.csv` (the Kaggle copy of
//! ILSVRC-2012: a header `ImageId,PredictionString`, then per image its name without extension
//! and boxes `wnid x_min y_min x_max y_max …`, whose first WNID is the label) or from
//! `val_labels.txt` (`<file name> <wnid>` per line), found in the dataset's folder or the
//! validation folder itself. The WNIDs must be the training split's class folders.

use std::path::{Path, PathBuf};

use crate::{DataError, Dataset, Image, Result};

const EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "jpe"];

#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    class_names: Vec<String>,
    files: Vec<PathBuf>,
    labels: Vec<usize>,
}

/// The Kaggle copy's validation labels.
pub const LOC_SOLUTION: &str = "LOC_val_solution.csv";
/// A plain list, `<file name> <wnid>` per line.
pub const VAL_LABELS: &str = "val_labels.txt";

/// `image name -> wnid` from either list format (by the file's name).
fn parse_label_list(path: &Path, text: &str) -> Result<std::collections::HashMap<String, String>> {
    let csv = path
        .file_name()
        .is_some_and(|n| n == std::ffi::OsStr::new(LOC_SOLUTION));
    let mut out = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (csv && i == 0 && line.starts_with("ImageId")) {
            continue;
        }
        let bad = |why: &str| DataError::format(path, format!("line {}: {why}: {line:?}", i + 1));
        let (name, wnid) = if csv {
            let (id, boxes) = line
                .split_once(',')
                .ok_or_else(|| bad("expected ImageId,PredictionString"))?;
            (id.trim(), boxes.split_whitespace().next().unwrap_or(""))
        } else {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(n), Some(w), None) => (n, w),
                _ => return Err(bad("expected `<file name> <wnid>`")),
            }
        };
        if name.is_empty() || wnid.is_empty() {
            return Err(bad("an empty image name or label"));
        }
        if out.insert(name.to_string(), wnid.to_string()).is_some() {
            return Err(bad("a second label for the same image"));
        }
    }
    Ok(out)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        out.push(entry.map_err(|e| DataError::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

impl ImageFolder {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let mut class_names = Vec::new();
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for class_dir in sorted_entries(&root)?.into_iter().filter(|p| p.is_dir()) {
            let name = class_dir
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| DataError::format(&class_dir, "class folder name is not UTF-8"))?
                .to_string();
            let images: Vec<PathBuf> = sorted_entries(&class_dir)?
                .into_iter()
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            if images.is_empty() {
                return Err(DataError::EmptyClass {
                    path: class_dir,
                    class: name,
                });
            }
            labels.extend(std::iter::repeat_n(class_names.len(), images.len()));
            files.extend(images);
            class_names.push(name);
        }
        if class_names.is_empty() {
            return Err(DataError::format(
                &root,
                "no class folders: an ImageFolder is root/<class>/<image>.JPEG",
            ));
        }
        Ok(ImageFolder {
            root,
            class_names,
            files,
            labels,
        })
    }

    /// Whether `dir` holds images directly and no class folders (a flat validation folder).
    pub fn is_flat(dir: &Path) -> Result<bool> {
        let entries = sorted_entries(dir)?;
        Ok(!entries.iter().any(|p| p.is_dir()) && entries.iter().any(|p| is_image(p)))
    }

    /// A flat folder of images labelled by a list (see the module doc) looked for in `root`
    /// and in `dir`; `classes` are the training split's class folders, in order. An image
    /// without a label, a label that is not a class, or a malformed line is an error naming the
    /// list (and line).
    pub fn open_flat(dir: &Path, root: &Path, classes: &[String]) -> Result<Self> {
        let lists = [
            root.join(LOC_SOLUTION),
            dir.join(LOC_SOLUTION),
            root.join(VAL_LABELS),
            dir.join(VAL_LABELS),
        ];
        let Some(list) = lists.iter().find(|p| p.is_file()) else {
            return Err(DataError::format(
                dir,
                format!(
                    "images without class folders need their labels in {LOC_SOLUTION} or {VAL_LABELS} (in {} or this folder)",
                    root.display()
                ),
            ));
        };
        if classes.is_empty() {
            return Err(DataError::format(
                dir,
                "a flat validation folder takes its classes from the training split's folders, and there are none",
            ));
        }
        let text = std::fs::read_to_string(list).map_err(|e| DataError::io(list, e))?;
        let by_name = parse_label_list(list, &text)?;
        let class_of: std::collections::HashMap<&str, usize> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for path in sorted_entries(dir)?.into_iter().filter(|p| is_image(p)) {
            let file = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let stem = path
                .file_stem()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let wnid = by_name
                .get(stem)
                .or_else(|| by_name.get(file.as_str()))
                .ok_or_else(|| DataError::format(list, format!("no label for the image {file}")))?;
            let label = *class_of.get(wnid.as_str()).ok_or_else(|| {
                DataError::format(
                    list,
                    format!("{file} is labelled {wnid}, which is not a class folder of the training split"),
                )
            })?;
            files.push(path);
            labels.push(label);
        }
        Ok(ImageFolder {
            root: dir.to_path_buf(),
            class_names: classes.to_vec(),
            files,
            labels,
        })
    }

    /// The class folder names under `root`, sorted, without reading the images.
    pub fn class_folders(root: impl AsRef<Path>) -> Result<Vec<String>> {
        Ok(sorted_entries(root.as_ref())?
            .into_iter()
            .filter(|p| p.is_dir())
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect())
    }

    /// Refuses an evaluation split whose classes are not the training split's: labels are
    /// positions in the sorted class list, so a renamed, missing or extra folder would shift
    /// every label after it and be evaluated against the wrong classes without a word.
    pub fn check_same_classes(&self, train_classes: &[String], train_root: &Path) -> Result<()> {
        if self.class_names == train_classes {
            return Ok(());
        }
        let only = |a: &[String], b: &[String]| -> Vec<String> {
            a.iter().filter(|c| !b.contains(c)).cloned().collect()
        };
        let extra = only(&self.class_names, train_classes);
        let missing = only(train_classes, &self.class_names);
        Err(DataError::ClassMismatch {
            path: self.root.clone(),
            other: train_root.to_path_buf(),
            reason: format!(
                "{} classes here, {} there; only here: {extra:?}; only there: {missing:?}",
                self.class_names.len(),
                train_classes.len()
            ),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, index: usize) -> &Path {
        &self.files[index]
    }
}

/// Decodes a JPEG or PNG held in memory; the error is the reason, for the caller to name its
/// file (and row).
pub(crate) fn decode_encoded(bytes: &[u8]) -> std::result::Result<image::DynamicImage, String> {
    // The JPEG decoder pads a stream that stops early with grey and returns a picture; a file
    // cut short (a broken copy, with or without bytes after the cut) then trains as a
    // different image. Every complete JPEG ends its scan with the EOI marker, at or near the end
    // of the file: searched from the end, so a whole file costs a few comparisons per image in
    // the loader.
    if bytes.starts_with(&[0xFF, 0xD8]) && !bytes[2..].windows(2).rev().any(|w| w == [0xFF, 0xD9]) {
        return Err("the JPEG stream has no end-of-image marker (the file was cut short)".into());
    }
    image::load_from_memory(bytes).map_err(|e| e.to_string())
}

/// Decodes a JPEG or PNG file of any size; gray, gray+alpha, RGBA and CMYK become RGB.
pub fn decode_image_file(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let decoded = decode_encoded(&bytes).map_err(|reason| DataError::Decode {
        path: path.to_path_buf(),
        reason,
    })?;
    let rgb = decoded.to_rgb8();
    let (w, h) = rgb.dimensions();
    Ok(Image::new(h as usize, w as usize, 3, rgb.into_raw()))
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn label(&self, index: usize) -> usize {
        self.labels[index]
    }
    fn class_names(&self) -> &[String] {
        &self.class_names
    }
    fn image(&self, index: usize) -> Result<Image> {
        decode_image_file(&self.files[index])
    }
    /// The file name for ImageNet-style names (`<wnid>_<id>.JPEG` inside `<wnid>/`), otherwise
    /// `<class>_<file name>`, so names stay unique and always start with the class.
    fn sample_name(&self, index: usize) -> String {
        let file = self.files[index]
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let class = &self.class_names[self.labels[index]];
        if file.split('_').next() == Some(class.as_str()) && file.contains('_') {
            file
        } else {
            format!("{class}_{file}")
        }
    }
    fn describe(&self) -> String {
        format!("ImageFolder {}", self.root.display())
    }
}
