//! `simclr`: every stage of SimCLRv2 as a subcommand, with the official flag names.

use simclr_train::StageEnv;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::{Args, Parser, Subcommand};
use simclr::args::{device, DataArgs, ModelArgs, RunArgs, TrainArgs};
use simclr_data::{Loader, LoaderConfig, Split};
use simclr_models::{checkpoint, Stage};
use simclr_pretrain::{PretrainConfig, PretrainData};

#[derive(Parser)]
#[command(
    name = "simclr",
    version,
    about = "SimCLRv2: contrastive pretraining, fine-tuning, distillation"
)]
struct Cli {
    /// cpu, cuda or cuda:N (default: CUDA when built with it and present, else CPU).
    #[arg(long, global = true)]
    device: Option<String>,
    /// Load checkpoints whose tensors hold NaN or infinity (to inspect a diverged run); refused
    /// otherwise.
    #[arg(long, global = true)]
    allow_non_finite: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole method: pretrain → fine-tune → distill → evaluate, plus the supervised
    /// baseline, with a report (what `cargo xtask pipeline` runs).
    Pipeline(simclr::pipeline_cli::PipelineArgs),
    /// Contrastive pretraining (NT-Xent, LARS, warmup + cosine) on unlabeled images.
    Pretrain(PretrainArgs),
    /// Fine-tune a pretrained checkpoint on a labelled fraction (or train the supervised
    /// baseline from scratch with --from-scratch, or linear evaluation with --fine-tune-after-block 4).
    Finetune(FinetuneArgs),
    /// Distil a fine-tuned teacher into a student on the unlabeled images.
    Distill(DistillArgs),
    /// Top-1/top-5, per-class accuracy, confusion matrix and kNN top-1 of a checkpoint.
    Eval(EvalArgs),
    /// Features of a checkpoint's model on a dataset, to a safetensors file.
    Embed(EmbedArgs),
    /// Convert official weights (converter .pth, TF1 checkpoint) into this project's checkpoint.
    Import(ImportArgs),
    /// Write a checkpoint's model for other tools: the converter's .pth (`torch.load`, `simclr
    /// import`), a Hugging Face-style folder, or ONNX; weights only.
    Export(ExportArgs),
    /// Time the pretraining step on synthetic data (prints a `BENCH` line; docs/gpu.md).
    BenchStep(BenchStepArgs),
    /// Check a multi-process launch without a GPU: the ranks meet through the rendezvous (the
    /// flags, or a torchrun or SLURM environment) and each prints its rank, the world size and
    /// the id rank 0 handed out, which must be the same on every rank.
    RendezvousCheck(RendezvousCheckArgs),
    /// One training step on the CPU and on --device, f32 and bf16: values and gradients must
    /// agree (f32 1e-4, bf16 2e-2 relative).
    Parity,
}

#[derive(Args)]
struct BenchStepArgs {
    /// `r18` (CIFAR stem at ≤ 32 px), `r50`, `r50_2x_sk1`, `r18_w16`, …
    #[arg(long, default_value = "r18")]
    model: String,
    #[arg(long, default_value_t = 32)]
    image_size: usize,
    /// Images per step (two views each).
    #[arg(long, default_value_t = 128)]
    batch: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value = "f32")]
    precision: simclr_models::Precision,
}

#[derive(Args)]
struct RendezvousCheckArgs {
    /// Processes in the run (default: from the torchrun or SLURM environment).
    #[arg(long)]
    replicas: Option<usize>,
    #[arg(long, default_value_t = 0)]
    rank: usize,
    #[arg(long)]
    rendezvous: Option<simclr_collective::Rendezvous>,
    /// How long to wait for the other ranks.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Instead of exchanging an id only, build the NCCL communicator the training uses (on GPU
    /// `local rank`) and all-reduce one number over it; works with a single rank too, which is
    /// how a one-GPU machine checks NCCL (a binary built with --features nccl).
    #[arg(long)]
    nccl: bool,
}

