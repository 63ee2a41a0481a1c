//! The matrix-product peak of this machine, as the training step's floor needs it: GFLOP/s of
//! one square product (2·n³ FLOPs) in f32 (`matrix::gemm_f32`, what the f32 convolutions run)
//! and with bf16 operands (`gemm_bf16`, on AMX tiles where the CPU has them), median of timed
//! products after a warm-up one. `bench/torch_bench.py` times `torch.mm` on the same sizes.
//! `cargo bench -p simclr-kernels --bench gemm [-- gemm-2048 gemm-2048-bf16]`.

use gemm::Parallelism;
use simclr_kernels::gemm_bf16::{bf16_engine, gemm_bf16};
use simclr_kernels::matrix::{gemm_f32, Mat, MatMut};

/// Side of the square products: large enough that packing is a small share of the time.
const SIDE: usize = 2048;

fn bench(scenario: &str, bf16: bool, runs: usize) {
    if !simclr_bench::selected(scenario) {
        return;
    }
    let n = SIDE;
    // Values of one sign and modest size, so that no product can overflow or cancel to
    // subnormals and slow a path down.
    let fill = |seed: usize| -> Vec<f32> {
        (0..n * n)
            .map(|i| ((i * 7 + seed * 13) % 97) as f32 / 97.0 + 0.5)
            .collect()
    };
    let (a, b) = (fill(1), fill(2));
    let mut c = vec![0f32; n * n];
    let threads = simclr_bench::threads();
    let par = Parallelism::Rayon(threads);
    let (t, peak) = simclr_bench::time_steps(1, runs, || {
        let (a, b, dst) = (Mat::rows(&a, n), Mat::rows(&b, n), MatMut::rows(&mut c, n));
        if bf16 {
            gemm_bf16((n, n, n), dst, false, a, b, par);
        } else {
            gemm_f32((n, n, n), dst, false, a, b, par);
        }
    });
    // A product that did not run would leave zeros; every true element is positive.
    assert!(
        c.iter().all(|&x| x > 0.0),
        "{scenario}: product not computed"
    );
    let what = if bf16 {
        format!(
            "matrix product {n}³, bf16 operands ({:?} engine)",
            bf16_engine()
        )
    } else {
        format!("matrix product {n}³, f32")
    };
    let figure = simclr_bench::Figure {
        scenario: scenario.into(),
        images_per_s: 2.0 * (n as f64).powi(3) / t / 1e9,
        seconds_per_step: t,
        peak_rss_mib: peak,
        threads,
        unit: Some("GFLOP/s".into()),
    };
    simclr_bench::report(&what, &figure);
}

fn main() {
    simclr_bench::tune_allocator();
    bench("gemm-2048", false, 5);
    bench("gemm-2048-bf16", true, 5);
}
