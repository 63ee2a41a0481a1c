//! 2-D convolution on the CPU as im2col + GEMM, built from candle custom ops.
//!
//! Why this exists: candle 0.11's CPU convolution is slow where training spends its time. Its
//! input gradient is a direct dot-product loop rather than a GEMM (about 13 GFLOP/s, nearly half
//! of a ResNet training step), and its forward pass and weight gradient use a scalar,
//! single-threaded im2col (30–40 GFLOP/s). Here the convolution is rewritten as
//!
//! ```text
//! x (NCHW) --transpose--> NHWC --Im2Col--> cols [N·Ho·Wo, kh·kw·C]
//! y = cols · Wᵀ           (W reordered to [O, kh·kw·C], candle's matmul = the `gemm` crate)
//! y [N, Ho·Wo, O] --transpose--> NCHW
//! ```
//!
//! so the forward pass, the input gradient (`grad · W`, then [`Col2Im`], the adjoint of
//! [`Im2Col`]) and the weight gradient (`colsᵀ · grad`) are all GEMMs, and candle's autograd
//! differentiates the composition. The unfold works on NHWC so that every window row it copies
//! is one contiguous run of `kw·C` floats. 1×1 stride-1 unpadded convolutions skip the unfold.
//!
//! Only f32 tensors on the CPU take this path; anything else (other dtypes, CUDA, Metal) falls
//! back to candle's own `conv2d`, as does everything when [`ConvBackend::Candle`] is selected
//! (environment variable `SIMCLR_CONV=candle`, or [`set_conv_backend`]).

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Roughly how many output floats one parallel task should produce.
const TASK_FLOATS: usize = 1 << 14;

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

    fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.stride == 1
            && self.pad_top + self.pad_left + self.pad_bottom + self.pad_right == 0
    }

    /// For output column `wo`: the first input column of the window (may be negative) and the
    /// range `jlo..jhi` of kernel columns that fall inside the input of width `w`.
    #[inline]
    fn col_range(&self, wo: usize, w: usize) -> (isize, usize, usize) {
        let w0 = (wo * self.stride) as isize - self.pad_left as isize;
        let jlo = (-w0).max(0) as usize;
        let jhi = (w as isize - w0).clamp(0, self.kw as isize) as usize;
        (w0, jlo, jhi.max(jlo))
    }
}

/// Which implementation [`conv2d`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvBackend {
    /// candle's own `Tensor::conv2d` (the reference).
    Candle,
    /// im2col + GEMM custom ops (f32 on the CPU; other cases fall back to candle).
    Im2colGemm,
}

/// 0: not read yet, 1: candle, 2: im2col + GEMM.
static BACKEND: AtomicU8 = AtomicU8::new(0);

/// The backend [`conv2d`] uses: set by [`set_conv_backend`], else read once from the
/// environment variable `SIMCLR_CONV` (`candle` selects candle's convolution), else
/// [`ConvBackend::Im2colGemm`].
pub fn conv_backend() -> ConvBackend {
    match BACKEND.load(Ordering::Relaxed) {
        1 => ConvBackend::Candle,
        2 => ConvBackend::Im2colGemm,
        _ => {
            let b = match std::env::var("SIMCLR_CONV") {
                Ok(v) if v.eq_ignore_ascii_case("candle") => ConvBackend::Candle,
                _ => ConvBackend::Im2colGemm,
            };
            // Keep an explicit choice made meanwhile by another thread.
            let _ = BACKEND.compare_exchange(0, code(b), Ordering::Relaxed, Ordering::Relaxed);
            conv_backend()
        }
    }
}

/// Selects the backend of [`conv2d`] for the whole process (benchmarks compare the two).
pub fn set_conv_backend(backend: ConvBackend) {
    BACKEND.store(code(backend), Ordering::Relaxed);
}

fn code(b: ConvBackend) -> u8 {
    match b {
        ConvBackend::Candle => 1,
        ConvBackend::Im2colGemm => 2,
    }
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
        conv2d_gemm(x, w, geometry)
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

fn conv2d_gemm(x: &Tensor, w: &Tensor, g: ConvGeometry) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    let (ho, wo) = g.out_size(h, wd)?;
    let k = g.kh * g.kw * c;
    // NCHW -> NHWC.
    let xh = x
        .reshape((n, c, h * wd))?
        .apply_op1(SwapLast2)?
        .reshape((n, h, wd, c))?;
    // OIHW -> [O, kh·kw·C] in the (i, j, c) order of the unfolded rows.
    let wm = w.permute((0, 2, 3, 1))?.reshape((o, k))?;
    let cols = if g.is_pointwise() {
        xh.reshape((n * h * wd, c))?
    } else {
        xh.apply_op1(Im2Col(g))?
    };
    let y = cols.matmul(&wm.t()?)?; // [N·Ho·Wo, O]
    y.reshape((n, ho * wo, o))?
        .apply_op1(SwapLast2)?
        .reshape((n, o, ho, wo))
}

fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: only f32 is supported")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// Unfolds an NHWC f32 tensor `[N, H, W, C]` into the matrix `[N·Ho·Wo, kh·kw·C]` whose row
/// `(n, ho, wo)` holds the window of output pixel `(ho, wo)` of image `n` in `(i, j, c)` order
/// (kernel row, kernel column, channel), with zeros where the window covers padding. Its
/// gradient is [`Col2Im`]. CPU only.
#[derive(Debug, Clone, Copy)]
pub struct Im2Col(pub ConvGeometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), storage, layout)?;
        let (n, h, w, c) = layout.shape().dims4()?;
        let g = self.0;
        let (ho, wo) = g.out_size(h, w)?;
        let k = g.kh * g.kw * c;
        let row = wo * k; // floats per output row (n, ho)
        let mut out = vec![0f32; n * ho * row];
        if row > 0 {
            let min_len = TASK_FLOATS.div_ceil(row);
            out.par_chunks_mut(row)
                .enumerate()
                .with_min_len(min_len)
                .for_each(|(r, dst)| {
                    let (b, oh) = (r / ho, r % ho);
                    let img = &x[b * h * w * c..(b + 1) * h * w * c];
                    for i in 0..g.kh {
                        let hi = (oh * g.stride + i) as isize - g.pad_top as isize;
                        if hi < 0 || hi >= h as isize {
                            continue;
                        }
                        let src = &img[hi as usize * w * c..(hi as usize + 1) * w * c];
                        for ow in 0..wo {
                            let (w0, jlo, jhi) = g.col_range(ow, w);
                            if jhi == jlo {
                                continue;
                            }
                            let s0 = (w0 + jlo as isize) as usize * c;
                            let d0 = ow * k + (i * g.kw + jlo) * c;
                            let len = (jhi - jlo) * c;
                            dst[d0..d0 + len].copy_from_slice(&src[s0..s0 + len]);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((n * ho * wo, k))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, h, w, c) = arg.dims4()?;
        let g = grad_res.contiguous()?.apply_op1(Col2Im {
            geometry: self.0,
            h,
            w,
            c,
        })?;
        Ok(Some(g))
    }
}

/// The adjoint of [`Im2Col`]: folds `[N·Ho·Wo, kh·kw·C]` back into an NHWC `[N, H, W, C]`
/// tensor, summing the entries of every window that covers the same input pixel (padding
/// entries are dropped). CPU only.
#[derive(Debug, Clone, Copy)]
pub struct Col2Im {
    /// The window of the convolution.
    pub geometry: ConvGeometry,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Channels.
    pub c: usize,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = contiguous_f32(self.name(), storage, layout)?;
        let (rows, k) = layout.shape().dims2()?;
        let Self {
            geometry: g,
            h,
            w,
            c,
        } = *self;
        let (ho, wo) = g.out_size(h, w)?;
        if k != g.kh * g.kw * c || ho * wo == 0 || rows % (ho * wo) != 0 {
            bail!("col2im: a [{rows}, {k}] matrix does not unfold {h}x{w}x{c} with {g:?}")
        }
        let n = rows / (ho * wo);
        let row = w * c; // floats per output row (n, hi)
        let mut out = vec![0f32; n * h * row];
        if row > 0 {
            let min_len = TASK_FLOATS.div_ceil(row);
            // Each task owns whole input rows and gathers every window entry that lands there,
            // so no two threads write the same element.
            out.par_chunks_mut(row)
                .enumerate()
                .with_min_len(min_len)
                .for_each(|(r, dst)| {
                    let (b, hi) = (r / h, r % h);
                    for i in 0..g.kh {
                        let t = (hi + g.pad_top) as isize - i as isize;
                        if t < 0 || t as usize % g.stride != 0 {
                            continue;
                        }
                        let oh = t as usize / g.stride;
                        if oh >= ho {
                            continue;
                        }
                        let src = &cols[(b * ho + oh) * wo * k..(b * ho + oh + 1) * wo * k];
                        for ow in 0..wo {
                            let (w0, jlo, jhi) = g.col_range(ow, w);
                            if jhi == jlo {
                                continue;
                            }
                            let d0 = (w0 + jlo as isize) as usize * c;
                            let s0 = ow * k + (i * g.kw + jlo) * c;
                            let len = (jhi - jlo) * c;
                            for (d, s) in dst[d0..d0 + len].iter_mut().zip(&src[s0..s0 + len]) {
                                *d += *s;
                            }
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, c))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad_res.contiguous()?.apply_op1(Im2Col(self.geometry))?,
        ))
    }
}

/// Batched transpose of the last two axes of a contiguous f32 `[B, R, C]` tensor into a
/// contiguous `[B, C, R]` one (NCHW <-> NHWC with `R, C = C, H·W` or the reverse). It is its own
/// adjoint. CPU only.
#[derive(Debug, Clone, Copy)]
pub struct SwapLast2;

const TILE: usize = 32;

impl CustomOp1 for SwapLast2 {
    fn name(&self) -> &'static str {
        "swap-last-2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), storage, layout)?;
        let (b, r, c) = layout.shape().dims3()?;
        let mut out = vec![0f32; b * r * c];
        if r > 0 && c > 0 {
            // A task writes TILE output rows (input columns) of one matrix.
            let blocks = c.div_ceil(TILE);
            let min_len = TASK_FLOATS.div_ceil(TILE * r);
            let mut chunks: Vec<&mut [f32]> = Vec::with_capacity(b * blocks);
            for m in out.chunks_mut(r * c) {
                chunks.extend(m.chunks_mut(TILE * r));
            }
            chunks
                .into_par_iter()
                .enumerate()
                .with_min_len(min_len)
                .for_each(|(t, dst)| {
                    let (m, cb) = (t / blocks, (t % blocks) * TILE);
                    let src = &x[m * r * c..(m + 1) * r * c];
                    let nc = dst.len() / r;
                    for rb in (0..r).step_by(TILE) {
                        let re = (rb + TILE).min(r);
                        for j in 0..nc {
                            let d = &mut dst[j * r + rb..j * r + re];
                            for (ri, v) in d.iter_mut().enumerate() {
                                *v = src[(rb + ri) * c + cb + j];
                            }
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, r))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(SwapLast2)?))
    }
}
