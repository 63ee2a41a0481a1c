//! 2-D convolution on the CPU as im2col + GEMM, as candle custom ops.
//!
//! Why this exists: candle 0.11's CPU convolution is slow where training spends its time. Its
//! input gradient is a direct dot-product loop rather than a GEMM (about 13 GFLOP/s, nearly half
//! of a ResNet training step), and its forward pass and weight gradient use a scalar,
//! single-threaded im2col (30–40 GFLOP/s).
//!
//! Here all three are GEMMs of the `gemm` crate (the kernels behind candle's own `matmul`) over
//! unfolded windows. The batch is cut into chunks of whole images (an unfold of about 256 KiB,
//! at least 64 output pixels); each rayon task unfolds its chunk into a scratch matrix
//! `colsᵀ [C·kh·kw, pixels]` ([`Im2Col`]'s layout: rows in `(c, i, j)` order, so an OIHW kernel
//! is already the `[O, C·kh·kw]` matrix; each row is filled by contiguous runs of the image, one
//! run per row when the stride is 1 and the padding keeps the width) and multiplies:
//!
//! * forward: `y = W · colsᵀ`, written straight into the NCHW output;
//! * input gradient, by one of two paths ([`InputGradPath`], a fixed rule per layer shape):
//!   `colsᵀ-grad = Wᵀ · gy`, folded back into the image by [`Col2Im`] (the adjoint of the
//!   unfold; a task owns its images, so no two threads add into the same pixel); or, for
//!   stride 1, the forward convolution of `gy` with the kernel flipped in space and its channel
//!   axes swapped, whose GEMM has `O·kh·kw` as its inner size where the fold's has `O`;
//! * weight gradient: `gW += gy · cols`, recomputing the chunk's unfold instead of keeping it from
//!   the forward pass, with partial kernels over fixed ranges of chunks summed in order at the
//!   end, so the result does not depend on work stealing.
//!
//! The wide 3×3 stride-1 layers padded by 1 leave the unfold: their forward pass (and so the
//! input gradient's convolution path) runs Winograd's F(4×4, 3×3) ([`crate::winograd`], 4×
//! fewer multiply-adds), and the widest ones' kernel gradient, on planes of 8² or more, runs
//! F(2×2, 3×3) (2.25× fewer); [`crate::winograd::applies`] and
//! [`crate::winograd::applies_to_kernel_grad`] hold the rule.
//!
//! Scratch matrices whose rows hold a multiple of 256 floats get one cache line more per row
//! (`row_stride`): rows 4 KiB apart, one 32² image's, halved the forward rate.
//!
//! Nothing bigger than a chunk is ever unfolded, so the memory of a convolution layer in the
//! autograd graph is that of its input and output, as with candle's own op. 1×1 stride-1 unpadded
//! convolutions of single-image chunks multiply the image itself. When there are fewer than two
//! chunks per thread the chunks run one after another with multi-threaded GEMMs instead.
//!
//! Measured (`cargo bench -p simclr-models --bench conv`, 2-core Zen 4, AVX-512): a 3×3 conv
//! 128→128 on 16×16, batch 128 runs at 175–200 GFLOP/s in each direction, against candle's
//! 54–76 (forward), 13–23 (input gradient) and 36–46 (weight gradient).
//!
//! With [`Products::Bf16`] the three products round their operands to bf16 and accumulate in f32
//! ([`crate::gemm_bf16`], on AMX tiles where the CPU has them; the kernel is packed once per op
//! and, on that path, each image's product goes straight into its destination).
//!
//! Only f32 tensors on the CPU take this path; anything else (other dtypes, CUDA, Metal) falls
//! back to candle's own `conv2d`, as does everything when [`ConvBackend::Candle`] is selected
//! (environment variable `SIMCLR_CONV=candle`, or [`set_conv_backend`]). The custom op has no
//! second-order gradient.

use crate::switch::Switch;
use std::cell::Cell;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::buffers::{par_build, par_zeroed};
use crate::gemm_bf16::{gemm_bf16, PackedLhs};
use crate::matrix::{gemm_f32, Mat, MatMut};
use crate::winograd;

/// A chunk holds whole images whose unfold has about this many floats (256 KiB: measured as
/// good as or better than 1 and 4 MiB on a 2-core Zen 4 with 1 MiB of L2 per core)...
const CHUNK_FLOATS: usize = 1 << 16;
/// ... but at least this many output pixels, the rows of its GEMMs.
const CHUNK_MIN_PIXELS: usize = 64;

/// The window of a 2-D convolution: kernel size, stride and explicit (possibly asymmetric) zero
/// padding, as TF `SAME`/fixed padding produce it. Dilation is 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero rows added above the input.
    pub pad_top: usize,
    /// Zero columns added left of the input.
    pub pad_left: usize,
    /// Zero rows added below the input.
    pub pad_bottom: usize,
    /// Zero columns added right of the input.
    pub pad_right: usize,
}

impl ConvGeometry {
    /// A square `k`×`k` kernel with the same padding `pad` on every side.
    pub fn symmetric(k: usize, stride: usize, pad: usize) -> Self {
        Self {
            kh: k,
            kw: k,
            stride,
            pad_top: pad,
            pad_left: pad,
            pad_bottom: pad,
            pad_right: pad,
        }
    }

    /// Whether every side has the same padding.
    pub fn is_symmetric(&self) -> bool {
        self.pad_top == self.pad_left
            && self.pad_top == self.pad_bottom
            && self.pad_top == self.pad_right
    }

