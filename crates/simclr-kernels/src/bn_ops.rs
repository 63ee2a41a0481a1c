//! Batch normalisation's heavy passes as fused kernels (candle custom ops), with a reference
//! composition of candle ops for every other dtype and device.
//!
//! Why: written with candle's ops, training-mode BN is about a dozen passes over the
//! activation each way (mean, subtract, square, mean, broadcast multiply and add, and their
//! gradients), each allocating a fresh buffer, and candle's CPU broadcast ops walk strided
//! indices. It was measured at about 40% of a ResNet training step here.
//!
//! BN is split at the one place where replicas must talk (global BN, the official tf2/resnet.py, `BatchNormRelu`):
//!
//! 1. [`channel_moments`]: per-channel `Σx` and `Σx²` of `x` (`[N, C, *]`) as a `[2, C]`
//!    tensor, accumulated in f64 (one pass). Its gradient is `g₀[c] + 2·x·g₁[c]` (one pass).
//! 2. The caller sums the moments over the replicas (a differentiable all-reduce) and turns
//!    them into the mean and `1/√(var + eps)` with a few ops on `[C]`-sized tensors; the
//!    variance is `E[x²] − E[x]²`, as the official cross-replica BN computes it.
//! 3. [`bn_apply`]: `y = (x − mean)·invstd·γ + β`, optionally followed by a ReLU (one pass);
//!    [`bn_apply_add`] also adds a residual before the ReLU (the end of a residual block).
//!    Its backward is one pass that writes the direct part of `dx` (`dy'·γ·invstd`) and
//!    reduces `Σdy'` and `Σdy'·(x − mean)` per channel, from which the gradients of the
//!    statistics, `γ` and `β` follow (`dy'` is `dy` masked by `y > 0` after a ReLU).
//!
//! Autograd adds the two `dx` parts and carries the statistics' gradient through step 2 (and
//! back across the replicas) into step 1. Only contiguous f32 CPU tensors take the kernels;
//! anything else runs [`channel_moments_reference`] / [`bn_apply_reference`], which the tests
//! also use as the independent computation to check the kernels against (and everything does
//! when the environment sets `SIMCLR_BN=candle`, for benchmarks). The custom ops have no
//! second-order gradient.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::buffers::{par_build, par_zeroed};

use crate::conv::{contiguous, contiguous_f32};

#[cfg(feature = "cuda")]
mod gpu;

/// The boilerplate of a `cuda_fwd`: contiguous f32 (or `$t`) views of the inputs, the device,
/// and the result wrapped back into a storage.
#[cfg(feature = "cuda")]
macro_rules! cuda_view {
    ($op:expr, $s:expr, $l:expr) => {
        crate::cuda::view::<f32>($op, $s, $l)?
    };
    ($op:expr, $s:expr, $l:expr, $t:ty) => {
        crate::cuda::view::<$t>($op, $s, $l)?
    };
}

/// Accumulation is per plane in 8 f32 lanes, then in f64 across planes: a lane sums at most a
/// few thousand values (a 224² stem plane has 12,544, 1,568 per lane), so its f32 sum loses
/// nothing that matters, and the cross-plane sum of up to millions of values keeps full
/// precision.
const LANES: usize = 8;

/// `SIMCLR_BN=candle` runs the reference compositions everywhere (read once per process), so
/// that benchmarks can measure stock candle against the kernels.
fn stock_candle() -> bool {
    static STOCK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *STOCK
        .get_or_init(|| std::env::var("SIMCLR_BN").is_ok_and(|v| v.eq_ignore_ascii_case("candle")))
}

fn is_fast(x: &Tensor) -> bool {
    let kernel_device = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
    kernel_device && x.dtype() == DType::F32 && !stock_candle()
}

