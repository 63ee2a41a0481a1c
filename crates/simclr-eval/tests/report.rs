//! The evaluation report: serde round trip and Markdown rendering.

use candle_core::{Device, Tensor};
use simclr_eval::{ClassificationMetrics, EvalReport};

fn metrics() -> ClassificationMetrics {
    // labels 0 0 0 0 1 1 1 2 2 2, predictions 0 0 1 2 1 1 0 2 2 1 (see tests/metrics.rs).
    let mut m = ClassificationMetrics::new(3).unwrap();
    m.update_predictions(
        &[0usize, 0, 1, 2, 1, 1, 0, 2, 2, 1],
        &[0usize, 0, 0, 0, 1, 1, 1, 2, 2, 2],
    )
    .unwrap();
    m.add_loss(0.25, 10);
    m
}

#[test]
fn report_holds_names_and_numbers() {
    let report = metrics()
        .report_with_names(&["T-shirt/top", "Trouser", "Pull|over"])
        .unwrap();
    assert_eq!(report.num_samples, 10);
    assert_eq!(report.top1, 0.6);
    assert_eq!(report.top_k, None);
    assert_eq!(report.mean_loss, Some(0.25));
    assert_eq!(report.per_class[1].name, "Trouser");
    assert_eq!(report.per_class[0].accuracy, Some(0.5));
    assert_eq!(report.confusion_matrix.counts[2], vec![0, 1, 2]);
    let default = metrics().report();
    assert_eq!(default.class_names, vec!["0", "1", "2"]);
}

#[test]
fn report_round_trips_through_json() {
    let report = metrics().report_with_names(&["a", "b", "c"]).unwrap();
    let json = serde_json::to_string_pretty(&report).unwrap();
    assert!(json.contains("\"confusion_matrix\""), "{json}");
    let back: EvalReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, report);
}

#[test]
fn markdown_rendering() {
    let report = metrics()
        .report_with_names(&["T-shirt/top", "Trouser", "Pull|over"])
        .unwrap();
    let md = report.to_markdown();
    assert!(md.contains("- top-1 accuracy: 60.00%"), "{md}");
    assert!(md.contains("- mean per-class accuracy: 61.11%"), "{md}");
    assert!(md.contains("- mean loss: 0.2500"), "{md}");
    // Per-class rows: class, name, support, correct, accuracy, predicted, precision.
    let row0 = md.lines().find(|l| l.contains("| T-shirt/top")).unwrap();
    let cells: Vec<&str> = row0.split('|').map(str::trim).collect();
    assert_eq!(
        cells[1..8],
        ["0", "T-shirt/top", "4", "2", "50.00%", "3", "66.67%"]
    );
    // The '|' inside a class name is escaped.
    assert!(md.contains("Pull\\|over"), "{md}");
    // Confusion matrix row of class 1: 1 2 0, total 3.
    let cm = report.confusion_markdown();
    let row1 = cm.lines().find(|l| l.starts_with("| 1 Trouser")).unwrap();
    let cells: Vec<&str> = row1.split('|').map(str::trim).collect();
    assert_eq!(cells[1..6], ["1 Trouser", "1", "2", "0", "3"]);
    assert_eq!(report.to_string(), md);
    eprintln!("{md}");
}

#[test]
fn top5_and_missing_classes_render() {
    let mut m = ClassificationMetrics::new(6).unwrap();
    let logits = Tensor::new(&[[0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0]], &Device::Cpu).unwrap();
    m.update(&logits, &[0usize]).unwrap();
    let report = m.report();
    assert_eq!(report.top_k, Some(5));
    assert_eq!(report.top_k_accuracy, Some(0.0));
    let md = report.to_markdown();
    assert!(md.contains("- top-5 accuracy: 0.00%"), "{md}");
    // Class 3 has no sample and nothing predicted: dashes.
    let row3 = md.lines().find(|l| l.starts_with("|     3 |")).unwrap();
    assert!(row3.contains(" - "), "{row3}");
}

#[test]
fn large_confusion_matrices_are_left_to_json() {
    let m = ClassificationMetrics::new(100).unwrap();
    let md = m.report().to_markdown();
    assert!(md.contains("Not rendered for 100 classes"), "{md}");
}
