//! Dataset names as the command line spells them, and where each one is found on disk.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::cifar::{read_cifar_dir, read_cifar_py_dir, CifarKind};
use crate::hub::{read_hub_dataset, HubOptions};
use crate::idx::{idx_split_paths, read_idx_dir, FASHION_MNIST_CLASSES};
use crate::{DataError, Dataset, ImageFolder, Result};

/// Environment variable naming a data folder, after `--data-dir`.
pub const DATA_DIR_ENV: &str = "SIMCLR_DATA_DIR";
/// Where Debian's `dataset-fashion-mnist` package installs the full dataset.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";
/// The committed default subset, relative to the repository root.
pub const EMBEDDED_SUBSET: &str = "data/fashion-mnist-subset";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatasetName {
    /// The class-balanced Fashion-MNIST subset committed under `data/` (10,000 + 2,000 images).
    FashionMnistSubset,
    FashionMnist,
    Mnist,
    Cifar10,
    Cifar100,
    /// `root/train/<class>/*` and `root/val/<class>/*` (ImageNet layout).
    ImageFolder,
    /// A parquet image dataset on the Hugging Face Hub, `owner/name`.
    Hub(String),
}

impl DatasetName {
    /// The side the images are used at unless a run says otherwise: the native 28 px of the
    /// (Fashion-)MNIST files, 32 px for CIFAR, and the official 224 px for everything else.
    pub fn default_image_size(&self) -> usize {
        match self {
            DatasetName::FashionMnistSubset | DatasetName::FashionMnist | DatasetName::Mnist => 28,
            DatasetName::Cifar10 | DatasetName::Cifar100 => 32,
            DatasetName::ImageFolder | DatasetName::Hub(_) => 224,
        }
    }
}

impl FromStr for DatasetName {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "fashion-mnist-subset" | "default" => DatasetName::FashionMnistSubset,
            "fashion-mnist" | "fashion_mnist" => DatasetName::FashionMnist,
            "mnist" => DatasetName::Mnist,
            "cifar10" | "cifar-10" => DatasetName::Cifar10,
            "cifar100" | "cifar-100" => DatasetName::Cifar100,
            "imagefolder" | "imagenet" => DatasetName::ImageFolder,
            _ => match s.strip_prefix("hf:") {
                Some(repo) => DatasetName::Hub(repo.to_string()),
                None => return Err(DataError::UnknownDataset(s.to_string())),
            },
        })
    }
}

impl std::fmt::Display for DatasetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatasetName::FashionMnistSubset => write!(f, "fashion-mnist-subset"),
            DatasetName::FashionMnist => write!(f, "fashion-mnist"),
            DatasetName::Mnist => write!(f, "mnist"),
            DatasetName::Cifar10 => write!(f, "cifar10"),
            DatasetName::Cifar100 => write!(f, "cifar100"),
            DatasetName::ImageFolder => write!(f, "imagefolder"),
            DatasetName::Hub(r) => write!(f, "hf:{r}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn is_train(self) -> bool {
        self == Split::Train
    }
}

#[derive(Clone, Debug, Default)]
pub struct DataOptions {
    /// `--data-dir`: the dataset's folder.
    pub data_dir: Option<PathBuf>,
    pub hub: HubOptions,
    /// `--train-split`: the training split's folder of an ImageFolder (`train`) or split name of
    /// a Hub dataset (`train`).
    pub train_split: Option<String>,
    /// `--eval-split`: the evaluation split's folder of an ImageFolder (`val`) or split name of
    /// a Hub dataset (`test`; ImageNet on the Hub calls it `validation`).
    pub eval_split: Option<String>,
}

impl DataOptions {
    /// The split name `split` reads: the option, else `train` / `default_eval`.
    fn split_name(&self, split: Split, default_eval: &str) -> String {
        match split {
            s if s.is_train() => self.train_split.clone().unwrap_or_else(|| "train".into()),
            _ => self
                .eval_split
                .clone()
                .unwrap_or_else(|| default_eval.into()),
        }
    }
}

