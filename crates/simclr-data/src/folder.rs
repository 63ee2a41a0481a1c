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

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, index: usize) -> &Path {
        &self.files[index]
    }
}

/// Decodes a JPEG or PNG file of any size; gray, gray+alpha, RGBA and CMYK become RGB.
pub fn decode_image_file(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let decoded = image::load_from_memory(&bytes).map_err(|e| DataError::Decode {
        path: path.to_path_buf(),
        reason: e.to_string(),
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
