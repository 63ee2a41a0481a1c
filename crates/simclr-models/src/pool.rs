//! Pooling with TF semantics (the official tf2/resnet.py), on NCHW tensors.
//!
//! * [`max_pool_same`]: TF `SAME` max pooling. For input size `n`, kernel `k`, stride `s` the
//!   output has `ceil(n / s)` cells, the total padding is `max((ceil(n/s) - 1) * s + k - n, 0)`,
//!   split `before = total / 2`, `after = total - before`, and padded cells are `-inf`.
//!   On an even map 3x3/s2 pads 0 before and 1 after; on an odd map 1 and 1.
//! * [`avg_pool_same`]: TF `SAME` average pooling: the same padding, and each output is divided
//!   by the number of *real* cells in its window.
//! * [`avg_pool_fixed_valid`]: the ResNet-D shortcut pooling for stride > 1: TF `FixedPadding(k)`
//!   with zeros (`(k-1)/2` before, the rest after), then a `VALID` average pool that divides by
//!   `k*k` (the explicit zeros count).
//! * [`global_avg_pool`]: mean over H and W.
//!
//! candle's own pooling ops have no backward pass when kernel != stride, so in training mode
//! (`differentiable = true`) the windows are gathered with `index_select` and combined with
//! differentiable ops. The max-pool gradient then goes to the first maximum of each window in
//! row-major order, as TF's does. Inference mode uses candle's pooling kernels (same values,
//! faster).

use candle_core::{DType, Device, Result, Tensor};

/// TF `SAME` padding along one axis: `(before, after, output_size)`.
pub fn same_padding(n: usize, k: usize, s: usize) -> (usize, usize, usize) {
    let out = n.div_ceil(s);
    let total = ((out.saturating_sub(1)) * s + k).saturating_sub(n);
    (total / 2, total - total / 2, out)
}

/// TF `FixedPadding(k)` along one axis: `(before, after)`.
pub fn fixed_padding(k: usize) -> (usize, usize) {
    let before = (k - 1) / 2;
    (before, k - 1 - before)
}

fn pad_axis(x: &Tensor, dim: usize, before: usize, after: usize, value: f32) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    let mut parts = Vec::with_capacity(3);
    let mut shape = x.dims().to_vec();
    if before > 0 {
        shape[dim] = before;
        parts.push(Tensor::full(value, shape.as_slice(), x.device())?.to_dtype(x.dtype())?);
    }
    parts.push(x.clone());
    if after > 0 {
        shape[dim] = after;
        parts.push(Tensor::full(value, shape.as_slice(), x.device())?.to_dtype(x.dtype())?);
    }
    Tensor::cat(&parts, dim)
}

/// Pads H (axis 2) and W (axis 3) with a constant.
pub fn pad2d(x: &Tensor, h: (usize, usize), w: (usize, usize), value: f32) -> Result<Tensor> {
    let x = pad_axis(x, 2, h.0, h.1, value)?;
    pad_axis(&x, 3, w.0, w.1, value)
}

fn index(start: usize, step: usize, n: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<u32> = (0..n).map(|i| (start + i * step) as u32).collect();
    Tensor::from_vec(v, n, dev)
}

/// The `k*k` strided views of a padded map, each `[N, C, oh, ow]`, in row-major window order.
fn windows(xp: &Tensor, k: usize, s: usize, oh: usize, ow: usize) -> Result<Vec<Tensor>> {
    let dev = xp.device();
    let mut out = Vec::with_capacity(k * k);
    for di in 0..k {
        let rows = xp.index_select(&index(di, s, oh, dev)?, 2)?;
        for dj in 0..k {
            out.push(rows.index_select(&index(dj, s, ow, dev)?, 3)?);
        }
    }
    Ok(out)
}

fn check4(x: &Tensor, what: &str) -> Result<(usize, usize)> {
    let (_, _, h, w) = x.dims4().map_err(|_| {
        candle_core::Error::Msg(format!("{what} needs an NCHW tensor, got {:?}", x.shape()))
    })?;
    Ok((h, w))
}

