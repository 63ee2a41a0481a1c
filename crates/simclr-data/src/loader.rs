//! The batch loader: shuffles each epoch, decodes and augments on a rayon pool, prefetches a
//! bounded number of batches on a background thread, and yields candle tensors.
//!
//! Every random draw comes from a stream seeded by `(seed, epoch, position, view)`, so a batch is
//! the same whatever the thread count or the order the pool runs its work in, and a run resumed
//! at `(epoch, batch)` sees exactly the batches an uninterrupted run would.

use std::sync::mpsc;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::augment::{augment, blur_batch_chw, eval_preprocess, AugmentConfig};
use crate::{DataError, Dataset, Result};

/// How each image becomes network input.
#[derive(Clone, Debug, PartialEq)]
pub enum Preprocess {
    /// Random views (pretraining, fine-tuning, distillation).
    Augment(AugmentConfig),
    /// Deterministic evaluation preprocessing.
    Eval { image_size: usize },
}

impl Preprocess {
    pub fn image_size(&self) -> usize {
        match self {
            Preprocess::Augment(a) => a.image_size,
            Preprocess::Eval { image_size } => *image_size,
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Views per image: 2 for contrastive pretraining, 1 otherwise.
    pub views: usize,
    pub preprocess: Preprocess,
    pub shuffle: bool,
    /// Drop the last incomplete batch (training, as the official `drop_remainder=True`).
    pub drop_last: bool,
    pub seed: u64,
    /// Decoding/augmentation threads; 0 = one per core.
    pub num_threads: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
}

impl LoaderConfig {
    pub fn train(batch_size: usize, views: usize, augment: AugmentConfig, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            views,
            preprocess: Preprocess::Augment(augment),
            shuffle: true,
            drop_last: true,
            seed,
            num_threads: 0,
            prefetch: 2,
        }
    }

    pub fn eval(batch_size: usize, image_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            views: 1,
            preprocess: Preprocess::Eval { image_size },
            shuffle: false,
            drop_last: false,
            seed: 0,
            num_threads: 0,
            prefetch: 2,
        }
    }
}

/// One batch: `views[v]` is `n × 3 × S × S` f32 in [0, 1], `labels` is `n` u32.
#[derive(Debug)]
pub struct Batch {
    pub views: Vec<Tensor>,
    pub labels: Tensor,
    /// Dataset indices of the images, in batch order.
    pub indices: Vec<usize>,
    pub epoch: usize,
    /// Position of the batch in its epoch.
    pub index: usize,
}

#[derive(Clone)]
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    indices: Arc<Vec<usize>>,
    /// The indices grouped by the dataset's read blocks (in block order), when it has them.
    blocks: Option<Arc<Vec<Vec<usize>>>>,
    cfg: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
}

