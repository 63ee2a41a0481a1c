//! NT-Xent's element passes as fused kernels (candle custom ops): the row normalisation and the
//! masked softmax cross-entropy over the similarity matrix, each forward and backward in one
//! pass, on the CPU and (with the `cuda` feature) on the GPU. The similarity matrix itself is a
//! GEMM and stays one (`matmul`: cuBLAS on the GPU, `gemm` on the CPU).
//!
//! Why: written with candle's ops, the loss is about twenty passes over the `2n × W` logits
//! (scale, mask, concatenate, max, subtract, exp, sum, log, pick, and their gradients), each
//! with its own buffer. Here it is one pass forward and one backward.
//!
//! Only contiguous f32 tensors take the kernels; f64 (the tests' independent computation) and
//! other dtypes run the reference compositions [`l2_normalize_reference`] and
//! [`contrastive_ce_reference`], which follow the official code op for op (the masked column is
//! pushed to `−1e9`, where the kernels skip it: `exp` of it is exactly 0 in f32 either way).

use crate::conv::contiguous_f32;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

/// The constant the official code subtracts from the self-similarity logits.
pub const LARGE_NUM: f64 = 1e9;

/// TF's `l2_normalize` epsilon, a lower bound on the squared norm.
pub const L2_NORMALIZE_EPSILON: f64 = 1e-12;

fn is_fast(x: &Tensor) -> bool {
    let kernel_device = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
    kernel_device && x.dtype() == DType::F32
}

/// Row-wise `x / sqrt(max(Σx², 1e-12))` (TF's `l2_normalize`) of a `[rows, d]` tensor.
/// Differentiable.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.dims2()?;
    if is_fast(x) {
        x.contiguous()?.apply_op1(L2Normalize)
    } else {
        l2_normalize_reference(x)
    }
}

/// [`l2_normalize`] with candle's ops, along the last axis of any rank.
pub fn l2_normalize_reference(x: &Tensor) -> Result<Tensor> {
    let sum_sq = x.sqr()?.sum_keepdim(D::Minus1)?;
    let inv_norm = sum_sq.maximum(L2_NORMALIZE_EPSILON)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_norm)
}

/// Where the positive and the self-similarity of each anchor sit in the similarity matrix.
///
/// The matrix is `[a1; a2]·[c1; c2; extra]ᵀ`: `2n` local anchors (view 1, then view 2) against
/// the gathered candidates of view 1 (`global` rows), of view 2 (`global` rows) and any extra
/// negatives. Local anchor `i` is global row `offset + i` (`offset = rank·n`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContrastLayout {
    /// Local images per view.
    pub n: usize,
    /// Global index of this replica's first image (`rank·n`).
    pub offset: usize,
    /// Images per view over all replicas.
    pub global: usize,
    /// `1/τ`.
    pub inv_t: f64,
}

impl ContrastLayout {
    /// `(positive, masked)` columns of row `r`: view-1 anchors find their positive among the
    /// view-2 candidates and their own copy among the view-1 candidates, and the other way
    /// round.
    pub fn columns(&self, r: usize) -> (usize, usize) {
        if r < self.n {
            (self.global + self.offset + r, self.offset + r)
        } else {
            let i = r - self.n;
            (self.offset + i, self.global + self.offset + i)
        }
    }

    fn check(&self, op: &str, dims: &[usize]) -> Result<(usize, usize)> {
        let [rows, w] = dims else {
            bail!("{op}: expected a [2n, W] similarity matrix, got {dims:?}")
        };
        let fits = self.n > 0 && *rows == 2 * self.n && *w >= 2 * self.global;
        if !fits || self.offset + self.n > self.global {
            bail!("{op}: similarity {dims:?} does not fit the layout {self:?}")
        }
        Ok((*rows, *w))
    }
}

/// The per-row softmax cross-entropy of NT-Xent, `[2n]`: for row `r` with positive `p` and
/// masked column `m` (see [`ContrastLayout::columns`]),
/// `logsumexp_{j ≠ m}(s_rj/τ) − s_rp/τ`. Differentiable in `s`.
pub fn contrastive_ce(s: &Tensor, layout: ContrastLayout) -> Result<Tensor> {
    layout.check("contrastive cross-entropy", s.dims())?;
    if is_fast(s) {
        s.contiguous()?.apply_op1(ContrastiveCe(layout))
    } else {
        contrastive_ce_reference(s, layout)
    }
}

