//! Loading + augmentation throughput of the pretraining pipelines (two views per image).
//!
//! `cargo bench -p simclr-data` prints images/s (median over timed batches after warm-up) for:
//! the 28×28 recipe on the committed Fashion-MNIST subset, and the 224×224 recipe (crop, flip,
//! colour, grayscale, blur) on 375×500 RGB images held in memory and as JPEG files.

use std::sync::Arc;
use std::time::Instant;

use simclr_data::augment::AugmentConfig;
use simclr_data::{
    load_dataset, DataOptions, Dataset, DatasetName, Image, ImageFolder, InMemoryDataset, Loader,
    LoaderConfig, Split,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn measure(name: &str, ds: Arc<dyn Dataset>, image_size: usize, batch: usize, threads: usize) {
    let mut cfg = LoaderConfig::train(batch, 2, AugmentConfig::pretrain(image_size), 0);
    cfg.num_threads = threads;
    let loader = Loader::new(ds, None, cfg).expect("loader");
    let (warmup, timed) = (2, 7.min(loader.batches_per_epoch() - 2));
    let mut rates = Vec::new();
    for b in 0..warmup + timed {
        let t = Instant::now();
        let out = loader.batch(0, b).expect("batch");
        let dt = t.elapsed().as_secs_f64();
        if b >= warmup {
            rates.push(out.indices.len() as f64 / dt);
        }
    }
    let rate = median(rates);
    println!(
        "{name:<44} threads {threads}  {rate:>9.0} images/s  ({:.0} images/s/core, 2 views each)",
        rate / threads as f64
    );
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
    for threads in [1, cores] {
        measure(
            "pretrain 28x28 (fashion-mnist subset, batch 256)",
            small.clone(),
            28,
            256,
            threads,
        );
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
    for threads in [1, cores] {
        measure(
            "pretrain 224x224 from 375x500 RGB in memory",
            large.clone(),
            224,
            32,
            threads,
        );
        measure(
            "pretrain 224x224 from 375x500 JPEG files",
            folder.clone(),
            224,
            32,
            threads,
        );
    }
}
