//! The bf16 products against float64: on AMX (where this CPU has it) and on the portable engine,
//! odd sizes, every layout of each operand, with and without accumulation.

use candle_core::{DType, Device, Tensor};
use gemm::Parallelism;
use simclr_kernels::gemm_bf16::{
    bf16_engine, gemm_bf16_with, round_bf16, to_bf16_bits, Bf16Engine, Mat, MatMut,
};

/// A deterministic pseudo-random stream in [-1, 1) with full f32 mantissas (so that rounding to
/// bf16 changes almost every value).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// The engines this machine runs. `SIMCLR_REQUIRE_AMX=1` makes a machine that should have AMX
/// (`amx_bf16` in `/proc/cpuinfo`) fail instead of quietly testing the portable engine alone.
fn engines() -> Vec<Bf16Engine> {
    let mut e = vec![Bf16Engine::Rounded];
    if bf16_engine() == Bf16Engine::Amx {
        e.push(Bf16Engine::Amx);
    } else {
        assert!(
            std::env::var("SIMCLR_REQUIRE_AMX").map_or(true, |v| v != "1"),
            "SIMCLR_REQUIRE_AMX=1 but the AMX engine is not available"
        );
    }
    e
}

/// Strides and slice length of an `rows × cols` matrix stored row-major (0), column-major (1)
/// or with no unit stride (2: every other element of padded rows), with a padded leading
/// dimension so that a stride mix-up reads the wrong elements, and 7 more elements at the end
/// that no stride addresses.
fn strides(rows: usize, cols: usize, layout: u32) -> (usize, usize, usize) {
    let (rs, cs) = match layout {
        0 => (cols + 5, 1),
        1 => (1, rows + 3),
        _ => (2 * cols + 3, 2),
    };
    (rs, cs, (rows - 1) * rs + (cols - 1) * cs + 1 + 7)
}