#[derive(Args)]
struct PretrainArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// The stage's settings from a file (the `config.json` a run writes into its folder, or a
    /// TOML file of the same fields) instead of the flags below; data, output and run flags
    /// still apply.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "train_batch_size", "train_epochs", "train_steps", "learning_rate", "learning_rate_scaling", "warmup_epochs", "weight_decay", "optimizer", "momentum", "precision",
        "resnet_depth", "width_multiplier", "sk_ratio", "base_width", "num_proj_layers",
        "proj_out_dim", "ft_proj_selector", "proj_head_mode", "batch_norm_decay", "image_size",
        "temperature", "hidden_norm", "color_jitter_strength", "use_blur",
        "lineareval_while_pretraining", "global_bn", "use_memory", "memory_size", "momentum_ema",
        "seed", "knn_every_epochs",
    ])]
    config: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// NT-Xent's τ. [default: 0.1]
    #[arg(long)]
    temperature: Option<f64>,
    /// Normalise the projections before the similarities. [default: true]
    #[arg(long, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    hidden_norm: Option<bool>,
    /// Colour distortion strength (default: 1.0, or 0.5 at ≤ 32 px).
    #[arg(long)]
    color_jitter_strength: Option<f32>,
    /// Gaussian blur (default: on above 32 px).
    #[arg(long, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    use_blur: Option<bool>,
    /// Train a linear classifier on stop-gradient features alongside (the official online
    /// probe). [default: true]
    #[arg(long, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    lineareval_while_pretraining: Option<bool>,
    /// BN statistics over every replica's batch (the official `global_bn`); false normalises
    /// with each replica's own. [default: true]
    #[arg(long, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    global_bn: Option<bool>,
    /// SimCLRv2's momentum encoder + memory buffer of negatives.
    #[arg(long)]
    use_memory: bool,
    /// Negatives in the memory buffer. [default: 65536]
    #[arg(long)]
    memory_size: Option<usize>,
    /// Decay of the momentum encoder's moving average. [default: 0.999]
    #[arg(long)]
    momentum_ema: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// kNN top-1 on the test split every this many epochs (0: never). [default: 1]
    #[arg(long)]
    knn_every_epochs: Option<usize>,
    /// Data-parallel replicas, one process per GPU (NCCL; a binary built with --features
    /// nccl). Start one process per rank with the same flags and its own --rank and --device,
    /// or leave these flags out under torchrun or srun: rank, world size, rendezvous and GPU
    /// then come from their environment (docs/gpu.md).
    #[arg(long)]
    replicas: Option<usize>,
    /// This process's rank among the replicas.
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// Where the replicas meet to share NCCL's id: a file that rank 0 writes and the others
    /// wait for (a shared file system for several nodes), or tcp://HOST:PORT where rank 0
    /// listens.
    #[arg(long, alias = "nccl-id")]
    rendezvous: Option<simclr_collective::Rendezvous>,
    /// Output folder (default: checkpoints/pretrain-<dataset>-<model>).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

