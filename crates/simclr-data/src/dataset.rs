//! The `Dataset` trait all readers implement, and the in-memory dataset most of them produce.

use std::collections::HashMap;

use crate::{Image, Result};

/// A labelled image collection. Indices run over `0..len()`.
///
/// `image` may read and decode (ImageFolder, a Hub dataset's row groups), so the loader calls it
/// from a rayon pool; everything else is cheap.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The class index of image `index`, without decoding it.
    fn label(&self, index: usize) -> usize;
    fn class_names(&self) -> &[String];
    /// The decoded image, 1 or 3 channels, any size.
    fn image(&self, index: usize) -> Result<Image>;
    /// A stable name for image `index`, unique in the dataset, used by split files.
    ///
    /// The official split files name ImageNet images `<wnid>_<id>.JPEG`: the class before the first
    /// `_`. Every reader keeps that shape, so one split-file format serves all datasets.
    fn sample_name(&self, index: usize) -> String;
    /// Where the data came from, for logs and reports.
    fn describe(&self) -> String;

    /// The read block image `index` lies in (a parquet row group): the images of one block are
    /// cheap to read together and costly apart. `None`, the default: every order costs the same.
    /// The loader's shuffle keeps [`Dataset::read_window`] blocks in play at a time.
    fn read_block(&self, _index: usize) -> Option<usize> {
        None
    }
    /// How many read blocks the dataset holds at once (what its cache fits).
    fn read_window(&self) -> usize {
        1
    }

    fn num_classes(&self) -> usize {
        self.class_names().len()
    }
    fn labels(&self) -> Vec<usize> {
        (0..self.len()).map(|i| self.label(i)).collect()
    }
    /// Name → index, for reading split files.
    fn name_index(&self) -> HashMap<String, usize> {
        (0..self.len()).map(|i| (self.sample_name(i), i)).collect()
    }
}

/// Decoded images held in memory: IDX and CIFAR datasets.
#[derive(Clone, Debug)]
pub struct InMemoryDataset {
    images: Vec<Image>,
    labels: Vec<usize>,
    class_names: Vec<String>,
    source: String,
}

impl InMemoryDataset {
    /// `labels[i] < class_names.len()` must hold; readers check it and report the file.
    pub fn new(
        images: Vec<Image>,
        labels: Vec<usize>,
        class_names: Vec<String>,
        source: String,
    ) -> Self {
        assert_eq!(images.len(), labels.len(), "one label per image");
        debug_assert!(labels.iter().all(|&l| l < class_names.len()));
        InMemoryDataset {
            images,
            labels,
            class_names,
            source,
        }
    }

    /// The images and labels at `indices`, in that order.
    pub fn subset(&self, indices: &[usize], source: String) -> Self {
        InMemoryDataset {
            images: indices.iter().map(|&i| self.images[i].clone()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            class_names: self.class_names.clone(),
            source,
        }
    }

    pub fn images(&self) -> &[Image] {
        &self.images
    }
}

impl Dataset for InMemoryDataset {
    fn len(&self) -> usize {
        self.images.len()
    }
    fn label(&self, index: usize) -> usize {
        self.labels[index]
    }
    fn class_names(&self) -> &[String] {
        &self.class_names
    }
    fn image(&self, index: usize) -> Result<Image> {
        Ok(self.images[index].clone())
    }
    fn sample_name(&self, index: usize) -> String {
        format!("{}_{index:06}", self.labels[index])
    }
    fn describe(&self) -> String {
        self.source.clone()
    }
    fn name_index(&self) -> HashMap<String, usize> {
        (0..self.len()).map(|i| (self.sample_name(i), i)).collect()
    }
}

/// The images of another dataset at `indices` (a smoke-test subset, a class-balanced sample).
#[derive(Clone)]
pub struct SubsetDataset {
    inner: std::sync::Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl SubsetDataset {
    /// Errors if an index is beyond the end of `inner`.
    pub fn new(inner: std::sync::Arc<dyn Dataset>, indices: Vec<usize>) -> Result<Self> {
        if let Some(&i) = indices.iter().find(|&&i| i >= inner.len()) {
            return Err(crate::DataError::Config {
                name: "subset",
                value: i.to_string(),
                reason: format!(
                    "beyond the end of {} ({} images)",
                    inner.describe(),
                    inner.len()
                ),
            });
        }
        Ok(SubsetDataset { inner, indices })
    }
}

impl Dataset for SubsetDataset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn label(&self, index: usize) -> usize {
        self.inner.label(self.indices[index])
    }
    fn class_names(&self) -> &[String] {
        self.inner.class_names()
    }
    fn image(&self, index: usize) -> Result<Image> {
        self.inner.image(self.indices[index])
    }
    fn sample_name(&self, index: usize) -> String {
        self.inner.sample_name(self.indices[index])
    }
    fn describe(&self) -> String {
        format!("{} images of {}", self.indices.len(), self.inner.describe())
    }
    fn read_block(&self, index: usize) -> Option<usize> {
        self.inner.read_block(self.indices[index])
    }
    fn read_window(&self) -> usize {
        self.inner.read_window()
    }
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| crate::DataError::io(path, e))
}