/// `(N, C, P)` of a `[N, C, *]` tensor: batch, channels, and the product of the trailing dims.
fn ncp(dims: &[usize]) -> Result<(usize, usize, usize)> {
    if dims.len() < 2 || dims[1] == 0 {
        bail!("batch norm needs a tensor of rank >= 2 with channels, got shape {dims:?}")
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

fn f64_slice<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f64]> {
    match storage {
        CpuStorage::F64(d) => contiguous(op, d, layout),
        _ => bail!("{op}: expected f64"),
    }
}

fn plane_sums(plane: &[f32]) -> (f32, f32) {
    let mut s = [0f32; LANES];
    let mut q = [0f32; LANES];
    let mut chunks = plane.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            s[l] += c[l];
            q[l] += c[l] * c[l];
        }
    }
    let (mut s1, mut q1) = (s.iter().sum::<f32>(), q.iter().sum::<f32>());
    for &v in chunks.remainder() {
        s1 += v;
        q1 += v * v;
    }
    (s1, q1)
}

/// Per-channel `[Σx, Σx²]` of `x` (`[N, C, *]`) as a `[2, C]` tensor: f64 from the CPU
/// kernel, f32 from the reference path. Differentiable.
pub fn channel_moments(x: &Tensor) -> Result<Tensor> {
    ncp(x.dims())?;
    if is_fast(x) {
        x.contiguous()?.apply_op1(ChannelMoments)
    } else {
        channel_moments_reference(x)
    }
}

