//! CIFAR's python version: the pickles Python 3 writes with protocols 2, 4 and 5
//! (`tests/fixtures/make_cifar_py.py`), a Python 2-style pickle written here opcode by opcode
//! (how the files on the CIFAR site were made), and corrupt files.

use std::path::{Path, PathBuf};

use simclr_data::{load_dataset, DataOptions, Dataset, DatasetName, Split};

fn fixtures() -> PathBuf {
    simclr_fs::manifest_dir(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn opts(dir: &Path) -> DataOptions {
    DataOptions {
        data_dir: Some(dir.to_path_buf()),
        ..Default::default()
    }
}

/// The generator's planar pixel bytes of image `i`.
fn planes(i: usize) -> Vec<u8> {
    (0..3072).map(|k| ((37 * i + k) % 256) as u8).collect()
}

/// Checks `ds` against the generator's images `first..first + n` with labels `(3i + 1) % classes`,
/// planes turned into interleaved RGB.
fn check(ds: &dyn Dataset, images: &[usize], classes: usize, what: &str) {
    assert_eq!(ds.len(), images.len(), "{what}");
    for (j, &i) in images.iter().enumerate() {
        assert_eq!(ds.label(j), (3 * i + 1) % classes, "{what}: label of {j}");
        let img = ds.image(j).unwrap();
        assert_eq!((img.width, img.height, img.channels), (32, 32, 3), "{what}");
        let p = planes(i);
        for px in [0usize, 1, 517, 1023] {
            for c in 0..3 {
                assert_eq!(
                    img.data[3 * px + c],
                    p[1024 * c + px],
                    "{what}: image {j} pixel {px} channel {c}"
                );
            }
        }
    }
}

#[test]
fn python_3_pickles_of_cifar_10_read_for_protocols_2_4_and_5() {
    for protocol in [2, 4, 5] {
        let dir = fixtures().join(format!("cifar_py_p{protocol}/cifar-10-batches-py"));
        let train = load_dataset(&DatasetName::Cifar10, Split::Train, &opts(&dir)).unwrap();
        let what = format!("protocol {protocol}");
        check(train.as_ref(), &[0, 1, 2, 3, 4], 10, &what);
        assert_eq!(train.class_names()[9], "truck", "{what}");
        let test = load_dataset(&DatasetName::Cifar10, Split::Test, &opts(&dir)).unwrap();
        check(test.as_ref(), &[0, 1], 10, &what);
    }
}

#[test]
fn cifar_100_reads_its_fine_labels_and_names() {
    let dir = fixtures().join("cifar_py_p4/cifar-100-python");
    let train = load_dataset(&DatasetName::Cifar100, Split::Train, &opts(&dir)).unwrap();
    check(train.as_ref(), &[0, 1, 2], 100, "cifar-100 train");
    assert_eq!(train.class_names().len(), 100);
    assert_eq!(train.class_names()[7], "fine7");
    let test = load_dataset(&DatasetName::Cifar100, Split::Test, &opts(&dir)).unwrap();
    check(test.as_ref(), &[0], 100, "cifar-100 test");
}

/// Protocol-2 opcodes as Python 2's `cPickle` writes a CIFAR batch: byte strings as
/// SHORT_BINSTRING / BINSTRING, the array through `_reconstruct` and BUILD.
fn python2_batch(images: &[usize], labels: &[i64]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'q', 1, b'('];
    let short = |p: &mut Vec<u8>, s: &[u8]| {
        p.push(b'U');
        p.push(s.len() as u8);
        p.extend_from_slice(s);
    };
    short(&mut p, b"data");
    p.extend_from_slice(
        b"cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03K\x00\x85U\x01b\x87R",
    );
    p.extend_from_slice(b"(K\x01");
    p.extend_from_slice(&[b'M', images.len() as u8, 0, b'M', 0x00, 0x0c, 0x86]);
    p.extend_from_slice(b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89");
    let data: Vec<u8> = images.iter().flat_map(|&i| planes(i)).collect();
    p.push(b'T');
    p.extend_from_slice(&(data.len() as u32).to_le_bytes());
    p.extend_from_slice(&data);
    p.extend_from_slice(b"tb");
    short(&mut p, b"labels");
    p.extend_from_slice(b"](");
    for &l in labels {
        p.push(b'J');
        p.extend_from_slice(&(l as i32).to_le_bytes());
    }
    p.extend_from_slice(b"eu.");
    p
}

#[test]
fn a_python_2_pickle_reads_and_corrupt_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-10-batches-py");
    std::fs::create_dir_all(&dir).unwrap();
    for b in 1..=5 {
        std::fs::write(
            dir.join(format!("data_batch_{b}")),
            python2_batch(&[b], &[(3 * b as i64 + 1) % 10]),
        )
        .unwrap();
    }
    let test = python2_batch(&[0, 1], &[1, 4]);
    std::fs::write(dir.join("test_batch"), &test).unwrap();
    let train = load_dataset(&DatasetName::Cifar10, Split::Train, &opts(&dir)).unwrap();
    check(train.as_ref(), &[1, 2, 3, 4, 5], 10, "python 2");
    // Without batches.meta, the fixed CIFAR-10 names.
    assert_eq!(train.class_names()[0], "airplane");
    // batches.meta as Python 2 wrote it, in the text protocol 0 (names changed so that reading
    // them shows).
    let mut meta =
        String::from("(dp1\nS'num_cases_per_batch'\np2\nI10000\nsS'label_names'\np3\n(lp4\n");
    for (i, name) in [
        "air'plane",
        "car",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    .iter()
    .enumerate()
    {
        let quoted = if name.contains('\'') {
            format!("\"{name}\"")
        } else {
            format!("'{name}'")
        };
        meta += &format!("S{quoted}\np{}\na", 5 + i);
    }
    meta += "sS'num_vis'\np15\nI3072\ns.";
    std::fs::write(dir.join("batches.meta"), meta).unwrap();
    let train = load_dataset(&DatasetName::Cifar10, Split::Train, &opts(&dir)).unwrap();
    assert_eq!(train.class_names()[0], "air'plane");
    assert_eq!(train.class_names()[1], "car");

    for (bytes, says) in [
        (test[..test.len() / 2].to_vec(), "runs past the end"),
        (python2_batch(&[0, 1], &[1]), "1 labels for 2 images"),
        (python2_batch(&[0], &[10]), "not a class of Cifar10"),
        (b"\x80\x02}q\x01.".to_vec(), "no `data` entry"),
        (b"not a pickle".to_vec(), "not a readable pickle"),
        // A million nested one-tuples: refused, not a stack overflow.
        (
            [&[0x80u8, 2, b'N'][..], &vec![0x85u8; 1_000_000], b"."].concat(),
            "nest deeper",
        ),
        // One 64 KiB string memoised 100,000 times (6.5 GB of copies): refused.
        (
            [
                &[0x80u8, 4, 0x8e][..],
                &(65536u64).to_le_bytes(),
                &vec![7u8; 65536],
                &vec![0x94u8; 100_000],
                b".",
            ]
            .concat(),
            "memo copies exceed",
        ),
    ] {
        std::fs::write(dir.join("test_batch"), &bytes).unwrap();
        let e = load_dataset(&DatasetName::Cifar10, Split::Test, &opts(&dir))
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("test_batch"), "{says}: {e}");
        assert!(e.contains(says), "{says}: {e}");
    }
}
