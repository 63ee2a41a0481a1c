// The project's CUDA kernels: the GPU twins of the CPU custom ops in `bn_ops.rs` (batch norm
// in training mode) and `ntxent.rs` (NT-Xent's normalisation and masked
// log-softmax). `build.rs` compiles this file to PTX with nvcc when the `cuda` feature is on;
// `cuda.rs` loads it once per device.
//
// Every reduction is deterministic: a fixed grid writes per-block partial sums, and a second
// kernel adds them in block order, so a run repeats bit for bit (no atomics).
//
// Layouts: activations are contiguous `[N, C, P]` (P = H·W); per-channel parameters are rows of
// `[k, C]` arrays, as on the CPU.

#include <math.h>
#include <stdint.h>

#define BLOCK 256

// Sum over the block of `v`; every thread gets the result. `shared` holds BLOCK/32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // `shared` may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    T t = 0;
    if (threadIdx.x < 32) {
        t = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : (T)0;
        for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
        if (threadIdx.x == 0) shared[0] = t;
    }
    __syncthreads();
    return shared[0];
}

__device__ __forceinline__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_down_sync(0xffffffffu, t, o));
        if (threadIdx.x == 0) shared[0] = t;
    }
    __syncthreads();
    return shared[0];
}

// The part of channel `ch`'s N·P values that block `blockIdx.y` of `gridDim.y` reduces.
__device__ __forceinline__ void split_range(uint64_t total, uint64_t* begin, uint64_t* end) {
    const uint64_t chunk = (total + gridDim.y - 1) / gridDim.y;
    *begin = min(total, (uint64_t)blockIdx.y * chunk);
    *end = min(total, *begin + chunk);
}

// The channel of flat index i in [N, C, P]; 32-bit division where it fits (64-bit division
// is a long instruction sequence, and these kernels are otherwise a load and a store).
__device__ __forceinline__ uint32_t channel_of(uint64_t i, uint32_t p, uint32_t c) {
    if (i < 0xffffffffull) return ((uint32_t)i / p) % c;
    return (uint32_t)((i / p) % c);
}

// Walks channel `ch`'s values in [begin, end) of its N·P, thread-strided: BODY sees the flat
// index i of each. Value e is (image e / P, pixel e % P); one division at the start, then a
// step of blockDim = dimg images + dj pixels with one carry. BODY must have no top-level comma.
#define FOR_CHANNEL_VALUES(begin, end, ch, c, p, BODY)                          \
    {                                                                            \
        const uint32_t dimg = blockDim.x / (p), dj = blockDim.x % (p);           \
        uint64_t e = (begin) + threadIdx.x;                                      \
        uint64_t img = e / (p);                                                  \
        uint32_t j = (uint32_t)(e - img * (p));                                  \
        for (; e < (end); e += blockDim.x) {                                     \
            const uint64_t i = (img * (c) + (ch)) * (p) + j;                     \
            BODY                                                                 \
            img += dimg;                                                         \
            j += dj;                                                             \
            if (j >= (p)) { j -= (p); ++img; }                                   \
        }                                                                        \
    }

// ---------------------------------------------------------------- batch norm

// grid (C, S): partial `Σx`, `Σx²` of channel blockIdx.x over split blockIdx.y, in f64.
// part: [S, 2, C].
extern "C" __global__ void bn_moments_partial(const float* x, double* part, uint32_t n,
                                              uint32_t c, uint32_t p) {
    __shared__ double shared[BLOCK / 32];
    const uint32_t ch = blockIdx.x;
    uint64_t begin, end;
    split_range((uint64_t)n * p, &begin, &end);
    double s = 0.0, q = 0.0;
    FOR_CHANNEL_VALUES(begin, end, ch, c, p, {
        const double v = x[i];
        s += v;
        q += v * v;
    })
    s = block_sum(s, shared);
    q = block_sum(q, shared);
    if (threadIdx.x == 0) {
        part[(uint64_t)blockIdx.y * 2 * c + ch] = s;
        part[(uint64_t)blockIdx.y * 2 * c + c + ch] = q;
    }
}

