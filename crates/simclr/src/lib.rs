//! # simclr
//!
//! The command line of simclr-rs (`simclr pretrain | finetune | distill | eval | embed | import`)
//! and the end-to-end pipeline behind `cargo xtask pipeline` (with its report). It owns argument parsing and reporting only: every
//! stage's logic lives in its crate (`simclr-pretrain`, `simclr-eval`, `simclr-models`, …).

pub mod args;
pub mod device_check;
pub mod pipeline;
pub mod report;

/// The frame of the binaries: tunes the allocator for training ([`simclr_models::tune_allocator`]),
/// logs to stderr (`RUST_LOG`, default `info`; colours only on a
/// terminal), runs `run`, and reports an error on one line with exit status 1 (no backtrace).
pub fn main_with(run: impl FnOnce() -> anyhow::Result<()>) {
    simclr_models::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run() {
        eprintln!("error: {}", error_report(&e));
        std::process::exit(1);
    }
}

/// An error and its causes on one line, each cause once: library errors often already quote
/// their source (`file: No such file or directory`), which `{:#}` would print twice.
pub fn error_report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}