/// [`contrastive_ce`] as the official code computes it: logits `s/τ − 1e9·mask`, softmax
/// cross-entropy against one-hot labels.
pub fn contrastive_ce_reference(s: &Tensor, layout: ContrastLayout) -> Result<Tensor> {
    let (rows, w) = layout.check("contrastive cross-entropy", s.dims())?;
    let (pos, masked): (Vec<usize>, Vec<usize>) = (0..rows).map(|r| layout.columns(r)).unzip();
    let mask = one_hot(&masked, w, s.dtype(), s.device())?;
    let targets = one_hot(&pos, w, s.dtype(), s.device())?;
    let logits = ((s * layout.inv_t)? - (mask * LARGE_NUM)?)?;
    softmax_cross_entropy(&logits, &targets)
}

/// `rows × width` one-hot matrix with a 1 at `(i, labels[i])`.
pub fn one_hot(labels: &[usize], width: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; labels.len() * width];
    for (i, &l) in labels.iter().enumerate() {
        if l >= width {
            bail!("label {l} out of range for {width} columns")
        }
        v[i * width + l] = 1.0;
    }
    Tensor::from_vec(v, (labels.len(), width), device)?.to_dtype(dtype)
}

/// Per-row softmax cross-entropy `logsumexp(x_i) − Σ_j t_ij x_ij` for one-hot targets `t`,
/// with the row maximum subtracted before exponentiating.
pub fn softmax_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_sum_exp = (log_sum_exp + max)?.squeeze(D::Minus1)?;
    let picked = (logits * targets)?.sum(D::Minus1)?;
    log_sum_exp - picked
}

// ---------------------------------------------------------------------------------------------
// CPU kernels.

/// `(Σx², 1/sqrt(max(Σx², eps)))` of a row.
fn row_norm(x: &[f32]) -> (f32, f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    (ss, 1.0 / ss.max(L2_NORMALIZE_EPSILON as f32).sqrt())
}

fn l2_forward(x: &[f32], d: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    if d > 0 {
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(yr, xr)| {
                let (_, inv) = row_norm(xr);
                for (o, v) in yr.iter_mut().zip(xr) {
                    *o = v * inv;
                }
            });
    }
    y
}

/// `dx = (g − y·(g·y))·inv`, or `g·inv` where the norm was clamped (constant there).
fn l2_backward(x: &[f32], y: &[f32], g: &[f32], d: usize) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    if d > 0 {
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .zip(y.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|((dr, xr), (yr, gr))| {
                let (ss, inv) = row_norm(xr);
                let dot: f32 = gr.iter().zip(yr).map(|(a, b)| a * b).sum();
                let proj = if ss > L2_NORMALIZE_EPSILON as f32 {
                    dot
                } else {
                    0.0
                };
                for ((o, gv), yv) in dr.iter_mut().zip(gr).zip(yr) {
                    *o = (gv - yv * proj) * inv;
                }
            });
    }
    dx
}

/// The loss of each row (log-sum-exp in f64 over the unmasked columns).
fn ce_forward(s: &[f32], w: usize, layout: ContrastLayout) -> Vec<f32> {
    let inv_t = layout.inv_t as f32;
    s.par_chunks(w)
        .enumerate()
        .map(|(r, row)| {
            let (pos, masked) = layout.columns(r);
            let mut m = f32::NEG_INFINITY;
            for (j, &v) in row.iter().enumerate() {
                if j != masked {
                    m = m.max(v * inv_t);
                }
            }
            let e: f64 = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != masked)
                .map(|(_, &v)| (v * inv_t - m).exp() as f64)
                .sum();
            m + (e as f32).ln() - row[pos] * inv_t
        })
        .collect()
}

