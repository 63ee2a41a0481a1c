//! kNN classification against hand computations and an independent float64 re-computation.

use std::time::Instant;

use candle_core::{Device, Tensor};
use simclr_eval::{knn_evaluate, ClassificationMetrics, KnnBank, KnnConfig, KnnVote};

/// A small deterministic generator (splitmix64) so the tests need no extra dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// `n` features of dimension `dim`: a per-class mean (scaled by `separation`) plus unit noise.
fn clustered(
    rng: &mut Rng,
    means: &[Vec<f64>],
    n: usize,
    separation: f64,
) -> (Vec<f32>, Vec<usize>) {
    let dim = means[0].len();
    let mut features = Vec::with_capacity(n * dim);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let label = rng.below(means.len());
        labels.push(label);
        for mean in &means[label] {
            features.push((separation * mean + rng.normal()) as f32);
        }
    }
    (features, labels)
}

fn tensor(values: &[f32], rows: usize) -> Tensor {
    Tensor::from_slice(values, (rows, values.len() / rows), &Device::Cpu).unwrap()
}

// Query q = (1, 0). Bank, with cosine similarity to q and label:
//   b0 = (3, 0)            sim  1    class 0   (not unit length: normalisation must handle it)
//   b1 = (1/2,  √3/2)      sim  1/2  class 1
//   b2 = (1/2, -√3/2)      sim  1/2  class 1
//   b3 = (-1, 0)           sim -1    class 2
//   b4 = (-2, 0)           sim -1    class 2
// k = 3, τ = 0.1: the neighbours are b0, b1, b2.
//   weighted votes ∝ exp(s/τ): class 0: e^10, class 1: 2 e^5, class 2: 0  -> class 0
//   scaled by e^-10 as the crate reports them: 1, 2 e^-5 ≈ 0.013476, 0
//   majority: class 0: 1, class 1: 2                                        -> class 1
fn hand_bank() -> KnnBank {
    let h = 3f32.sqrt() / 2.0;
    let bank = Tensor::new(
        &[[3.0f32, 0.0], [0.5, h], [0.5, -h], [-1.0, 0.0], [-2.0, 0.0]],
        &Device::Cpu,
    )
    .unwrap();
    KnnBank::new(&bank, &[0usize, 1, 1, 2, 2], 3).unwrap()
}

#[test]
fn weighted_vote_differs_from_majority_vote_by_hand() {
    let bank = hand_bank();
    assert_eq!((bank.len(), bank.dim(), bank.num_classes()), (5, 2, 3));
    let q = Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu).unwrap();
    let config = KnnConfig {
        k: 3,
        temperature: 0.1,
        chunk_size: 4,
    };

    let weighted = bank.votes(&q, &config, KnnVote::Weighted).unwrap();
    let expected = [1.0, 2.0 * (-5.0f64).exp(), 0.0];
    for (got, want) in weighted.iter().zip(expected) {
        assert!((got - want).abs() < 1e-5, "{weighted:?} vs {expected:?}");
    }
    assert_eq!(
        bank.votes(&q, &config, KnnVote::Majority).unwrap(),
        vec![1.0, 2.0, 0.0]
    );
    assert_eq!(
        bank.predict(&q, &config, KnnVote::Weighted).unwrap(),
        vec![0]
    );
    assert_eq!(
        bank.predict(&q, &config, KnnVote::Majority).unwrap(),
        vec![1]
    );

    // With the true label 1, weighted kNN is wrong and majority right.
    let w = bank
        .evaluate(&q, &[1usize], &config, KnnVote::Weighted)
        .unwrap();
    assert_eq!((w.predictions.clone(), w.top1()), (vec![0], 0.0));
    let m = bank
        .evaluate(&q, &[1usize], &config, KnnVote::Majority)
        .unwrap();
    assert_eq!((m.predictions.clone(), m.top1()), (vec![1], 1.0));
}