    /// Output height and width for an `h`×`w` input.
    pub fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let hp = h + self.pad_top + self.pad_bottom;
        let wp = w + self.pad_left + self.pad_right;
        if self.stride == 0 || self.kh == 0 || self.kw == 0 || hp < self.kh || wp < self.kw {
            bail!("conv geometry {self:?} does not fit a {h}x{w} input")
        }
        Ok((
            (hp - self.kh) / self.stride + 1,
            (wp - self.kw) / self.stride + 1,
        ))
    }

    /// The window of the input gradient as a convolution of the output gradient, for stride 1:
    /// the gradient of a stride-1 convolution is the convolution of the output gradient with the
    /// kernel flipped in space and with its two channel axes swapped, padded by `k - 1 - pad`
    /// on each side. `None` for strides above 1, empty kernels and paddings wider than `k - 1`.
    fn transposed(&self) -> Option<Self> {
        let flip = |k: usize, pad: usize| k.checked_sub(1)?.checked_sub(pad);
        if self.stride != 1 {
            return None;
        }
        Some(Self {
            kh: self.kh,
            kw: self.kw,
            stride: 1,
            pad_top: flip(self.kh, self.pad_top)?,
            pad_left: flip(self.kw, self.pad_left)?,
            pad_bottom: flip(self.kh, self.pad_bottom)?,
            pad_right: flip(self.kw, self.pad_right)?,
        })
    }

    fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.stride == 1
            && self.pad_top + self.pad_left + self.pad_bottom + self.pad_right == 0
    }

    /// Input row (or column) under output index `o` and kernel tap `t`, if inside `0..len`.
    #[inline]
    fn tap(&self, o: usize, t: usize, pad_before: usize, len: usize) -> Option<usize> {
        (o * self.stride + t)
            .checked_sub(pad_before)
            .filter(|&v| v < len)
    }

    /// For kernel column `j`: the output columns `lo..hi` whose tap `j` is inside an input row
    /// of width `w` (the others read padding).
    #[inline]
    fn valid_cols(&self, j: usize, w: usize, wo: usize) -> (usize, usize) {
        let s = self.stride;
        // wo * s + j - pad_left >= 0  and  < w
        let lo = self.pad_left.saturating_sub(j).div_ceil(s).min(wo);
        let hi = if w + self.pad_left > j {
            ((w + self.pad_left - j).div_ceil(s)).min(wo)
        } else {
            0
        };
        (lo, hi.max(lo))
    }
}

/// The arithmetic of a convolution's products (forward and both gradients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Products {
    /// f32 operands, f32 accumulation.
    #[default]
    F32,
    /// Operands rounded to bf16, f32 accumulation, f32 result ([`crate::gemm_bf16`]; on AMX
    /// where the CPU has it). The tensors stay f32.
    Bf16,
}

/// Which implementation [`conv2d`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvBackend {
    /// candle's own `Tensor::conv2d` (the reference).
    Candle,
    /// The im2col + GEMM custom ops (f32 on the CPU; other cases fall back to candle).
    Im2colGemm,
}

static BACKEND: Switch = Switch::new("SIMCLR_CONV");

/// The backend [`conv2d`] uses: the one set by [`set_conv_backend`], else the one named by the
/// environment variable `SIMCLR_CONV` when first asked (`candle` selects candle's
/// convolution), else [`ConvBackend::Im2colGemm`].
pub fn conv_backend() -> ConvBackend {
    let candle = |v: Option<String>| v.is_some_and(|v| v.eq_ignore_ascii_case("candle"));
    match BACKEND.get(|v| u8::from(!candle(v))) {
        0 => ConvBackend::Candle,
        _ => ConvBackend::Im2colGemm,
    }
}

/// Selects the backend of [`conv2d`] for the whole process (benchmarks compare the two).
pub fn set_conv_backend(backend: ConvBackend) {
    BACKEND.set(u8::from(backend == ConvBackend::Im2colGemm));
}

/// Cross-correlation of `x` (NCHW) with `w` (OIHW), no bias, with the process-wide backend
/// ([`conv_backend`]).
pub fn conv2d(x: &Tensor, w: &Tensor, geometry: ConvGeometry) -> Result<Tensor> {
    conv2d_with(x, w, geometry, conv_backend())
}

/// [`conv2d`] with an explicit backend.
pub fn conv2d_with(
    x: &Tensor,
    w: &Tensor,
    geometry: ConvGeometry,
    backend: ConvBackend,
) -> Result<Tensor> {
    conv2d_products_with(x, w, geometry, backend, Products::F32)
}

/// [`conv2d`] of f32 tensors whose products (and those of its gradients) use `products`, with
/// the process-wide backend.
pub fn conv2d_products(
    x: &Tensor,
    w: &Tensor,
    geometry: ConvGeometry,
    products: Products,
) -> Result<Tensor> {
    conv2d_products_with(x, w, geometry, conv_backend(), products)
}

