//! The in-process simulation of `N` replicas by `N` threads (see [`ThreadGroup`]).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::Collective;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// Constructor of an in-process group of replicas simulated by threads.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use simclr_collective::{Collective, ThreadGroup};
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
    /// Runs `f(replica)` for a group of `world_size` replicas, one scoped thread each, and
    /// returns the results in rank order.
    ///
    /// # Panics
    /// If `world_size` is 0, or when a replica's thread panics (the panic is propagated).
    pub fn run<T: Send>(world_size: usize, f: impl Fn(ThreadReplica) -> T + Sync) -> Vec<T> {
        let replicas = Self::new(world_size);
        std::thread::scope(|s| {
            let handles: Vec<_> = replicas
                .into_iter()
                .map(|r| {
                    let f = &f;
                    s.spawn(move || f(r))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

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