/// SplitMix64 finaliser over the stream coordinates.
fn stream_seed(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x5EED_5EED_5EED_5EED;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

/// `indices` grouped by the read block each lies in, blocks in ascending order; `None` when the
/// dataset has no blocks.
fn read_blocks(dataset: &dyn Dataset, indices: &[usize]) -> Option<Vec<Vec<usize>>> {
    let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for &i in indices {
        groups.entry(dataset.read_block(i)?).or_default().push(i);
    }
    Some(groups.into_values().collect())
}

const SHUFFLE: u64 = 1;
const SAMPLE: u64 = 2;
const BLUR: u64 = 3;

impl Loader {
    /// `indices` restricts the loader to a subset (a labelled split); `None` takes every image.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        indices: Option<Vec<usize>>,
        cfg: LoaderConfig,
    ) -> Result<Self> {
        let bad = |name: &'static str, value: String, reason: &str| DataError::Config {
            name,
            value,
            reason: reason.into(),
        };
        let indices = indices.unwrap_or_else(|| (0..dataset.len()).collect());
        if let Some(&i) = indices.iter().find(|&&i| i >= dataset.len()) {
            return Err(bad(
                "indices",
                i.to_string(),
                "index beyond the end of the dataset",
            ));
        }
        if cfg.batch_size == 0 {
            return Err(bad("batch_size", "0".into(), "must be at least 1"));
        }
        if !(1..=2).contains(&cfg.views) {
            return Err(bad(
                "views",
                cfg.views.to_string(),
                "1 or 2 views per image",
            ));
        }
        if cfg.preprocess.image_size() == 0 {
            return Err(bad("image_size", "0".into(), "must be at least 1"));
        }
        if let Preprocess::Augment(a) = &cfg.preprocess {
            let s = a.color_jitter_strength;
            // Jitter ranges scale with s: a non-finite or negative one has no distribution.
            if !(s.is_finite() && s >= 0.0) {
                return Err(bad(
                    "color_jitter_strength",
                    s.to_string(),
                    "must be a finite number >= 0 (0 switches colour distortion off)",
                ));
            }
            let m = a.crop_min_area;
            if !(m > 0.0 && m <= 1.0) {
                return Err(bad(
                    "crop_min_area",
                    m.to_string(),
                    "must be in (0, 1] (a fraction of the image's area)",
                ));
            }
        }
        if indices.is_empty() || (cfg.drop_last && indices.len() < cfg.batch_size) {
            return Err(bad(
                "batch_size",
                cfg.batch_size.to_string(),
                &format!(
                    "larger than the {} images to load ({})",
                    indices.len(),
                    dataset.describe()
                ),
            ));
        }
        let mut builder =
            rayon::ThreadPoolBuilder::new().thread_name(|i| format!("simclr-data-{i}"));
        if cfg.num_threads > 0 {
            builder = builder.num_threads(cfg.num_threads);
        }
        let pool = builder
            .build()
            .map_err(|e| bad("num_threads", cfg.num_threads.to_string(), &e.to_string()))?;
        let blocks = read_blocks(dataset.as_ref(), &indices).map(Arc::new);
        Ok(Loader {
            dataset,
            indices: Arc::new(indices),
            blocks,
            cfg,
            pool: Arc::new(pool),
        })
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Images served per epoch (before dropping the last partial batch).
    pub fn num_images(&self) -> usize {
        self.indices.len()
    }

    pub fn batches_per_epoch(&self) -> usize {
        if self.cfg.drop_last {
            self.indices.len() / self.cfg.batch_size
        } else {
            self.indices.len().div_ceil(self.cfg.batch_size)
        }
    }

    /// The order of the dataset indices in `epoch`.
    ///
    /// A dataset read in blocks (a parquet row group, [`Dataset::read_block`]) is shuffled in two
    /// levels, so that an epoch reads each block about once instead of once per image: the
    /// blocks in a random order, then the images of each run of [`Dataset::read_window`] blocks
    /// mixed together. Any other dataset, or one whose blocks all fit in the window, is shuffled
    /// as a whole.
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        if !self.cfg.shuffle {
            return self.indices.as_ref().clone();
        }
        let mut rng =
            ChaCha8Rng::seed_from_u64(stream_seed(&[self.cfg.seed, SHUFFLE, epoch as u64]));
        // Blocks that all fit at once cost nothing to mix: the plain shuffle.
        let window = self.dataset.read_window().max(1);
        let blocks = self.blocks.as_ref().filter(|b| b.len() > window);
        let Some(blocks) = blocks else {
            let mut order = self.indices.as_ref().clone();
            order.shuffle(&mut rng);
            return order;
        };
        let mut visit: Vec<usize> = (0..blocks.len()).collect();
        visit.shuffle(&mut rng);
        let mut order = Vec::with_capacity(self.indices.len());
        for window in visit.chunks(window) {
            let start = order.len();
            for &b in window {
                order.extend_from_slice(&blocks[b]);
            }
            order[start..].shuffle(&mut rng);
        }
        order
    }

    /// Builds batch `index` of `epoch` on the calling thread (with the pool's help).
    pub fn batch(&self, epoch: usize, index: usize) -> Result<Batch> {
        self.batch_from_order(&self.epoch_order(epoch), epoch, index)
    }

    fn batch_from_order(&self, order: &[usize], epoch: usize, index: usize) -> Result<Batch> {
        let bs = self.cfg.batch_size;
        let start = index * bs;
        let end = (start + bs).min(order.len());
        let members = &order[start..end];
        let n = members.len();
        let side = self.cfg.preprocess.image_size();
        let per = 3 * side * side;
        let views = self.cfg.views;
        let mut buf = vec![0f32; n * views * per];
        self.pool.install(|| {
            buf.par_chunks_exact_mut(views * per)
                .zip(members.par_iter())
                .enumerate()
                .try_for_each(|(k, (out, &idx))| -> Result<()> {
                    let image = self.dataset.image(idx)?;
                    for v in 0..views {
                        let img = match &self.cfg.preprocess {
                            Preprocess::Augment(aug) => {
                                let position = (start + k) as u64;
                                let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(&[
                                    self.cfg.seed,
                                    SAMPLE,
                                    epoch as u64,
                                    position,
                                    v as u64,
                                ]));
                                augment(&image, aug, &mut rng)
                            }
                            Preprocess::Eval { image_size } => eval_preprocess(&image, *image_size),
                        };
                        img.write_chw(&mut out[v * per..(v + 1) * per]);
                    }
                    Ok(())
                })
        })?;
        let mut view_tensors = Vec::with_capacity(views);
        for v in 0..views {
            let mut data = Vec::with_capacity(n * per);
            for k in 0..n {
                let s = (k * views + v) * per;
                data.extend_from_slice(&buf[s..s + per]);
            }
            if let Preprocess::Augment(aug) = &self.cfg.preprocess {
                if aug.use_blur {
                    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(&[
                        self.cfg.seed,
                        BLUR,
                        epoch as u64,
                        index as u64,
                        v as u64,
                    ]));
                    self.pool
                        .install(|| blur_batch_chw(&mut data, side, &mut rng));
                }
            }
            view_tensors.push(Tensor::from_vec(data, (n, 3, side, side), &Device::Cpu)?);
        }
        let labels: Vec<u32> = members
            .iter()
            .map(|&i| self.dataset.label(i) as u32)
            .collect();
        Ok(Batch {
            views: view_tensors,
            labels: Tensor::from_vec(labels, n, &Device::Cpu)?,
            indices: members.to_vec(),
            epoch,
            index,
        })
    }

    /// The batches of `epoch` from `start_batch` on, prepared ahead on a background thread.
    pub fn epoch(&self, epoch: usize, start_batch: usize) -> EpochIter {
        let (tx, rx) = mpsc::sync_channel(self.cfg.prefetch.max(1));
        let loader = self.clone();
        let total = self.batches_per_epoch();
        let worker = std::thread::Builder::new()
            .name("simclr-prefetch".into())
            .spawn(move || {
                let order = loader.epoch_order(epoch);
                for b in start_batch..total {
                    let batch = loader.batch_from_order(&order, epoch, b);
                    let failed = batch.is_err();
                    // The consumer went away: stop quietly.
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            })
            .expect("spawning the prefetch thread");
        EpochIter {
            rx,
            worker: Some(worker),
        }
    }
}

/// Iterator over one epoch's batches; dropping it stops the background work.
pub struct EpochIter {
    rx: mpsc::Receiver<Result<Batch>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        if let Ok(batch) = self.rx.recv() {
            return Some(batch);
        }
        // The channel closed: the epoch is over, unless the prefetch thread died, which must not
        // pass for the end of an epoch (a training loop would start the same epoch again).
        let panic = self.worker.take()?.join().err()?;
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".into());
        Some(Err(DataError::LoaderPanic(what)))
    }
}
