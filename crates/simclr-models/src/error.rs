//! Errors of model construction and configuration.

/// An invalid configuration, or a failure while building a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `resnet_depth` is not one of 18/34/50/101/152/200.
    #[error("unsupported resnet_depth {0} (supported: 18, 34, 50, 101, 152, 200)")]
    UnsupportedDepth(usize),
    /// A field of [`crate::ModelConfig`] has a value the architecture cannot use.
    #[error("invalid model config: {field}: {reason}")]
    InvalidConfig {
        /// The offending field (its official flag name).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor operation or variable lookup failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
