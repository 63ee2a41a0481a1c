//! Winograd's minimal filtering for 3×3 stride-1 convolutions padded by 1 (the ResNets' 3×3
//! layers outside the stride-2 ones): the forward pass by F(4×4, 3×3) ([`forward4`]; F(2×2,
//! 3×3), [`forward2`], where [`forward_tile`] says so) and the kernel gradient by F(2×2, 3×3)
//! (the input gradient is the forward pass of the output gradient with the flipped kernel,
//! which has the same window: [`crate::conv::ConvInputGrad`]'s convolution path). F(2×2, 3×3)
//! is described below; F(4×4, 3×3) is the same scheme with 6×6 input tiles, 36 products per
//! 4×4 output tile (4× fewer than the direct method) and larger coefficients, which cost about
//! four bits of precision (relative errors near 1e-5 against 1e-6; docs/performance.md).
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
//! Work is cut into chunks of whole images (about `CHUNK_FLOATS` floats of the larger
//! transformed tensor, at least one image; F(4×4)'s forward at least `FORWARD4_TILES` tiles,
//! the kernel gradient's at least `KERNEL_GRAD_TILES`), run in parallel with single-threaded
//! GEMMs; the kernel gradient sums partial kernels over fixed ranges of chunks in order, as the
//! im2col path does.

use candle_core::{bail, Result};
use gemm::Parallelism;

use crate::buffers::par_build;
use crate::conv::{sum_over_chunks, with_scratch, ConvGeometry, Products};
use crate::matrix::{gemm_f32, Mat, MatMut};
use crate::switch::Switch;

/// Floats per chunk (1 MiB) of the larger transformed tensor, the input's `(m + 2)²·C` or the
/// products' `(m + 2)²·O` per tile of F(m×m, 3×3).
const CHUNK_FLOATS: usize = 1 << 18;
/// The fewest tiles in a chunk of the F(4×4, 3×3) forward pass, the products' `N`: a 1 MiB chunk
/// holds 28 tiles of 256 channels on 8² planes and 14 of 512 on 4², and products that thin ran
/// slower than F(2×2, 3×3)'s (docs/performance.md).
const FORWARD4_TILES: usize = 64;
/// The fewest tiles in a chunk of the kernel gradient, the inner size of its products (a smaller
/// one re-reads and re-writes the `[C, O]` accumulators too often on wide layers of small
/// planes).
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

static ENABLED: Switch = Switch::new("SIMCLR_WINOGRAD");
static TILE: Switch = Switch::new("SIMCLR_WINOGRAD_TILE");

/// Whether the path is on: as [`set_winograd`] set it, else off when the environment variable
/// `SIMCLR_WINOGRAD` is `0` when first asked, else on.
pub fn enabled() -> bool {
    ENABLED.get(|v| u8::from(v.as_deref() != Some("0"))) == 1
}

/// Turns the path on or off for the whole process (benchmarks compare the two in one run).
pub fn set_winograd(on: bool) {
    ENABLED.set(u8::from(on));
}

/// The output tile of the forward pass (and so of the input gradient's convolution path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardTile {
    /// F(2×2, 3×3): 16 products per 2×2 tile.
    Two,
    /// F(4×4, 3×3): 36 products per 4×4 tile, the default (faster on every wide layer of the
    /// CIFAR network, docs/performance.md).
    Four,
}

/// The forward pass's tile: as [`set_forward_tile`] set it, else [`ForwardTile::Two`] when the
/// environment variable `SIMCLR_WINOGRAD_TILE` is `2` when first asked, else
/// [`ForwardTile::Four`].
pub fn forward_tile() -> ForwardTile {
    match TILE.get(|v| if v.as_deref() == Some("2") { 2 } else { 4 }) {
        2 => ForwardTile::Two,
        _ => ForwardTile::Four,
    }
}