#[test]
fn ties_among_neighbours_and_votes_take_the_lower_index() {
    let bank = hand_bank();
    // q = (0, 1): similarities 0, √3/2, -√3/2, 0, 0. With k = 2 the nearest is b1, then three
    // points tie at 0 and b0 (lowest index, class 0) is taken.
    let q = Tensor::new(&[[0.0f32, 1.0]], &Device::Cpu).unwrap();
    let config = KnnConfig {
        k: 2,
        temperature: 0.1,
        chunk_size: 1,
    };
    // Majority: class 0 and class 1 one vote each -> class 0 (lower index).
    assert_eq!(
        bank.votes(&q, &config, KnnVote::Majority).unwrap(),
        vec![1.0, 1.0, 0.0]
    );
    assert_eq!(
        bank.predict(&q, &config, KnnVote::Majority).unwrap(),
        vec![0]
    );
    // Weighted: b1 dominates -> class 1.
    assert_eq!(
        bank.predict(&q, &config, KnnVote::Weighted).unwrap(),
        vec![1]
    );

    // k = 5 on q = (1, 0): majority 1 / 2 / 2 -> tie between classes 1 and 2 -> class 1.
    let q = Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu).unwrap();
    let all = KnnConfig { k: 5, ..config };
    assert_eq!(
        bank.votes(&q, &all, KnnVote::Majority).unwrap(),
        vec![1.0, 2.0, 2.0]
    );
    assert_eq!(bank.predict(&q, &all, KnnVote::Majority).unwrap(), vec![1]);
}

#[test]
fn k_is_capped_at_the_bank_size() {
    let bank = hand_bank();
    let q = Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu).unwrap();
    let huge = KnnConfig {
        k: 1000,
        ..KnnConfig::default()
    };
    assert_eq!(
        bank.votes(&q, &huge, KnnVote::Majority).unwrap(),
        vec![1.0, 2.0, 2.0]
    );
}

/// The f64 reference: votes of one query, and whether its outcome is too close to a tie for
/// f32 similarities to be sure of it (the k-th and (k+1)-th similarities, or the two best
/// classes, within a hair).
fn reference_votes(
    bank: &[Vec<f64>],
    labels: &[usize],
    query: &[f64],
    num_classes: usize,
    k: usize,
    temperature: f64,
    vote: KnnVote,
) -> (Vec<f64>, bool) {
    let unit = |v: &[f64]| {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / n).collect::<Vec<f64>>()
    };
    let q = unit(query);
    let mut sims: Vec<(f64, usize)> = bank
        .iter()
        .enumerate()
        .map(|(i, b)| (unit(b).iter().zip(&q).map(|(a, b)| a * b).sum(), i))
        .collect();
    sims.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
    let k = k.min(bank.len());
    let mut votes = vec![0.0; num_classes];
    for &(s, i) in &sims[..k] {
        votes[labels[i]] += match vote {
            KnnVote::Weighted => (s / temperature).exp(),
            KnnVote::Majority => 1.0,
        };
    }
    let boundary_tie = k < sims.len() && (sims[k - 1].0 - sims[k].0).abs() < 1e-5;
    let mut sorted = votes.clone();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let vote_tie = match vote {
        KnnVote::Weighted => (sorted[0] - sorted[1]).abs() <= 1e-5 * sorted[0],
        // Integer counts: an exact tie is resolved by the same rule on both sides.
        KnnVote::Majority => false,
    };
    (votes, boundary_tie || vote_tie)
}

fn argmax_first(v: &[f64]) -> usize {
    let mut best = 0;
    for (j, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = j;
        }
    }
    best
}

