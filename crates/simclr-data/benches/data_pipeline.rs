//! Loading + augmentation throughput of the pretraining pipelines (two views per image).
//!
//! `cargo bench -p simclr-data` prints images/s (median over timed batches after warm-up) for:
//! the 28×28 recipe on the committed Fashion-MNIST subset, and the 224×224 recipe (crop, flip,
//! colour, grayscale, blur) on 375×500 RGB images held in memory and as JPEG files.

use std::sync::Arc;

use simclr_data::augment::AugmentConfig;
use simclr_data::{
    load_dataset, DataOptions, Dataset, DatasetName, Image, ImageFolder, InMemoryDataset, Loader,
    LoaderConfig, Split,
};

fn measure(
    scenario: &str,
    what: &str,
    ds: Arc<dyn Dataset>,
    image_size: usize,
    batch: usize,
    threads: usize,
) {
    if !simclr_bench::selected(scenario) {
        return;
    }
    let mut cfg = LoaderConfig::train(batch, 2, AugmentConfig::pretrain(image_size), 0);
    cfg.num_threads = threads;
    let loader = Loader::new(ds, None, cfg).expect("loader");
    // Batches run on through later epochs: a median over 20 batches rides out more of this
    // VM's drift than one over the few batches of one epoch.
    let (warmup, timed, per_epoch) = (2, 20, loader.batches_per_epoch());
    let mut b = 0;
    let (t, peak) = simclr_bench::time_steps(warmup, timed, || {
        loader.batch(b / per_epoch, b % per_epoch).expect("batch");
        b += 1;
    });
    let figure = simclr_bench::Figure {
        scenario: scenario.into(),
        images_per_s: batch as f64 / t,
        seconds_per_step: t,
        peak_rss_mib: peak,
        threads,
        unit: None,
    };
    simclr_bench::report(&format!("{what} ({threads} thr, 2 views)"), &figure);
}

/// ImageNet-sized RGB images made from Fashion-MNIST: upscaled to 375×500 and tinted.
fn large_images(src: &dyn Dataset, n: usize) -> InMemoryDataset {
    let (h, w) = (375usize, 500usize);
    let images = (0..n)
        .map(|i| {
            let s = src.image(i).expect("image");
            let data = (0..h * w)
                .flat_map(|p| {
                    let v = s.data[(p / w * 28 / h) * 28 + (p % w) * 28 / w] as u32;
                    [v as u8, (v * 3 / 4 + 40) as u8, (255 - v) as u8]
                })
                .collect();
            Image::new(h, w, 3, data)
        })
        .collect();
    let labels = (0..n).map(|i| src.label(i)).collect();
    InMemoryDataset::new(images, labels, src.class_names().to_vec(), "large".into())
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let small = load_dataset(
        &DatasetName::FashionMnistSubset,
        Split::Train,
        &DataOptions::default(),
    )
    .expect("the committed subset");
    for (threads, scenario) in [(1, "data-28"), (cores, "data-28-all-cores")] {
        measure(
            scenario,
            "pretrain 28x28 (fashion-mnist subset, batch 256)",
            small.clone(),
            28,
            256,
            threads,
        );
    }
    let large_scenarios = [
        "data-224",
        "data-224-jpeg",
        "data-224-all-cores",
        "data-224-jpeg-all-cores",
    ];
    if !large_scenarios.iter().any(|s| simclr_bench::selected(s)) {
        return;
    }
    let large = large_images(small.as_ref(), 9 * 32);
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, img) in large.images().iter().enumerate() {
        let class = dir.path().join(format!("n{:08}", large.label(i)));
        std::fs::create_dir_all(&class).expect("mkdir");
        image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
            .expect("rgb")
            .save(class.join(format!("n{:08}_{i}.JPEG", large.label(i))))
            .expect("jpeg");
    }
    let large: Arc<dyn Dataset> = Arc::new(large);
    let folder: Arc<dyn Dataset> = Arc::new(ImageFolder::open(dir.path()).expect("folder"));
    for (threads, suffix) in [(1, ""), (cores, "-all-cores")] {
        measure(
            &format!("data-224{suffix}"),
            "pretrain 224x224 from 375x500 RGB in memory",
            large.clone(),
            224,
            32,
            threads,
        );
        measure(
            &format!("data-224-jpeg{suffix}"),
            "pretrain 224x224 from 375x500 JPEG files",
            folder.clone(),
            224,
            32,
            threads,
        );
    }
}