/// The dtype of BN's statistics and affine parameters for activations of dtype `x`: f64 for
/// f64, else f32 (half-precision activations keep f32 statistics).
pub fn stats_dtype(x: DType) -> DType {
    if x == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// [`channel_moments`] with candle's ops, in [`stats_dtype`].
pub fn channel_moments_reference(x: &Tensor) -> Result<Tensor> {
    let (n, c, p) = ncp(x.dims())?;
    let x = x.to_dtype(stats_dtype(x.dtype()))?.reshape((n, c, p))?;
    let s = x.sum((0, 2))?;
    let q = x.sqr()?.sum((0, 2))?;
    Tensor::stack(&[s, q], 0)
}

/// The mean and `1/√(var + eps)` as a `[2, C]` tensor of `dtype`, plus the mean and biased
/// variance (in the moments' dtype) for the moving averages, from `moments` summed over
/// `count` values per channel. Differentiable.
pub fn moments_to_stats(
    moments: &Tensor,
    count: usize,
    eps: f64,
    dtype: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    if count == 0 {
        bail!("batch norm over an empty batch")
    }
    let m = (moments / count as f64)?;
    let mean = m.get(0)?;
    // Rounding can make E[x²] − E[x]² slightly negative for a constant channel.
    let var = (m.get(1)? - mean.sqr()?)?.relu()?;
    let invstd = (&var + eps)?.sqrt()?.recip()?;
    let stats = Tensor::stack(&[&mean, &invstd], 0)?.to_dtype(dtype)?;
    Ok((stats, mean, var))
}

/// `y = (x − mean)·invstd·γ + β`, then a ReLU if `relu`, for `x` `[N, C, *]`, `stats =
/// [mean; invstd]` and `affine = [γ; β]` (both `[2, C]`, of [`stats_dtype`]). Differentiable
/// in all three.
pub fn bn_apply(x: &Tensor, stats: &Tensor, affine: &Tensor, relu: bool) -> Result<Tensor> {
    bn_apply_add(x, stats, affine, None, relu)
}

/// [`bn_apply`] with `residual` (the shape of `x`) added before the ReLU: the end of a
/// residual block in one pass. Beyond the pass it saves, it keeps two activations per block
/// out of the autograd graph (the BN output and the sum, which candle's `add` and `relu`
/// would hold for the backward pass).
pub fn bn_apply_add(
    x: &Tensor,
    stats: &Tensor,
    affine: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    apply_add(x, stats, affine, residual, relu, None)
}

/// Whether [`bn_apply_add_local`] takes its fused backward for `x` (and `residual`):
/// contiguous-or-not f32 on the CPU, unless `SIMCLR_BN=candle`.
pub fn local_fold_available(x: &Tensor, residual: Option<&Tensor>) -> bool {
    let cpu_fast = |t: &Tensor| is_fast(t) && t.device().is_cpu();
    cpu_fast(x) && residual.is_none_or(cpu_fast)
}

/// Training-mode BN on one process: [`bn_apply_add`] where `stats` are the statistics of `x`
/// itself (from [`moments_to_stats`] over `count` values per channel) and carry no gradient.
/// The backward adds their dependence on `x` analytically in the same op, instead of autograd
/// carrying it through the statistics into [`channel_moments`]'s backward: that path costs a
/// full-size gradient pass and a second full-size addition per BN (candle sums the two `dx`
/// parts). Measured on its own, about 1 % of a pretraining step (A/B of the bench binaries,
/// within the VM's noise; `docs/performance.md`). The
/// gradient is the same function; global BN (replicas) keeps the split path because the
/// statistics' gradient must cross the replicas. Needs [`local_fold_available`].
pub fn bn_apply_add_local(
    x: &Tensor,
    stats: &Tensor,
    affine: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    count: usize,
) -> Result<Tensor> {
    if !local_fold_available(x, residual) {
        bail!("bn_apply_add_local needs f32 CPU tensors (see local_fold_available)")
    }
    if count == 0 {
        bail!("batch norm over an empty batch")
    }
    apply_add(x, &stats.detach(), affine, residual, relu, Some(count))
}

fn apply_add(
    x: &Tensor,
    stats: &Tensor,
    affine: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    fold: Option<usize>,
) -> Result<Tensor> {
    let (_, c, _) = ncp(x.dims())?;
    let want = stats_dtype(x.dtype());
    for (name, t) in [("statistics", stats), ("affine", affine)] {
        if t.dims() != [2, c] || t.dtype() != want {
            bail!(
                "batch norm {name} must be [2, {c}] {want:?}, got {:?} {:?}",
                t.dims(),
                t.dtype()
            )
        }
    }
    if let Some(r) = residual {
        if r.dims() != x.dims() || r.dtype() != x.dtype() {
            bail!(
                "batch norm residual {:?} {:?} does not match its input {:?} {:?}",
                r.dims(),
                r.dtype(),
                x.dims(),
                x.dtype()
            )
        }
    }
    if !is_fast(x) || residual.is_some_and(|r| !is_fast(r)) {
        let y = bn_apply_reference(x, stats, affine, relu && residual.is_none())?;
        return match residual {
            Some(r) if relu => relu_tf(&(y + r)?),
            Some(r) => y + r,
            None => Ok(y),
        };
    }
    let params = Tensor::cat(&[stats, affine], 0)?.contiguous()?;
    let x = x.contiguous()?;
    match residual {
        None => x.apply_op2(&params, BnApply { relu, fold }),
        Some(r) => x.apply_op3(&params, &r.contiguous()?, BnApplyAdd { relu, fold }),
    }
}

/// [`bn_apply`] with candle's ops. The arithmetic is in the statistics' dtype and the result in
/// `x`'s: for bf16 activations, `x − mean` in bf16 would cancel away the digits that matter.
pub fn bn_apply_reference(
    x: &Tensor,
    stats: &Tensor,
    affine: &Tensor,
    relu: bool,
) -> Result<Tensor> {
    let mut shape = vec![1; x.rank()];
    shape[1] = x.dim(1)?;
    let row = |t: &Tensor, i: usize| -> Result<Tensor> { t.get(i)?.reshape(shape.as_slice()) };
    let scale = (row(stats, 1)? * row(affine, 0)?)?;
    let y = x
        .to_dtype(stats.dtype())?
        .broadcast_sub(&row(stats, 0)?)?
        .broadcast_mul(&scale)?
        .broadcast_add(&row(affine, 1)?)?;
    let y = if relu { relu_tf(&y)? } else { y };
    y.to_dtype(x.dtype())
}

/// A ReLU whose gradient is 0 where its input is exactly 0, as TF's and PyTorch's (and the
/// kernels': they mask by `y > 0`); candle's `relu` passes the gradient there. The difference
/// matters at initialisation: the last BN of a block starts with γ = β = 0, so the sum it feeds
/// equals the shortcut, which is exactly 0 wherever the previous ReLU cut.
fn relu_tf(t: &Tensor) -> Result<Tensor> {
    let mask = t.gt(0.0)?.to_dtype(t.dtype())?;
    t * mask
}

/// `x [N, C, *] f32 -> [2, C] f64`: per-channel sums and sums of squares.
#[derive(Debug, Clone, Copy)]
struct ChannelMoments;

impl candle_core::CustomOp1 for ChannelMoments {
    fn name(&self) -> &'static str {
        "bn-channel-moments"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), storage, layout)?;
        let (_, c, p) = ncp(layout.dims())?;
        let out = if c * p == 0 {
            vec![0f64; 2 * c]
        } else {
            let partials: Vec<Vec<f64>> = x
                .par_chunks(c * p)
                .map(|img| {
                    let mut acc = vec![0f64; 2 * c];
                    for (ch, plane) in img.chunks_exact(p).enumerate() {
                        let (s, q) = plane_sums(plane);
                        acc[ch] = s as f64;
                        acc[c + ch] = q as f64;
                    }
                    acc
                })
                .collect();
            sum_in_order(partials, 2 * c)
        };
        Ok((CpuStorage::F64(out), Shape::from((2, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = ncp(layout.dims())?;
        let dev = &storage.device;
        let out = gpu::moments(dev, &cuda_view!(self.name(), storage, layout), dims)?;
        let out = candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone());
        Ok((out, Shape::from((2, dims.1))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F64)?.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&g, &MomentsGrad)?))
    }
}

