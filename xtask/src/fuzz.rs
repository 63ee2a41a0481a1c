//! `cargo xtask fuzz`: mutation fuzzing of every input parser on stable Rust.
//!
//! Each target feeds bytes to a real entry point through a file, as a user's file reaches it
//! (`read_idx`, `read_cifar_dir`, `decode_image_file`, `read_split_file`, `checkpoint::load`,
//! `import_pth`, `import_tf1`, `read_hub_dataset`). An `Err` is the expected answer to a bad
//! file; what the fuzzer looks for is anything else: a panic, an abort (an allocation beyond
//! [`ALLOC_LIMIT`] counts as one), or an input that runs longer than [`HANG_SECONDS`].
//!
//! The inputs are random mutations (bit flips, interesting integers, cuts, deletions,
//! duplications, splices) of seeds that the project's own writers produce, or of the official
//! fixtures. The mutation loop runs in a child process (`fuzz-worker`) so that an abort or a
//! hang cannot take the supervisor down: the child parses each input from one file, and when
//! the child dies or stops making progress the supervisor keeps that file. Every input that
//! failed is saved under `fuzz/regressions/<target>/`, which is committed; the unit test below
//! runs each saved input again, so a fixed failure stays fixed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The targets, in the order `all` runs them.
pub const TARGETS: [&str; 9] = [
    "idx",
    "cifar",
    "cifar-py",
    "image",
    "split",
    "checkpoint",
    "pth",
    "tf-bundle",
    "parquet",
];

/// An input still running after this long is a hang.
pub const HANG_SECONDS: u64 = 10;

/// A single allocation above this is treated as a failure of the parser (it trusted a size
/// field without checking it against the file): every seed is under a megabyte.
pub const ALLOC_LIMIT: usize = 512 << 20;

