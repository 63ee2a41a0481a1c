//! Collective operations between data-parallel replicas (the official tf2/objective.py, `tpu_cross_replica_concat`).
//!
//! This crate owns the communication between replicas and nothing else: the [`Collective`]
//! trait, the single-replica identity and an in-process simulation of several replicas with
//! threads ([`ThreadGroup`]). Its users are the models (global batch normalisation), the
//! contrastive objective (cross-replica negatives) and the training loop (gradient all-reduce);
//! it knows nothing about any of them.
//!
//! SimCLR computes each replica's loss for its own `n` anchors against the candidates of
//! *every* replica, so the projections must be gathered across replicas, and the gradient that
//! other replicas' losses send to a gathered row must come back to the replica that owns the
//! row ("gradients go home"). Both collectives here are differentiable:
//!
//! * [`Collective::all_gather`]: forward concatenates every replica's tensor along dim 0 in
//!   rank order; backward **sums** the incoming gradient over all replicas (an all-reduce) and
//!   returns this replica's slice. Returning only the local slice of the local gradient would
//!   drop every other replica's contribution (the bug lightly fixed in its `GatherLayer`,
//!   the official tf2/objective.py, `tpu_cross_replica_concat`).
//! * [`Collective::all_reduce_sum`]: forward sums elementwise over the replicas; backward is the
//!   all-reduce of the incoming gradient. Global batch normalisation builds its statistics on it.
//!
//! The loss each replica computes is then divided by the world size by the caller and the
//! parameter gradients are summed across replicas (an all-reduce), which gives the mean over the
//! global batch (the official tf2/objective.py, `add_contrastive_loss` step 7).
//!
//! # Implementations
//!
//! * [`SingleReplica`]: one replica; both collectives are the identity. Works on any device.
//! * [`ThreadGroup`]: `N` replicas simulated by `N` threads of one process, exchanging buffers
//!   through shared slots and a barrier. CPU tensors only. It exists to test the multi-replica
//!   arithmetic (loss, gradients, global BN) against a single replica on the combined batch.
//!
//! * `NcclReplica` (feature `nccl`): one process per GPU, `ncclAllGather` and `ncclAllReduce`
//!   on the tensors' CUDA buffers, with the same backward as the thread simulation.
//!
//! * [`Rendezvous`]: how the processes of a multi-GPU run meet, through a file or a TCP
//!   address (needs no GPU; tested with threads); [`Launch`]: rank, world size and rendezvous
//!   from a `torchrun` or SLURM environment.
//!
//! The trait only asks for a rank, a world size and the two tensor-in/tensor-out collectives;
//! the differentiable ops are candle custom ops whose backward calls the same collective.
//!
//! # The contract between replicas
//!
//! A collective completes only when every replica has called it. The differentiable ops run
//! their backward collective from inside candle's `backward()`, so **all replicas must build
//! identical graphs** (same ops in the same order, the same tensors tracking gradients): candle
//! visits the nodes of identical graphs in the same order, and the replicas' backward passes then
//! meet at the collectives in the same order. All replicas must also pass tensors of the same
//! dtype, and of the same shape (all-reduce) or the same shape after dim 0 and the same dim-0
//! length (all-gather). The thread simulation reports a mismatch as an error on every replica;
//! NCCL cannot check it (a mismatch there hangs or corrupts), which is why the same graph on
//! every replica matters.

use candle_core::{bail, Result, Tensor};

mod launch;
#[cfg(feature = "nccl")]
mod nccl;
mod rendezvous;
mod thread_group;

pub use launch::{first_host, launch_from, slurm_port, Launch};
pub use rendezvous::Rendezvous;

#[cfg(feature = "nccl")]
pub use nccl::NcclReplica;
pub use thread_group::{ThreadGroup, ThreadReplica};

/// Collective communication between data-parallel replicas.
///
/// See the [module documentation](self) for the semantics and the contract between replicas.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This replica's index, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of replicas.
    fn world_size(&self) -> usize;

    /// Concatenates every replica's `x` along dim 0 in rank order.
    ///
    /// Differentiable: the gradient of the result is summed over all replicas and this
    /// replica's rows of the sum are the gradient of `x`.
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;

    /// Elementwise sum of every replica's `x`.
    ///
    /// Differentiable: the gradient of `x` is the sum over all replicas of the gradient of the
    /// result.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
}

/// One replica: the collectives are the identity, on any device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SingleReplica;

impl Collective for SingleReplica {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() == 0 {
            bail!("all_gather needs a tensor of rank >= 1")
        }
        Ok(x.clone())
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
}