/// `ds = g_r/τ·(softmax − onehot(pos))`, 0 in the masked column; the log-sum-exp is the loss
/// plus the positive's logit.
fn ce_backward(s: &[f32], loss: &[f32], g: &[f32], w: usize, layout: ContrastLayout) -> Vec<f32> {
    let inv_t = layout.inv_t as f32;
    let mut ds = vec![0f32; s.len()];
    ds.par_chunks_mut(w)
        .zip(s.par_chunks(w))
        .enumerate()
        .for_each(|(r, (dr, row))| {
            let (pos, masked) = layout.columns(r);
            let lse = loss[r] + row[pos] * inv_t;
            let scale = g[r] * inv_t;
            for (j, (o, &v)) in dr.iter_mut().zip(row).enumerate() {
                let p = if j == masked {
                    0.0
                } else {
                    (v * inv_t - lse).exp()
                };
                let t = if j == pos { 1.0 } else { 0.0 };
                *o = if j == masked { 0.0 } else { scale * (p - t) };
            }
        });
    ds
}

// ---------------------------------------------------------------------------------------------
// The custom ops.

#[derive(Debug, Clone, Copy)]
struct L2Normalize;

impl CustomOp1 for L2Normalize {
    fn name(&self) -> &'static str {
        "l2-normalize"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), storage, layout)?;
        let (_, d) = layout.shape().dims2()?;
        Ok((CpuStorage::F32(l2_forward(x, d)), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, d) = layout.shape().dims2()?;
        let x = crate::cuda::view::<f32>(self.name(), storage, layout)?;
        let y = gpu::l2_normalize(&storage.device, &x, rows, d)?;
        let y = candle_core::CudaStorage::wrap_cuda_slice(y, storage.device.clone());
        Ok((y, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(
            res,
            &grad.contiguous()?,
            &L2NormalizeGrad,
        )?))
    }
}

/// `(x, y, dy) -> dx` of [`L2Normalize`].
#[derive(Debug, Clone, Copy)]
struct L2NormalizeGrad;

impl CustomOp3 for L2NormalizeGrad {
    fn name(&self) -> &'static str {
        "l2-normalize-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, y, g) = (
            contiguous_f32(name, xs, xl)?,
            contiguous_f32(name, ys, yl)?,
            contiguous_f32(name, gs, gl)?,
        );
        let (_, d) = xl.shape().dims2()?;
        if y.len() != x.len() || g.len() != x.len() {
            bail!("{name}: inconsistent shapes")
        }
        Ok((CpuStorage::F32(l2_backward(x, y, g, d)), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::view;
        let name = self.name();
        let (rows, d) = xl.shape().dims2()?;
        if yl.dims() != xl.dims() || gl.dims() != xl.dims() {
            bail!("{name}: inconsistent shapes")
        }
        let (x, y, g) = (
            view(name, xs, xl)?,
            view(name, ys, yl)?,
            view(name, gs, gl)?,
        );
        let dx = gpu::l2_normalize_grad(&xs.device, &x, &y, &g, rows, d)?;
        let dx = candle_core::CudaStorage::wrap_cuda_slice(dx, xs.device.clone());
        Ok((dx, xl.shape().clone()))
    }
}

#[derive(Debug, Clone, Copy)]
struct ContrastiveCe(ContrastLayout);

impl CustomOp1 for ContrastiveCe {
    fn name(&self) -> &'static str {
        "contrastive-ce"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = contiguous_f32(self.name(), storage, layout)?;
        let (rows, w) = self.0.check(self.name(), layout.dims())?;
        Ok((CpuStorage::F32(ce_forward(s, w, self.0)), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, w) = self.0.check(self.name(), layout.dims())?;
        let s = crate::cuda::view::<f32>(self.name(), storage, layout)?;
        let loss = gpu::contrastive_ce(&storage.device, &s, w, self.0)?;
        let loss = candle_core::CudaStorage::wrap_cuda_slice(loss, storage.device.clone());
        Ok((loss, Shape::from(rows)))
    }

    fn bwd(&self, s: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(s.apply_op3_no_bwd(
            res,
            &grad,
            &ContrastiveCeGrad(self.0),
        )?))
    }
}

/// `(s, loss, dloss) -> ds` of [`ContrastiveCe`].
#[derive(Debug, Clone, Copy)]
struct ContrastiveCeGrad(ContrastLayout);

