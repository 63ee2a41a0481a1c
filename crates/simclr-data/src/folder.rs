//! ImageFolder: the ImageNet layout `root/<class>/<file>.JPEG`.
//!
//! Classes are the sorted folder names (for ImageNet the WNIDs, which is also the TFDS class
//! order); files are listed once, sorted, and decoded on demand so a dataset of any size fits.

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
