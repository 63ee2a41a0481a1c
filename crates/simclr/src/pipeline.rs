//! `cargo xtask pipeline`: pretrain → fine-tune → distill → evaluate, plus the supervised
//! baseline, for one or more label fractions, with a report.
//!
//! One pretraining serves every fraction. Each stage writes into its own folder of
//! `checkpoints/<run>/`, where `<run>` names the dataset, preset and model and ends with a hash of
//! the data and pretraining settings; each later stage's folder name ends with a hash of its own
//! settings and of the stage it starts from. A stage whose checkpoint is complete is reused, an
//! interrupted one resumes, so running the same command again continues where it stopped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::json;
use simclr_collective::Rendezvous;
use simclr_data::split::{class_balanced_subset, validate_fraction, write_split_file};
use simclr_data::{
    load_dataset, DataOptions, Dataset, DatasetName, Loader, LoaderConfig, Split, SubsetDataset,
};
use simclr_distill::{run_distill, DistillConfig, StudentInit};
use simclr_eval::EvalReport;
use simclr_finetune::{run_finetune, FinetuneConfig, FinetuneInit};
use simclr_models::{ModelConfig, Precision};
use simclr_pretrain::stage::{knn_top1, KnnData};
use simclr_pretrain::{run_pretrain_replica, PretrainConfig, PretrainData};
use simclr_train::schedule::LearningRateScaling;
use simclr_train::TrainSummary;

use crate::report;

/// How big a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// A tiny subset and a few steps per stage: checks the plumbing (CI).
    Smoke,
    /// Sized for a 2-core CPU in about 20 minutes on the committed Fashion-MNIST subset.
    Default,
    /// The paper's settings (ResNet-50, batch 4096, 800 pretraining epochs, …): for GPUs.
    Paper,
}

/// Everything the pipeline does, serialised into the run folder and hashed into its name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PipelineConfig {
    pub preset: Preset,
    pub dataset: String,
    pub fractions: Vec<f64>,
    pub seed: u64,
    /// Use only this many training / test images (class-balanced); `None`: all.
    pub train_subset: Option<usize>,
    pub test_subset: Option<usize>,
    pub pretrain: PretrainConfig,
    /// Fine-tuning settings per fraction, in the order of `fractions`.
    pub finetune: Vec<FinetuneConfig>,
    pub baseline: Vec<FinetuneConfig>,
    pub distill: DistillConfig,
}

impl PipelineConfig {
    /// Every stage at `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.pretrain.precision = precision;
        for f in self.finetune.iter_mut().chain(self.baseline.iter_mut()) {
            f.precision = precision;
        }
        self.distill.precision = precision;
        self
    }
}

/// The model named `name` (`r18`, `r50`, `r50_2x_sk1`, `r18_w16`, …) at `image_size` (the CIFAR
/// stem at ≤ 32 px).
pub fn model_for(name: &str, image_size: usize) -> Result<ModelConfig> {
    // `r18`, `r50`, `r50_2x_sk1`, `r18_w16` (base width 16) …
    let mut c = ModelConfig::default();
    for (i, part) in name.split('_').enumerate() {
        if i == 0 {
            c.resnet_depth = part
                .strip_prefix('r')
                .and_then(|d| d.parse().ok())
                .with_context(|| {
                    format!("--model {name}: expected r<depth>[_<w>x][_sk1][_w<base width>]")
                })?;
        } else if let Some(w) = part.strip_suffix('x') {
            c.width_multiplier = w
                .parse()
                .with_context(|| format!("--model {name}: bad width {part}"))?;
        } else if part == "sk1" {
            c.sk_ratio = simclr_models::config::SK1_RATIO;
        } else if part == "sk0" {
        } else if let Some(b) = part.strip_prefix('w') {
            c.base_width = b
                .parse()
                .with_context(|| format!("--model {name}: bad base width {part}"))?;
        } else {
            bail!("--model {name}: unknown part {part:?}");
        }
    }
    let c = c.with_image_size(image_size);
    c.validate()?;
    Ok(c)
}

