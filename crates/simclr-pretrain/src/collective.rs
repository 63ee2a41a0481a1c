//! Collective operations between data-parallel replicas (reference §2.2).
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
//!   reference §2.2).
//! * [`Collective::all_reduce_sum`]: forward sums elementwise over the replicas; backward is the
//!   all-reduce of the incoming gradient. Global batch normalisation builds its statistics on it.
//!
//! The loss each replica computes is then divided by the world size by the caller and the
//! parameter gradients are summed across replicas (an all-reduce), which gives the mean over the
//! global batch (reference §2.1 step 7).
//!
//! # Implementations
//!
//! * [`SingleReplica`]: one replica; both collectives are the identity. Works on any device.
//! * [`ThreadGroup`]: `N` replicas simulated by `N` threads of one process, exchanging buffers
//!   through shared slots and a barrier. CPU tensors only. It exists to test the multi-replica
//!   arithmetic (loss, gradients, global BN) against a single replica on the combined batch.
//!
//! The trait is written so that a multi-GPU implementation (NCCL: `ncclAllGather` and
//! `ncclAllReduce` on the tensors' CUDA buffers) can later be added behind it without touching
//! its users: it only asks for a rank, a world size and the two tensor-in/tensor-out
//! collectives, and the differentiable ops are candle custom ops whose backward calls the same
//! collective, which such an implementation would provide through `cuda_fwd`.
//!
//! # The contract between replicas
//!
//! A collective completes only when every replica has called it. The differentiable ops run
//! their backward collective from inside candle's `backward()`, so **all replicas must build
//! identical graphs** (same ops in the same order, the same tensors tracking gradients): candle
//! visits the nodes of identical graphs in the same order, and the replicas' backward passes then
//! meet at the collectives in the same order. All replicas must also pass tensors of the same
//! dtype, and of the same shape (all-reduce) or the same shape after dim 0 and the same dim-0
//! length (all-gather); a mismatch is reported as an error on every replica.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// Collective communication between data-parallel replicas.
///
/// See the [module documentation](self) for the semantics and the contract between replicas.
pub trait Collective: Send + Sync {
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

/// Constructor of an in-process group of replicas simulated by threads.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use simclr_pretrain::{Collective, ThreadGroup};
///
/// let replicas = ThreadGroup::new(2);
/// let gathered: Vec<Vec<f32>> = std::thread::scope(|s| {
///     let handles: Vec<_> = replicas
///         .into_iter()
///         .map(|r| {
///             s.spawn(move || {
///                 let x = Tensor::new(&[r.rank() as f32], &Device::Cpu).unwrap();
///                 r.all_gather(&x).unwrap().to_vec1::<f32>().unwrap()
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert_eq!(gathered, vec![vec![0.0, 1.0], vec![0.0, 1.0]]);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ThreadGroup;

impl ThreadGroup {
    /// Creates a group of `world_size` replicas and returns one handle per rank (index = rank).
    ///
    /// Move each handle to its own thread. When a replica's handle (and every tensor graph that
    /// still refers to it) is dropped, the group is closed: replicas that wait in, or later
    /// enter, a collective get an error instead of waiting forever. So a replica that fails or
    /// panics makes the others fail too rather than hang.
    ///
    /// # Panics
    /// If `world_size` is 0.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world_size: usize) -> Vec<ThreadReplica> {
        assert!(world_size > 0, "a thread group needs at least one replica");
        let shared = Arc::new(Shared {
            world_size,
            state: Mutex::new(State {
                arrived: 0,
                generation: 0,
                closed_by: None,
                slots: vec![None; world_size],
            }),
            cv: Condvar::new(),
        });
        (0..world_size)
            .map(|rank| ThreadReplica {
                inner: Arc::new(ReplicaInner {
                    rank,
                    shared: shared.clone(),
                }),
            })
            .collect()
    }
}

/// One replica of a [`ThreadGroup`]; use it from one thread.
#[derive(Debug, Clone)]
pub struct ThreadReplica {
    inner: Arc<ReplicaInner>,
}

