//! Project automation, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! Owns the chores around the crates: recreating the committed dataset subset, running the
//! benchmarks, and the end-to-end pipeline (whose logic lives in the `simclr` crate).

mod bench;
mod cuda;
mod embedded;
mod fuzz;

/// The system allocator with a size bound that only fuzz workers switch on (`fuzz.rs`).
#[global_allocator]
static ALLOCATOR: fuzz::BoundedAlloc = fuzz::BoundedAlloc;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "simclr-rs project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Run the benchmark scenarios (each in its own process) and print a table of images/s
    /// and peak memory.
    Bench {
        /// Scenarios to run (default: all), e.g. `pretrain-r18-cifar-32 data-28`.
        scenarios: Vec<String>,
        /// Also run `bench/torch_bench.py` on the same scenarios, alternating, with ratios.
        #[arg(long)]
        compare: bool,
        /// Also run stock candle (its convolution and BN ops, the system allocator).
        #[arg(long)]
        stock: bool,
        /// The Python that runs the PyTorch script.
        #[arg(long, default_value = "python3")]
        python: String,
        /// Rounds of the alternation (ours, each comparison, ours, …); ratios are reported as
        /// the median and range over the rounds.
        #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        rounds: usize,
    },
    /// Build the CUDA binary on this GPU-less machine for the lent H100/H200 (sm_90, driver
    /// 580): the CUDA 13.0 toolkit from PyPI (--install, once), `cargo build --release -p simclr
    /// --features …` into target-cuda/, and --stage to gzip it for bench/gpu_check.sh
    /// (docs/gpu.md).
    CudaBuild(cuda::CudaBuild),
    /// Fuzz the input parsers (IDX, CIFAR, images, split files, checkpoints, .pth, TF bundles,
    /// parquet) with random mutations of valid files; failing inputs are saved under
    /// fuzz/regressions/<target>/ and become regression tests.
    Fuzz {
        /// Targets (default: all): idx, cifar, cifar-py, image, split, checkpoint, pth, tf-bundle,
        /// parquet.
        targets: Vec<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Seeds the mutations.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// One fuzzing process (started by `fuzz`, which watches it for aborts and hangs).
    #[command(hide = true)]
    FuzzWorker {
        target: String,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        scratch: PathBuf,
        /// Run this one saved input (with the allocation bound) instead of mutating.
        #[arg(long)]
        replay: Option<PathBuf>,
    },
    /// Pretrain → fine-tune → distill → evaluate (plus the supervised baseline), with a report in
    /// checkpoints/<run>/report.md.
    Pipeline {
        /// Label fractions (repeat for several; they share one pretraining).
        #[arg(long = "fraction", default_values_t = [0.01])]
        fractions: Vec<f64>,
        /// A label-split file (the official `1percent.txt` format) giving the labelled images
        /// of the --fraction in the same position; one per --fraction when used.
        #[arg(long = "split-file", value_name = "FILE")]
        split_files: Vec<PathBuf>,
        #[arg(long, default_value = "fashion-mnist-subset")]
        dataset: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Network input side (default: the dataset's: 28 for Fashion-MNIST, 32 for CIFAR, 224 otherwise).
        #[arg(long)]
        image_size: Option<usize>,
        #[arg(long, value_enum, default_value = "default")]
        preset: simclr::pipeline::Preset,
        /// Network: r18, r50, r50_2x_sk1, r18_w16 (base width 16), …; default from the preset.
        #[arg(long)]
        model: Option<String>,
        /// Seeds the labelled split, every initialisation and the augmentation streams.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Hold this many training images per class out as a validation split and evaluate on
        /// it instead of the test set (how the presets' settings are chosen; docs/results.md).
        #[arg(long, default_value_t = 0)]
        validation_per_class: usize,
        /// Override one setting of the run's configuration (as pipeline.json spells it), e.g.
        /// `--set pretrain.schedule.train_epochs=10` or `--set baseline.*.optimizer.weight_decay=1e-4`;
        /// repeatable.
        #[arg(long = "set", value_name = "PATH=VALUE")]
        overrides: Vec<String>,
        /// Run the configuration in this run file (a run's pipeline.json, possibly edited)
        /// instead of a preset; `--set` still applies on top. Batch and step counts are taken
        /// as the file gives them.
        #[arg(long, value_name = "FILE", conflicts_with_all = [
            "fractions", "split_files", "dataset", "image_size", "preset", "model", "seed",
            "validation_per_class", "pretrain_only", "precision",
        ])]
        config: Option<PathBuf>,
        /// Stop after pretraining and its kNN evaluation (tuning the pretraining settings on a
        /// validation split); a later full run with the same settings reuses the checkpoint.
        #[arg(long, conflicts_with = "fractions")]
        pretrain_only: bool,
        /// f32, or bf16 products with f32 master weights, BN statistics and losses (every stage).
        #[arg(long, default_value = "f32")]
        precision: simclr_models::Precision,
        /// cpu, cuda or cuda:N (default: CUDA when built with it and present).
        #[arg(long, conflicts_with = "gpus")]
        device: Option<String>,
        /// Pretrain data-parallel on these GPUs, one process each over NCCL (e.g. 0,1,2,3; a
        /// build with --features nccl); the later stages run on the first.
        #[arg(long, value_delimiter = ',')]
        gpus: Vec<usize>,
        /// Set on the processes that --gpus starts: this one's rank.
        #[arg(long, hide = true, default_value_t = 0)]
        rank: usize,
        /// Where the --gpus processes meet (default: a file in --out).
        #[arg(long, hide = true)]
        rendezvous: Option<simclr_collective::Rendezvous>,
        #[arg(long, default_value = "checkpoints")]
        out: PathBuf,
        #[arg(long)]
        no_progress: bool,
    },
}

