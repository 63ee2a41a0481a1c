//! Matrix products with bf16 operands and f32 accumulation on the CPU: the products of
//! `--precision bf16`, on Intel AMX where the CPU has it.
//!
//! Why: bf16 halves the bits of each operand, and CPUs with AMX (Intel Sapphire Rapids and
//! later) multiply bf16 tiles in a unit of their own (one `tdpbf16ps` is a 16×16×32 product
//! accumulated in f32; a stream of them ran at about 1.5 TFLOP/s on one core of the session-14
//! VM, `docs/performance.md`). The operands stay f32 in memory (the activations, the
//! unfolded windows and the gradients of the convolutions); each product rounds them to bf16
//! (round to nearest even) as it packs them into tiles, and accumulates in f32, which is what a
//! GPU's tensor cores do with bf16 inputs. The result is f32 and is not rounded.
//!
//! Where the CPU has no AMX (or the environment variable `SIMCLR_AMX=0` turns it off) the same
//! numerics are computed by rounding copies of the operands to bf16 and multiplying them with
//! the f32 GEMM: a product of two bf16 values is exact in f32, so the two paths differ only in
//! the order of the f32 additions, and in subnormal values (below 1.2e-38), which AMX's
//! conversion and accumulation flush to zero. The tests compare both against float64.
//!
//! AMX needs the kernel's permission for the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`,
//! Linux 5.16 and later), requested once per process; AMX intrinsics are not stable Rust, so the
//! handful of tile instructions are written as inline assembly.

use std::sync::OnceLock;

use gemm::Parallelism;

use crate::matrix::{check_product, gemm_f32, last_index};
pub use crate::matrix::{Mat, MatMut};

/// `x` rounded to the nearest bf16 (ties to even), as the top 16 bits of an f32. NaN stays NaN.
#[inline(always)]
pub fn to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to the nearest bf16 value, as an f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((to_bf16_bits(x) as u32) << 16)
}

/// Which engine [`gemm_bf16`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Engine {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// Operands rounded to bf16, then the f32 GEMM.
    Rounded,
}

/// The engine [`gemm_bf16`] uses in this process: AMX when the CPU has AMX-BF16 and the kernel
/// grants the tile state, unless `SIMCLR_AMX=0`.
pub fn bf16_engine() -> Bf16Engine {
    static ENGINE: OnceLock<Bf16Engine> = OnceLock::new();
    *ENGINE.get_or_init(|| {
        let off = std::env::var("SIMCLR_AMX").is_ok_and(|v| v == "0");
        if !off && amx::enable() {
            Bf16Engine::Amx
        } else {
            Bf16Engine::Rounded
        }
    })
}

/// `dst (m×n) = [dst +] bf16(a) (m×k) · bf16(b) (k×n)`, accumulated in f32, on `engine`.
///
/// # Panics
/// If a stride addresses an element outside its slice.
pub fn gemm_bf16_with(
    engine: Bf16Engine,
    (m, n, k): (usize, usize, usize),
    dst: MatMut,
    accumulate: bool,
    a: Mat,
    b: Mat,
    parallelism: Parallelism,
) {
    let mut dst = dst;
    if !check_product("gemm_bf16", (m, n, k), &mut dst, accumulate, Some(&a), &b) {
        return;
    }
    match engine {
        Bf16Engine::Amx if amx::enable() => {
            // The tiles write rows of 16 columns: make the destination's contiguous axis the
            // columns by computing the transpose where the rows are contiguous.
            if dst.rs == 1 && dst.cs != 1 {
                // SAFETY: AMX is enabled and `check_product` passed (for the transposes too:
                // they address the same elements).
                unsafe { amx::gemm((n, m, k), dst.t(), accumulate, b.t(), a.t(), parallelism) }
            } else {
                // SAFETY: as above.
                unsafe { amx::gemm((m, n, k), dst, accumulate, a, b, parallelism) }
            }
        }
        _ => rounded_gemm(
            (m, n, k),
            dst,
            accumulate,
            &rounded(a, m, k),
            b,
            parallelism,
        ),
    }
}

/// [`gemm_bf16_with`] on the process's engine ([`bf16_engine`]).
pub fn gemm_bf16(
    mnk: (usize, usize, usize),
    dst: MatMut,
    accumulate: bool,
    a: Mat,
    b: Mat,
    parallelism: Parallelism,
) {
    gemm_bf16_with(bf16_engine(), mnk, dst, accumulate, a, b, parallelism)
}