/// The sum of per-image partial sums in image order, so that the result does not depend on
/// how rayon split the work: the kernel repeats bit for bit.
fn sum_in_order(partials: Vec<Vec<f64>>, len: usize) -> Vec<f64> {
    let mut total = vec![0f64; len];
    for part in partials {
        for (t, v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    total
}

/// `(x [N, C, *] f32, g [2, C] f64) -> g₀[c] + 2·x·g₁[c]`, the gradient of the moments.
#[derive(Debug, Clone, Copy)]
struct MomentsGrad;

impl CustomOp2 for MomentsGrad {
    fn name(&self) -> &'static str {
        "bn-channel-moments-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), xs, xl)?;
        let g = f64_slice(self.name(), gs, gl)?;
        let (_, c, p) = ncp(xl.dims())?;
        let g0: Vec<f32> = g[..c].iter().map(|&v| v as f32).collect();
        let g1: Vec<f32> = g[c..].iter().map(|&v| 2.0 * v as f32).collect();
        let dx = par_build(x.len(), c * p, |i, d| {
            let img = &x[i * c * p..(i + 1) * c * p];
            for (ch, (dp, xp)) in d.chunks_exact_mut(p).zip(img.chunks_exact(p)).enumerate() {
                let (a, b) = (g0[ch], g1[ch]);
                for (o, &v) in dp.iter_mut().zip(xp) {
                    *o = a + b * v;
                }
            }
        });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let x = cuda_view!(self.name(), xs, xl);
        let g = cuda_view!(self.name(), gs, gl, f64);
        let dev = &xs.device;
        let dx = gpu::moments_grad(dev, &x, &g, ncp(xl.dims())?)?;
        let dx = candle_core::CudaStorage::wrap_cuda_slice(dx, dev.clone());
        Ok((dx, xl.shape().clone()))
    }
}

/// `y = relu?((x − mean)·invstd·γ + β [+ residual])` with `params = [mean; invstd; γ; β]`.
fn apply_kernel(
    x: &[f32],
    params: &[f32],
    residual: Option<&[f32]>,
    c: usize,
    p: usize,
    relu: bool,
) -> Vec<f32> {
    let (mean, invstd, gamma, beta) = (
        &params[..c],
        &params[c..2 * c],
        &params[2 * c..3 * c],
        &params[3 * c..],
    );
    let scale: Vec<f32> = invstd.iter().zip(gamma).map(|(i, g)| i * g).collect();
    if c * p == 0 {
        return vec![0f32; x.len()];
    }
    par_build(x.len(), c * p, |n, yi| {
        let xi = &x[n * c * p..(n + 1) * c * p];
        for ch in 0..c {
            let r = ch * p..(ch + 1) * p;
            let (m, k, b) = (mean[ch], scale[ch], beta[ch]);
            let (yp, xp) = (&mut yi[r.clone()], &xi[r]);
            match residual {
                Some(res) => {
                    let rp = &res[(n * c + ch) * p..(n * c + ch + 1) * p];
                    for ((o, &v), &a) in yp.iter_mut().zip(xp).zip(rp) {
                        let t = (v - m) * k + b + a;
                        *o = if relu { t.max(0.0) } else { t };
                    }
                }
                None => {
                    for (o, &v) in yp.iter_mut().zip(xp) {
                        let t = (v - m) * k + b;
                        *o = if relu { t.max(0.0) } else { t };
                    }
                }
            }
        }
    })
}

fn params_of(op: &str, x: &Layout, params: &Layout) -> Result<(usize, usize)> {
    let (_, c, p) = ncp(x.dims())?;
    if params.dims() != [4, c] {
        bail!("{op}: parameters {:?} for {c} channels", params.dims())
    }
    Ok((c, p))
}

/// The backward of both apply ops: `(dx, dparams, dresidual)`; `fold`: see [`BnApplyGrad`].
fn apply_backward(
    x: &Tensor,
    params: &Tensor,
    res: &Tensor,
    grad: &Tensor,
    relu: bool,
    residual: bool,
    fold: Option<usize>,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (_, c, _) = ncp(x.dims())?;
    let op = BnApplyGrad {
        relu,
        params: params.clone(),
        residual,
        fold,
    };
    let grad = grad.contiguous()?;
    let flat = x.apply_op3_no_bwd(res, &grad, &op)?;
    let n = x.elem_count();
    let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
    let (dres, tail) = match (residual, relu) {
        (false, _) => (None, n),
        // Without a ReLU the residual's gradient is the output's.
        (true, false) => (Some(grad), n),
        (true, true) => (Some(flat.narrow(0, n, n)?.reshape(x.shape())?), 2 * n),
    };
    let dparams = flat.narrow(0, tail, 4 * c)?.reshape((4, c))?;
    Ok((dx, dparams, dres))
}

/// `(x, params) -> y`; see [`bn_apply`].
#[derive(Debug, Clone, Copy)]
struct BnApply {
    relu: bool,
    /// `Some(count)`: [`bn_apply_add_local`]'s backward.
    fold: Option<usize>,
}

impl CustomOp2 for BnApply {
    fn name(&self) -> &'static str {
        "bn-apply"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c, p) = params_of(self.name(), xl, pl)?;
        let x = contiguous_f32(self.name(), xs, xl)?;
        let params = contiguous_f32(self.name(), ps, pl)?;
        let y = apply_kernel(x, params, None, c, p, self.relu);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        params_of(self.name(), xl, pl)?;
        let (x, params) = (
            cuda_view!(self.name(), xs, xl),
            cuda_view!(self.name(), ps, pl),
        );
        let dev = &xs.device;
        let y = gpu::apply(dev, &x, &params, None, ncp(xl.dims())?, self.relu)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp, _) = apply_backward(x, params, res, grad, self.relu, false, self.fold)?;
        Ok((Some(dx), Some(dp)))
    }
}

