//! Where datasets are looked for: an explicit `--data-dir` is the only place, and is refused
//! where a dataset reads no folder.

mod common;

use common::*;
use simclr_data::idx::encode_idx;
use simclr_data::{load_dataset, DataError, DataOptions, DatasetName, Split};

fn opts(dir: &std::path::Path) -> DataOptions {
    DataOptions {
        data_dir: Some(dir.to_path_buf()),
        ..Default::default()
    }
}

#[test]
fn an_explicit_data_dir_is_the_only_place_looked_in() {
    let dir = tempfile::tempdir().unwrap();
    // Empty: an error naming it, whatever other copies the machine has (CI installs Debian's).
    let e = load_dataset(&DatasetName::FashionMnist, Split::Train, &opts(dir.path()))
        .err()
        .expect("nothing to read");
    assert!(matches!(e, DataError::NotFound { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    assert!(!text.contains("/usr/share/datasets"), "{text}");

    // With the four IDX files it reads them.
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|v| v as u8).collect();
    for stem in ["train", "t10k"] {
        write(
            &dir.path().join(format!("{stem}-images-idx3-ubyte")),
            &encode_idx(&[3, 4, 5], &pixels),
        );
        write(
            &dir.path().join(format!("{stem}-labels-idx1-ubyte")),
            &encode_idx(&[3], &[2, 0, 9]),
        );
    }
    let ds = load_dataset(&DatasetName::FashionMnist, Split::Train, &opts(dir.path())).unwrap();
    assert_eq!((ds.len(), ds.label(2)), (3, 9));
    let img = ds.image(1).unwrap();
    assert_eq!((img.height, img.width), (4, 5));
}

#[test]
fn a_data_dir_for_a_dataset_that_reads_no_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["fashion-mnist-subset", "hf:owner/name"] {
        let name: DatasetName = name.parse().unwrap();
        let e = load_dataset(&name, Split::Train, &opts(dir.path()))
            .err()
            .expect("refused");
        let text = e.to_string();
        assert!(
            text.contains("data_dir") && text.contains(&name.to_string()),
            "{text}"
        );
    }
}