/// The allocation bound in force: unbounded except in a fuzz worker.
pub static ALLOC_BOUND: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The system allocator with [`ALLOC_BOUND`]: an allocation above it aborts the process (a
/// fuzz worker's supervisor records the input that caused it).
pub struct BoundedAlloc;

unsafe impl std::alloc::GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > ALLOC_BOUND.load(Ordering::Relaxed) {
            over_bound();
        }
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > ALLOC_BOUND.load(Ordering::Relaxed) {
            over_bound();
        }
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_BOUND.load(Ordering::Relaxed) {
            over_bound();
        }
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

fn over_bound() -> ! {
    // No allocation here: write a fixed message straight to the stderr descriptor.
    let msg = b"fuzz worker: an allocation above the bound; aborting\n";
    let _ = std::io::stderr().write_all(msg);
    std::process::abort()
}

/// A parser under test: its seeds and how one input reaches it.
struct Target {
    name: &'static str,
    /// Where the input is written (relative to the worker's scratch folder): the file the
    /// parser reads, and the one the supervisor keeps when the worker dies.
    input: &'static str,
    seeds: fn(&Path) -> Result<Vec<Vec<u8>>>,
    /// Parses the file at `input` (already written) in `scratch`; errors are ignored.
    run: fn(&Path),
}

fn target(name: &str) -> Result<Target> {
    let t = match name {
        "idx" => Target {
            name: "idx",
            input: "input-idx3-ubyte",
            seeds: seeds_idx,
            run: |s| {
                let _ = simclr_data::idx::read_idx(&s.join("input-idx3-ubyte"));
            },
        },
        "cifar" => Target {
            name: "cifar",
            input: "cifar/test_batch.bin",
            seeds: seeds_cifar,
            run: |s| {
                use simclr_data::cifar::{read_cifar_dir, CifarKind};
                let dir = s.join("cifar");
                let _ = read_cifar_dir(&dir, CifarKind::Cifar10, false);
                // The same bytes as a CIFAR-100 file (two label bytes per record).
                let _ = std::fs::copy(dir.join("test_batch.bin"), dir.join("test.bin"));
                let _ = read_cifar_dir(&dir, CifarKind::Cifar100Fine, false);
            },
        },
        "cifar-py" => Target {
            name: "cifar-py",
            input: "cifar-10-batches-py/test_batch",
            seeds: seeds_cifar_py,
            run: |s| {
                use simclr_data::cifar::{read_cifar_py_dir, CifarKind};
                let dir = s.join("cifar-10-batches-py");
                let _ = read_cifar_py_dir(&dir, CifarKind::Cifar10, false);
            },
        },
        "image" => Target {
            name: "image",
            input: "input.img",
            seeds: seeds_image,
            run: |s| {
                let _ = simclr_data::folder::decode_image_file(&s.join("input.img"));
            },
        },
        "split" => Target {
            name: "split",
            input: "split.txt",
            seeds: seeds_split,
            run: |s| {
                let _ = simclr_data::split::read_split_file(&s.join("split.txt"), &split_dataset());
            },
        },
        "checkpoint" => Target {
            name: "checkpoint",
            input: "checkpoint.safetensors",
            seeds: seeds_checkpoint,
            run: |s| {
                let p = s.join("checkpoint.safetensors");
                let cpu = candle_core::Device::Cpu;
                let _ = simclr_models::checkpoint::load(&p, &cpu);
                let _ = simclr_models::checkpoint::load_tensors(&p, &cpu);
                let _ = simclr_models::checkpoint::read_meta(&p);
            },
        },
        "pth" => Target {
            name: "pth",
            input: "r18_1x_sk0.pth",
            seeds: |_| fixture_seed("r18_1x_sk0.pth"),
            run: |s| {
                let _ =
                    simclr_interop::import_pth(s.join("r18_1x_sk0.pth"), &candle_core::Device::Cpu);
            },
        },
        "tf-bundle" => Target {
            name: "tf-bundle",
            input: "r18_1x_sk0/model.ckpt-1234.index",
            seeds: seeds_tf_bundle,
            run: |s| {
                let _ = simclr_interop::import_tf1(
                    s.join("r18_1x_sk0/model.ckpt-1234"),
                    false,
                    &candle_core::Device::Cpu,
                );
            },
        },
        "parquet" => Target {
            name: "parquet",
            input: PARQUET_FILE,
            seeds: seeds_parquet,
            run: |s| {
                let opts = simclr_data::hub::HubOptions {
                    cache_dir: Some(s.join("hub")),
                    offline: true,
                    revision: None,
                    ..Default::default()
                };
                // Opening reads the labels; the images are read (and decoded) when asked for.
                if let Ok(ds) = simclr_data::hub::read_hub_dataset("fuzz/fashion", "test", &opts) {
                    for i in 0..simclr_data::Dataset::len(&ds).min(64) {
                        let _ = simclr_data::Dataset::image(&ds, i);
                    }
                }
            },
        },
        other => bail!("unknown fuzz target {other:?}: expected all or one of {TARGETS:?}"),
    };
    Ok(t)
}

const PARQUET_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const PARQUET_FILE: &str = "hub/datasets--fuzz--fashion/snapshots/0123456789abcdef0123456789abcdef01234567/data/test-00000-of-00001.parquet";

fn repo_root() -> PathBuf {
    crate::workspace_root()
}

/// Where failing inputs are kept (committed).
pub fn regressions_dir(target: &str) -> PathBuf {
    repo_root().join("fuzz/regressions").join(target)
}

fn fixture_seed(name: &str) -> Result<Vec<Vec<u8>>> {
    let p = repo_root()
        .join("crates/simclr-interop/tests/fixtures")
        .join(name);
    Ok(vec![
        std::fs::read(&p).with_context(|| p.display().to_string())?
    ])
}

fn small_images(n: usize, side: usize) -> Vec<simclr_data::Image> {
    (0..n)
        .map(|k| {
            let data = (0..side * side)
                .map(|p| ((p * 37 + k * 91) % 251) as u8)
                .collect();
            simclr_data::Image::new(side, side, 1, data)
        })
        .collect()
}

fn seeds_idx(_: &Path) -> Result<Vec<Vec<u8>>> {
    use simclr_data::idx::encode_idx;
    let pixels: Vec<u8> = small_images(3, 6)
        .into_iter()
        .flat_map(|i| i.data)
        .collect();
    let images = encode_idx(&[3, 6, 6], &pixels);
    let labels = encode_idx(&[3], &[1, 0, 9]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&images)?;
    Ok(vec![images, labels, gz.finish()?])
}

fn seeds_cifar(_: &Path) -> Result<Vec<Vec<u8>>> {
    let record = |label: u8, k: usize| -> Vec<u8> {
        std::iter::once(label)
            .chain((0..3072).map(move |p| ((p * 13 + k * 7) % 256) as u8))
            .collect()
    };
    Ok(vec![[record(3, 0), record(9, 1)].concat(), record(0, 2)])
}

/// The committed Python 3 pickles of a CIFAR-10 test batch, protocols 2, 4 and 5.
fn seeds_cifar_py(_: &Path) -> Result<Vec<Vec<u8>>> {
    let fixtures = repo_root().join("crates/simclr-data/tests/fixtures");
    [2, 4, 5]
        .iter()
        .map(|p| {
            let f = fixtures.join(format!("cifar_py_p{p}/cifar-10-batches-py/test_batch"));
            std::fs::read(&f).with_context(|| format!("reading {}", f.display()))
        })
        .collect()
}

fn seeds_image(_: &Path) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let side = 12u32;
    let gray = image::GrayImage::from_fn(side, side, |x, y| image::Luma([(x * 17 + y * 5) as u8]));
    let rgba = image::RgbaImage::from_fn(side, side, |x, y| {
        image::Rgba([(x * 20) as u8, (y * 20) as u8, 90, 200])
    });
    for (img, format) in [
        (
            image::DynamicImage::ImageLuma8(gray.clone()),
            image::ImageFormat::Png,
        ),
        (
            image::DynamicImage::ImageRgba8(rgba),
            image::ImageFormat::Png,
        ),
        (
            image::DynamicImage::ImageLuma8(gray),
            image::ImageFormat::Jpeg,
        ),
        (
            image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(side, side, |x, y| {
                image::Rgb([(x * 9) as u8, (y * 11) as u8, ((x + y) * 7) as u8])
            })),
            image::ImageFormat::Jpeg,
        ),
    ] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, format)?;
        out.push(bytes.into_inner());
    }
    Ok(out)
}