/// `(x, params, residual) -> y`; see [`bn_apply_add`].
#[derive(Debug, Clone, Copy)]
struct BnApplyAdd {
    relu: bool,
    /// `Some(count)`: [`bn_apply_add_local`]'s backward.
    fold: Option<usize>,
}

impl CustomOp3 for BnApplyAdd {
    fn name(&self) -> &'static str {
        "bn-apply-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c, p) = params_of(self.name(), xl, pl)?;
        let x = contiguous_f32(self.name(), xs, xl)?;
        let params = contiguous_f32(self.name(), ps, pl)?;
        let r = contiguous_f32(self.name(), rs, rl)?;
        if r.len() != x.len() {
            bail!("{}: residual of another shape", self.name())
        }
        let y = apply_kernel(x, params, Some(r), c, p, self.relu);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        params_of(self.name(), xl, pl)?;
        if rl.dims() != xl.dims() {
            bail!("{}: residual of another shape", self.name())
        }
        let (x, params) = (
            cuda_view!(self.name(), xs, xl),
            cuda_view!(self.name(), ps, pl),
        );
        let r = cuda_view!(self.name(), rs, rl);
        let dev = &xs.device;
        let y = gpu::apply(dev, &x, &params, Some(&r), ncp(xl.dims())?, self.relu)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _residual: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dp, dr) = apply_backward(x, params, res, grad, self.relu, true, self.fold)?;
        Ok((Some(dx), Some(dp), dr))
    }
}

