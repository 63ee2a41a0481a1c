//! Every reader on files the test writes, and their errors on bad input.

mod common;

use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use common::*;
use simclr_data::cifar::{read_cifar_dir, CifarKind};
use simclr_data::hub::{read_hub_dataset, HubOptions};
use simclr_data::idx::{encode_idx, read_idx, read_idx_dir, FASHION_MNIST_CLASSES};
use simclr_data::{DataError, Dataset, ImageFolder};

fn err_text<T>(r: simclr_data::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn idx_raw_and_gzip_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 7 % 256) as u8).collect();
    let images = encode_idx(&[3, 4, 5], &pixels);
    let labels = encode_idx(&[3], &[2, 0, 9]);
    write(&dir.path().join("train-images-idx3-ubyte"), &images);
    write(&dir.path().join("train-labels-idx1-ubyte"), &labels);
    write(
        &dir.path().join("t10k-images-idx3-ubyte.gz"),
        &gzip(&images),
    );
    write(
        &dir.path().join("t10k-labels-idx1-ubyte.gz"),
        &gzip(&labels),
    );
    for train in [true, false] {
        let ds = read_idx_dir(dir.path(), train, &FASHION_MNIST_CLASSES).unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.labels(), vec![2, 0, 9]);
        let img = ds.image(1).unwrap();
        assert_eq!((img.height, img.width, img.channels), (4, 5, 1));
        assert_eq!(img.data, pixels[20..40]);
        assert_eq!(ds.class_names()[9], "Ankle boot");
    }
}

#[test]
fn idx_bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x-idx3-ubyte");
    let good = encode_idx(&[2, 3, 3], &[1; 18]);

    let mut bad_magic = good.clone();
    bad_magic[0] = 7;
    write(&p, &bad_magic);
    let e = err_text(read_idx(&p));
    assert!(e.contains("magic") && e.contains("x-idx3-ubyte"), "{e}");

    let mut bad_type = good.clone();
    bad_type[2] = 0x0D;
    write(&p, &bad_type);
    assert!(err_text(read_idx(&p)).contains("0x0d"));

    write(&p, &good[..good.len() - 5]);
    let e = err_text(read_idx(&p));
    assert!(
        e.contains("truncated") && e.contains("18 data bytes"),
        "{e}"
    );

    write(&p, &good[..6]);
    assert!(err_text(read_idx(&p)).contains("truncated IDX header"));

    let gz = gzip(&good);
    write(&p, &gz[..gz.len() / 2]);
    let e = err_text(read_idx(&p));
    assert!(e.contains("gzip") && e.contains("x-idx3-ubyte"), "{e}");

    // Labels that do not match the images, or name no class.
    write(&dir.path().join("train-images-idx3-ubyte"), &good);
    write(
        &dir.path().join("train-labels-idx1-ubyte"),
        &encode_idx(&[3], &[0, 1, 2]),
    );
    assert!(
        err_text(read_idx_dir(dir.path(), true, &FASHION_MNIST_CLASSES))
            .contains("3 labels for 2 images")
    );
    write(
        &dir.path().join("train-labels-idx1-ubyte"),
        &encode_idx(&[2], &[0, 10]),
    );
    assert!(
        err_text(read_idx_dir(dir.path(), true, &FASHION_MNIST_CLASSES))
            .contains("label 10 of image 1")
    );

    // Images without pixels (a header with a zero side and no data).
    write(
        &dir.path().join("train-images-idx3-ubyte"),
        &encode_idx(&[2, 0, 28], &[]),
    );
    write(
        &dir.path().join("train-labels-idx1-ubyte"),
        &encode_idx(&[2], &[0, 1]),
    );
    let e = err_text(read_idx_dir(dir.path(), true, &FASHION_MNIST_CLASSES));
    assert!(
        e.contains("0×28 pixels") && e.contains("train-images"),
        "{e}"
    );

    let e = err_text(read_idx(&dir.path().join("missing")));
    assert!(e.contains("missing"), "{e}");
}

/// A CIFAR record: label byte(s) then R, G, B planes where pixel p of plane c is `(p + 50c + seed) % 256`.
fn cifar_record(labels: &[u8], seed: usize) -> Vec<u8> {
    let mut r = labels.to_vec();
    for c in 0..3 {
        r.extend((0..1024).map(|p| ((p + 50 * c + seed) % 256) as u8));
    }
    r
}