/// The labelled subset: a fraction drawn per class, or an official-format split file.
#[derive(Args)]
struct LabelArgs {
    /// Fraction of each class that keeps its label (0.01, 0.1, …).
    #[arg(long, default_value_t = 0.01)]
    fraction: f64,
    /// A split file (`1percent.txt` format) instead of --fraction.
    #[arg(long, conflicts_with = "fraction")]
    split_file: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl LabelArgs {
    /// The labelled fraction the stage's defaults follow (the fine-tuning epochs): `--fraction`,
    /// or what the split file keeps of the training set.
    fn fraction_of(&self, labelled: usize, total: usize) -> f64 {
        match &self.split_file {
            Some(_) => labelled as f64 / total.max(1) as f64,
            None => self.fraction,
        }
    }

    fn indices(&self, train: &dyn simclr_data::Dataset) -> Result<Vec<usize>> {
        Ok(match &self.split_file {
            Some(p) => simclr_data::split::read_split_file(p, train)?,
            None => simclr_data::split::class_balanced_subset(
                &train.labels(),
                train.num_classes(),
                self.fraction,
                self.seed,
            )?,
        })
    }
}

#[derive(Args)]
struct FinetuneArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// The stage's settings from a file (the `config.json` a run writes into its folder, or a
    /// TOML file of the same fields) instead of the training flags; the network to start from,
    /// the labels, data, output and run flags still apply.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "train_batch_size", "train_epochs", "train_steps", "learning_rate", "learning_rate_scaling", "warmup_epochs", "weight_decay", "optimizer", "momentum", "precision",
        "ft_proj_selector", "fine_tune_after_block", "zero_init_logits_layer", "image_size",
    ])]
    config: Option<PathBuf>,
    /// The pretrained (or imported) checkpoint.
    #[arg(long, required_unless_present = "from_scratch")]
    checkpoint: Option<PathBuf>,
    /// Train the network of --resnet-depth … from random weights: the supervised baseline.
    #[arg(long, conflicts_with = "checkpoint")]
    from_scratch: bool,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    labels: LabelArgs,
    /// -1 trains everything; 4 freezes the encoder (linear evaluation). [default: -1]
    #[arg(long, allow_hyphen_values = true)]
    fine_tune_after_block: Option<i32>,
    /// Start the supervised head at zero. [default: true]
    #[arg(long, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    zero_init_logits_layer: Option<bool>,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct DistillArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// The stage's settings from a file (the `config.json` a run writes into its folder, or a
    /// TOML file of the same fields) instead of the training flags; teacher, student, labels,
    /// data, output and run flags still apply.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "train_batch_size", "train_epochs", "train_steps", "learning_rate", "learning_rate_scaling", "warmup_epochs", "weight_decay", "optimizer", "momentum", "precision",
        "temperature", "tau_squared", "alpha", "teacher_targets", "image_size",
    ])]
    config: Option<PathBuf>,
    /// The fine-tuned teacher.
    #[arg(long)]
    teacher: PathBuf,
    /// Start the student from this checkpoint (e.g. the pretrained one); default: from scratch
    /// with the teacher's architecture, or --resnet-depth … with --student-from-flags.
    #[arg(long)]
    student_checkpoint: Option<PathBuf>,
    /// Build the student from the model flags (big-to-small distillation).
    #[arg(long, conflicts_with = "student_checkpoint")]
    student_from_flags: bool,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    labels: LabelArgs,
    /// τ (default 0.1 for self-distillation, 1.0 with --student-from-flags).
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    tau_squared: bool,
    /// Weight of the distillation term; 1 − α weighs cross-entropy on labelled images.
    /// [default: 1]
    #[arg(long)]
    alpha: Option<f64>,
    /// What the teacher labels: same_view (the augmented view the student sees, as the
    /// official colab does) or clean (each whole image once, before training).
    /// [default: same_view]
    #[arg(long)]
    teacher_targets: Option<simclr_distill::TeacherTargets>,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    run: RunArgs,
}

/// Images per evaluation batch (`eval_batch_size`; the official default is 256).
const EVAL_BATCH_SIZE: usize = 256;

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Also compute kNN top-1 of the encoder features (train split as the bank).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    knn: bool,
    /// Write the report (JSON) here.
    #[arg(long)]
    report: Option<PathBuf>,
    #[arg(long, default_value_t = EVAL_BATCH_SIZE, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    eval_batch_size: usize,
    /// No progress bars (they show on a terminal only anyway).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
struct EmbedArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value = "test")]
    split: String,
    /// final_avg_pool, proj_head_N, proj_head_output or logits_sup.
    #[arg(long, default_value = "final_avg_pool")]
    layer: String,
    #[arg(long, default_value_t = EVAL_BATCH_SIZE, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    eval_batch_size: usize,
    #[arg(long)]
    out: PathBuf,
    /// No progress bar (it shows on a terminal only anyway).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
struct ImportArgs {
    /// A converter file (`r50_1x_sk0.pth`, …) or a TF1 checkpoint (`…/model.ckpt-N` or its `.index`).
    source: PathBuf,
    out: PathBuf,
    /// For TF1 checkpoints: take the `ema_model/` copy.
    #[arg(long)]
    ema: bool,
}

/// What `simclr export` writes.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ExportFormat {
    /// The converter's layout, `{'resnet': …, 'head': …}`, named r{depth}_{w}x_sk{0|1}.pth.
    Pth,
    /// A folder: config.json, model.safetensors (weights only), README.md (model card).
    Hf,
    /// The eval-mode network as an ONNX model (opset 17), outputs named as `simclr embed`'s
    /// layers.
    Onnx,
}

#[derive(Args)]
struct ExportArgs {
    /// A checkpoint of this project (`…/checkpoint.safetensors`).
    checkpoint: PathBuf,
    /// pth: the file, or a folder to write r{depth}_{w}x_sk{0|1}.pth into; hf: the folder;
    /// onnx: the file.
    out: PathBuf,
    #[arg(long, value_enum, default_value = "pth")]
    format: ExportFormat,
}

fn main() {
    simclr::main_with(|| {
        run(Cli::parse_from(simclr::official_spellings(
            std::env::args_os(),
        )))
    });
}

