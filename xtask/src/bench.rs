//! `cargo xtask bench`: every benchmark scenario in a process of its own (so that its peak
//! memory is its own), optionally beside stock candle (`--stock`: candle's convolution and BN
//! ops, the system allocator) and PyTorch (`--compare`: `bench/torch_bench.py`, run alternately
//! with ours), then one table of rates (images/s, or GFLOP/s for the matrix products), ratios
//! and peak memory.

use std::process::Command;

use anyhow::{bail, Context, Result};
use simclr_bench::{Figure, PREFIX};

/// (scenario, package, bench target, has a PyTorch twin).
const SCENARIOS: &[(&str, &str, &str, bool)] = &[
    ("pretrain-r18-cifar-32", "simclr-pretrain", "step", true),
    ("pretrain-r18w16-28", "simclr-pretrain", "step", true),
    (
        "pretrain-r18-cifar-32-bf16",
        "simclr-pretrain",
        "step",
        true,
    ),
    ("pretrain-r18w16-28-bf16", "simclr-pretrain", "step", true),
    ("eval-r18-cifar-32", "simclr-models", "forward", true),
    ("eval-r50-224", "simclr-models", "forward", true),
    ("data-28", "simclr-data", "data_pipeline", true),
    ("data-28-all-cores", "simclr-data", "data_pipeline", false),
    ("data-224", "simclr-data", "data_pipeline", true),
    ("data-224-all-cores", "simclr-data", "data_pipeline", false),
    ("data-224-jpeg", "simclr-data", "data_pipeline", true),
    ("gemm-2048", "simclr-kernels", "gemm", true),
    ("gemm-2048-bf16", "simclr-kernels", "gemm", true),
];

/// What `cargo xtask bench` was asked for.
pub struct BenchOptions {
    pub scenarios: Vec<String>,
    pub compare: bool,
    pub stock: bool,
    pub python: String,
    /// Rounds of the alternation.
    pub rounds: usize,
    /// Compare an f32 pretraining step with PyTorch's two f32 settings only.
    pub f32_only: bool,
}

/// The PyTorch settings an f32 pretraining scenario is compared with on the CPU: its default
/// NCHW f32 and `channels_last` f32, and (unless `--f32-only`) [`TORCH_PRETRAIN_BF16`].
const TORCH_PRETRAIN_F32: [(&str, &[&str]); 2] = [
    ("PyTorch NCHW f32", &[]),
    ("PyTorch channels_last f32", &["--channels-last"]),
];

/// PyTorch's bf16 autocast over f32 master weights with `channels_last` (what a PyTorch user
/// would reach for first to go faster): the opponent of a `-bf16` pretraining scenario.
const TORCH_PRETRAIN_BF16: (&str, &[&str]) = (
    "PyTorch bf16 autocast + channels_last",
    &["--precision", "bf16", "--channels-last"],
);

/// `median (min–max)` of `v`.
fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let m = simclr_bench::median(v.to_vec());
    if v.len() > 1 {
        format!("{m:.2}× ({lo:.2}–{hi:.2})")
    } else {
        format!("{m:.2}×")
    }
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

