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
        /// Compare an f32 pretraining step with PyTorch's NCHW and `channels_last` f32 only,
        /// not its bf16 autocast (which, on a CPU without bf16 instructions, runs many times
        /// slower than its f32 and takes minutes a round).
        #[arg(long)]
        f32_only: bool,
    },
    /// Build the CUDA binary on this GPU-less machine for the lent H100/H200 (sm_90, driver
    /// 580): the CUDA 13.0 toolkit from PyPI (--install, once), `cargo build --release -p simclr
    /// --features …` into target-cuda/, and --stage to gzip it for bench/gpu_check.sh
    /// (docs/gpu.md).
    CudaBuild(cuda::CudaBuild),
    /// Fuzz the input parsers (IDX, CIFAR, images, split files, checkpoints, .pth, TF bundles,
    /// parquet) with random mutations of valid files; failing inputs are saved under
    /// `fuzz/regressions/<target>/` and become regression tests.
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
    /// `checkpoints/<run>/report.md` (the same as `simclr pipeline`).
    Pipeline {
        #[command(flatten)]
        args: simclr::pipeline_cli::PipelineArgs,
        /// cpu, cuda or cuda:N (default: CUDA when built with it and present).
        #[arg(long, conflicts_with = "gpus")]
        device: Option<String>,
    },
    /// The paper's four findings on this data: a grid of label fractions × network widths ×
    /// {baseline, fine-tuned from head layer 1 or the encoder, distilled}, plus projection-head
    /// depths, with verdicts and charts in `<out>/study-<plan>-…/study.md` (docs/results.md).
    Study {
        #[command(flatten)]
        args: simclr::study::StudyArgs,
        /// cpu, cuda or cuda:N (default: CUDA when built with it and present).
        #[arg(long)]
        device: Option<String>,
    },
}

/// The workspace root (`simclr_fs::manifest_dir`: where cargo runs xtask from, else where it was
/// compiled).
pub(crate) fn workspace_root() -> PathBuf {
    simclr_fs::manifest_dir(env!("CARGO_MANIFEST_DIR")).join("..")
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
            f32_only,
        } => bench::run(&bench::BenchOptions {
            scenarios,
            compare,
            stock,
            python,
            rounds,
            f32_only,
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
        Cmd::Pipeline { args, device } => {
            simclr::pipeline_cli::run_pipeline(args, device.as_deref())
        }
        Cmd::Study { args, device } => {
            simclr::study::run(&args, &simclr::args::device(device.as_deref())?).map(|_| ())
        }
    }
}