fn run(cli: Cli) -> Result<()> {
    checkpoint::set_allow_non_finite(cli.allow_non_finite);
    // A torchrun or SLURM launch of several processes, read only by the commands that run as
    // ranks (others work inside any allocation): each rank takes the GPU of its local rank
    // unless --device says otherwise.
    let launch = match &cli.command {
        Command::Pretrain(a) if a.replicas.is_none() => simclr_collective::Launch::from_env()?,
        Command::RendezvousCheck(a) if a.replicas.is_none() => {
            simclr_collective::Launch::from_env()?
        }
        _ => None,
    };
    let local_gpu = match &launch {
        Some(l) if cli.device.is_none() && cfg!(feature = "cuda") => {
            Some(format!("cuda:{}", local_gpu_index(l.local_rank)))
        }
        _ => None,
    };
    let device = device(cli.device.as_deref().or(local_gpu.as_deref()))?;
    if let Command::Pipeline(a) = cli.command {
        // The pipeline chooses its devices itself (--gpus).
        return simclr::pipeline_cli::run_pipeline(a, cli.device.as_deref());
    }
    match cli.command {
        Command::Pipeline(_) => unreachable!("handled above"),
        Command::Pretrain(a) => pretrain(a, &device, launch.as_ref()),
        Command::RendezvousCheck(a) => rendezvous_check(a, launch.as_ref(), &device),
        Command::Finetune(a) => finetune(a, &device),
        Command::Distill(a) => distill(a, &device),
        Command::Eval(a) => eval(a, &device),
        Command::Embed(a) => embed(a, &device),
        Command::BenchStep(a) => simclr::device_check::bench_step(
            &a.model,
            a.image_size,
            a.batch,
            a.steps,
            a.precision,
            &device,
        ),
        Command::Parity => simclr::device_check::parity(&device),
        Command::Import(a) => import(a, &device),
        Command::Export(a) => export(a, &device),
    }
}

fn pretrain(
    a: PretrainArgs,
    device: &candle_core::Device,
    launch: Option<&simclr_collective::Launch>,
) -> Result<()> {
    let image_size = a.data.image_size()?;
    let train = a.data.load(Split::Train)?;
    // The settings: from a run file, or built from the flags.
    let mut cfg: PretrainConfig = match &a.config {
        Some(file) => simclr::args::stage_config(file)?,
        None => {
            let probe = Some(train.num_classes());
            let mut cfg = PretrainConfig::new(a.model.config(image_size, probe)?, image_size);
            a.train.apply(&mut cfg.training);
            // Flags left out keep the libraries' defaults (the official values).
            if let Some(t) = a.temperature {
                cfg.objective.temperature = t;
            }
            if let Some(h) = a.hidden_norm {
                cfg.objective.hidden_norm = h;
            }
            if let Some(s) = a.color_jitter_strength {
                cfg.augment.color_jitter_strength = s;
            }
            if let Some(b) = a.use_blur {
                cfg.augment.use_blur = b;
            }
            if let Some(l) = a.lineareval_while_pretraining {
                cfg.lineareval_while_pretraining = l;
            }
            if !cfg.lineareval_while_pretraining {
                cfg.model.num_classes = None; // no probe, no supervised head
            }
            if let Some(g) = a.global_bn {
                cfg.global_bn = g;
            }
            if a.use_memory {
                let d = simclr_pretrain::memory::MemoryConfig::default();
                cfg.memory = Some(simclr_pretrain::memory::MemoryConfig {
                    queue_size: a.memory_size.unwrap_or(d.queue_size),
                    ema_decay: a.momentum_ema.unwrap_or(d.ema_decay),
                    ..d
                });
            }
            cfg.seed = a.seed;
            if let Some(k) = a.knn_every_epochs {
                cfg.knn_every_epochs = k;
            }
            cfg
        }
    };
    cfg.run = a.run.options(a.data.num_workers);
    // The kNN monitor's images, when the settings ask for it.
    let test = if cfg.knn_every_epochs > 0 {
        Some(a.data.load(Split::Test)?)
    } else {
        None
    };
    let out = a.out.unwrap_or_else(|| {
        PathBuf::from(format!(
            "checkpoints/pretrain-{}-{}",
            a.data.dataset.replace([':', '/'], "_"),
            cfg.model.name()
        ))
    });
    check_writable(&out)?;
    simclr::args::write_stage_config(&out, &cfg)?;
    let (n, rank, rendezvous) = match (a.replicas, launch) {
        (None, Some(l)) => (l.world_size, l.rank, Some(l.rendezvous.clone())),
        (n, _) => (n.unwrap_or(1), a.rank, a.rendezvous.clone()),
    };
    let replicas = simclr::launch::replicas(n, rank, rendezvous.as_ref(), device)?;
    let summary = simclr_pretrain::run_pretrain_replica(
        &cfg,
        &PretrainData { train, test },
        StageEnv {
            out_dir: &out,
            resume: a.run.resume,
            progress: !a.run.no_progress,
            device,
        },
        replicas,
    )?;
    println!(
        "pretrained {} steps in {:.0} s ({:.1} images/s); final loss {:.4}{}; checkpoint {}",
        summary.steps - summary.start_step,
        summary.wall_seconds,
        summary.images_per_second,
        summary.final_loss,
        summary
            .last_epoch_metrics
            .iter()
            .map(|(k, v)| format!(", {k} {v:.4}"))
            .collect::<String>(),
        summary.checkpoint.display()
    );
    Ok(())
}

