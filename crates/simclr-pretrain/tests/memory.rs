//! The momentum encoder's EMA update, the FIFO queue and the memory-buffer loss.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use common::*;
use simclr_pretrain::memory::{QUEUE_FILLED, QUEUE_KEYS, QUEUE_POINTER};
use simclr_pretrain::{
    copy_variables, ema_update, ema_update_with, is_bn_statistic, memory_contrastive_loss, nt_xent,
    BnStatisticsPolicy, MemoryConfig, MemoryQueue, NtXentConfig, SingleReplica,
};

fn varmap(entries: &[(&str, &[f32])]) -> VarMap {
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        for (name, values) in entries {
            let t = Tensor::new(*values, &Device::Cpu).unwrap();
            data.insert(name.to_string(), Var::from_tensor(&t).unwrap());
        }
    }
    vm
}

fn values(vm: &VarMap, name: &str) -> Vec<f32> {
    vm.data().lock().unwrap()[name]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap()
}

fn assert_vec_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "{what}: {got:?} vs {want:?}"
        );
    }
}

#[test]
fn paper_defaults() {
    let c = MemoryConfig::default();
    assert_eq!(c.queue_size, 65_536);
    assert_eq!(c.ema_decay, 0.999);
    assert_eq!(c.bn_statistics, BnStatisticsPolicy::Ema);
}

#[test]
fn bn_statistics_are_recognised_by_name() {
    assert!(is_bn_statistic("resnet.block_group1.0.bn1.moving_mean"));
    assert!(is_bn_statistic("head.nl_0.bn.moving_variance"));
    assert!(is_bn_statistic("bn.running_var"));
    assert!(!is_bn_statistic("resnet.bn1.gamma"));
    assert!(!is_bn_statistic("conv.weight"));
}

#[test]
fn ema_update_by_hand() {
    let target = varmap(&[
        ("conv.weight", &[1.0, 2.0, -4.0]),
        ("bn.gamma", &[1.0, 1.0]),
        ("bn.moving_mean", &[0.0, 10.0]),
    ]);
    let online = varmap(&[
        ("conv.weight", &[3.0, 0.0, 4.0]),
        ("bn.gamma", &[0.0, 2.0]),
        ("bn.moving_mean", &[5.0, 0.0]),
    ]);
    // decay 0.75: 0.75·target + 0.25·online.
    ema_update(&target, &online, 0.75).unwrap();
    assert_vec_close(&values(&target, "conv.weight"), &[1.5, 1.5, -2.0], "weight");
    assert_vec_close(&values(&target, "bn.gamma"), &[0.75, 1.25], "gamma");
    assert_vec_close(
        &values(&target, "bn.moving_mean"),
        &[1.25, 7.5],
        "moving mean (EMA)",
    );
    // The online network is untouched.
    assert_vec_close(&values(&online, "conv.weight"), &[3.0, 0.0, 4.0], "online");

    // A second step compounds: 0.75·1.5 + 0.25·3 = 1.875, …
    ema_update(&target, &online, 0.75).unwrap();
    assert_vec_close(
        &values(&target, "conv.weight"),
        &[1.875, 1.125, -0.5],
        "second step",
    );

    assert_vec_close(
        &values(&target, "bn.moving_mean"),
        &[2.1875, 5.625],
        "moving mean, step 2",
    );
    ema_update_with(&target, &online, 0.5, BnStatisticsPolicy::Keep).unwrap();
    assert_vec_close(&values(&target, "bn.moving_mean"), &[2.1875, 5.625], "kept");
    assert_vec_close(
        &values(&target, "conv.weight"),
        &[2.4375, 0.5625, 1.75],
        "ema under Keep",
    );
    ema_update_with(&target, &online, 0.5, BnStatisticsPolicy::Copy).unwrap();
    assert_vec_close(&values(&target, "bn.moving_mean"), &[5.0, 0.0], "copied");

    // decay 1 leaves the target alone, decay 0 copies.
    let before = values(&target, "conv.weight");
    ema_update(&target, &online, 1.0).unwrap();
    assert_eq!(values(&target, "conv.weight"), before, "decay 1");
    ema_update(&target, &online, 0.0).unwrap();
    assert_vec_close(&values(&target, "conv.weight"), &[3.0, 0.0, 4.0], "decay 0");
    assert!(ema_update(&target, &online, 1.5).is_err());
}

