//! The batch loader: shapes, determinism across thread counts, epochs, resume, errors.

mod common;

use std::sync::Arc;

use common::*;
use simclr_data::augment::AugmentConfig;
use simclr_data::{Dataset, ImageFolder, Loader, LoaderConfig};

fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn pretrain_cfg(threads: usize, image_size: usize) -> LoaderConfig {
    let mut cfg = LoaderConfig::train(16, 2, AugmentConfig::pretrain(image_size), 42);
    cfg.num_threads = threads;
    cfg
}

#[test]
fn two_view_batches_have_the_right_shape_and_range() {
    let ds = fmnist_train();
    let loader = Loader::new(ds.clone(), Some((0..200).collect()), pretrain_cfg(2, 28)).unwrap();
    assert_eq!(
        loader.batches_per_epoch(),
        12,
        "200 images, batch 16, last partial batch dropped"
    );
    let batches: Vec<_> = loader.epoch(0, 0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 12);
    let mut seen = Vec::new();
    for b in &batches {
        assert_eq!(b.views.len(), 2);
        assert_eq!(b.views[0].dims(), &[16, 3, 28, 28]);
        let (a, c) = (values(&b.views[0]), values(&b.views[1]));
        assert!(a.iter().chain(&c).all(|v| (0.0..=1.0).contains(v)));
        assert_ne!(a, c, "two different views");
        let labels = b.labels.to_vec1::<u32>().unwrap();
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(labels[k] as usize, ds.label(i));
        }
        seen.extend_from_slice(&b.indices);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 192, "each image at most once per epoch");
}

#[test]
fn deterministic_whatever_the_thread_count() {
    let ds = fmnist_train();
    let reference: Vec<Vec<f32>> = {
        let l = Loader::new(ds.clone(), Some((0..64).collect()), pretrain_cfg(1, 28)).unwrap();
        l.epoch(3, 0)
            .flat_map(|b| b.unwrap().views.iter().map(values).collect::<Vec<_>>())
            .collect()
    };
    for threads in [2, 3] {
        let l = Loader::new(
            ds.clone(),
            Some((0..64).collect()),
            pretrain_cfg(threads, 28),
        )
        .unwrap();
        let got: Vec<Vec<f32>> = l
            .epoch(3, 0)
            .flat_map(|b| b.unwrap().views.iter().map(values).collect::<Vec<_>>())
            .collect();
        assert_eq!(got, reference, "{threads} threads");
    }
    // The 224 recipe (blur, one σ per view-batch) is deterministic too.
    let big = Arc::new(colour_dataset(2, 4)) as Arc<dyn Dataset>;
    let mut cfg = pretrain_cfg(1, 64);
    cfg.preprocess = simclr_data::Preprocess::Augment(AugmentConfig::pretrain(64));
    cfg.batch_size = 8;
    let one = Loader::new(big.clone(), None, cfg.clone())
        .unwrap()
        .batch(0, 0)
        .unwrap();
    cfg.num_threads = 3;
    let three = Loader::new(big, None, cfg).unwrap().batch(0, 0).unwrap();
    assert_eq!(values(&one.views[1]), values(&three.views[1]));
}

#[test]
fn epochs_reshuffle_and_resume_continues_exactly() {
    let ds = fmnist_train();
    let loader = Loader::new(ds, Some((0..96).collect()), pretrain_cfg(2, 28)).unwrap();
    let e0: Vec<_> = loader.epoch(0, 0).map(|b| b.unwrap()).collect();
    let e1: Vec<_> = loader.epoch(1, 0).map(|b| b.unwrap()).collect();
    assert_ne!(e0[0].indices, e1[0].indices, "a new order each epoch");
    // Resuming at batch 4 yields batches 4.. of the uninterrupted epoch.
    let resumed: Vec<_> = loader.epoch(1, 4).map(|b| b.unwrap()).collect();
    assert_eq!(resumed.len(), e1.len() - 4);
    for (r, full) in resumed.iter().zip(&e1[4..]) {
        assert_eq!(r.index, full.index);
        assert_eq!(r.indices, full.indices);
        assert_eq!(values(&r.views[0]), values(&full.views[0]));
    }
    // Dropping an iterator early stops the background thread without a hang.
    let mut it = loader.epoch(2, 0);
    assert!(it.next().is_some());
    drop(it);
}

