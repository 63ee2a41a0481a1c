//! # simclr
//!
//! The command line of simclr-rs (`simclr pretrain | finetune | distill | eval | embed | import`)
//! and the end-to-end pipeline behind `cargo xtask pipeline` (with its report). It owns argument parsing and reporting only: every
//! stage's logic lives in its crate (`simclr-pretrain`, `simclr-eval`, `simclr-models`, …).

pub mod args;
pub mod pipeline;
pub mod report;