impl PipelineConfig {
    /// The settings of `preset` for `dataset` at `image_size`, with `model` overriding the
    /// preset's network.
    pub fn new(
        preset: Preset,
        dataset: &str,
        image_size: usize,
        fractions: &[f64],
        model: Option<&str>,
        seed: u64,
    ) -> Result<Self> {
        for &f in fractions {
            validate_fraction(f)?;
        }
        let default_model = match preset {
            Preset::Smoke => "r18_w4",
            Preset::Default => "r18_w16",
            Preset::Paper => "r50",
        };
        let mut m = model_for(model.unwrap_or(default_model), image_size)?;
        let small = image_size <= 32;
        let mut pretrain = PretrainConfig::new(m.clone(), image_size);
        pretrain.seed = seed;
        let mut distill = DistillConfig::new(image_size, true);
        distill.seed = seed;
        let mut finetune: Vec<FinetuneConfig> = fractions
            .iter()
            .map(|&f| FinetuneConfig::new(image_size, f))
            .collect();
        let (mut train_subset, mut test_subset) = (None, None);
        match preset {
            Preset::Paper => {
                m.proj_out_dim = 128;
                pretrain.train_batch_size = 4096;
                pretrain.schedule.train_epochs = 800;
                pretrain.schedule.learning_rate = 0.1;
                pretrain.schedule.learning_rate_scaling = LearningRateScaling::Sqrt;
                pretrain.schedule.warmup_epochs = 40.0;
                pretrain.optimizer.weight_decay = 1e-4;
                if small {
                    pretrain.objective.temperature = 0.5;
                }
            }
            Preset::Default => {
                pretrain.train_batch_size = 256;
                // With the fused kernels a step of this model takes about 1.2 s on 2 cores, so
                // six epochs fit in about 5 minutes of the 20-minute budget.
                pretrain.schedule.train_epochs = 6;
                pretrain.schedule.learning_rate = 0.2;
                pretrain.schedule.learning_rate_scaling = LearningRateScaling::Sqrt;
                pretrain.schedule.warmup_epochs = 0.3;
                pretrain.optimizer.weight_decay = 1e-4;
                pretrain.objective.temperature = 0.2;
                pretrain.knn_every_epochs = 0;
                for (c, &f) in finetune.iter_mut().zip(fractions) {
                    c.train_batch_size = 256;
                    c.schedule.train_epochs = if f <= 0.01 { 60 } else { 8 };
                }
                distill.train_batch_size = 256;
                distill.schedule.learning_rate = 0.005;
                distill.schedule.learning_rate_scaling = LearningRateScaling::Sqrt;
                distill.schedule.warmup_epochs = 0.0;
                distill.optimizer.weight_decay = 0.0;
                // τ = 1 rather than the paper's 0.1 for self-distillation: the student starts from
                // the pretrained network (below) and learns from the teacher's full distribution,
                // not its near one-hot at τ = 0.1; with τ = 0.1 the 1% student tied or trailed
                // its teacher after 3 and 8 epochs (docs/results.md). τ² keeps the cross-entropy
                // scale should the temperature be lowered again (at τ = 0.1 without it, LARS
                // left BN and the head 10× larger steps and a student diverged).
                distill.tau_squared = true;
                distill.temperature = 1.0;
                distill.schedule.train_epochs = 3;
            }
            Preset::Smoke => {
                train_subset = Some(256);
                test_subset = Some(100);
                pretrain.train_batch_size = 32;
                pretrain.schedule.train_steps = Some(3);
                pretrain.schedule.warmup_epochs = 0.0;
                pretrain.knn_every_epochs = 0;
                pretrain.memory = None;
                for c in finetune.iter_mut() {
                    c.train_batch_size = 32;
                    c.schedule.train_steps = Some(3);
                }
                distill.train_batch_size = 32;
                distill.schedule.train_steps = Some(3);
                distill.schedule.warmup_epochs = 0.0;
            }
        }
        pretrain.model = m;
        // The supervised baseline: same network, labelled images, augmentation and epochs, with
        // the official supervised recipe (Nesterov momentum, lr 0.1·B/256, weight decay 1e-4,
        // cosine; reference §3.5) since LARS without weight decay is a fine-tuning recipe.
        let baseline = finetune
            .iter()
            .map(|c| {
                let mut b = c.clone();
                b.optimizer.optimizer = simclr_train::OptimizerKind::Momentum;
                b.optimizer.weight_decay = 1e-4;
                b.schedule.learning_rate = 0.1;
                b.schedule.learning_rate_scaling = LearningRateScaling::Linear;
                b
            })
            .collect();
        Ok(PipelineConfig {
            preset,
            dataset: dataset.to_string(),
            fractions: fractions.to_vec(),
            seed,
            train_subset,
            test_subset,
            pretrain,
            finetune,
            baseline,
            distill,
        })
    }

