//! Learning-rate scaling, step arithmetic and the warmup-then-cosine schedule (the official
//! tf2/model.py, `WarmUpAndCosineDecay`, and the README's fine-tuning commands).

use simclr_train::schedule::{
    scaled_lr, train_steps, warmup_steps, LearningRateScaling, LrScheduleConfig, WarmupCosine,
};

const IMAGENET: u64 = 1_281_167;
const IMAGENET_10PCT: u64 = 128_116;
const IMAGENET_1PCT: u64 = 12_811;

#[test]
fn released_checkpoint_step_counts() {
    // pretrained: 800 epochs at 4096.
    assert_eq!(train_steps(IMAGENET, 800, 4096, None).unwrap(), 250_228);
    // fine-tuned on 100% / 10%: 30 epochs at 1024.
    assert_eq!(train_steps(IMAGENET, 30, 1024, None).unwrap(), 37_535);
    assert_eq!(train_steps(IMAGENET_10PCT, 30, 1024, None).unwrap(), 3_754);
    // fine-tuned on 1%: 60 epochs at 1024.
    assert_eq!(train_steps(IMAGENET_1PCT, 60, 1024, None).unwrap(), 751);
    // supervised baselines: 90 epochs at 4096.
    assert_eq!(train_steps(IMAGENET, 90, 4096, None).unwrap(), 28_151);
}

#[test]
fn explicit_train_steps_override() {
    assert_eq!(train_steps(IMAGENET, 800, 4096, Some(1000)).unwrap(), 1000);
    // The official `train_steps or …`: 0 means "derive it".
    assert_eq!(train_steps(IMAGENET, 800, 4096, Some(0)).unwrap(), 250_228);
    assert!(train_steps(IMAGENET, 1, 0, None).is_err());
    // In a configuration "derive it" is `None`: an explicit 0 is refused rather than ignored.
    let zero = LrScheduleConfig {
        train_steps: Some(0),
        ..LrScheduleConfig::default()
    };
    let e = zero.build(IMAGENET, 4096).unwrap_err().to_string();
    assert!(e.contains("train_steps must be at least 1"), "{e}");
}

#[test]
fn warmup_step_arithmetic() {
    // 10 epochs of ImageNet at 4096: 12,811,670 // 4096 = 3127.
    assert_eq!(warmup_steps(10.0, IMAGENET, 4096).unwrap(), 3127);
    // v2's 5% of 800 epochs: ≈ 12,511 steps.
    assert_eq!(warmup_steps(40.0, IMAGENET, 4096).unwrap(), 12_511);
    // Fractional epochs floor first: 0.5·50000 // 512 = 48 (48.83 is not rounded up).
    assert_eq!(warmup_steps(0.5, 50_000, 512).unwrap(), 48);
    assert_eq!(warmup_steps(0.0, IMAGENET, 4096).unwrap(), 0);
    assert!(warmup_steps(-1.0, IMAGENET, 4096).is_err());
}

#[test]
fn lr_scaling_equivalences() {
    let linear = scaled_lr(0.3, 4096, LearningRateScaling::Linear);
    let sqrt = scaled_lr(0.075, 4096, LearningRateScaling::Sqrt);
    assert!((linear - 4.8).abs() < 1e-12, "{linear}");
    assert!((sqrt - 4.8).abs() < 1e-12, "{sqrt}");
    // The 1% fine-tuning command: 0.005·√1024 = 0.16.
    assert!((scaled_lr(0.005, 1024, LearningRateScaling::Sqrt) - 0.16).abs() < 1e-12);
}