// out[k] = Σ_s part[s, k] for k < len, in split order.
extern "C" __global__ void sum_partials_f64(const double* part, double* out, uint32_t len,
                                            uint32_t splits) {
    const uint32_t k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= len) return;
    double t = 0.0;
    for (uint32_t s = 0; s < splits; ++s) t += part[(uint64_t)s * len + k];
    out[k] = t;
}

// dx = g[0, c] + 2·g[1, c]·x: the gradient of the moments.
extern "C" __global__ void bn_moments_grad(const float* x, const double* g, float* dx,
                                           uint32_t c, uint32_t p, uint64_t total) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t ch = channel_of(i, p, c);
        const float a = (float)g[ch], b = 2.0f * (float)g[c + ch];
        dx[i] = a + b * x[i];
    }
}

// y = relu?((x − mean)·invstd·γ + β [+ res]); params = [mean; invstd; γ; β] ([4, C]).
extern "C" __global__ void bn_apply(const float* x, const float* params, const float* res,
                                    float* y, uint32_t c, uint32_t p, uint64_t total,
                                    uint32_t has_res, uint32_t relu) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t ch = channel_of(i, p, c);
        const float k = params[c + ch] * params[2 * c + ch];
        float t = (x[i] - params[ch]) * k + params[3 * c + ch];
        if (has_res) t += res[i];
        y[i] = relu ? fmaxf(t, 0.0f) : t;
    }
}

// grid (C, S). With g = dy masked by y > 0 after a ReLU: dx = g·invstd·γ, dres = g (when
// has_dres), and the partial sums Σg, Σg·(x − mean) of the block into part [S, 2, C].
extern "C" __global__ void bn_apply_grad_partial(const float* x, const float* y,
                                                 const float* dy, const float* params,
                                                 float* dx, float* dres, double* part,
                                                 uint32_t n, uint32_t c, uint32_t p,
                                                 uint32_t has_dres, uint32_t relu) {
    __shared__ double shared[BLOCK / 32];
    const uint32_t ch = blockIdx.x;
    const float m = params[ch], k = params[c + ch] * params[2 * c + ch];
    uint64_t begin, end;
    split_range((uint64_t)n * p, &begin, &end);
    float s1 = 0.0f, s3 = 0.0f;
    FOR_CHANNEL_VALUES(begin, end, ch, c, p, {
        const float g = (relu && y[i] <= 0.0f) ? 0.0f : dy[i];
        dx[i] = g * k;
        if (has_dres) dres[i] = g;
        s1 += g;
        s3 += g * (x[i] - m);
    })
    const double t1 = block_sum((double)s1, shared);
    const double t3 = block_sum((double)s3, shared);
    if (threadIdx.x == 0) {
        part[(uint64_t)blockIdx.y * 2 * c + ch] = t1;
        part[(uint64_t)blockIdx.y * 2 * c + c + ch] = t3;
    }
}

// tail = [dmean; dinvstd; dγ; dβ] ([4, C]) from the summed Σg, Σg·(x − mean).
extern "C" __global__ void bn_apply_grad_final(const double* part, const float* params,
                                               float* tail, uint32_t c, uint32_t splits) {
    const uint32_t ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s1 = 0.0, s3 = 0.0;
    for (uint32_t s = 0; s < splits; ++s) {
        s1 += part[(uint64_t)s * 2 * c + ch];
        s3 += part[(uint64_t)s * 2 * c + c + ch];
    }
    const double g = params[2 * c + ch], inv = params[c + ch];
    tail[ch] = (float)(-g * inv * s1);
    tail[c + ch] = (float)(g * s3);
    tail[2 * c + ch] = (float)(s3 * inv);
    tail[3 * c + ch] = (float)s1;
}

// ---------------------------------------------------------------- NT-Xent

