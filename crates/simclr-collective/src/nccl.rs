//! Data-parallel replicas on several GPUs through NCCL (feature `nccl`): one process per GPU.
//!
//! [`NcclReplica`] implements [`Collective`] with `ncclAllGather` / `ncclAllReduce` on the
//! tensors' CUDA buffers, on the stream candle's device uses, so the collectives are ordered
//! with the surrounding kernels. The differentiable ops have the same backward as the thread
//! simulation's ([`crate::ThreadGroup`], which the tests check against one replica): the
//! gradient of an all-reduce is the all-reduce of the gradient, and that of an all-gather is
//! this replica's rows of the all-reduced gradient.
//!
//! Rendezvous: the replicas share NCCL's 128-byte unique id through a file or a TCP address
//! ([`NcclReplica::join`], [`Rendezvous`]).
//!
//! f32 and f64 tensors are supported (activations in bf16 reach the collectives only through
//! f32 statistics and losses).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

use crate::{Collective, Rendezvous};

/// The communicator. NCCL allows a communicator to be driven from any thread but not from two
/// at once; the mutex around it provides that.
struct CommHandle(Comm);

// SAFETY: see above; every use goes through the `Mutex` in `NcclReplica`.
unsafe impl Send for CommHandle {}

/// One replica (one process, one GPU) of an NCCL group.
#[derive(Clone)]
pub struct NcclReplica {
    comm: Arc<Mutex<CommHandle>>,
    rank: usize,
    world_size: usize,
}

impl std::fmt::Debug for NcclReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclReplica")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

fn nccl_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL: {e:?}"))
}

impl NcclReplica {
    /// Joins the group `id` as `rank` of `world_size`, on `device` (a CUDA device).
    pub fn new(device: &Device, rank: usize, world_size: usize, id: Id) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("NCCL replicas need a CUDA device, got {device:?}")
        };
        if rank >= world_size {
            bail!("rank {rank} is outside a world of {world_size}")
        }
        let comm = Comm::from_rank(dev.cuda_stream(), rank, world_size, id).map_err(nccl_err)?;
        Ok(Self {
            comm: Arc::new(Mutex::new(CommHandle(comm))),
            rank,
            world_size,
        })
    }

    /// Joins through `rendezvous` (a file or a TCP address, [`Rendezvous`]): rank 0 creates
    /// the NCCL id and hands it over; the other ranks wait for it for up to `timeout`.
    pub fn join(
        rendezvous: &Rendezvous,
        device: &Device,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let bytes = rendezvous.exchange(rank, world_size, 128, timeout, || {
            let id = Id::new().map_err(nccl_err)?;
            Ok(id.internal().iter().map(|&c| c as u8).collect())
        })?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&bytes) {
            *d = *s as std::ffi::c_char;
        }
        let replica = Self::new(device, rank, world_size, Id::uninit(internal))?;
        // Every rank has joined once the communicator exists.
        rendezvous.finish(rank);
        Ok(replica)
    }

    fn comm(&self) -> std::sync::MutexGuard<'_, CommHandle> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collective for NcclReplica {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() == 0 {
            bail!("all_gather needs a tensor of rank >= 1")
        }
        x.contiguous()?.apply_op1(NcclOp {
            replica: self.clone(),
            gather: true,
        })
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(NcclOp {
            replica: self.clone(),
            gather: false,
        })
    }
}

/// All-gather (along dim 0) or all-reduce (sum) of a contiguous CUDA tensor.
struct NcclOp {
    replica: NcclReplica,
    gather: bool,
}

impl NcclOp {
    fn run<T>(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)>
    where
        T: CudaDType + DeviceRepr + NcclType,
    {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("NCCL collectives need contiguous tensors")
        };
        let src = storage.as_cuda_slice::<T>()?.slice(start..end);
        let dev = storage.device().clone();
        let n = end - start;
        let world = self.replica.world_size;
        let out_len = if self.gather { n * world } else { n };
        // SAFETY: every element is written by the collective before it is read.
        let mut dst = unsafe { dev.alloc::<T>(out_len)? };
        let guard = self.replica.comm();
        if self.gather {
            guard.0.all_gather(&src, &mut dst).map_err(nccl_err)?;
        } else {
            guard
                .0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(nccl_err)?;
        }
        let mut dims = layout.dims().to_vec();
        if self.gather {
            dims[0] *= world;
        }
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), Shape::from(dims)))
    }
}

impl CustomOp1 for NcclOp {
    fn name(&self) -> &'static str {
        if self.gather {
            "nccl-all-gather"
        } else {
            "nccl-all-reduce-sum"
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("{}: NCCL replicas exchange CUDA tensors only", self.name())
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        match storage.dtype() {
            DType::F32 => self.run::<f32>(storage, layout),
            DType::F64 => self.run::<f64>(storage, layout),
            d => bail!("{}: {d:?} is not supported (f32, f64)", self.name()),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let total = self.replica.all_reduce_sum(&grad.detach())?;
        if self.gather {
            let n = arg.dim(0)?;
            Ok(Some(total.narrow(0, self.replica.rank * n, n)?))
        } else {
            Ok(Some(total))
        }
    }
}