#[test]
fn cifar10_and_cifar100_binary() {
    let dir = tempfile::tempdir().unwrap();
    for b in 1..=5 {
        let mut f = cifar_record(&[b as u8], b);
        f.extend(cifar_record(&[9], 100 + b));
        write(&dir.path().join(format!("data_batch_{b}.bin")), &f);
    }
    write(&dir.path().join("test_batch.bin"), &cifar_record(&[3], 7));
    let train = read_cifar_dir(dir.path(), CifarKind::Cifar10, true).unwrap();
    assert_eq!(train.len(), 10);
    assert_eq!(train.labels(), vec![1, 9, 2, 9, 3, 9, 4, 9, 5, 9]);
    assert_eq!(train.class_names()[3], "cat");
    let img = train.image(0).unwrap();
    assert_eq!((img.height, img.width, img.channels), (32, 32, 3));
    // HWC pixel (row 2, col 3) = planar index 67 in each plane.
    let p = 2 * 32 + 3;
    assert_eq!(
        &img.data[p * 3..p * 3 + 3],
        &[(p + 1) as u8, (p + 51) as u8, (p + 101) as u8]
    );
    let test = read_cifar_dir(dir.path(), CifarKind::Cifar10, false).unwrap();
    assert_eq!(test.labels(), vec![3]);

    let d100 = tempfile::tempdir().unwrap();
    let mut f = cifar_record(&[4, 77], 0);
    f.extend(cifar_record(&[19, 99], 1));
    write(&d100.path().join("train.bin"), &f);
    write(
        &d100.path().join("fine_label_names.txt"),
        (0..100)
            .map(|i| format!("fine{i}\n"))
            .collect::<String>()
            .as_bytes(),
    );
    let fine = read_cifar_dir(d100.path(), CifarKind::Cifar100Fine, true).unwrap();
    assert_eq!(fine.labels(), vec![77, 99]);
    assert_eq!(fine.class_names()[77], "fine77");
    let coarse = read_cifar_dir(d100.path(), CifarKind::Cifar100Coarse, true).unwrap();
    assert_eq!(coarse.labels(), vec![4, 19]);
    assert_eq!(coarse.num_classes(), 20);
}

#[test]
fn cifar_bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let rec = cifar_record(&[1], 0);
    write(&dir.path().join("test_batch.bin"), &rec[..rec.len() - 1]);
    let e = err_text(read_cifar_dir(dir.path(), CifarKind::Cifar10, false));
    assert!(
        e.contains("test_batch.bin") && e.contains("3073-byte"),
        "{e}"
    );
    write(&dir.path().join("test_batch.bin"), &cifar_record(&[12], 0));
    let e = err_text(read_cifar_dir(dir.path(), CifarKind::Cifar10, false));
    assert!(e.contains("label 12"), "{e}");
    let e = err_text(read_cifar_dir(dir.path(), CifarKind::Cifar10, true));
    assert!(e.contains("data_batch_1.bin"), "{e}");
}

#[test]
fn image_folder_of_real_jpegs() {
    let dir = tempfile::tempdir().unwrap();
    let wnids = write_image_folder(dir.path(), 3, 4);
    let ds = ImageFolder::open(dir.path()).unwrap();
    let mut sorted = wnids.clone();
    sorted.sort();
    assert_eq!(ds.class_names(), &sorted[..]);
    assert_eq!(ds.len(), 3 * 5);
    let originals = fmnist_images(3, 4);
    for i in 0..ds.len() {
        let img = ds.image(i).unwrap();
        assert_eq!(
            (img.height, img.width, img.channels),
            (28, 28, 3),
            "{}",
            ds.path(i).display()
        );
        let name = ds.sample_name(i);
        assert!(
            name.starts_with(&format!("{}_", ds.class_names()[ds.label(i)])),
            "{name}"
        );
        if let Some(k) = name
            .strip_suffix(".JPEG")
            .and_then(|n| n.rsplit('_').next())
            .and_then(|k| k.parse::<usize>().ok())
        {
            // The JPEG decodes close to the original gray image, replicated to RGB.
            let (orig, c) = &originals[k];
            assert_eq!(*c, ds.label(i));
            let mad: f64 = orig
                .data
                .iter()
                .zip(img.data.chunks(3))
                .map(|(&o, px)| (o as f64 - px[1] as f64).abs())
                .sum::<f64>()
                / 784.0;
            assert!(mad < 8.0, "mean abs error {mad}");
            assert!(img
                .data
                .chunks(3)
                .all(|px| px[0] == px[1] && px[1] == px[2]));
        } else {
            // The RGBA PNG keeps its colour channels, alpha dropped.
            assert!(name.ends_with(".png"));
            assert!(img.data.chunks(3).any(|px| px[0] != px[1]));
        }
    }
}