// One block per row of `x` ([rows, d]): y = x / sqrt(max(Σx², eps)).
extern "C" __global__ void l2_normalize_fwd(const float* x, float* y, uint32_t d, float eps) {
    __shared__ float shared[BLOCK / 32];
    const float* xr = x + (uint64_t)blockIdx.x * d;
    float* yr = y + (uint64_t)blockIdx.x * d;
    float ss = 0.0f;
    for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss, shared);
    const float inv = 1.0f / sqrtf(fmaxf(ss, eps));
    for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) yr[j] = xr[j] * inv;
}

// dx = (g − y·(g·y))·inv where the norm was not clamped, else g·inv.
extern "C" __global__ void l2_normalize_bwd(const float* x, const float* y, const float* g,
                                            float* dx, uint32_t d, float eps) {
    __shared__ float shared[BLOCK / 32];
    const uint64_t o = (uint64_t)blockIdx.x * d;
    float ss = 0.0f, dot = 0.0f;
    for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) {
        ss += x[o + j] * x[o + j];
        dot += g[o + j] * y[o + j];
    }
    ss = block_sum(ss, shared);
    dot = block_sum(dot, shared);
    const float inv = 1.0f / sqrtf(fmaxf(ss, eps));
    const float proj = ss > eps ? dot : 0.0f;
    for (uint32_t j = threadIdx.x; j < d; j += blockDim.x)
        dx[o + j] = (g[o + j] - y[o + j] * proj) * inv;
}

// The positive and the masked (self-similarity) column of row r of the `[2n, W]` similarity
// matrix whose columns are [view-1 candidates (global) | view-2 candidates (global) | extra].
__device__ __forceinline__ void contrast_columns(uint32_t r, uint32_t n, uint32_t offset,
                                                 uint32_t global, uint32_t* pos,
                                                 uint32_t* masked) {
    if (r < n) {
        *pos = global + offset + r;
        *masked = offset + r;
    } else {
        *pos = offset + (r - n);
        *masked = global + offset + (r - n);
    }
}

// One block per row: loss[r] = logsumexp_{j ≠ masked}(s[r, j]·inv_t) − s[r, pos]·inv_t.
extern "C" __global__ void contrastive_ce_fwd(const float* s, float* loss, uint32_t w,
                                              uint32_t n, uint32_t offset, uint32_t global,
                                              float inv_t) {
    __shared__ float shared[BLOCK / 32];
    const uint32_t r = blockIdx.x;
    uint32_t pos, masked;
    contrast_columns(r, n, offset, global, &pos, &masked);
    const float* sr = s + (uint64_t)r * w;
    float m = -INFINITY;
    for (uint32_t j = threadIdx.x; j < w; j += blockDim.x)
        if (j != masked) m = fmaxf(m, sr[j] * inv_t);
    m = block_max(m, shared);
    float e = 0.0f;
    for (uint32_t j = threadIdx.x; j < w; j += blockDim.x)
        if (j != masked) e += expf(sr[j] * inv_t - m);
    e = block_sum(e, shared);
    if (threadIdx.x == 0) loss[r] = m + logf(e) - sr[pos] * inv_t;
}

// ds[r, j] = g[r]·inv_t·(softmax_j − [j = pos]), 0 in the masked column; the log-sum-exp is
// recovered from the forward's loss.
extern "C" __global__ void contrastive_ce_bwd(const float* s, const float* loss, const float* g,
                                              float* ds, uint32_t w, uint32_t n,
                                              uint32_t offset, uint32_t global, float inv_t) {
    const uint32_t r = blockIdx.x;
    uint32_t pos, masked;
    contrast_columns(r, n, offset, global, &pos, &masked);
    const float* sr = s + (uint64_t)r * w;
    float* dr = ds + (uint64_t)r * w;
    const float lse = loss[r] + sr[pos] * inv_t;
    const float scale = g[r] * inv_t;
    for (uint32_t j = threadIdx.x; j < w; j += blockDim.x) {
        float v = 0.0f;
        if (j != masked) v = expf(sr[j] * inv_t - lse) - (j == pos ? 1.0f : 0.0f);
        dr[j] = scale * v;
    }
}