impl Collective for ThreadReplica {
    fn rank(&self) -> usize {
        self.inner.rank
    }

    fn world_size(&self) -> usize {
        self.inner.shared.world_size
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        check_cpu(x, "all_gather")?;
        if x.rank() == 0 {
            bail!("all_gather needs a tensor of rank >= 1")
        }
        x.contiguous()?.apply_op1(AllGatherOp {
            replica: self.inner.clone(),
        })
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        check_cpu(x, "all_reduce_sum")?;
        x.contiguous()?.apply_op1(AllReduceSumOp {
            replica: self.inner.clone(),
        })
    }
}

fn check_cpu(x: &Tensor, what: &str) -> Result<()> {
    if !x.device().is_cpu() {
        bail!(
            "ThreadGroup::{what} simulates replicas on the CPU only; got a tensor on {:?}",
            x.device().location()
        )
    }
    Ok(())
}

/// A contiguous copy of one replica's tensor, as exchanged through the slots.
#[derive(Debug, Clone)]
struct Payload {
    data: CpuStorage,
    dims: Vec<usize>,
}

#[derive(Debug)]
struct State {
    /// Replicas waiting at the current barrier.
    arrived: usize,
    /// Incremented each time a barrier releases.
    generation: u64,
    /// The rank whose handle was dropped, closing the group.
    closed_by: Option<usize>,
    slots: Vec<Option<Payload>>,
}

#[derive(Debug)]
struct Shared {
    world_size: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        match self.state.lock() {
            Ok(g) => Ok(g),
            Err(_) => bail!("thread group state poisoned by a panicking replica"),
        }
    }

    /// A reusable barrier (std's `Barrier` semantics) that fails instead of blocking forever
    /// once the group is closed.
    fn wait(&self) -> Result<()> {
        let mut st = self.lock()?;
        if let Some(r) = st.closed_by {
            bail!("thread group closed: replica {r} has left")
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.world_size {
            st.arrived = 0;
            st.generation = st.generation.wrapping_add(1);
            self.cv.notify_all();
            return Ok(());
        }
        loop {
            st = match self.cv.wait(st) {
                Ok(g) => g,
                Err(_) => bail!("thread group state poisoned by a panicking replica"),
            };
            if st.generation != generation {
                return Ok(());
            }
            if let Some(r) = st.closed_by {
                bail!("thread group closed while waiting: replica {r} has left")
            }
        }
    }

    /// Publishes `payload` in slot `rank` and returns every replica's payload, in rank order.
    ///
    /// Two barriers: after the first every slot holds this round's payload; after the second
    /// every replica has read them, so the slots may be overwritten by the next round.
    fn exchange(&self, rank: usize, payload: Payload) -> Result<Vec<Payload>> {
        {
            let mut st = self.lock()?;
            if let Some(r) = st.closed_by {
                bail!("thread group closed: replica {r} has left")
            }
            st.slots[rank] = Some(payload);
        }
        self.wait()?;
        let all = {
            let st = self.lock()?;
            st.slots.iter().cloned().collect::<Option<Vec<_>>>()
        };
        self.wait()?;
        match all {
            Some(all) => Ok(all),
            None => bail!("thread group: a slot was empty after the barrier"),
        }
    }

    fn close(&self, rank: usize) {
        // Never panic in drop: a poisoned lock still lets us mark the group closed.
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if st.closed_by.is_none() {
            st.closed_by = Some(rank);
        }
        self.cv.notify_all();
    }
}

#[derive(Debug)]
struct ReplicaInner {
    rank: usize,
    shared: Arc<Shared>,
}

impl ReplicaInner {
    fn exchange(&self, payload: Payload) -> Result<Vec<Payload>> {
        self.shared.exchange(self.rank, payload)
    }
}

impl Drop for ReplicaInner {
    fn drop(&mut self) {
        self.shared.close(self.rank);
    }
}