/// Random clustered features; the crate's predictions must equal the f64 reference on every
/// query that is not within a hair of a tie.
fn compare_with_reference(num_classes: usize, vote: KnnVote, seed: u64) {
    let (n_bank, n_query, dim) = (200, 50, 16);
    let (k, temperature) = (20, 0.1);
    let mut rng = Rng(seed);
    let means: Vec<Vec<f64>> = (0..num_classes)
        .map(|_| (0..dim).map(|_| rng.normal()).collect())
        .collect();
    let (bank_f, bank_l) = clustered(&mut rng, &means, n_bank, 0.7);
    let (query_f, query_l) = clustered(&mut rng, &means, n_query, 0.7);

    let config = KnnConfig {
        k,
        temperature,
        chunk_size: 16,
    };
    let result = knn_evaluate(
        &tensor(&bank_f, n_bank),
        &bank_l,
        &tensor(&query_f, n_query),
        &query_l,
        num_classes,
        &config,
        vote,
    )
    .unwrap();
    let bank = KnnBank::new(&tensor(&bank_f, n_bank), &bank_l, num_classes).unwrap();
    let votes = bank
        .votes(&tensor(&query_f, n_query), &config, vote)
        .unwrap();

    let rows = |v: &[f32]| -> Vec<Vec<f64>> {
        v.chunks(dim)
            .map(|r| r.iter().map(|&x| f64::from(x)).collect())
            .collect()
    };
    let (bank64, query64) = (rows(&bank_f), rows(&query_f));
    let mut compared = 0;
    let mut reference_correct = 0;
    let mut reference_top5 = 0;
    for (i, q) in query64.iter().enumerate() {
        let (ref_votes, near_tie) =
            reference_votes(&bank64, &bank_l, q, num_classes, k, temperature, vote);
        if near_tie {
            continue;
        }
        compared += 1;
        let expected = argmax_first(&ref_votes);
        assert_eq!(result.predictions[i], expected, "query {i}: {ref_votes:?}");
        reference_correct += usize::from(expected == query_l[i]);
        let y = query_l[i];
        let above = (0..num_classes)
            .filter(|&j| ref_votes[j] > ref_votes[y] || (ref_votes[j] == ref_votes[y] && j < y))
            .count();
        reference_top5 += usize::from(above < 5);
        // The crate's votes equal the reference up to the per-query scale exp(-s_max / τ).
        let got = &votes[i * num_classes..(i + 1) * num_classes];
        let scale = got.iter().sum::<f64>() / ref_votes.iter().sum::<f64>();
        for (g, r) in got.iter().zip(&ref_votes) {
            assert!(
                (g - r * scale).abs() <= 1e-4 * g.abs().max(1e-30) + 1e-12,
                "query {i}"
            );
        }
    }
    eprintln!(
        "{num_classes} classes, {vote:?}, seed {seed}: {compared}/{n_query} queries compared"
    );
    assert!(
        compared >= 45,
        "only {compared} of {n_query} queries compared"
    );
    if compared == n_query {
        assert_eq!(
            result.metrics.correct(),
            reference_correct as u64,
            "top-1 count"
        );
        assert_eq!(
            result.top_k_accuracy(),
            Some(reference_top5 as f64 / n_query as f64)
        );
    }
    // The metrics agree with the returned predictions.
    let right = result
        .predictions
        .iter()
        .zip(&query_l)
        .filter(|(p, l)| p == l)
        .count();
    assert_eq!(result.metrics.correct(), right as u64);
    assert_eq!(result.metrics.total(), n_query as u64);
    assert_eq!(result.top1(), right as f64 / n_query as f64);
    if num_classes == 5 {
        assert_eq!(result.top_k_accuracy(), Some(1.0));
    }
}

#[test]
fn weighted_knn_matches_f64_reference_5_classes() {
    for seed in [1, 2, 3] {
        compare_with_reference(5, KnnVote::Weighted, seed);
    }
}

#[test]
fn majority_knn_matches_f64_reference_5_classes() {
    for seed in [4, 5, 6] {
        compare_with_reference(5, KnnVote::Majority, seed);
    }
}

#[test]
fn weighted_knn_top5_matches_f64_reference_10_classes() {
    for seed in [7, 8] {
        compare_with_reference(10, KnnVote::Weighted, seed);
    }
}