/// [`conv2d_products`] with an explicit backend. candle's backend computes bf16 products by
/// rounding both operands to bf16 and convolving in f32 (the same numerics, another order of
/// the additions).
pub fn conv2d_products_with(
    x: &Tensor,
    w: &Tensor,
    geometry: ConvGeometry,
    backend: ConvBackend,
    products: Products,
) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (_, ci, kh, kw) = w.dims4()?;
    if ci != c || kh != geometry.kh || kw != geometry.kw {
        bail!(
            "conv2d: input {:?} and kernel {:?} do not match {geometry:?}",
            x.dims(),
            w.dims()
        )
    }
    geometry.out_size(h, wd)?;
    let custom = backend == ConvBackend::Im2colGemm
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32;
    if custom {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, Conv2dGemm(geometry, products))
    } else if products == Products::Bf16 {
        let round = |t: &Tensor| -> Result<Tensor> {
            let dtype = t.dtype();
            t.to_dtype(DType::BF16)?.to_dtype(dtype)
        };
        conv2d_candle(&round(x)?, &round(w)?, geometry)
    } else {
        conv2d_candle(x, w, geometry)
    }
}

/// candle's convolution. Padding that is not the same on every side is added explicitly, and
/// so is the cropping of rows/columns no window reaches when the two axes leave different
/// remainders: candle 0.11's conv2d backward derives the output padding of both axes from the
/// height alone.
fn conv2d_candle(x: &Tensor, w: &Tensor, g: ConvGeometry) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let (ho, wo) = g.out_size(h, wd)?;
    let used_h = (ho - 1) * g.stride + g.kh; // padded rows the windows reach
    let used_w = (wo - 1) * g.stride + g.kw;
    let spare_h = h + g.pad_top + g.pad_bottom - used_h;
    let spare_w = wd + g.pad_left + g.pad_right - used_w;
    if g.is_symmetric() && spare_h == spare_w {
        return x.conv2d(w, g.pad_top, g.stride, 1, 1);
    }
    x.pad_with_zeros(2, g.pad_top, g.pad_bottom)?
        .pad_with_zeros(3, g.pad_left, g.pad_right)?
        .narrow(2, 0, used_h)?
        .narrow(3, 0, used_w)?
        .conv2d(w, 0, g.stride, 1, 1)
}

// ---------------------------------------------------------------------------------------------
// Kernels on one image.

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    ho: usize,
    wo: usize,
    g: ConvGeometry,
}

impl Dims {
    fn new(g: ConvGeometry, (n, c, h, w): (usize, usize, usize, usize), o: usize) -> Result<Self> {
        let (ho, wo) = g.out_size(h, w)?;
        Ok(Self {
            n,
            c,
            h,
            w,
            o,
            ho,
            wo,
            g,
        })
    }

    /// Rows of the unfolded matrix: `C·kh·kw`.
    fn k(&self) -> usize {
        self.c * self.g.kh * self.g.kw
    }

    /// Output pixels per image.
    fn p(&self) -> usize {
        self.ho * self.wo
    }

    fn image_in(&self) -> usize {
        self.c * self.h * self.w
    }

    /// The same sizes for [`winograd`] (whose window is fixed: the output is as large as the
    /// input).
    fn winograd_sizes(&self) -> winograd::Sizes {
        winograd::Sizes {
            n: self.n,
            c: self.c,
            h: self.h,
            w: self.w,
            o: self.o,
        }
    }

    /// Images per chunk: whole images whose unfold holds about [`CHUNK_FLOATS`] floats, and at
    /// least [`CHUNK_MIN_PIXELS`] output pixels.
    fn chunk_images(&self) -> usize {
        let pixels = (CHUNK_FLOATS / self.k().max(1)).max(CHUNK_MIN_PIXELS);
        pixels.div_ceil(self.p()).clamp(1, self.n.max(1))
    }
}

