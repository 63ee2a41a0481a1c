//! The pipeline's command line, shared by `simclr pipeline` and `cargo xtask pipeline`: the
//! flags, and the launch of one process per GPU with `--gpus`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// Pretrain → fine-tune → distill → evaluate (plus the supervised baseline), with a report in
/// `<out>/<run>/report.md`.
#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// Label fractions (repeat for several; they share one pretraining).
    #[arg(long = "fraction", default_values_t = [0.01])]
    pub fractions: Vec<f64>,
    /// A label-split file (the official `1percent.txt` format) giving the labelled images
    /// of the --fraction in the same position; one per --fraction when used.
    #[arg(long = "split-file", value_name = "FILE")]
    pub split_files: Vec<PathBuf>,
    #[arg(long, default_value = "fashion-mnist-subset")]
    pub dataset: String,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub source: crate::args::DataSourceArgs,
    /// Network input side (default: the dataset's: 28 for Fashion-MNIST, 32 for CIFAR, 224 otherwise).
    #[arg(long)]
    pub image_size: Option<usize>,
    #[arg(long, value_enum, default_value = "default")]
    pub preset: crate::pipeline::Preset,
    /// Network: r18, r50, r50_2x_sk1, r18_w16 (base width 16), …; default from the preset.
    #[arg(long)]
    pub model: Option<String>,
    /// Seeds the labelled split, every initialisation and the augmentation streams.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Hold this many training images per class out as a validation split and evaluate on
    /// it instead of the test set (how the presets' settings are chosen; docs/results.md).
    #[arg(long, default_value_t = 0)]
    pub validation_per_class: usize,
    /// Override one setting of the run's configuration (as pipeline.json spells it), e.g.
    /// `--set pretrain.schedule.train_epochs=10` or `--set baseline.*.optimizer.weight_decay=1e-4`;
    /// repeatable.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub overrides: Vec<String>,
    /// Run the configuration in this run file (a run's pipeline.json, possibly edited)
    /// instead of a preset; `--set` still applies on top. Batch and step counts are taken
    /// as the file gives them.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "fractions", "split_files", "dataset", "image_size", "preset", "model", "seed",
        "validation_per_class", "pretrain_only", "precision", "train_split", "eval_split",
        "hf_revision", "hf_image_column", "hf_label_column", "hf_cache_mib",
    ])]
    pub config: Option<PathBuf>,
    /// Stop after pretraining and its kNN evaluation (tuning the pretraining settings on a
    /// validation split); a later full run with the same settings reuses the checkpoint.
    #[arg(long, conflicts_with = "fractions")]
    pub pretrain_only: bool,
    /// f32, or bf16 products with f32 master weights, BN statistics and losses (every stage).
    #[arg(long, default_value = "f32")]
    pub precision: simclr_models::Precision,
    /// Pretrain data-parallel on these GPUs, one process each over NCCL (e.g. 0,1,2,3; a
    /// build with --features nccl); the later stages run on the first.
    #[arg(long, value_delimiter = ',')]
    pub gpus: Vec<usize>,
    /// Set on the processes that --gpus starts: this one's rank.
    #[arg(long, hide = true, default_value_t = 0)]
    pub rank: usize,
    /// Where the --gpus processes meet (default: a file in --out).
    #[arg(long, hide = true)]
    pub rendezvous: Option<simclr_collective::Rendezvous>,
    #[arg(long, default_value = "checkpoints")]
    pub out: PathBuf,
    #[arg(long)]
    pub no_progress: bool,
}

/// Runs the pipeline `a` describes on `device` (`--device`: cpu, cuda or cuda:N; default CUDA
/// when built with it and present).
pub fn run_pipeline(a: PipelineArgs, device: Option<&str>) -> Result<()> {
    if device.is_some() && !a.gpus.is_empty() {
        anyhow::bail!("--device and --gpus cannot be used together: --gpus chooses the devices")
    }
    let PipelineArgs {
        fractions,
        split_files,
        dataset,
        data_dir,
        source,
        image_size,
        preset,
        model,
        seed,
        validation_per_class,
        overrides,
        config,
        pretrain_only,
        precision,
        gpus,
        rank,
        rendezvous,
        out,
        no_progress,
    } = a;
    let args = crate::args::DataArgs {
        dataset: dataset.clone(),
        data_dir: data_dir.clone(),
        image_size,
        source: source.clone(),
        num_workers: 0,
    };
    let fractions = if pretrain_only { Vec::new() } else { fractions };
    let cfg = match &config {
        Some(file) => crate::pipeline::PipelineConfig::from_file(file)?,
        None => {
            let mut cfg = crate::pipeline::PipelineConfig::new(
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
            cfg.data = source;
            cfg
        }
    };
    if gpus.len() <= 1 {
        let spec = gpus.first().map(|g| format!("cuda:{g}"));
        let device = crate::args::device(spec.as_deref().or(device))?;
        crate::pipeline::run(
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
    let (device, replica, others) = crate::launch::gpu_ranks(&gpus, rank, rendezvous, &out)?;
    let progress = !no_progress && rank == 0;
    crate::pipeline::run(
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