/// Copies the elements `layout` addresses (which must be contiguous) out of `storage`.
fn payload_from(storage: &CpuStorage, layout: &Layout) -> Result<Payload> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("collective: expected a contiguous tensor")
    };
    macro_rules! copy {
        ($($variant:ident),*) => {
            match storage {
                $(CpuStorage::$variant(v) => CpuStorage::$variant(v[start..end].to_vec()),)*
                other => bail!("collective: unsupported dtype {:?}", other.dtype()),
            }
        };
    }
    let data = copy!(U8, U32, I16, I32, I64, BF16, F16, F32, F64);
    Ok(Payload {
        data,
        dims: layout.dims().to_vec(),
    })
}

fn check_dtypes(all: &[Payload], what: &str) -> Result<()> {
    let d0 = all[0].data.dtype();
    for (r, p) in all.iter().enumerate() {
        if p.data.dtype() != d0 {
            bail!(
                "{what}: replica {r} passed {:?}, replica 0 passed {:?}",
                p.data.dtype(),
                d0
            )
        }
    }
    Ok(())
}

/// Elementwise sum of the payloads in rank order (the same order on every replica, so every
/// replica gets bitwise the same result). Floating-point dtypes only.
fn sum_payloads(all: &[Payload]) -> Result<CpuStorage> {
    macro_rules! sum {
        ($($variant:ident),*) => {
            match &all[0].data {
                $(CpuStorage::$variant(first) => {
                    let mut acc = first.clone();
                    for p in &all[1..] {
                        let CpuStorage::$variant(v) = &p.data else {
                            bail!("all_reduce_sum: dtype mismatch")
                        };
                        for (a, b) in acc.iter_mut().zip(v.iter()) {
                            *a += *b;
                        }
                    }
                    CpuStorage::$variant(acc)
                })*
                other => bail!("all_reduce_sum: unsupported dtype {:?}", other.dtype()),
            }
        };
    }
    Ok(sum!(BF16, F16, F32, F64))
}

/// Differentiable all-gather along dim 0 for a [`ThreadGroup`].
struct AllGatherOp {
    replica: Arc<ReplicaInner>,
}

impl CustomOp1 for AllGatherOp {
    fn name(&self) -> &'static str {
        "thread-group-all-gather"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let all = self.replica.exchange(payload_from(storage, layout)?)?;
        check_dtypes(&all, "all_gather")?;
        let d0 = all[0].dims.clone();
        for (r, p) in all.iter().enumerate() {
            if p.dims != d0 {
                bail!(
                    "all_gather: replica {r} passed shape {:?}, replica 0 passed {:?}; \
                     all replicas must pass the same shape",
                    p.dims,
                    d0
                )
            }
        }
        let datas: Vec<CpuStorage> = all.into_iter().map(|p| p.data).collect();
        let data = CpuStorage::concat(&datas)?;
        let mut dims = d0;
        dims[0] *= datas.len();
        Ok((data, Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let summed = grad_res.contiguous()?.apply_op1_no_bwd(&AllReduceSumOp {
            replica: self.replica.clone(),
        })?;
        let n = arg.dim(0)?;
        Ok(Some(summed.narrow(0, self.replica.rank * n, n)?))
    }
}

/// Differentiable all-reduce (sum) for a [`ThreadGroup`]; also used without backward to reduce
/// gradients.
struct AllReduceSumOp {
    replica: Arc<ReplicaInner>,
}

impl CustomOp1 for AllReduceSumOp {
    fn name(&self) -> &'static str {
        "thread-group-all-reduce-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let all = self.replica.exchange(payload_from(storage, layout)?)?;
        check_dtypes(&all, "all_reduce_sum")?;
        let d0 = &all[0].dims;
        for (r, p) in all.iter().enumerate() {
            if &p.dims != d0 {
                bail!(
                    "all_reduce_sum: replica {r} passed shape {:?}, replica 0 passed {:?}",
                    p.dims,
                    d0
                )
            }
        }
        let data = sum_payloads(&all)?;
        Ok((data, Shape::from(d0.clone())))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let summed = grad_res.contiguous()?.apply_op1_no_bwd(&AllReduceSumOp {
            replica: self.replica.clone(),
        })?;
        Ok(Some(summed))
    }
}
