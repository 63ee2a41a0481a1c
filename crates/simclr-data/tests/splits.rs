//! Label-fraction splits and the official split-file format.

mod common;

use common::*;
use simclr_data::split::{
    check_all_classes_labelled, class_balanced_subset, read_split_file, validate_fraction,
    validation_split, write_split_file,
};
use simclr_data::{DataError, Dataset, ImageFolder, InMemoryDataset};

fn labels_with_sizes(sizes: &[usize]) -> Vec<usize> {
    // Interleave classes so indices do not group by class.
    let mut out = Vec::new();
    let mut left = sizes.to_vec();
    while left.iter().any(|&l| l > 0) {
        for (c, l) in left.iter_mut().enumerate() {
            if *l > 0 {
                *l -= 1;
                out.push(c);
            }
        }
    }
    out
}

#[test]
fn class_balanced_and_deterministic() {
    let sizes = [1000, 1300, 57, 3, 250];
    let labels = labels_with_sizes(&sizes);
    for fraction in [0.01, 0.1, 0.5, 1.0] {
        let a = class_balanced_subset(&labels, sizes.len(), fraction, 7).unwrap();
        let b = class_balanced_subset(&labels, sizes.len(), fraction, 7).unwrap();
        assert_eq!(a, b, "same seed, same split");
        assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
        for (c, &n) in sizes.iter().enumerate() {
            let got = a.iter().filter(|&&i| labels[i] == c).count();
            let want = ((fraction * n as f64).round() as usize).max(1);
            assert_eq!(got, want, "class {c} of {n} at fraction {fraction}");
        }
        if fraction < 1.0 {
            let other = class_balanced_subset(&labels, sizes.len(), fraction, 8).unwrap();
            assert_ne!(a, other, "another seed, another split");
        }
    }
    // A fraction too small for any class still keeps one image of each.
    let s = class_balanced_subset(&labels, sizes.len(), 0.001, 1).unwrap();
    assert_eq!(s.len(), 1 + 1 + 1 + 1 + 1);
}

#[test]
fn validation_split_is_class_balanced_disjoint_and_seeded() {
    let sizes = [40, 55, 31];
    let labels = labels_with_sizes(&sizes);
    let (rest, val) = validation_split(&labels, sizes.len(), 10, 3).unwrap();
    assert_eq!(rest.len() + val.len(), labels.len());
    let mut all: Vec<usize> = rest.iter().chain(&val).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..labels.len()).collect::<Vec<_>>(), "a partition");
    for c in 0..sizes.len() {
        assert_eq!(
            val.iter().filter(|&&i| labels[i] == c).count(),
            10,
            "class {c}"
        );
    }
    assert_eq!(
        validation_split(&labels, 3, 10, 3).unwrap().1,
        val,
        "deterministic"
    );
    assert_ne!(
        validation_split(&labels, 3, 10, 4).unwrap().1,
        val,
        "seeded"
    );
    // The labelled split drawn with the same seed is not the validation split's first images.
    let labelled = class_balanced_subset(&labels, 3, 0.3, 3).unwrap();
    assert_ne!(
        labelled.iter().filter(|i| val.contains(i)).count(),
        labelled.len()
    );
    // A class that would be left empty is refused, naming the setting.
    let err = validation_split(&labels, 3, 31, 3).unwrap_err().to_string();
    assert!(
        err.contains("validation_per_class") && err.contains("class 2"),
        "{err}"
    );
}

#[test]
fn fraction_out_of_range_is_an_error() {
    for f in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
        let e = validate_fraction(f).unwrap_err();
        assert!(matches!(e, DataError::Fraction(_)));
        assert!(e.to_string().contains(&f.to_string()), "{e}");
        assert!(class_balanced_subset(&[0, 1], 2, f, 0).is_err());
    }
    assert_eq!(validate_fraction(1.0).unwrap(), 1.0);
}

#[test]
fn split_file_round_trip_in_memory_and_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mem = colour_dataset(4, 25);
    let folder_root = dir.path().join("train");
    write_image_folder(&folder_root, 3, 6);
    let folder = ImageFolder::open(&folder_root).unwrap();
    let datasets: [&dyn Dataset; 2] = [&mem, &folder];
    for ds in datasets {
        let idx = class_balanced_subset(&ds.labels(), ds.num_classes(), 0.3, 3).unwrap();
        let path = dir.path().join("split.txt");
        write_split_file(&path, ds, &idx).unwrap();
        assert_eq!(read_split_file(&path, ds).unwrap(), idx);
        check_all_classes_labelled(ds, &idx).unwrap();
    }
    // The ImageFolder file has the official shape: `<wnid>_<id>.JPEG` per line.
    let idx = vec![0, 5];
    let path = dir.path().join("official.txt");
    write_split_file(&path, &folder, &idx).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    for line in text.lines() {
        let (wnid, rest) = line.split_once('_').unwrap();
        assert!(
            folder.class_names().contains(&wnid.to_string()) && !rest.is_empty(),
            "{line}"
        );
    }
}

#[test]
fn split_file_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("train");
    write_image_folder(&root, 2, 3);
    let ds = ImageFolder::open(&root).unwrap();
    let good = ds.sample_name(0);
    let path = dir.path().join("bad.txt");
    let cases = [
        (
            format!("{good}\n\nn00000000_1.JPEG\n"),
            "line 3",
            "class \"n00000000\" is not in the dataset",
        ),
        (
            format!("{good}\n{}_999.JPEG\n", ds.class_names()[1]),
            "line 2",
            "is not an image of the dataset",
        ),
        (
            format!("{good}\n{}\n{good}\n", ds.sample_name(1)),
            "line 3",
            "listed twice (first on line 1)",
        ),
        ("\n\n".to_string(), "line 0", "lists no image"),
    ];
    for (text, line, what) in cases {
        std::fs::write(&path, text).unwrap();
        let e = read_split_file(&path, &ds).unwrap_err().to_string();
        assert!(
            e.contains(line) && e.contains(what) && e.contains("bad.txt"),
            "{e}"
        );
    }
    let e = read_split_file(&dir.path().join("absent.txt"), &ds)
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.txt"), "{e}");
}

#[test]
fn a_class_without_labels_is_reported() {
    let ds: InMemoryDataset = colour_dataset(3, 4);
    let only_first_two: Vec<usize> = (0..ds.len()).filter(|&i| ds.label(i) < 2).collect();
    let e = check_all_classes_labelled(&ds, &only_first_two).unwrap_err();
    assert!(
        e.to_string().contains("class2") && e.to_string().contains("index 2"),
        "{e}"
    );
}
