// Row-wise kernels: LayerNorm, softmax and softmax cross-entropy (src/lib.rs).
#include "common.cuh"

// Mean and 1/sqrt(var + eps) of row `xr` (f32 or bf16 storage).
template <typename T>
__device__ __forceinline__ void row_moments(const T* xr, int d, float eps, float* sh, float* mean,
                                            float* rstd) {
    float s = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) s += ld(xr, j);
    const float m = block_sum(s, sh) / d;
    float v = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float t = ld(xr, j) - m;
        v += t * t;
    }
    *mean = m;
    *rstd = 1.0f / sqrtf(block_sum(v, sh) / d + eps);
}

// LayerNorm rows: x and y f32 or bf16, weight and bias f32.
template <typename T>
__device__ void layer_norm_fwd(const T* x, const float* w, const float* b, T* y, int rows, int d,
                               float eps) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + (size_t)r * d;
    T* yr = y + (size_t)r * d;
    float mean, rstd;
    row_moments(xr, d, eps, sh, &mean, &rstd);
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        st(yr, j, (ld(xr, j) - mean) * rstd * w[j] + b[j]);
}

extern "C" __global__ void cim_layer_norm_fwd(const float* x, const float* w, const float* b,
                                              float* y, int rows, int d, float eps) {
    layer_norm_fwd(x, w, b, y, rows, d, eps);
}
extern "C" __global__ void cim_layer_norm_fwd_bf16(const __nv_bfloat16* x, const float* w,
                                                   const float* b, __nv_bfloat16* y, int rows,
                                                   int d, float eps) {
    layer_norm_fwd(x, w, b, y, rows, d, eps);
}

// dx (f32) for every row, plus the row statistics the dw/db kernel reuses; x, dy f32 or bf16.
template <typename T>
__device__ void layer_norm_bwd_dx(const T* x, const float* w, const T* dy, float* dx, float* stats,
                                  int rows, int d, float eps) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + (size_t)r * d;
    const T* gr = dy + (size_t)r * d;
    float* dr = dx + (size_t)r * d;
    float mean, rstd;
    row_moments(xr, d, eps, sh, &mean, &rstd);
    float sg = 0.0f, sgx = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float g = ld(gr, j) * w[j];
        sg += g;
        sgx += g * (ld(xr, j) - mean) * rstd;
    }
    sg = block_sum(sg, sh) / d;
    sgx = block_sum(sgx, sh) / d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float xh = (ld(xr, j) - mean) * rstd;
        dr[j] = rstd * (ld(gr, j) * w[j] - sg - xh * sgx);
    }
    if (threadIdx.x == 0) {
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
    }
}

extern "C" __global__ void cim_layer_norm_bwd_dx(const float* x, const float* w, const float* dy,
                                                 float* dx, float* stats, int rows, int d,
                                                 float eps) {
    layer_norm_bwd_dx(x, w, dy, dx, stats, rows, d, eps);
}
extern "C" __global__ void cim_layer_norm_bwd_dx_bf16(const __nv_bfloat16* x, const float* w,
                                                      const __nv_bfloat16* dy, float* dx,
                                                      float* stats, int rows, int d, float eps) {
    layer_norm_bwd_dx(x, w, dy, dx, stats, rows, d, eps);
}

// The same two kernels with one warp per row (8 rows per block of 256; warp shuffles only), for
// rows up to 2048 wide: a 256-thread block per 768-wide row spent three block barriers per row
// (an H200 profile (2026-11-27): 7.4 ms per ViT-B/16 step for LayerNorm, ~3× the bandwidth bound).
template <typename T>
__device__ __forceinline__ void row_moments_warp(const T* xr, int d, float eps, float* mean,
                                                 float* rstd) {
    const int lane = threadIdx.x & 31;
    float s = 0.0f;
    for (int j = lane; j < d; j += 32) s += ld(xr, j);
    const float m = warp_sum(s) / d;
    float v = 0.0f;
    for (int j = lane; j < d; j += 32) {
        const float t = ld(xr, j) - m;
        v += t * t;
    }
    *mean = m;
    *rstd = 1.0f / sqrtf(warp_sum(v) / d + eps);
}

template <typename T>
__device__ void layer_norm_fwd_warp(const T* x, const float* w, const float* b, T* y, int rows,
                                    int d, float eps) {
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;  // uniform across the warp
    const T* xr = x + (size_t)r * d;
    T* yr = y + (size_t)r * d;
    float mean, rstd;
    row_moments_warp(xr, d, eps, &mean, &rstd);
    for (int j = lane; j < d; j += 32) st(yr, j, (ld(xr, j) - mean) * rstd * w[j] + b[j]);
}

