//! Winograd's minimal filtering F(2×2, 3×3) for 3×3 stride-1 convolutions padded by 1 (the
//! ResNets' 3×3 layers outside the stride-2 ones): the forward pass and the kernel gradient
//! (the input gradient is the forward pass of the output gradient with the flipped kernel, which
//! has the same window: [`crate::conv::ConvInputGrad`]'s convolution path).
//!
//! Why: an im2col + GEMM convolution spends `9·C·O` multiply-adds per output position; on the
//! wide layers those GEMMs already run near this CPU's peak (docs/performance.md), so the
//! only way to go faster is fewer multiplications. F(2×2, 3×3) (Lavin and Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016) computes each 2×2 output tile from a
//! 4×4 input tile with `16·C·O` multiply-adds instead of `36·C·O`, a 2.25× saving, at the cost of
//! three cheap linear transforms (adds only, apart from the kernel's halves):
//!
//! * kernel `U = G g Gᵀ` (4×4 per (o, c)), once per op;
//! * input `V = Bᵀ d B` (4×4 per (c, tile)), reading each 4×4 input tile of the zero-padded image;
//! * the products: for each of the 16 tile positions ξ, `M_ξ [O, tiles] = U_ξ [O, C] · V_ξ [C,
//!   tiles]`, a GEMM of inner size `C`;
//! * output `Y = Aᵀ M A` (2×2 per (o, tile)), cropped to the output's size.
//!
//! The kernel gradient is the exact adjoint of that forward pass: `dU_ξ = Σ_tiles (A dY Aᵀ)_ξ ·
//! V_ξᵀ`, then `dg = Gᵀ dU G`. The results equal the direct convolution's up to float rounding
//! (the transforms' adds reorder the sums; F(2×2, 3×3)'s coefficients are 0, ±1 and ±½, so the
//! error stays close to the direct method's, unlike larger tiles).
//!
//! Work is cut into chunks of whole images (about [`CHUNK_FLOATS`] floats of the larger
//! transformed tensor, at least one image; the kernel gradient's at least [`KERNEL_GRAD_TILES`]
//! tiles), run in parallel with single-threaded GEMMs; the kernel gradient sums
//! partial kernels over fixed ranges of chunks in order, as the im2col path does.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{bail, Result};
use gemm::Parallelism;

use crate::buffers::par_build;
use crate::conv::{sum_over_chunks, with_scratch, ConvGeometry, Products};
use crate::matrix::{gemm_f32, Mat, MatMut};

/// Floats per chunk (1 MiB) of the larger transformed tensor, the input's `16·C` or the
/// products' `16·O` per tile: whole images, at least one.
const CHUNK_FLOATS: usize = 1 << 18;
/// The fewest tiles in a chunk of the kernel gradient.
const KERNEL_GRAD_TILES: usize = 256;

/// Whether a convolution of window `g` from `c` to `o` channels on planes of `plane` pixels
/// takes this path: f32 products, a 3×3 stride-1 window padded by 1 on every side, at least
/// [`MIN_CHANNELS`] channels on both sides, and planes of at least [`MIN_PLANE`] pixels unless
/// both sides have [`WIDE_CHANNELS`] or more. The transforms cost `C + O` per tile and the
/// products `C·O`, and each plane adds a fixed cost, so thin layers and small planes of
/// middling width lose what the products save (the rule comes from timing both paths on the
/// stride-1 layers of the pipeline's and the CIFAR network, docs/performance.md).
/// `SIMCLR_WINOGRAD=0` or [`set_winograd`] turns the path off (for comparisons).
pub fn applies(g: ConvGeometry, products: Products, c: usize, o: usize, plane: usize) -> bool {
    let narrow = c.min(o);
    products == Products::F32
        && g == ConvGeometry::symmetric(3, 1, 1)
        && narrow >= MIN_CHANNELS
        && (plane >= MIN_PLANE || narrow >= WIDE_CHANNELS)
        && enabled()
}

