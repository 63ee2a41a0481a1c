use candle_core::DType;

/// Everything that can go wrong while computing metrics or running kNN evaluation.
///
/// Each variant names the value at fault, so a binary can print it as is.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("data: {0}")]
    Data(#[from] simclr_data::DataError),
    #[error("the model has no output named {0:?} (final_avg_pool, proj_head_N, proj_head_output, logits_sup)")]
    UnknownLayer(String),
    #[error("the number of classes must be at least 1")]
    NoClasses,
    #[error("top-k with k = {k} is out of range for {num_classes} classes: k must be in 1..={num_classes}")]
    InvalidTopK { k: usize, num_classes: usize },
    #[error("{what} must be a rank-2 tensor [N, C], got shape {shape:?}")]
    NotMatrix {
        what: &'static str,
        shape: Vec<usize>,
    },
    #[error("logits must have a floating-point dtype, got {0:?}")]
    LogitsDtype(DType),
    #[error("{what} have {got} classes but {expected} were expected")]
    ClassCountMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: expected {expected} entries, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("label {label} at position {index} is out of range for {num_classes} classes (valid labels are 0..{num_classes})")]
    LabelOutOfRange {
        index: usize,
        label: usize,
        num_classes: usize,
    },
    #[error("label {label} at position {index} is negative")]
    NegativeLabel { index: usize, label: i64 },
    #[error("labels must be a rank-1 tensor [N], got shape {0:?}")]
    LabelsShape(Vec<usize>),
    #[error("labels must have an integer dtype (u8, u32, i16, i32 or i64), got {0:?}")]
    LabelsDtype(DType),
    #[error("{what} row {row} holds a NaN")]
    NotANumber { what: &'static str, row: usize },
    #[error("{what} have feature dimension {got} but the kNN bank has {expected}")]
    FeatureDimMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("the kNN bank holds no features")]
    EmptyBank,
    #[error("invalid setting {name} = {value}: {reason}")]
    Config {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
