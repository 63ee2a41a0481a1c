//! Embed images with an imported SimCLRv2 network.
//!
//! ```sh
//! cargo run --release -p simclr-examples --example embed_imported -- \
//!     [MODEL.pth [DATASET [DATA_DIR]]]
//! ```
//!
//! `MODEL.pth` is a file of the TF1 -> PyTorch converter of the official weights
//! (`r50_1x_sk0.pth`, …) or one written by `simclr export`; by default the small R18 test
//! network committed with `simclr-interop`'s test fixtures. `DATASET` is a `--dataset` name
//! (`fashion-mnist-subset` by default, `imagefolder` with `DATA_DIR` for your own images). The
//! example embeds the first 256 test images and reports how often an image's nearest neighbour
//! by cosine similarity has its class.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use simclr_data::{load_dataset, DataOptions, DatasetName, Loader, LoaderConfig, Split};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model_path = args.first().map(PathBuf::from).unwrap_or_else(|| {
        simclr_fs::manifest_dir(env!("CARGO_MANIFEST_DIR"))
            .join("../crates/simclr-interop/tests/fixtures/r18_1x_sk0.pth")
    });
    let dataset: DatasetName = args
        .get(1)
        .map_or("fashion-mnist-subset", String::as_str)
        .parse()?;
    let opts = DataOptions {
        data_dir: args.get(2).map(PathBuf::from),
        ..DataOptions::default()
    };
    let device = Device::Cpu;

    // The architecture comes from the file: its name and tensor shapes.
    let imported = simclr_interop::import_pth(&model_path, &device)?;
    println!(
        "imported {} ({}, {} features)",
        model_path.display(),
        imported.config.name(),
        imported.config.feature_dim()
    );

    let test =
        load_dataset(&dataset, Split::Test, &opts).with_context(|| format!("loading {dataset}"))?;
    let n = test.len().min(256);
    let loader = Loader::new(
        test,
        Some((0..n).collect()),
        LoaderConfig::eval(64, dataset.default_image_size()),
    )?;
    // Eval mode, BN with its moving statistics; `final_avg_pool` is the encoder output
    // (`proj_head_output`, `logits_sup`, … name the other layers).
    let (features, labels) =
        simclr_eval::features(&imported.model, &loader, "final_avg_pool", &device, false)?;
    println!("features {:?}", features.dims());

    // Leave-one-out nearest neighbour by cosine similarity.
    let norm = features
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    let unit = features.broadcast_div(&norm)?;
    let sim = unit.matmul(&unit.t()?)?;
    // An image is not its own neighbour.
    let sim = (sim - (Tensor::eye(n, DType::F32, &device)? * 10.0)?)?;
    let nearest = sim
        .argmax(D::Minus1)?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    let hits = nearest
        .iter()
        .enumerate()
        .filter(|(i, &j)| labels[*i] == labels[j as usize])
        .count();
    println!(
        "nearest neighbour of the same class: {hits} of {n} ({:.1} %)",
        100.0 * hits as f64 / n as f64
    );
    Ok(())
}