impl CustomOp3 for ContrastiveCeGrad {
    fn name(&self) -> &'static str {
        "contrastive-ce-grad"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        ls: &CpuStorage,
        ll: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (rows, w) = self.0.check(name, sl.dims())?;
        let (s, loss, g) = (
            contiguous_f32(name, ss, sl)?,
            contiguous_f32(name, ls, ll)?,
            contiguous_f32(name, gs, gl)?,
        );
        if loss.len() != rows || g.len() != rows {
            bail!("{name}: inconsistent shapes")
        }
        Ok((
            CpuStorage::F32(ce_backward(s, loss, g, w, self.0)),
            sl.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::view;
        let name = self.name();
        let (rows, w) = self.0.check(name, sl.dims())?;
        if ll.dims() != [rows] || gl.dims() != [rows] {
            bail!("{name}: inconsistent shapes")
        }
        let (s, loss, g) = (
            view(name, ss, sl)?,
            view(name, ls, ll)?,
            view(name, gs, gl)?,
        );
        let ds = gpu::contrastive_ce_grad(&ss.device, &s, &loss, &g, w, self.0)?;
        let ds = candle_core::CudaStorage::wrap_cuda_slice(ds, ss.device.clone());
        Ok((ds, sl.shape().clone()))
    }
}

/// The launches of the CUDA twins (`src/cuda/kernels.cu`).
#[cfg(feature = "cuda")]
mod gpu {
    use crate::cuda::{output, per_row, u32_arg};
    use crate::launch;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
    use candle_core::{CudaDevice, Result};

    use super::{ContrastLayout, L2_NORMALIZE_EPSILON};

    pub(super) fn l2_normalize(
        dev: &CudaDevice,
        x: &CudaView<f32>,
        rows: usize,
        d: usize,
    ) -> Result<CudaSlice<f32>> {
        let y = output::<f32>(dev, rows * d)?;
        if rows * d > 0 {
            let (d32, eps) = (
                u32_arg("l2-normalize", "d", d)?,
                L2_NORMALIZE_EPSILON as f32,
            );
            launch!(dev, "l2_normalize_fwd", per_row(rows); x, &y, &d32, &eps)?;
        }
        Ok(y)
    }

    pub(super) fn l2_normalize_grad(
        dev: &CudaDevice,
        x: &CudaView<f32>,
        y: &CudaView<f32>,
        g: &CudaView<f32>,
        rows: usize,
        d: usize,
    ) -> Result<CudaSlice<f32>> {
        let dx = output::<f32>(dev, rows * d)?;
        if rows * d > 0 {
            let (d32, eps) = (
                u32_arg("l2-normalize", "d", d)?,
                L2_NORMALIZE_EPSILON as f32,
            );
            launch!(dev, "l2_normalize_bwd", per_row(rows); x, y, g, &dx, &d32, &eps)?;
        }
        Ok(dx)
    }

    /// `[width, n, offset, global]` as the kernels' 32-bit arguments, and `1/τ`.
    fn layout_args(l: ContrastLayout, w: usize) -> Result<([u32; 4], f32)> {
        let op = "contrastive-ce";
        let args = [
            u32_arg(op, "width", w)?,
            u32_arg(op, "n", l.n)?,
            u32_arg(op, "offset", l.offset)?,
            u32_arg(op, "global", l.global)?,
        ];
        Ok((args, l.inv_t as f32))
    }

    pub(super) fn contrastive_ce(
        dev: &CudaDevice,
        s: &CudaView<f32>,
        w: usize,
        l: ContrastLayout,
    ) -> Result<CudaSlice<f32>> {
        let loss = output::<f32>(dev, 2 * l.n)?;
        let ([w32, n32, o32, g32], inv_t) = layout_args(l, w)?;
        launch!(dev, "contrastive_ce_fwd", per_row(2 * l.n);
            s, &loss, &w32, &n32, &o32, &g32, &inv_t)?;
        Ok(loss)
    }

    pub(super) fn contrastive_ce_grad(
        dev: &CudaDevice,
        s: &CudaView<f32>,
        loss: &CudaView<f32>,
        g: &CudaView<f32>,
        w: usize,
        l: ContrastLayout,
    ) -> Result<CudaSlice<f32>> {
        let ds = output::<f32>(dev, 2 * l.n * w)?;
        let ([w32, n32, o32, g32], inv_t) = layout_args(l, w)?;
        launch!(dev, "contrastive_ce_bwd", per_row(2 * l.n);
            s, loss, g, &ds, &w32, &n32, &o32, &g32, &inv_t)?;
        Ok(ds)
    }
}