/// Writes the unfold of one CHW image into columns `col0..col0 + Ho·Wo` of the row-major
/// `[C·kh·kw, ld]` matrix `dst` (every entry of those columns is written, zeros for padding).
fn im2col_image(d: &Dims, x: &[f32], dst: &mut [f32], ld: usize, col0: usize) {
    let g = d.g;
    let (h, w, wo) = (d.h, d.w, d.wo);
    let mut row = 0;
    for c in 0..d.c {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let out = &mut dst[row * ld + col0..row * ld + col0 + d.p()];
                row += 1;
                let (lo, hi) = g.valid_cols(j, w, wo);
                if g.stride == 1 && wo == w {
                    shifted_rows(d, plane, out, i, j, (lo, hi));
                    continue;
                }
                for (oh, o) in out.chunks_exact_mut(wo).enumerate() {
                    let Some(hi_row) = g.tap(oh, i, g.pad_top, h) else {
                        o.fill(0.0);
                        continue;
                    };
                    let src = &plane[hi_row * w..(hi_row + 1) * w];
                    o[..lo].fill(0.0);
                    o[hi..].fill(0.0);
                    if lo < hi {
                        let first = lo * g.stride + j - g.pad_left;
                        if g.stride == 1 {
                            o[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                        } else {
                            for (v, s) in o[lo..hi]
                                .iter_mut()
                                .zip(src[first..].iter().step_by(g.stride))
                            {
                                *v = *s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// [`im2col_image`]'s row `(c, i, j)` when the stride is 1 and the output is as wide as the
/// input: the valid output rows read one contiguous run of the plane shifted by `j - pad_left`,
/// copied at once, after which the `lo` first and `wo - hi` last columns (which picked up the
/// neighbouring rows' edge pixels) are zeroed. Avoids a short copy per output row.
fn shifted_rows(
    d: &Dims,
    plane: &[f32],
    out: &mut [f32],
    i: usize,
    j: usize,
    (lo, hi): (usize, usize),
) {
    let g = d.g;
    let (h, w, wo) = (d.h, d.w, d.wo);
    // Output rows whose input row oh + i - pad_top is inside the image.
    let oh_lo = g.pad_top.saturating_sub(i).min(d.ho);
    let oh_hi = (h + g.pad_top).saturating_sub(i).clamp(oh_lo, d.ho);
    out[..oh_lo * wo].fill(0.0);
    out[oh_hi * wo..].fill(0.0);
    if oh_lo == oh_hi {
        return;
    }
    let block = &mut out[oh_lo * wo..oh_hi * wo];
    // block[q] reads plane[start + q] (when inside the plane; outside it is a padding column).
    let start = ((oh_lo + i - g.pad_top) * w + j) as isize - g.pad_left as isize;
    let q0 = (-start).max(0) as usize;
    let q1 = ((h * w) as isize - start).clamp(q0 as isize, block.len() as isize) as usize;
    let s0 = (start + q0 as isize) as usize;
    block[q0..q1].copy_from_slice(&plane[s0..s0 + q1 - q0]);
    for q in (0..lo).chain(hi..wo) {
        for r in block.chunks_exact_mut(wo) {
            r[q] = 0.0;
        }
    }
}

/// [`col2im_image`]'s row `(c, i, j)` when the stride is 1 and the output is as wide as the
/// input: the mirror of [`shifted_rows`]. The padding columns of `from` are zeroed first, so
/// that one contiguous add over the shifted run drops them.
fn shifted_rows_add(
    d: &Dims,
    from: &mut [f32],
    plane: &mut [f32],
    i: usize,
    j: usize,
    (lo, hi): (usize, usize),
) {
    let g = d.g;
    let (h, w, wo) = (d.h, d.w, d.wo);
    let oh_lo = g.pad_top.saturating_sub(i).min(d.ho);
    let oh_hi = (h + g.pad_top).saturating_sub(i).clamp(oh_lo, d.ho);
    if oh_lo == oh_hi {
        return;
    }
    let block = &mut from[oh_lo * wo..oh_hi * wo];
    for q in (0..lo).chain(hi..wo) {
        for r in block.chunks_exact_mut(wo) {
            r[q] = 0.0;
        }
    }
    let start = ((oh_lo + i - g.pad_top) * w + j) as isize - g.pad_left as isize;
    let q0 = (-start).max(0) as usize;
    let q1 = ((h * w) as isize - start).clamp(q0 as isize, block.len() as isize) as usize;
    let s0 = (start + q0 as isize) as usize;
    for (v, s) in plane[s0..s0 + q1 - q0].iter_mut().zip(&block[q0..q1]) {
        *v += *s;
    }
}

/// Adds the fold of columns `col0..col0 + Ho·Wo` of the row-major `[C·kh·kw, ld]` matrix `src`
/// into one CHW image `dx` (entries that fall on padding are dropped). Overwrites with zeros
/// the entries of `src` that fall on left/right padding.
fn col2im_image(d: &Dims, src: &mut [f32], ld: usize, col0: usize, dx: &mut [f32]) {
    let g = d.g;
    let (h, w, wo) = (d.h, d.w, d.wo);
    let mut row = 0;
    for c in 0..d.c {
        let plane = &mut dx[c * h * w..(c + 1) * h * w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let from = &mut src[row * ld + col0..row * ld + col0 + d.p()];
                row += 1;
                let (lo, hi) = g.valid_cols(j, w, wo);
                if lo >= hi {
                    continue;
                }
                if g.stride == 1 && wo == w {
                    shifted_rows_add(d, from, plane, i, j, (lo, hi));
                    continue;
                }
                for (oh, s) in from.chunks_exact(wo).enumerate() {
                    let Some(hi_row) = g.tap(oh, i, g.pad_top, h) else {
                        continue;
                    };
                    let dst = &mut plane[hi_row * w..(hi_row + 1) * w];
                    let first = lo * g.stride + j - g.pad_left;
                    if g.stride == 1 {
                        for (v, s) in dst[first..first + hi - lo].iter_mut().zip(&s[lo..hi]) {
                            *v += *s;
                        }
                    } else {
                        for (v, s) in dst[first..].iter_mut().step_by(g.stride).zip(&s[lo..hi]) {
                            *v += *s;
                        }
                    }
                }
            }
        }
    }
}

/// Per-thread buffers of a chunk: the unfold (or Winograd's transformed input), a second
/// matrix, and a small third buffer.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) cols: Vec<f32>,
    pub(crate) other: Vec<f32>,
    pub(crate) extra: Vec<f32>,
}

/// Runs `f` with this thread's [`Scratch`], kept between tasks and ops: a fresh one per task
/// grew (and zero-filled) its buffers every time, 1.4 % of a pretraining step. A nested call
/// on the same thread gets an empty one, never a buffer in use.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    thread_local! {
        static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
    }
    let mut scratch = SCRATCH.take();
    let r = f(&mut scratch);
    SCRATCH.set(scratch);
    r
}

/// `Σ accumulate(acc, chunk, scratch)` over `chunks` chunks into `len` floats: partial sums over
/// `groups` (at most `chunks`) fixed ranges of chunks, in parallel, added in order, so the
/// result does not depend on rayon's work stealing and repeats bit for bit. One range runs on
/// the calling thread. The kernel gradients (im2col and Winograd) sum their chunks this way.
pub(crate) fn sum_over_chunks<F>(
    len: usize,
    chunks: usize,
    groups: usize,
    accumulate: F,
) -> Vec<f32>
where
    F: Fn(&mut [f32], usize, &mut Scratch) + Sync,
{
    let groups = groups.clamp(1, chunks.max(1));
    let range = |g: usize| {
        let mut acc = vec![0f32; len];
        with_scratch(|scratch| {
            for ci in g * chunks / groups..(g + 1) * chunks / groups {
                accumulate(&mut acc, ci, scratch);
            }
        });
        acc
    };
    if groups == 1 {
        return range(0);
    }
    let partials: Vec<Vec<f32>> = (0..groups).into_par_iter().map(range).collect();
    let mut total = vec![0f32; len];
    for part in partials {
        total.iter_mut().zip(&part).for_each(|(x, y)| *x += *y);
    }
    total
}

/// Number of chunks, and whether to run them in parallel with single-threaded GEMMs (else
/// serially with multi-threaded GEMMs, when there are too few chunks to keep the threads busy).
fn chunk_plan(d: &Dims) -> (usize, bool) {
    let chunks = d.n.div_ceil(d.chunk_images());
    let threads = rayon::current_num_threads();
    (chunks, threads == 1 || chunks >= 2 * threads)
}

fn gemm_parallelism(parallel_chunks: bool) -> Parallelism {
    if parallel_chunks {
        Parallelism::None
    } else {
        Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// Builds an output of `len` floats (whole images of `per_image` floats each) by running
/// `f(first image, output chunk, GEMM parallelism, scratch)` over its chunks, each zeroed first.
fn build_chunked<F>(d: &Dims, len: usize, per_image: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32], Parallelism, &mut Scratch) + Sync + Send,
{
    let gi = d.chunk_images();
    let (_, parallel) = chunk_plan(d);
    let par = gemm_parallelism(parallel);
    if per_image == 0 || len == 0 {
        return vec![0f32; len];
    }
    if parallel {
        par_build(len, gi * per_image, |ci, o| {
            with_scratch(|scratch| f(ci * gi, o, par, scratch))
        })
    } else {
        let mut out = par_zeroed(len);
        with_scratch(|scratch| {
            for (ci, o) in out.chunks_mut(gi * per_image).enumerate() {
                f(ci * gi, o, par, scratch);
            }
        });
        out
    }
}

/// The row stride of a scratch matrix whose rows hold `len` floats: `len`, or one cache line
/// more when `len` is a multiple of 256 floats (1 KiB). The GEMMs' packing reads such a matrix
/// across its rows, and rows a multiple of 1 KiB apart fall on a quarter or fewer of the L1
/// cache's sets: one image of a 32² plane (1,024 floats, 4 KiB) ran the forward convolution of
/// 16 channels at half the rate of a 28² or 30² one, 44–54 against 95–100 GFLOP/s.
fn row_stride(len: usize) -> usize {
    if len.is_multiple_of(256) {
        len + 16
    } else {
        len
    }
}

/// Unfolds images `n0..n0 + count` of `x` into `cols` as `[K, count·P]`; returns the row length
/// `count·P` and the row stride ([`row_stride`]).
fn unfold_chunk(
    d: &Dims,
    x: &[f32],
    n0: usize,
    count: usize,
    cols: &mut Vec<f32>,
) -> (usize, usize) {
    let ld = count * d.p();
    let rs = row_stride(ld);
    cols.resize(d.k() * rs, 0.0);
    for b in 0..count {
        let img = &x[(n0 + b) * d.image_in()..(n0 + b + 1) * d.image_in()];
        im2col_image(d, img, cols, rs, b * d.p());
    }
    (ld, rs)
}

/// The chunk's unfold as `(matrix, row length, row stride)`: the image itself for a single
/// image of a pointwise convolution, else [`unfold_chunk`] into `cols`.
fn chunk_cols<'a>(
    d: &Dims,
    x: &'a [f32],
    n0: usize,
    count: usize,
    cols: &'a mut Vec<f32>,
) -> (&'a [f32], usize, usize) {
    if count == 1 && d.g.is_pointwise() {
        (&x[n0 * d.image_in()..(n0 + 1) * d.image_in()], d.p(), d.p())
    } else {
        let (ld, rs) = unfold_chunk(d, x, n0, count, cols);
        (&cols[..], ld, rs)
    }
}

/// Images `n0..n0 + count` of the output gradient `gy` (`[N, O, P]`) as one `[O, count·P]`
/// matrix: `(matrix, row stride)`, read in place for one image whose rows [`row_stride`] leaves
/// as they are, else copied into `buf` with that stride.
fn chunk_grad<'a>(
    d: &Dims,
    gy: &'a [f32],
    n0: usize,
    count: usize,
    buf: &'a mut Vec<f32>,
) -> (&'a [f32], usize) {
    let (o, p) = (d.o, d.p());
    if count == 1 && row_stride(p) == p {
        return (&gy[n0 * o * p..(n0 + 1) * o * p], p);
    }
    let rs = row_stride(count * p);
    buf.resize(o * rs, 0.0);
    for b in 0..count {
        let img = &gy[(n0 + b) * o * p..(n0 + b + 1) * o * p];
        for (oc, row) in img.chunks_exact(p).enumerate() {
            buf[oc * rs + b * p..oc * rs + (b + 1) * p].copy_from_slice(row);
        }
    }
    (&buf[..], rs)
}

// ---------------------------------------------------------------------------------------------
// The custom ops.

/// The part of `data` that a contiguous `layout` covers (custom ops take contiguous inputs;
/// the other crates' CPU kernels use it too).
pub fn contiguous<'a, T>(op: &str, data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// [`contiguous`] of an f32 CPU storage.
pub fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: only f32 is supported")
    };
    contiguous(op, data, layout)
}