#[test]
fn chunking_does_not_change_results() {
    let mut rng = Rng(11);
    let means: Vec<Vec<f64>> = (0..4)
        .map(|_| (0..8).map(|_| rng.normal()).collect())
        .collect();
    let (bank_f, bank_l) = clustered(&mut rng, &means, 100, 0.5);
    let (query_f, query_l) = clustered(&mut rng, &means, 37, 0.5);
    let bank = KnnBank::new(&tensor(&bank_f, 100), &bank_l, 4).unwrap();
    let queries = tensor(&query_f, 37);
    let run = |chunk_size| {
        let config = KnnConfig {
            k: 10,
            temperature: 0.1,
            chunk_size,
        };
        (
            bank.votes(&queries, &config, KnnVote::Weighted).unwrap(),
            bank.evaluate(&queries, &query_l, &config, KnnVote::Weighted)
                .unwrap(),
        )
    };
    let (votes_a, a) = run(1);
    let (votes_b, b) = run(7);
    let (votes_c, c) = run(1000);
    assert_eq!(a.predictions, b.predictions);
    assert_eq!(a.predictions, c.predictions);
    assert_eq!(a.metrics.confusion_matrix(), c.metrics.confusion_matrix());
    for (x, y) in votes_a.iter().zip(votes_b.iter().chain(&votes_c)) {
        assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0));
    }

    // Streaming the queries in two batches into one accumulator gives the same metrics.
    let config = KnnConfig {
        k: 10,
        temperature: 0.1,
        chunk_size: 8,
    };
    let mut streamed = ClassificationMetrics::new(4).unwrap();
    let mut predictions = bank
        .evaluate_into(
            &queries.narrow(0, 0, 20).unwrap(),
            &query_l[..20],
            &config,
            KnnVote::Weighted,
            &mut streamed,
        )
        .unwrap();
    predictions.extend(
        bank.evaluate_into(
            &queries.narrow(0, 20, 17).unwrap(),
            &query_l[20..],
            &config,
            KnnVote::Weighted,
            &mut streamed,
        )
        .unwrap(),
    );
    assert_eq!(predictions, a.predictions);
    assert_eq!(streamed, a.metrics);
}

/// The size the pretraining monitor needs on this machine: a 10k × 512 bank and 2k queries with
/// the default settings (k = 200, τ = 0.1, chunks of 256).
#[test]
fn bank_of_10k_by_512_with_2k_queries_on_cpu() {
    let (n_bank, n_query, dim, classes) = (10_000, 2_000, 512, 10);
    let mut rng = Rng(42);
    let means: Vec<Vec<f64>> = (0..classes)
        .map(|_| (0..dim).map(|_| rng.normal()).collect())
        .collect();
    let (bank_f, bank_l) = clustered(&mut rng, &means, n_bank, 0.1);
    let (query_f, query_l) = clustered(&mut rng, &means, n_query, 0.1);
    let start = Instant::now();
    let result = knn_evaluate(
        &tensor(&bank_f, n_bank),
        &bank_l,
        &tensor(&query_f, n_query),
        &query_l,
        classes,
        &KnnConfig::default(),
        KnnVote::Weighted,
    )
    .unwrap();
    let elapsed = start.elapsed();
    eprintln!(
        "kNN 10k x 512 bank, 2k queries: {:.2} s, top-1 {:.3}, top-5 {:.3}",
        elapsed.as_secs_f64(),
        result.top1(),
        result.top_k_accuracy().unwrap()
    );
    assert_eq!(result.predictions.len(), n_query);
    assert_eq!(result.metrics.total(), n_query as u64);
    // Class means at 0.1·N(0, I) under unit noise: cosine similarities within a class exceed
    // those across classes by only ~0.01, so kNN is well above chance (0.1) but far from
    // perfect (0.61 top-1, 0.94 top-5 with this seed).
    let top5 = result.top_k_accuracy().unwrap();
    assert!(result.top1() > 0.4, "top-1 {}", result.top1());
    assert!(top5 > result.top1() && top5 > 0.8, "top-5 {top5}");
}