/// Ten images of three classes, named `<class>_<k>.png` as ImageFolder names them.
fn split_dataset() -> simclr_data::InMemoryDataset {
    let labels: Vec<usize> = (0..10).map(|i| i % 3).collect();
    simclr_data::InMemoryDataset::new(
        small_images(10, 4),
        labels,
        vec!["n01".into(), "n02".into(), "n03".into()],
        "fuzz".into(),
    )
}

fn seeds_split(scratch: &Path) -> Result<Vec<Vec<u8>>> {
    let p = scratch.join("seed-split.txt");
    let ds = split_dataset();
    simclr_data::split::write_split_file(&p, &ds, &[0, 1, 2, 5, 9])?;
    let written = std::fs::read(&p)?;
    Ok(vec![written, b"\n\n".to_vec()])
}

fn seeds_checkpoint(scratch: &Path) -> Result<Vec<Vec<u8>>> {
    use simclr_models::checkpoint::{self, CheckpointMeta};
    let config = simclr_models::ModelConfig {
        resnet_depth: 18,
        base_width: 2,
        num_classes: Some(3),
        proj_out_dim: 4,
        ..Default::default()
    }
    .with_image_size(8);
    let varmap = candle_nn::VarMap::new();
    simclr_models::SimclrModel::init(&config, &varmap, 3, &candle_core::Device::Cpu)?;
    let p = scratch.join("seed.safetensors");
    checkpoint::save(
        &p,
        &varmap,
        &CheckpointMeta::new(config, "pretrain", 3).with_extra("note", "fuzz seed"),
    )?;
    Ok(vec![std::fs::read(&p)?])
}

fn seeds_tf_bundle(scratch: &Path) -> Result<Vec<Vec<u8>>> {
    // The data shard stays the fixture's; the index (the part with the parsing) is mutated.
    let src = repo_root().join("crates/simclr-interop/tests/fixtures/r18_1x_sk0_tf1");
    let dir = scratch.join("r18_1x_sk0");
    std::fs::create_dir_all(&dir)?;
    for name in ["checkpoint", "model.ckpt-1234.data-00000-of-00001"] {
        std::fs::copy(src.join(name), dir.join(name))
            .with_context(|| src.join(name).display().to_string())?;
    }
    Ok(vec![std::fs::read(src.join("model.ckpt-1234.index"))?])
}

fn seeds_parquet(scratch: &Path) -> Result<Vec<Vec<u8>>> {
    use arrow_array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray};
    use arrow_schema::{DataType, Field, Fields, Schema};
    let repo = scratch.join("hub/datasets--fuzz--fashion");
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), PARQUET_COMMIT)?;
    let pngs: Vec<Vec<u8>> = seeds_image(scratch)?.into_iter().take(2).collect();
    let fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let image = StructArray::new(
        fields.clone(),
        vec![
            Arc::new(BinaryArray::from_iter_values(
                pngs.iter().map(|b| b.as_slice()),
            )) as ArrayRef,
            Arc::new(StringArray::from_iter_values(pngs.iter().map(|_| "x.png"))),
        ],
        None,
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Struct(fields), true),
        Field::new("label", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(image) as ArrayRef,
            Arc::new(Int64Array::from_iter_values([0, 1])),
        ],
    )?;
    let mut bytes = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut bytes, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(vec![bytes])
}