    /// `<dataset>-<preset>-<model>-<hash>`, the hash covering the data and the pretraining: the
    /// same pretraining always lands in the same folder, whatever the later stages do.
    pub fn run_name(&self) -> String {
        let key = json!({
            "dataset": self.dataset,
            "seed": self.seed,
            "train_subset": self.train_subset,
            "test_subset": self.test_subset,
            "pretrain": self.pretrain,
        });
        format!(
            "{}-{:?}-{}-{}",
            self.dataset.replace([':', '/'], "_"),
            self.preset,
            self.pretrain.model.name(),
            short_hash(&key)
        )
        .to_lowercase()
    }
}

/// 8 hex digits of FNV-1a over the JSON form: stable across Rust versions, unlike `DefaultHasher`.
pub fn short_hash(value: &impl Serialize) -> String {
    let text = serde_json::to_string(value).unwrap_or_default();
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:08x}", hash as u32)
}

/// A stage's folder: its name and the hash of its settings, so changing one stage's settings
/// retrains that stage only (and every stage that depends on it, through `upstream`).
fn stage_dir(parent: &Path, stage: &str, settings: &impl Serialize, upstream: &str) -> PathBuf {
    parent.join(format!(
        "{stage}-{}",
        short_hash(&json!({ "settings": settings, "upstream": upstream }))
    ))
}

/// One trained model's numbers in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageResult {
    pub stage: String,
    pub fraction: Option<f64>,
    pub top1: f64,
    pub top5: Option<f64>,
    pub wall_seconds: f64,
    pub images_per_second: f64,
    pub steps: u64,
    pub checkpoint: PathBuf,
}

fn class_balanced_cap(
    ds: &Arc<dyn Dataset>,
    n: Option<usize>,
    seed: u64,
) -> Result<Arc<dyn Dataset>> {
    let Some(n) = n else { return Ok(ds.clone()) };
    let f = (n as f64 / ds.len() as f64).min(1.0);
    let idx = class_balanced_subset(&ds.labels(), ds.num_classes(), f, seed)?;
    Ok(Arc::new(SubsetDataset::new(ds.clone(), idx)?))
}

fn evaluate(
    model: &simclr_models::SimclrModel,
    test: &Arc<dyn Dataset>,
    image_size: usize,
    device: &Device,
) -> Result<EvalReport> {
    let loader = Loader::new(test.clone(), None, LoaderConfig::eval(256, image_size))?;
    Ok(simclr_eval::evaluate_classifier(model, &loader, device)?)
}

fn result(stage: &str, fraction: Option<f64>, s: &TrainSummary, r: &EvalReport) -> StageResult {
    StageResult {
        stage: stage.to_string(),
        fraction,
        top1: r.top1,
        top5: r.top_k_accuracy,
        wall_seconds: s.wall_seconds,
        images_per_second: s.images_per_second,
        steps: s.steps,
        checkpoint: s.checkpoint.clone(),
    }
}

