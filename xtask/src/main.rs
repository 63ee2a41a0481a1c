//! Project automation, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! Owns the chores around the crates: recreating the committed dataset subset, running the
//! benchmarks, and (once the stages exist) the end-to-end pipeline. It holds no ML logic itself.

mod embedded;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "simclr-rs project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Recreate data/fashion-mnist-subset from Debian's dataset-fashion-mnist package
    /// (the first 1,000 training and 200 test images of each class) and record checksums.
    MakeEmbedded {
        /// Folder holding the full Fashion-MNIST IDX files.
        #[arg(long, default_value = simclr_data::source::DEBIAN_FASHION_MNIST)]
        source: PathBuf,
        /// Output folder.
        #[arg(long, default_value = simclr_data::source::EMBEDDED_SUBSET)]
        out: PathBuf,
        /// Only verify that the committed subset matches what the source would produce.
        #[arg(long)]
        check: bool,
    },
    /// Run the benchmarks (`cargo bench`) and print their figures.
    Bench {
        /// Extra arguments passed to `cargo bench` (e.g. `-p simclr-data`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Pretrain → fine-tune → distill → evaluate, with a report.
    Pipeline {
        #[arg(long = "fraction")]
        fractions: Vec<f64>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::MakeEmbedded { source, out, check } => embedded::make(&source, &out, check),
        Cmd::Bench { args } => {
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .arg("bench")
                .args(if args.is_empty() {
                    vec!["--workspace".to_string()]
                } else {
                    args
                })
                .status()
                .context("running cargo bench")?;
            if !status.success() {
                bail!("cargo bench failed ({status})");
            }
            Ok(())
        }
        Cmd::Pipeline { fractions } => {
            for f in &fractions {
                simclr_data::split::validate_fraction(*f)?;
            }
            bail!(
                "the pipeline needs the pretraining, fine-tuning and distillation stages, which are not \
                 implemented yet; so far this workspace provides the data crate (datasets, splits, \
                 augmentations, loader)"
            )
        }
    }
}
