//! Running a model over a loader: features for kNN and embedding export, logits for metrics.
//!
//! Inference mode throughout (BN with its moving statistics); outputs are detached per batch so
//! no autograd graph outlives its batch.

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use simclr_data::Loader;
use simclr_models::SimclrModel;

use crate::{ClassificationMetrics, EvalError, EvalReport, Result};

/// A progress bar over the images `loader` serves (hidden unless `progress`), with images/s and
/// the ETA, as the training loop's.
fn bar(loader: &Loader, what: &str, progress: bool) -> ProgressBar {
    let pb = ProgressBar::new(loader.num_images() as u64);
    if !progress {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} images  {per_sec}  ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// The output `layer` of `model` (`final_avg_pool`, `proj_head_N`, `proj_head_output`,
/// `logits_sup`) for every image `loader` serves, in order, with their labels; computed on
/// `device`, returned on the CPU. `progress`: show a progress bar.
pub fn features(
    model: &SimclrModel,
    loader: &Loader,
    layer: &str,
    device: &Device,
    progress: bool,
) -> Result<(Tensor, Vec<usize>)> {
    let mut chunks = Vec::new();
    let mut labels = Vec::new();
    let pb = bar(loader, &format!("features {layer}"), progress);
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        pb.inc(batch.indices.len() as u64);
        let x = batch.views[0].to_device(device)?;
        let out = model.forward(&x, false)?;
        let t = out
            .get(layer)
            .ok_or_else(|| EvalError::UnknownLayer(layer.to_string()))?;
        chunks.push(t.detach().to_device(&Device::Cpu)?);
        labels.extend(batch.indices.iter().map(|&i| loader.dataset().label(i)));
    }
    pb.finish_and_clear();
    Ok((Tensor::cat(&chunks, 0)?, labels))
}

/// Top-1 / top-5, per-class accuracy and the confusion matrix of the supervised head's logits
/// over every image of `loader`, run on `device`. `progress`: show a progress bar.
pub fn evaluate_classifier(
    model: &SimclrModel,
    loader: &Loader,
    device: &Device,
    progress: bool,
) -> Result<EvalReport> {
    let ds = loader.dataset();
    let mut metrics = ClassificationMetrics::new(ds.num_classes())?;
    let pb = bar(loader, "evaluate", progress);
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        pb.inc(batch.indices.len() as u64);
        let out = model.forward(&batch.views[0].to_device(device)?, false)?;
        let logits = out
            .logits_sup
            .ok_or_else(|| EvalError::UnknownLayer("logits_sup".into()))?;
        metrics.update(&logits.detach(), &batch.labels)?;
    }
    pb.finish_and_clear();
    metrics.report_with_names(ds.class_names())
}

/// What the kNN evaluation of an encoder reads: features of `bank` (training images, with their
/// labels) classify `queries`.
pub struct KnnData {
    pub bank: Loader,
    pub queries: Loader,
}

/// kNN top-1 of `model`'s encoder features (`final_avg_pool`, inference mode): the pretraining
/// monitor, `simclr eval` and the pipeline's report all measure it here. `progress`: show the
/// feature extraction's progress.
pub fn knn_top1(
    model: &SimclrModel,
    data: &KnnData,
    cfg: &crate::KnnConfig,
    device: &Device,
    progress: bool,
) -> Result<f64> {
    let layer = "final_avg_pool";
    let (bank, bank_labels) = features(model, &data.bank, layer, device, progress)?;
    let (queries, query_labels) = features(model, &data.queries, layer, device, progress)?;
    let classes = data.bank.dataset().num_classes();
    let r = crate::knn_evaluate(
        &bank,
        &bank_labels,
        &queries,
        &query_labels,
        classes,
        cfg,
        crate::KnnVote::Weighted,
    )?;
    Ok(r.top1())
}