/// Applies one to four random edits to `data`, with `corpus` as the source of splices.
fn mutate(rng: &mut ChaCha8Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>], max_len: usize) {
    const BYTES: [u8; 6] = [0, 1, 0x7f, 0x80, 0xfe, 0xff];
    const WORDS: [u64; 9] = [
        0,
        1,
        0x7f,
        0xffff,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        0x7fff_ffff_ffff_ffff,
        u64::MAX,
    ];
    for _ in 0..rng.random_range(1..=4) {
        let len = data.len();
        let at = if len == 0 {
            0
        } else {
            rng.random_range(0..len)
        };
        match rng.random_range(0..9) {
            0 | 1 if len > 0 => data[at] ^= 1 << rng.random_range(0..8),
            2 if len > 0 => data[at] = BYTES[rng.random_range(0..BYTES.len())],
            3 if len >= 4 => {
                let at = at.min(len - 4);
                let v = WORDS[rng.random_range(0..WORDS.len())] as u32;
                data[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            4 if len >= 8 => {
                let at = at.min(len - 8);
                let v = WORDS[rng.random_range(0..WORDS.len())];
                data[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            5 => data.truncate(at),
            6 if len > 0 => {
                let end = (at + rng.random_range(1..=64)).min(len);
                data.drain(at..end);
            }
            7 if len > 0 && len < max_len => {
                let end = (at + rng.random_range(1..=64)).min(len);
                let chunk: Vec<u8> = data[at..end].to_vec();
                let to = rng.random_range(0..=len);
                data.splice(to..to, chunk);
            }
            8 if !corpus.is_empty() => {
                let other = &corpus[rng.random_range(0..corpus.len())];
                if !other.is_empty() {
                    let from = rng.random_range(0..other.len());
                    data.truncate(at);
                    data.extend_from_slice(&other[from..]);
                }
            }
            _ => {
                let n = rng.random_range(1..=8);
                for _ in 0..n {
                    if data.len() < max_len {
                        let to = rng.random_range(0..=data.len());
                        data.insert(to, rng.random());
                    }
                }
            }
        }
    }
    data.truncate(max_len);
}

/// The child process: mutates and parses until `seconds` have passed. Panics are caught and
/// saved here; an abort or a hang ends the process, and the supervisor saves the input.
pub fn worker(name: &str, seconds: u64, seed: u64, scratch: &Path) -> Result<()> {
    let t = target(name)?;
    std::fs::create_dir_all(scratch)?;
    let input = scratch.join(t.input);
    if let Some(parent) = input.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let seeds = (t.seeds)(scratch)?;
    let max_len = 2 * seeds.iter().map(Vec::len).max().unwrap_or(1024).max(1024);
    // Panic messages of the parsers would flood the terminal; the saved inputs speak for them.
    std::panic::set_hook(Box::new(|_| {}));
    ALLOC_BOUND.store(ALLOC_LIMIT, Ordering::Relaxed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs = 0u64;
    let mut panics = 0u64;
    while Instant::now() < deadline {
        let mut data = seeds[rng.random_range(0..seeds.len())].clone();
        // One in twenty inputs is a seed as written: the parsers must take those too.
        if !runs.is_multiple_of(20) {
            mutate(&mut rng, &mut data, &seeds, max_len);
        }
        std::fs::write(&input, &data)?;
        let ok = std::panic::catch_unwind(|| (t.run)(scratch)).is_ok();
        runs += 1;
        if !ok {
            panics += 1;
            save_failure(t.name, "panic", &data)?;
        }
    }
    ALLOC_BOUND.store(usize::MAX, Ordering::Relaxed);
    println!("{name}: {runs} inputs, {panics} panics");
    Ok(())
}

/// Runs one saved input through `name`'s parser under the allocation bound, with panics
/// reported: how a failure found by the fuzzer is reproduced (and debugged).
pub fn replay(name: &str, input: &Path, scratch: &Path) -> Result<()> {
    let t = target(name)?;
    let dest = scratch.join(t.input);
    std::fs::create_dir_all(dest.parent().unwrap_or(scratch))?;
    (t.seeds)(scratch)?;
    std::fs::copy(input, &dest).with_context(|| input.display().to_string())?;
    ALLOC_BOUND.store(ALLOC_LIMIT, Ordering::Relaxed);
    (t.run)(scratch);
    ALLOC_BOUND.store(usize::MAX, Ordering::Relaxed);
    println!(
        "{name}: {} parsed without a panic or an abort",
        input.display()
    );
    Ok(())
}

/// Saves a failing input under [`regressions_dir`] as `<kind>-<sha256 prefix>`.
fn save_failure(target: &str, kind: &str, data: &[u8]) -> Result<PathBuf> {
    use sha2::Digest;
    let dir = regressions_dir(target);
    std::fs::create_dir_all(&dir)?;
    let hash: String = sha2::Sha256::digest(data)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = dir.join(format!("{kind}-{hash}"));
    std::fs::write(&path, data)?;
    Ok(path)
}

/// What one target's run found.
pub struct Outcome {
    pub target: String,
    pub runs: u64,
    pub panics: u64,
    pub aborts: u64,
    pub hangs: u64,
    pub seconds: f64,
}

/// Supervises worker processes for `seconds` on `name`, restarting them after an abort or a
/// hang (whose input it saves).
pub fn supervise(name: &str, seconds: u64, seed: u64) -> Result<Outcome> {
    let t = target(name)?;
    let scratch = tempfile_dir(name)?;
    let start = Instant::now();
    let mut outcome = Outcome {
        target: name.into(),
        runs: 0,
        panics: 0,
        aborts: 0,
        hangs: 0,
        seconds: 0.0,
    };
    let mut round = 0u64;
    loop {
        let left = seconds.saturating_sub(start.elapsed().as_secs());
        if left == 0 {
            break;
        }
        let mut child = spawn_worker(name, left, seed.wrapping_add(round), &scratch)?;
        round += 1;
        let input = scratch.join(t.input);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            let stale = std::fs::metadata(&input)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(HANG_SECONDS));
            if stale {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let out = child_output(&mut child);
        if let Some((runs, panics)) = parse_counts(&out) {
            outcome.runs += runs;
            outcome.panics += panics;
        }
        match status {
            Some(s) if s.success() => break,
            Some(s) => {
                outcome.aborts += 1;
                let data = std::fs::read(&input).unwrap_or_default();
                let p = save_failure(name, "abort", &data)?;
                eprintln!(
                    "{name}: the worker died ({s}); input kept as {}",
                    p.display()
                );
            }
            None => {
                outcome.hangs += 1;
                let data = std::fs::read(&input).unwrap_or_default();
                let p = save_failure(name, "hang", &data)?;
                eprintln!(
                    "{name}: an input ran over {HANG_SECONDS} s; kept as {}",
                    p.display()
                );
            }
        }
    }
    outcome.seconds = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(outcome)
}

fn tempfile_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("simclr-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn spawn_worker(name: &str, seconds: u64, seed: u64, scratch: &Path) -> Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["fuzz-worker", name, "--seconds"])
        .arg(seconds.to_string())
        .arg("--seed")
        .arg(seed.to_string())
        .arg("--scratch")
        .arg(scratch)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a fuzz worker")
}

fn child_output(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(out) = child.stdout.as_mut() {
        let _ = out.read_to_string(&mut s);
    }
    s
}

/// `<target>: <runs> inputs, <panics> panics` from a worker's output.
fn parse_counts(out: &str) -> Option<(u64, u64)> {
    let line = out.lines().rev().find(|l| l.contains(" inputs, "))?;
    let (_, rest) = line.split_once(": ")?;
    let mut nums = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>().ok());
    Some((nums.next()??, nums.next()??))
}

/// Runs `targets` (or every one, for `all`) for `seconds` each and prints a table; fails when
/// any input failed.
pub fn run(targets: &[String], seconds: u64, seed: u64) -> Result<()> {
    let names: Vec<String> = if targets.is_empty() || targets.iter().any(|t| t == "all") {
        TARGETS.iter().map(|s| s.to_string()).collect()
    } else {
        targets.to_vec()
    };
    for n in &names {
        target(n)?;
    }
    let mut failed = false;
    println!("| target | inputs | inputs/s | panics | aborts | hangs | seconds |");
    println!("|---|---|---|---|---|---|---|");
    for n in &names {
        let o = supervise(n, seconds, seed)?;
        failed |= o.panics + o.aborts + o.hangs > 0;
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {:.0} |",
            o.target,
            o.runs,
            o.runs as f64 / o.seconds.max(1e-9),
            o.panics,
            o.aborts,
            o.hangs,
            o.seconds
        );
    }
    if failed {
        bail!(
            "failing inputs were saved under {}: each is now a regression test (`cargo test -p xtask`)",
            repo_root().join("fuzz/regressions").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed and every saved failing input goes through its parser without a panic (an
    /// abort or a hang would fail the test run as well).
    #[test]
    fn saved_inputs_and_seeds_parse_without_panicking() {
        for name in TARGETS {
            let t = target(name).unwrap();
            let scratch = tempfile_dir(&format!("test-{name}")).unwrap();
            let input = scratch.join(t.input);
            std::fs::create_dir_all(input.parent().unwrap()).unwrap();
            let mut inputs: Vec<(String, Vec<u8>)> = (t.seeds)(&scratch)
                .unwrap()
                .into_iter()
                .enumerate()
                .map(|(i, s)| (format!("seed {i}"), s))
                .collect();
            assert!(!inputs.is_empty(), "{name}: no seed");
            if let Ok(entries) = std::fs::read_dir(regressions_dir(name)) {
                for e in entries.flatten() {
                    inputs.push((
                        e.path().display().to_string(),
                        std::fs::read(e.path()).unwrap(),
                    ));
                }
            }
            for (what, data) in inputs {
                std::fs::write(&input, &data).unwrap();
                let r = std::panic::catch_unwind(|| (t.run)(&scratch));
                assert!(r.is_ok(), "{name}: {what} panicked");
            }
            std::fs::remove_dir_all(&scratch).unwrap();
        }
    }

    /// The seeds are files the parsers accept: a fuzzer that only ever fed them garbage would
    /// never reach the code past the first check.
    #[test]
    fn seeds_are_accepted_by_their_parsers() {
        let scratch = tempfile_dir("seeds").unwrap();
        let idx = seeds_idx(&scratch).unwrap();
        for (i, s) in idx.iter().enumerate() {
            let p = scratch.join(format!("s{i}-idx"));
            std::fs::write(&p, s).unwrap();
            simclr_data::idx::read_idx(&p).unwrap();
        }
        for s in seeds_image(&scratch).unwrap() {
            let p = scratch.join("s.img");
            std::fs::write(&p, s).unwrap();
            simclr_data::folder::decode_image_file(&p).unwrap();
        }
        let split = seeds_split(&scratch).unwrap();
        let p = scratch.join("s.txt");
        std::fs::write(&p, &split[0]).unwrap();
        assert_eq!(
            simclr_data::split::read_split_file(&p, &split_dataset()).unwrap(),
            [0, 1, 2, 5, 9]
        );
        let ck = seeds_checkpoint(&scratch).unwrap();
        let p = scratch.join("c.safetensors");
        std::fs::write(&p, &ck[0]).unwrap();
        simclr_models::checkpoint::load(&p, &candle_core::Device::Cpu).unwrap();
        let t = target("parquet").unwrap();
        let pq = (t.seeds)(&scratch).unwrap();
        let p = scratch.join(t.input);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &pq[0]).unwrap();
        let opts = simclr_data::hub::HubOptions {
            cache_dir: Some(scratch.join("hub")),
            offline: true,
            revision: None,
            ..Default::default()
        };
        let ds = simclr_data::hub::read_hub_dataset("fuzz/fashion", "test", &opts).unwrap();
        assert_eq!(simclr_data::Dataset::len(&ds), 2);
        simclr_data::Dataset::image(&ds, 1).unwrap();
        let t = target("tf-bundle").unwrap();
        let tf = (t.seeds)(&scratch).unwrap();
        std::fs::write(scratch.join(t.input), &tf[0]).unwrap();
        simclr_interop::import_tf1(
            scratch.join("r18_1x_sk0/model.ckpt-1234"),
            false,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        std::fs::remove_dir_all(&scratch).unwrap();
    }

    #[test]
    fn mutations_stay_within_the_size_bound_and_change_the_input() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let seed: Vec<u8> = (0..200u8).collect();
        let mut changed = 0;
        for _ in 0..500 {
            let mut d = seed.clone();
            mutate(&mut rng, &mut d, std::slice::from_ref(&seed), 300);
            assert!(d.len() <= 300);
            changed += usize::from(d != seed);
        }
        assert!(
            changed > 450,
            "{changed} of 500 mutated inputs differ from the seed"
        );
    }

    #[test]
    fn worker_counts_are_read_back() {
        assert_eq!(
            parse_counts("idx: 1234 inputs, 2 panics\n"),
            Some((1234, 2))
        );
        assert_eq!(parse_counts("nothing"), None);
    }
}
