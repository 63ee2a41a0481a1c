//! The TensorBoard event writer against TensorBoard's own: a file written by its record writer
//! and protobuf classes (`fixtures/make_tensorboard_events.py`) is read back here, and the same
//! events written here give the same bytes.

use std::path::PathBuf;

use simclr_train::tensorboard::{crc32c, read_scalars, EventWriter, ScalarEvent};

fn fixture() -> PathBuf {
    simclr_fs::manifest_dir(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tensorboard_events.bin")
}

fn fixture_events() -> Vec<ScalarEvent> {
    let e = |wall_time: f64, step: i64, values: &[(&str, f32)]| ScalarEvent {
        step,
        wall_time,
        values: values.iter().map(|(t, v)| (t.to_string(), *v)).collect(),
    };
    vec![
        e(1764730001.5, 0, &[("loss", 6.25), ("lr", 0.0)]),
        e(
            1764730002.75,
            7,
            &[
                ("loss", 5.5),
                ("contrast_acc", 0.3125),
                ("weight_decay", -1.5),
            ],
        ),
        e(1764730003.0, 300, &[("knn_top1", 0.7645)]),
    ]
}

#[test]
fn crc32c_has_the_standard_check_value() {
    // The CRC-32C check value (RFC 3720, appendix B.4: "123456789").
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
}

#[test]
fn tensorboards_own_file_is_read_back() {
    assert_eq!(read_scalars(&fixture()).unwrap(), fixture_events());
}

#[test]
fn the_same_events_written_here_are_tensorboards_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path(), 1764730000.25).unwrap();
    for e in fixture_events() {
        w.scalars(&e).unwrap();
    }
    w.flush().unwrap();
    let ours = std::fs::read(w.path()).unwrap();
    assert!(w
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents.1764730000."));
    assert_eq!(ours, std::fs::read(fixture()).unwrap());

    // A second writer in the same folder replaces the first file.
    let w2 = EventWriter::create(dir.path(), 1764730100.0).unwrap();
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 1, "{:?}", w2.path());
}

#[test]
fn a_damaged_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture()).unwrap();
    let path = dir.path().join("events.out.tfevents.bad");
    for (k, cut) in [(0, bytes.len() - 3), (1, bytes.len() / 2), (2, 5)] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = read_scalars(&path).unwrap_err().to_string();
        assert!(err.contains("events.out.tfevents.bad"), "{k}: {err}");
    }
    let mut flipped = bytes.clone();
    let last = flipped.len() - 10;
    flipped[last] ^= 0x40;
    std::fs::write(&path, &flipped).unwrap();
    let err = read_scalars(&path).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
}