/// This process's place in a pretraining over several GPUs (`cargo xtask pipeline --gpus`):
/// rank `rank` of `world_size` NCCL replicas that meet through `rendezvous`. Every rank runs
/// the pretraining on its share of each global batch; rank 0 alone writes, and alone goes on
/// to the later stages (on its GPU) once the pretraining is done.
#[derive(Debug, Clone)]
pub struct Replica {
    pub rank: usize,
    pub world_size: usize,
    pub rendezvous: Rendezvous,
}

/// Runs the pipeline into `out_root/<run>/` and writes the report there; returns the run folder.
/// With `replica`, pretraining is data-parallel over the replicas; a rank other than 0 returns
/// once it is done.
pub fn run(
    cfg: &PipelineConfig,
    data_dir: Option<PathBuf>,
    out_root: &Path,
    progress: bool,
    device: &Device,
    replica: Option<&Replica>,
) -> Result<PathBuf> {
    let t0 = Instant::now();
    let run_dir = out_root.join(cfg.run_name());
    let rank = replica.map_or(0, |r| r.rank);
    if rank == 0 {
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let probe = run_dir.join(".write-test");
        std::fs::write(&probe, b"")
            .with_context(|| format!("{} is not writable", run_dir.display()))?;
        let _ = std::fs::remove_file(probe);
        simclr_data::write_atomic(
            &run_dir.join("pipeline.json"),
            serde_json::to_string_pretty(cfg)?.as_bytes(),
        )?;
    }

    let name: DatasetName = cfg.dataset.parse()?;
    let opts = DataOptions {
        data_dir,
        ..DataOptions::default()
    };
    let train = class_balanced_cap(
        &load_dataset(&name, Split::Train, &opts)?,
        cfg.train_subset,
        cfg.seed,
    )?;
    let test = class_balanced_cap(
        &load_dataset(&name, Split::Test, &opts)?,
        cfg.test_subset,
        cfg.seed,
    )?;
    let image_size = cfg.pretrain.image_size;
    // Every split is drawn and checked before the first step, so a bad fraction fails fast.
    let mut splits = Vec::new();
    for &f in &cfg.fractions {
        let idx = class_balanced_subset(&train.labels(), train.num_classes(), f, cfg.seed)?;
        simclr_data::split::check_all_classes_labelled(train.as_ref(), &idx)?;
        splits.push(idx);
    }
    tracing::info!(run = %run_dir.display(), train = %train.describe(), test = %test.describe(), "pipeline");

    let mut results = Vec::new();
    let pre_dir = run_dir.join("pretrain");
    let collective = match replica {
        Some(r) => crate::args::replicas(r.world_size, r.rank, Some(&r.rendezvous), device)?,
        None => Arc::new(simclr_collective::SingleReplica),
    };
    let pre = run_pretrain_replica(
        &cfg.pretrain,
        &PretrainData {
            train: train.clone(),
            test: Some(test.clone()),
        },
        &pre_dir,
        true,
        progress && rank == 0,
        device,
        collective,
    )?;
    if rank != 0 {
        return Ok(run_dir);
    }
    let pre_ckpt = pre.checkpoint.clone();
    // kNN of the pretrained encoder against the same network at random initialisation.
    let knn = KnnData {
        bank: Loader::new(train.clone(), None, LoaderConfig::eval(256, image_size))?,
        queries: Loader::new(test.clone(), None, LoaderConfig::eval(256, image_size))?,
    };
    let pretrained = simclr_models::checkpoint::load(&pre_ckpt, device)?;
    let knn_pretrained = knn_top1(&pretrained.model, &knn, &Default::default(), device)?;
    let random_vm = candle_nn::VarMap::new();
    let random =
        simclr_models::SimclrModel::init(&pretrained.meta.config, &random_vm, cfg.seed, device)?;
    let knn_random = knn_top1(&random, &knn, &Default::default(), device)?;
    println!(
        "pretraining: {:.0} s, kNN top-1 {:.2}% (random init {:.2}%)",
        pre.wall_seconds,
        100.0 * knn_pretrained,
        100.0 * knn_random
    );

    for (k, &f) in cfg.fractions.iter().enumerate() {
        let dir = run_dir.join(format!("fraction-{f}"));
        std::fs::create_dir_all(&dir)?;
        let labelled = splits[k].clone();
        write_split_file(&dir.join("labelled_split.txt"), train.as_ref(), &labelled)?;

        let ft_dir = stage_dir(&dir, "finetune", &cfg.finetune[k], "");
        let (ft, ft_task) = run_finetune(
            &cfg.finetune[k],
            &FinetuneInit::Pretrained(pre_ckpt.clone()),
            "finetune",
            train.clone(),
            labelled.clone(),
            &ft_dir,
            true,
            progress,
            device,
        )?;
        let ft_eval = evaluate(ft_task.model(), &test, image_size, device)?;
        results.push(result("finetune", Some(f), &ft, &ft_eval));

        let (bl, bl_task) = run_finetune(
            &cfg.baseline[k],
            &FinetuneInit::Scratch(cfg.pretrain.model.clone()),
            "supervised",
            train.clone(),
            labelled.clone(),
            &stage_dir(&dir, "baseline", &cfg.baseline[k], ""),
            true,
            progress,
            device,
        )?;
        let bl_eval = evaluate(bl_task.model(), &test, image_size, device)?;
        results.push(result("baseline", Some(f), &bl, &bl_eval));

        // The paper trains the student afresh for 400 epochs. On a CPU budget of minutes the
        // student starts from the pretrained network (encoder and projection head, a new
        // supervised head) and learns from the teacher's labels on every unlabeled image. A
        // student started from its teacher hardly moved from it (it stayed 0.3 points below
        // at 1%, docs/results.md).
        let (student, student_tag) = match cfg.preset {
            Preset::Paper => (StudentInit::Scratch(cfg.pretrain.model.clone()), "scratch"),
            _ => (StudentInit::Checkpoint(pre_ckpt.clone()), "pretrained"),
        };
        let (di, di_task) = run_distill(
            &cfg.distill,
            &ft.checkpoint,
            &student,
            train.clone(),
            &labelled,
            &stage_dir(
                &dir,
                "distill",
                &cfg.distill,
                &format!("{}|student={student_tag}", ft_dir.display()),
            ),
            true,
            progress,
            device,
        )?;
        let di_eval = evaluate(di_task.student(), &test, image_size, device)?;
        results.push(result("distill", Some(f), &di, &di_eval));
        println!(
            "fraction {f}: baseline {:.2}% / fine-tuned {:.2}% / distilled {:.2}% top-1",
            100.0 * bl_eval.top1,
            100.0 * ft_eval.top1,
            100.0 * di_eval.top1
        );
        simclr_data::write_atomic(
            &dir.join("eval_finetune.md"),
            ft_eval.to_markdown().as_bytes(),
        )?;
        simclr_data::write_atomic(
            &dir.join("eval_distill.md"),
            di_eval.to_markdown().as_bytes(),
        )?;
        simclr_data::write_atomic(
            &dir.join("eval_baseline.md"),
            bl_eval.to_markdown().as_bytes(),
        )?;
    }
    let summary = json!({
        "run": cfg.run_name(),
        "config": cfg,
        "train": train.describe(),
        "test": test.describe(),
        "pretrain": {
            "wall_seconds": pre.wall_seconds,
            "images_per_second": pre.images_per_second,
            "steps": pre.steps,
            "knn_top1": knn_pretrained,
            "knn_top1_random_init": knn_random,
            "checkpoint": pre_ckpt,
        },
        "results": results,
        "total_wall_seconds": t0.elapsed().as_secs_f64(),
    });
    report::write(&run_dir, &summary, &results)?;
    let mut line = String::new();
    let _ = write!(line, "report: {}", run_dir.join("report.md").display());
    println!("{line}");
    Ok(run_dir)
}