#[test]
fn eval_loader_keeps_order_and_every_image() {
    let ds = fmnist_train();
    let loader = Loader::new(
        ds.clone(),
        Some((0..70).collect()),
        LoaderConfig::eval(32, 28),
    )
    .unwrap();
    let batches: Vec<_> = loader.epoch(0, 0).map(|b| b.unwrap()).collect();
    assert_eq!(
        batches.iter().map(|b| b.indices.len()).collect::<Vec<_>>(),
        vec![32, 32, 6]
    );
    let first = values(&batches[0].views[0]);
    let img = ds.image(0).unwrap();
    assert_eq!(first[27], img.data[27] as f32 / 255.0);
    assert_eq!(
        first[784 + 27],
        img.data[27] as f32 / 255.0,
        "gray replicated to the G plane"
    );
}

#[test]
fn loader_errors_name_the_problem() {
    let ds = fmnist_train();
    let e = Loader::new(ds.clone(), Some((0..10).collect()), pretrain_cfg(1, 28))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("batch_size = 16") && e.contains("10 images"),
        "{e}"
    );
    let e = Loader::new(ds.clone(), Some(vec![ds.len()]), pretrain_cfg(1, 28))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("beyond the end"), "{e}");

    // A corrupt JPEG surfaces as an error naming the file, not a panic.
    let dir = tempfile::tempdir().unwrap();
    write_image_folder(dir.path(), 2, 8);
    let folder = ImageFolder::open(dir.path()).unwrap();
    let victim = folder.path(3).to_path_buf();
    std::fs::write(&victim, b"\xff\xd8\xff truncated").unwrap();
    let loader = Loader::new(Arc::new(folder), None, LoaderConfig::eval(4, 28)).unwrap();
    let results: Vec<_> = loader.epoch(0, 0).collect();
    assert!(
        results[0].is_err(),
        "the batch holding the corrupt file fails"
    );
    let e = results[0].as_ref().err().unwrap().to_string();
    assert!(e.contains(&victim.display().to_string()), "{e}");
    assert_eq!(results.len(), 1, "the epoch stops at the error");
}

/// A dataset whose every image read panics (a bug in a user's `Dataset`, say).
struct PanickingDataset(Arc<dyn Dataset>);

impl Dataset for PanickingDataset {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn label(&self, index: usize) -> usize {
        self.0.label(index)
    }
    fn class_names(&self) -> &[String] {
        self.0.class_names()
    }
    fn image(&self, _index: usize) -> simclr_data::Result<simclr_data::Image> {
        panic!("a broken dataset")
    }
    fn sample_name(&self, index: usize) -> String {
        self.0.sample_name(index)
    }
    fn describe(&self) -> String {
        "a panicking dataset".into()
    }
}

#[test]
fn a_panic_in_the_prefetch_thread_is_an_error_not_the_end_of_the_epoch() {
    let ds: Arc<dyn Dataset> = Arc::new(PanickingDataset(fmnist_train()));
    let loader = Loader::new(ds, Some((0..64).collect()), pretrain_cfg(1, 28)).unwrap();
    let items: Vec<_> = loader.epoch(0, 0).collect();
    assert_eq!(items.len(), 1, "one error, then the iterator ends");
    let e = items.into_iter().next().unwrap().unwrap_err().to_string();
    assert!(
        e.contains("prefetch thread") && e.contains("a broken dataset"),
        "{e}"
    );
}

/// A 28×28 pretraining loader configuration with `set` applied to its augmentation.
fn augment_cfg(set: impl Fn(&mut AugmentConfig)) -> LoaderConfig {
    let mut cfg = pretrain_cfg(1, 28);
    if let simclr_data::Preprocess::Augment(a) = &mut cfg.preprocess {
        set(a);
    }
    cfg
}

#[test]
fn augmentation_settings_without_a_meaning_are_refused_by_name() {
    for s in [f32::INFINITY, f32::NAN, -0.5] {
        let cfg = augment_cfg(|a| a.color_jitter_strength = s);
        let e = Loader::new(fmnist_train(), None, cfg)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("color_jitter_strength"), "{s}: {e}");
    }
    for m in [0.0f32, -0.1, 1.5, f32::NAN] {
        let cfg = augment_cfg(|a| a.crop_min_area = m);
        let e = Loader::new(fmnist_train(), None, cfg)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("crop_min_area"), "{m}: {e}");
    }
    let whole = augment_cfg(|a| a.crop_min_area = 1.0);
    assert!(
        Loader::new(fmnist_train(), None, whole).is_ok(),
        "1.0: the whole image"
    );
}