/// A left operand rounded and laid out once for many products with different right operands
/// (a convolution's kernel, multiplied with each chunk of the batch).
#[derive(Debug)]
pub struct PackedLhs {
    m: usize,
    k: usize,
    packed: Packed,
}

#[derive(Debug)]
enum Packed {
    /// AMX tiles.
    Amx(Vec<u16>),
    /// The rounded matrix, row-major (the portable engine).
    Rounded(Vec<f32>),
}

impl PackedLhs {
    /// Packs `a` (`m×k`) for the process's engine ([`bf16_engine`]).
    ///
    /// # Panics
    /// If a stride addresses an element outside `a.data`.
    pub fn new(a: Mat, m: usize, k: usize) -> Self {
        Self::with_engine(bf16_engine(), a, m, k)
    }

    /// Packs `a` (`m×k`) for `engine`.
    pub fn with_engine(engine: Bf16Engine, a: Mat, m: usize, k: usize) -> Self {
        let empty = m == 0 || k == 0;
        if !empty {
            assert!(
                last_index(m, k, a.rs, a.cs) < a.data.len(),
                "PackedLhs: out of bounds"
            );
        }
        let packed = if engine == Bf16Engine::Amx && amx::enable() && !empty {
            // SAFETY: AMX is enabled and the bounds were checked above.
            Packed::Amx(unsafe { amx::pack_lhs(a, m, k) })
        } else {
            Packed::Rounded(rounded(a, m, k))
        };
        Self { m, k, packed }
    }

    /// `dst (m×n) = [dst +] self · bf16(b) (k×n)`, accumulated in f32.
    ///
    /// # Panics
    /// If a stride addresses an element outside its slice.
    pub fn gemm(&self, n: usize, dst: MatMut, accumulate: bool, b: Mat, parallelism: Parallelism) {
        let (m, k) = (self.m, self.k);
        let mut dst = dst;
        if !check_product("gemm_bf16", (m, n, k), &mut dst, accumulate, None, &b) {
            return;
        }
        match &self.packed {
            // SAFETY: the tiles were packed for AMX (so it is enabled) from a checked `m×k`
            // matrix; `check_product` passed for `dst` and `b`.
            Packed::Amx(tiles) => unsafe {
                amx::gemm_packed(tiles, (m, n, k), dst, accumulate, b, parallelism)
            },
            Packed::Rounded(ra) => rounded_gemm((m, n, k), dst, accumulate, ra, b, parallelism),
        }
    }
}

/// `x` (`rows × cols`) rounded to bf16, as a dense row-major f32 matrix.
fn rounded(x: Mat, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| round_bf16(x.data[(i / cols) * x.rs + (i % cols) * x.cs]))
        .collect()
}

/// The portable engine: `ra` (the left operand, already rounded, row-major `m×k`) times a
/// rounded copy of `b`, through the f32 GEMM.
fn rounded_gemm(
    (m, n, k): (usize, usize, usize),
    dst: MatMut,
    accumulate: bool,
    ra: &[f32],
    b: Mat,
    parallelism: Parallelism,
) {
    let rb = rounded(b, k, n);
    let (ra, rb) = (Mat::rows(ra, k), Mat::rows(&rb, n));
    gemm_f32((m, n, k), dst, accumulate, ra, rb, parallelism)
}

#[cfg(target_arch = "x86_64")]
mod amx {
    //! The AMX engine: operands packed into bf16 tiles, products in 2×2 blocks of 16×16 f32
    //! accumulator tiles.

    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::cell::Cell;
    use std::sync::OnceLock;

    use gemm::Parallelism;
    use rayon::prelude::*;

    use super::{to_bf16_bits, Mat, MatMut};

    /// Rows of every tile, and columns of an accumulator tile (a tile is 16 rows of 64 bytes).
    const T: usize = 16;
    /// The inner length of one tile product: 32 bf16 per A row.
    const TK: usize = 32;
    /// bf16 elements in one tile.
    const TILE: usize = T * TK;

