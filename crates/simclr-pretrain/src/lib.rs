//! Contrastive pretraining for SimCLRv2.
//!
//! This crate owns the contrastive side of simclr-rs:
//!
//! * the objective: NT-Xent exactly as the official `add_contrastive_loss` (the official tf2/objective.py, `add_contrastive_loss`),
//!   with its logged metrics `contrast_acc` and `contrast_entropy` ([`objective`]), its
//!   normalisation and masked cross-entropy run as the fused kernels of `simclr-kernels`
//!   (`simclr_kernels::ntxent`);
//! * the use of the collectives (`simclr-collective`, re-exported here) through which
//!   negatives are gathered across replicas and their gradients are sent back home
//!   (the official tf2/objective.py, `tpu_cross_replica_concat`);
//! * SimCLRv2's optional momentum encoder and memory buffer of negatives: the EMA update of the
//!   weights, the FIFO queue of keys and the contrastive loss that uses both (described in the SimCLRv2 paper, absent from the official code;
//!   [`memory`]);
//! * the pretraining stage ([`stage`]): the model on the two stacked views, the contrastive
//!   loss, the online linear probe on stop-gradient features, the kNN monitor at epoch ends,
//!   run by the shared training loop of `simclr-train`.
//!
//! It does not own the networks (`simclr-models`), the kernels (`simclr-kernels`), the optimizers and learning-rate schedules
//! (`simclr-train`), data loading and augmentation (`simclr-data`) or evaluation
//! (`simclr-eval`). The objective works on plain tensors: it takes the projection-head outputs
//! of the two stacked views and knows nothing about the model that produced them.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use simclr_pretrain::{nt_xent, NtXentConfig, SingleReplica};
//!
//! # fn main() -> candle_core::Result<()> {
//! // 2n rows: the n view-1 projections, then the n view-2 projections.
//! let h = Tensor::randn(0f32, 1.0, (8, 16), &Device::Cpu)?;
//! let out = nt_xent(&h, &NtXentConfig::default(), &SingleReplica)?;
//! assert_eq!(out.loss.dims(), &[] as &[usize]);
//! println!("loss {} acc {}", out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, out.contrast_acc);
//! # Ok(()) }
//! ```

pub mod bench;
pub mod memory;
pub mod objective;
pub mod stage;

pub use memory::{
    copy_variables, ema_update, ema_update_with, is_bn_statistic, memory_contrastive_loss,
    BnStatisticsPolicy, MemoryConfig, MemoryLossOutput, MemoryQueue,
};
pub use objective::{l2_normalize, nt_xent, ContrastiveOutput, NtXentConfig};
pub use simclr_collective::{Collective, SingleReplica, ThreadGroup, ThreadReplica};
pub use stage::{run_pretrain, run_pretrain_replica, PretrainConfig, PretrainData, PretrainTask};