#[test]
fn bf16_products_match_float64_of_the_rounded_operands() {
    println!("engines: {:?}", engines());
    let shapes = [
        (1, 1, 1),
        (16, 16, 32),
        (17, 15, 33),
        (40, 70, 9),
        (3, 100, 144),
        (70, 33, 200),
        (33, 64, 17),
    ];
    let mut case = 0u64;
    for engine in engines() {
        for &(m, n, k) in &shapes {
            for layout in 0..27u32 {
                let (a_cm, b_cm, d_cm) = (layout % 3, (layout / 3) % 3, layout / 9);
                for accumulate in [false, true] {
                    case += 1;
                    let (ars, acs, alen) = strides(m, k, a_cm);
                    let (brs, bcs, blen) = strides(k, n, b_cm);
                    let (drs, dcs, dlen) = strides(m, n, d_cm);
                    let a = values(alen, case);
                    let b = values(blen, case + 1000);
                    let d0 = values(dlen, case + 2000);
                    let mut d = d0.clone();
                    gemm_bf16_with(
                        engine,
                        (m, n, k),
                        MatMut {
                            data: &mut d,
                            rs: drs,
                            cs: dcs,
                        },
                        accumulate,
                        Mat {
                            data: &a,
                            rs: ars,
                            cs: acs,
                        },
                        Mat {
                            data: &b,
                            rs: brs,
                            cs: bcs,
                        },
                        if case.is_multiple_of(2) {
                            Parallelism::None
                        } else {
                            Parallelism::Rayon(2)
                        },
                    );
                    for r in 0..m {
                        for c in 0..n {
                            let mut want = if accumulate {
                                d0[r * drs + c * dcs] as f64
                            } else {
                                0.0
                            };
                            let mut scale = want.abs();
                            for i in 0..k {
                                let p = round_bf16(a[r * ars + i * acs]) as f64
                                    * round_bf16(b[i * brs + c * bcs]) as f64;
                                want += p;
                                scale += p.abs();
                            }
                            let got = d[r * drs + c * dcs] as f64;
                            // f32 accumulation: each addition rounds by at most 2^-24 of the
                            // running sum, bounded by the sum of the magnitudes.
                            let tol = (k as f64 + 1.0) * scale * 6e-8 + 1e-30;
                            assert!(
                                (got - want).abs() <= tol,
                                "{engine:?} {m}x{n}x{k} layout {layout} acc {accumulate}: \
                                 ({r}, {c}) = {got}, float64 says {want} (tol {tol:e})"
                            );
                        }
                    }
                    // Elements the strides do not address are left alone.
                    let addressed: std::collections::HashSet<usize> = (0..m)
                        .flat_map(|r| (0..n).map(move |c| r * drs + c * dcs))
                        .collect();
                    for (i, (x, y)) in d.iter().zip(&d0).enumerate() {
                        if !addressed.contains(&i) {
                            assert_eq!(x.to_bits(), y.to_bits(), "{engine:?}: element {i} written");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_operands_really_are_rounded_to_bf16() {
    // 1 + 2^-10 is 1 in bf16 (7 mantissa bits): the bf16 product of [1 + 2^-10] and [3] is 3
    // exactly, where the f32 product is 3.0029297.
    for engine in engines() {
        let a = [1.0 + 2f32.powi(-10)];
        let b = [3.0f32];
        let mut d = [0f32];
        gemm_bf16_with(
            engine,
            (1, 1, 1),
            MatMut {
                data: &mut d,
                rs: 1,
                cs: 1,
            },
            false,
            Mat {
                data: &a,
                rs: 1,
                cs: 1,
            },
            Mat {
                data: &b,
                rs: 1,
                cs: 1,
            },
            Parallelism::None,
        );
        assert_eq!(d[0], 3.0, "{engine:?}");
    }
}

#[test]
fn the_engines_agree_and_threads_do_not_change_the_bits() {
    let (m, n, k) = (90, 77, 300);
    let a = values(m * k, 7);
    let b = values(k * n, 8);
    let run = |engine, par| {
        let mut d = vec![0f32; m * n];
        gemm_bf16_with(
            engine,
            (m, n, k),
            MatMut {
                data: &mut d,
                rs: n,
                cs: 1,
            },
            false,
            Mat {
                data: &a,
                rs: k,
                cs: 1,
            },
            Mat {
                data: &b,
                rs: n,
                cs: 1,
            },
            par,
        );
        d
    };
    for engine in engines() {
        let one = run(engine, Parallelism::None);
        let two = run(engine, Parallelism::Rayon(2));
        assert!(
            one.iter()
                .zip(&two)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{engine:?}: the thread count changed the result"
        );
    }
    let amx = run(bf16_engine(), Parallelism::None);
    let rounded = run(Bf16Engine::Rounded, Parallelism::None);
    let worst = amx
        .iter()
        .zip(&rounded)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "the engines differ by {worst}");
}

#[test]
fn rounding_to_bf16_matches_candles_conversion() {
    // Ties (the halfway bit set with nothing below it), values just either side, subnormals,
    // infinities and the largest finite values.
    let mut xs: Vec<f32> = values(4096, 99);
    for bits in [
        0x3f80_8000u32, // 1 + 2^-8: a tie, rounds to even (down)
        0x3f81_8000,    // a tie that rounds up
        0x3f80_8001,
        0x3f80_7fff,
        0x0000_0001,
        0x807f_ffff,
        0x7f7f_ffff,
        0xff7f_ffff,
        0x7f80_0000,
        0xff80_0000,
    ] {
        xs.push(f32::from_bits(bits));
    }
    let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
    let candle: Vec<f32> = t
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (x, want) in xs.iter().zip(&candle) {
        assert_eq!(
            round_bf16(*x).to_bits(),
            want.to_bits(),
            "{x:e} ({:#010x})",
            x.to_bits()
        );
    }
    assert!(round_bf16(f32::NAN).is_nan());
    assert_eq!(to_bf16_bits(1.0), 0x3f80);
}

#[test]
fn a_packed_left_operand_serves_many_right_operands() {
    // A convolution packs its kernel once and multiplies it with each chunk of the batch: each
    // product must equal the one-shot product bit for bit, on both engines and for the
    // transposed kernel (strided, as the input gradient reads it).
    use simclr_kernels::gemm_bf16::PackedLhs;
    let (m, k) = (40, 150);
    let w = values(m * k, 21);
    for engine in engines() {
        for (rs, cs, rows, cols) in [(k, 1, m, k), (1, k, k, m)] {
            let a = Mat { data: &w, rs, cs };
            let lhs = PackedLhs::with_engine(engine, a, rows, cols);
            for (n, seed) in [(1, 30), (37, 31), (200, 32)] {
                let b = values(cols * n, seed);
                let bm = Mat {
                    data: &b,
                    rs: n,
                    cs: 1,
                };
                let mut once = vec![0f32; rows * n];
                let mut packed = vec![1f32; rows * n];
                gemm_bf16_with(
                    engine,
                    (rows, n, cols),
                    MatMut {
                        data: &mut once,
                        rs: n,
                        cs: 1,
                    },
                    false,
                    a,
                    bm,
                    Parallelism::None,
                );
                let dst = MatMut {
                    data: &mut packed,
                    rs: n,
                    cs: 1,
                };
                lhs.gemm(n, dst, false, bm, Parallelism::Rayon(2));
                assert!(
                    once.iter()
                        .zip(&packed)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{engine:?} {rows}x{n}x{cols}"
                );
            }
        }
    }
}

#[test]
fn products_nested_in_parallel_tasks_are_right() {
    // Convolutions run their chunks' products inside rayon tasks, and a thread waiting in one
    // parallel product may run another task's product (work stealing): each must use its own
    // packed operands and tile state.
    use rayon::prelude::*;
    let (m, n, k) = (50, 45, 70);
    for engine in engines() {
        let results: Vec<(Vec<f32>, Vec<f32>)> = (0..8u64)
            .into_par_iter()
            .map(|t| {
                let a = values(m * k, 100 + t);
                let b = values(k * n, 200 + t);
                let run = |par| {
                    let mut d = vec![0f32; m * n];
                    let dst = MatMut {
                        data: &mut d,
                        rs: n,
                        cs: 1,
                    };
                    gemm_bf16_with(
                        engine,
                        (m, n, k),
                        dst,
                        false,
                        Mat::rows(&a, k),
                        Mat::rows(&b, n),
                        par,
                    );
                    d
                };
                (run(Parallelism::Rayon(2)), run(Parallelism::None))
            })
            .collect();
        for (t, (nested, alone)) in results.iter().enumerate() {
            assert!(
                nested
                    .iter()
                    .zip(alone)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{engine:?}: task {t} differs when nested"
            );
        }
    }
}