/// `(x, y, dy) -> [dx_direct | dresidual (with a residual and a ReLU) | dmean | dinvstd | dγ |
/// dβ]`, flat f32; `params = [mean; invstd; γ; β]` (`[4, C]`, on the device of the op: the
/// op holds it rather than taking it as an input because candle has no four-input op).
#[derive(Debug, Clone)]
struct BnApplyGrad {
    relu: bool,
    params: Tensor,
    residual: bool,
    /// `Some(count)`: the statistics are `x`'s own over `count` values per channel and carry no
    /// gradient; `dx` then also gets their part, `dS + 2·dQ·x` per channel, where `dS` and
    /// `dQ` are the gradients of `Σx` and `Σx²` that [`moments_to_stats`]'s backward would
    /// compute from `dmean` and `dinvstd` (`var = Σx²/count − mean²`, `invstd = (var +
    /// eps)^-½`, so `dvar = −½·invstd³·dinvstd`).
    fold: Option<usize>,
}

impl CustomOp3 for BnApplyGrad {
    fn name(&self) -> &'static str {
        "bn-apply-grad"
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
        let x = contiguous_f32(self.name(), xs, xl)?;
        let y = contiguous_f32(self.name(), ys, yl)?;
        let dy = contiguous_f32(self.name(), gs, gl)?;
        let (_, c, p) = ncp(xl.dims())?;
        let params: Vec<f32> = self.params.flatten_all()?.to_vec1()?;
        if y.len() != x.len() || dy.len() != x.len() || params.len() != 4 * c {
            bail!("{}: inconsistent shapes", self.name())
        }
        let (mean, invstd, gamma) = (&params[..c], &params[c..2 * c], &params[2 * c..3 * c]);
        let scale: Vec<f32> = invstd.iter().zip(gamma).map(|(i, g)| i * g).collect();
        let relu = self.relu;
        let n = x.len();
        let with_dres = self.residual && relu;
        let dres_len = if with_dres { n } else { 0 };
        let mut out = par_zeroed(n + dres_len + 4 * c);
        let (dx_all, rest) = out.split_at_mut(n);
        let (dres_all, tail) = rest.split_at_mut(dres_len);
        let sums = if c * p == 0 {
            vec![0f64; 2 * c]
        } else {
            // Without a residual gradient, each task gets an empty slice of it.
            let dres_chunks: Vec<&mut [f32]> = if with_dres {
                dres_all.chunks_mut(c * p).collect()
            } else {
                (0..n / (c * p)).map(|_| Default::default()).collect()
            };
            let partials = dx_all
                .par_chunks_mut(c * p)
                .zip(dres_chunks)
                .zip(x.par_chunks(c * p))
                .zip(y.par_chunks(c * p))
                .zip(dy.par_chunks(c * p))
                .map(|((((dxi, dri), xi), yi), gi)| {
                    let mut acc = vec![0f64; 2 * c];
                    for ch in 0..c {
                        let r = ch * p..(ch + 1) * p;
                        let (m, k) = (mean[ch], scale[ch]);
                        let (mut s1, mut s3) = (0f32, 0f32);
                        for (j, (((o, &xv), &yv), &gv)) in dxi[r.clone()]
                            .iter_mut()
                            .zip(&xi[r.clone()])
                            .zip(&yi[r.clone()])
                            .zip(&gi[r.clone()])
                            .enumerate()
                        {
                            let g = if relu && yv <= 0.0 { 0.0 } else { gv };
                            *o = g * k;
                            if with_dres {
                                dri[r.start + j] = g;
                            }
                            s1 += g;
                            s3 += g * (xv - m);
                        }
                        acc[ch] += s1 as f64;
                        acc[c + ch] += s3 as f64;
                    }
                    acc
                })
                .collect::<Vec<_>>();
            sum_in_order(partials, 2 * c)
        };
        for ch in 0..c {
            let (s1, s3) = (sums[ch], sums[c + ch]);
            let (g, i) = (gamma[ch] as f64, invstd[ch] as f64);
            tail[ch] = (-g * i * s1) as f32; // dmean
            tail[c + ch] = (g * s3) as f32; // dinvstd
            tail[2 * c + ch] = (s3 * i) as f32; // dγ
            tail[3 * c + ch] = s1 as f32; // dβ
        }
        if let Some(count) = self.fold {
            let m = count as f64;
            let coef: Vec<(f32, f32)> = (0..c)
                .map(|ch| {
                    let (mu, i) = (mean[ch] as f64, invstd[ch] as f64);
                    let (dmean, dinvstd) = (tail[ch] as f64, tail[c + ch] as f64);
                    let dvar = -0.5 * i * i * i * dinvstd;
                    let ds = (dmean - 2.0 * mu * dvar) / m;
                    let dq = dvar / m;
                    (ds as f32, (2.0 * dq) as f32)
                })
                .collect();
            if c * p > 0 {
                dx_all
                    .par_chunks_mut(c * p)
                    .zip(x.par_chunks(c * p))
                    .for_each(|(d, xi)| {
                        for (ch, (dp, xp)) in
                            d.chunks_exact_mut(p).zip(xi.chunks_exact(p)).enumerate()
                        {
                            let (a, b) = coef[ch];
                            for (o, &v) in dp.iter_mut().zip(xp) {
                                *o += a + b * v;
                            }
                        }
                    });
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n + dres_len + 4 * c)))
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
        let name = self.name();
        if self.fold.is_some() {
            bail!("{name}: the folded local backward is CPU only (local_fold_available)")
        }
        let dims = ncp(xl.dims())?;
        if yl.dims() != xl.dims() || gl.dims() != xl.dims() || self.params.dims() != [4, dims.1] {
            bail!("{name}: inconsistent shapes")
        }
        let (x, y, dy) = (
            cuda_view!(name, xs, xl),
            cuda_view!(name, ys, yl),
            cuda_view!(name, gs, gl),
        );
        let (ps, pl) = self.params.storage_and_layout();
        let candle_core::Storage::Cuda(ps) = &*ps else {
            bail!("{name}: parameters on another device")
        };
        let params = cuda_view!(name, ps, pl);
        let dev = &xs.device;
        let with_dres = self.residual && self.relu;
        let out = gpu::apply_grad(dev, (&x, &y, &dy), &params, dims, self.relu, with_dres)?;
        let total = dims.0 * dims.1 * dims.2;
        let len = total * (1 + with_dres as usize) + 4 * dims.1;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(len),
        ))
    }
}