#[test]
fn image_folder_bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = err_text(ImageFolder::open(dir.path()));
    assert!(e.contains("no class folders"), "{e}");
    write_image_folder(dir.path(), 2, 2);
    std::fs::create_dir(dir.path().join("n99999999")).unwrap();
    std::fs::write(dir.path().join("n99999999/readme.txt"), "not an image").unwrap();
    let e = err_text(ImageFolder::open(dir.path()));
    assert!(
        e.contains("n99999999") && e.contains("no JPEG or PNG"),
        "{e}"
    );
    std::fs::remove_dir_all(dir.path().join("n99999999")).unwrap();

    let ds = ImageFolder::open(dir.path()).unwrap();
    let victim = ds.path(1).to_path_buf();
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 3]).unwrap();
    let e = err_text(ds.image(1));
    assert!(e.contains(&victim.display().to_string()), "{e}");
    // Cut short at several points, with and without junk after the cut: each is refused
    // (the decoder alone returned a grey-padded picture for some of them).
    for keep in [bytes.len() / 2, bytes.len() * 9 / 10, bytes.len() - 2] {
        for junk in [&b""[..], &[0x13u8; 40][..], &b"trailing text"[..]] {
            let mut cut = bytes[..keep].to_vec();
            cut.extend_from_slice(junk);
            std::fs::write(&victim, &cut).unwrap();
            match ds.image(1) {
                Err(DataError::Decode { path, .. }) => assert_eq!(path, victim),
                Err(other) => panic!("keep {keep}: {other}"),
                Ok(_) => panic!("keep {keep}, {} junk bytes: a cut JPEG decoded", junk.len()),
            }
        }
    }
    // The whole file with junk after its end still decodes (trailing bytes are harmless).
    let mut padded = bytes.clone();
    padded.extend_from_slice(b"junk");
    std::fs::write(&victim, &padded).unwrap();
    ds.image(1).unwrap();
    std::fs::write(&victim, b"GIF89a garbage").unwrap();
    assert!(matches!(ds.image(1), Err(DataError::Decode { .. })));
}

/// A Hub cache laid out as the Hub client leaves it, holding one parquet file per split in the
/// `{image: {bytes, path}, label}` schema of image datasets published there.
fn write_hub_cache(
    cache: &std::path::Path,
    rows: &[(Vec<u8>, i64)],
    split: &str,
    with_names: bool,
) {
    write_hub_cache_columns(
        cache,
        rows,
        split,
        with_names,
        ("image", "label"),
        None,
        None,
    );
}