/// Whether the kernel gradient of such a convolution takes this path: where the forward does,
/// with at least [`WIDE_CHANNELS`] channels on both sides and planes of at least
/// [`MIN_KERNEL_GRAD_PLANE`] pixels. Its products accumulate a `[C, O]` matrix per tile position
/// over the chunk's tiles, and the transforms of both the input and the output gradient come
/// first: on 64 and 128 channels (32², 16²) and on 512 channels at 4² it measured no faster
/// than the unfolded path (0.78–1.23× from run to run), on 256 channels at 8² 1.00–1.44×.
pub fn applies_to_kernel_grad(
    g: ConvGeometry,
    products: Products,
    c: usize,
    o: usize,
    plane: usize,
) -> bool {
    applies(g, products, c, o, plane) && c.min(o) >= WIDE_CHANNELS && plane >= MIN_KERNEL_GRAD_PLANE
}

/// The smallest plane (pixels) whose kernel gradient takes this path.
pub const MIN_KERNEL_GRAD_PLANE: usize = 64;

/// The fewest input and output channels a layer needs to take this path.
pub const MIN_CHANNELS: usize = 64;
/// The smallest plane (pixels) of a layer with fewer than [`WIDE_CHANNELS`] channels.
pub const MIN_PLANE: usize = 256;
/// Layers with at least this many channels on both sides take the path on any plane.
pub const WIDE_CHANNELS: usize = 256;

static MODE: AtomicU8 = AtomicU8::new(0);

/// Whether the path is on: as [`set_winograd`] set it, else off when the environment variable
/// `SIMCLR_WINOGRAD` is `0` when first asked, else on.
pub fn enabled() -> bool {
    match MODE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("SIMCLR_WINOGRAD").map_or(true, |v| v != "0");
            set_winograd(on);
            on
        }
    }
}

/// Turns the path on or off for the whole process (benchmarks compare the two in one run).
pub fn set_winograd(on: bool) {
    MODE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Sizes of one convolution: `n` images of `c` channels, `h`×`w`, to `o` channels.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Images.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Height of input and output.
    pub h: usize,
    /// Width of input and output.
    pub w: usize,
    /// Output channels.
    pub o: usize,
}

impl Sizes {
    fn tiles(&self) -> (usize, usize) {
        (self.h.div_ceil(2), self.w.div_ceil(2))
    }

    /// Tiles per image.
    fn t(&self) -> usize {
        let (th, tw) = self.tiles();
        th * tw
    }

    /// Images per chunk of the forward pass.
    fn chunk_images(&self) -> usize {
        (CHUNK_FLOATS / (16 * self.c.max(self.o) * self.t()).max(1)).clamp(1, self.n.max(1))
    }

    /// Images per chunk of the kernel gradient: as the forward's, but at least
    /// [`KERNEL_GRAD_TILES`] tiles, the inner size of its products (a smaller one re-reads and
    /// re-writes the `[C, O]` accumulator too often on wide layers of small planes).
    fn kernel_grad_chunk_images(&self) -> usize {
        self.chunk_images()
            .max(KERNEL_GRAD_TILES.div_ceil(self.t().max(1)))
            .clamp(1, self.n.max(1))
    }

    fn check(&self, x: usize, k: usize, what: &str) -> Result<()> {
        if self.h == 0 || self.w == 0 {
            bail!("winograd {what}: empty image {self:?}")
        }
        if x != self.n * self.c * self.h * self.w || k != self.o * self.c * 9 {
            bail!("winograd {what}: {x} input and {k} kernel floats do not match {self:?}")
        }
        Ok(())
    }
}

