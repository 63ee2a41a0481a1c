//! Loading the project's CUDA kernels (`src/cuda/kernels.cu`, compiled to PTX by `build.rs`)
//! and the launch arithmetic the custom ops share. Only with the `cuda` feature.
//!
//! Each custom op keeps its CPU kernel as the twin its CUDA kernel is checked against
//! (`simclr parity --ops` on a GPU).

pub use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView};
use candle_core::cuda_backend::CudaDType;
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result};

/// The PTX of `kernels.cu`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/simclr_kernels.ptx"));

const MODULE: &str = "simclr_kernels";

/// Threads per block; `kernels.cu` sizes its shared memory for this.
pub const BLOCK: u32 = 256;

#[doc(hidden)]
pub use candle_core::cuda_backend::{cudarc::driver::PushKernelArg, WrapErr};

/// Launches kernel `$name` of `kernels.cu` on `$dev`'s stream with launch configuration
/// `$cfg` and the arguments in order (references to bound values: the builder keeps them);
/// evaluates to `candle_core::Result<()>`. The arguments must match the kernel's signature.
#[macro_export]
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        use $crate::cuda::{PushKernelArg as _, WrapErr as _};
        let dev: &candle_core::CudaDevice = $dev;
        match $crate::cuda::function(dev, $name) {
            Err(e) => Err(e),
            Ok(f) => {
                let stream = dev.cuda_stream();
                let cfg: $crate::cuda::LaunchConfig = $cfg;
                let mut b = stream.launch_builder(&f);
                $( b.arg($arg); )*
                // SAFETY: the callers pass the kernel's arguments in its declared order.
                unsafe { b.launch(cfg) }.w().map(|_| ())
            }
        }
    }};
}

/// The kernel `name` of `kernels.cu`, loaded once per device.
pub fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, MODULE, PTX)?
        .into_cuda_function())
}

/// The contiguous elements of a storage, or an error naming the op.
pub fn view<'a, T: CudaDType>(
    op: &str,
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(storage.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("{op}: needs a contiguous input"),
    }
}

/// An uninitialised device buffer for a kernel that writes every element.
pub fn output<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    len: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `len` elements before any read.
    unsafe { dev.alloc::<T>(len.max(1)) }
}

/// A grid-stride launch over `total` elements: enough blocks to fill an H100 several times,
/// no more (each thread then loops).
pub fn elementwise(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(BLOCK as usize).clamp(1, 132 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per element for kernels that do not loop: `⌈len / BLOCK⌉` blocks.
pub fn one_per_thread(len: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (len.div_ceil(BLOCK as usize).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks per channel for a per-channel reduction over `per_channel` values: about 2,048
/// blocks in all, each with at least 2,048 values. Fixed by the shapes, so the reduction
/// order (and the result) is the same in every run.
pub fn splits(channels: usize, per_channel: usize) -> u32 {
    let want = 2048usize.div_ceil(channels.max(1));
    let most = per_channel.div_ceil(2048).max(1);
    want.clamp(1, most) as u32
}

/// One block per row.
pub fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `(grid, block)` of a per-channel reduction: `channels × splits` blocks.
pub fn per_channel(channels: usize, splits: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (channels.max(1) as u32, splits, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Checks that a size fits the kernels' 32-bit arguments.
pub fn u32_arg(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {what} {v} exceeds 2^32")))
}
