//! `cargo xtask bench`: every benchmark scenario in a process of its own (so that its peak
//! memory is its own), optionally beside stock candle (`--stock`: candle's convolution and BN
//! ops, the system allocator) and PyTorch (`--compare`: `bench/torch_bench.py`, run alternately
//! with ours), then one table of images/s, ratios and peak memory.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use simclr_bench::{Figure, PREFIX};

/// (scenario, package, bench target, has a PyTorch twin).
const SCENARIOS: &[(&str, &str, &str, bool)] = &[
    ("pretrain-r18-cifar-32", "simclr-pretrain", "step", true),
    ("pretrain-r18w16-28", "simclr-pretrain", "step", true),
    ("eval-r18-cifar-32", "simclr-models", "forward", true),
    ("eval-r50-224", "simclr-models", "forward", true),
    ("data-28", "simclr-data", "data_pipeline", true),
    ("data-28-all-cores", "simclr-data", "data_pipeline", false),
    ("data-224", "simclr-data", "data_pipeline", true),
    ("data-224-all-cores", "simclr-data", "data_pipeline", false),
    ("data-224-jpeg", "simclr-data", "data_pipeline", true),
];

/// What `cargo xtask bench` was asked for.
pub struct BenchOptions {
    pub scenarios: Vec<String>,
    pub compare: bool,
    pub stock: bool,
    pub python: String,
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs `cmd` and returns the figure it printed on its `BENCH` line.
fn figure_of(mut cmd: Command, what: &str) -> Result<Figure> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
    for line in stdout.lines() {
        if let Some(json) = line.strip_prefix(PREFIX) {
            return serde_json::from_str(json).with_context(|| format!("{what}: bad figure line"));
        }
        // The PyTorch script prints its JSON bare.
        if line.starts_with('{') {
            return serde_json::from_str(line).with_context(|| format!("{what}: bad JSON"));
        }
    }
    bail!("{what} printed no figure")
}

fn ours(scenario: &str, package: &str, target: &str, stock: bool) -> Result<Figure> {
    let mut cmd = Command::new(cargo());
    cmd.args([
        "bench", "-q", "-p", package, "--bench", target, "--", scenario,
    ]);
    if stock {
        cmd.env("SIMCLR_CONV", "candle")
            .env("SIMCLR_BN", "candle")
            .env("SIMCLR_ALLOCATOR", "system");
    }
    let what = format!(
        "{scenario} ({})",
        if stock { "stock candle" } else { "simclr-rs" }
    );
    figure_of(cmd, &what)
}

fn torch(python: &str, scenario: &str) -> Result<Figure> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/torch_bench.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script).arg(scenario);
    figure_of(cmd, &format!("{scenario} (PyTorch)"))
}

/// Runs the benchmarks and prints the table.
pub fn run(opts: &BenchOptions) -> Result<()> {
    let names: Vec<_> = SCENARIOS.iter().map(|s| s.0).collect();
    if let Some(bad) = opts.scenarios.iter().find(|n| !names.contains(&n.as_str())) {
        bail!("no scenario {bad:?}; known: {}", names.join(", "))
    }
    let chosen: Vec<_> = SCENARIOS
        .iter()
        .filter(|s| opts.scenarios.is_empty() || opts.scenarios.iter().any(|n| n == s.0))
        .collect();
    // Build first, so that the timed runs do not compete with the compiler.
    let mut packages: Vec<&str> = chosen.iter().map(|s| s.1).collect();
    packages.sort_unstable();
    packages.dedup();
    let mut build = Command::new(cargo());
    build.args(["bench", "--no-run", "-q"]);
    for p in &packages {
        build.args(["-p", p]);
    }
    if !build.status().context("building the benchmarks")?.success() {
        bail!("building the benchmarks failed")
    }
    println!(
        "| scenario | stock candle | simclr-rs | PyTorch | simclr-rs / PyTorch | peak MiB (ours / stock / PyTorch) |"
    );
    println!("|---|---|---|---|---|---|");
    for &&(scenario, package, target, twin) in &chosen {
        let mine = ours(scenario, package, target, false)?;
        let theirs = if opts.compare && twin {
            Some(torch(&opts.python, scenario)?)
        } else {
            None
        };
        let stock = if opts.stock {
            Some(ours(scenario, package, target, true)?)
        } else {
            None
        };
        let rate = |f: &Option<Figure>| {
            f.as_ref()
                .map_or("–".to_string(), |f| format!("{:.1}", f.images_per_s))
        };
        let mem = |f: &Option<Figure>| {
            f.as_ref()
                .map_or("–".to_string(), |f| format!("{:.0}", f.peak_rss_mib))
        };
        let ratio = theirs.as_ref().map_or("–".to_string(), |t| {
            format!("{:.2}×", mine.images_per_s / t.images_per_s)
        });
        println!(
            "| {scenario} ({} thr) | {} | {:.1} | {} | {ratio} | {:.0} / {} / {} |",
            mine.threads,
            rate(&stock),
            mine.images_per_s,
            rate(&theirs),
            mine.peak_rss_mib,
            mem(&stock),
            mem(&theirs),
        );
    }
    Ok(())
}