#[test]
fn scaling_names_for_flags_and_files() {
    assert_eq!(
        "sqrt".parse::<LearningRateScaling>().unwrap(),
        LearningRateScaling::Sqrt
    );
    assert_eq!(
        "linear".parse::<LearningRateScaling>().unwrap(),
        LearningRateScaling::Linear
    );
    assert_eq!(
        serde_json::to_string(&LearningRateScaling::Sqrt).unwrap(),
        "\"sqrt\""
    );
    assert_eq!(
        serde_json::from_str::<LearningRateScaling>("\"linear\"").unwrap(),
        LearningRateScaling::Linear
    );
    assert!("cubic".parse::<LearningRateScaling>().is_err());
    assert_eq!(LearningRateScaling::default(), LearningRateScaling::Linear);
}

#[test]
fn warmup_then_cosine_values() {
    let s = WarmupCosine::new(4.8, 100, 1100);
    assert_eq!(s.lr(0), 0.0);
    assert!((s.lr(50) - 2.4).abs() < 1e-12);
    assert!((s.lr(99) - 4.8 * 0.99).abs() < 1e-12);
    // End of warmup: the peak.
    assert!((s.lr(100) - 4.8).abs() < 1e-12);
    // Middle of the cosine (500 of 1000 decay steps): half the peak.
    assert!((s.lr(600) - 2.4).abs() < 1e-12);
    // A quarter of the way: (1 + cos(π/4))/2 of the peak.
    let quarter = 4.8 * 0.5 * (1.0 + std::f64::consts::FRAC_PI_4.cos());
    assert!((s.lr(350) - quarter).abs() < 1e-12);
    // End and beyond: 0, no restart.
    assert!(s.lr(1100).abs() < 1e-12);
    assert!(s.lr(5000).abs() < 1e-12);
    // Monotone decay after warmup.
    let lrs: Vec<f64> = (100..=1100).map(|t| s.lr(t)).collect();
    assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
}

#[test]
fn no_warmup_starts_at_the_peak() {
    let s = WarmupCosine::new(0.16, 0, 751);
    assert_eq!(s.lr(0), 0.16);
    assert!((s.lr(751) - 0.0).abs() < 1e-15);
    // Degenerate: everything is warmup.
    let w = WarmupCosine::new(1.0, 10, 10);
    assert!((w.lr(5) - 0.5).abs() < 1e-12);
    assert_eq!(w.lr(10), 0.0);
}

#[test]
fn schedule_from_the_official_flags() {
    // The README's 1% fine-tuning command.
    let cfg = LrScheduleConfig {
        learning_rate: 0.005,
        learning_rate_scaling: LearningRateScaling::Sqrt,
        warmup_epochs: 0.0,
        train_epochs: 60,
        train_steps: None,
    };
    let s = cfg.build(IMAGENET_1PCT, 1024).unwrap();
    assert_eq!(s.total_steps, 751);
    assert_eq!(s.warmup_steps, 0);
    assert!((s.scaled_lr - 0.16).abs() < 1e-12);

    // The official defaults: lr 0.3 linear, 10 warmup epochs, 100 epochs.
    let d = LrScheduleConfig::default().build(50_000, 512).unwrap();
    assert!((d.scaled_lr - 0.6).abs() < 1e-12);
    assert_eq!(d.warmup_steps, 976); // 500000 // 512
    assert_eq!(d.total_steps, 9766); // 5000000 // 512 + 1
    let parsed: LrScheduleConfig =
        serde_json::from_str(r#"{"learning_rate_scaling":"sqrt","train_steps":7}"#).unwrap();
    assert_eq!(parsed.learning_rate_scaling, LearningRateScaling::Sqrt);
    assert_eq!(parsed.train_steps, Some(7));
    assert_eq!(parsed.learning_rate, 0.3);
}

#[test]
fn a_learning_rate_that_is_negative_or_not_finite_is_refused() {
    for lr in [-0.1, f64::NAN, f64::INFINITY] {
        let cfg = LrScheduleConfig {
            learning_rate: lr,
            ..Default::default()
        };
        let e = cfg.build(1000, 100).unwrap_err().to_string();
        assert!(
            e.contains("learning_rate") && e.contains(&lr.to_string()),
            "{e}"
        );
    }
}