#[test]
fn ema_update_rejects_mismatched_variables_without_changing_anything() {
    let target = varmap(&[("a", &[1.0]), ("b", &[1.0])]);
    let missing = varmap(&[("a", &[2.0])]);
    let shape = varmap(&[("a", &[2.0, 2.0]), ("b", &[2.0])]);
    let renamed = varmap(&[("a", &[2.0]), ("c", &[2.0])]);
    assert!(ema_update(&target, &missing, 0.5).is_err());
    assert!(ema_update(&target, &shape, 0.5).is_err());
    assert!(ema_update(&target, &renamed, 0.5).is_err());
    assert_eq!(values(&target, "a"), vec![1.0]);
    assert_eq!(values(&target, "b"), vec![1.0]);
}

#[test]
fn copy_variables_initialises_the_momentum_encoder() {
    let target = varmap(&[("w", &[0.0, 0.0]), ("bn.moving_variance", &[1.0])]);
    let online = varmap(&[("w", &[1.0, -2.0]), ("bn.moving_variance", &[3.0])]);
    copy_variables(&target, &online).unwrap();
    assert_eq!(values(&target, "w"), vec![1.0, -2.0]);
    assert_eq!(values(&target, "bn.moving_variance"), vec![3.0]);
}

/// `b` keys of dimension 2 whose rows are `[start + j, −(start + j)]`.
fn numbered(start: usize, b: usize) -> Tensor {
    let v: Vec<f32> = (0..b)
        .flat_map(|j| {
            let x = (start + j) as f32;
            [x, -x]
        })
        .collect();
    Tensor::from_vec(v, (b, 2), &Device::Cpu).unwrap()
}

fn first_column(t: &Tensor) -> Vec<f32> {
    t.to_vec2::<f32>().unwrap().iter().map(|r| r[0]).collect()
}

#[test]
fn queue_is_fifo_with_wrap_around() {
    let mut q = MemoryQueue::new(5, 2, DType::F32, &Device::Cpu).unwrap();
    assert!(q.is_empty());
    assert_eq!(q.negatives().unwrap().dims(), &[0, 2]);

    q.enqueue(&numbered(1, 3)).unwrap(); // keys 1, 2, 3
    assert_eq!((q.len(), q.pointer(), q.is_full()), (3, 3, false));
    assert_eq!(first_column(&q.negatives().unwrap()), vec![1.0, 2.0, 3.0]);

    q.enqueue(&numbered(4, 4)).unwrap(); // keys 4..7: 4, 5 fill slots 3, 4; 6, 7 overwrite 1, 2
    assert_eq!((q.len(), q.pointer(), q.is_full()), (5, 2, true));
    assert_eq!(
        first_column(&q.negatives().unwrap()),
        vec![6.0, 7.0, 3.0, 4.0, 5.0]
    );
    // Rows are stored whole.
    assert_eq!(
        q.negatives().unwrap().to_vec2::<f32>().unwrap()[0],
        vec![6.0, -6.0]
    );

    q.enqueue(&numbered(8, 2)).unwrap(); // overwrites the oldest, 3 and 4
    assert_eq!(
        first_column(&q.negatives().unwrap()),
        vec![6.0, 7.0, 8.0, 9.0, 5.0]
    );
    assert_eq!(q.pointer(), 4);

    // More keys than slots: only the last five survive, each where row-by-row writing puts it.
    q.enqueue(&numbered(10, 7)).unwrap(); // 10..16 at slots 4,0,1,2,3,4,0
    assert_eq!(
        first_column(&q.negatives().unwrap()),
        vec![16.0, 12.0, 13.0, 14.0, 15.0]
    );
    assert_eq!(q.pointer(), 1);

    assert!(q
        .enqueue(&Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap())
        .is_err());
}

#[test]
fn queue_matches_a_slot_by_slot_simulation() {
    let cap = 7;
    let mut q = MemoryQueue::new(cap, 2, DType::F32, &Device::Cpu).unwrap();
    let mut slots: Vec<Option<f32>> = vec![None; cap];
    let mut ptr = 0;
    let mut next = 0usize;
    let mut rng = Rng::new(7);
    for _ in 0..40 {
        let b = (rng.next_u64() % 10) as usize; // 0..=9, sometimes more than the capacity
        for j in 0..b {
            slots[ptr] = Some((next + j) as f32);
            ptr = (ptr + 1) % cap;
        }
        if b > 0 {
            q.enqueue(&numbered(next, b)).unwrap();
        }
        next += b;
        let want: Vec<f32> = slots.iter().map_while(|s| *s).collect();
        assert_eq!(first_column(&q.negatives().unwrap()), want);
        assert_eq!(q.pointer(), ptr);
    }
}

