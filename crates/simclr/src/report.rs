//! The pipeline's report: `report.json`, `report.md` and SVG charts (top-1 per method and
//! fraction; the loss curve of every stage, read back from its `metrics.jsonl`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use crate::pipeline::StageResult;

const COLOURS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
];

/// `(step, loss)` rows of a stage's metrics file.
fn loss_curve(metrics: &Path) -> Vec<(f64, f64)> {
    let Ok(text) = std::fs::read_to_string(metrics) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        // Pretraining logs the contrastive loss apart from the probe's: chart that one.
        .filter_map(|v| {
            let loss = v.get("contrast_loss").or_else(|| v.get("loss"))?.as_f64()?;
            Some((v.get("step")?.as_f64()?, loss))
        })
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart of several series, each scaled to the shared y range.
pub fn line_chart(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (w, h, m) = (640.0, 320.0, 48.0);
    let pts: Vec<&(f64, f64)> = series
        .iter()
        .flat_map(|(_, s)| s)
        .filter(|p| p.1.is_finite())
        .collect();
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    if pts.is_empty() {
        svg.push_str("</svg>");
        return svg;
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let sx = |x: f64| m + (x - x0) / (x1 - x0).max(1e-12) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0).max(1e-12) * (h - 2.0 * m);
    let _ = write!(
        svg,
        r#"<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="black"/>"#,
        h - m,
        w - m,
        h - m,
        h - m
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end">{y1:.3}</text><text x="{}" y="{}" text-anchor="end">{y0:.3}</text><text x="{m}" y="{}">{x0}</text><text x="{}" y="{}" text-anchor="end">{x1} steps</text>"#,
        m - 4.0,
        m + 4.0,
        m - 4.0,
        h - m,
        h - m + 16.0,
        w - m,
        h - m + 16.0
    );
    for (i, (name, s)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = s
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"/><text x="{}" y="{}" fill="{c}">{}</text>"#,
            path.join(" "),
            w - m - 150.0,
            m + 16.0 * i as f64,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Grouped bars: one group per fraction, one bar per method, top-1 in %.
pub fn bar_chart(title: &str, groups: &[(String, Vec<(String, f64)>)]) -> String {
    let (w, h, m) = (640.0, 320.0, 48.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    let _ = write!(
        svg,
        r#"<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        h - m,
        w - m,
        h - m
    );
    let gw = (w - 2.0 * m) / groups.len().max(1) as f64;
    for (g, (label, bars)) in groups.iter().enumerate() {
        let bw = gw * 0.8 / bars.len().max(1) as f64;
        for (b, (name, v)) in bars.iter().enumerate() {
            let x = m + g as f64 * gw + gw * 0.1 + b as f64 * bw;
            let bh = v.clamp(0.0, 100.0) / 100.0 * (h - 2.0 * m);
            let c = COLOURS[b % COLOURS.len()];
            let _ = write!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{c}"><title>{} {v:.2}%</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.1}</text>"#,
                h - m - bh,
                bw * 0.9,
                escape(name),
                x + bw * 0.45,
                h - m - bh - 3.0
            );
            if g == 0 {
                let _ = write!(
                    svg,
                    r#"<text x="{}" y="{}" fill="{c}">{}</text>"#,
                    w - m - 100.0,
                    m + 16.0 * b as f64,
                    escape(name)
                );
            }
        }
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            m + g as f64 * gw + gw / 2.0,
            h - m + 16.0,
            escape(label)
        );
    }
    svg.push_str("</svg>");
    svg
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

/// Writes report.json, report.md, accuracy.svg, loss_pretrain.svg and loss_stages.svg into `run_dir`.
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
    simclr_data::write_atomic(
        &run_dir.join("accuracy.svg"),
        bar_chart(&format!("{} top-1 (%)", eval_split_title(summary)), &groups).as_bytes(),
    )?;
    let mut series = vec![(
        "pretrain".to_string(),
        loss_curve(&run_dir.join("pretrain/metrics.jsonl")),
    )];
    // Each stage's metrics sit next to its checkpoint.
    for r in results {
        series.push((
            format!("{} {}%", r.stage, r.fraction.unwrap_or(1.0) * 100.0),
            loss_curve(&r.checkpoint.with_file_name("metrics.jsonl")),
        ));
    }
    // The contrastive loss lives on another scale: its own chart.
    simclr_data::write_atomic(
        &run_dir.join("loss_pretrain.svg"),
        line_chart("Pretraining contrastive loss (NT-Xent)", &series[..1]).as_bytes(),
    )?;
    simclr_data::write_atomic(
        &run_dir.join("loss_stages.svg"),
        line_chart("Fine-tuning / baseline / distillation loss", &series[1..]).as_bytes(),
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
    let _ = writeln!(md, "\n![top-1](accuracy.svg)\n\n![pretraining loss](loss_pretrain.svg)\n\n![stage losses](loss_stages.svg)\n");
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