fn main() {
    simclr::main_with(|| {
        run(Cli::parse_from(simclr::official_spellings(
            std::env::args_os(),
        )))
    });
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::MakeEmbedded { source, out, check } => embedded::make(&source, &out, check),
        Cmd::Bench {
            scenarios,
            compare,
            stock,
            python,
            rounds,
        } => bench::run(&bench::BenchOptions {
            scenarios,
            compare,
            stock,
            python,
            rounds,
        }),
        Cmd::CudaBuild(opts) => cuda::cuda_build(&opts),
        Cmd::Fuzz {
            targets,
            seconds,
            seed,
        } => fuzz::run(&targets, seconds, seed),
        Cmd::FuzzWorker {
            target,
            seconds,
            seed,
            scratch,
            replay,
        } => match replay {
            Some(input) => fuzz::replay(&target, &input, &scratch),
            None => fuzz::worker(&target, seconds, seed, &scratch),
        },
        Cmd::Pipeline {
            fractions,
            split_files,
            dataset,
            data_dir,
            image_size,
            preset,
            model,
            seed,
            validation_per_class,
            overrides,
            config,
            pretrain_only,
            precision,
            device,
            gpus,
            rank,
            rendezvous,
            out,
            no_progress,
        } => {
            let args = simclr::args::DataArgs {
                dataset: dataset.clone(),
                data_dir: data_dir.clone(),
                image_size,
                train_split: None,
                eval_split: None,
                hf_revision: None,
                hf_image_column: None,
                hf_label_column: None,
                num_workers: 0,
            };
            let fractions = if pretrain_only { Vec::new() } else { fractions };
            let cfg = match &config {
                Some(file) => simclr::pipeline::PipelineConfig::from_file(file)?,
                None => {
                    let mut cfg = simclr::pipeline::PipelineConfig::new(
                        preset,
                        &dataset,
                        args.image_size()?,
                        &fractions,
                        model.as_deref(),
                        seed,
                    )?
                    .with_precision(precision)
                    .with_split_files(if pretrain_only {
                        Vec::new()
                    } else {
                        split_files
                    })?;
                    cfg.validation_per_class = validation_per_class;
                    cfg
                }
            };
            if gpus.len() <= 1 {
                let spec = gpus.first().map(|g| format!("cuda:{g}"));
                let device = simclr::args::device(spec.as_deref().or(device.as_deref()))?;
                simclr::pipeline::run(
                    &cfg,
                    &overrides,
                    data_dir,
                    &out,
                    !no_progress,
                    &device,
                    None,
                )?;
                return Ok(());
            }
            let Some(&gpu) = gpus.get(rank) else {
                anyhow::bail!("--rank {rank} has no GPU in --gpus {gpus:?}")
            };
            let device = simclr::args::device(Some(&format!("cuda:{gpu}")))?;
            std::fs::create_dir_all(&out)?;
            let rendezvous = rendezvous.unwrap_or_else(|| {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let file = out.join(format!(".rendezvous-{}-{stamp}", std::process::id()));
                simclr_collective::Rendezvous::File(file)
            });
            let others = if rank == 0 {
                Some(simclr::pipeline::ReplicaProcesses::spawn(
                    gpus.len(),
                    &rendezvous,
                )?)
            } else {
                None
            };
            let replica = simclr::pipeline::Replica {
                rank,
                world_size: gpus.len(),
                rendezvous,
            };
            let progress = !no_progress && rank == 0;
            simclr::pipeline::run(
                &cfg,
                &overrides,
                data_dir,
                &out,
                progress,
                &device,
                Some(&replica),
            )?;
            if let Some(others) = others {
                others.wait();
            }
            Ok(())
        }
    }
}