/// [`write_hub_cache`] with the image and label columns named `columns`, and optionally an
/// integer column `decoy` (all 9s) before them that a guess would take for the label.
fn write_hub_cache_columns(
    cache: &std::path::Path,
    rows: &[(Vec<u8>, i64)],
    split: &str,
    with_names: bool,
    columns: (&str, &str),
    decoy: Option<&str>,
    row_group_size: Option<usize>,
) {
    let repo = cache.join("datasets--zalando-datasets--fashion_mnist");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    write(&repo.join("refs/main"), commit.as_bytes());
    let path = repo.join(format!(
        "snapshots/{commit}/fashion_mnist/{split}-00000-of-00001.parquet"
    ));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let bytes = BinaryArray::from_iter_values(rows.iter().map(|(b, _)| b.as_slice()));
    let paths = StringArray::from_iter_values(rows.iter().map(|_| "x.png"));
    let image = StructArray::new(
        fields.clone(),
        vec![Arc::new(bytes) as ArrayRef, Arc::new(paths)],
        None,
    );
    let labels = Int64Array::from_iter_values(rows.iter().map(|(_, l)| *l));
    // pyarrow, which the `datasets` library writes with, stores the features as file metadata.
    let mut props = parquet::file::properties::WriterProperties::builder();
    if let Some(n) = row_group_size {
        props = props.set_max_row_group_row_count(Some(n));
    }
    if with_names {
        let names: Vec<String> = FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut features = serde_json::Map::new();
        features.insert(columns.0.into(), serde_json::json!({"_type": "Image"}));
        if let Some(d) = decoy {
            let decoy_names: Vec<String> = (0..10).map(|i| format!("decoy{i}")).collect();
            features.insert(
                d.into(),
                serde_json::json!({"names": decoy_names, "_type": "ClassLabel"}),
            );
        }
        features.insert(
            columns.1.into(),
            serde_json::json!({"names": names, "_type": "ClassLabel"}),
        );
        let json = serde_json::json!({"info": {"features": features}});
        props = props.set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new(
            "huggingface".into(),
            json.to_string(),
        )]));
    }
    let mut schema = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    if let Some(d) = decoy {
        schema.push(Field::new(d, DataType::Int64, true));
        arrays.push(Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|_| 9),
        )));
    }
    schema.push(Field::new(columns.0, DataType::Struct(fields), true));
    arrays.push(Arc::new(image));
    schema.push(Field::new(columns.1, DataType::Int64, true));
    arrays.push(Arc::new(labels));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(schema)), arrays).unwrap();
    let file = std::fs::File::create(&path).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props.build())).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn png_bytes(img: &simclr_data::Image) -> Vec<u8> {
    let gray =
        image::GrayImage::from_raw(img.width as u32, img.height as u32, img.data.clone()).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    gray.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn hub_parquet_from_the_local_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    let originals = fmnist_images(10, 2);
    let rows: Vec<(Vec<u8>, i64)> = originals
        .iter()
        .map(|(img, c)| (png_bytes(img), *c as i64))
        .collect();
    write_hub_cache(cache.path(), &rows, "train", true);
    let opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: true,
        revision: None,
        ..Default::default()
    };
    let ds = read_hub_dataset("zalando-datasets/fashion_mnist", "train", &opts).unwrap();
    assert_eq!(ds.len(), 20);
    assert_eq!(ds.class_names()[0], "T-shirt/top");
    for (i, (img, c)) in originals.iter().enumerate() {
        assert_eq!(ds.label(i), *c);
        assert_eq!(&ds.image(i).unwrap(), img, "PNG is lossless");
    }
    // The test split is not cached: offline mode says where it looked.
    let e = err_text(read_hub_dataset(
        "zalando-datasets/fashion_mnist",
        "test",
        &opts,
    ));
    assert!(
        e.contains("offline") && e.contains("datasets--zalando-datasets--fashion_mnist"),
        "{e}"
    );
    let e = err_text(read_hub_dataset("no-slash", "train", &opts));
    assert!(e.contains("hf:<owner>/<name>"), "{e}");
}

#[test]
fn hub_parquet_bad_input_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let (img, _) = fmnist_images(1, 1).remove(0);
    write_hub_cache(cache.path(), &[(png_bytes(&img), 3)], "train", false);
    let opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: true,
        revision: None,
        ..Default::default()
    };
    // Without ClassLabel metadata the classes are numbered up to the largest label.
    let ds = read_hub_dataset("zalando-datasets/fashion_mnist", "train", &opts).unwrap();
    assert_eq!(ds.num_classes(), 4);

    let file = walk(cache.path());
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 20]).unwrap();
    let e = err_text(read_hub_dataset(
        "zalando-datasets/fashion_mnist",
        "train",
        &opts,
    ));
    assert!(
        e.contains("parquet") && e.contains(&file.display().to_string()),
        "{e}"
    );

    // Images are decoded when asked for: the split opens, the image is the error.
    write_hub_cache(
        cache.path(),
        &[(b"not an image".to_vec(), 3)],
        "train",
        false,
    );
    let ds = read_hub_dataset("zalando-datasets/fashion_mnist", "train", &opts).unwrap();
    let e = ds.image(0).unwrap_err().to_string();
    assert!(
        e.contains("row 0") && e.contains(&file.display().to_string()),
        "{e}"
    );
}