template <typename T>
__device__ void layer_norm_bwd_dx_warp(const T* x, const float* w, const T* dy, float* dx,
                                       float* stats, int rows, int d, float eps) {
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;  // uniform across the warp
    const T* xr = x + (size_t)r * d;
    const T* gr = dy + (size_t)r * d;
    float* dr = dx + (size_t)r * d;
    float mean, rstd;
    row_moments_warp(xr, d, eps, &mean, &rstd);
    float sg = 0.0f, sgx = 0.0f;
    for (int j = lane; j < d; j += 32) {
        const float g = ld(gr, j) * w[j];
        sg += g;
        sgx += g * (ld(xr, j) - mean) * rstd;
    }
    sg = warp_sum(sg) / d;
    sgx = warp_sum(sgx) / d;
    for (int j = lane; j < d; j += 32) {
        const float xh = (ld(xr, j) - mean) * rstd;
        dr[j] = rstd * (ld(gr, j) * w[j] - sg - xh * sgx);
    }
    if (lane == 0) {
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
    }
}

extern "C" __global__ void cim_layer_norm_fwd_warp(const float* x, const float* w, const float* b,
                                                   float* y, int rows, int d, float eps) {
    layer_norm_fwd_warp(x, w, b, y, rows, d, eps);
}
extern "C" __global__ void cim_layer_norm_fwd_warp_bf16(const __nv_bfloat16* x, const float* w,
                                                        const float* b, __nv_bfloat16* y,
                                                        int rows, int d, float eps) {
    layer_norm_fwd_warp(x, w, b, y, rows, d, eps);
}
extern "C" __global__ void cim_layer_norm_bwd_dx_warp(const float* x, const float* w,
                                                      const float* dy, float* dx, float* stats,
                                                      int rows, int d, float eps) {
    layer_norm_bwd_dx_warp(x, w, dy, dx, stats, rows, d, eps);
}
extern "C" __global__ void cim_layer_norm_bwd_dx_warp_bf16(const __nv_bfloat16* x, const float* w,
                                                           const __nv_bfloat16* dy, float* dx,
                                                           float* stats, int rows, int d,
                                                           float eps) {
    layer_norm_bwd_dx_warp(x, w, dy, dx, stats, rows, d, eps);
}

// dw (into out[0..d]) and db (into out[d..2d]): one thread per column, rows in order.
// dw, db in two stages (deterministic: fixed chunks, fixed order). Stage 1: block (32, 8) covers
// 32 columns of one chunk of LN_CHUNK rows; writes partial[chunk] = (dw[0..d], db[0..d]).
#define LN_CHUNK 256
template <typename T>
__device__ void layer_norm_bwd_dwdb_partial(const T* x, const T* dy, const float* stats,
                                            float* partial, int rows, int d) {
    __shared__ float sw[8][33], sb[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int j = blockIdx.x * 32 + tx;
    const int r0 = blockIdx.y * LN_CHUNK, r1 = min(r0 + LN_CHUNK, rows);
    float aw = 0.0f, ab = 0.0f;
    if (j < d)
        for (int r = r0 + ty; r < r1; r += 8) {
            const float g = ld(dy, (size_t)r * d + j);
            aw += g * (ld(x, (size_t)r * d + j) - stats[2 * r]) * stats[2 * r + 1];
            ab += g;
        }
    sw[ty][tx] = aw;
    sb[ty][tx] = ab;
    __syncthreads();
    if (ty == 0 && j < d) {
        for (int k = 1; k < 8; ++k) {
            aw += sw[k][tx];
            ab += sb[k][tx];
        }
        float* p = partial + (size_t)blockIdx.y * 2 * d;
        p[j] = aw;
        p[d + j] = ab;
    }
}

extern "C" __global__ void cim_layer_norm_bwd_dwdb_partial(const float* x, const float* dy,
                                                           const float* stats, float* partial,
                                                           int rows, int d) {
    layer_norm_bwd_dwdb_partial(x, dy, stats, partial, rows, d);
}
extern "C" __global__ void cim_layer_norm_bwd_dwdb_partial_bf16(const __nv_bfloat16* x,
                                                                const __nv_bfloat16* dy,
                                                                const float* stats, float* partial,
                                                                int rows, int d) {
    layer_norm_bwd_dwdb_partial(x, dy, stats, partial, rows, d);
}

// Stage 2 is cim_col_sum_chunks over the 2·d columns (dw then db) of the partials.

// Softmax rows in f32 or bf16 storage over the first `valid` of d columns; the others get 0
// (attention scores padded to an aligned width).

template <typename T>
__device__ void softmax_fwd(const T* x, T* y, int rows, int d, int valid) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const size_t o = (size_t)r * d;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < valid; j += blockDim.x) m = fmaxf(m, ld(x, o + j));
    m = block_max(m, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j < valid; j += blockDim.x) s += expf(ld(x, o + j) - m);
    const float inv = 1.0f / block_sum(s, sh);
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        st(y, o + j, j < valid ? expf(ld(x, o + j) - m) * inv : 0.0f);
}

template <typename T>
__device__ void softmax_bwd(const T* y, const T* dy, T* dx, int rows, int d) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const size_t o = (size_t)r * d;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) dot += ld(y, o + j) * ld(dy, o + j);
    dot = block_sum(dot, sh);
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        st(dx, o + j, ld(y, o + j) * (ld(dy, o + j) - dot));
}

// The same with one warp per row (8 rows per block of 256; lanes stride over the row; warp
// shuffles only): for short rows such as attention's 197-wide scores, where a block of 256 threads
// per row left 59 idle and spent three block-wide barriers per row (an H200 profile (2026-11-27):
// ~6× the bandwidth bound).

