//! `cargo xtask make-embedded`: the committed Fashion-MNIST subset, made reproducibly.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use simclr_data::idx::{encode_idx, idx_split_paths, read_idx};
use simclr_data::write_atomic;

/// Per split: file stem, images kept per class.
const SPLITS: [(&str, bool, usize); 2] = [("train", true, 1000), ("t10k", false, 200)];

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// gzip with a zero timestamp and no file name, so the output depends only on the data.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes)?;
    Ok(enc.finish()?)
}

pub fn make(source: &Path, out: &Path, check: bool) -> Result<()> {
    let mut manifest = serde_json::Map::new();
    let mut sums = String::new();
    let mut files = Vec::new();
    for (stem, train, per_class) in SPLITS {
        let (ip, lp) = idx_split_paths(source, train).with_context(|| {
            format!(
                "no Fashion-MNIST {stem} files in {} (apt-get install dataset-fashion-mnist, or pass --source)",
                source.display()
            )
        })?;
        let images = read_idx(&ip)?;
        let labels = read_idx(&lp)?;
        let [n, h, w] = images.dims[..] else {
            bail!(
                "{}: expected an IDX image file [N, H, W], got dimensions {:?}",
                ip.display(),
                images.dims
            )
        };
        if labels.dims != [n] || images.data.len() != n * h * w {
            bail!(
                "{} ({:?}) and {} ({:?}) do not describe the same {n} images",
                ip.display(),
                images.dims,
                lp.display(),
                labels.dims
            )
        }
        let mut taken = [0usize; 10];
        let mut keep = Vec::new();
        for (i, &l) in labels.data.iter().enumerate() {
            if l as usize >= taken.len() {
                bail!(
                    "{}: label {l} of image {i} is not a Fashion-MNIST class (0-9)",
                    lp.display()
                );
            }
            if taken[l as usize] < per_class {
                taken[l as usize] += 1;
                keep.push(i);
            }
        }
        if taken.iter().any(|&t| t < per_class) {
            bail!(
                "{}: fewer than {per_class} images in some class: {taken:?}",
                lp.display()
            );
        }
        let img_data: Vec<u8> = keep
            .iter()
            .flat_map(|&i| images.data[i * h * w..(i + 1) * h * w].iter().copied())
            .collect();
        let lab_data: Vec<u8> = keep.iter().map(|&i| labels.data[i]).collect();
        let img_raw = encode_idx(&[keep.len(), h, w], &img_data);
        let lab_raw = encode_idx(&[keep.len()], &lab_data);
        for (name, raw, src) in [
            (format!("{stem}-images-idx3-ubyte.gz"), img_raw, &ip),
            (format!("{stem}-labels-idx1-ubyte.gz"), lab_raw, &lp),
        ] {
            let gz = gzip(&raw)?;
            let src_bytes =
                std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
            manifest.insert(
                name.clone(),
                serde_json::json!({
                    "source": src.display().to_string(),
                    "source_sha256": sha256(&src_bytes),
                    "rule": format!("first {per_class} images of each class, in source order"),
                    "count": keep.len(),
                    "idx_sha256": sha256(&raw),
                    "gz_sha256": sha256(&gz),
                }),
            );
            let _ = writeln!(sums, "{}  {name}", sha256(&gz));
            files.push((name, gz));
        }
    }
    if check {
        for (name, gz) in &files {
            let committed = std::fs::read(out.join(name))
                .with_context(|| format!("reading {}", out.join(name).display()))?;
            if &committed != gz {
                bail!(
                    "{} differs from what {} produces",
                    out.join(name).display(),
                    source.display()
                );
            }
        }
        println!("{}: matches {}", out.display(), source.display());
        return Ok(());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (name, gz) in &files {
        write_atomic(&out.join(name), gz)?;
        println!("wrote {} ({} bytes)", out.join(name).display(), gz.len());
    }
    write_atomic(&out.join("SHA256SUMS"), sums.as_bytes())?;
    write_atomic(
        &out.join("MANIFEST.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(manifest))?.as_bytes(),
    )?;
    Ok(())
}