#[test]
fn negatives_already_taken_do_not_change_on_enqueue() {
    let mut q = MemoryQueue::new(3, 2, DType::F32, &Device::Cpu).unwrap();
    q.enqueue(&numbered(1, 3)).unwrap();
    let before = q.negatives().unwrap();
    q.enqueue(&numbered(4, 2)).unwrap();
    assert_eq!(first_column(&before), vec![1.0, 2.0, 3.0]);
    assert_eq!(first_column(&q.negatives().unwrap()), vec![4.0, 5.0, 3.0]);
}

#[test]
fn queue_state_round_trips() {
    let mut q = MemoryQueue::new(4, 2, DType::F32, &Device::Cpu).unwrap();
    q.enqueue(&numbered(1, 3)).unwrap();
    let state = q.state_tensors().unwrap();
    assert_eq!(state[QUEUE_KEYS].dims(), &[4, 2]);
    assert_eq!(state[QUEUE_POINTER].to_vec1::<i64>().unwrap(), vec![3]);
    assert_eq!(state[QUEUE_FILLED].to_vec1::<i64>().unwrap(), vec![3]);

    let mut r = MemoryQueue::new(4, 2, DType::F32, &Device::Cpu).unwrap();
    r.load_state_tensors(&state).unwrap();
    assert_eq!((r.len(), r.pointer()), (3, 3));
    // The restored queue continues exactly like the original.
    q.enqueue(&numbered(4, 3)).unwrap();
    r.enqueue(&numbered(4, 3)).unwrap();
    assert_eq!(
        q.negatives().unwrap().to_vec2::<f32>().unwrap(),
        r.negatives().unwrap().to_vec2::<f32>().unwrap()
    );
    assert_eq!(q.pointer(), r.pointer());

    let mut wrong = MemoryQueue::new(5, 2, DType::F32, &Device::Cpu).unwrap();
    assert!(wrong.load_state_tensors(&state).is_err());
    assert!(wrong.is_empty());
    let mut bad = state.clone();
    bad.insert(
        QUEUE_POINTER.to_string(),
        Tensor::new(&[1i64], &Device::Cpu).unwrap(),
    );
    let mut r2 = MemoryQueue::new(4, 2, DType::F32, &Device::Cpu).unwrap();
    assert!(r2.load_state_tensors(&bad).is_err());
    let mut missing = state.clone();
    missing.remove(QUEUE_FILLED);
    assert!(r2.load_state_tensors(&missing).is_err());
}

#[test]
fn memory_loss_matches_float64_reference() {
    let (n, d, m) = (4, 6, 7);
    for (seed, &tau) in [0.1, 0.5].iter().enumerate() {
        for hidden_norm in [true, false] {
            let mut rng = Rng::new(600 + seed as u64);
            let q = rng.matrix(2 * n, d);
            let k = rng.matrix(2 * n, d);
            let queue: Vec<Vec<f64>> = rng
                .matrix(m, d)
                .iter()
                .map(|r| if hidden_norm { normalize(r) } else { r.clone() })
                .collect();
            let cfg = NtXentConfig {
                temperature: tau,
                hidden_norm,
            };
            let want = reference_memory_loss(&q, &k, &queue, tau, hidden_norm);
            let out = memory_contrastive_loss(
                &tensor(&q, DType::F64),
                &tensor(&k, DType::F64),
                Some(&tensor(&queue, DType::F64)),
                &cfg,
                &SingleReplica,
            )
            .unwrap();
            assert_close(scalar(&out.contrastive.loss), want, 1e-12, "memory loss");

            let out32 = memory_contrastive_loss(
                &tensor(&q, DType::F32),
                &tensor(&k, DType::F32),
                Some(&tensor(&queue, DType::F32)),
                &cfg,
                &SingleReplica,
            )
            .unwrap();
            assert_close(
                scalar(&out32.contrastive.loss),
                want,
                2e-5,
                "f32 memory loss",
            );

            // Without a queue the candidates are the in-batch keys only.
            let no_queue = memory_contrastive_loss(
                &tensor(&q, DType::F64),
                &tensor(&k, DType::F64),
                None,
                &cfg,
                &SingleReplica,
            )
            .unwrap();
            let want0 = reference_memory_loss(&q, &k, &[], tau, hidden_norm);
            assert_close(scalar(&no_queue.contrastive.loss), want0, 1e-12, "no queue");

            // The keys to enqueue: [K1; K2], normalised when hidden_norm.
            let keys = to_matrix(&out.keys);
            assert_eq!(keys.len(), 2 * n);
            let want_keys: Vec<Vec<f64>> = k
                .iter()
                .map(|r| if hidden_norm { normalize(r) } else { r.clone() })
                .collect();
            assert_matrix_close(&keys, &want_keys, 1e-15, "enqueued keys");
        }
    }
}

