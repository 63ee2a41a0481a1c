//! The CUDA twins of the batch-norm kernels (`kernels.cu`), launched from the custom ops'
//! `cuda_fwd`. Same inputs, same outputs, same arithmetic as the CPU kernels in the parent
//! module; the reductions are two-stage (per-block partials, then an in-order sum), so they
//! repeat bit for bit.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::{CudaDevice, Result};

use crate::cuda::{elementwise, one_per_thread, output, per_channel, splits, u32_arg};
use crate::launch;

/// Per-channel `[Σx; Σx²]` (`[2, C]` f64) of `x` (`[N, C, P]`).
pub(super) fn moments(
    dev: &CudaDevice,
    x: &CudaView<f32>,
    (n, c, p): (usize, usize, usize),
) -> Result<CudaSlice<f64>> {
    let op = "bn-channel-moments";
    if n * c * p == 0 {
        return dev.alloc_zeros::<f64>(2 * c);
    }
    let s = splits(c, n * p);
    let part = output::<f64>(dev, s as usize * 2 * c)?;
    let (n32, c32, p32) = (
        u32_arg(op, "N", n)?,
        u32_arg(op, "C", c)?,
        u32_arg(op, "P", p)?,
    );
    launch!(dev, "bn_moments_partial", per_channel(c, s); x, &part, &n32, &c32, &p32)?;
    sum_partials(dev, &part, 2 * c, s)
}

/// `out[k] = Σ_s part[s, k]` in split order.
fn sum_partials(
    dev: &CudaDevice,
    part: &CudaSlice<f64>,
    len: usize,
    splits: u32,
) -> Result<CudaSlice<f64>> {
    let out = output::<f64>(dev, len)?;
    let len32 = u32_arg("bn", "length", len)?;
    launch!(dev, "sum_partials_f64", one_per_thread(len); part, &out, &len32, &splits)?;
    Ok(out)
}

/// `g₀[c] + 2·x·g₁[c]`.
pub(super) fn moments_grad(
    dev: &CudaDevice,
    x: &CudaView<f32>,
    g: &CudaView<f64>,
    (n, c, p): (usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    let total = n * c * p;
    let dx = output::<f32>(dev, total)?;
    if total == 0 {
        return Ok(dx);
    }
    let op = "bn-channel-moments-grad";
    let (c32, p32, t64) = (u32_arg(op, "C", c)?, u32_arg(op, "P", p)?, total as u64);
    launch!(dev, "bn_moments_grad", elementwise(total); x, g, &dx, &c32, &p32, &t64)?;
    Ok(dx)
}

/// `relu?((x − mean)·invstd·γ + β [+ residual])`.
pub(super) fn apply(
    dev: &CudaDevice,
    x: &CudaView<f32>,
    params: &CudaView<f32>,
    residual: Option<&CudaView<f32>>,
    (n, c, p): (usize, usize, usize),
    relu: bool,
) -> Result<CudaSlice<f32>> {
    let total = n * c * p;
    let y = output::<f32>(dev, total)?;
    if total == 0 {
        return Ok(y);
    }
    let op = "bn-apply";
    let (c32, p32, t64) = (u32_arg(op, "C", c)?, u32_arg(op, "P", p)?, total as u64);
    let (has_res, relu) = (residual.is_some() as u32, relu as u32);
    // Without a residual the kernel never reads that pointer; `x` stands in for it.
    let res = residual.unwrap_or(x);
    launch!(dev, "bn_apply", elementwise(total);
        x, params, res, &y, &c32, &p32, &t64, &has_res, &relu)?;
    Ok(y)
}

/// The backward of the apply ops, in the CPU kernel's flat layout:
/// `[dx_direct | dresidual (if with_dres) | dmean | dinvstd | dγ | dβ]`, from the input, the
/// output and the output's gradient.
pub(super) fn apply_grad(
    dev: &CudaDevice,
    (x, y, dy): (&CudaView<f32>, &CudaView<f32>, &CudaView<f32>),
    params: &CudaView<f32>,
    (n, c, p): (usize, usize, usize),
    relu: bool,
    with_dres: bool,
) -> Result<CudaSlice<f32>> {
    let op = "bn-apply-grad";
    let total = n * c * p;
    let dres_len = if with_dres { total } else { 0 };
    let mut out = output::<f32>(dev, total + dres_len + 4 * c)?;
    let s = splits(c, n * p);
    let part = if total == 0 {
        dev.alloc_zeros::<f64>(2 * c)?
    } else {
        output::<f64>(dev, s as usize * 2 * c)?
    };
    let (n32, c32, p32) = (
        u32_arg(op, "N", n)?,
        u32_arg(op, "C", c)?,
        u32_arg(op, "P", p)?,
    );
    let (mut dx, mut rest) = out.split_at_mut(total);
    let (mut dres, mut tail) = rest.split_at_mut(dres_len);
    if total > 0 {
        let (has_dres, relu) = (with_dres as u32, relu as u32);
        // Without a residual gradient the kernel never writes that pointer.
        let mut unused = dev.alloc_zeros::<f32>(1)?;
        let mut dres = if with_dres {
            dres.slice_mut(..)
        } else {
            unused.slice_mut(..)
        };
        launch!(dev, "bn_apply_grad_partial", per_channel(c, s);
            x, y, dy, params, &mut dx, &mut dres, &part, &n32, &c32, &p32, &has_dres, &relu)?;
    }
    let splits_used = if total == 0 { 1 } else { s };
    launch!(dev, "bn_apply_grad_final", one_per_thread(c);
        &part, params, &mut tail, &c32, &splits_used)?;
    Ok(out)
}
