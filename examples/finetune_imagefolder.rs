//! Fine-tune a checkpoint on your own images, then evaluate it.
//!
//! ```sh
//! cargo run --release -p simclr-examples --example finetune_imagefolder -- \
//!     CHECKPOINT ROOT [FRACTION [STEPS]]
//! ```
//!
//! `CHECKPOINT` is a pretrained checkpoint of this project (`simclr pretrain`, or `simclr
//! import` of the official weights); `ROOT` holds `train/<class>/*` and `val/<class>/*` images
//! (JPEG or PNG, the ImageNet layout). `FRACTION` of each class's training images keep their
//! label (default 0.1); fine-tuning runs `STEPS` steps (default 200) from the first
//! projection-head layer, as SimCLRv2 does, and writes its checkpoints under
//! `ROOT/../finetune-example`. The validation images are then classified.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use simclr_data::split::class_balanced_subset;
use simclr_data::{load_dataset, DataOptions, DatasetName, Loader};
use simclr_data::{LoaderConfig, Split};
use simclr_finetune::{run_finetune, FinetuneConfig, FinetuneInit};
use simclr_train::StageEnv;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(checkpoint), Some(root)) = (args.first(), args.get(1)) else {
        bail!("usage: finetune_imagefolder CHECKPOINT ROOT [FRACTION [STEPS]]")
    };
    let fraction: f64 = args.get(2).map_or(Ok(0.1), |s| s.parse())?;
    let steps: u64 = args.get(3).map_or(Ok(200), |s| s.parse())?;
    let root = PathBuf::from(root);
    let opts = DataOptions {
        data_dir: Some(root.clone()),
        ..DataOptions::default()
    };
    let dataset = DatasetName::ImageFolder;
    let train = load_dataset(&dataset, Split::Train, &opts)?;
    let val = load_dataset(&dataset, Split::Test, &opts)?;
    let image_size = dataset.default_image_size();

    // The official fine-tuning recipe for this image size, shortened to `steps`.
    let mut cfg = FinetuneConfig::new(image_size, fraction);
    cfg.training.schedule.train_steps = Some(steps);
    cfg.training.train_batch_size = cfg.training.train_batch_size.min(64);
    let labelled = class_balanced_subset(&train.labels(), train.num_classes(), fraction, cfg.seed)?;
    println!(
        "{} of {} training images labelled, {} classes",
        labelled.len(),
        train.len(),
        train.num_classes()
    );

    let device = Device::Cpu;
    let out_dir = root.join("../finetune-example");
    let (summary, task) = run_finetune(
        &cfg,
        &FinetuneInit::Pretrained(PathBuf::from(checkpoint)),
        simclr_models::Stage::Finetune,
        train,
        labelled,
        StageEnv {
            out_dir: &out_dir,
            resume: false,
            progress: true,
            device: &device,
        },
    )?;
    println!(
        "fine-tuned {} steps in {:.0} s; checkpoint {}",
        summary.steps,
        summary.wall_seconds,
        summary.checkpoint.display()
    );

    let loader = Loader::new(val, None, LoaderConfig::eval(64, image_size))?;
    let report = simclr_eval::evaluate_classifier(task.model(), &loader, &device, true)?;
    println!(
        "validation top-1 {:.2} % on {} images",
        100.0 * report.top1,
        report.num_samples
    );
    Ok(())
}