/// `fn $name(args)` running `$body(args)` compiled for AVX2 where the CPU has it (picked at run
/// time; the baseline x86-64 target the project builds for stops at SSE2, and the transforms
/// are runs of adds over the tiles that twice the lanes speed up). Adds and subtractions only,
/// so both versions give the same bits.
macro_rules! with_avx2 {
    ($name:ident => $body:ident ($($arg:ident : $ty:ty),*)) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

with_avx2!(transform_input => transform_input_body(
    s: &Sizes, x: &[f32], n0: usize, count: usize, v: &mut [f32], pad: &mut Vec<f32>
));
with_avx2!(transform_output => transform_output_body(
    s: &Sizes, m: &[f32], count: usize, out: &mut [f32], buf: &mut Vec<f32>
));
with_avx2!(transform_output_grad => transform_output_grad_body(
    s: &Sizes, gy: &[f32], n0: usize, count: usize, gm: &mut [f32], buf: &mut Vec<f32>
));

/// `U = G g Gᵀ` for every `(o, c)`: `[16][O][C]`.
fn transform_kernel(s: &Sizes, w: &[f32]) -> Vec<f32> {
    let (o, c) = (s.o, s.c);
    let mut u = vec![0f32; 16 * o * c];
    for oc in 0..o {
        for ic in 0..c {
            let g = &w[(oc * c + ic) * 9..(oc * c + ic + 1) * 9];
            // G g: 4 rows of 3.
            let mut q = [[0f32; 3]; 4];
            for j in 0..3 {
                let (a, b, d) = (g[j], g[3 + j], g[6 + j]);
                q[0][j] = a;
                q[1][j] = 0.5 * (a + b + d);
                q[2][j] = 0.5 * (a - b + d);
                q[3][j] = d;
            }
            // (G g) Gᵀ: each row [a, b, d] -> [a, ½(a + b + d), ½(a − b + d), d].
            for (i, [a, b, d]) in q.into_iter().enumerate() {
                let row = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                for (j, v) in row.into_iter().enumerate() {
                    u[((i * 4 + j) * o + oc) * c + ic] = v;
                }
            }
        }
    }
    u
}

/// Grows `buf` to at least `len` floats and returns its first `len`, which the caller overwrites
/// entirely (no zeroing: the stale contents are never read).
fn at_least(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// `dst = a − b`, element by element (zipped, so that it compiles to vector instructions).
#[inline(always)]
fn sub(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = x - y;
    }
}

/// `dst = a + b`, element by element.
#[inline(always)]
fn add(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = x + y;
    }
}

/// Copies `src`'s even elements to the front of `even` and its odd ones to the front of `odd`.
#[inline(always)]
fn split_columns(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    for (d, &val) in even.iter_mut().zip(src.iter().step_by(2)) {
        *d = val;
    }
    for (d, &val) in odd.iter_mut().zip(src.iter().skip(1).step_by(2)) {
        *d = val;
    }
}

/// `V = Bᵀ d B` of images `n0..n0 + count` of `x`, into `v` as `[16][C][count·T]`.
///
/// Each plane is copied zero-padded (one row and column before it, up to `2·th + 2` rows and
/// `2·tw + 2` columns) with its even and odd padded columns apart, so that every step below runs
/// over contiguous runs of tiles (the tile `tx` starts at padded column `2·tx`).
#[inline(always)]
fn transform_input_body(
    s: &Sizes,
    x: &[f32],
    n0: usize,
    count: usize,
    v: &mut [f32],
    pad: &mut Vec<f32>,
) {
    let (th, tw) = s.tiles();
    let t = th * tw;
    let tc = count * t;
    let (h, w) = (s.h, s.w);
    // Padded rows of `tw + 1` even then `tw + 1` odd columns.
    let half = tw + 1;
    let pw = 2 * half;
    let ph = 2 * th + 2;
    pad.clear();
    pad.resize(ph * pw + 4 * pw, 0.0);
    let (pad, e) = pad.split_at_mut(ph * pw);
    for b in 0..count {
        for ic in 0..s.c {
            let plane = &x[((n0 + b) * s.c + ic) * h * w..][..h * w];
            for (r, src) in plane.chunks_exact(w).enumerate() {
                // Padded column q = image column q - 1: even q at q / 2, odd q at half + q / 2.
                let row = &mut pad[(r + 1) * pw..(r + 2) * pw];
                // Image column q is padded column q + 1: even q go to the odd half.
                let (even, odd) = row.split_at_mut(half);
                split_columns(src, odd, &mut even[1..]);
            }
            for ty in 0..th {
                // Bᵀ d over whole rows: e0 = d0 − d2, e1 = d1 + d2, e2 = d2 − d1, e3 = d1 − d3.
                let d = |k: usize| &pad[(2 * ty + k) * pw..(2 * ty + k + 1) * pw];
                let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                let (e0, rest) = e.split_at_mut(pw);
                let (e1, rest) = rest.split_at_mut(pw);
                let (e2, e3) = rest.split_at_mut(pw);
                for q in 0..pw {
                    e0[q] = d0[q] - d2[q];
                    e1[q] = d1[q] + d2[q];
                    e2[q] = d2[q] - d1[q];
                    e3[q] = d1[q] - d3[q];
                }
                // (Bᵀ d) B: the tile's padded columns 2tx, 2tx + 1, 2tx + 2, 2tx + 3 are
                // even[tx], odd[tx], even[tx + 1], odd[tx + 1].
                let col0 = b * t + ty * tw;
                for (i, ei) in [&*e0, &*e1, &*e2, &*e3].into_iter().enumerate() {
                    let (ev, od) = ei.split_at(half);
                    let (ev0, ev1) = (&ev[..tw], &ev[1..=tw]);
                    let (od0, od1) = (&od[..tw], &od[1..=tw]);
                    let row = |j: usize| ((i * 4 + j) * s.c + ic) * tc + col0;
                    sub(&mut v[row(0)..row(0) + tw], ev0, ev1);
                    add(&mut v[row(1)..row(1) + tw], od0, ev1);
                    sub(&mut v[row(2)..row(2) + tw], ev1, od0);
                    sub(&mut v[row(3)..row(3) + tw], od0, od1);
                }
            }
        }
    }
}