/// A split in row groups of 5 rows, read through a cache that holds about one group: every
/// image comes back exact whatever the order, the cache stays within its budget, and the
/// loader's shuffle visits the row groups one at a time.
#[test]
fn hub_row_groups_are_read_on_demand_within_the_cache_budget() {
    let cache = tempfile::tempdir().unwrap();
    let originals = fmnist_images(4, 5); // 20 images: 4 row groups of 5
    let rows: Vec<(Vec<u8>, i64)> = originals
        .iter()
        .map(|(img, c)| (png_bytes(img), *c as i64))
        .collect();
    let group_bytes: usize = rows[..5].iter().map(|(b, _)| b.len()).sum();
    write_hub_cache_columns(
        cache.path(),
        &rows,
        "train",
        true,
        ("image", "label"),
        None,
        Some(5),
    );
    let budget = group_bytes + group_bytes / 2;
    let opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: true,
        max_cache_bytes: Some(budget),
        ..Default::default()
    };
    let ds = read_hub_dataset("zalando-datasets/fashion_mnist", "train", &opts).unwrap();
    assert_eq!(ds.len(), 20);
    let blocks: Vec<usize> = (0..20).map(|i| ds.read_block(i).unwrap()).collect();
    assert_eq!(blocks, (0..20).map(|i| i / 5).collect::<Vec<_>>());
    assert_eq!(ds.cached_bytes(), 0, "opening reads no image");
    // Backwards and jumping between groups: every image exact, the cache within budget.
    for i in (0..20).rev().chain([3, 17, 8, 12, 0]) {
        assert_eq!(ds.image(i).unwrap(), originals[i].0, "image {i}");
        assert_eq!(ds.label(i), originals[i].1);
        assert!(
            ds.cached_bytes() <= budget.max(group_bytes * 2),
            "{}",
            ds.cached_bytes()
        );
    }
    assert!(
        ds.cached_bytes() < 2 * group_bytes,
        "one group fits the budget, not two"
    );
    // The shuffle: a permutation, visiting each row group's 5 images together (window 1).
    let ds: Arc<dyn Dataset> = Arc::new(ds);
    assert_eq!(ds.read_window(), 1);
    let loader =
        simclr_data::Loader::new(ds.clone(), None, simclr_data::LoaderConfig::eval(4, 28)).unwrap();
    assert_eq!(
        loader.epoch_order(0),
        (0..20).collect::<Vec<_>>(),
        "no shuffle: in order"
    );
    let mut cfg = simclr_data::LoaderConfig::eval(4, 28);
    cfg.shuffle = true;
    let loader = simclr_data::Loader::new(ds.clone(), None, cfg).unwrap();
    let (a, b) = (loader.epoch_order(0), loader.epoch_order(1));
    assert_ne!(a, b, "each epoch its own order");
    for order in [a, b] {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        for run in order.chunks(5) {
            assert!(run.iter().all(|&i| i / 5 == run[0] / 5), "{order:?}");
        }
    }
}

fn walk(dir: &std::path::Path) -> std::path::PathBuf {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            let f = walk(&p);
            if !f.as_os_str().is_empty() {
                return f;
            }
        } else if p.extension().is_some_and(|x| x == "parquet") {
            return p;
        }
    }
    std::path::PathBuf::new()
}

#[test]
fn hub_columns_can_be_named() {
    let cache = tempfile::tempdir().unwrap();
    let originals = fmnist_images(3, 1);
    let rows: Vec<(Vec<u8>, i64)> = originals
        .iter()
        .map(|(img, c)| (png_bytes(img), *c as i64))
        .collect();
    // A decoy integer column comes first: the default guess takes it for the label.
    write_hub_cache_columns(
        cache.path(),
        &rows,
        "train",
        true,
        ("picture", "fine"),
        Some("coarse_label"),
        None,
    );
    let mut opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: true,
        ..Default::default()
    };
    let guessed = read_hub_dataset("zalando-datasets/fashion_mnist", "train", &opts).unwrap();
    assert!(
        (0..3).all(|i| guessed.label(i) == 9),
        "the guess reads the decoy"
    );
    opts.image_column = Some("picture".into());
    opts.label_column = Some("fine".into());
    let ds = read_hub_dataset("zalando-datasets/fashion_mnist", "train", &opts).unwrap();
    assert_eq!(
        ds.class_names()[0],
        "T-shirt/top",
        "the named column's class names"
    );
    for (i, (img, c)) in originals.iter().enumerate() {
        assert_eq!(ds.label(i), *c);
        assert_eq!(&ds.image(i).unwrap(), img);
    }
    opts.label_column = Some("finest".into());
    let e = err_text(read_hub_dataset(
        "zalando-datasets/fashion_mnist",
        "train",
        &opts,
    ));
    assert!(e.contains("no integer column \"finest\""), "{e}");
    opts.label_column = None;
    opts.image_column = Some("photo".into());
    let e = err_text(read_hub_dataset(
        "zalando-datasets/fashion_mnist",
        "train",
        &opts,
    ));
    assert!(e.contains("no column \"photo\""), "{e}");
}