template <typename T>
__device__ void softmax_fwd_warp(const T* x, T* y, int rows, int d, int valid) {
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;  // uniform across the warp
    const size_t o = (size_t)r * d;
    float m = -INFINITY;
    for (int j = lane; j < valid; j += 32) m = fmaxf(m, ld(x, o + j));
    m = warp_max(m);
    float s = 0.0f;
    for (int j = lane; j < valid; j += 32) s += expf(ld(x, o + j) - m);
    const float inv = 1.0f / warp_sum(s);
    for (int j = lane; j < d; j += 32)
        st(y, o + j, j < valid ? expf(ld(x, o + j) - m) * inv : 0.0f);
}

template <typename T>
__device__ void softmax_bwd_warp(const T* y, const T* dy, T* dx, int rows, int d) {
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;  // uniform across the warp
    const size_t o = (size_t)r * d;
    float dot = 0.0f;
    for (int j = lane; j < d; j += 32) dot += ld(y, o + j) * ld(dy, o + j);
    dot = warp_sum(dot);
    for (int j = lane; j < d; j += 32) st(dx, o + j, ld(y, o + j) * (ld(dy, o + j) - dot));
}

extern "C" __global__ void cim_softmax_fwd_warp(const float* x, float* y, int rows, int d,
                                                int valid) {
    softmax_fwd_warp(x, y, rows, d, valid);
}
extern "C" __global__ void cim_softmax_fwd_warp_bf16(const __nv_bfloat16* x, __nv_bfloat16* y,
                                                     int rows, int d, int valid) {
    softmax_fwd_warp(x, y, rows, d, valid);
}
extern "C" __global__ void cim_softmax_bwd_warp(const float* y, const float* dy, float* dx,
                                                int rows, int d) {
    softmax_bwd_warp(y, dy, dx, rows, d);
}
extern "C" __global__ void cim_softmax_bwd_warp_bf16(const __nv_bfloat16* y,
                                                     const __nv_bfloat16* dy, __nv_bfloat16* dx,
                                                     int rows, int d) {
    softmax_bwd_warp(y, dy, dx, rows, d);
}

extern "C" __global__ void cim_softmax_fwd(const float* x, float* y, int rows, int d, int valid) {
    softmax_fwd(x, y, rows, d, valid);
}
extern "C" __global__ void cim_softmax_fwd_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int rows,
                                                int d, int valid) {
    softmax_fwd(x, y, rows, d, valid);
}
extern "C" __global__ void cim_softmax_bwd(const float* y, const float* dy, float* dx, int rows,
                                           int d) {
    softmax_bwd(y, dy, dx, rows, d);
}
extern "C" __global__ void cim_softmax_bwd_bf16(const __nv_bfloat16* y, const __nv_bfloat16* dy,
                                                __nv_bfloat16* dx, int rows, int d) {
    softmax_bwd(y, dy, dx, rows, d);
}

// Per-row logsumexp(x) - x[t]; logits f32 or bf16 (f32 arithmetic), the loss f32.
template <typename T>
__device__ void cross_entropy_fwd(const T* x, const unsigned int* t, float* loss, int rows, int v) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + (size_t)r * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, ld(xr, j));
    m = block_max(m, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(ld(xr, j) - m);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) loss[r] = m + logf(s) - ld(xr, t[r]);
}
extern "C" __global__ void cim_cross_entropy_fwd(const float* x, const unsigned int* t,
                                                 float* loss, int rows, int v) {
    cross_entropy_fwd(x, t, loss, rows, v);
}
extern "C" __global__ void cim_cross_entropy_fwd_bf16(const __nv_bfloat16* x,
                                                      const unsigned int* t, float* loss, int rows,
                                                      int v) {
    cross_entropy_fwd(x, t, loss, rows, v);
}

// (softmax(x) - onehot(t)) * g[row], in x's type (the bf16 generator's logits take their gradient
// in bf16: no f32 copy of either).
template <typename T>
__device__ void cross_entropy_bwd(const T* x, const unsigned int* t, const float* g, T* dx, int rows,
                                  int v) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + (size_t)r * v;
    T* dr = dx + (size_t)r * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, ld(xr, j));
    m = block_max(m, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(ld(xr, j) - m);
    const float k = g[r] / block_sum(s, sh);
    const unsigned int c = t[r];
    for (int j = threadIdx.x; j < v; j += blockDim.x)
        st(dr, j, expf(ld(xr, j) - m) * k - (j == (int)c ? g[r] : 0.0f));
}
extern "C" __global__ void cim_cross_entropy_bwd(const float* x, const unsigned int* t,
                                                 const float* g, float* dx, int rows, int v) {
    cross_entropy_bwd(x, t, g, dx, rows, v);
}
extern "C" __global__ void cim_cross_entropy_bwd_bf16(const __nv_bfloat16* x,
                                                      const unsigned int* t, const float* g,
                                                      __nv_bfloat16* dx, int rows, int v) {
    cross_entropy_bwd(x, t, g, dx, rows, v);
}