/// `Y = Aᵀ M A` of every tile, from `m` (`[16][O][count·T]`) into the chunk's output images,
/// cropped to `h`×`w`. Per output row pair, the two rows' even and odd columns are computed as
/// contiguous runs over the tiles and then interleaved.
#[inline(always)]
fn transform_output_body(s: &Sizes, m: &[f32], count: usize, out: &mut [f32], buf: &mut Vec<f32>) {
    let (th, tw) = s.tiles();
    let t = th * tw;
    let tc = count * t;
    let (h, w, o) = (s.h, s.w, s.o);
    // Aᵀ M per column j of the tile (rows s0j = m0j + m1j + m2j and s1j = m1j − m2j − m3j, as
    // runs over the tiles), then · A: y_i0 = s_i0 + s_i1 + s_i2, y_i1 = s_i1 − s_i2 − s_i3.
    let (sums, spare) = at_least(buf, 8 * tw + 2 * tw).split_at_mut(8 * tw);
    for oc in 0..o {
        let at = |xi: usize| &m[(xi * o + oc) * tc..(xi * o + oc + 1) * tc];
        let mm: [&[f32]; 16] = std::array::from_fn(at);
        for b in 0..count {
            let plane = &mut out[(b * o + oc) * h * w..][..h * w];
            for ty in 0..th {
                let c0 = b * t + ty * tw;
                let r = |xi: usize| &mm[xi][c0..c0 + tw];
                let (s0, s1) = sums.split_at_mut(4 * tw);
                for j in 0..4 {
                    let (a, bb, cc, dd) = (r(j), r(4 + j), r(8 + j), r(12 + j));
                    let s0j = &mut s0[j * tw..(j + 1) * tw];
                    let s1j = &mut s1[j * tw..(j + 1) * tw];
                    let it = s0j
                        .iter_mut()
                        .zip(s1j.iter_mut())
                        .zip(a)
                        .zip(bb)
                        .zip(cc)
                        .zip(dd);
                    for (((((x, y), &a), &b), &c), &d) in it {
                        *x = a + b + c;
                        *y = b - c - d;
                    }
                }
                for (i, si) in [&*s0, &*s1].into_iter().enumerate() {
                    let rr = 2 * ty + i;
                    if rr >= h {
                        break;
                    }
                    // Straight into the row when it holds whole tiles, else through `spare`.
                    let row = &mut plane[rr * w..(rr + 1) * w];
                    let whole = w == 2 * tw;
                    let dst = if whole { row } else { &mut spare[..] };
                    let it = dst
                        .chunks_exact_mut(2)
                        .zip(&si[..tw])
                        .zip(&si[tw..2 * tw])
                        .zip(&si[2 * tw..3 * tw])
                        .zip(&si[3 * tw..]);
                    for ((((pair, &a), &b), &c), &d) in it {
                        pair[0] = a + b + c;
                        pair[1] = b - c - d;
                    }
                    if !whole {
                        plane[rr * w..(rr + 1) * w].copy_from_slice(&spare[..w]);
                    }
                }
            }
        }
    }
}

