//! Helpers shared by the tests: a seeded generator and plain float64 re-computations of the
//! losses, written from their textbook definitions with loops (no candle).
#![allow(dead_code, clippy::needless_range_loop)] // plain index loops on purpose

use candle_core::{DType, Device, Tensor};

/// SplitMix64 with Box–Muller normals.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    pub fn matrix(&mut self, rows: usize, cols: usize) -> Vec<Vec<f64>> {
        (0..rows)
            .map(|_| (0..cols).map(|_| self.normal()).collect())
            .collect()
    }
}

pub fn tensor(m: &[Vec<f64>], dtype: DType) -> Tensor {
    let rows = m.len();
    let cols = m[0].len();
    let flat: Vec<f64> = m.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows, cols), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

pub fn to_matrix(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `x / sqrt(max(|x|², 1e-12))`.
pub fn normalize(x: &[f64]) -> Vec<f64> {
    let s = dot(x, x).max(1e-12).sqrt();
    x.iter().map(|v| v / s).collect()
}

fn maybe_normalize(m: &[Vec<f64>], on: bool) -> Vec<Vec<f64>> {
    m.iter()
        .map(|r| if on { normalize(r) } else { r.clone() })
        .collect()
}

/// `−log( exp(pos) / Σ_c exp(c) )` where `pos` is one of `cands`.
fn neg_log_softmax(pos: f64, cands: &[f64]) -> f64 {
    let m = cands.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + cands.iter().map(|c| (c - m).exp()).sum::<f64>().ln();
    lse - pos
}

/// The SimCLR loss in the v1 paper's form (Algorithm 1): 2N anchors `z_k`, `ℓ(i, j) =
/// −log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ)`, summed over both members of every pair, then
/// divided by N (the official "2×" normalisation). Rows `0..n` are view 1, `n..2n` view 2.
pub fn reference_nt_xent(h: &[Vec<f64>], tau: f64, hidden_norm: bool) -> f64 {
    let z = maybe_normalize(h, hidden_norm);
    let two_n = z.len();
    let n = two_n / 2;
    let mut total = 0.0;
    for a in 0..two_n {
        let pos_idx = if a < n { a + n } else { a - n };
        let cands: Vec<f64> = (0..two_n)
            .filter(|&k| k != a)
            .map(|k| dot(&z[a], &z[k]) / tau)
            .collect();
        total += neg_log_softmax(dot(&z[a], &z[pos_idx]) / tau, &cands);
    }
    total / n as f64
}

/// `(contrast_acc, contrast_entropy)` over the view-1 × view-2 similarity block.
pub fn reference_metrics(h: &[Vec<f64>], tau: f64, hidden_norm: bool) -> (f64, f64) {
    let z = maybe_normalize(h, hidden_norm);
    let n = z.len() / 2;
    let mut correct = 0.0;
    let mut entropy = 0.0;
    for i in 0..n {
        let row: Vec<f64> = (0..n).map(|j| dot(&z[i], &z[n + j]) / tau).collect();
        let mut best = 0;
        for j in 0..n {
            if row[j] > row[best] {
                best = j;
            }
        }
        if best == i {
            correct += 1.0;
        }
        let m = row[best];
        let denom: f64 = row.iter().map(|x| (x - m).exp()).sum();
        for x in &row {
            let p = (x - m).exp() / denom;
            if p > 0.0 {
                entropy -= p * p.ln();
            }
        }
    }
    (correct / n as f64, entropy / n as f64)
}

/// The memory-buffer loss from its definition: for every one of the 2n query anchors, the
/// positive is the key of the other view of the same image; the candidates are that positive,
/// every other key of the batch except the key of the anchor's own view of the same image, and
/// every queue entry. Summed over the 2n anchors, divided by n.
pub fn reference_memory_loss(
    queries: &[Vec<f64>],
    keys: &[Vec<f64>],
    queue: &[Vec<f64>],
    tau: f64,
    hidden_norm: bool,
) -> f64 {
    let q = maybe_normalize(queries, hidden_norm);
    let k = maybe_normalize(keys, hidden_norm);
    let two_n = q.len();
    let n = two_n / 2;
    let mut total = 0.0;
    for a in 0..two_n {
        let pos_idx = if a < n { a + n } else { a - n };
        let mut cands: Vec<f64> = (0..two_n)
            .filter(|&c| c != a)
            .map(|c| dot(&q[a], &k[c]) / tau)
            .collect();
        cands.extend(queue.iter().map(|m| dot(&q[a], m) / tau));
        total += neg_log_softmax(dot(&q[a], &k[pos_idx]) / tau, &cands);
    }
    total / n as f64
}

pub fn assert_close(got: f64, want: f64, rel: f64, what: &str) {
    let tol = rel * want.abs().max(1.0);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (|diff| {} > {tol})",
        (got - want).abs()
    );
}

pub fn assert_matrix_close(got: &[Vec<f64>], want: &[Vec<f64>], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    let scale = want
        .iter()
        .flatten()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: row {i} length");
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= rel * scale,
                "{what}[{i}][{j}]: got {a}, want {b} (scale {scale})"
            );
        }
    }
}