fn torch(python: &str, scenario: &str, args: &[&str], what: &str) -> Result<Figure> {
    let script = crate::workspace_root().join("bench/torch_bench.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script).arg(scenario).args(args);
    figure_of(cmd, &format!("{scenario} ({what})"))
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
        "| scenario | against | simclr-rs rate | its rate | simclr-rs / it, median (range) over {} round(s) | peak MiB (ours / it) |",
        opts.rounds
    );
    println!("|---|---|---|---|---|---|");
    for &&(scenario, package, target, twin) in &chosen {
        // The other side's settings: PyTorch's three for a pretraining step, its one otherwise,
        // and stock candle.
        let mut others: Vec<(String, Option<&[&str]>)> = Vec::new();
        // A `-bf16` scenario is ours with `--precision bf16`, against PyTorch's bf16 setting of
        // the same workload.
        let (torch_scenario, bf16) = match scenario.strip_suffix("-bf16") {
            Some(base) => (base, true),
            None => (scenario, false),
        };
        if opts.compare && twin {
            if bf16 && scenario.starts_with("pretrain-") {
                let (name, args) = TORCH_PRETRAIN_BF16;
                others.push((name.to_string(), Some(args)));
            } else if bf16 {
                others.push((
                    "PyTorch bf16".to_string(),
                    Some(&["--precision", "bf16"][..]),
                ));
            } else if scenario.starts_with("pretrain-") {
                let bf16 = (!opts.f32_only).then_some(TORCH_PRETRAIN_BF16);
                for (name, args) in TORCH_PRETRAIN_F32.into_iter().chain(bf16) {
                    others.push((name.to_string(), Some(args)));
                }
            } else {
                others.push(("PyTorch".to_string(), Some(&[][..])));
            }
        }
        if opts.stock {
            others.push(("stock candle".to_string(), None));
        }
        // Alternate: ours, each other, ours, … so that drift of the machine's speed falls on
        // both sides of every ratio alike.
        let mut mine: Vec<Figure> = Vec::new();
        let mut theirs: Vec<Vec<Figure>> = vec![Vec::new(); others.len()];
        for _ in 0..opts.rounds {
            let m = ours(scenario, package, target, false)?;
            eprintln!(
                "{scenario}: simclr-rs {:.1} {}",
                m.images_per_s,
                m.rate_unit()
            );
            mine.push(m);
            for ((name, args), got) in others.iter().zip(theirs.iter_mut()) {
                let f = match args {
                    Some(a) => torch(&opts.python, torch_scenario, a, name)?,
                    None => ours(scenario, package, target, true)?,
                };
                eprintln!("{scenario}: {name} {:.1} {}", f.images_per_s, f.rate_unit());
                got.push(f);
            }
        }
        let rates = |v: &[Figure]| v.iter().map(|f| f.images_per_s).collect::<Vec<_>>();
        let my_rates = rates(&mine);
        let peak = |v: &[Figure]| simclr_bench::median(v.iter().map(|f| f.peak_rss_mib).collect());
        let threads = mine.first().map_or(0, |f| f.threads);
        let unit = mine
            .first()
            .map_or("images/s", |f| f.rate_unit())
            .to_string();
        // A ratio of two rates in different units would be meaningless.
        if let Some(f) = theirs.iter().flatten().find(|f| f.rate_unit() != unit) {
            bail!(
                "{scenario}: the other side measured {} where simclr-rs measured {unit}",
                f.rate_unit()
            )
        }
        if others.is_empty() {
            println!(
                "| {scenario} ({threads} thr) | – | {:.1} {unit} | – | – | {:.0} / – |",
                simclr_bench::median(my_rates.clone()),
                peak(&mine)
            );
        }
        for ((name, _), got) in others.iter().zip(&theirs) {
            let ratios: Vec<f64> = my_rates
                .iter()
                .zip(rates(got))
                .map(|(a, b)| a / b)
                .collect();
            println!(
                "| {scenario} ({threads} thr) | {name} | {:.1} {unit} | {:.1} {unit} | {} | {:.0} / {:.0} |",
                simclr_bench::median(my_rates.clone()),
                simclr_bench::median(rates(got)),
                spread(&ratios),
                peak(&mine),
                peak(got)
            );
        }
        // Against PyTorch's best f32 setting of each round (NCHW or channels_last).
        let f32_sides: Vec<&Vec<Figure>> = others
            .iter()
            .zip(&theirs)
            .filter(|((name, args), _)| args.is_some() && name.contains("f32"))
            .map(|(_, got)| got)
            .collect();
        if f32_sides.len() > 1 {
            let ratios: Vec<f64> = (0..opts.rounds)
                .map(|r| {
                    let best = f32_sides
                        .iter()
                        .map(|v| v[r].images_per_s)
                        .fold(0.0, f64::max);
                    my_rates[r] / best
                })
                .collect();
            println!(
                "| {scenario} ({threads} thr) | PyTorch's best f32 of each round | {:.1} {unit} | – | {} | – |",
                simclr_bench::median(my_rates.clone()),
                spread(&ratios)
            );
        }
    }
    Ok(())
}