/// The forward convolution: `(x [N, C, H, W], w [O, C, 3, 3]) -> y [N, O, H, W]`, padding 1.
pub fn forward(s: Sizes, x: &[f32], w: &[f32]) -> Result<Vec<f32>> {
    s.check(x.len(), w.len(), "forward")?;
    let u = transform_kernel(&s, w);
    let (th, tw) = s.tiles();
    let t = th * tw;
    let (h, wd, o, c) = (s.h, s.w, s.o, s.c);
    let per_image = o * h * wd;
    let gi = s.chunk_images();
    // Each chunk's output is zeroed by the thread that then fills it.
    let y = par_build(s.n * per_image, gi * per_image, |ci, out| {
        let count = out.len() / per_image;
        let tc = count * t;
        with_scratch(|scratch| {
            let v = at_least(&mut scratch.cols, 16 * c * tc);
            transform_input(&s, x, ci * gi, count, v, &mut scratch.extra);
            let m = at_least(&mut scratch.other, 16 * o * tc);
            for xi in 0..16 {
                gemm_f32(
                    (o, tc, c),
                    MatMut::rows(&mut m[xi * o * tc..(xi + 1) * o * tc], tc),
                    false,
                    Mat::rows(&u[xi * o * c..(xi + 1) * o * c], c),
                    Mat::rows(&v[xi * c * tc..(xi + 1) * c * tc], tc),
                    Parallelism::None,
                );
            }
            transform_output(&s, m, count, out, &mut scratch.extra);
        });
    });
    Ok(y)
}

/// `A dY Aᵀ` of the output gradient's 2×2 tiles of images `n0..n0 + count`, into `gm` as
/// `[16][O][count·T]`, as contiguous runs over the tiles of each row pair.
#[inline(always)]
fn transform_output_grad_body(
    s: &Sizes,
    gy: &[f32],
    n0: usize,
    count: usize,
    gm: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let (th, tw) = s.tiles();
    let t = th * tw;
    let tc = count * t;
    let (h, w, o) = (s.h, s.w, s.o);
    buf.clear();
    buf.resize(6 * tw, 0.0);
    let (g00, rest) = buf.split_at_mut(tw);
    let (g01, rest) = rest.split_at_mut(tw);
    let (g10, rest) = rest.split_at_mut(tw);
    let (g11, rest) = rest.split_at_mut(tw);
    let (a_run, b_run) = rest.split_at_mut(tw);
    for b in 0..count {
        for oc in 0..o {
            let plane = &gy[((n0 + b) * o + oc) * h * w..][..h * w];
            for ty in 0..th {
                // The tiles' four gradients as runs (zero beyond the image).
                for (r, (ge, go)) in [
                    (2 * ty, (&mut *g00, &mut *g01)),
                    (2 * ty + 1, (&mut *g10, &mut *g11)),
                ] {
                    ge.fill(0.0);
                    go.fill(0.0);
                    if r < h {
                        split_columns(&plane[r * w..(r + 1) * w], ge, go);
                    }
                }
                // A g: rows g0, g0 + g1, g0 − g1, −g1; then each row [a, b] -> [a, a + b,
                // a − b, −b].
                let col0 = b * t + ty * tw;
                let row = |i: usize, j: usize| ((i * 4 + j) * o + oc) * tc + col0;
                for i in 0..4 {
                    // Row i of A g as runs (a, b) over the tiles.
                    let (a, bb) = (&mut a_run[..], &mut b_run[..]);
                    match i {
                        0 => {
                            a.copy_from_slice(g00);
                            bb.copy_from_slice(g01);
                        }
                        1 => {
                            add(a, g00, g10);
                            add(bb, g01, g11);
                        }
                        2 => {
                            sub(a, g00, g10);
                            sub(bb, g01, g11);
                        }
                        _ => {
                            for ((x, y), (&p, &q)) in
                                a.iter_mut().zip(bb.iter_mut()).zip(g10.iter().zip(&*g11))
                            {
                                *x = -p;
                                *y = -q;
                            }
                        }
                    }
                    gm[row(i, 0)..row(i, 0) + tw].copy_from_slice(a);
                    add(&mut gm[row(i, 1)..row(i, 1) + tw], a, bb);
                    sub(&mut gm[row(i, 2)..row(i, 2) + tw], a, bb);
                    for (d, &y) in gm[row(i, 3)..row(i, 3) + tw].iter_mut().zip(&*bb) {
                        *d = -y;
                    }
                }
            }
        }
    }
}

