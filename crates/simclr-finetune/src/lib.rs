//! # simclr-finetune
//!
//! Owns the supervised stages of SimCLRv2 on the labelled fraction: fine-tuning from a
//! pretrained checkpoint (from the first projection-head layer, `ft_proj_selector = 1`, for
//! 1 % / 10 % labels), the linear-evaluation protocol (`fine_tune_after_block = 4`: frozen
//! encoder), and the supervised baseline (the same network from scratch on the same images with
//! the same augmentation). The recipes follow the official README's linear-evaluation and
//! fine-tuning commands.
//!
//! It does not own the training loop, optimizers or checkpoints (`simclr-train`,
//! `simclr-models`), the label split (`simclr-data::split`), or evaluation (`simclr-eval`).

mod finetune;

pub use finetune::{
    baseline_batch_size, baseline_train_steps, epochs_for_fraction, few_labels, run_finetune,
    FinetuneConfig, FinetuneInit, FinetuneTask,
};
