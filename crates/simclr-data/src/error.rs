use std::path::PathBuf;

/// Everything that can go wrong while reading, splitting or augmenting data.
///
/// Each variant names the file or the value at fault, so a binary can print it as is.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("cannot decode image {path}: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("{path}: class folder {class:?} holds no JPEG or PNG image")]
    EmptyClass { path: PathBuf, class: String },
    #[error("label fraction {0} is out of range: it must be a number in (0, 1]")]
    Fraction(f64),
    #[error("split file {path}, line {line}: {reason}")]
    SplitFile {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("the labelled split leaves class {class:?} (index {index}) with no labelled image")]
    ClassWithoutLabels { class: String, index: usize },
    #[error("{path}: the class folders differ from those of {other} ({reason}); the labels would not match")]
    ClassMismatch {
        path: PathBuf,
        other: PathBuf,
        reason: String,
    },
    #[error("dataset {name:?} not found. {help}")]
    NotFound { name: String, help: String },
    #[error("unknown dataset {0:?}: expected fashion-mnist-subset, fashion-mnist, mnist, cifar10, cifar100, imagefolder or hf:<owner>/<name>")]
    UnknownDataset(String),
    #[error("invalid setting {name} = {value}: {reason}")]
    Config {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("hugging face hub: {0}")]
    Hub(String),
    #[error("the data loader's prefetch thread stopped with a panic: {0}")]
    LoaderPanic(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DataError::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