/// The kernel gradient: `(x [N, C, H, W], gy [N, O, H, W]) -> gw [O, C, 3, 3]`, padding 1.
pub fn kernel_grad(s: Sizes, x: &[f32], gy: &[f32]) -> Result<Vec<f32>> {
    s.check(x.len(), s.o * s.c * 9, "kernel gradient")?;
    if gy.len() != s.n * s.o * s.h * s.w {
        bail!(
            "winograd kernel gradient: {} gradient floats do not match {s:?}",
            gy.len()
        )
    }
    let (o, c) = (s.o, s.c);
    let t = s.t();
    let gi = s.kernel_grad_chunk_images();
    let chunks = s.n.div_ceil(gi);
    let du = sum_over_chunks(
        16 * o * c,
        chunks,
        rayon::current_num_threads(),
        |du, ci, scratch| {
            let n0 = ci * gi;
            let count = gi.min(s.n - n0);
            let tc = count * t;
            let v = at_least(&mut scratch.cols, 16 * c * tc);
            transform_input(&s, x, n0, count, v, &mut scratch.extra);
            let gm = at_least(&mut scratch.other, 16 * o * tc);
            transform_output_grad(&s, gy, n0, count, gm, &mut scratch.extra);
            // dUᵀ_ξ [C, O] += V_ξ · Gm_ξᵀ: O-contiguous accumulation.
            for xi in 0..16 {
                gemm_f32(
                    (c, o, tc),
                    MatMut::rows(&mut du[xi * o * c..(xi + 1) * o * c], o),
                    true,
                    Mat::rows(&v[xi * c * tc..(xi + 1) * c * tc], tc),
                    Mat::rows(&gm[xi * o * tc..(xi + 1) * o * tc], tc).t(),
                    Parallelism::None,
                );
            }
        },
    );
    // dg = Gᵀ dU G per (o, c).
    let mut gw = vec![0f32; o * c * 9];
    for oc in 0..o {
        for ic in 0..c {
            let e = |i: usize, j: usize| du[((i * 4 + j) * c + ic) * o + oc];
            // Gᵀ dU: rows u0 + ½(u1 + u2), ½(u1 − u2), ½(u1 + u2) + u3.
            let r: [[f32; 4]; 3] = [
                std::array::from_fn(|j| e(0, j) + 0.5 * (e(1, j) + e(2, j))),
                std::array::from_fn(|j| 0.5 * (e(1, j) - e(2, j))),
                std::array::from_fn(|j| 0.5 * (e(1, j) + e(2, j)) + e(3, j)),
            ];
            let dst = &mut gw[(oc * c + ic) * 9..(oc * c + ic + 1) * 9];
            for (i, [a, b, cc, d]) in r.into_iter().enumerate() {
                dst[i * 3] = a + 0.5 * (b + cc);
                dst[i * 3 + 1] = 0.5 * (b - cc);
                dst[i * 3 + 2] = 0.5 * (b + cc) + d;
            }
        }
    }
    Ok(gw)
}
