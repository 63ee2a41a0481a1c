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

#[cfg(unix)]
#[test]
fn atomic_writes_refuse_to_replace_links_and_special_files() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.txt");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.path().join("link.txt");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let sock = dir.path().join("report.md");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    for path in [&link, &sock] {
        let e = simclr_data::write_atomic(path, b"new").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("refusing to replace") && text.contains(&path.display().to_string()),
            "{text}"
        );
    }
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"old");
    // A regular file is replaced, a missing one created.
    simclr_data::write_atomic(&target, b"new").unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"new");
    let fresh = dir.path().join("fresh.txt");
    simclr_data::write_atomic(&fresh, b"x").unwrap();
    assert_eq!(std::fs::read(&fresh).unwrap(), b"x");
}

/// An ImageFolder whose `val/` classes are not those of `train/` (a renamed folder) is refused
/// naming both folders and the names that differ: the labels would be shifted.
#[test]
fn image_folder_val_classes_must_be_the_train_classes() {
    let dir = tempfile::tempdir().unwrap();
    let wnids = write_image_folder(&dir.path().join("train"), 3, 2);
    write_image_folder(&dir.path().join("val"), 3, 2);
    let name = DatasetName::ImageFolder;
    let val = load_dataset(&name, Split::Test, &opts(dir.path())).unwrap();
    assert_eq!(val.num_classes(), 3);
    let mut sorted = wnids.clone();
    sorted.sort();
    std::fs::rename(
        dir.path().join("val").join(&sorted[1]),
        dir.path().join("val").join("renamed"),
    )
    .unwrap();
    let e = load_dataset(&name, Split::Test, &opts(dir.path()))
        .err()
        .expect("refused");
    assert!(matches!(e, DataError::ClassMismatch { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("val")
            && text.contains("train")
            && text.contains("\"renamed\"")
            && text.contains(&format!("{:?}", sorted[1])),
        "{text}"
    );
    // The training split itself is still readable.
    load_dataset(&name, Split::Train, &opts(dir.path())).unwrap();
}

/// A 4×4 grey PNG whose pixels are all `v`.
fn grey_png(path: &std::path::Path, v: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_pixel(4, 4, image::Luma([v]))
        .save(path)
        .unwrap();
}

#[test]
fn a_flat_validation_folder_takes_its_labels_from_the_kaggle_csv_or_a_list() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Training split under custom folder names; classes n01 < n02 < n03.
    for (c, wnid) in ["n02", "n01", "n03"].iter().enumerate() {
        grey_png(&root.join(format!("training/{wnid}/{wnid}_0.png")), c as u8);
    }
    let val = root.join("validation");
    for i in 1..=4 {
        grey_png(
            &val.join(format!("ILSVRC2012_val_0000000{i}.png")),
            10 * i as u8,
        );
    }
    let csv = "ImageId,PredictionString\n\
        ILSVRC2012_val_00000003,n01 1 2 3 4 n01 5 6 7 8\n\
        ILSVRC2012_val_00000001,n03 0 0 9 9\n\
        ILSVRC2012_val_00000004,n02 1 1 2 2\n\
        ILSVRC2012_val_00000002,n01 3 3 4 4\n";
    std::fs::write(root.join("LOC_val_solution.csv"), csv).unwrap();
    let o = DataOptions {
        train_split: Some("training".into()),
        eval_split: Some("validation".into()),
        ..opts(root)
    };
    let train = load_dataset(&DatasetName::ImageFolder, Split::Train, &o).unwrap();
    assert_eq!(train.class_names(), ["n01", "n02", "n03"]);
    let test = load_dataset(&DatasetName::ImageFolder, Split::Test, &o).unwrap();
    assert_eq!(test.class_names(), ["n01", "n02", "n03"]);
    // Sorted by file name: images 1, 2, 3, 4 are n03, n01, n01, n02.
    assert_eq!(test.labels(), [2, 0, 0, 1]);
    assert_eq!(test.image(1).unwrap().data[0], 20);

    // The plain list, in the validation folder, works the same.
    std::fs::remove_file(root.join("LOC_val_solution.csv")).unwrap();
    let list = "ILSVRC2012_val_00000001.png n03\nILSVRC2012_val_00000002.png n01\n\
        ILSVRC2012_val_00000003.png n01\nILSVRC2012_val_00000004.png n02\n";
    std::fs::write(val.join("val_labels.txt"), list).unwrap();
    let test = load_dataset(&DatasetName::ImageFolder, Split::Test, &o).unwrap();
    assert_eq!(test.labels(), [2, 0, 0, 1]);

    // Bad lists: an error naming the list (and the line or image).
    let lists = val.join("val_labels.txt");
    for (text, says) in [
        (
            "ILSVRC2012_val_00000001.png n03\n",
            "no label for the image ILSVRC2012_val_00000002.png",
        ),
        (
            &list.replace("n02", "n09")[..],
            "labelled n09, which is not a class folder",
        ),
        ("ILSVRC2012_val_00000001.png\n", "line 1"),
        (
            &format!("{list}ILSVRC2012_val_00000001.png n01\n")[..],
            "a second label",
        ),
    ] {
        std::fs::write(&lists, text).unwrap();
        let e = load_dataset(&DatasetName::ImageFolder, Split::Test, &o)
            .err()
            .expect("refused");
        let msg = e.to_string();
        assert!(msg.contains("val_labels.txt"), "{msg}");
        assert!(msg.contains(says), "{says}: {msg}");
    }
    std::fs::remove_file(&lists).unwrap();
    let e = load_dataset(&DatasetName::ImageFolder, Split::Test, &o)
        .err()
        .expect("no list");
    assert!(e.to_string().contains("LOC_val_solution.csv"), "{e}");
}

#[test]
fn split_names_are_refused_where_the_files_are_fixed() {
    let o = DataOptions {
        eval_split: Some("validation".into()),
        ..Default::default()
    };
    let e = load_dataset(&DatasetName::FashionMnistSubset, Split::Test, &o)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("eval_split") && e.contains("validation"), "{e}");
    // The Hub reader's cache size is refused the same way: it would change nothing.
    let mut o = DataOptions::default();
    o.hub.max_cache_bytes = Some(64 << 20);
    let e = load_dataset(&DatasetName::FashionMnistSubset, Split::Train, &o)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("hf_cache_mib") && e.contains("64"), "{e}");
}