/// Sets the forward pass's tile for the whole process (to compare the two in one process;
/// `SIMCLR_WINOGRAD_TILE` chooses from outside).
pub fn set_forward_tile(tile: ForwardTile) {
    TILE.set(match tile {
        ForwardTile::Two => 2,
        ForwardTile::Four => 4,
    });
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
    /// Rows and columns of `m`×`m` output tiles (the last ones cropped).
    fn tiles(&self, m: usize) -> (usize, usize) {
        (self.h.div_ceil(m), self.w.div_ceil(m))
    }

    /// `m`×`m` tiles per image.
    fn t(&self, m: usize) -> usize {
        let (th, tw) = self.tiles(m);
        th * tw
    }

    /// Images per chunk of F(m×m, 3×3): about [`CHUNK_FLOATS`] floats of the larger transformed
    /// tensor and at least `min_tiles` tiles, in whole images, at least one.
    fn chunk_images(&self, m: usize, min_tiles: usize) -> usize {
        let t = self.t(m).max(1);
        (CHUNK_FLOATS / ((m + 2) * (m + 2) * self.c.max(self.o) * t).max(1))
            .max(min_tiles.div_ceil(t))
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
/// are runs of adds over the tiles that twice the lanes speed up). Adds, subtractions and
/// products by constants, which Rust never fuses into FMAs, so both versions give the same bits.
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

/// Copies the `w`-wide rows of `plane` into rows 1.. of `pad` (rows of `phases` runs of
/// `phase_len` floats), after one zero column, with the padded columns dealt by their index
/// modulo `phases`: padded column `q` (image column `q − 1`) to run `q % phases`, index
/// `q / phases`, so that each column of a tile is a run over the tiles of a row. Positions that
/// no image column reaches keep their zeros (every plane of a call writes the same positions).
#[inline(always)]
fn deal_plane(plane: &[f32], w: usize, phases: usize, phase_len: usize, pad: &mut [f32]) {
    let pw = phases * phase_len;
    for (r, src) in plane.chunks_exact(w).enumerate() {
        let row = &mut pad[(r + 1) * pw..(r + 2) * pw];
        for k in 0..phases {
            // Run k holds the image columns j with j + 1 ≡ k (mod phases): from index 1 for k = 0.
            let (first_q, first_idx) = if k == 0 { (phases - 1, 1) } else { (k - 1, 0) };
            let dst = &mut row[k * phase_len + first_idx..(k + 1) * phase_len];
            for (d, &val) in dst.iter_mut().zip(src.iter().skip(first_q).step_by(phases)) {
                *d = val;
            }
        }
    }
}

/// Runs `tile_row(rows, e, col0, c)` for every row of `m`×`m` tiles of every plane of images
/// `n0..n0 + count` of `x`, each plane first copied into `pad` by [`deal_plane`] (`m` runs of
/// `tw + 1` columns per padded row): `rows` are the `m + 2` padded rows the tile row reads, `e`
/// scratch for as many, `col0` the tile row's first column in a `[·][C][count·T]` layout and `c`
/// the plane's channel.
#[inline(always)]
fn for_each_tile_row(
    s: &Sizes,
    m: usize,
    x: &[f32],
    n0: usize,
    count: usize,
    pad: &mut Vec<f32>,
    mut tile_row: impl FnMut(&[f32], &mut [f32], usize, usize),
) {
    let (th, tw) = s.tiles(m);
    let t = th * tw;
    let (h, w) = (s.h, s.w);
    let pw = m * (tw + 1);
    let ph = m * th + 2;
    pad.clear();
    pad.resize((ph + m + 2) * pw, 0.0);
    let (pad, e) = pad.split_at_mut(ph * pw);
    for b in 0..count {
        for ic in 0..s.c {
            let plane = &x[((n0 + b) * s.c + ic) * h * w..][..h * w];
            deal_plane(plane, w, m, tw + 1, pad);
            for ty in 0..th {
                let rows = &pad[m * ty * pw..(m * ty + m + 2) * pw];
                tile_row(rows, e, b * t + ty * tw, ic);
            }
        }
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
    let (_, tw) = s.tiles(2);
    let tc = count * s.t(2);
    // Padded rows of `tw + 1` even then `tw + 1` odd columns.
    let half = tw + 1;
    let pw = 2 * half;
    for_each_tile_row(s, 2, x, n0, count, pad, |rows, e, col0, ic| {
        // Bᵀ d over whole rows: e0 = d0 − d2, e1 = d1 + d2, e2 = d2 − d1, e3 = d1 − d3.
        let d = |k: usize| &rows[k * pw..(k + 1) * pw];
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
    });
}

/// `Y = Aᵀ M A` of every tile, from `m` (`[16][O][count·T]`) into the chunk's output images,
/// cropped to `h`×`w`. Per output row pair, the two rows' even and odd columns are computed as
/// contiguous runs over the tiles and then interleaved.
#[inline(always)]
fn transform_output_body(s: &Sizes, m: &[f32], count: usize, out: &mut [f32], buf: &mut Vec<f32>) {
    let (th, tw) = s.tiles(2);
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
/// By the tile [`forward_tile`] gives.
pub fn forward(s: Sizes, x: &[f32], w: &[f32]) -> Result<Vec<f32>> {
    match forward_tile() {
        ForwardTile::Two => forward2(s, x, w),
        ForwardTile::Four => forward4(s, x, w),
    }
}

/// The forward convolution by F(2×2, 3×3).
pub fn forward2(s: Sizes, x: &[f32], w: &[f32]) -> Result<Vec<f32>> {
    forward_by(&F2X2, s, x, w)
}

/// An input transform: `(sizes, x, first image, images, out, scratch)`.
type InputTransform = fn(&Sizes, &[f32], usize, usize, &mut [f32], &mut Vec<f32>);
/// An output transform: `(sizes, products, images, out, scratch)`.
type OutputTransform = fn(&Sizes, &[f32], usize, &mut [f32], &mut Vec<f32>);

/// The three transforms of one F(m×m, 3×3), and how its forward pass cuts the batch.
struct Transforms {
    /// Output tile side: 2 or 4 (input tiles of `m + 2`, `(m + 2)²` products per tile).
    m: usize,
    /// The fewest tiles in a chunk of the forward pass (its products' `N`).
    min_tiles: usize,
    kernel: fn(&Sizes, &[f32]) -> Vec<f32>,
    input: InputTransform,
    output: OutputTransform,
}

const F2X2: Transforms = Transforms {
    m: 2,
    min_tiles: 1,
    kernel: transform_kernel,
    input: transform_input,
    output: transform_output,
};

const F4X4: Transforms = Transforms {
    m: 4,
    min_tiles: FORWARD4_TILES,
    kernel: transform_kernel4,
    input: transform_input4,
    output: transform_output4,
};

/// The forward pass by `f`: kernel transform once, then per chunk of whole images the input
/// transform, one GEMM per tile position and the output transform.
fn forward_by(f: &Transforms, s: Sizes, x: &[f32], w: &[f32]) -> Result<Vec<f32>> {
    s.check(x.len(), w.len(), "forward")?;
    let u = (f.kernel)(&s, w);
    let positions = (f.m + 2) * (f.m + 2);
    let t = s.t(f.m);
    let (o, c) = (s.o, s.c);
    let per_image = o * s.h * s.w;
    let gi = s.chunk_images(f.m, f.min_tiles);
    // Each chunk's output is zeroed by the thread that then fills it.
    let y = par_build(s.n * per_image, gi * per_image, |ci, out| {
        let count = out.len() / per_image;
        let tc = count * t;
        with_scratch(|scratch| {
            let v = at_least(&mut scratch.cols, positions * c * tc);
            (f.input)(&s, x, ci * gi, count, v, &mut scratch.extra);
            let m = at_least(&mut scratch.other, positions * o * tc);
            for xi in 0..positions {
                gemm_f32(
                    (o, tc, c),
                    MatMut::rows(&mut m[xi * o * tc..(xi + 1) * o * tc], tc),
                    false,
                    Mat::rows(&u[xi * o * c..(xi + 1) * o * c], c),
                    Mat::rows(&v[xi * c * tc..(xi + 1) * c * tc], tc),
                    Parallelism::None,
                );
            }
            (f.output)(&s, m, count, out, &mut scratch.extra);
        });
    });
    Ok(y)
}

/// `U = G g Gᵀ` of F(4×4, 3×3) for every `(o, c)`: `[36][O][C]`. `G`'s rows are
/// `[¼, 0, 0]`, `−⅙[1, 1, 1]`, `−⅙[1, −1, 1]`, `[1/24, 1/12, ⅙]`, `[1/24, −1/12, ⅙]`,
/// `[0, 0, 1]` (Lavin and Gray); computed in f64 and rounded once, since thirds and sixths are
/// not exact in binary.
fn transform_kernel4(s: &Sizes, w: &[f32]) -> Vec<f32> {
    const G: [[f64; 3]; 6] = [
        [0.25, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    let oc_len = s.o * s.c;
    // One position ξ = (i, j) per task: u_ξ = Σ_ab G_ia g_ab G_jb, a contiguous [O, C] slice.
    par_build(36 * oc_len, oc_len, |xi, u| {
        let (gi, gj) = (G[xi / 6], G[xi % 6]);
        let coef: [f64; 9] = std::array::from_fn(|ab| gi[ab / 3] * gj[ab % 3]);
        for (dst, g) in u.iter_mut().zip(w.chunks_exact(9)) {
            let mut acc = 0f64;
            for (&k, &v) in coef.iter().zip(g) {
                acc += k * f64::from(v);
            }
            *dst = acc as f32;
        }
    })
}

/// `Bᵀ d` of F(4×4, 3×3) for six values `d` (a column or a row of an input tile).
#[inline(always)]
fn bt4(d: [f32; 6]) -> [f32; 6] {
    [
        4.0 * d[0] - 5.0 * d[2] + d[4],
        d[3] + d[4] - 4.0 * (d[1] + d[2]),
        4.0 * (d[1] - d[2]) + d[4] - d[3],
        2.0 * (d[3] - d[1]) + d[4] - d[2],
        2.0 * (d[1] - d[3]) + d[4] - d[2],
        4.0 * d[1] - 5.0 * d[3] + d[5],
    ]
}

/// `Aᵀ m` of F(4×4, 3×3) for six values `m` (a column or a row of a product tile).
#[inline(always)]
fn at4(m: [f32; 6]) -> [f32; 4] {
    let (p, q) = (m[1] + m[2], m[1] - m[2]);
    let (pp, qq) = (m[3] + m[4], m[3] - m[4]);
    [
        m[0] + p + pp,
        q + 2.0 * qq,
        p + 4.0 * pp,
        q + 8.0 * qq + m[5],
    ]
}

/// `V = Bᵀ d B` of F(4×4, 3×3) for images `n0..n0 + count` of `x`, into `v` as
/// `[36][C][count·T]`. `Bᵀ`'s rows map `d0..d5` to `4d0 − 5d2 + d4`, `d3 + d4 − 4(d1 + d2)`,
/// `4(d1 − d2) + d4 − d3`, `2(d3 − d1) + d4 − d2`, `2(d1 − d3) + d4 − d2`, `4d1 − 5d3 + d5`.
///
/// Each plane is copied zero-padded (one row and column before it) with its padded columns
/// dealt into four phases by their index mod 4, so that the six columns of every tile (padded
/// columns `4tx..4tx + 5`) are the runs `p0[tx], p1[tx], p2[tx], p3[tx], p0[tx + 1],
/// p1[tx + 1]` over the tiles of a row.
#[inline(always)]
fn transform_input4_body(
    s: &Sizes,
    x: &[f32],
    n0: usize,
    count: usize,
    v: &mut [f32],
    pad: &mut Vec<f32>,
) {
    let (_, tw) = s.tiles(4);
    let tc = count * s.t(4);
    let ph_len = tw + 1;
    let pw = 4 * ph_len;
    for_each_tile_row(s, 4, x, n0, count, pad, |rows, e, col0, ic| {
        let d = |k: usize| &rows[k * pw..(k + 1) * pw];
        let (d0, d1, d2, d3, d4, d5) = (d(0), d(1), d(2), d(3), d(4), d(5));
        let (e0, rest) = e.split_at_mut(pw);
        let (e1, rest) = rest.split_at_mut(pw);
        let (e2, rest) = rest.split_at_mut(pw);
        let (e3, rest) = rest.split_at_mut(pw);
        let (e4, e5) = rest.split_at_mut(pw);
        for q in 0..pw {
            let r = bt4([d0[q], d1[q], d2[q], d3[q], d4[q], d5[q]]);
            (e0[q], e1[q], e2[q], e3[q], e4[q], e5[q]) = (r[0], r[1], r[2], r[3], r[4], r[5]);
        }
        for (i, ei) in [&*e0, &*e1, &*e2, &*e3, &*e4, &*e5].into_iter().enumerate() {
            let p = |k: usize, off: usize| &ei[k * ph_len + off..k * ph_len + off + tw];
            let (c0, c1, c2, c3, c4, c5) = (p(0, 0), p(1, 0), p(2, 0), p(3, 0), p(0, 1), p(1, 1));
            // Positions (i, 0..6) of this tile row: runs `C·count·T` apart.
            let mut runs = v[(i * 6 * s.c + ic) * tc + col0..]
                .chunks_mut(s.c * tc)
                .map(|run| &mut run[..tw]);
            let [v0, v1, v2, v3, v4, v5]: [&mut [f32]; 6] =
                std::array::from_fn(|_| runs.next().expect("six positions"));
            for x in 0..tw {
                let r = bt4([c0[x], c1[x], c2[x], c3[x], c4[x], c5[x]]);
                (v0[x], v1[x], v2[x], v3[x], v4[x], v5[x]) = (r[0], r[1], r[2], r[3], r[4], r[5]);
            }
        }
    });
}

/// `Y = Aᵀ M A` of F(4×4, 3×3) for every tile, from `m` (`[36][O][count·T]`) into the chunk's
/// output images, cropped to `h`×`w`. `Aᵀ`'s rows map `m0..m5` to `m0 + m1 + m2 + m3 + m4`,
/// `(m1 − m2) + 2(m3 − m4)`, `(m1 + m2) + 4(m3 + m4)`, `(m1 − m2) + 8(m3 − m4) + m5`.
#[inline(always)]
fn transform_output4_body(s: &Sizes, m: &[f32], count: usize, out: &mut [f32], buf: &mut Vec<f32>) {
    let (th, tw) = s.tiles(4);
    let t = th * tw;
    let tc = count * t;
    let (h, w, o) = (s.h, s.w, s.o);
    // Aᵀ M per column j of the tile: rows s_ij (i < 4) as runs over the tiles; then · A.
    let (sums, spare) = at_least(buf, 24 * tw + 4 * tw).split_at_mut(24 * tw);
    // Rows that hold whole tiles are written in place, else through `spare`.
    let whole = w == 4 * tw;
    for oc in 0..o {
        let mm: [&[f32]; 36] =
            std::array::from_fn(|xi| &m[(xi * o + oc) * tc..(xi * o + oc + 1) * tc]);
        for b in 0..count {
            let plane = &mut out[(b * o + oc) * h * w..][..h * w];
            for ty in 0..th {
                let c0 = b * t + ty * tw;
                let r = |xi: usize| &mm[xi][c0..c0 + tw];
                let (s0, rest) = sums.split_at_mut(6 * tw);
                let (s1, rest) = rest.split_at_mut(6 * tw);
                let (s2, s3) = rest.split_at_mut(6 * tw);
                for j in 0..6 {
                    let (m0, m1, m2, m3, m4, m5) =
                        (r(j), r(6 + j), r(12 + j), r(18 + j), r(24 + j), r(30 + j));
                    let run = j * tw..(j + 1) * tw;
                    let (a, bb, cc, dd) = (
                        &mut s0[run.clone()],
                        &mut s1[run.clone()],
                        &mut s2[run.clone()],
                        &mut s3[run],
                    );
                    for x in 0..tw {
                        [a[x], bb[x], cc[x], dd[x]] =
                            at4([m0[x], m1[x], m2[x], m3[x], m4[x], m5[x]]);
                    }
                }
                for (i, si) in [&*s0, &*s1, &*s2, &*s3].into_iter().enumerate() {
                    let rr = 4 * ty + i;
                    if rr >= h {
                        break;
                    }
                    let row = &mut plane[rr * w..(rr + 1) * w];
                    let dst = if whole { row } else { &mut spare[..] };
                    let col = |j: usize| &si[j * tw..(j + 1) * tw];
                    let (m0, m1, m2, m3, m4, m5) = (col(0), col(1), col(2), col(3), col(4), col(5));
                    for (x, quad) in dst.chunks_exact_mut(4).enumerate() {
                        quad.copy_from_slice(&at4([m0[x], m1[x], m2[x], m3[x], m4[x], m5[x]]));
                    }
                    if !whole {
                        plane[rr * w..(rr + 1) * w].copy_from_slice(&spare[..w]);
                    }
                }
            }
        }
    }
}

with_avx2!(transform_input4 => transform_input4_body(
    s: &Sizes, x: &[f32], n0: usize, count: usize, v: &mut [f32], pad: &mut Vec<f32>
));
with_avx2!(transform_output4 => transform_output4_body(
    s: &Sizes, m: &[f32], count: usize, out: &mut [f32], buf: &mut Vec<f32>
));

/// The forward convolution by F(4×4, 3×3): as [`forward`], 36 products per 4×4 output tile
/// (2.25 per output position against F(2×2, 3×3)'s 4 and the direct method's 9).
pub fn forward4(s: Sizes, x: &[f32], w: &[f32]) -> Result<Vec<f32>> {
    forward_by(&F4X4, s, x, w)
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
    let (th, tw) = s.tiles(2);
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
    let t = s.t(2);
    let gi = s.chunk_images(2, KERNEL_GRAD_TILES);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `forward` runs the tile that was set: bit for bit that tile's own pass, and the two tiles
    /// differ in their last bits (so the dispatch is seen). The only test of this crate's binary
    /// that touches the process-wide tile.
    #[test]
    fn forward_runs_the_tile_that_was_set() {
        let s = Sizes {
            n: 2,
            c: 64,
            h: 9,
            w: 8,
            o: 64,
        };
        // A fixed pseudo-random sequence in [-1, 1).
        let mut state = 12345u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1 << 23) as f32 - 1.0
        };
        let x: Vec<f32> = (0..s.n * s.c * s.h * s.w).map(|_| next()).collect();
        let w: Vec<f32> = (0..s.o * s.c * 9).map(|_| 0.1 * next()).collect();
        let (two, four) = (forward2(s, &x, &w).unwrap(), forward4(s, &x, &w).unwrap());
        assert_ne!(two, four);
        let was = forward_tile();
        set_forward_tile(ForwardTile::Two);
        assert_eq!(forward(s, &x, &w).unwrap(), two);
        set_forward_tile(ForwardTile::Four);
        assert_eq!(forward(s, &x, &w).unwrap(), four);
        set_forward_tile(was);
    }
}