    /// Whether AMX-BF16 can be used: CPUID says so and Linux grants the tile data state.
    pub(super) fn enable() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            // CPUID.(EAX=7, ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
            let l7 = std::arch::x86_64::__cpuid_count(7, 0);
            let has = l7.edx & (1 << 22) != 0 && l7.edx & (1 << 24) != 0;
            // The packing converts and interleaves with AVX-512 (every AMX CPU has these).
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16");
            has && avx512 && request_tile_permission()
        })
    }

    #[cfg(target_os = "linux")]
    fn request_tile_permission() -> bool {
        extern "C" {
            fn syscall(num: i64, ...) -> i64;
        }
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        // SAFETY: arch_prctl with these arguments only changes the process's permission to use
        // the AMX tile state; it reads and writes no memory of ours.
        unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tile_permission() -> bool {
        false
    }

    /// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    static CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    thread_local! {
        /// This thread's packed left and right operands, kept between calls (taken while in
        /// use, so a call nested by rayon's work stealing on the same thread gets empty ones).
        static PACKED_A: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
        static PACKED_B: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    }

    /// Packs `a` (m×k) into A tiles: tile `(mb, kb)` at `(mb * kb_count + kb) * TILE` holds rows
    /// `16·mb..`, columns `32·kb..`, row-major, zero beyond the matrix. Writes every element of
    /// the `mb_count × kb_count` tiles.
    ///
    /// # Safety
    /// The CPU must have AVX512-BF16 and AVX512-BW; every element `a`'s strides address within
    /// `m × k` must be inside `a.data`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_a(
        a: Mat,
        m: usize,
        k: usize,
        mb_count: usize,
        kb_count: usize,
        out: &mut Vec<u16>,
    ) {
        out.resize(mb_count * kb_count * TILE, 0);
        let base = out.as_mut_ptr();
        for mb in 0..mb_count {
            for r in 0..T {
                let row = mb * T + r;
                for kb in 0..kb_count {
                    let dst = base.add((mb * kb_count + kb) * TILE + r * TK);
                    let k0 = kb * TK;
                    let v = if row >= m {
                        _mm512_setzero_si512()
                    } else if a.cs == 1 {
                        bf16x32(a.data.as_ptr().add(row * a.rs + k0), TK.min(k - k0))
                    } else {
                        let mut t = [0u16; TK];
                        for (j, d) in t.iter_mut().enumerate().take(k - k0) {
                            *d = to_bf16_bits(*a.data.get_unchecked(row * a.rs + (k0 + j) * a.cs));
                        }
                        _mm512_loadu_si512(t.as_ptr().cast())
                    };
                    _mm512_storeu_si512(dst.cast(), v);
                }
            }
        }
    }

    /// The first `len` (at most 32) floats at `src` rounded to bf16, zeros after them.
    ///
    /// # Safety
    /// The CPU must have AVX512-BF16; `src..src + len` must be readable.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn bf16x32(src: *const f32, len: usize) -> __m512i {
        let lo = _mm512_maskz_loadu_ps(mask16(len), src);
        // `wrapping_add`: past the slice's end when `len <= 16`; the load reads no lane there.
        let hi = _mm512_maskz_loadu_ps(mask16(len.saturating_sub(16)), src.wrapping_add(16));
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
    }

    /// The first `len` (at most 16) lanes.
    #[inline(always)]
    fn mask16(len: usize) -> __mmask16 {
        if len >= 16 {
            0xffff
        } else {
            ((1u32 << len) - 1) as __mmask16
        }
    }

    /// Packs `b` (k×n) into B tiles (pairs of rows interleaved, as `tdpbf16ps` reads them):
    /// tile `(nb, kb)` at `(nb * kb_count + kb) * TILE`, element `(p, c, e)` at `p·32 + 2c + e`
    /// holding `b[32·kb + 2p + e, 16·nb + c]`, zero beyond the matrix. Writes every element of
    /// the `nb_count × kb_count` tiles.
    ///
    /// # Safety
    /// As [`pack_a`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_b(
        b: Mat,
        k: usize,
        n: usize,
        nb_count: usize,
        kb_count: usize,
        out: &mut Vec<u16>,
    ) {
        out.resize(nb_count * kb_count * TILE, 0);
        let base = out.as_mut_ptr();
        // Lane j of the interleaved row takes lane j/2 of the first row (j even) or of the
        // second (j odd); the second row sits in lanes 16.. of the converted pair.
        let mut idx = [0u16; 32];
        for (j, v) in idx.iter_mut().enumerate() {
            *v = (j / 2 + 16 * (j % 2)) as u16;
        }
        let interleave = _mm512_loadu_si512(idx.as_ptr().cast());
        for nb in 0..nb_count {
            let c0 = nb * T;
            let cols = T.min(n.saturating_sub(c0));
            for kb in 0..kb_count {
                let tile = base.add((nb * kb_count + kb) * TILE);
                let k0 = kb * TK;
                if cols == 0 {
                    for p in 0..T {
                        _mm512_storeu_si512(tile.add(p * 2 * T).cast(), _mm512_setzero_si512());
                    }
                } else if b.cs == 1 {
                    // Rows contiguous: convert two rows at a time and interleave them.
                    let row = |kk: usize| {
                        if kk < k {
                            _mm512_maskz_loadu_ps(mask16(cols), b.data.as_ptr().add(kk * b.rs + c0))
                        } else {
                            _mm512_setzero_ps()
                        }
                    };
                    for p in 0..T {
                        let kk = k0 + 2 * p;
                        let pair = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(
                            row(kk + 1),
                            row(kk),
                        ));
                        let v = _mm512_permutexvar_epi16(interleave, pair);
                        _mm512_storeu_si512(tile.add(p * 2 * T).cast(), v);
                    }
                } else if b.rs == 1 {
                    // Columns contiguous: 32 consecutive rows of one column are the column's
                    // 16 pairs, one per tile row.
                    let len = TK.min(k - k0);
                    let tile32 = tile.cast::<u32>();
                    for c in 0..T {
                        let mut pairs = [0u32; T];
                        if c < cols {
                            let v = bf16x32(b.data.as_ptr().add(k0 + (c0 + c) * b.cs), len);
                            _mm512_storeu_si512(pairs.as_mut_ptr().cast(), v);
                        }
                        for (p, v) in pairs.iter().enumerate() {
                            *tile32.add(p * T + c) = *v;
                        }
                    }
                } else {
                    for p in 0..T {
                        for c in 0..T {
                            for e in 0..2 {
                                let kk = k0 + 2 * p + e;
                                *tile.add(p * 2 * T + 2 * c + e) = if kk < k && c < cols {
                                    to_bf16_bits(*b.data.get_unchecked(kk * b.rs + (c0 + c) * b.cs))
                                } else {
                                    0
                                };
                            }
                        }
                    }
                }
            }
        }
    }

    /// A raw destination shared by the tasks of one product; each task writes its own blocks.
    #[derive(Clone, Copy)]
    struct Dst {
        ptr: *mut f32,
        rs: usize,
        cs: usize,
    }
    // SAFETY: tasks write disjoint blocks of rows × columns (see `gemm`).
    unsafe impl Send for Dst {}
    unsafe impl Sync for Dst {}

    /// Loads the accumulator tiles 0–3 from rows `stride` bytes apart at `c[q]`.
    ///
    /// # Safety
    /// Tiles configured with [`CONFIG`]; each `c[q]` starts 16 readable rows of 16 floats.
    #[inline(always)]
    unsafe fn load4(c: [*const f32; 4], stride: usize) {
        asm!(
            "tileloadd tmm0, [{c0} + {s}*1]",
            "tileloadd tmm1, [{c1} + {s}*1]",
            "tileloadd tmm2, [{c2} + {s}*1]",
            "tileloadd tmm3, [{c3} + {s}*1]",
            c0 = in(reg) c[0],
            c1 = in(reg) c[1],
            c2 = in(reg) c[2],
            c3 = in(reg) c[3],
            s = in(reg) stride,
            options(nostack, readonly),
        );
    }

    /// Stores the accumulator tiles 0–3 as rows `stride` bytes apart at `c[q]`.
    ///
    /// # Safety
    /// Tiles configured with [`CONFIG`]; each `c[q]` starts 16 writable rows of 16 floats.
    #[inline(always)]
    unsafe fn store4(c: [*mut f32; 4], stride: usize) {
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c[0],
            c1 = in(reg) c[1],
            c2 = in(reg) c[2],
            c3 = in(reg) c[3],
            s = in(reg) stride,
            options(nostack),
        );
    }

    /// One 32×32 block of the product: rows `32·i..`, columns `32·j..`.
    ///
    /// # Safety
    /// The tiles must be configured with [`CONFIG`] on this thread; `a` and `b` hold whole
    /// tile pairs for block row `i` and block column `j`; `dst` addresses an `m×n` matrix that
    /// nothing else writes in this block.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn block(
        a: &[u16],
        b: &[u16],
        kb_count: usize,
        (i, j): (usize, usize),
        (m, n): (usize, usize),
        dst: Dst,
        accumulate: bool,
        acc: &mut [f32; 4 * T * T],
    ) {
        let a0 = a.as_ptr().add(2 * i * kb_count * TILE);
        let a1 = a0.add(kb_count * TILE);
        let b0 = b.as_ptr().add(2 * j * kb_count * TILE);
        let b1 = b0.add(kb_count * TILE);
        // Bytes per tile row.
        let stride = 2 * TK;
        // A block whose second row or column half lies wholly outside the matrix (a layer of
        // 16 output channels, the last block of an edge) skips those tiles' products.
        let two_rows = 32 * i + T < m;
        let two_cols = 32 * j + T < n;
        // A whole block of a destination with contiguous rows goes straight between the
        // accumulators and `dst`; an edge block passes through `acc`.
        let direct = dst.cs == 1 && 32 * (i + 1) <= m && 32 * (j + 1) <= n;
        let corner = |q: usize| {
            dst.ptr
                .add((32 * i + T * (q / 2)) * dst.rs + 32 * j + T * (q % 2))
        };
        let dst_stride = 4 * dst.rs;
        if direct && accumulate {
            load4([0, 1, 2, 3].map(|q| corner(q).cast_const()), dst_stride);
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        // Each instruction its own `asm!`: the tile registers keep their contents between them.
        macro_rules! load {
            ($tile:literal, $ptr:expr) => {
                asm!(concat!("tileloadd ", $tile, ", [{p} + {s}*1]"), p = in(reg) $ptr,
                    s = in(reg) stride, options(nostack, readonly))
            };
        }
        macro_rules! dot {
            ($c:literal, $a:literal, $b:literal) => {
                asm!(
                    concat!("tdpbf16ps ", $c, ", ", $a, ", ", $b),
                    options(nostack, nomem)
                )
            };
        }
        for kb in 0..kb_count {
            let off = kb * TILE;
            load!("tmm4", a0.add(off));
            load!("tmm6", b0.add(off));
            dot!("tmm0", "tmm4", "tmm6");
            if two_cols {
                load!("tmm7", b1.add(off));
                dot!("tmm1", "tmm4", "tmm7");
            }
            if two_rows {
                load!("tmm5", a1.add(off));
                dot!("tmm2", "tmm5", "tmm6");
                if two_cols {
                    dot!("tmm3", "tmm5", "tmm7");
                }
            }
        }
        if direct {
            store4([0, 1, 2, 3].map(corner), dst_stride);
            return;
        }
        let out = acc.as_mut_ptr();
        // 4·T bytes per accumulator row.
        store4([0, 1, 2, 3].map(|q| out.add(q * T * T)), 4 * T);
        // Accumulator q = 2·(row half) + (column half).
        for q in 0..4 {
            let r0 = 32 * i + 16 * (q / 2);
            let c0 = 32 * j + 16 * (q % 2);
            let rows = T.min(m.saturating_sub(r0));
            let cols = T.min(n.saturating_sub(c0));
            if cols == 0 {
                continue;
            }
            for r in 0..rows {
                let src = acc.as_ptr().add(q * T * T + r * T);
                let row = dst.ptr.add((r0 + r) * dst.rs + c0 * dst.cs);
                if dst.cs == 1 {
                    let mask = mask16(cols);
                    let mut v = _mm512_loadu_ps(src);
                    if accumulate {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, row));
                    }
                    _mm512_mask_storeu_ps(row, mask, v);
                } else {
                    for c in 0..cols {
                        let d = row.add(c * dst.cs);
                        *d = if accumulate {
                            *d + *src.add(c)
                        } else {
                            *src.add(c)
                        };
                    }
                }
            }
        }
    }

    /// `a` (m×k) packed into A tiles, for [`gemm_packed`].
    ///
    /// # Safety
    /// [`enable`] returned true; every element `a`'s strides address within `m × k` is inside
    /// `a.data`.
    pub(super) unsafe fn pack_lhs(a: Mat, m: usize, k: usize) -> Vec<u16> {
        let mut out = Vec::new();
        pack_a(a, m, k, 2 * m.div_ceil(2 * T), k.div_ceil(TK), &mut out);
        out
    }

    /// `dst (m×n) = [dst +] bf16(a) · bf16(b)`.
    ///
    /// # Safety
    /// [`enable`] returned true, and `check_product` passed for these sizes and matrices.
    pub(super) unsafe fn gemm(
        (m, n, k): (usize, usize, usize),
        dst: MatMut,
        accumulate: bool,
        a: Mat,
        b: Mat,
        parallelism: Parallelism,
    ) {
        let mut pa = PACKED_A.take();
        pack_a(a, m, k, 2 * m.div_ceil(2 * T), k.div_ceil(TK), &mut pa);
        gemm_packed(&pa, (m, n, k), dst, accumulate, b, parallelism);
        PACKED_A.set(pa);
    }

    /// [`gemm`] with `a` packed by [`pack_lhs`] (of an `m×k` matrix).
    ///
    /// # Safety
    /// As [`gemm`] (the check of `a` done when it was packed).
    pub(super) unsafe fn gemm_packed(
        pa: &[u16],
        (m, n, k): (usize, usize, usize),
        dst: MatMut,
        accumulate: bool,
        b: Mat,
        parallelism: Parallelism,
    ) {
        let mb_pairs = m.div_ceil(2 * T);
        let nb_pairs = n.div_ceil(2 * T);
        let kb_count = k.div_ceil(TK);
        assert_eq!(
            pa.len(),
            2 * mb_pairs * kb_count * TILE,
            "packed lhs of another shape"
        );
        let mut pb = PACKED_B.take();
        pack_b(b, k, n, 2 * nb_pairs, kb_count, &mut pb);
        let out = Dst {
            ptr: dst.data.as_mut_ptr(),
            rs: dst.rs,
            cs: dst.cs,
        };
        {
            let pb = &pb[..];
            let blocks = mb_pairs * nb_pairs;
            let run = |range: std::ops::Range<usize>| {
                let mut acc = [0f32; 4 * T * T];
                // SAFETY: the tiles are configured on this thread before use and released
                // after; the packed operands hold `2·mb_pairs` and `2·nb_pairs` tile rows of
                // `kb_count` tiles; each block index writes its own 32×32 block of `dst`, whose
                // bounds the caller checked.
                unsafe {
                    asm!("ldtilecfg [{0}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
                    for idx in range {
                        let (i, j) = (idx / nb_pairs, idx % nb_pairs);
                        block(pa, pb, kb_count, (i, j), (m, n), out, accumulate, &mut acc);
                    }
                    asm!("tilerelease", options(nostack, nomem));
                }
            };
            let threads = match parallelism {
                // 0 means every thread of the pool, as in the `gemm` crate.
                Parallelism::Rayon(0) => rayon::current_num_threads().min(blocks),
                Parallelism::Rayon(t) => t.min(blocks),
                _ => 1,
            };
            if threads <= 1 {
                run(0..blocks);
            } else {
                (0..threads)
                    .into_par_iter()
                    .for_each(|t| run(t * blocks / threads..(t + 1) * blocks / threads));
            }
        }
        PACKED_B.set(pb);
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    use gemm::Parallelism;

    use super::{Mat, MatMut};

    pub(super) fn enable() -> bool {
        false
    }

    pub(super) unsafe fn pack_lhs(_: Mat, _: usize, _: usize) -> Vec<u16> {
        unreachable!("AMX is x86-64 only")
    }

    pub(super) unsafe fn gemm(
        _: (usize, usize, usize),
        _: MatMut,
        _: bool,
        _: Mat,
        _: Mat,
        _: Parallelism,
    ) {
        unreachable!("AMX is x86-64 only")
    }

    pub(super) unsafe fn gemm_packed(
        _: &[u16],
        _: (usize, usize, usize),
        _: MatMut,
        _: bool,
        _: Mat,
        _: Parallelism,
    ) {
        unreachable!("AMX is x86-64 only")
    }
}
