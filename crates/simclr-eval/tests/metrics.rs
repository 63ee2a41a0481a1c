//! Classification metrics against hand-computed confusion matrices.

use candle_core::{DType, Device, Tensor};
use simclr_eval::{ClassificationMetrics, EvalError};

/// Logits `[N, C]` where row `i` scores `predictions[i]` highest (3.0), every other class lower
/// and distinct.
fn logits_for(predictions: &[usize], num_classes: usize) -> Tensor {
    let mut values = Vec::new();
    for &p in predictions {
        for j in 0..num_classes {
            values.push(if j == p { 3.0f32 } else { -(j as f32) * 0.1 });
        }
    }
    Tensor::from_vec(values, (predictions.len(), num_classes), &Device::Cpu).unwrap()
}

// 3 classes, 10 samples:
//   labels      0 0 0 0 1 1 1 2 2 2
//   predictions 0 0 1 2 1 1 0 2 2 1
// By hand, rows = true class, columns = predicted class:
//   true 0: [2, 1, 1]   (4 samples, 2 right)
//   true 1: [1, 2, 0]   (3 samples, 2 right)
//   true 2: [0, 1, 2]   (3 samples, 2 right)
// top-1 = 6/10; per-class accuracy 2/4, 2/3, 2/3; mean per-class = (1/2 + 2/3 + 2/3) / 3 = 11/18;
// predicted counts per column 3, 4, 3, so precision 2/3, 2/4, 2/3.
const LABELS: [usize; 10] = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2];
const PREDICTIONS: [usize; 10] = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1];

fn hand_metrics() -> ClassificationMetrics {
    let mut m = ClassificationMetrics::new(3).unwrap();
    // Two batches: the first with a u32 label tensor, the second with a usize slice.
    let first = Tensor::new(&[0u32, 0, 0, 0, 1, 1], &Device::Cpu).unwrap();
    m.update(&logits_for(&PREDICTIONS[..6], 3), &first).unwrap();
    m.update(&logits_for(&PREDICTIONS[6..], 3), &LABELS[6..])
        .unwrap();
    m
}

#[test]
fn confusion_matrix_matches_hand_computation() {
    let m = hand_metrics();
    let cm = m.confusion_matrix();
    assert_eq!(cm.counts, vec![vec![2, 1, 1], vec![1, 2, 0], vec![0, 1, 2]]);
    assert_eq!(cm.support(), vec![4, 3, 3]);
    assert_eq!(cm.predicted(), vec![3, 4, 3]);
    assert_eq!(cm.total(), 10);
    assert_eq!(cm.get(0, 2), 1);
    assert_eq!(m.count(1, 0), 1);
    assert_eq!(m.total(), 10);
    assert_eq!(m.correct(), 6);
}

#[test]
fn top1_and_per_class_match_hand_computation() {
    let m = hand_metrics();
    assert_eq!(m.top1(), 0.6);
    // Fewer than 5 classes: no top-5.
    assert_eq!(m.top_k(), None);
    assert_eq!(m.top_k_accuracy(), None);
    let per_class = m.per_class();
    let acc: Vec<f64> = per_class.iter().map(|c| c.accuracy.unwrap()).collect();
    assert_eq!(acc, vec![0.5, 2.0 / 3.0, 2.0 / 3.0]);
    let support: Vec<u64> = per_class.iter().map(|c| c.support).collect();
    assert_eq!(support, vec![4, 3, 3]);
    let correct: Vec<u64> = per_class.iter().map(|c| c.correct).collect();
    assert_eq!(correct, vec![2, 2, 2]);
    let precision: Vec<f64> = per_class.iter().map(|c| c.precision.unwrap()).collect();
    assert_eq!(precision, vec![2.0 / 3.0, 0.5, 2.0 / 3.0]);
    let balanced = m.mean_per_class_accuracy().unwrap();
    assert!((balanced - 11.0 / 18.0).abs() < 1e-12, "{balanced}");
}

#[test]
fn hard_predictions_give_the_same_confusion_matrix() {
    let mut m = ClassificationMetrics::new(3).unwrap();
    m.update_predictions(&PREDICTIONS, &LABELS).unwrap();
    assert_eq!(m.confusion_matrix(), hand_metrics().confusion_matrix());
    assert_eq!(m.top1(), 0.6);
}

#[test]
fn any_float_dtype_gives_the_same_result() {
    for dtype in [DType::F16, DType::BF16, DType::F64] {
        let mut m = ClassificationMetrics::new(3).unwrap();
        let logits = logits_for(&PREDICTIONS, 3).to_dtype(dtype).unwrap();
        m.update(&logits, &LABELS).unwrap();
        assert_eq!(
            m.confusion_matrix(),
            hand_metrics().confusion_matrix(),
            "{dtype:?}"
        );
    }
}

