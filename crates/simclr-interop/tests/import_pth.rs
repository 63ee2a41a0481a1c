//! Import of the converter's `.pth` files: parity with the independent reference outputs in
//! tests/fixtures (see its README), and the errors for bad files.

mod common;

use candle_core::Device;
use common::{fixture, rel_err};
use simclr_interop::{import_pth, InteropError, SourceName};
use simclr_models::{ForwardOptions, StemKind};

const OUTPUTS: [(&str, &str); 5] = [
    ("final_avg_pool", "final_avg_pool"),
    ("proj_head_hidden_1", "proj_head_1"),
    ("proj_head_hidden_2", "proj_head_2"),
    ("proj_head_output", "proj_head_output"),
    ("logits_sup", "logits_sup"),
];

fn check_fixture(name: &str, stem: StemKind, base_width: usize, sk: bool) {
    let dev = Device::Cpu;
    let imported = import_pth(fixture(&format!("{name}.pth")), &dev).expect("import");
    let c = &imported.config;
    assert_eq!(c.stem_kind(), stem, "{name}");
    assert_eq!(c.base_width, base_width, "{name}");
    assert_eq!(c.sk_enabled(), sk, "{name}");
    assert_eq!(c.num_classes, Some(10), "{name}");
    assert_eq!(c.proj_out_dim, 16, "{name}");
    assert_eq!(c.num_proj_layers, 3, "{name}");
    let io =
        candle_core::safetensors::load(fixture(&format!("{name}_io.safetensors")), &dev).unwrap();
    let x = &io["input"];
    let (endpoints, out) = imported
        .model
        .forward_endpoints(x, ForwardOptions::mode(false))
        .unwrap();
    // Intermediate endpoints first: they say where a mismatch starts.
    let mut taps = vec![
        ("initial_conv", endpoints.initial_conv.clone()),
        ("initial_max_pool", endpoints.initial_max_pool.clone()),
    ];
    for (i, t) in endpoints.block_groups.iter().enumerate() {
        taps.push((
            [
                "block_group1",
                "block_group2",
                "block_group3",
                "block_group4",
            ][i],
            t.clone(),
        ));
    }
    for (key, t) in &taps {
        let e = rel_err(t, &io[*key]);
        assert!(e < 1e-4, "{name} {key}: rel err {e:e}");
    }
    for (key, ours) in OUTPUTS {
        let t = out.get(ours).unwrap_or_else(|| panic!("output {ours}"));
        let e = rel_err(t, &io[key]);
        eprintln!("{name} {key}: rel err {e:.2e}");
        assert!(e < 1e-4, "{name} {key}: rel err {e:e}");
    }
}

#[test]
fn r18_cifar_stem_matches_reference_outputs() {
    check_fixture("r18_1x_sk0", StemKind::Cifar, 4, false);
}

#[test]
fn r50_sk0_matches_reference_outputs() {
    check_fixture("r50_1x_sk0", StemKind::Standard, 4, false);
}

#[test]
fn r50_sk1_matches_reference_outputs() {
    check_fixture("r50_1x_sk1", StemKind::Deep, 4, true);
}

#[test]
fn file_names_parse() {
    let n = SourceName::parse("r152_3x_sk1_ema.pth").unwrap();
    assert_eq!(
        (n.depth, n.width_multiplier, n.sk, n.ema),
        (152, 3, true, true)
    );
    let n = SourceName::parse("/some/dir/r50_1x_sk0.pth").unwrap();
    assert_eq!(
        (n.depth, n.width_multiplier, n.sk, n.ema),
        (50, 1, false, false)
    );
    assert_eq!(n.to_name(), "r50_1x_sk0");
    for bad in [
        "resnet50.pth",
        "r50_1x_sk2.pth",
        "r51_1x_sk0.pth",
        "r50_0x_sk0.pth",
        "r50_x_sk0.pth",
        "r50_1x.pth",
        "r50_1x_sk0_extra.pth",
        "rr50_1x_sk0.pth",
        "r50_1x_sk0_ema_ema.pth",
    ] {
        match SourceName::parse(bad) {
            Err(InteropError::FileName { name, .. }) => {
                assert!(bad.ends_with(&name), "{bad}: {name}")
            }
            other => panic!(
                "{bad}: expected a FileName error, got {:?}",
                other.map(|n| n.to_name())
            ),
        }
    }
}

fn copy_fixture_as(src: &str, dst_name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join(dst_name);
    std::fs::copy(fixture(src), &dst).unwrap();
    (dir, dst)
}

#[test]
fn wrong_file_name_pattern_is_an_error() {
    let (_d, p) = copy_fixture_as("r50_1x_sk0.pth", "my_model.pth");
    let err = import_pth(&p, &Device::Cpu).err().expect("must fail");
    assert!(matches!(err, InteropError::FileName { .. }), "{err}");
}

