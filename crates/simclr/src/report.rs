//! The pipeline's report: `report.json`, `report.md` and SVG charts (top-1 per method and
//! fraction; the loss curve of every stage, read back from its `metrics.jsonl`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use crate::charts::{bar_chart, line_chart};
use crate::pipeline::StageResult;

/// `(step, value)` of a field of a stage's metrics rows (the first of `keys` a row has).
fn curve(metrics: &Path, keys: &[&str]) -> Vec<(f64, f64)> {
    let Ok(text) = std::fs::read_to_string(metrics) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let y = keys.iter().find_map(|k| v.get(*k))?.as_f64()?;
            Some((v.get("step")?.as_f64()?, y))
        })
        .collect()
}

fn eval_split_title(summary: &Value) -> &'static str {
    match summary["eval_split"].as_str() {
        Some("validation") => "Validation",
        _ => "Test",
    }
}

/// One line per fraction: each pretrained model's top-1 minus the supervised baseline's, with
/// its sign spelt out.
pub fn verdicts(results: &[StageResult], split: &str) -> Vec<String> {
    let mut fractions: Vec<f64> = results.iter().filter_map(|r| r.fraction).collect();
    fractions.dedup();
    let find = |f: f64, m: &str| {
        results
            .iter()
            .find(|r| r.fraction == Some(f) && r.stage == m)
            .map(|r| 100.0 * r.top1)
    };
    let mut lines = Vec::new();
    for f in fractions {
        let Some(base) = find(f, "baseline") else {
            continue;
        };
        let mut parts = Vec::new();
        for (m, words) in [("distill", "distilled"), ("finetune", "fine-tuned")] {
            if let Some(v) = find(f, m) {
                let d = v - base;
                let side = if d > 0.0 {
                    "ABOVE"
                } else if d < 0.0 {
                    "BELOW"
                } else {
                    "LEVEL WITH"
                };
                parts.push(format!(
                    "{words} {v:.2}% is {:.2} points {side} the supervised baseline's {base:.2}%",
                    d.abs()
                ));
            }
        }
        lines.push(format!(
            "**{}% labels** ({split} top-1): {}.",
            f * 100.0,
            parts.join("; ")
        ));
    }
    lines
}