#[test]
fn labels_of_every_integer_dtype_are_accepted() {
    let logits = logits_for(&PREDICTIONS, 3);
    for dtype in [DType::U8, DType::U32, DType::I64] {
        let labels = Tensor::new(&[0u32, 0, 0, 0, 1, 1, 1, 2, 2, 2], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let mut m = ClassificationMetrics::new(3).unwrap();
        m.update(&logits, &labels).unwrap();
        assert_eq!(m.correct(), 6, "{dtype:?}");
    }
}

#[test]
fn top5_counts_a_true_label_ranked_fifth() {
    // 7 classes, true class 6 in every row.
    let rows: [[f32; 7]; 2] = [
        // Four classes above the true class: it is 5th, inside the top 5.
        [9.0, 8.0, 7.0, 6.0, 0.0, -1.0, 5.0],
        // Five classes above: 6th, outside.
        [9.0, 8.0, 7.0, 6.0, 5.5, -1.0, 5.0],
    ];
    let logits = Tensor::new(&rows, &Device::Cpu).unwrap();
    let mut m = ClassificationMetrics::new(7).unwrap();
    assert_eq!(m.top_k(), Some(5));
    m.update(&logits, &[6usize, 6]).unwrap();
    assert_eq!(m.top1(), 0.0);
    assert_eq!(m.top_k_accuracy(), Some(0.5));
}

#[test]
fn top5_ties_are_broken_by_lower_class_index() {
    let rows: [[f32; 7]; 2] = [
        // True class 4 ties with class 5 at the boundary: classes 0..=3 are above it, class 5
        // (equal score, higher index) ranks below it, so class 4 is 5th: inside.
        [9.0, 9.0, 9.0, 9.0, 1.0, 1.0, 0.0],
        // True class 5 ties with class 4 (equal score, lower index), which ranks above it:
        // 0..=4 are above, class 5 is 6th: outside.
        [9.0, 9.0, 9.0, 9.0, 1.0, 1.0, 0.0],
    ];
    let logits = Tensor::new(&rows, &Device::Cpu).unwrap();
    let mut m = ClassificationMetrics::new(7).unwrap();
    m.update(&logits, &[4usize, 5]).unwrap();
    assert_eq!(m.top_k_accuracy(), Some(0.5));
}

#[test]
fn top1_ties_go_to_the_lower_class_index() {
    let logits = Tensor::new(
        &[[1.0f32, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 2.0]],
        &Device::Cpu,
    )
    .unwrap();
    let mut m = ClassificationMetrics::new(3).unwrap();
    m.update(&logits, &[0usize, 1, 2]).unwrap();
    // Row 0: tie 0/1 -> 0, right. Row 1: tie 0/1 -> 0, wrong. Row 2: tie 1/2 -> 1, wrong.
    assert_eq!(m.correct(), 1);
    assert_eq!(m.count(1, 0), 1);
    assert_eq!(m.count(2, 1), 1);
}

#[test]
fn custom_top_k_and_infinite_logits() {
    let logits = Tensor::new(
        &[[f32::NEG_INFINITY, 0.0, f32::INFINITY], [3.0, 2.0, 1.0]],
        &Device::Cpu,
    )
    .unwrap();
    let mut m = ClassificationMetrics::with_top_k(3, 2).unwrap();
    m.update(&logits, &[1usize, 2]).unwrap();
    // Row 0: ranking 2, 1, 0 -> label 1 second: in top 2. Row 1: label 2 third: out.
    assert_eq!(m.top_k_accuracy(), Some(0.5));
    assert_eq!(m.top1(), 0.0);
}

#[test]
fn mean_loss_is_weighted_by_batch_size() {
    let mut m = ClassificationMetrics::new(3).unwrap();
    assert_eq!(m.mean_loss(), None);
    m.add_loss(0.5, 6);
    m.add_loss(1.0, 4);
    // (0.5 * 6 + 1.0 * 4) / 10
    assert!((m.mean_loss().unwrap() - 0.7).abs() < 1e-12);
}

#[test]
fn merge_and_reset() {
    let mut a = ClassificationMetrics::new(3).unwrap();
    a.update(&logits_for(&PREDICTIONS[..6], 3), &LABELS[..6])
        .unwrap();
    let mut b = ClassificationMetrics::new(3).unwrap();
    b.update(&logits_for(&PREDICTIONS[6..], 3), &LABELS[6..])
        .unwrap();
    a.merge(&b).unwrap();
    assert_eq!(a, hand_metrics());
    a.reset();
    assert_eq!(a, ClassificationMetrics::new(3).unwrap());
    let other = ClassificationMetrics::new(4).unwrap();
    assert!(matches!(
        a.merge(&other),
        Err(EvalError::ClassCountMismatch {
            expected: 3,
            got: 4,
            ..
        })
    ));
}

#[test]
fn empty_accumulator_reports_zero() {
    let m = ClassificationMetrics::new(5).unwrap();
    assert_eq!(m.top1(), 0.0);
    assert_eq!(m.top_k_accuracy(), Some(0.0));
    assert_eq!(m.mean_per_class_accuracy(), None);
    assert!(m.per_class().iter().all(|c| c.accuracy.is_none()));
}
