//! What the benchmarks of simclr-rs share, and nothing else: which scenarios a bench binary
//! was asked to run, the median of timed repetitions, the process's peak memory, the
//! figure line that `cargo xtask bench` collects, and the process-wide allocator setting
//! ([`tune_allocator`]) that the `simclr` binary runs with, so that a benchmark measures what
//! training runs.
//!
//! A bench binary (`harness = false`) runs every scenario when given no name, or the scenarios
//! named on its command line (`cargo bench -p simclr-pretrain --bench step -- pretrain-r18-cifar-32`).
//! Each scenario prints one line for people and one `BENCH {json}` line ([`Figure`]) for
//! `xtask`, which runs every scenario in a process of its own so that peak memory is that
//! scenario's alone.

use serde::{Deserialize, Serialize};

mod allocator;

pub use allocator::tune_allocator;

/// The prefix of the machine-readable line.
pub const PREFIX: &str = "BENCH ";

/// One measured figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    /// Scenario name, shared with `bench/torch_bench.py`.
    pub scenario: String,
    /// Median images per second (an image of a two-view scenario counts once), or of what
    /// [`Figure::unit`] names instead.
    pub images_per_s: f64,
    /// Median seconds per step (or per batch).
    pub seconds_per_step: f64,
    /// Peak resident memory of the process since the scenario started, MiB.
    pub peak_rss_mib: f64,
    /// Worker threads.
    pub threads: usize,
    /// What `images_per_s` counts where it is not images (the matrix-product scenarios:
    /// `GFLOP/s`); absent for images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

impl Figure {
    /// The unit of the rate: `images/s` unless the scenario named another.
    pub fn rate_unit(&self) -> &str {
        self.unit.as_deref().unwrap_or("images/s")
    }
}

/// Whether `scenario` was asked for: no names on the command line (cargo's own `--bench`
/// flag aside) means every scenario.
pub fn selected(scenario: &str) -> bool {
    let names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    names.is_empty() || names.iter().any(|n| n == scenario)
}

/// The median of `v` (the upper one for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Starts a peak-memory window: Linux resets the high-water mark to the current resident size
/// when `5` is written to `/proc/self/clear_refs`. Elsewhere nothing happens and the peak is the
/// process's.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory (`VmHWM`) in MiB, NaN where `/proc` has no answer.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Prints `figure` for people (with `what` as the description) and as a `BENCH` line.
pub fn report(what: &str, figure: &Figure) {
    println!(
        "{what:<56} {:>9.1} {}  {:>7.3} s/step  peak {:>6.0} MiB  ({} threads)",
        figure.images_per_s,
        figure.rate_unit(),
        figure.seconds_per_step,
        figure.peak_rss_mib,
        figure.threads
    );
    if let Ok(json) = serde_json::to_string(figure) {
        println!("{PREFIX}{json}");
    }
}

/// Times `runs` calls of `step` after `warmup` untimed ones, inside a fresh peak-memory
/// window; returns (median seconds per call, peak MiB).
pub fn time_steps(warmup: usize, runs: usize, mut step: impl FnMut()) -> (f64, f64) {
    reset_peak_rss();
    let mut times = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let t = std::time::Instant::now();
        step();
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    (median(times), peak_rss_mib())
}

/// The number of rayon/worker threads a CPU scenario uses: `RAYON_NUM_THREADS` or every core.
pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::Figure;

    #[test]
    fn a_figure_without_a_unit_counts_images_and_one_with_a_unit_keeps_it() {
        // The PyTorch script's lines carry extra fields and, for images, no unit.
        let images: Figure = serde_json::from_str(
            r#"{"scenario": "data-28", "images_per_s": 10.0, "seconds_per_step": 0.1,
                "peak_rss_mib": 5.0, "threads": 1, "torch": "2.15"}"#,
        )
        .unwrap();
        assert_eq!(images.rate_unit(), "images/s");
        assert!(!serde_json::to_string(&images).unwrap().contains("unit"));
        let flops = Figure {
            unit: Some("GFLOP/s".into()),
            ..images
        };
        let back: Figure = serde_json::from_str(&serde_json::to_string(&flops).unwrap()).unwrap();
        assert_eq!(back.rate_unit(), "GFLOP/s");
    }
}