fn finetune(a: FinetuneArgs, device: &candle_core::Device) -> Result<()> {
    use simclr_finetune::{run_finetune, FinetuneConfig, FinetuneInit};
    let image_size = a.data.image_size()?;
    let train = a.data.load(Split::Train)?;
    let labelled = a.labels.indices(train.as_ref())?;
    // The settings: from a run file, or built from the flags.
    let mut cfg: FinetuneConfig = match &a.config {
        Some(file) => simclr::args::stage_config(file)?,
        None => {
            let mut cfg = FinetuneConfig::new(
                image_size,
                a.labels.fraction_of(labelled.len(), train.len()),
            );
            a.train.apply(&mut cfg.training);
            if let Some(b) = a.fine_tune_after_block {
                cfg.fine_tune_after_block = b;
            }
            if let Some(z) = a.zero_init_logits_layer {
                cfg.zero_init_logits_layer = z;
            }
            cfg.ft_proj_selector = a
                .model
                .ft_proj_selector
                // SimCLRv2 fine-tunes from the first head layer; linear evaluation and the supervised
                // baseline keep the official default, the encoder output.
                .unwrap_or(if a.from_scratch || cfg.fine_tune_after_block >= 4 {
                    0
                } else {
                    1
                });
            cfg.seed = a.labels.seed;
            cfg
        }
    };
    cfg.run = a.run.options(a.data.num_workers);
    let (init, stage) = match (&a.checkpoint, a.from_scratch) {
        (_, true) => (
            FinetuneInit::Scratch(a.model.config(image_size, None)?),
            Stage::Supervised,
        ),
        (Some(p), false) => (
            {
                a.model
                    .refuse_with(&format!("--checkpoint {}", p.display()))?;
                FinetuneInit::Pretrained(p.clone())
            },
            if cfg.fine_tune_after_block >= 4 {
                Stage::LinearEval
            } else {
                Stage::Finetune
            },
        ),
        (None, false) => bail!("--checkpoint is required unless --from-scratch"),
    };
    check_writable(&a.out)?;
    simclr::args::write_stage_config(&a.out, &cfg)?;
    simclr_data::split::write_split_file(
        &a.out.join("labelled_split.txt"),
        train.as_ref(),
        &labelled,
    )?;
    let (s, _) = run_finetune(
        &cfg,
        &init,
        stage,
        train,
        labelled,
        StageEnv {
            out_dir: &a.out,
            resume: a.run.resume,
            progress: !a.run.no_progress,
            device,
        },
    )?;
    println!(
        "{stage}: {} steps in {:.0} s; final loss {:.4}; checkpoint {}",
        s.steps,
        s.wall_seconds,
        s.final_loss,
        s.checkpoint.display()
    );
    Ok(())
}