#[test]
fn name_contradicting_shapes_is_an_error() {
    let cases = [
        ("r50_1x_sk0.pth", "r50_1x_sk1.pth", "selective kernels"),
        ("r50_1x_sk1.pth", "r50_1x_sk0.pth", "selective kernels"),
        ("r50_1x_sk0.pth", "r101_1x_sk0.pth", "depth"),
        ("r18_1x_sk0.pth", "r34_1x_sk0.pth", "depth"),
        ("r50_1x_sk0.pth", "r50_3x_sk0.pth", "width"),
    ];
    for (src, name, what_expected) in cases {
        let (_d, p) = copy_fixture_as(src, name);
        match import_pth(&p, &Device::Cpu) {
            Err(InteropError::Contradiction { what, .. }) => {
                assert_eq!(what, what_expected, "{src} as {name}")
            }
            Err(other) => panic!("{src} as {name}: expected a contradiction, got {other}"),
            Ok(_) => panic!("{src} as {name}: expected a contradiction"),
        }
    }
}

#[test]
fn width_multiplier_divides_the_stem_width() {
    // The R18 fixture has a stem of 4 channels: as "2x" it is base width 2.
    let (_d, p) = copy_fixture_as("r18_1x_sk0.pth", "r18_2x_sk0.pth");
    let m = import_pth(&p, &Device::Cpu).unwrap();
    assert_eq!((m.config.width_multiplier, m.config.base_width), (2, 2));
}

#[test]
fn truncated_pth_is_an_error() {
    let bytes = std::fs::read(fixture("r50_1x_sk0.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for keep in [0usize, 100, bytes.len() / 2, bytes.len() - 10] {
        let p = dir.path().join("r50_1x_sk0.pth");
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let err = import_pth(&p, &Device::Cpu).err().expect("must fail");
        assert!(
            matches!(err, InteropError::Corrupt { .. }),
            "keep {keep}: {err}"
        );
        assert!(err.to_string().contains("r50_1x_sk0.pth"), "{err}");
    }
}

#[test]
fn missing_file_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = import_pth(dir.path().join("r50_1x_sk0.pth"), &Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(err, InteropError::Io { .. }), "{err}");
}

#[test]
fn imported_model_round_trips_through_a_checkpoint() {
    let dev = Device::Cpu;
    let imported = import_pth(fixture("r50_1x_sk1.pth"), &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r50_1x_sk1.safetensors");
    simclr_models::checkpoint::save(&p, &imported.varmap, &imported.checkpoint_meta()).unwrap();
    let ck = simclr_models::checkpoint::load(&p, &dev).unwrap();
    assert_eq!(ck.meta.stage, "import");
    assert_eq!(ck.meta.extra["source_file"], "r50_1x_sk1.pth");
    let io = candle_core::safetensors::load(fixture("r50_1x_sk1_io.safetensors"), &dev).unwrap();
    let out = ck.model.forward(&io["input"], false).unwrap();
    for (key, ours) in OUTPUTS {
        let e = rel_err(out.get(ours).unwrap(), &io[key]);
        assert!(e < 1e-4, "{key}: {e:e}");
    }
}

#[test]
fn strides_or_shapes_that_overflow_are_errors_not_panics() {
    // Numbers read from a corrupt file: with overflow checks on, plain arithmetic would panic.
    let storage =
        candle_core::Tensor::zeros(16, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let huge = usize::MAX / 2 + 1;
    let e = simclr_interop::pth::strided_view(&storage, 0, &[huge, 3], &[3, 1]).unwrap_err();
    assert!(e.to_string().contains("overflows"), "{e}");
    let e = simclr_interop::pth::strided_view(&storage, 0, &[2, 3], &[huge, 1]).unwrap_err();
    assert!(e.to_string().contains("storage of 16"), "{e}");
    let e = simclr_interop::pth::strided_view(&storage, usize::MAX, &[2, 2], &[2, 1]).unwrap_err();
    assert!(e.to_string().contains("storage of 16"), "{e}");
}

/// The fixture rewritten with its `byteorder` record set to `order` (every other entry kept).
fn with_byteorder(order: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    use std::io::{Read, Write};
    let src = std::fs::File::open(fixture("r18_1x_sk0.pth")).unwrap();
    let mut archive = zip::ZipArchive::new(src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r18_1x_sk0.pth");
    let mut w = zip::ZipWriter::new(std::fs::File::create(&out).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).unwrap();
        let name = f.name().unwrap().into_owned();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        if name.ends_with("/byteorder") {
            bytes = order.as_bytes().to_vec();
        }
        w.start_file(name, opts).unwrap();
        w.write_all(&bytes).unwrap();
    }
    w.finish().unwrap();
    (dir, out)
}

#[test]
fn a_big_endian_pth_is_refused_naming_the_record() {
    let (_d, little) = with_byteorder("little");
    import_pth(&little, &Device::Cpu).expect("the rewritten archive itself is readable");
    let (_d, big) = with_byteorder("big");
    let err = import_pth(&big, &Device::Cpu).err().expect("must fail");
    let text = err.to_string();
    assert!(matches!(err, InteropError::Corrupt { .. }), "{text}");
    assert!(
        text.contains("r18_1x_sk0.pth") && text.contains("byteorder") && text.contains("\"big\""),
        "{text}"
    );
}
