#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use simclr_data::{load_dataset, DataOptions, Dataset, DatasetName, Image, InMemoryDataset, Split};

/// The committed Fashion-MNIST subset's training split (real images for the tests).
pub fn fmnist_train() -> Arc<dyn Dataset> {
    load_dataset(
        &DatasetName::FashionMnistSubset,
        Split::Train,
        &DataOptions::default(),
    )
    .expect("the committed subset under data/fashion-mnist-subset")
}

/// `per_class` real images of each of the first `classes` classes.
pub fn fmnist_images(classes: usize, per_class: usize) -> Vec<(Image, usize)> {
    let ds = fmnist_train();
    let mut out = Vec::new();
    for c in 0..classes {
        out.extend(
            (0..ds.len())
                .filter(|&i| ds.label(i) == c)
                .take(per_class)
                .map(|i| (ds.image(i).unwrap(), c)),
        );
    }
    out
}

/// A small in-memory dataset of colour images built from Fashion-MNIST (tinted per class).
pub fn colour_dataset(classes: usize, per_class: usize) -> InMemoryDataset {
    let (images, labels): (Vec<Image>, Vec<usize>) = fmnist_images(classes, per_class)
        .into_iter()
        .map(|(img, c)| {
            let tint = [
                (c * 37 % 256) as u32,
                (c * 91 % 256) as u32,
                (255 - c * 53 % 256) as u32,
            ];
            let data = img
                .data
                .iter()
                .flat_map(|&v| tint.map(|t| ((v as u32 * (t + 64)) / 320) as u8))
                .collect();
            (Image::new(img.height, img.width, 3, data), c)
        })
        .unzip();
    InMemoryDataset::new(
        images,
        labels,
        (0..classes).map(|c| format!("class{c}")).collect(),
        "test colour set".into(),
    )
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes an ImageFolder of real Fashion-MNIST images: `classes` folders named like WNIDs,
/// JPEG files named `<wnid>_<n>.JPEG`, plus one RGBA PNG per class.
pub fn write_image_folder(root: &Path, classes: usize, per_class: usize) -> Vec<String> {
    let mut wnids = Vec::new();
    for (k, (img, c)) in fmnist_images(classes, per_class).into_iter().enumerate() {
        let wnid = format!("n{:08}", 1000 + c * 7);
        let dir = root.join(&wnid);
        std::fs::create_dir_all(&dir).unwrap();
        let gray =
            image::GrayImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
                .unwrap();
        gray.save(dir.join(format!("{wnid}_{k}.JPEG"))).unwrap();
        if k % per_class == 0 {
            let rgba = image::RgbaImage::from_fn(img.width as u32, img.height as u32, |x, y| {
                let v = img.data[y as usize * img.width + x as usize];
                image::Rgba([v, 255 - v, v / 2, 200])
            });
            rgba.save(dir.join(format!("{wnid}_extra{k}.png"))).unwrap();
            wnids.push(wnid);
        }
    }
    wnids
}
