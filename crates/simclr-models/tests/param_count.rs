//! Parameter counts of the 13 released configurations (the official tf2/resnet.py, official README),
//! computed from the layer shapes without allocating the models.

use simclr_models::{num_parameters, parameter_shapes, ModelConfig};

/// (depth, width, sk, params in millions) — the README table.
const TABLE: [(usize, usize, bool, usize); 13] = [
    (50, 1, false, 24),
    (50, 1, true, 35),
    (50, 2, false, 94),
    (50, 2, true, 140),
    (101, 1, false, 43),
    (101, 1, true, 65),
    (101, 2, false, 170),
    (101, 2, true, 257),
    (152, 1, false, 58),
    (152, 1, true, 89),
    (152, 2, false, 233),
    (152, 2, true, 354),
    (152, 3, true, 795),
];

fn millions(n: usize) -> usize {
    (n as f64 / 1e6).round() as usize
}

#[test]
fn released_models_match_the_readme_table() {
    for (depth, width, sk, expected) in TABLE {
        let config = ModelConfig::released(depth, width, sk);
        assert_eq!(config.num_classes, Some(1000));
        let count = num_parameters(&config).unwrap();
        // The README counts every encoder variable (BN moving statistics included), and
        // neither head.
        assert_eq!(
            millions(count.encoder_variables()),
            expected,
            "{}: {count:?}",
            config.name()
        );
    }
}

#[test]
fn other_counting_conventions_do_not_match_the_table() {
    // What decided the convention: trainable-only misses R152 2x SK0 (232.25M), and adding
    // the supervised head misses every 1x SK0 row.
    let c = ModelConfig::released(152, 2, false);
    assert_eq!(millions(num_parameters(&c).unwrap().resnet), 232);
    for (depth, width, sk, expected) in TABLE {
        if width == 1 && !sk {
            let n = num_parameters(&ModelConfig::released(depth, width, sk)).unwrap();
            assert_ne!(
                millions(n.encoder_variables() + n.supervised_head),
                expected
            );
        }
    }
}

#[test]
fn resnet50_encoder_has_the_textbook_count() {
    // ResNet-50 v1.5 without its classifier: 25,557,032 - 2,049,000.
    let c = ModelConfig::released(50, 1, false);
    let count = num_parameters(&c).unwrap();
    assert_eq!(count.resnet, 23_508_032);
    assert_eq!(count.supervised_head, 2048 * 1000 + 1000);
    // Head: two 2048x2048 layers with BN gamma/beta, one 2048x128 with BN gamma only.
    assert_eq!(
        count.projection_head,
        2 * (2048 * 2048 + 2 * 2048) + (2048 * 128 + 128)
    );
    assert_eq!(count.projection_head_stats, 2 * (2048 + 2048 + 128));
    // Two moving statistics per BN channel of the encoder (53 BNs).
    let shapes = parameter_shapes(&c).unwrap();
    let encoder_bns: Vec<_> = shapes
        .iter()
        .filter(|(n, _)| n.starts_with("resnet.") && n.ends_with(".moving_mean"))
        .collect();
    assert_eq!(encoder_bns.len(), 53);
    let channels: usize = encoder_bns.iter().map(|(_, s)| s[0]).sum();
    assert_eq!(count.resnet_stats, 2 * channels);
    assert_eq!(
        count.resnet,
        shapes
            .iter()
            .filter(|(n, _)| n.starts_with("resnet.") && !n.contains("moving_"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
    );
}

#[test]
fn layout_of_the_largest_model_is_listed_without_allocating_it() {
    let c = ModelConfig::released(152, 3, true);
    let shapes = parameter_shapes(&c).unwrap();
    let total: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert!(total > 795_000_000, "{total}");
    // The deep stem: 3x3 convs to 32w, 32w, 64w.
    assert_eq!(
        shapes[0],
        ("resnet.stem.conv0.weight".to_string(), vec![96, 3, 3, 3])
    );
    let get = |name: &str| {
        shapes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .unwrap()
    };
    assert_eq!(get("resnet.stem.conv2.weight"), vec![192, 96, 3, 3]);
    // SK mid dims 32, 32, 48, 96 (the official tf2/resnet.py, `SK_Conv2D`).
    for (g, mid) in [(1, 32), (2, 32), (3, 48), (4, 96)] {
        let s = get(&format!(
            "resnet.block_group{g}.block0.sk.mix_reduce.weight"
        ));
        assert_eq!(s[0], mid, "group {g}");
    }
    // Creation order: the first block's shortcut before its main path, SK conv before mixing.
    let pos = |name: &str| shapes.iter().position(|(n, _)| n == name).unwrap();
    assert!(
        pos("resnet.block_group1.block0.shortcut_conv.weight")
            < pos("resnet.block_group1.block0.conv1.weight")
    );
    assert!(
        pos("resnet.block_group1.block0.sk.conv.weight")
            < pos("resnet.block_group1.block0.sk.mix_reduce.weight")
    );
}