fn distill(a: DistillArgs, device: &candle_core::Device) -> Result<()> {
    use simclr_distill::{run_distill, DistillConfig, StudentInit};
    let image_size = a.data.image_size()?;
    let train = a.data.load(Split::Train)?;
    let student = match (&a.student_checkpoint, a.student_from_flags) {
        (Some(p), _) => {
            a.model
                .refuse_with(&format!("--student-checkpoint {}", p.display()))?;
            StudentInit::Checkpoint(p.clone())
        }
        (None, true) => StudentInit::Scratch(a.model.config(image_size, None)?),
        (None, false) => {
            a.model.refuse_with(&format!(
                "the teacher {} (pass --student-from-flags for a student of another size)",
                a.teacher.display()
            ))?;
            StudentInit::Scratch(checkpoint::read_meta(&a.teacher)?.config)
        }
    };
    // The settings: from a run file, or built from the flags.
    let mut cfg: DistillConfig = match &a.config {
        Some(file) => simclr::args::stage_config(file)?,
        None => {
            let mut cfg = DistillConfig::new(image_size, !a.student_from_flags);
            if let Some(t) = a.temperature {
                cfg.temperature = t;
            }
            cfg.tau_squared = a.tau_squared;
            if let Some(alpha) = a.alpha {
                cfg.alpha = alpha;
            }
            if let Some(t) = a.teacher_targets {
                cfg.teacher_targets = t;
            }
            a.train.apply(&mut cfg.training);
            cfg.seed = a.labels.seed;
            cfg
        }
    };
    cfg.run = a.run.options(a.data.num_workers);
    // The labelled images count only where the loss has a labelled part (alpha < 1).
    let labelled = if cfg.alpha < 1.0 {
        a.labels.indices(train.as_ref())?
    } else {
        Vec::new()
    };
    check_writable(&a.out)?;
    simclr::args::write_stage_config(&a.out, &cfg)?;
    let (s, _) = run_distill(
        &cfg,
        &a.teacher,
        &student,
        train,
        &labelled,
        StageEnv {
            out_dir: &a.out,
            resume: a.run.resume,
            progress: !a.run.no_progress,
            device,
        },
    )?;
    println!(
        "distill: {} steps in {:.0} s; final loss {:.4}; checkpoint {}",
        s.steps,
        s.wall_seconds,
        s.final_loss,
        s.checkpoint.display()
    );
    Ok(())
}

/// Fails before any work when the output folder cannot be written.
fn check_writable(dir: &Path) -> Result<()> {
    simclr_fs::ensure_writable_dir(dir)
        .with_context(|| format!("output folder {} cannot be written", dir.display()))
}

fn eval(a: EvalArgs, device: &candle_core::Device) -> Result<()> {
    let ckpt = checkpoint::load(&a.checkpoint, device)?;
    let test = a.data.load(Split::Test)?;
    let image_size = a.data.image_size()?;
    let loader = Loader::new(
        test.clone(),
        None,
        LoaderConfig::eval(a.eval_batch_size, image_size),
    )?;
    let mut json = serde_json::Map::new();
    json.insert(
        "checkpoint".into(),
        a.checkpoint.display().to_string().into(),
    );
    json.insert("stage".into(), ckpt.meta.stage.clone().into());
    if let Some(classes) = ckpt.meta.config.num_classes {
        if classes != test.num_classes() {
            bail!(
                "{}: its supervised head has {classes} classes but {} has {}",
                a.checkpoint.display(),
                a.data.dataset,
                test.num_classes()
            );
        }
        if let Some(stored) = ckpt.meta.extra.get(checkpoint::CLASS_NAMES) {
            let stored: Vec<String> = serde_json::from_str(stored).with_context(|| {
                format!(
                    "{}: metadata field `{}` is not a list of names",
                    a.checkpoint.display(),
                    checkpoint::CLASS_NAMES
                )
            })?;
            if stored != test.class_names() {
                let first = stored
                    .iter()
                    .zip(test.class_names())
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                bail!(
                    "{}: trained on classes that are not those of {} (label {first}: {:?} in the checkpoint, {:?} in the data); the accuracy would compare the wrong classes",
                    a.checkpoint.display(),
                    a.data.dataset,
                    stored.get(first).map_or("(none)", String::as_str),
                    test.class_names().get(first).map_or("(none)", String::as_str)
                );
            }
        }
        let report =
            simclr_eval::evaluate_classifier(&ckpt.model, &loader, device, !a.no_progress)?;
        println!("{report}");
        json.insert("classifier".into(), serde_json::to_value(&report)?);
    }
    if a.knn {
        let train = a.data.load(Split::Train)?;
        let bank = Loader::new(
            train,
            None,
            LoaderConfig::eval(a.eval_batch_size, image_size),
        )?;
        let data = simclr_eval::KnnData {
            bank,
            queries: loader,
        };
        let top1 = simclr_eval::knn_top1(
            &ckpt.model,
            &data,
            &Default::default(),
            device,
            !a.no_progress,
        )?;
        println!(
            "kNN top-1 (k=200, τ=0.1, final_avg_pool): {:.2}%",
            100.0 * top1
        );
        json.insert("knn_top1".into(), top1.into());
    }
    if let Some(path) = a.report {
        simclr_data::write_atomic(&path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    }
    Ok(())
}

fn embed(a: EmbedArgs, device: &candle_core::Device) -> Result<()> {
    let ckpt = checkpoint::load(&a.checkpoint, device)?;
    let split = match a.split.as_str() {
        "train" => Split::Train,
        "test" | "val" => Split::Test,
        s => bail!("--split {s}: expected train or test"),
    };
    // Before the features are computed: a folder that cannot take the file fails now.
    let dir = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    check_writable(dir)?;
    let ds = a.data.load(split)?;
    let loader = Loader::new(
        ds,
        None,
        LoaderConfig::eval(a.eval_batch_size, a.data.image_size()?),
    )?;
    let (features, labels) =
        simclr_eval::features(&ckpt.model, &loader, &a.layer, device, !a.no_progress)?;
    let labels = Tensor::new(
        labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
        &candle_core::Device::Cpu,
    )?;
    let bytes = safetensors::serialize([("features", &features), ("labels", &labels)], None)
        .with_context(|| format!("writing {}", a.out.display()))?;
    simclr_fs::write_atomic(&a.out, &bytes)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "wrote {} features of dim {} to {}",
        features.dim(0)?,
        features.dim(1)?,
        a.out.display()
    );
    Ok(())
}

