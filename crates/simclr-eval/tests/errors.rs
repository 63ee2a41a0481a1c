//! Bad input gives a typed error naming the value, and leaves the accumulator unchanged.

use candle_core::{DType, Device, Tensor};
use simclr_eval::{knn_evaluate, ClassificationMetrics, EvalError, KnnBank, KnnConfig, KnnVote};

fn logits(n: usize, c: usize) -> Tensor {
    Tensor::zeros((n, c), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn label_out_of_range_names_the_value() {
    let mut m = ClassificationMetrics::new(3).unwrap();
    let err = m.update(&logits(4, 3), &[0usize, 1, 7, 2]).unwrap_err();
    assert!(
        matches!(
            err,
            EvalError::LabelOutOfRange {
                index: 2,
                label: 7,
                num_classes: 3
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains('7') && text.contains("3 classes"), "{text}");
    // Nothing was counted.
    assert_eq!(m.total(), 0);

    let labels = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
    assert!(matches!(
        m.update(&logits(2, 3), &labels),
        Err(EvalError::LabelOutOfRange { label: 3, .. })
    ));
}

#[test]
fn negative_label_is_refused() {
    let mut m = ClassificationMetrics::new(3).unwrap();
    let labels = Tensor::new(&[0i64, -1], &Device::Cpu).unwrap();
    assert!(matches!(
        m.update(&logits(2, 3), &labels),
        Err(EvalError::NegativeLabel {
            index: 1,
            label: -1
        })
    ));
}

#[test]
fn mismatched_lengths_are_refused() {
    let mut m = ClassificationMetrics::new(3).unwrap();
    assert!(matches!(
        m.update(&logits(4, 3), &[0usize, 1, 2]),
        Err(EvalError::LengthMismatch {
            expected: 4,
            got: 3,
            ..
        })
    ));
    assert!(matches!(
        m.update(&logits(3, 4), &[0usize, 1, 2]),
        Err(EvalError::ClassCountMismatch {
            expected: 3,
            got: 4,
            ..
        })
    ));
    assert!(matches!(
        m.update_scores(&[0.0f32; 8], &[0usize, 1, 2]),
        Err(EvalError::LengthMismatch {
            expected: 9,
            got: 8,
            ..
        })
    ));
    assert!(matches!(
        m.update_predictions(&[0usize, 1], &[0usize]),
        Err(EvalError::LengthMismatch { .. })
    ));
    assert!(matches!(
        m.report_with_names(&["a", "b"]),
        Err(EvalError::LengthMismatch {
            expected: 3,
            got: 2,
            ..
        })
    ));
    assert_eq!(m.total(), 0);
}

#[test]
fn bad_shapes_and_dtypes_are_refused() {
    let mut m = ClassificationMetrics::new(3).unwrap();
    let rank1 = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        m.update(&rank1, &[0usize]),
        Err(EvalError::NotMatrix { .. })
    ));
    let ints = Tensor::zeros((1, 3), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        m.update(&ints, &[0usize]),
        Err(EvalError::LogitsDtype(DType::U32))
    ));
    let float_labels = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        m.update(&logits(1, 3), &float_labels),
        Err(EvalError::LabelsDtype(DType::F32))
    ));
    let matrix_labels = Tensor::zeros((1, 1), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        m.update(&logits(1, 3), &matrix_labels),
        Err(EvalError::LabelsShape(_))
    ));
}

#[test]
fn nan_logits_are_refused_naming_the_row() {
    let mut m = ClassificationMetrics::new(2).unwrap();
    let logits = Tensor::new(&[[0.0f32, 1.0], [f32::NAN, 1.0]], &Device::Cpu).unwrap();
    assert!(matches!(
        m.update(&logits, &[0usize, 1]),
        Err(EvalError::NotANumber { row: 1, .. })
    ));
    assert_eq!(m.total(), 0);
}

#[test]
fn bad_construction_is_refused() {
    assert!(matches!(
        ClassificationMetrics::new(0),
        Err(EvalError::NoClasses)
    ));
    assert!(matches!(
        ClassificationMetrics::with_top_k(3, 4),
        Err(EvalError::InvalidTopK { k: 4, .. })
    ));
    assert!(matches!(
        ClassificationMetrics::with_top_k(3, 0),
        Err(EvalError::InvalidTopK { k: 0, .. })
    ));
}

#[test]
fn knn_input_errors() {
    let bank = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
    let config = KnnConfig::default();
    assert!(matches!(
        KnnBank::new(&bank, &[0usize, 5], 3),
        Err(EvalError::LabelOutOfRange { label: 5, .. })
    ));
    assert!(matches!(
        KnnBank::new(&bank, &[0usize], 3),
        Err(EvalError::LengthMismatch {
            expected: 2,
            got: 1,
            ..
        })
    ));
    let empty = Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        KnnBank::new(&empty, &[] as &[usize], 3),
        Err(EvalError::EmptyBank)
    ));
    let kb = KnnBank::new(&bank, &[0usize, 1], 3).unwrap();
    let wrong_dim = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        kb.predict(&wrong_dim, &config, KnnVote::Weighted),
        Err(EvalError::FeatureDimMismatch {
            expected: 2,
            got: 3,
            ..
        })
    ));
    let q = Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu).unwrap();
    assert!(matches!(
        kb.evaluate(&q, &[9usize], &config, KnnVote::Weighted),
        Err(EvalError::LabelOutOfRange { label: 9, .. })
    ));
    assert!(matches!(
        kb.evaluate(&q, &[0usize, 1], &config, KnnVote::Weighted),
        Err(EvalError::LengthMismatch { .. })
    ));
    for bad in [
        KnnConfig { k: 0, ..config },
        KnnConfig {
            chunk_size: 0,
            ..config
        },
        KnnConfig {
            temperature: 0.0,
            ..config
        },
        KnnConfig {
            temperature: f64::NAN,
            ..config
        },
    ] {
        assert!(matches!(
            knn_evaluate(
                &bank,
                &[0usize, 1],
                &q,
                &[0usize],
                3,
                &bad,
                KnnVote::Weighted
            ),
            Err(EvalError::Config { .. })
        ));
    }
    let nan_q = Tensor::new(&[[f32::NAN, 0.0]], &Device::Cpu).unwrap();
    let mut m = ClassificationMetrics::new(3).unwrap();
    assert!(matches!(
        kb.evaluate_into(&nan_q, &[0usize], &config, KnnVote::Weighted, &mut m),
        Err(EvalError::NotANumber { row: 0, .. })
    ));
    assert_eq!(m.total(), 0);
    let mut wrong = ClassificationMetrics::new(4).unwrap();
    assert!(matches!(
        kb.evaluate_into(&q, &[0usize], &config, KnnVote::Weighted, &mut wrong),
        Err(EvalError::ClassCountMismatch { .. })
    ));
}