#[test]
fn memory_loss_gradient_reaches_queries_only() {
    let (n, d, m) = (3, 5, 4);
    let cfg = NtXentConfig::default();
    let mut rng = Rng::new(700);
    let q = rng.matrix(2 * n, d);
    let k = rng.matrix(2 * n, d);
    let queue: Vec<Vec<f64>> = rng.matrix(m, d).iter().map(|r| normalize(r)).collect();
    let qv = Var::from_tensor(&tensor(&q, DType::F64)).unwrap();
    let kv = Var::from_tensor(&tensor(&k, DType::F64)).unwrap();
    let negatives = tensor(&queue, DType::F64);
    let out = memory_contrastive_loss(
        qv.as_tensor(),
        kv.as_tensor(),
        Some(&negatives),
        &cfg,
        &SingleReplica,
    )
    .unwrap();
    let grads = out.contrastive.loss.backward().unwrap();
    assert!(grads.get(kv.as_tensor()).is_none());
    let grad = to_matrix(grads.get(qv.as_tensor()).unwrap());

    let flat: Vec<f64> = q.iter().flatten().copied().collect();
    let eps = 1e-6;
    let mut fd = vec![vec![0.0; d]; 2 * n];
    for (idx, g) in fd.iter_mut().flatten().enumerate() {
        let mut plus = flat.clone();
        plus[idx] += eps;
        let mut minus = flat.clone();
        minus[idx] -= eps;
        let rows = |v: Vec<f64>| -> Vec<Vec<f64>> { v.chunks(d).map(|c| c.to_vec()).collect() };
        *g = (reference_memory_loss(&rows(plus), &k, &queue, 0.1, true)
            - reference_memory_loss(&rows(minus), &k, &queue, 0.1, true))
            / (2.0 * eps);
    }
    assert_matrix_close(&grad, &fd, 1e-6, "query gradient");
}

#[test]
fn memory_loss_with_keys_equal_to_queries_and_no_queue_is_nt_xent() {
    let h = Rng::new(800).matrix(10, 7);
    let t = tensor(&h, DType::F64);
    for hidden_norm in [true, false] {
        let cfg = NtXentConfig {
            temperature: 0.2,
            hidden_norm,
        };
        let empty = MemoryQueue::new(8, 7, DType::F64, &Device::Cpu).unwrap();
        let mem = memory_contrastive_loss(
            &t,
            &t,
            Some(&empty.negatives().unwrap()),
            &cfg,
            &SingleReplica,
        )
        .unwrap();
        let nt = nt_xent(&t, &cfg, &SingleReplica).unwrap();
        assert_close(
            scalar(&mem.contrastive.loss),
            scalar(&nt.loss),
            1e-12,
            "memory == nt-xent",
        );
        assert_eq!(mem.contrastive.contrast_acc, nt.contrast_acc);
    }
}

#[test]
fn queue_feeds_the_loss_end_to_end() {
    // Two steps: the first step's keys become the second step's queue negatives.
    let (n, d) = (3, 4);
    let cfg = NtXentConfig::default();
    let mut rng = Rng::new(900);
    let mut queue = MemoryQueue::new(16, d, DType::F64, &Device::Cpu).unwrap();
    let (q1, k1) = (rng.matrix(2 * n, d), rng.matrix(2 * n, d));
    let out1 = memory_contrastive_loss(
        &tensor(&q1, DType::F64),
        &tensor(&k1, DType::F64),
        Some(&queue.negatives().unwrap()),
        &cfg,
        &SingleReplica,
    )
    .unwrap();
    queue.enqueue(&out1.keys).unwrap();
    assert_eq!(queue.len(), 2 * n);

    let (q2, k2) = (rng.matrix(2 * n, d), rng.matrix(2 * n, d));
    let out2 = memory_contrastive_loss(
        &tensor(&q2, DType::F64),
        &tensor(&k2, DType::F64),
        Some(&queue.negatives().unwrap()),
        &cfg,
        &SingleReplica,
    )
    .unwrap();
    let stored: Vec<Vec<f64>> = k1.iter().map(|r| normalize(r)).collect();
    let want = reference_memory_loss(&q2, &k2, &stored, 0.1, true);
    assert_close(scalar(&out2.contrastive.loss), want, 1e-12, "second step");
}
