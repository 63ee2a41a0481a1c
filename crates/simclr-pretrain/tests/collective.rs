//! The collectives and the multi-replica NT-Xent against a single replica on the combined batch.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use simclr_pretrain::{
    memory_contrastive_loss, nt_xent, Collective, NtXentConfig, SingleReplica, ThreadGroup,
    ThreadReplica,
};

fn run_replicas<T: Send>(world: usize, f: impl Fn(ThreadReplica) -> T + Sync) -> Vec<T> {
    ThreadGroup::run(world, f)
}

#[test]
fn single_replica_is_identity() {
    let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let c = SingleReplica;
    assert_eq!((c.rank(), c.world_size()), (0, 1));
    assert_eq!(
        c.all_gather(&x).unwrap().to_vec2::<f32>().unwrap(),
        x.to_vec2::<f32>().unwrap()
    );
    assert_eq!(
        c.all_reduce_sum(&x).unwrap().to_vec2::<f32>().unwrap(),
        x.to_vec2::<f32>().unwrap()
    );
}

#[test]
fn all_gather_forward_and_backward() {
    // Replica r holds x_r (2×3) and computes loss_r = Σ w_r ⊙ gather(x); the gradient of
    // Σ_r loss_r with respect to x_r is Σ_r' w_r' restricted to r's rows.
    let world = 3;
    let weights: Vec<Vec<Vec<f64>>> = (0..world)
        .map(|r| Rng::new(10 + r as u64).matrix(2 * world, 3))
        .collect();
    let inputs: Vec<Vec<Vec<f64>>> = (0..world)
        .map(|r| Rng::new(20 + r as u64).matrix(2, 3))
        .collect();
    let results = run_replicas(world, |rep| {
        let r = rep.rank();
        let x = Var::from_tensor(&tensor(&inputs[r], DType::F64)).unwrap();
        let gathered = rep.all_gather(x.as_tensor()).unwrap();
        let loss = (&gathered * tensor(&weights[r], DType::F64))
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        (
            to_matrix(&gathered),
            to_matrix(grads.get(x.as_tensor()).unwrap()),
        )
    });
    let all_rows: Vec<Vec<f64>> = inputs.iter().flatten().cloned().collect();
    for (r, (gathered, grad)) in results.iter().enumerate() {
        assert_eq!(gathered, &all_rows, "replica {r} gathered rows");
        let want: Vec<Vec<f64>> = (0..2)
            .map(|i| {
                (0..3)
                    .map(|j| (0..world).map(|s| weights[s][2 * r + i][j]).sum())
                    .collect()
            })
            .collect();
        assert_matrix_close(grad, &want, 1e-12, &format!("replica {r} gradient"));
    }
}

