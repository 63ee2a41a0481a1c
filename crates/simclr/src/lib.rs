//! # simclr
//!
//! The command line of simclr-rs (`simclr pretrain | eval | embed | import`) and the flag groups
//! it shares with `cargo xtask pipeline`. It owns argument parsing and reporting only: every
//! stage's logic lives in its crate (`simclr-pretrain`, `simclr-eval`, `simclr-models`, …).

pub mod args;