fn import(a: ImportArgs, device: &candle_core::Device) -> Result<()> {
    let is_pth = a.source.extension().is_some_and(|e| e == "pth");
    let imported = if is_pth {
        if a.ema {
            bail!("--ema applies to TF1 checkpoints; a converter .pth holds one copy (its name says _ema)");
        }
        simclr_interop::import_pth(&a.source, device)?
    } else {
        simclr_interop::import_tf1(&a.source, a.ema, device)?
    };
    checkpoint::save(&a.out, &imported.varmap, &imported.checkpoint_meta())?;
    println!(
        "imported {} ({}) into {}",
        a.source.display(),
        imported.config.name(),
        a.out.display()
    );
    Ok(())
}

fn export(a: ExportArgs, device: &candle_core::Device) -> Result<()> {
    let ckpt = checkpoint::load(&a.checkpoint, device)?;
    let config = &ckpt.meta.config;
    let out = match a.format {
        ExportFormat::Pth => {
            let path = if a.out.is_dir() {
                a.out.join(simclr_interop::pth_file_name(config))
            } else {
                a.out.clone()
            };
            simclr_interop::export_pth(&path, config, &ckpt.varmap)?;
            path
        }
        ExportFormat::Hf => {
            let figures = last_metrics(&a.checkpoint, &ckpt.meta.stage);
            simclr_interop::export_hf(&a.out, &ckpt.meta, &ckpt.varmap, &figures)?;
            a.out.clone()
        }
        ExportFormat::Onnx => {
            simclr_interop::export_onnx(&a.out, config, &ckpt.varmap)?;
            a.out.clone()
        }
    };
    println!(
        "exported {} ({}, {} step {}) to {}",
        a.checkpoint.display(),
        config.name(),
        ckpt.meta.stage,
        ckpt.meta.step,
        out.display()
    );
    Ok(())
}

/// Figures for a model card: the test top-1 of the pipeline's `eval_<stage>.md` next to the
/// checkpoint's folder, and the numeric fields of the last row of its `metrics.jsonl` (none
/// where the files are absent or unreadable: the card is still written).
fn last_metrics(checkpoint: &Path, stage: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(dir) = checkpoint.parent() else {
        return out;
    };
    let report = dir.parent().map(|p| p.join(format!("eval_{stage}.md")));
    if let Some(text) = report.and_then(|p| std::fs::read_to_string(p).ok()) {
        if let Some(top1) = text
            .lines()
            .find_map(|l| l.strip_prefix("- top-1 accuracy: "))
        {
            out.push((
                "evaluation top-1 (pipeline report)".into(),
                top1.trim().into(),
            ));
        }
    }
    let Ok(text) = std::fs::read_to_string(dir.join("metrics.jsonl")) else {
        return out;
    };
    let row = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(l).ok());
    for (k, v) in row.into_iter().flatten() {
        let value = match (v.as_u64(), v.as_f64()) {
            (Some(n), _) => n.to_string(),
            (None, Some(x)) => format!("{x:.4}"),
            _ => continue,
        };
        out.push((format!("last training row: {k}"), value));
    }
    out
}