/// The committed subset: `data/fashion-mnist-subset` in the working directory or a folder
/// above it, else next to the sources this crate was built from.
pub fn embedded_subset_dir() -> Option<PathBuf> {
    // Searched at run time, from the working directory upwards (the repository root, or a
    // crate folder when tests run), then from this crate's source folder as compiled. The
    // compile-time path alone is not enough: a target folder shared between checkouts (CI
    // reuses one) can hold a build made in another checkout.
    let cwd = std::env::current_dir().ok();
    let upwards = cwd
        .iter()
        .flat_map(|d| d.ancestors())
        .map(|d| d.join(EMBEDDED_SUBSET));
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(EMBEDDED_SUBSET);
    upwards
        .chain(std::iter::once(built))
        .find(|d| idx_split_paths(d, true).is_some())
        .map(|d| d.canonicalize().unwrap_or(d))
}

/// Candidate folders for a dataset: `--data-dir` alone when it is given (a folder the user named
/// that does not hold the dataset is an error, not a reason to read another copy), else
/// `$SIMCLR_DATA_DIR` (itself and its `<name>` subfolder), then a system location.
fn candidates(opts: &DataOptions, sub: &str, system: Option<&str>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(d) = &opts.data_dir {
        out.push(d.clone());
        return out;
    }
    if let Ok(env) = std::env::var(DATA_DIR_ENV) {
        out.push(PathBuf::from(&env));
        out.push(Path::new(&env).join(sub));
    }
    if let Some(s) = system {
        out.push(PathBuf::from(s));
    }
    out
}

fn not_found(name: &DatasetName, looked: &[PathBuf], extra: &str) -> DataError {
    let looked: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
    DataError::NotFound {
        name: name.to_string(),
        help: format!(
            "Looked in: [{}]. Provide it with --data-dir <folder>, or set {DATA_DIR_ENV}{extra}.",
            looked.join(", ")
        ),
    }
}