/// Writes report.json, report.md and the charts (accuracy.svg, loss_pretrain.svg,
/// accuracy_pretrain.svg, lr_pretrain.svg, loss_stages.svg) into `run_dir`.
pub fn write(run_dir: &Path, summary: &Value, results: &[StageResult]) -> Result<()> {
    simclr_data::write_atomic(
        &run_dir.join("report.json"),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )?;
    let mut fractions: Vec<f64> = results.iter().filter_map(|r| r.fraction).collect();
    fractions.dedup();
    let methods = ["baseline", "finetune", "distill"];
    let groups: Vec<(String, Vec<(String, f64)>)> = fractions
        .iter()
        .map(|&f| {
            let bars = methods
                .iter()
                .filter_map(|m| {
                    results
                        .iter()
                        .find(|r| r.fraction == Some(f) && r.stage == *m)
                        .map(|r| (m.to_string(), 100.0 * r.top1))
                })
                .collect();
            (format!("{}% labels", f * 100.0), bars)
        })
        .collect();
    let split_title = eval_split_title(summary);
    simclr_data::write_atomic(
        &run_dir.join("accuracy.svg"),
        bar_chart(
            &format!("{split_title} top-1 of each model"),
            "labelled fraction",
            &format!("{} top-1 (%)", split_title.to_lowercase()),
            &groups,
        )
        .as_bytes(),
    )?;
    let pre = run_dir.join("pretrain/metrics.jsonl");
    // Pretraining logs the contrastive loss apart from the online probe's.
    let pre_charts = [
        (
            "loss_pretrain.svg",
            "Pretraining contrastive loss (NT-Xent)",
            "loss",
            vec![("contrastive loss", curve(&pre, &["contrast_loss", "loss"]))],
        ),
        (
            "accuracy_pretrain.svg",
            "Pretraining: contrastive accuracy and kNN top-1",
            "accuracy",
            vec![
                ("contrastive accuracy", curve(&pre, &["contrast_acc"])),
                ("kNN top-1 (per epoch)", curve(&pre, &["knn_top1"])),
            ],
        ),
        (
            "lr_pretrain.svg",
            "Pretraining learning rate (warmup, then cosine)",
            "learning rate",
            vec![("lr", curve(&pre, &["lr"]))],
        ),
    ];
    for (file, title, y_title, series) in pre_charts {
        let series: Vec<(String, Vec<(f64, f64)>)> = series
            .into_iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(n, s)| (n.to_string(), s))
            .collect();
        simclr_data::write_atomic(
            &run_dir.join(file),
            line_chart(title, "step", y_title, &series).as_bytes(),
        )?;
    }
    // Each stage's metrics sit next to its checkpoint.
    let stages: Vec<(String, Vec<(f64, f64)>)> = results
        .iter()
        .map(|r| {
            (
                format!("{} {}%", r.stage, r.fraction.unwrap_or(1.0) * 100.0),
                curve(&r.checkpoint.with_file_name("metrics.jsonl"), &["loss"]),
            )
        })
        .collect();
    simclr_data::write_atomic(
        &run_dir.join("loss_stages.svg"),
        line_chart(
            "Fine-tuning / baseline / distillation loss",
            "step",
            "training loss",
            &stages,
        )
        .as_bytes(),
    )?;

    let mut md = String::new();
    let cfg = &summary["config"];
    let _ = writeln!(
        md,
        "# SimCLRv2 pipeline report: {}\n",
        summary["run"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        md,
        "- Dataset: {} (train: {}; test: {})",
        cfg["dataset"],
        summary["train"].as_str().unwrap_or(""),
        summary["test"].as_str().unwrap_or("")
    );
    let model = &cfg["pretrain"]["model"];
    let _ = writeln!(
        md,
        "- Preset: {}, model: ResNet-{} width ×{} base width {} sk_ratio {} (CIFAR stem: {}), seed {}",
        cfg["preset"], model["resnet_depth"], model["width_multiplier"], model["base_width"], model["sk_ratio"], model["cifar_stem"], cfg["seed"]
    );
    let p = &summary["pretrain"];
    let _ = writeln!(
        md,
        "- Pretraining: {} steps, {:.0} s, {:.1} images/s; kNN top-1 {:.2}% (same network at random initialisation: {:.2}%)",
        p["steps"],
        p["wall_seconds"].as_f64().unwrap_or(0.0),
        p["images_per_second"].as_f64().unwrap_or(0.0),
        100.0 * p["knn_top1"].as_f64().unwrap_or(0.0),
        100.0 * p["knn_top1_random_init"].as_f64().unwrap_or(0.0)
    );
    let split = summary["eval_split"].as_str().unwrap_or("test");
    let _ = writeln!(
        md,
        "- Every model is evaluated on the {split} split ({}){}",
        summary["test"].as_str().unwrap_or(""),
        if split == "validation" {
            "; held out of the training set, the test set untouched"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "- Total wall time: {:.0} s\n",
        summary["total_wall_seconds"].as_f64().unwrap_or(0.0)
    );
    if results.is_empty() {
        // `--pretrain-only`: there is no labelled stage to judge.
        md.push_str("Pretraining only: no labelled stage was run, so there is no verdict.\n");
    } else {
        md.push_str("## Verdict\n\n");
        for line in verdicts(results, split) {
            let _ = writeln!(md, "- {line}");
        }
        let _ = writeln!(md, "\n## Models\n");
        models_table(&mut md, results, split);
    }
    let _ = writeln!(md, "\n## How each model was trained\n");
    let _ = writeln!(
        md,
        "- pretraining: {} ({:.0} s; kNN of the pretrained and random networks {:.0} s)",
        p["recipe"].as_str().unwrap_or(""),
        p["wall_seconds"].as_f64().unwrap_or(0.0),
        summary["knn_seconds"].as_f64().unwrap_or(0.0)
    );
    for r in results {
        let _ = writeln!(
            md,
            "- {} at {}% labels: {} ({:.0} s)",
            r.stage,
            r.fraction.unwrap_or(1.0) * 100.0,
            r.recipe,
            r.wall_seconds
        );
    }
    let _ = writeln!(md, "\n![top-1](accuracy.svg)\n\n![pretraining loss](loss_pretrain.svg)\n\n![pretraining accuracy](accuracy_pretrain.svg)\n\n![pretraining learning rate](lr_pretrain.svg)\n\n![stage losses](loss_stages.svg)\n");
    let _ = writeln!(md, "Each fraction's folder holds its labelled split (`labelled_split.txt`, the official split-file format) and the per-class evaluation of each model (`eval_*.md`). The full configuration is in `pipeline.json`.");
    simclr_data::write_atomic(&run_dir.join("report.md"), md.as_bytes())?;
    Ok(())
}

/// The models table of the report: one row per trained model.
fn models_table(md: &mut String, results: &[StageResult], split: &str) {
    let _ = writeln!(md, "| labels | method | {split} top-1 | top-5 | steps | train s | eval s | images/s |\n|---|---|---|---|---|---|---|---|");
    for r in results {
        let _ = writeln!(
            md,
            "| {}% | {} | {:.2} | {} | {} | {:.0} | {:.1} | {:.1} |",
            r.fraction.unwrap_or(1.0) * 100.0,
            r.stage,
            100.0 * r.top1,
            r.top5
                .map(|t| format!("{:.2}", 100.0 * t))
                .unwrap_or_else(|| "-".into()),
            r.steps,
            r.wall_seconds,
            r.eval_seconds,
            r.images_per_second
        );
    }
}