/// The other ranks of a multi-GPU pipeline, started by rank 0 (`cargo xtask pipeline --gpus`)
/// as copies of the running program with `--rank R --rendezvous ADDR` added to its own
/// arguments. A watcher ends the whole run when one of them fails (rank 0 would otherwise wait
/// in NCCL for ever); dropping the guard stops any that still run.
pub struct ReplicaProcesses {
    children: Arc<std::sync::Mutex<Vec<(usize, std::process::Child)>>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

/// This program's arguments for a child rank: all of them but the ones the launcher sets
/// itself (`--rank`, `--rendezvous`, `--no-progress`), which clap refuses to see twice.
fn child_args(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = a.to_string_lossy();
        match text.as_ref() {
            "--rank" | "--rendezvous" => skip_value = true,
            "--no-progress" => {}
            t if t.starts_with("--rank=") || t.starts_with("--rendezvous=") => {}
            _ => out.push(a),
        }
    }
    out
}

impl ReplicaProcesses {
    /// Starts ranks `1..world_size`.
    pub fn spawn(world_size: usize, rendezvous: &Rendezvous) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the running program")?;
        let own = child_args(std::env::args_os().skip(1));
        let mut children: Vec<(usize, std::process::Child)> = Vec::new();
        for rank in 1..world_size {
            let started = std::process::Command::new(&exe)
                .args(&own)
                .args([
                    "--rank",
                    &rank.to_string(),
                    "--rendezvous",
                    &rendezvous.to_string(),
                ])
                .arg("--no-progress")
                .spawn();
            match started {
                Ok(child) => children.push((rank, child)),
                Err(e) => {
                    for (_, mut child) in children {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    bail!("cannot start rank {rank} ({}): {e}", exe.display())
                }
            }
        }
        let children = Arc::new(std::sync::Mutex::new(children));
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (watched, stop) = (children.clone(), stopping.clone());
        let watcher = std::thread::spawn(move || loop {
            let mut all = watched.lock().unwrap_or_else(|e| e.into_inner());
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return; // rank 0 is stopping them itself
            }
            let mut running = 0;
            for (rank, child) in all.iter_mut() {
                match child.try_wait() {
                    Ok(Some(status)) if !status.success() => {
                        eprintln!(
                            "error: pretraining rank {rank} failed ({status}); stopping the run"
                        );
                        for (_, other) in all.iter_mut() {
                            let _ = other.kill();
                        }
                        std::process::exit(1);
                    }
                    Ok(None) => running += 1,
                    // Finished, or no longer ours to wait for.
                    Ok(Some(_)) | Err(_) => {}
                }
            }
            drop(all);
            if running == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        });
        Ok(Self {
            children,
            stopping,
            watcher: Some(watcher),
        })
    }

    /// Waits until every rank has finished (they finish with the pretraining).
    pub fn wait(mut self) {
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

impl Drop for ReplicaProcesses {
    fn drop(&mut self) {
        if self.watcher.is_some() {
            let mut all = self.children.lock().unwrap_or_else(|e| e.into_inner());
            // Under the lock: the watcher sees the flag before it could see the killed ranks.
            self.stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            for (_, child) in all.iter_mut() {
                let _ = child.kill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn child_ranks_get_the_arguments_without_the_launchers_own() {
        let args = [
            "pipeline",
            "--gpus",
            "0,1",
            "--no-progress",
            "--rank",
            "3",
            "--fraction",
            "0.1",
            "--rendezvous=tcp://h:1",
            "--rendezvous",
            "/tmp/x",
            "--rank=2",
            "--out",
            "o",
        ];
        let got = super::child_args(args.iter().map(std::ffi::OsString::from));
        let want = [
            "pipeline",
            "--gpus",
            "0,1",
            "--fraction",
            "0.1",
            "--out",
            "o",
        ];
        assert_eq!(got, want.map(std::ffi::OsString::from));
    }
}