/// Loads split `split` of dataset `name`.
pub fn load_dataset(
    name: &DatasetName,
    split: Split,
    opts: &DataOptions,
) -> Result<Arc<dyn Dataset>> {
    let train = split.is_train();
    // Options that only some datasets read: set for another, they would be ignored in silence.
    let (named_splits, is_hub) = (
        matches!(name, DatasetName::ImageFolder | DatasetName::Hub(_)),
        matches!(name, DatasetName::Hub(_)),
    );
    let splits_only = "split names apply to imagefolder and hf: datasets";
    let hub_only = "it is not an hf: dataset";
    let cache_mib = opts.hub.max_cache_bytes.map(|b| (b >> 20).to_string());
    for (flag, value, applies, why) in [
        ("train_split", &opts.train_split, named_splits, splits_only),
        ("eval_split", &opts.eval_split, named_splits, splits_only),
        ("hf_revision", &opts.hub.revision, is_hub, hub_only),
        ("hf_image_column", &opts.hub.image_column, is_hub, hub_only),
        ("hf_label_column", &opts.hub.label_column, is_hub, hub_only),
        ("hf_cache_mib", &cache_mib, is_hub, hub_only),
    ] {
        if let (Some(v), false) = (value, applies) {
            return Err(DataError::Config {
                name: flag,
                value: v.clone(),
                reason: format!("dataset {name} does not read it: {why}"),
            });
        }
    }
    if let (Some(d), DatasetName::FashionMnistSubset | DatasetName::Hub(_)) = (&opts.data_dir, name)
    {
        return Err(DataError::Config {
            name: "data_dir",
            value: d.display().to_string(),
            reason: format!(
                "dataset {name} does not read a data folder (the subset is committed, Hub \
                 datasets use the Hub cache); for the full Fashion-MNIST in a folder use \
                 --dataset fashion-mnist"
            ),
        });
    }
    let idx_dir = |sub: &str, system: Option<&str>, extra: &str| -> Result<PathBuf> {
        let c = candidates(opts, sub, system);
        c.iter()
            .find(|d| idx_split_paths(d, train).is_some())
            .cloned()
            .ok_or_else(|| not_found(name, &c, extra))
    };
    Ok(match name {
        DatasetName::FashionMnistSubset => {
            let dir = embedded_subset_dir().ok_or_else(|| {
                not_found(
                    name,
                    &[PathBuf::from(EMBEDDED_SUBSET)],
                    "; or recreate it with `cargo xtask make-embedded`",
                )
            })?;
            Arc::new(read_idx_dir(&dir, train, &FASHION_MNIST_CLASSES)?)
        }
        DatasetName::FashionMnist => {
            let dir = idx_dir(
                "fashion-mnist",
                Some(DEBIAN_FASHION_MNIST),
                ", or install Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
            )?;
            Arc::new(read_idx_dir(&dir, train, &FASHION_MNIST_CLASSES)?)
        }
        DatasetName::Mnist => {
            let dir = idx_dir("mnist", None, " (a folder with the four MNIST IDX files)")?;
            let digits: Vec<String> = (0..10).map(|d| d.to_string()).collect();
            let digits: Vec<&str> = digits.iter().map(String::as_str).collect();
            Arc::new(read_idx_dir(&dir, train, &digits)?)
        }
        DatasetName::Cifar10 | DatasetName::Cifar100 => {
            // (binary folder, its marker file, python folder, its marker file)
            let (kind, bin, bin_marker, py, py_marker) = if *name == DatasetName::Cifar10 {
                let k = CifarKind::Cifar10;
                (
                    k,
                    "cifar-10-batches-bin",
                    "test_batch.bin",
                    "cifar-10-batches-py",
                    "test_batch",
                )
            } else {
                let k = CifarKind::Cifar100Fine;
                (
                    k,
                    "cifar-100-binary",
                    "test.bin",
                    "cifar-100-python",
                    "test",
                )
            };
            let binary = candidates(opts, bin, None);
            let python = candidates(opts, py, None);
            if let Some(dir) = binary.iter().find(|d| d.join(bin_marker).is_file()) {
                Arc::new(read_cifar_dir(dir, kind, train)?)
            } else if let Some(dir) = python.iter().find(|d| d.join(py_marker).is_file()) {
                Arc::new(read_cifar_py_dir(dir, kind, train)?)
            } else {
                let mut c = binary;
                for p in python {
                    if !c.contains(&p) {
                        c.push(p);
                    }
                }
                return Err(not_found(
                    name,
                    &c,
                    &format!(
                        " (the folder {bin}/ of the binary version or {py}/ of the python version)"
                    ),
                ));
            }
        }
        DatasetName::ImageFolder => {
            let sub = opts.split_name(split, "val");
            let train_sub = opts.split_name(Split::Train, "val");
            let c = candidates(opts, "imagenet", None);
            let root = c
                .iter()
                .find(|d| d.join(&sub).is_dir())
                .cloned()
                .ok_or_else(|| {
                    not_found(
                        name,
                        &c,
                        &format!(
                            " (a folder holding {train_sub}/<class>/* and {}/<class>/*)",
                            opts.split_name(Split::Test, "val")
                        ),
                    )
                })?;
            let dir = root.join(&sub);
            let train_root = root.join(&train_sub);
            if !train && ImageFolder::is_flat(&dir)? {
                // The ILSVRC-2012 validation images as distributed: one folder, labels in a list.
                let classes = ImageFolder::class_folders(&train_root)?;
                Arc::new(ImageFolder::open_flat(&dir, &root, &classes)?)
            } else {
                let folder = ImageFolder::open(&dir)?;
                if !train && train_root.is_dir() {
                    folder.check_same_classes(
                        &ImageFolder::class_folders(&train_root)?,
                        &train_root,
                    )?;
                }
                Arc::new(folder)
            }
        }
        DatasetName::Hub(repo) => Arc::new(read_hub_dataset(
            repo,
            &opts.split_name(split, "test"),
            &opts.hub,
        )?),
    })
}