/// The convolution itself: `(x [N, C, H, W], w [O, C, kh, kw]) -> y [N, O, Ho, Wo]`, f32,
/// contiguous inputs, CPU, products in the arithmetic of the second field. Its backward runs
/// [`ConvInputGrad`] and [`ConvKernelGrad`] in the same arithmetic.
#[derive(Debug, Clone, Copy)]
pub struct Conv2dGemm(pub ConvGeometry, pub Products);

impl CustomOp2 for Conv2dGemm {
    fn name(&self) -> &'static str {
        "conv2d-im2col-gemm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), xs, xl)?;
        let w = contiguous_f32(self.name(), ws, wl)?;
        let (o, ci, kh, kw) = wl.shape().dims4()?;
        let d = Dims::new(self.0, xl.shape().dims4()?, o)?;
        if ci != d.c || kh != d.g.kh || kw != d.g.kw {
            bail!(
                "conv2d: kernel {:?} does not match input {:?}",
                wl.dims(),
                xl.dims()
            )
        }
        if winograd::applies(d.g, self.1, d.c, o, d.h * d.w) {
            let y = winograd::forward(d.winograd_sizes(), x, w)?;
            return Ok((CpuStorage::F32(y), Shape::from((d.n, o, d.ho, d.wo))));
        }
        let (p, k) = (d.p(), d.k());
        // bf16: the kernel is rounded and packed once for all chunks.
        let lhs = (self.1 == Products::Bf16).then(|| {
            PackedLhs::new(
                Mat {
                    data: w,
                    rs: k,
                    cs: 1,
                },
                o,
                k,
            )
        });
        let y = build_chunked(&d, d.n * o * p, o * p, |n0, out, par, scratch| {
            let count = out.len() / (o * p);
            let (cols, ld, cols_rs) = chunk_cols(&d, x, n0, count, &mut scratch.cols);
            if let Some(lhs) = &lhs {
                // Image by image, straight into the output: y_b [O, P] = W · (columns of image
                // b in cols); no [O, ld] buffer to copy out.
                for (b, img) in out.chunks_exact_mut(o * p).enumerate() {
                    let cols_b = Mat {
                        data: &cols[b * p..],
                        rs: cols_rs,
                        cs: 1,
                    };
                    lhs.gemm(p, MatMut::rows(img, p), false, cols_b, par);
                }
                return;
            }
            // Straight into the output for one image, unless its rows are a multiple of 1 KiB
            // apart (see [`row_stride`]); else into a buffer, copied out.
            let direct = count == 1 && row_stride(p) == p;
            let (dst, dld) = if direct {
                (&mut out[..], p)
            } else {
                let rs = row_stride(ld);
                scratch.other.resize(o * rs, 0.0);
                (&mut scratch.other[..], rs)
            };
            // y [O, ld] = W · cols, computed as [ld, O] = colsᵀ · Wᵀ (measured the faster order).
            let (dst, cols) = (MatMut::rows(dst, dld), Mat::rows(cols, cols_rs));
            let wt = Mat::rows(w, k).t();
            gemm_f32((ld, o, k), dst.t(), false, cols.t(), wt, par);
            if !direct {
                // [O, count·P] -> count images [O, P].
                for (b, img) in out.chunks_exact_mut(o * p).enumerate() {
                    for (oc, row) in img.chunks_exact_mut(p).enumerate() {
                        let from = oc * dld + b * p;
                        row.copy_from_slice(&scratch.other[from..from + p]);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((d.n, o, d.ho, d.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                w,
                &ConvInputGrad {
                    geometry: self.0,
                    h,
                    w: wd,
                    products: self.1,
                    path: None,
                },
            )?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &ConvKernelGrad(self.0, self.1))?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// Gradient of [`Conv2dGemm`] with respect to its input: `(gy [N, O, Ho, Wo], w [O, C, kh,
/// kw]) -> gx [N, C, H, W]` (a transposed convolution). CPU, f32, contiguous inputs.
#[derive(Debug, Clone, Copy)]
pub struct ConvInputGrad {
    /// The window of the forward convolution.
    pub geometry: ConvGeometry,
    /// Input height of the forward convolution.
    pub h: usize,
    /// Input width of the forward convolution.
    pub w: usize,
    /// The arithmetic of the product.
    pub products: Products,
    /// How to compute it; `None`: [`InputGradPath::choose`]'s choice.
    pub path: Option<InputGradPath>,
}

/// The two ways [`ConvInputGrad`] computes the gradient of a convolution's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputGradPath {
    /// The gradient of the unfolded input (`Wᵀ · gy`, a GEMM whose inner size is the output
    /// channels), folded back onto the image (an add per kernel tap). Any geometry.
    Fold,
    /// A forward convolution of the output gradient with the kernel flipped in space and its
    /// channel axes swapped: a GEMM whose inner size is `O·kh·kw`, and an unfold (a copy)
    /// instead of the fold. Stride 1 and padding at most `k - 1` only; other windows fold.
    Convolution,
}

impl InputGradPath {
    /// The path for a layer of window `g` from `c` input to `o` output channels with `p` output
    /// positions per image: the convolution where the window has one, the products are f32 and
    /// the layer is thin (`o <= 16`, where the fold's GEMM has an inner size of 16 or less), its
    /// planes small (`p <= 256`, where the fold adds short rows), or the convolution is one
    /// [`winograd`] computes; else the fold. The rule comes from timing both on the stride-1
    /// layers of the pipeline's and the CIFAR network (docs/performance.md); bf16 keeps the
    /// fold, the path measured on AMX.
    pub fn choose(g: ConvGeometry, products: Products, c: usize, o: usize, p: usize) -> Self {
        let Some(t) = g.transposed() else {
            return Self::Fold;
        };
        if products == Products::F32
            && (o <= 16 || p <= 256 || winograd::applies(t, products, o, c, p))
        {
            Self::Convolution
        } else {
            Self::Fold
        }
    }
}

impl ConvInputGrad {
    /// The window of the convolution path, if this op takes it for `c` input and `o` output
    /// channels and `p` output positions per image.
    fn convolution_window(&self, c: usize, o: usize, p: usize) -> Option<ConvGeometry> {
        let path = self
            .path
            .unwrap_or_else(|| InputGradPath::choose(self.geometry, self.products, c, o, p));
        match path {
            InputGradPath::Convolution => self.geometry.transposed(),
            InputGradPath::Fold => None,
        }
    }

    /// [`InputGradPath::Convolution`]: `gx = conv(gy, w')` in window `t`, where `w'[c, o, i, j]
    /// = w[o, c, kh - 1 - i, kw - 1 - j]`.
    fn by_convolution(
        &self,
        t: ConvGeometry,
        gs: &CpuStorage,
        gl: &Layout,
        w: &[f32],
        (n, c, o): (usize, usize, usize),
    ) -> Result<(CpuStorage, Shape)> {
        let taps = self.geometry.kh * self.geometry.kw;
        let mut flipped = vec![0f32; w.len()];
        for (oc, filter) in w.chunks_exact(c * taps).enumerate() {
            for (ic, kernel) in filter.chunks_exact(taps).enumerate() {
                let dst = &mut flipped[(ic * o + oc) * taps..(ic * o + oc + 1) * taps];
                for (tap, v) in kernel.iter().enumerate() {
                    dst[taps - 1 - tap] = *v;
                }
            }
        }
        let layout = Layout::contiguous((c, o, self.geometry.kh, self.geometry.kw));
        let (gx, shape) =
            Conv2dGemm(t, self.products).cpu_fwd(gs, gl, &CpuStorage::F32(flipped), &layout)?;
        // `Ho + (kh - 1 - pad_top) + (kh - 1 - pad_bottom) - kh + 1 = H`, and the same across.
        debug_assert_eq!(shape.dims(), [n, c, self.h, self.w]);
        Ok((gx, shape))
    }
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-im2col-gemm-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gy = contiguous_f32(self.name(), gs, gl)?;
        let w = contiguous_f32(self.name(), ws, wl)?;
        let (n, o, ho, wo) = gl.shape().dims4()?;
        let (o2, c, _, _) = wl.shape().dims4()?;
        let d = Dims::new(self.geometry, (n, c, self.h, self.w), o)?;
        if o2 != o || (d.ho, d.wo) != (ho, wo) {
            bail!(
                "conv2d input grad: {:?} and kernel {:?} do not match",
                gl.dims(),
                wl.dims()
            )
        }
        if let Some(t) = self.convolution_window(c, o, d.p()) {
            return self.by_convolution(t, gs, gl, w, (n, c, o));
        }
        let (p, k) = (d.p(), d.k());
        // bf16: Wᵀ [K, O] rounded and packed once for all chunks.
        let lhs = (self.products == Products::Bf16).then(|| {
            PackedLhs::new(
                Mat {
                    data: w,
                    rs: 1,
                    cs: k,
                },
                k,
                o,
            )
        });
        let gx = build_chunked(
            &d,
            n * d.image_in(),
            d.image_in(),
            |n0, out, par, scratch| {
                let count = out.len() / d.image_in();
                let ld = count * p;
                let rs = row_stride(ld);
                scratch.cols.resize(k * rs, 0.0);
                if let Some(lhs) = &lhs {
                    // cols-grad [K, ld] = Wᵀ · g image by image, each image's gradient read
                    // where it is (no [O, ld] copy).
                    for b in 0..count {
                        let g_b = Mat::rows(&gy[(n0 + b) * o * p..(n0 + b + 1) * o * p], p);
                        let dst = MatMut {
                            data: &mut scratch.cols[b * p..],
                            rs,
                            cs: 1,
                        };
                        lhs.gemm(p, dst, false, g_b, par);
                    }
                } else {
                    // cols-grad [K, ld] = Wᵀ · g, computed as [ld, K] = gᵀ · W (measured the
                    // faster order).
                    let (g, g_rs) = chunk_grad(&d, gy, n0, count, &mut scratch.other);
                    let (dst, g) = (MatMut::rows(&mut scratch.cols, rs), Mat::rows(g, g_rs));
                    let w = Mat::rows(w, k);
                    gemm_f32((ld, k, o), dst.t(), false, g.t(), w, par);
                }
                for (b, img) in out.chunks_exact_mut(d.image_in()).enumerate() {
                    col2im_image(&d, &mut scratch.cols, rs, b * p, img);
                }
            },
        );
        Ok((CpuStorage::F32(gx), Shape::from((n, c, self.h, self.w))))
    }
}

/// Gradient of [`Conv2dGemm`] with respect to its kernel: `(x [N, C, H, W], gy [N, O, Ho, Wo])
/// -> gw [O, C, kh, kw]`. CPU, f32, contiguous inputs, products in the arithmetic of the second
/// field.
#[derive(Debug, Clone, Copy)]
pub struct ConvKernelGrad(pub ConvGeometry, pub Products);

impl CustomOp2 for ConvKernelGrad {
    fn name(&self) -> &'static str {
        "conv2d-im2col-gemm-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), xs, xl)?;
        let gy = contiguous_f32(self.name(), gs, gl)?;
        let (n, o, ho, wo) = gl.shape().dims4()?;
        let d = Dims::new(self.0, xl.shape().dims4()?, o)?;
        if n != d.n || (d.ho, d.wo) != (ho, wo) {
            bail!(
                "conv2d kernel grad: {:?} and {:?} do not match",
                xl.dims(),
                gl.dims()
            )
        }
        if winograd::applies_to_kernel_grad(d.g, self.1, d.c, o, d.h * d.w) {
            let gw = winograd::kernel_grad(d.winograd_sizes(), x, gy)?;
            return Ok((CpuStorage::F32(gw), Shape::from((o, d.c, d.g.kh, d.g.kw))));
        }
        let k = d.k();
        let gi = d.chunk_images();
        let (chunks, parallel) = chunk_plan(&d);
        let par = gemm_parallelism(parallel);
        // gWᵀ [K, O] += colsᵀ [K, ld] · gᵀ [ld, O], accumulated O-contiguous (measured faster than
        // K-contiguous, also for narrow layers) and transposed at the end.
        let accumulate = |acc: &mut [f32], ci: usize, scratch: &mut Scratch| {
            let n0 = ci * gi;
            let count = gi.min(n - n0);
            let (cols, ld, cols_rs) = chunk_cols(&d, x, n0, count, &mut scratch.cols);
            let (g, gld) = chunk_grad(&d, gy, n0, count, &mut scratch.other);
            let (dst, cols) = (MatMut::rows(acc, o), Mat::rows(cols, cols_rs));
            let gt = Mat {
                data: g,
                rs: 1,
                cs: gld,
            };
            match self.1 {
                Products::F32 => gemm_f32((k, o, ld), dst, true, cols, gt, par),
                Products::Bf16 => gemm_bf16((k, o, ld), dst, true, cols, gt, par),
            }
        };
        // In parallel: as many ranges as fit in about 16 MiB of partial kernels (for balance),
        // at least one per thread; else one range, with multi-threaded GEMMs.
        let groups = if parallel {
            let fit = (1 << 22) / (o * k).max(1);
            fit.max(rayon::current_num_threads())
        } else {
            1
        };
        let gw = sum_over_chunks(o * k, chunks, groups, accumulate);
        let mut out = vec![0f32; o * k];
        for (kk, row) in gw.chunks_exact(o.max(1)).enumerate() {
            for (oc, v) in row.iter().enumerate() {
                out[oc * k + kk] = *v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((o, d.c, d.g.kh, d.g.kw))))
    }
}

/// Unfolds an NCHW f32 tensor `[N, C, H, W]` into `[N, C·kh·kw, Ho·Wo]`: entry
/// `(n, (c, i, j), (ho, wo))` is the input pixel under kernel tap `(i, j)` of output pixel
/// `(ho, wo)` in channel `c` (zero on padding), so `conv2d(x, w)[n] = w.reshape(O, C·kh·kw) ·
/// im2col(x)[n]`. The layout [`Conv2dGemm`] unfolds its chunks into. Its gradient is [`Col2Im`].
/// CPU only.
#[derive(Debug, Clone, Copy)]
pub struct Im2Col(pub ConvGeometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), storage, layout)?;
        let d = Dims::new(self.0, layout.shape().dims4()?, 0)?;
        let (p, k) = (d.p(), d.k());
        let mut out = par_zeroed(d.n * k * p);
        if k * p > 0 {
            out.par_chunks_mut(k * p)
                .zip(x.par_chunks(d.image_in().max(1)))
                .for_each(|(dst, img)| im2col_image(&d, img, dst, p, 0));
        }
        Ok((CpuStorage::F32(out), Shape::from((d.n, k, p))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, c, h, w) = arg.dims4()?;
        let g = grad_res.contiguous()?.apply_op1(Col2Im {
            geometry: self.0,
            c,
            h,
            w,
        })?;
        Ok(Some(g))
    }
}

/// The adjoint of [`Im2Col`]: folds `[N, C·kh·kw, Ho·Wo]` back into an NCHW `[N, C, H, W]`
/// tensor, summing the entries of all windows that cover the same input pixel (entries on
/// padding are dropped). CPU only.
#[derive(Debug, Clone, Copy)]
pub struct Col2Im {
    /// The window of the convolution.
    pub geometry: ConvGeometry,
    /// Channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = contiguous_f32(self.name(), storage, layout)?;
        let (n, k, p) = layout.shape().dims3()?;
        let d = Dims::new(self.geometry, (n, self.c, self.h, self.w), 0)?;
        if k != d.k() || p != d.p() {
            bail!(
                "col2im: [{n}, {k}, {p}] is not an unfold of {}x{}x{} with {:?}",
                d.c,
                d.h,
                d.w,
                d.g
            )
        }
        let mut out = par_zeroed(n * d.image_in());
        if k * p > 0 && d.image_in() > 0 {
            out.par_chunks_mut(d.image_in())
                .zip(cols.par_chunks(k * p))
                .for_each_init(Vec::new, |buf, (img, src)| {
                    buf.clear();
                    buf.extend_from_slice(src);
                    col2im_image(&d, buf, p, 0, img)
                });
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, self.c, self.h, self.w)),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad_res.contiguous()?.apply_op1(Im2Col(self.geometry))?,
        ))
    }
}