#[test]
fn all_reduce_forward_and_backward() {
    let world = 2;
    let coeffs = [[1.0f64, 2.0, 3.0], [10.0, 20.0, 30.0]];
    let inputs = [[0.5f64, -1.0, 2.0], [4.0, 0.25, -3.0]];
    let results = run_replicas(world, |rep| {
        let r = rep.rank();
        let x = Var::from_tensor(&Tensor::new(&inputs[r], &Device::Cpu).unwrap()).unwrap();
        let y = rep.all_reduce_sum(x.as_tensor()).unwrap();
        let loss = (&y * Tensor::new(&coeffs[r], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        (
            y.to_vec1::<f64>().unwrap(),
            grads.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap(),
        )
    });
    for (y, g) in results {
        assert_eq!(y, vec![4.5, -0.75, -1.0]);
        assert_eq!(g, vec![11.0, 22.0, 33.0]);
    }
}

#[test]
fn mismatched_shapes_fail_on_every_replica() {
    let results = run_replicas(2, |rep| {
        let x = Tensor::zeros((rep.rank() + 1, 2), DType::F32, &Device::Cpu).unwrap();
        rep.all_gather(&x).is_err()
    });
    assert_eq!(results, vec![true, true]);
}

#[test]
fn a_departed_replica_makes_the_others_fail_instead_of_hang() {
    let results = run_replicas(2, |rep| {
        if rep.rank() == 1 {
            drop(rep);
            return true;
        }
        let x = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
        rep.all_gather(&x).is_err()
    });
    assert_eq!(results, vec![true, true]);
}

/// Replica r's input: rows r·n..(r+1)·n of view 1, then the same rows of view 2.
fn shard(h: &[Vec<f64>], world: usize, r: usize) -> Vec<Vec<f64>> {
    let big_n = h.len() / 2;
    let n = big_n / world;
    let mut rows: Vec<Vec<f64>> = h[r * n..(r + 1) * n].to_vec();
    rows.extend_from_slice(&h[big_n + r * n..big_n + (r + 1) * n]);
    rows
}

fn check_replicas_match_single(world: usize, n: usize, dtype: DType, rel: f64) {
    let d = 5;
    for (seed, &tau) in [0.1, 0.5].iter().enumerate() {
        for hidden_norm in [true, false] {
            let cfg = NtXentConfig {
                temperature: tau,
                hidden_norm,
            };
            let h = Rng::new(400 + seed as u64).matrix(2 * world * n, d);

            let var = Var::from_tensor(&tensor(&h, dtype)).unwrap();
            let single = nt_xent(var.as_tensor(), &cfg, &SingleReplica).unwrap();
            let single_grad = to_matrix(
                single
                    .loss
                    .backward()
                    .unwrap()
                    .get(var.as_tensor())
                    .unwrap(),
            );
            let single_loss = scalar(&single.loss);

            let results = run_replicas(world, |rep| {
                let r = rep.rank();
                let var = Var::from_tensor(&tensor(&shard(&h, world, r), dtype)).unwrap();
                let out = nt_xent(var.as_tensor(), &cfg, &rep).unwrap();
                let loss = (&out.loss / world as f64).unwrap();
                let grads = loss.backward().unwrap();
                (
                    scalar(&loss),
                    to_matrix(grads.get(var.as_tensor()).unwrap()),
                    out.contrast_acc,
                    out.labels,
                )
            });

            let what = format!("world {world} tau {tau} hidden_norm {hidden_norm} {dtype:?}");
            let loss_sum: f64 = results.iter().map(|r| r.0).sum();
            assert_close(loss_sum, single_loss, rel, &format!("{what}: loss"));
            let acc_mean: f64 = results.iter().map(|r| r.2).sum::<f64>() / world as f64;
            assert_close(
                acc_mean,
                single.contrast_acc,
                1e-12,
                &format!("{what}: acc"),
            );
            let want_grad_shards: Vec<Vec<Vec<f64>>> =
                (0..world).map(|r| shard(&single_grad, world, r)).collect();
            for (r, res) in results.iter().enumerate() {
                assert_eq!(res.3, (r * n..(r + 1) * n).collect::<Vec<_>>());
                assert_matrix_close(
                    &res.1,
                    &want_grad_shards[r],
                    rel,
                    &format!("{what}: replica {r} gradient"),
                );
            }
        }
    }
}

#[test]
fn two_replicas_equal_one_replica_on_the_combined_batch_f64() {
    check_replicas_match_single(2, 3, DType::F64, 1e-10);
}

#[test]
fn two_replicas_equal_one_replica_on_the_combined_batch_f32() {
    check_replicas_match_single(2, 3, DType::F32, 1e-5);
}

#[test]
fn three_replicas_equal_one_replica_on_the_combined_batch() {
    check_replicas_match_single(3, 2, DType::F64, 1e-10);
}

#[test]
fn memory_loss_two_replicas_equal_one_replica() {
    let (world, n, d, m) = (2, 3, 4, 5);
    let cfg = NtXentConfig::default();
    let q = Rng::new(500).matrix(2 * world * n, d);
    let k = Rng::new(501).matrix(2 * world * n, d);
    let queue: Vec<Vec<f64>> = Rng::new(502)
        .matrix(m, d)
        .iter()
        .map(|r| normalize(r))
        .collect();
    let queue_t = tensor(&queue, DType::F64);

    let var = Var::from_tensor(&tensor(&q, DType::F64)).unwrap();
    let single = memory_contrastive_loss(
        var.as_tensor(),
        &tensor(&k, DType::F64),
        Some(&queue_t),
        &cfg,
        &SingleReplica,
    )
    .unwrap();
    let single_grad = to_matrix(
        single
            .contrastive
            .loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap(),
    );

    let results = run_replicas(world, |rep| {
        let r = rep.rank();
        let var = Var::from_tensor(&tensor(&shard(&q, world, r), DType::F64)).unwrap();
        let keys = tensor(&shard(&k, world, r), DType::F64);
        let out =
            memory_contrastive_loss(var.as_tensor(), &keys, Some(&queue_t), &cfg, &rep).unwrap();
        let loss = (&out.contrastive.loss / world as f64).unwrap();
        let grads = loss.backward().unwrap();
        (
            scalar(&loss),
            to_matrix(grads.get(var.as_tensor()).unwrap()),
            to_matrix(&out.keys),
        )
    });
    let loss_sum: f64 = results.iter().map(|r| r.0).sum();
    assert_close(
        loss_sum,
        scalar(&single.contrastive.loss),
        1e-10,
        "memory loss",
    );
    let single_keys = to_matrix(&single.keys);
    for (r, res) in results.iter().enumerate() {
        assert_matrix_close(&res.1, &shard(&single_grad, world, r), 1e-10, "memory grad");
        // Every replica enqueues the same gathered keys as one replica on the whole batch.
        assert_matrix_close(&res.2, &single_keys, 1e-15, "gathered keys");
    }
}

type Named = Vec<(String, Tensor)>;

/// One SimCLR step of a whole model (global BN in the encoder and the projection head,
/// NT-Xent over the gathered projections, the loss divided by the world size, gradients summed
/// over the replicas): the loss, every trainable gradient and every BN moving statistic.
fn model_step(x: &Tensor, replica: Option<&ThreadReplica>) -> (f64, Named, Named) {
    let dtype = x.dtype();
    use simclr_models::{ForwardOptions, ModelConfig, SimclrModel};
    let config = ModelConfig {
        resnet_depth: 18,
        cifar_stem: true,
        base_width: 4,
        num_classes: None,
        proj_out_dim: 8,
        ..ModelConfig::default()
    };
    let varmap = candle_nn::VarMap::new();
    let vb = simclr_models::init::SeededInit::var_builder(&varmap, 7, dtype, &Device::Cpu);
    let model = SimclrModel::new(&config, vb).unwrap();
    let opts = ForwardOptions {
        replicas: replica.map(|r| r as &dyn Collective),
        ..ForwardOptions::mode(true)
    };
    let out = model.forward_with(x, opts).unwrap();
    let single = SingleReplica;
    let c: &dyn Collective = match replica {
        Some(r) => r,
        None => &single,
    };
    let loss = nt_xent(&out.proj_head_output, &NtXentConfig::default(), c)
        .unwrap()
        .loss;
    let loss = (loss / c.world_size() as f64).unwrap();
    let mut grads = loss.backward().unwrap();
    let vars = simclr_train::named_vars(&varmap);
    simclr_train::all_reduce_gradients(&mut grads, &vars, c).unwrap();
    let total = scalar(&c.all_reduce_sum(&loss).unwrap());
    let g = vars
        .iter()
        .map(|v| {
            (
                v.name.clone(),
                grads.get(v.var.as_tensor()).unwrap().clone(),
            )
        })
        .collect();
    let data = varmap.data().lock().unwrap();
    let mut stats: Vec<(String, Tensor)> = data
        .iter()
        .filter(|(k, _)| k.contains("moving_"))
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    stats.sort_by(|a, b| a.0.cmp(&b.0));
    (total, g, stats)
}

/// Every element within `rel` of the largest magnitude in `want` (all tensors together).
fn assert_tensors_close(got: &[(String, Tensor)], want: &[(String, Tensor)], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: count");
    let scale = want
        .iter()
        .map(|(_, t)| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .fold(1e-12, f64::max);
    for ((n, a), (m, b)) in got.iter().zip(want) {
        assert_eq!(n, m);
        let a: Vec<f64> = a
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f64> = b
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= rel * scale, "{what} {n}[{i}]: {x} vs {y}");
        }
    }
}

#[test]
fn whole_model_with_global_bn_two_replicas_equal_one_replica_on_the_combined_batch() {
    // f32 runs the fused BN kernels; f64 the candle-op reference path, to a tighter tolerance.
    check_whole_model(DType::F32, 1e-4);
    check_whole_model(DType::F64, 1e-9);
}

fn check_whole_model(dtype: DType, rel: f64) {
    // Combined batch: views a = [a0; a1] then b = [b0; b1]; replica r holds [a_r; b_r].
    let n = 3;
    let mut rng = Rng::new(77);
    let mut img = |count: usize| -> Tensor {
        let v: Vec<f32> = (0..count * 3 * 12 * 12)
            .map(|_| rng.uniform() as f32)
            .collect();
        Tensor::from_vec(v, (count, 3, 12, 12), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let a = img(2 * n);
    let b = img(2 * n);
    let whole = Tensor::cat(&[&a, &b], 0).unwrap();
    let (loss1, grads1, stats1) = model_step(&whole, None);
    // Replica k's two-view batch.
    let shard = |k: usize| {
        Tensor::cat(
            &[
                a.narrow(0, k * n, n).unwrap(),
                b.narrow(0, k * n, n).unwrap(),
            ],
            0,
        )
        .unwrap()
    };
    let parts = run_replicas(2, |r| model_step(&shard(r.rank()), Some(&r)));
    for (loss, grads, stats) in &parts {
        assert_close(*loss, loss1, rel, "loss");
        assert_tensors_close(grads, &grads1, rel, "gradient");
        assert_tensors_close(stats, &stats1, rel, "BN statistic");
    }
    // The check has teeth: without global BN the replicas' statistics differ from the whole's.
    let local = model_step(&shard(0), None).2;
    let differs = local.iter().zip(&stats1).any(|((_, x), (_, y))| {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            > 1e-4
    });
    assert!(
        differs,
        "per-replica BN should not match the combined batch"
    );
}