/// TF `SAME` max pooling with a `k x k` window and stride `s` (see the module docs).
pub fn max_pool_same(x: &Tensor, k: usize, s: usize, differentiable: bool) -> Result<Tensor> {
    let (h, w) = check4(x, "max_pool_same")?;
    let (hb, ha, oh) = same_padding(h, k, s);
    let (wb, wa, ow) = same_padding(w, k, s);
    let xp = pad2d(x, (hb, ha), (wb, wa), f32::NEG_INFINITY)?;
    if !differentiable {
        return xp.max_pool2d_with_stride(k, s);
    }
    let mut views = windows(&xp, k, s, oh, ow)?.into_iter();
    let mut best = match views.next() {
        Some(v) => v,
        None => candle_core::bail!("max_pool_same needs k >= 1"),
    };
    for v in views {
        // Strictly greater: on ties the earlier window cell keeps the gradient.
        best = v.gt(&best)?.where_cond(&v, &best)?;
    }
    Ok(best)
}

/// `1 / (number of real cells)` of each `SAME` window, `[1, 1, oh, ow]`.
fn same_avg_scale(
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let counts = |n: usize| -> Vec<f64> {
        let (before, _, out) = same_padding(n, k, s);
        (0..out)
            .map(|i| {
                let start = (i * s) as i64 - before as i64;
                let end = start + k as i64;
                (end.min(n as i64) - start.max(0)) as f64
            })
            .collect()
    };
    let ch = counts(h);
    let cw = counts(w);
    let v: Vec<f32> = ch
        .iter()
        .flat_map(|a| cw.iter().map(move |b| (1.0 / (a * b)) as f32))
        .collect();
    Tensor::from_vec(v, (1, 1, ch.len(), cw.len()), dev)?.to_dtype(dtype)
}

/// TF `SAME` average pooling: padded cells are not counted in the divisor.
pub fn avg_pool_same(x: &Tensor, k: usize, s: usize, differentiable: bool) -> Result<Tensor> {
    let (h, w) = check4(x, "avg_pool_same")?;
    let (hb, ha, oh) = same_padding(h, k, s);
    let (wb, wa, ow) = same_padding(w, k, s);
    let xp = pad2d(x, (hb, ha), (wb, wa), 0.0)?;
    let scale = same_avg_scale(h, w, k, s, x.dtype(), x.device())?;
    let sums = if differentiable {
        let mut views = windows(&xp, k, s, oh, ow)?.into_iter();
        let mut acc = match views.next() {
            Some(v) => v,
            None => candle_core::bail!("avg_pool_same needs k >= 1"),
        };
        for v in views {
            acc = (acc + v)?;
        }
        acc
    } else {
        (xp.avg_pool2d_with_stride(k, s)? * (k * k) as f64)?
    };
    sums.broadcast_mul(&scale)
}

/// ResNet-D shortcut pooling for stride > 1: zero `FixedPadding(k)` then a `VALID` `k x k`
/// average pool with stride `s`, dividing by `k*k` everywhere.
pub fn avg_pool_fixed_valid(
    x: &Tensor,
    k: usize,
    s: usize,
    differentiable: bool,
) -> Result<Tensor> {
    let (h, w) = check4(x, "avg_pool_fixed_valid")?;
    let (b, a) = fixed_padding(k);
    let xp = pad2d(x, (b, a), (b, a), 0.0)?;
    // VALID output size on the padded map (which is h + k - 1 high).
    let oh = (h - 1) / s + 1;
    let ow = (w - 1) / s + 1;
    if k == s || !differentiable {
        // candle's avg-pool backward (kernel == stride only) upsamples the gradient to the
        // input size, which is only right when that size is a multiple of the stride: crop
        // the rows and columns that no window reads first.
        let xp = if k == s {
            xp.narrow(2, 0, oh * s)?.narrow(3, 0, ow * s)?
        } else {
            xp
        };
        return xp.avg_pool2d_with_stride(k, s);
    }
    let mut views = windows(&xp, k, s, oh, ow)?.into_iter();
    let mut acc = match views.next() {
        Some(v) => v,
        None => candle_core::bail!("avg_pool_fixed_valid needs k >= 1"),
    };
    for v in views {
        acc = (acc + v)?;
    }
    acc / (k * k) as f64
}

/// Global average pooling over H and W: `[N, C, H, W] -> [N, C]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    check4(x, "global_avg_pool")?;
    x.mean((2, 3))
}
