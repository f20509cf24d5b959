#include "common.cuh"

// ---- AdamW (src/adamw.rs) ----

// mv = [m; v] (2n floats): m = b1·m + (1−b1)·k·g, v = b2·v + (1−b2)·(k·g)².
extern "C" __global__ void cim_adamw_moments(float* mv, const float* g, long long n, float b1,
                                             float b2, float k) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gi = g[i] * k;
    mv[i] = b1 * mv[i] + (1.0f - b1) * gi;
    mv[n + i] = b2 * mv[n + i] + (1.0f - b2) * gi * gi;
}

// A running average in place (BatchNorm's running statistics): r = keep·r + add·x.
extern "C" __global__ void cim_running_average(float* r, const float* x, long long n, float keep,
                                               float add) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    r[i] = keep * r[i] + add * x[i];
}

// p = p·decay − lr · (m/bc1) / (sqrt(v/bc2) + eps).
extern "C" __global__ void cim_adamw_apply(float* p, const float* mv, long long n, float lr,
                                           float decay, float bc1, float bc2, float eps) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float update = (mv[i] / bc1) / (sqrtf(mv[n + i] / bc2) + eps);
    p[i] = p[i] * decay - lr * update;
}


// ---- Multi-tensor AdamW and sum of squares (src/adamw.rs) ----
// One launch for every parameter. `table` holds, per tensor i, MT_WORDS words at MT_WORDS·i:
// parameter, moments and gradient addresses, the element count, and the f32 bits of lr (low)
// and decay = 1 − lr·wd (high); then one word per chunk of MT_CHUNK elements: tensor << 40 |
// first element. One thread block per chunk.

#define MT_WORDS 5
#define MT_CHUNK 4096

extern "C" __global__ void cim_adamw_multi(const unsigned long long* table, int tensors, float b1,
                                           float b2, float k, float bc1, float bc2, float eps) {
    const unsigned long long c = table[MT_WORDS * (long long)tensors + blockIdx.x];
    const long long ti = (long long)(c >> 40), start = (long long)(c & ((1ull << 40) - 1));
    const unsigned long long* t = table + MT_WORDS * ti;
    float* p = (float*)t[0];
    float* mv = (float*)t[1];
    const float* g = (const float*)t[2];
    const long long n = (long long)t[3];
    const float lr = __uint_as_float((unsigned)(t[4] & 0xffffffffull));
    const float decay = __uint_as_float((unsigned)(t[4] >> 32));
    const long long end = min(start + MT_CHUNK, n);
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        // The arithmetic of cim_adamw_moments then cim_adamw_apply, in registers.
        const float gi = g[i] * k;
        const float m = b1 * mv[i] + (1.0f - b1) * gi;
        const float v = b2 * mv[n + i] + (1.0f - b2) * gi * gi;
        mv[i] = m;
        mv[n + i] = v;
        const float update = (m / bc1) / (sqrtf(v / bc2) + eps);
        p[i] = p[i] * decay - lr * update;
    }
}

// Σ x² per chunk, into `partials` (one double per chunk; the host adds them in order). `table`:
// per tensor 2 words (address, element count), then the chunk words as above.
extern "C" __global__ void cim_sum_squares_multi(const unsigned long long* table, int tensors,
                                                 double* partials) {
    const unsigned long long c = table[2 * (long long)tensors + blockIdx.x];
    const long long ti = (long long)(c >> 40), start = (long long)(c & ((1ull << 40) - 1));
    const float* x = (const float*)table[2 * ti];
    const long long end = min(start + MT_CHUNK, (long long)table[2 * ti + 1]);
    float acc = 0.0f;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) acc += x[i] * x[i];
    __shared__ float warps[32];
    acc = warp_sum(acc);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) warps[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < (int)(blockDim.x >> 5) ? warps[lane] : 0.0f;
        acc = warp_sum(acc);
        if (lane == 0) partials[blockIdx.x] = (double)acc;
    }
}