/// The GPU of local rank `local`: device 0 when the launcher left each task one visible GPU
/// (`CUDA_VISIBLE_DEVICES` with a single entry, as SLURM's GPU binding does), else `local`.
fn local_gpu_index(local: usize) -> usize {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if !v.trim().is_empty() && !v.contains(',') => 0,
        _ => local,
    }
}

/// Joins the NCCL communicator of `world` ranks on `device` (the GPU training would take) and
/// all-reduces `rank + 1`: the sum must be `world·(world + 1)/2`.
#[cfg(feature = "nccl")]
fn nccl_all_reduce(
    world: usize,
    rank: usize,
    device: &candle_core::Device,
    rendezvous: &simclr_collective::Rendezvous,
    timeout: std::time::Duration,
) -> Result<f32> {
    use simclr_collective::Collective;
    if !device.is_cuda() {
        bail!("--nccl needs a GPU: pass --device cuda:N (or run under torchrun or srun)")
    }
    let device = device.clone();
    let nccl = simclr_collective::NcclReplica::join(rendezvous, &device, rank, world, timeout)
        .with_context(|| format!("rank {rank} of {world}: joining NCCL"))?;
    let x = candle_core::Tensor::new(&[(rank + 1) as f32], &device)?;
    let sum = nccl.all_reduce_sum(&x)?.to_vec1::<f32>()?[0];
    let want = (world * (world + 1) / 2) as f32;
    if sum != want {
        bail!("rank {rank} of {world}: the NCCL all-reduce gave {sum}, expected {want}")
    }
    Ok(sum)
}

#[cfg(not(feature = "nccl"))]
fn nccl_all_reduce(
    _world: usize,
    _rank: usize,
    _device: &candle_core::Device,
    _rendezvous: &simclr_collective::Rendezvous,
    _timeout: std::time::Duration,
) -> Result<f32> {
    bail!("--nccl: this binary was built without NCCL (rebuild with --features nccl)")
}

fn rendezvous_check(
    a: RendezvousCheckArgs,
    launch: Option<&simclr_collective::Launch>,
    device: &candle_core::Device,
) -> Result<()> {
    let (world, rank, local, rendezvous, source) = match (a.replicas, launch) {
        (Some(n), _) => {
            let Some(r) = a.rendezvous else {
                bail!("--replicas {n} needs --rendezvous <file or tcp://host:port>")
            };
            (n, a.rank, a.rank, r, "flags")
        }
        (None, Some(l)) => (
            l.world_size,
            l.rank,
            l.local_rank,
            l.rendezvous.clone(),
            l.launcher,
        ),
        (None, None) => bail!(
            "no launch to check: give --replicas, --rank and --rendezvous, or run under torchrun or srun"
        ),
    };
    let timeout = std::time::Duration::from_secs(a.timeout_secs);
    if a.nccl {
        let sum = nccl_all_reduce(world, rank, device, &rendezvous, timeout);
        // The rendezvous file is not left behind for the next check, whatever happened.
        rendezvous.finish(rank);
        let sum = sum?;
        println!(
            "rank {rank} of {world} (local rank {local}, from {source}): NCCL over {rendezvous}, all-reduce of the ranks' 1..={world} gave {sum}"
        );
        return Ok(());
    }
    // Rank 0's id: 16 bytes no other launch is likely to repeat.
    let create = || {
        use std::hash::{BuildHasher, Hasher};
        let mut bytes = Vec::with_capacity(16);
        for salt in 0..2u64 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(salt);
            h.write_u32(std::process::id());
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            bytes.extend_from_slice(&h.finish().to_le_bytes());
        }
        Ok(bytes)
    };
    let id = rendezvous
        .exchange(rank, world, 16, timeout, create)
        .with_context(|| format!("rank {rank} of {world}"))?;
    rendezvous.finish(rank);
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    println!(
        "rank {rank} of {world} (local rank {local}, from {source}): rendezvous {rendezvous}, id {hex}"
    );
    Ok(())
}
