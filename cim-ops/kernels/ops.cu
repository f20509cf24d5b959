// CUDA kernels of cim_api::ops (built into PTX by cim-api's build.rs with the `cuda` feature).
// f32, most also bf16 (the dVAE's map kernels also f16), contiguous row-major tensors; one thread block per row for the row-wise kernels.
// Each kernel has a CPU twin in src/ops.rs or src/ops/*.rs; tests/ops_cuda.rs compares them on a GPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <mma.h>

// Sum (or max) of `v` over the block; every thread gets the result. `sh` holds 32 values (f32, or
// f64 for the BatchNorm moments).
template <typename F>
__device__ __forceinline__ F block_sum_t(F v, F* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? sh[threadIdx.x] : F(0);
    if (wid == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}
__device__ __forceinline__ float block_sum(float v, float* sh) { return block_sum_t(v, sh); }
__device__ __forceinline__ double block_sum_f64(double v, double* sh) { return block_sum_t(v, sh); }

// Sum (max) over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

__device__ __forceinline__ float block_max(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? sh[threadIdx.x] : -INFINITY;
    if (wid == 0)
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}

// Loads and stores of f32, bf16 or f16 storage; the arithmetic is f32 either way.
__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }
// f16 storage: the frozen dVAE's maps (cim's cuDNN convolution accumulates them in f32).
__device__ __forceinline__ float ld(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void st(__half* p, size_t i, float v) { p[i] = __float2half(v); }
// Four consecutive values as one word (a float4; 8 bytes of bf16): element 4i of p onwards.
__device__ __forceinline__ void load4(const float* p, long long i, float v[4]) {
    const float4 w = reinterpret_cast<const float4*>(p)[i];
    v[0] = w.x, v[1] = w.y, v[2] = w.z, v[3] = w.w;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, long long i, float v[4]) {
    const uint2 w = reinterpret_cast<const uint2*>(p)[i];
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&w);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = __bfloat162float(h[k]);
}
__device__ __forceinline__ void store4(float* p, long long i, const float v[4]) {
    reinterpret_cast<float4*>(p)[i] = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, long long i, const float v[4]) {
    uint2 w;
    __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(&w);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __float2bfloat16(v[k]);
    reinterpret_cast<uint2*>(p)[i] = w;
}

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
// (session 11's H200 profile: 7.4 ms per ViT-B/16 step for LayerNorm, ~3× the bandwidth bound).
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
// per row left 59 idle and spent three block-wide barriers per row (session 11's H200 profile:
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

// ---- RESPIX (src/ops/respix.rs) ----

// Sliding-window target, one thread per pixel of `planes` (B·C) planes of h×w.
extern "C" __global__ void cim_respix_target(const float* x, float* y, int planes, int h, int w,
                                             int k, float eps) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long n = (long long)planes * h * w;
    if (i >= n) return;
    const int col = (int)(i % w), row = (int)((i / w) % h);
    const float* xp = x + (i / ((long long)h * w)) * h * w;
    const int before = k / 2;
    const int r0 = max(row - before, 0), r1 = min(row - before + k, h);
    const int c0 = max(col - before, 0), c1 = min(col - before + k, w);
    float s = 0.0f, s2 = 0.0f;
    for (int r = r0; r < r1; ++r)
        for (int c = c0; c < c1; ++c) {
            const float v = xp[r * w + c];
            s += v;
            s2 += v * v;
        }
    const float cnt = (float)((r1 - r0) * (c1 - c0));
    const float mean = s / cnt;
    const float var = fmaxf(s2 / cnt - mean * mean, 0.0f);
    y[i] = (xp[row * w + col] - mean) / sqrtf(var + eps);
}

// Target index of element j of prediction row `row` (layout (p, p, c) per grid position).
__device__ __forceinline__ long long respix_index(long long row, int j, int p, int c, int h, int w) {
    const int gh = h / p, gw = w / p;
    const long long b = row / (gh * gw);
    const int l = (int)(row % (gh * gw));
    const int gy = l / gw, gx = l % gw;
    const int py = j / (p * c), rest = j % (p * c);
    const int px = rest / c, ch = rest % c;
    return ((b * c + ch) * h + gy * p + py) * (long long)w + gx * p + px;
}

// Per prediction row: sum of |d| + d². One block per row.
extern "C" __global__ void cim_respix_loss_fwd(const float* pred, const float* target, float* out,
                                               int rows, int p, int c, int h, int w) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int e = p * p * c;
    const float* pr = pred + (long long)r * e;
    float s = 0.0f;
    for (int j = threadIdx.x; j < e; j += blockDim.x) {
        const float d = pr[j] - target[respix_index(r, j, p, c, h, w)];
        s += fabsf(d) + d * d;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) out[r] = s;
}

// d pred = g[row] · (sign(d) + 2d). One thread per element.
extern "C" __global__ void cim_respix_loss_bwd(const float* pred, const float* target,
                                               const float* g, float* dp, long long n, int p,
                                               int c, int h, int w) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int e = p * p * c;
    const long long r = i / e;
    const float d = pred[i] - target[respix_index(r, (int)(i % e), p, c, h, w)];
    const float sign = d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f);
    dp[i] = g[r] * (sign + 2.0f * d);
}

// ---- AdamW (src/ops/adamw.rs) ----

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

// ---- Attention from packed qkv (src/ops/attention.rs) ----
// qkv (B, N, 3, H, D), out (B, N, H, D). One warp per (item, head, query row); each lane holds
// dims lane, lane + 32, … (D ≤ 32·ATT_R). Keys are streamed with the running-max softmax.

#define ATT_R 4

extern "C" __global__ void cim_attention_fwd(const float* qkv, float* out, int B, int N, int H,
                                             int D, float scale) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * (blockDim.x >> 5) + warp;
    const int b = blockIdx.y / H, h = blockIdx.y % H;
    if (i >= N || b >= B) return;
    const long long tok = (long long)b * N;
    const int c3 = 3 * H * D;
    const float* q = qkv + (tok + i) * c3 + h * D;
    float qr[ATT_R], acc[ATT_R];
#pragma unroll
    for (int r = 0; r < ATT_R; ++r) {
        const int c = lane + 32 * r;
        qr[r] = c < D ? q[c] : 0.0f;
        acc[r] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j < N; ++j) {
        const float* kj = qkv + (tok + j) * c3 + H * D + h * D;
        const float* vj = kj + H * D;
        float s = 0.0f;
#pragma unroll
        for (int r = 0; r < ATT_R; ++r) {
            const int c = lane + 32 * r;
            if (c < D) s += qr[r] * kj[c];
        }
        s = warp_sum(s) * scale;
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int r = 0; r < ATT_R; ++r) {
            const int c = lane + 32 * r;
            acc[r] = acc[r] * corr + (c < D ? p * vj[c] : 0.0f);
        }
        m = mn;
    }
    float* o = out + ((tok + i) * H + h) * D;
#pragma unroll
    for (int r = 0; r < ATT_R; ++r) {
        const int c = lane + 32 * r;
        if (c < D) o[c] = acc[r] / l;
    }
}

// s = scale · q·k_j and dp = dO·v_j over the warp (every lane gets both).
__device__ __forceinline__ void score_and_dp(const float* qr, const float* dyr, const float* kj,
                                             const float* vj, int lane, int D, float scale,
                                             float* s, float* dp) {
    float a = 0.0f, b = 0.0f;
#pragma unroll
    for (int r = 0; r < ATT_R; ++r) {
        const int c = lane + 32 * r;
        if (c < D) {
            a += qr[r] * kj[c];
            b += dyr[r] * vj[c];
        }
    }
    *s = warp_sum(a) * scale;
    *dp = warp_sum(b);
}

// d qkv (zero-initialised) from qkv and d out. Pass 1: max, normaliser and D = Σ p·dP online;
// pass 2: dS = p (dP − D); dq in registers, dk and dv by atomicAdd (summation order varies).
extern "C" __global__ void cim_attention_bwd(const float* qkv, const float* dout, float* dqkv,
                                             int B, int N, int H, int D, float scale) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * (blockDim.x >> 5) + warp;
    const int b = blockIdx.y / H, h = blockIdx.y % H;
    if (i >= N || b >= B) return;
    const long long tok = (long long)b * N;
    const int c3 = 3 * H * D;
    const float* q = qkv + (tok + i) * c3 + h * D;
    const float* dy = dout + ((tok + i) * H + h) * D;
    float qr[ATT_R], dyr[ATT_R], dq[ATT_R];
#pragma unroll
    for (int r = 0; r < ATT_R; ++r) {
        const int c = lane + 32 * r;
        qr[r] = c < D ? q[c] : 0.0f;
        dyr[r] = c < D ? dy[c] : 0.0f;
        dq[r] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f, dsum = 0.0f;
    for (int j = 0; j < N; ++j) {
        const float* kj = qkv + (tok + j) * c3 + H * D + h * D;
        const float* vj = kj + H * D;
        float s, dp;
        score_and_dp(qr, dyr, kj, vj, lane, D, scale, &s, &dp);
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
        dsum = dsum * corr + p * dp;
        m = mn;
    }
    const float big_d = dsum / l;
    for (int j = 0; j < N; ++j) {
        const float* kj = qkv + (tok + j) * c3 + H * D + h * D;
        const float* vj = kj + H * D;
        float* dkj = dqkv + (tok + j) * c3 + H * D + h * D;
        float* dvj = dkj + H * D;
        float s, dp;
        score_and_dp(qr, dyr, kj, vj, lane, D, scale, &s, &dp);
        const float p = expf(s - m) / l;
        const float ds = p * (dp - big_d) * scale;
#pragma unroll
        for (int r = 0; r < ATT_R; ++r) {
            const int c = lane + 32 * r;
            if (c < D) {
                dq[r] += ds * kj[c];
                atomicAdd(dkj + c, ds * qr[r]);
                atomicAdd(dvj + c, p * dyr[r]);
            }
        }
    }
    float* dqi = dqkv + (tok + i) * c3 + h * D;
#pragma unroll
    for (int r = 0; r < ATT_R; ++r) {
        const int c = lane + 32 * r;
        if (c < D) dqi[c] = dq[r];
    }
}

// ---- BatchNorm, training mode (src/ops/batch_norm.rs). x (B, C, HW), f32 or bf16. ----
// The per-channel reductions run on a grid (C, chunks): block (ch, k) covers items
// [k·ipc, (k+1)·ipc) of channel ch, its threads striding over the plane (no per-element division),
// and writes f64 partial sums; a second kernel adds a channel's partials in chunk order
// (deterministic). One block per channel, as before session 11, left most of the GPU idle at
// C = 64 and walked 400 000 elements per block at batch 128.

// partial[(k·C + ch)·2 + {0, 1}] = Σ x, Σ x² over block (ch, k)'s planes.
template <typename T>
__device__ void bn_moment_partials(const T* x, double* partial, int B, int C, int HW, int ipc) {
    __shared__ double sh[32];
    const int ch = blockIdx.x, k = blockIdx.y;
    const int b0 = k * ipc, b1 = min(B, b0 + ipc);
    double s = 0.0, s2 = 0.0;
    for (int b = b0; b < b1; ++b) {
        const size_t base = ((size_t)b * C + ch) * HW;
        for (int p = threadIdx.x; p < HW; p += blockDim.x) {
            const double v = ld(x, base + p);
            s += v;
            s2 += v * v;
        }
    }
    const double ts = block_sum_f64(s, sh);
    const double tq = block_sum_f64(s2, sh);
    if (threadIdx.x == 0) {
        partial[((size_t)k * C + ch) * 2] = ts;
        partial[((size_t)k * C + ch) * 2 + 1] = tq;
    }
}
extern "C" __global__ void cim_bn_moment_partials(const float* x, double* partial, int B, int C,
                                                  int HW, int ipc) {
    bn_moment_partials(x, partial, B, C, HW, ipc);
}
extern "C" __global__ void cim_bn_moment_partials_bf16(const __nv_bfloat16* x, double* partial,
                                                       int B, int C, int HW, int ipc) {
    bn_moment_partials(x, partial, B, C, HW, ipc);
}

// out (2, C) = [mean; biased var] from the partials, chunks in order; with `affine`,
// out (4, C) = [γ; β; mean; biased var], γ and β copied from g and b first — the normalisation's
// parameters in one buffer (`channel_moments_affine`: no concatenation launches). One thread per
// channel.
extern "C" __global__ void cim_bn_moments_finish(const double* partial, const float* g,
                                                 const float* b, float* out, int C, int chunks,
                                                 double n, int affine) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    if (affine) {
        out[ch] = g[ch];
        out[C + ch] = b[ch];
        out += 2 * C;
    }
    double s = 0.0, s2 = 0.0;
    for (int k = 0; k < chunks; ++k) {
        s += partial[((size_t)k * C + ch) * 2];
        s2 += partial[((size_t)k * C + ch) * 2 + 1];
    }
    const double mean = s / n;
    out[ch] = (float)mean;
    out[C + ch] = (float)fmax(s2 / n - mean * mean, 0.0);
}

// The node's tail after the affine (src/ops/batch_norm.rs `BnTail`): mode bit 1 a ReLU, bit 2 a
// residual r added before it (a bottleneck's shortcut). The backward recomputes the ReLU's mask
// from x (and r) with the forward's own expression, so nothing but x is kept.
constexpr int BN_RELU = 1, BN_RESIDUAL = 2;

// The affine output, (x − mean)·rstd·γ + β (+ r), from x̂ = (x − mean)·rstd; p = [γ; β; …].
template <typename T>
__device__ __forceinline__ float bn_pre(float xh, const float* p, int C, int ch, const T* r,
                                        size_t i, int mode) {
    float pre = xh * p[ch] + p[C + ch];
    if (mode & BN_RESIDUAL) pre += ld(r, i);
    return pre;
}

// The gradient reaching the affine output: dy, masked by the ReLU where there is one.
template <typename T>
__device__ __forceinline__ float bn_tail_grad(float g, float xh, const float* p, int C, int ch,
                                              const T* r, size_t i, int mode) {
    if (!(mode & BN_RELU)) return g;
    return bn_pre(xh, p, C, ch, r, i, mode) > 0.0f ? g : 0.0f;
}

// y = tail((x − mean)·rstd·γ + β); p = [γ; β; mean; var] (4, C); r (x's type; read with
// BN_RESIDUAL only). One thread per element; the channel is (i / HW) % C (HW = 1 channels last).
template <typename T>
__device__ void batch_norm_fwd(const T* x, const float* p, const T* r, T* y, long long n, int C,
                               int HW, float eps, int mode) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int ch = (int)((i / HW) % C);
    const float rstd = rsqrtf(p[3 * C + ch] + eps);
    const float pre = bn_pre((ld(x, i) - p[2 * C + ch]) * rstd, p, C, ch, r, i, mode);
    st(y, i, (mode & BN_RELU) ? fmaxf(pre, 0.0f) : pre);
}
extern "C" __global__ void cim_batch_norm_fwd(const float* x, const float* p, const float* r,
                                              float* y, long long n, int C, int HW, float eps,
                                              int mode) {
    batch_norm_fwd(x, p, r, y, n, C, HW, eps, mode);
}
extern "C" __global__ void cim_batch_norm_fwd_bf16(const __nv_bfloat16* x, const float* p,
                                                   const __nv_bfloat16* r, __nv_bfloat16* y,
                                                   long long n, int C, int HW, float eps,
                                                   int mode) {
    batch_norm_fwd(x, p, r, y, n, C, HW, eps, mode);
}

// Four consecutive elements per thread (`_v4`, cuda.rs `bn_fours`): n a multiple of 4, and C
// (channels last, HW = 1) or HW (channels first) too, so that the four share a row of channels
// c..c+3 or one channel; every view starts on a 4-element boundary. One 16-byte (f32) or 8-byte
// (bf16) word per load and store; the same arithmetic, element by element, as the scalar kernels
// (the backward's mask must see the forward's pre-activation bit for bit).
__device__ __forceinline__ int bn_chan(long long i, int C, int HW, int k) {
    return HW == 1 ? (int)(i % C) + k : (int)((i / HW) % C);
}

template <typename T>
__device__ void batch_norm_fwd_v4(const T* x, const float* p, const T* r, T* y, long long n4, int C,
                                  int HW, float eps, int mode) {
    const long long i4 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i4 >= n4) return;
    float xv[4], rv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, out[4];
    load4(x, i4, xv);
    if (mode & BN_RESIDUAL) load4(r, i4, rv);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int ch = bn_chan(4 * i4, C, HW, k);
        const float rstd = rsqrtf(p[3 * C + ch] + eps);
        float pre = ((xv[k] - p[2 * C + ch]) * rstd) * p[ch] + p[C + ch];
        if (mode & BN_RESIDUAL) pre += rv[k];
        out[k] = (mode & BN_RELU) ? fmaxf(pre, 0.0f) : pre;
    }
    store4(y, i4, out);
}
extern "C" __global__ void cim_batch_norm_fwd_v4(const float* x, const float* p, const float* r,
                                                 float* y, long long n4, int C, int HW, float eps,
                                                 int mode) {
    batch_norm_fwd_v4(x, p, r, y, n4, C, HW, eps, mode);
}
extern "C" __global__ void cim_batch_norm_fwd_v4_bf16(const __nv_bfloat16* x, const float* p,
                                                      const __nv_bfloat16* r, __nv_bfloat16* y,
                                                      long long n4, int C, int HW, float eps,
                                                      int mode) {
    batch_norm_fwd_v4(x, p, r, y, n4, C, HW, eps, mode);
}

// Backward sums per block: partial[(k·C + ch)·2 + {0, 1}] = Σ g·x̂, Σ g over block (ch, k)'s
// planes, g the gradient at the affine output (bn_tail_grad); p = [γ; β; mean; var] (4, C).
template <typename T>
__device__ void bn_grad_partials(const T* x, const T* dy, const T* r, const float* p,
                                 double* partial, int B, int C, int HW, int ipc, float eps,
                                 int mode) {
    __shared__ float sh[32];
    const int ch = blockIdx.x, k = blockIdx.y;
    const int b0 = k * ipc, b1 = min(B, b0 + ipc);
    const float mean = p[2 * C + ch], rstd = rsqrtf(p[3 * C + ch] + eps);
    float sd = 0.0f, sdx = 0.0f;
    for (int b = b0; b < b1; ++b) {
        const size_t base = ((size_t)b * C + ch) * HW;
        for (int q = threadIdx.x; q < HW; q += blockDim.x) {
            const size_t i = base + q;
            const float xh = (ld(x, i) - mean) * rstd;
            const float g = bn_tail_grad(ld(dy, i), xh, p, C, ch, r, i, mode);
            sd += g;
            sdx += g * xh;
        }
    }
    sd = block_sum(sd, sh);
    sdx = block_sum(sdx, sh);
    if (threadIdx.x == 0) {
        partial[((size_t)k * C + ch) * 2] = sdx;
        partial[((size_t)k * C + ch) * 2 + 1] = sd;
    }
}
extern "C" __global__ void cim_bn_grad_partials(const float* x, const float* dy, const float* r,
                                                const float* p, double* partial, int B, int C,
                                                int HW, int ipc, float eps, int mode) {
    bn_grad_partials(x, dy, r, p, partial, B, C, HW, ipc, eps, mode);
}
extern "C" __global__ void cim_bn_grad_partials_bf16(const __nv_bfloat16* x,
                                                     const __nv_bfloat16* dy,
                                                     const __nv_bfloat16* r, const float* p,
                                                     double* partial, int B, int C, int HW,
                                                     int ipc, float eps, int mode) {
    bn_grad_partials(x, dy, r, p, partial, B, C, HW, ipc, eps, mode);
}

// out (6, C) = [p; dγ; dβ] = [γ; β; mean; var; Σ g·x̂; Σ g], chunks in order: the parameters
// copied ahead of the sums, so that the dx kernel reads one buffer (no concatenation). One
// thread per channel.
extern "C" __global__ void cim_bn_grad_finish(const double* partial, const float* p, float* out,
                                              int C, int chunks) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    for (int r = 0; r < 4; ++r) out[r * C + ch] = p[r * C + ch];
    double sdx = 0.0, sd = 0.0;
    for (int k = 0; k < chunks; ++k) {
        sdx += partial[((size_t)k * C + ch) * 2];
        sd += partial[((size_t)k * C + ch) * 2 + 1];
    }
    out[4 * C + ch] = (float)sdx;
    out[5 * C + ch] = (float)sd;
}

// dx = γ·rstd·(g − mean(g) − x̂·mean(g·x̂)), g = bn_tail_grad(dy); with a ReLU and a residual
// also dr = g (the shortcut's gradient). p = [γ; β; mean; var; dγ; dβ] (6, C), count = B·HW. One
// thread per element, dx (and dr) in x's type.
template <typename T>
__device__ void bn_dx(const T* x, const T* dy, const T* r, const float* p, T* dx, T* dr,
                      long long n, int C, int HW, float count, float eps, int mode) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int ch = (int)((i / HW) % C);
    const float mean = p[2 * C + ch], rstd = rsqrtf(p[3 * C + ch] + eps);
    const float mdx = p[4 * C + ch] / count, md = p[5 * C + ch] / count;
    const float xh = (ld(x, i) - mean) * rstd;
    const float g = bn_tail_grad(ld(dy, i), xh, p, C, ch, r, i, mode);
    st(dx, i, p[ch] * rstd * (g - md - xh * mdx));
    if ((mode & (BN_RELU | BN_RESIDUAL)) == (BN_RELU | BN_RESIDUAL)) st(dr, i, g);
}
extern "C" __global__ void cim_bn_dx(const float* x, const float* dy, const float* r,
                                     const float* p, float* dx, float* dr, long long n, int C,
                                     int HW, float count, float eps, int mode) {
    bn_dx(x, dy, r, p, dx, dr, n, C, HW, count, eps, mode);
}
extern "C" __global__ void cim_bn_dx_bf16(const __nv_bfloat16* x, const __nv_bfloat16* dy,
                                          const __nv_bfloat16* r, const float* p,
                                          __nv_bfloat16* dx, __nv_bfloat16* dr, long long n,
                                          int C, int HW, float count, float eps, int mode) {
    bn_dx(x, dy, r, p, dx, dr, n, C, HW, count, eps, mode);
}

// Channels last: x (R, C), R = B·H·W rows (src/ops/batch_norm.rs with `last`). Block
// (32, BN_CL_ROWS), grid (⌈C/32⌉, chunks): thread (tx, ty) of block (j, k) sums channel 32j + tx
// over rows k·rpc + ty, + BN_CL_ROWS, … below (k+1)·rpc — a warp reads 32 neighbouring channels of
// a row — and the row lanes are added in shared memory, in order. The partials have the
// channels-first kernels' layout, so the finishing kernels are shared. (The channels-first
// kernels' block walks a plane; on a channels-last map every "plane" is one element.)
constexpr int BN_CL_ROWS = 8;

template <typename T>
__device__ void bn_moment_partials_cl(const T* x, double* partial, int R, int C, int rpc) {
    __shared__ double sh[2][BN_CL_ROWS][32];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int ch = blockIdx.x * 32 + tx, k = blockIdx.y;
    const int r1 = min(R, (k + 1) * rpc);
    double s = 0.0, s2 = 0.0;
    if (ch < C)
        for (int r = k * rpc + ty; r < r1; r += BN_CL_ROWS) {
            const double v = ld(x, (size_t)r * C + ch);
            s += v;
            s2 += v * v;
        }
    sh[0][ty][tx] = s;
    sh[1][ty][tx] = s2;
    __syncthreads();
    if (ty == 0 && ch < C) {
        for (int j = 1; j < BN_CL_ROWS; ++j) {
            s += sh[0][j][tx];
            s2 += sh[1][j][tx];
        }
        partial[((size_t)k * C + ch) * 2] = s;
        partial[((size_t)k * C + ch) * 2 + 1] = s2;
    }
}
extern "C" __global__ void cim_bn_moment_partials_cl(const float* x, double* partial, int R, int C,
                                                     int rpc) {
    bn_moment_partials_cl(x, partial, R, C, rpc);
}
extern "C" __global__ void cim_bn_moment_partials_cl_bf16(const __nv_bfloat16* x, double* partial,
                                                          int R, int C, int rpc) {
    bn_moment_partials_cl(x, partial, R, C, rpc);
}

// partial[(k·C + ch)·2 + {0, 1}] = Σ g·x̂, Σ g over block (·, k)'s rows, g = bn_tail_grad(dy);
// p = [γ; β; mean; var].
template <typename T>
__device__ void bn_grad_partials_cl(const T* x, const T* dy, const T* r, const float* p,
                                    double* partial, int R, int C, int rpc, float eps, int mode) {
    __shared__ float sh[2][BN_CL_ROWS][32];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int ch = blockIdx.x * 32 + tx, k = blockIdx.y;
    const int r1 = min(R, (k + 1) * rpc);
    float sd = 0.0f, sdx = 0.0f;
    if (ch < C) {
        const float mean = p[2 * C + ch], rstd = rsqrtf(p[3 * C + ch] + eps);
        for (int row = k * rpc + ty; row < r1; row += BN_CL_ROWS) {
            const size_t i = (size_t)row * C + ch;
            const float xh = (ld(x, i) - mean) * rstd;
            const float g = bn_tail_grad(ld(dy, i), xh, p, C, ch, r, i, mode);
            sd += g;
            sdx += g * xh;
        }
    }
    sh[0][ty][tx] = sdx;
    sh[1][ty][tx] = sd;
    __syncthreads();
    if (ty == 0 && ch < C) {
        for (int j = 1; j < BN_CL_ROWS; ++j) {
            sdx += sh[0][j][tx];
            sd += sh[1][j][tx];
        }
        partial[((size_t)k * C + ch) * 2] = sdx;
        partial[((size_t)k * C + ch) * 2 + 1] = sd;
    }
}
extern "C" __global__ void cim_bn_grad_partials_cl(const float* x, const float* dy, const float* r,
                                                   const float* p, double* partial, int R, int C,
                                                   int rpc, float eps, int mode) {
    bn_grad_partials_cl(x, dy, r, p, partial, R, C, rpc, eps, mode);
}
extern "C" __global__ void cim_bn_grad_partials_cl_bf16(const __nv_bfloat16* x,
                                                        const __nv_bfloat16* dy,
                                                        const __nv_bfloat16* r, const float* p,
                                                        double* partial, int R, int C, int rpc,
                                                        float eps, int mode) {
    bn_grad_partials_cl(x, dy, r, p, partial, R, C, rpc, eps, mode);
}

// bn_dx four elements per thread (see batch_norm_fwd_v4 for the conditions).
template <typename T>
__device__ void bn_dx_v4(const T* x, const T* dy, const T* r, const float* p, T* dx, T* dr,
                         long long n4, int C, int HW, float count, float eps, int mode) {
    const long long i4 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i4 >= n4) return;
    float xv[4], gv[4], rv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4];
    load4(x, i4, xv);
    load4(dy, i4, gv);
    if (mode & BN_RESIDUAL) load4(r, i4, rv);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int ch = bn_chan(4 * i4, C, HW, k);
        const float mean = p[2 * C + ch], rstd = rsqrtf(p[3 * C + ch] + eps);
        const float mdx = p[4 * C + ch] / count, md = p[5 * C + ch] / count;
        const float xh = (xv[k] - mean) * rstd;
        if (mode & BN_RELU) {
            float pre = xh * p[ch] + p[C + ch];
            if (mode & BN_RESIDUAL) pre += rv[k];
            if (!(pre > 0.0f)) gv[k] = 0.0f;
        }
        d[k] = p[ch] * rstd * (gv[k] - md - xh * mdx);
    }
    store4(dx, i4, d);
    if ((mode & (BN_RELU | BN_RESIDUAL)) == (BN_RELU | BN_RESIDUAL)) store4(dr, i4, gv);
}
extern "C" __global__ void cim_bn_dx_v4(const float* x, const float* dy, const float* r,
                                        const float* p, float* dx, float* dr, long long n4, int C,
                                        int HW, float count, float eps, int mode) {
    bn_dx_v4(x, dy, r, p, dx, dr, n4, C, HW, count, eps, mode);
}
extern "C" __global__ void cim_bn_dx_v4_bf16(const __nv_bfloat16* x, const __nv_bfloat16* dy,
                                             const __nv_bfloat16* r, const float* p,
                                             __nv_bfloat16* dx, __nv_bfloat16* dr, long long n4,
                                             int C, int HW, float count, float eps, int mode) {
    bn_dx_v4(x, dy, r, p, dx, dr, n4, C, HW, count, eps, mode);
}

// ---- Convolution filters between PyTorch's (O, C, k, k) and cuDNN's channels-last (O, k, k, C),
// with the cast the mixed-precision step needs anyway (src/ops/conv.rs `FilterLayout`): one kernel
// instead of candle's strided cast, which also uploads its dims and strides. kk = k·k; one thread
// per output element. ----
template <typename Ti, typename To>
__device__ void filter_to_krsc(const Ti* w, To* out, long long n, int C, int kk) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int c = (int)(i % C), q = (int)((i / C) % kk);
    const long long o = i / ((long long)C * kk);
    st(out, i, ld(w, (o * C + c) * kk + q));
}
template <typename Ti, typename To>
__device__ void filter_from_krsc(const Ti* w, To* out, long long n, int C, int kk) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int q = (int)(i % kk), c = (int)((i / kk) % C);
    const long long o = i / ((long long)C * kk);
    st(out, i, ld(w, (o * kk + q) * C + c));
}
extern "C" __global__ void cim_filter_to_krsc_f32_f32(const float* w, float* out, long long n,
                                                      int C, int kk) {
    filter_to_krsc(w, out, n, C, kk);
}
extern "C" __global__ void cim_filter_to_krsc_f32_bf16(const float* w, __nv_bfloat16* out,
                                                       long long n, int C, int kk) {
    filter_to_krsc(w, out, n, C, kk);
}
extern "C" __global__ void cim_filter_from_krsc_f32_f32(const float* w, float* out, long long n,
                                                        int C, int kk) {
    filter_from_krsc(w, out, n, C, kk);
}
extern "C" __global__ void cim_filter_from_krsc_bf16_f32(const __nv_bfloat16* w, float* out,
                                                         long long n, int C, int kk) {
    filter_from_krsc(w, out, n, C, kk);
}

// ---- MaxPool2d(3, stride 2, padding 1) (src/ops/max_pool.rs). P planes of h × w, channels first
// (plane p at p·h·w) or, with cl = C > 0, channels last (p = b·C + c; pixel (y, x) of it at
// ((b·h + y)·w + x)·C + c). f32 or bf16 (a maximum of bf16 values is exact). ----

// Where plane p's pixels lie: pixel q (row-major in the plane) at base + q·step.
struct PoolMap {
    long long base;
    int step;
};
__device__ __forceinline__ PoolMap pool_map(long long p, int h, int w, int cl) {
    if (cl == 0) return {p * h * w, 1};
    return {(p / cl) * h * w * cl + p % cl, cl};
}

// Element i of a map laid out as pool_map says, as (plane, row, column).
__device__ __forceinline__ void pool_coords(long long i, int h, int w, int cl, long long* p, int* y,
                                            int* x) {
    if (cl == 0) {
        *x = (int)(i % w);
        *y = (int)((i / w) % h);
        *p = i / ((long long)h * w);
    } else {
        const long long q = i / cl;
        *x = (int)(q % w);
        *y = (int)((q / w) % h);
        *p = (q / ((long long)h * w)) * cl + i % cl;
    }
}

// Row-major index (within the plane) of the first maximum of output (oy, ox)'s window.
template <typename T>
__device__ __forceinline__ int pool_argmax(const T* x, PoolMap m, int h, int w, int oy, int ox) {
    const int y0 = max(2 * oy - 1, 0), x0 = max(2 * ox - 1, 0);
    const int y1 = min(2 * oy + 2, h), x1 = min(2 * ox + 2, w);
    int best = y0 * w + x0;
    float bv = ld(x, m.base + (size_t)best * m.step);
    for (int iy = y0; iy < y1; ++iy)
        for (int ix = x0; ix < x1; ++ix) {
            const float v = ld(x, m.base + (size_t)(iy * w + ix) * m.step);
            if (v > bv) {
                bv = v;
                best = iy * w + ix;
            }
        }
    return best;
}

// One thread per output element (consecutive threads: consecutive outputs in either layout).
template <typename T>
__device__ void max_pool_fwd(const T* x, T* y, long long planes, int h, int w, int ho, int wo,
                             int cl) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= planes * ho * wo) return;
    long long p;
    int oy, ox;
    pool_coords(i, ho, wo, cl, &p, &oy, &ox);
    const PoolMap m = pool_map(p, h, w, cl);
    y[i] = x[m.base + (size_t)pool_argmax(x, m, h, w, oy, ox) * m.step];
}
extern "C" __global__ void cim_max_pool_fwd(const float* x, float* y, long long planes, int h,
                                            int w, int ho, int wo, int cl) {
    max_pool_fwd(x, y, planes, h, w, ho, wo, cl);
}
extern "C" __global__ void cim_max_pool_fwd_bf16(const __nv_bfloat16* x, __nv_bfloat16* y,
                                                 long long planes, int h, int w, int ho, int wo,
                                                 int cl) {
    max_pool_fwd(x, y, planes, h, w, ho, wo, cl);
}

// One thread per input pixel, gathering from the ≤ 4 windows that cover it (deterministic).
template <typename T>
__device__ void max_pool_bwd(const T* x, const T* dy, T* dx, long long planes, int h, int w,
                             int ho, int wo, int cl) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= planes * h * w) return;
    long long p;
    int iy, ix;
    pool_coords(i, h, w, cl, &p, &iy, &ix);
    const PoolMap m = pool_map(p, h, w, cl), g = pool_map(p, ho, wo, cl);
    const int me = iy * w + ix;
    float s = 0.0f;
    for (int oy = max(iy / 2, 0); oy <= min((iy + 1) / 2, ho - 1); ++oy)
        for (int ox = max(ix / 2, 0); ox <= min((ix + 1) / 2, wo - 1); ++ox)
            if (2 * oy - 1 <= iy && iy <= 2 * oy + 1 && 2 * ox - 1 <= ix && ix <= 2 * ox + 1 &&
                pool_argmax(x, m, h, w, oy, ox) == me)
                s += ld(dy, g.base + (size_t)(oy * wo + ox) * g.step);
    st(dx, i, s);
}
extern "C" __global__ void cim_max_pool_bwd(const float* x, const float* dy, float* dx,
                                            long long planes, int h, int w, int ho, int wo,
                                            int cl) {
    max_pool_bwd(x, dy, dx, planes, h, w, ho, wo, cl);
}
extern "C" __global__ void cim_max_pool_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* dy,
                                                 __nv_bfloat16* dx, long long planes, int h, int w,
                                                 int ho, int wo, int cl) {
    max_pool_bwd(x, dy, dx, planes, h, w, ho, wo, cl);
}

// x + b and gelu(x + b) (exact, erf GELU); b broadcast over rows of d. One thread per element.
__device__ __forceinline__ float gelu_erf(float z) {
    return 0.5f * z * (1.0f + erff(z * 0.70710678f));
}

__device__ __forceinline__ float gelu_erf_grad(float z) {
    return 0.5f * (1.0f + erff(z * 0.70710678f)) + z * 0.39894228f * expf(-0.5f * z * z);
}

template <typename T>
__device__ void bias_gelu_fwd(const T* x, const float* b, T* y, long long n, int d) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    st(y, i, gelu_erf(ld(x, i) + b[i % d]));
}

extern "C" __global__ void cim_bias_gelu_fwd(const float* x, const float* b, float* y,
                                             long long n, int d) {
    bias_gelu_fwd(x, b, y, n, d);
}
extern "C" __global__ void cim_bias_gelu_fwd_bf16(const __nv_bfloat16* x, const float* b,
                                                  __nv_bfloat16* y, long long n, int d) {
    bias_gelu_fwd(x, b, y, n, d);
}

template <typename T>
__device__ void bias_add_fwd(const T* x, const float* b, T* y, long long n, int d) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    st(y, i, ld(x, i) + b[i % d]);
}

extern "C" __global__ void cim_bias_add_fwd(const float* x, const float* b, float* y, long long n,
                                            int d) {
    bias_add_fwd(x, b, y, n, d);
}
// A bf16 activation plus its f32 bias (the Linear layers of bf16 training): one rounding.
extern "C" __global__ void cim_bias_add_fwd_bf16(const __nv_bfloat16* x, const float* b,
                                                 __nv_bfloat16* y, long long n, int d) {
    bias_add_fwd(x, b, y, n, d);
}

// The same three kernels four elements per thread, moved as one word (d % 4 == 0, every view
// 4-element aligned: the caller checks): one element per thread with a 64-bit modulo each ran at
// ~1 TB/s on the H200 in session 11 (bias + GELU 5.2 ms forward for a ViT-B/16 step's 16 MLPs).
// y = f(x + b) four at a time.
template <typename T, typename F>
__device__ void bias_map4(const T* x, const float* b, T* y, long long n4, int d4, F f) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float v[4], c[4];
    load4(x, i, v);
    load4(b, i % d4, c);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = f(v[k] + c[k]);
    store4(y, i, v);
}
struct Gelu {
    __device__ float operator()(float z) const { return gelu_erf(z); }
};
struct Identity {
    __device__ float operator()(float z) const { return z; }
};
template <typename T>
__device__ void bias_gelu_fwd4(const T* x, const float* b, T* y, long long n4, int d4) {
    bias_map4(x, b, y, n4, d4, Gelu());
}
template <typename T>
__device__ void bias_add_fwd4(const T* x, const float* b, T* y, long long n4, int d4) {
    bias_map4(x, b, y, n4, d4, Identity());
}
extern "C" __global__ void cim_bias_gelu_fwd_v4(const float* x, const float* b, float* y,
                                                long long n4, int d4) {
    bias_gelu_fwd4(x, b, y, n4, d4);
}
extern "C" __global__ void cim_bias_gelu_fwd_v4_bf16(const __nv_bfloat16* x, const float* b,
                                                     __nv_bfloat16* y, long long n4, int d4) {
    bias_gelu_fwd4(x, b, y, n4, d4);
}
extern "C" __global__ void cim_bias_add_fwd_v4(const float* x, const float* b, float* y,
                                               long long n4, int d4) {
    bias_add_fwd4(x, b, y, n4, d4);
}
extern "C" __global__ void cim_bias_add_fwd_v4_bf16(const __nv_bfloat16* x, const float* b,
                                                    __nv_bfloat16* y, long long n4, int d4) {
    bias_add_fwd4(x, b, y, n4, d4);
}

template <typename T, typename O>
__device__ void bias_gelu_bwd_dx4(const T* x, const float* b, const T* dy, O* dx, long long n4,
                                  int d4) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float v[4], c[4], g[4];
    load4(x, i, v);
    load4(b, i % d4, c);
    load4(dy, i, g);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = g[k] * gelu_erf_grad(v[k] + c[k]);
    store4(dx, i, v);
}
extern "C" __global__ void cim_bias_gelu_bwd_dx_v4(const float* x, const float* b,
                                                   const float* dy, float* dx, long long n4,
                                                   int d4) {
    bias_gelu_bwd_dx4(x, b, dy, dx, n4, d4);
}
extern "C" __global__ void cim_bias_gelu_bwd_dx_v4_bf16(const __nv_bfloat16* x, const float* b,
                                                        const __nv_bfloat16* dy, float* dx,
                                                        long long n4, int d4) {
    bias_gelu_bwd_dx4(x, b, dy, dx, n4, d4);
}
extern "C" __global__ void cim_bias_gelu_bwd_dx_bf16_out_v4(const __nv_bfloat16* x,
                                                            const float* b,
                                                            const __nv_bfloat16* dy,
                                                            __nv_bfloat16* dx, long long n4,
                                                            int d4) {
    bias_gelu_bwd_dx4(x, b, dy, dx, n4, d4);
}

// dx in f32 whatever x and dy are stored in (O = float), or in their bf16 (O = T: the block
// node's backward, whose next GEMM reads bf16).
template <typename T, typename O>
__device__ void bias_gelu_bwd_dx(const T* x, const float* b, const T* dy, O* dx, long long n,
                                 int d) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    st(dx, i, ld(dy, i) * gelu_erf_grad(ld(x, i) + b[i % d]));
}

extern "C" __global__ void cim_bias_gelu_bwd_dx(const float* x, const float* b, const float* dy,
                                                float* dx, long long n, int d) {
    bias_gelu_bwd_dx(x, b, dy, dx, n, d);
}
extern "C" __global__ void cim_bias_gelu_bwd_dx_bf16(const __nv_bfloat16* x, const float* b,
                                                     const __nv_bfloat16* dy, float* dx,
                                                     long long n, int d) {
    bias_gelu_bwd_dx(x, b, dy, dx, n, d);
}
extern "C" __global__ void cim_bias_gelu_bwd_dx_bf16_out(const __nv_bfloat16* x, const float* b,
                                                         const __nv_bfloat16* dy,
                                                         __nv_bfloat16* dx, long long n, int d) {
    bias_gelu_bwd_dx(x, b, dy, dx, n, d);
}

// Column sums of a (rows, d) matrix in two deterministic stages. Stage 1: block (32, 8) covers 32
// columns of one chunk of COL_CHUNK rows; partial[chunk][j] = Σ rows of the chunk.
#define COL_CHUNK 256
template <typename T>
__device__ void col_sum_partial(const T* a, float* partial, int rows, int d) {
    __shared__ float sh[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int j = blockIdx.x * 32 + tx;
    const int r0 = blockIdx.y * COL_CHUNK, r1 = min(r0 + COL_CHUNK, rows);
    float s = 0.0f;
    if (j < d)
        for (int r = r0 + ty; r < r1; r += 8) s += ld(a, (size_t)r * d + j);
    sh[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && j < d) {
        for (int k = 1; k < 8; ++k) s += sh[k][tx];
        partial[(size_t)blockIdx.y * d + j] = s;
    }
}

extern "C" __global__ void cim_col_sum_partial(const float* a, float* partial, int rows, int d) {
    col_sum_partial(a, partial, rows, d);
}
// bf16 gradients (a bf16 Linear's bias): f32 sums of the stored values.
extern "C" __global__ void cim_col_sum_partial_bf16(const __nv_bfloat16* a, float* partial,
                                                    int rows, int d) {
    col_sum_partial(a, partial, rows, d);
}

// Stage 2: out[j] = Σ_chunks partial[chunk][j], chunks in order.
extern "C" __global__ void cim_col_sum_chunks(const float* partial, float* out, int chunks,
                                              int d) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float s = 0.0f;
    for (int c = 0; c < chunks; ++c) s += partial[(size_t)c * d + j];
    out[j] = s;
}

// ---- im2col / col2im (src/ops/conv.rs). x (P = B·C planes, h, w); cols (B, C·k·k, ho·wo) with
// rows in (c, ky, kx) order, i.e. plane p's k·k rows start at row p·k·k. One thread per output.
extern "C" __global__ void cim_im2col(const float* x, float* cols, long long n, int h, int w, int k,
                                      int stride, int pad, int ho, int wo) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int ox = (int)(i % wo), oy = (int)((i / wo) % ho);
    const long long r = i / ((long long)ho * wo);
    const int kk = (int)(r % (k * k));
    const long long p = r / (k * k);
    const int iy = oy * stride + kk / k - pad, ix = ox * stride + kk % k - pad;
    cols[i] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? x[(p * h + iy) * w + ix] : 0.0f;
}

// The im2col backward: each input pixel gathers the patch entries that read it (deterministic).
extern "C" __global__ void cim_col2im(const float* cols, float* x, long long n, int h, int w, int k,
                                      int stride, int pad, int ho, int wo) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int ix = (int)(i % w), iy = (int)((i / w) % h);
    const float* g = cols + (i / ((long long)h * w)) * k * k * ho * wo;
    float s = 0.0f;
    for (int ky = 0; ky < k; ++ky) {
        const int ty = iy + pad - ky;
        if (ty < 0 || ty % stride != 0 || ty / stride >= ho) continue;
        for (int kx = 0; kx < k; ++kx) {
            const int tx = ix + pad - kx;
            if (tx < 0 || tx % stride != 0 || tx / stride >= wo) continue;
            s += g[((long long)(ky * k + kx) * ho + ty / stride) * wo + tx / stride];
        }
    }
    x[i] = s;
}

// ---- channel bias (src/ops/channel.rs): y = [r +] g·(x + b[c]), then max(·, 0) if relu; x, r, y
// (B, C, hw) with hw % 4 == 0, four elements per thread. With `pair`, y holds 2·(4·n4) floats:
// the value, then its ReLU.
extern "C" __global__ void cim_channel_bias(const float* x, const float* b, const float* r, float* y,
                                            long long n4, int c, int hw4, float g, int has_r,
                                            int relu, int pair, int cl) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float4 v = reinterpret_cast<const float4*>(x)[i];
    if (cl) {
        // Channels last: element 4i + k has channel (4i + k) % c.
        const int c0 = (int)((4 * i) % c);
        v.x = g * (v.x + b[c0]), v.y = g * (v.y + b[(c0 + 1) % c]);
        v.z = g * (v.z + b[(c0 + 2) % c]), v.w = g * (v.w + b[(c0 + 3) % c]);
    } else {
        const float bc = b[(int)((i / hw4) % c)];
        v.x = g * (v.x + bc), v.y = g * (v.y + bc), v.z = g * (v.z + bc), v.w = g * (v.w + bc);
    }
    if (has_r) {
        const float4 a = reinterpret_cast<const float4*>(r)[i];
        v.x += a.x, v.y += a.y, v.z += a.z, v.w += a.w;
    }
    if (relu) v.x = fmaxf(v.x, 0.0f), v.y = fmaxf(v.y, 0.0f), v.z = fmaxf(v.z, 0.0f), v.w = fmaxf(v.w, 0.0f);
    reinterpret_cast<float4*>(y)[i] = v;
    if (pair) {
        v.x = fmaxf(v.x, 0.0f), v.y = fmaxf(v.y, 0.0f), v.z = fmaxf(v.z, 0.0f), v.w = fmaxf(v.w, 0.0f);
        reinterpret_cast<float4*>(y)[n4 + i] = v;
    }
}

// The same in bf16 or f16 storage (x, b, r, y all of one type; f32 arithmetic, one rounding at
// the store): the frozen dVAE in reduced precision. Four elements per thread, moved as one 8-byte
// word each way (the caller checks 4-element alignment of every view; scalar 2-byte loads made
// the f16 kernel slower than the f32 one in session 11's H200 profile: 20.2 against 16.3 ms).
template <typename T>
__device__ void channel_bias_half(const T* x, const T* b, const T* r, T* y, long long n4, int c,
                                  int hw4, float g, int has_r, int relu, int pair, int cl) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    // Channels first: one channel for the four elements; channels last: 4i + k has (4i + k) % c.
    const int c0 = cl ? (int)((4 * i) % c) : (int)((i / hw4) % c);
    const uint2 xw = reinterpret_cast<const uint2*>(x)[i];
    uint2 rw = make_uint2(0u, 0u), yw, pw;
    if (has_r) rw = reinterpret_cast<const uint2*>(r)[i];
    const T* xs = reinterpret_cast<const T*>(&xw);
    const T* rs = reinterpret_cast<const T*>(&rw);
    T* ys = reinterpret_cast<T*>(&yw);
    T* ps = reinterpret_cast<T*>(&pw);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float bc = ld(b, (size_t)(cl ? (c0 + k) % c : c0));
        float v = g * (ld(xs, k) + bc);
        if (has_r) v += ld(rs, k);
        if (relu) v = fmaxf(v, 0.0f);
        st(ys, k, v);
        st(ps, k, fmaxf(v, 0.0f));
    }
    reinterpret_cast<uint2*>(y)[i] = yw;
    if (pair) reinterpret_cast<uint2*>(y)[n4 + i] = pw;
}

extern "C" __global__ void cim_channel_bias_bf16(const __nv_bfloat16* x, const __nv_bfloat16* b,
                                                 const __nv_bfloat16* r, __nv_bfloat16* y,
                                                 long long n4, int c, int hw4, float g, int has_r,
                                                 int relu, int pair, int cl) {
    channel_bias_half(x, b, r, y, n4, c, hw4, g, has_r, relu, pair, cl);
}
extern "C" __global__ void cim_channel_bias_f16(const __half* x, const __half* b, const __half* r,
                                                __half* y, long long n4, int c, int hw4, float g,
                                                int has_r, int relu, int pair, int cl) {
    channel_bias_half(x, b, r, y, n4, c, hw4, g, has_r, relu, pair, cl);
}

// ---- Multi-tensor AdamW and sum of squares (src/ops/adamw.rs) ----
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

// ---- 2× resampling of the frozen dVAE's maps (src/ops/resample.rs); f32, bf16 or f16 storage ----
// (every resampling kernel takes `c`, the channel count, which only the channels-last ones use)

// 2×2 max-pool, one thread per output element: the window's first value, replaced by larger ones
// (candle's order, so NaNs behave as in candle's op).
template <typename T>
__device__ void max_pool_2x2(const T* x, T* y, long long n, int h, int w, int ho, int wo) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int ox = (int)(i % wo), oy = (int)((i / wo) % ho);
    const long long p = i / ((long long)ho * wo);
    const size_t r0 = ((size_t)p * h + 2 * oy) * w + 2 * ox, r1 = r0 + w;
    float m = ld(x, r0);
    const float s[3] = {ld(x, r0 + 1), ld(x, r1), ld(x, r1 + 1)};
#pragma unroll
    for (int k = 0; k < 3; ++k)
        if (s[k] > m) m = s[k];
    st(y, i, m);
}

// Nearest 2× upsampling, one thread per input element writing its 2×2 outputs (n counts input
// elements; one thread per output, five divisions each, ran at ~a third of the bandwidth in
// session 11's H200 profile).
template <typename T>
__device__ void upsample_2x(const T* x, T* y, long long n, int h, int w) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int ix = (int)(i % w);
    const long long r = i / w;
    const int iy = (int)(r % h);
    const long long p = r / h;
    const T v = x[i];
    T* o = y + ((size_t)p * 2 * h + 2 * iy) * (2 * (size_t)w) + 2 * ix;
    o[0] = v;
    o[1] = v;
    o[2 * w] = v;
    o[2 * w + 1] = v;
}

extern "C" __global__ void cim_max_pool_2x2(const float* x, float* y, long long n, int h, int w,
                                            int ho, int wo, int c) {
    max_pool_2x2(x, y, n, h, w, ho, wo);
}
extern "C" __global__ void cim_max_pool_2x2_bf16(const __nv_bfloat16* x, __nv_bfloat16* y,
                                                 long long n, int h, int w, int ho, int wo, int c) {
    max_pool_2x2(x, y, n, h, w, ho, wo);
}
extern "C" __global__ void cim_max_pool_2x2_f16(const __half* x, __half* y, long long n, int h,
                                                int w, int ho, int wo, int c) {
    max_pool_2x2(x, y, n, h, w, ho, wo);
}
extern "C" __global__ void cim_upsample_2x(const float* x, float* y, long long n, int h, int w,
                                           int ho, int wo, int c) {
    upsample_2x(x, y, n, h, w);
}
extern "C" __global__ void cim_upsample_2x_bf16(const __nv_bfloat16* x, __nv_bfloat16* y,
                                                long long n, int h, int w, int ho, int wo, int c) {
    upsample_2x(x, y, n, h, w);
}

extern "C" __global__ void cim_upsample_2x_f16(const __half* x, __half* y, long long n, int h,
                                               int w, int ho, int wo, int c) {
    upsample_2x(x, y, n, h, w);
}

// ---- 2× resampling of channels-last maps (src/ops/resample.rs, `*_nhwc`): x (B, H, W, C) ----

// 2×2 max-pool, one thread per output element (adjacent threads: adjacent channels, coalesced);
// the window's values in candle's order (top-left, top-right, bottom-left, bottom-right).
template <typename T>
__device__ void max_pool_2x2_nhwc(const T* x, T* y, long long n, int h, int w, int ho, int wo,
                                  int c) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int ch = (int)(i % c);
    const long long q = i / c;
    const int ox = (int)(q % wo), oy = (int)((q / wo) % ho);
    const long long b = q / ((long long)wo * ho);
    const size_t r0 = (((size_t)b * h + 2 * oy) * w + 2 * ox) * c + ch, r1 = r0 + (size_t)w * c;
    float m = ld(x, r0);
    const float s[3] = {ld(x, r0 + c), ld(x, r1), ld(x, r1 + c)};
#pragma unroll
    for (int k = 0; k < 3; ++k)
        if (s[k] > m) m = s[k];
    st(y, i, m);
}

// Nearest 2× upsampling, one thread per input element writing its four copies.
template <typename T>
__device__ void upsample_2x_nhwc(const T* x, T* y, long long n, int h, int w, int c) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int ch = (int)(i % c);
    const long long q = i / c;
    const int ix = (int)(q % w);
    const long long r = q / w;
    const int iy = (int)(r % h);
    const long long b = r / h;
    const T v = x[i];
    const size_t row = (size_t)2 * w * c;
    T* o = y + (((size_t)b * 2 * h + 2 * iy) * 2 * w + 2 * ix) * c + ch;
    o[0] = v;
    o[c] = v;
    o[row] = v;
    o[row + c] = v;
}

#define NHWC_RESAMPLE(SUFFIX, T)                                                                  \
    extern "C" __global__ void cim_max_pool_2x2_nhwc##SUFFIX(const T* x, T* y, long long n, int h, \
                                                            int w, int ho, int wo, int c) {       \
        max_pool_2x2_nhwc(x, y, n, h, w, ho, wo, c);                                              \
    }                                                                                             \
    extern "C" __global__ void cim_upsample_2x_nhwc##SUFFIX(const T* x, T* y, long long n, int h,  \
                                                           int w, int ho, int wo, int c) {        \
        upsample_2x_nhwc(x, y, n, h, w, c);                                                       \
    }
NHWC_RESAMPLE(, float)
NHWC_RESAMPLE(_bf16, __nv_bfloat16)
NHWC_RESAMPLE(_f16, __half)

// ---- Head layouts of GEMM attention (src/ops/heads.rs): copies, f32 or bf16 ----
// All take (a, b, c, out, total, B, N, H, hd, R, scale); one thread per word of W: one element
// (W = T), or 16 bytes (W = uint4: 4 f32 or 8 bf16 along hd; hd a multiple of that and every view
// 16-byte aligned, which the caller checks — one element per thread, with its index arithmetic,
// ran at ~4.6× the bandwidth bound in session 11's H200 profile). `total` counts words. The
// per-head side has R >= N rows per head (rows N..R zero: an aligned width for the attention
// GEMMs); part 0 (q, or dq) is multiplied by `scale` (f32 arithmetic, one rounding; 1 copies).

template <typename W>
__device__ __forceinline__ W zero_word() {
    W w;
    unsigned char* z = reinterpret_cast<unsigned char*>(&w);
#pragma unroll
    for (int k = 0; k < (int)sizeof(W); ++k) z[k] = 0;
    return w;
}

// Each T in the word times `scale`.
template <typename T, typename W>
__device__ __forceinline__ void scale_word(W& w, float scale) {
    T* e = reinterpret_cast<T*>(&w);
#pragma unroll
    for (int k = 0; k < (int)(sizeof(W) / sizeof(T)); ++k) st(e, k, ld(e, k) * scale);
}

// out (parts, B, H, R, hd) from a (B, N, parts, H, hd): the packed qkv (3 parts) or a token-major
// gradient (1 part); rows t >= N are zero.
template <typename T, typename W>
__device__ void split_qkv(const T* a, T* out, long long total, int B, int N, int H, int hd,
                          int parts, int R, float scale) {
    constexpr int V = sizeof(W) / sizeof(T);
    const long long iw = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (iw >= total) return;
    const long long i = iw * V;
    const int d = (int)(i % hd);
    long long r = i / hd;
    const int t = (int)(r % R);
    r /= R;
    const int h = (int)(r % H);
    r /= H;
    const int b = (int)(r % B), s = (int)(r / B);
    W w = zero_word<W>();
    if (t < N) {
        w = *reinterpret_cast<const W*>(a + ((((long long)b * N + t) * parts + s) * H + h) * hd + d);
        if (s == 0 && scale != 1.0f) scale_word<T>(w, scale);
    }
    *reinterpret_cast<W*>(out + i) = w;
}

// out (B, N, parts, H, hd) from `parts` per-head tensors (B, H, R, hd): a, then b, then c.
template <typename T, typename W>
__device__ void merge_heads(const T* a, const T* b, const T* c, T* out, long long total, int N,
                            int H, int hd, int parts, int R, float scale) {
    constexpr int V = sizeof(W) / sizeof(T);
    const long long iw = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (iw >= total) return;
    const long long i = iw * V;
    const int d = (int)(i % hd);
    long long r = i / hd;
    const int h = (int)(r % H);
    r /= H;
    const int s = (int)(r % parts);
    r /= parts;
    const int t = (int)(r % N);
    const long long bb = r / N;
    const T* src = s == 0 ? a : (s == 1 ? b : c);
    W w = *reinterpret_cast<const W*>(src + ((bb * H + h) * R + t) * hd + d);
    if (s == 0 && scale != 1.0f) scale_word<T>(w, scale);
    *reinterpret_cast<W*>(out + i) = w;
}

#define HEAD_COPY(name, T, body)                                                                 \
    extern "C" __global__ void name(const T* a, const T* b, const T* c, T* out, long long total, \
                                    int B, int N, int H, int hd, int R, float scale) {           \
        body;                                                                                    \
    }
#define BF16 __nv_bfloat16
HEAD_COPY(cim_split_qkv, float, (split_qkv<float, float>(a, out, total, B, N, H, hd, 3, R, scale)))
HEAD_COPY(cim_split_qkv_bf16, BF16, (split_qkv<BF16, BF16>(a, out, total, B, N, H, hd, 3, R, scale)))
HEAD_COPY(cim_split_heads, float, (split_qkv<float, float>(a, out, total, B, N, H, hd, 1, R, scale)))
HEAD_COPY(cim_split_heads_bf16, BF16,
          (split_qkv<BF16, BF16>(a, out, total, B, N, H, hd, 1, R, scale)))
HEAD_COPY(cim_merge_heads, float,
          (merge_heads<float, float>(a, b, c, out, total, N, H, hd, 1, R, scale)))
HEAD_COPY(cim_merge_heads_bf16, BF16,
          (merge_heads<BF16, BF16>(a, b, c, out, total, N, H, hd, 1, R, scale)))
HEAD_COPY(cim_merge_qkv, float,
          (merge_heads<float, float>(a, b, c, out, total, N, H, hd, 3, R, scale)))
HEAD_COPY(cim_merge_qkv_bf16, BF16,
          (merge_heads<BF16, BF16>(a, b, c, out, total, N, H, hd, 3, R, scale)))
HEAD_COPY(cim_split_qkv_vec, float,
          (split_qkv<float, uint4>(a, out, total, B, N, H, hd, 3, R, scale)))
HEAD_COPY(cim_split_qkv_vec_bf16, BF16,
          (split_qkv<BF16, uint4>(a, out, total, B, N, H, hd, 3, R, scale)))
HEAD_COPY(cim_split_heads_vec, float,
          (split_qkv<float, uint4>(a, out, total, B, N, H, hd, 1, R, scale)))
HEAD_COPY(cim_split_heads_vec_bf16, BF16,
          (split_qkv<BF16, uint4>(a, out, total, B, N, H, hd, 1, R, scale)))
HEAD_COPY(cim_merge_heads_vec, float,
          (merge_heads<float, uint4>(a, b, c, out, total, N, H, hd, 1, R, scale)))
HEAD_COPY(cim_merge_heads_vec_bf16, BF16,
          (merge_heads<BF16, uint4>(a, b, c, out, total, N, H, hd, 1, R, scale)))
HEAD_COPY(cim_merge_qkv_vec, float,
          (merge_heads<float, uint4>(a, b, c, out, total, N, H, hd, 3, R, scale)))
HEAD_COPY(cim_merge_qkv_vec_bf16, BF16,
          (merge_heads<BF16, uint4>(a, b, c, out, total, N, H, hd, 3, R, scale)))
#undef BF16

// ---- Residual adds of the block node (src/ops/residual.rs): y = a + (b [+ bias[j]]) ----
// Four elements per thread, moved as one word each way (float4; 8 bytes for bf16). a and y share
// a type; b is of a's type or f32; bias f32; rows of d (d % 4 == 0, every view 4-element aligned).
template <typename T, typename U>
__device__ void residual_add(const T* a, const U* b, const float* bias, T* y, long long n4, int d4,
                             int has_bias) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float va[4], vb[4];
    load4(a, i, va);
    load4(b, i, vb);
    if (has_bias) {
        float c[4];
        load4(bias, i % d4, c);
#pragma unroll
        for (int k = 0; k < 4; ++k) vb[k] += c[k];
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) va[k] += vb[k];
    store4(y, i, va);
}

extern "C" __global__ void cim_residual_add(const float* a, const float* b, const float* bias,
                                            float* y, long long n4, int d4, int has_bias) {
    residual_add(a, b, bias, y, n4, d4, has_bias);
}
extern "C" __global__ void cim_residual_add_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b,
                                                 const float* bias, __nv_bfloat16* y, long long n4,
                                                 int d4, int has_bias) {
    residual_add(a, b, bias, y, n4, d4, has_bias);
}
extern "C" __global__ void cim_residual_add_bf16_f32(const __nv_bfloat16* a, const float* b,
                                                     const float* bias, __nv_bfloat16* y,
                                                     long long n4, int d4, int has_bias) {
    residual_add(a, b, bias, y, n4, d4, has_bias);
}

// ---- Channel argmax of the dVAE's logits (src/ops/argmax.rs): x (B, C, HW) f32, bf16 or f16 ----
// Block (32 pixels, 8 channel lanes): lane ty scans channels ty, ty + 8, … of its pixel (adjacent
// threads read adjacent pixels of one plane: coalesced), keeping the first maximum; the 8
// candidates are combined by value, ties to the lowest channel. The result is the sequential
// scan's (channel 0, then each strictly larger value): NaNs never win, and a NaN in channel 0
// keeps index 0, as in candle's argmax and the CPU op.
template <typename T>
__device__ void argmax_channels(const T* x, unsigned int* out, int B, int C, int HW) {
    __shared__ float best_v[8][32];
    __shared__ unsigned int best_i[8][32];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long pix = (long long)blockIdx.x * 32 + tx;
    const bool live = pix < (long long)B * HW;
    float best = -INFINITY;
    unsigned int arg = 0xffffffffu;
    if (live) {
        const long long b = pix / HW, p = pix % HW;
        const T* img = x + (size_t)b * C * HW + p;
        int ch = ty;
        if (ty == 0 && C > 0) {
            best = ld(img, 0);
            arg = 0;
            ch = 8;
        }
        for (; ch < C; ch += 8) {
            const float v = ld(img, (size_t)ch * HW);
            if (v > best || (arg == 0xffffffffu && v == best)) {
                best = v;
                arg = (unsigned int)ch;
            }
        }
    }
    best_v[ty][tx] = best;
    best_i[ty][tx] = arg;
    __syncthreads();
    if (ty == 0 && live) {
        // Channel 0's value NaN: the sequential scan never moves.
        if (!(best == best)) {
            out[pix] = 0;
            return;
        }
        for (int k = 1; k < 8; ++k) {
            const float v = best_v[k][tx];
            const unsigned int i = best_i[k][tx];
            if (i == 0xffffffffu) continue;
            if (v > best || (v == best && i < arg)) {
                best = v;
                arg = i;
            }
        }
        out[pix] = arg;
    }
}
extern "C" __global__ void cim_argmax_channels(const float* x, unsigned int* out, int B, int C,
                                               int HW) {
    argmax_channels(x, out, B, C, HW);
}
extern "C" __global__ void cim_argmax_channels_bf16(const __nv_bfloat16* x, unsigned int* out,
                                                    int B, int C, int HW) {
    argmax_channels(x, out, B, C, HW);
}
extern "C" __global__ void cim_argmax_channels_f16(const __half* x, unsigned int* out, int B,
                                                   int C, int HW) {
    argmax_channels(x, out, B, C, HW);
}

// Argmax over the last dimension of channels-last logits x (rows, C): one warp per row (8 rows per
// block), lane l scanning channels l, l + 32, … (a warp reads 32 adjacent values: coalesced),
// keeping its first maximum; the 32 candidates are combined by value, ties to the lowest channel.
// The sequential scan's result, as argmax_channels: NaNs never win, a NaN in channel 0 gives 0.
template <typename T>
__device__ void argmax_rows(const T* x, unsigned int* out, long long rows, int C) {
    const int lane = threadIdx.x;
    const long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const T* r = x + (size_t)row * C;
    float best = -INFINITY;
    unsigned int arg = 0xffffffffu;
    for (int ch = lane; ch < C; ch += 32) {
        const float v = ld(r, (size_t)ch);
        if (v > best || (arg == 0xffffffffu && v == best)) {
            best = v;
            arg = (unsigned int)ch;
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float v = __shfl_down_sync(0xffffffffu, best, off);
        const unsigned int i = __shfl_down_sync(0xffffffffu, arg, off);
        if (i != 0xffffffffu && (arg == 0xffffffffu || v > best || (v == best && i < arg))) {
            best = v;
            arg = i;
        }
    }
    if (lane == 0) {
        const float first = C > 0 ? ld(r, 0) : 0.0f;
        out[row] = (!(first == first) || arg == 0xffffffffu) ? 0u : arg;
    }
}
extern "C" __global__ void cim_argmax_rows(const float* x, unsigned int* out, long long rows, int C) {
    argmax_rows(x, out, rows, C);
}
extern "C" __global__ void cim_argmax_rows_bf16(const __nv_bfloat16* x, unsigned int* out,
                                                long long rows, int C) {
    argmax_rows(x, out, rows, C);
}
extern "C" __global__ void cim_argmax_rows_f16(const __half* x, unsigned int* out, long long rows,
                                               int C) {
    argmax_rows(x, out, rows, C);
}

// ---------------------------------------------------------------------------------------------
// Flash attention, bf16, head width 64, tensor cores through WMMA (16×16×16 bf16 → f32).
//
// q, k, v are read where the qkv projection wrote them, `qkv` (B, N, 3, H, 64); the output is
// written in the layout the output projection reads, (B, N, H, 64); the backward reads `dout` in
// that layout and writes `dqkv` in qkv's. Nothing N×N touches global memory.
//
// Forward, two passes per tile of 64 query rows (4 warps × 16 rows):
//   cim_flash_stats_bf16: lse = m + log l per row over all keys (running max m and sum l of
//     exp(scale·q·k − m)), f32 (B·H, N);
//   cim_flash_out_bf16:   o = Σ_keys exp(scale·q·k − lse) · v, the probabilities final at once (no
//     rescaling of the accumulators, which WMMA keeps in opaque fragments).
// Backward (FlashAttention-2's), per tile of 64 keys, over tiles of 32 query rows:
//   cim_flash_delta_bf16: D = Σ_d dout·out per row, f32 (B·H, N);
//   cim_flash_bwd_bf16:   p = exp(scale·q·k − lse), dV += pᵀ·dO, dP = dO·vᵀ,
//     dS = scale·p·(dP − D), dK += dSᵀ·q (accumulated in fragments), dQ += dS·k (f32 atomics
//     into a scratch (B, N, H, 64));
//   cim_flash_dq_bf16:    the scratch into dqkv's q slots.
// ---------------------------------------------------------------------------------------------
namespace fa {
constexpr int D = 64;        // head width
constexpr int LDH = D + 8;   // bf16 tile row stride (elements): 144 bytes, a multiple of 16
constexpr int FWD_BQ = 64;   // query rows per block, forward
constexpr int FWD_BK = 32;   // keys per tile, forward
constexpr int LDS = 68;      // f32 tile row stride
constexpr int LDP = FWD_BK + 8;  // forward probability tile row stride (bf16)
constexpr int BWD_BK = 64;   // keys per block, backward
constexpr int BWD_BQ = 32;   // query rows per tile, backward
static_assert(BWD_BK == D, "the backward's key tiles are as wide as a head (shared tiles of LDH)");
typedef __nv_bfloat16 bf16;
using namespace nvcuda;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> FragAt;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> FragB;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> FragBt;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

// Rows [r0, r0 + rows) of a (·, 64) bf16 matrix whose row r starts at `base + r·stride` into a
// shared tile (row stride LDH), rows ≥ n as zeros; 16 bytes per thread and step.
__device__ __forceinline__ void load_rows(const bf16* base, long stride, int r0, int rows, int n,
                                          bf16* tile) {
    for (int c = threadIdx.x; c < rows * 8; c += blockDim.x) {
        const int r = c >> 3, k = (c & 7) * 8, row = r0 + r;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row < n) v = *reinterpret_cast<const uint4*>(base + (long)row * stride + k);
        *reinterpret_cast<uint4*>(tile + r * LDH + k) = v;
    }
}

// Start of head h of part `part` (0 q, 1 k, 2 v) of item b in qkv (B, N, 3, H, 64); rows 3·H·64 apart.
__device__ __forceinline__ const bf16* qkv_base(const bf16* qkv, int b, int h, int part, int n,
                                                int heads) {
    return qkv + ((long)b * n * 3 * heads + part * heads + h) * D;
}

// The warp-level products, all on shared tiles with row strides LDH (bf16) and LDS (f32).
// c (16 × 32, f32) = a (16 × 64) · bᵀ, b the 32 rows (× 64) at `b`: scores q·kᵀ, dP = dO·vᵀ.
__device__ __forceinline__ void mma_abt_16x32(const bf16* a, const bf16* b, float* c) {
    FragC acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int kk = 0; kk < D; kk += 16) {
        FragA fa;
        wmma::load_matrix_sync(fa, a + kk, LDH);
        for (int t = 0; t < 2; t++) {
            FragBt fb;  // bᵀ: element (d, row) at b[row·LDH + d]
            wmma::load_matrix_sync(fb, b + t * 16 * LDH + kk, LDH);
            wmma::mma_sync(acc[t], fa, fb, acc[t]);
        }
    }
    for (int t = 0; t < 2; t++) wmma::store_matrix_sync(c + t * 16, acc[t], LDS, wmma::mem_row_major);
}

// acc (16 × 64) += a (16 × k, row stride lda) · b (k × 64, row stride LDH): o += p·v.
__device__ __forceinline__ void mma_ab_acc(FragC (&acc)[4], const bf16* a, int lda, const bf16* b,
                                           int k) {
    for (int kk = 0; kk < k; kk += 16) {
        FragA fa;
        wmma::load_matrix_sync(fa, a + kk, lda);
        for (int t = 0; t < 4; t++) {
            FragB fb;
            wmma::load_matrix_sync(fb, b + kk * LDH + t * 16, LDH);
            wmma::mma_sync(acc[t], fa, fb, acc[t]);
        }
    }
}

// acc (16 × 64) += aᵀ · b: aᵀ's 16 rows are the columns of the (k × ·) tile at `a` (row stride
// LDH), b is (k × 64): dV += pᵀ·dO, dK += dSᵀ·q.
__device__ __forceinline__ void mma_atb_acc(FragC (&acc)[4], const bf16* a, const bf16* b, int k) {
    for (int kk = 0; kk < k; kk += 16) {
        FragAt fa;  // aᵀ: element (col, row) at a[row·LDH + col]
        wmma::load_matrix_sync(fa, a + kk * LDH, LDH);
        for (int t = 0; t < 4; t++) {
            FragB fb;
            wmma::load_matrix_sync(fb, b + kk * LDH + t * 16, LDH);
            wmma::mma_sync(acc[t], fa, fb, acc[t]);
        }
    }
}

// c (16 × 32, f32) = a (16 × 64, row stride LDH) · b (64 × 32: columns 32 of a (64 × ·) tile at
// `b`, row stride LDH): dQ = dS·k.
__device__ __forceinline__ void mma_ab_16x32(const bf16* a, const bf16* b, float* c) {
    FragC acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int kk = 0; kk < D; kk += 16) {
        FragA fa;
        wmma::load_matrix_sync(fa, a + kk, LDH);
        for (int t = 0; t < 2; t++) {
            FragB fb;
            wmma::load_matrix_sync(fb, b + kk * LDH + t * 16, LDH);
            wmma::mma_sync(acc[t], fa, fb, acc[t]);
        }
    }
    for (int t = 0; t < 2; t++) wmma::store_matrix_sync(c + t * 16, acc[t], LDS, wmma::mem_row_major);
}
}  // namespace fa

extern "C" __global__ void __launch_bounds__(128)
cim_flash_stats_bf16(const __nv_bfloat16* qkv, float* lse, int n, int heads, float scale) {
    using namespace fa;
    __shared__ __align__(32) bf16 sq[FWD_BQ * LDH];
    __shared__ __align__(32) bf16 sk[FWD_BK * LDH];
    __shared__ __align__(32) float ss[FWD_BQ * LDS];
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads, q0 = blockIdx.x * FWD_BQ;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long stride = 3L * heads * D;
    load_rows(qkv_base(qkv, b, h, 0, n, heads), stride, q0, FWD_BQ, n, sq);
    const int r = warp * 16 + (lane >> 1), c0 = (lane & 1) * 16;  // this lane: half a row
    float m = -INFINITY, l = 0.f;
    for (int k0 = 0; k0 < n; k0 += FWD_BK) {
        __syncthreads();  // the previous tile's readers are done (and sq is loaded)
        load_rows(qkv_base(qkv, b, h, 1, n, heads), stride, k0, FWD_BK, n, sk);
        __syncthreads();
        mma_abt_16x32(sq + warp * 16 * LDH, sk, ss + warp * 16 * LDS);  // q·kᵀ, this warp's rows
        __syncwarp();
        float v[16], tm = -INFINITY;
        for (int j = 0; j < 16; j++) {
            const int key = k0 + c0 + j;
            v[j] = key < n ? ss[r * LDS + c0 + j] * scale : -INFINITY;
            tm = fmaxf(tm, v[j]);
        }
        tm = fmaxf(tm, __shfl_xor_sync(0xffffffff, tm, 1));
        const float mn = fmaxf(m, tm);  // finite: every tile holds at least one real key
        float ts = 0.f;
        for (int j = 0; j < 16; j++) ts += expf(v[j] - mn);
        ts += __shfl_xor_sync(0xffffffff, ts, 1);
        l = l * expf(m - mn) + ts;
        m = mn;
    }
    const int row = q0 + r;
    if ((lane & 1) == 0 && row < n) lse[(long)bh * n + row] = m + logf(l);
}

extern "C" __global__ void __launch_bounds__(128)
cim_flash_out_bf16(const __nv_bfloat16* qkv, const float* lse, __nv_bfloat16* out, int n,
                   int heads, float scale) {
    using namespace fa;
    __shared__ __align__(32) bf16 sq[FWD_BQ * LDH];
    __shared__ __align__(32) bf16 sk[FWD_BK * LDH];
    __shared__ __align__(32) bf16 sv[FWD_BK * LDH];
    __shared__ __align__(32) float ss[FWD_BQ * LDS];
    __shared__ __align__(32) bf16 sp[FWD_BQ * LDP];
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads, q0 = blockIdx.x * FWD_BQ;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long stride = 3L * heads * D;
    load_rows(qkv_base(qkv, b, h, 0, n, heads), stride, q0, FWD_BQ, n, sq);
    const int r = warp * 16 + (lane >> 1), c0 = (lane & 1) * 16, row = q0 + r;
    const float my_lse = row < n ? lse[(long)bh * n + row] : 0.f;
    FragC o[4];
    for (int t = 0; t < 4; t++) wmma::fill_fragment(o[t], 0.f);
    for (int k0 = 0; k0 < n; k0 += FWD_BK) {
        __syncthreads();
        load_rows(qkv_base(qkv, b, h, 1, n, heads), stride, k0, FWD_BK, n, sk);
        load_rows(qkv_base(qkv, b, h, 2, n, heads), stride, k0, FWD_BK, n, sv);
        __syncthreads();
        mma_abt_16x32(sq + warp * 16 * LDH, sk, ss + warp * 16 * LDS);
        __syncwarp();
        for (int j = 0; j < 16; j++) {
            const int key = k0 + c0 + j;
            const float p =
                (key < n && row < n) ? expf(ss[r * LDS + c0 + j] * scale - my_lse) : 0.f;
            sp[r * LDP + c0 + j] = __float2bfloat16(p);
        }
        __syncwarp();
        mma_ab_acc(o, sp + warp * 16 * LDP, LDP, sv, FWD_BK);  // o += p·v
    }
    __syncthreads();
    for (int t = 0; t < 4; t++)
        wmma::store_matrix_sync(ss + warp * 16 * LDS + t * 16, o[t], LDS, wmma::mem_row_major);
    __syncwarp();
    if (row < n) {
        bf16* dst = out + (((long)b * n + row) * heads + h) * D;
        for (int j = 0; j < 32; j++) {
            const int d = (lane & 1) * 32 + j;
            dst[d] = __float2bfloat16(ss[r * LDS + d]);
        }
    }
}

// D = Σ_d dout·out per (item, row, head), one warp per row of 64: f32 (B·H, N).
extern "C" __global__ void cim_flash_delta_bf16(const __nv_bfloat16* out,
                                                const __nv_bfloat16* dout, float* delta,
                                                long rows, int n, int heads) {
    const long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const __nv_bfloat16* o = out + row * fa::D;
    const __nv_bfloat16* g = dout + row * fa::D;
    float s = __bfloat162float(o[lane]) * __bfloat162float(g[lane]) +
              __bfloat162float(o[lane + 32]) * __bfloat162float(g[lane + 32]);
    s = warp_sum(s);
    // row = (b·N + q)·H + h → (b·H + h)·N + q
    const long bq = row / heads;
    const int h = (int)(row % heads);
    const long b = bq / n, q = bq % n;
    if (lane == 0) delta[(b * heads + h) * n + q] = s;
}

extern "C" __global__ void __launch_bounds__(128)
cim_flash_bwd_bf16(const __nv_bfloat16* qkv, const __nv_bfloat16* dout, const float* lse,
                   const float* delta, __nv_bfloat16* dqkv, float* dq, int n, int heads,
                   float scale) {
    using namespace fa;
    // sk, sv (64 × LDH bf16 each) are reused at the end as the f32 staging of dK, dV.
    __shared__ __align__(32) unsigned char raw[2 * BWD_BK * LDH * 2];
    __shared__ __align__(32) bf16 sq[BWD_BQ * LDH];
    __shared__ __align__(32) bf16 sdo[BWD_BQ * LDH];
    __shared__ __align__(32) float ss[BWD_BQ * LDS];
    __shared__ __align__(32) bf16 sp[BWD_BQ * LDH];
    __shared__ __align__(32) bf16 sds[BWD_BQ * LDH];
    __shared__ float s_lse[BWD_BQ], s_delta[BWD_BQ];
    bf16* sk = reinterpret_cast<bf16*>(raw);
    bf16* sv = sk + BWD_BK * LDH;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads, k0 = blockIdx.x * BWD_BK;
    const int warp = threadIdx.x >> 5;
    const long stride = 3L * heads * D, ostride = (long)heads * D;
    load_rows(qkv_base(qkv, b, h, 1, n, heads), stride, k0, BWD_BK, n, sk);
    load_rows(qkv_base(qkv, b, h, 2, n, heads), stride, k0, BWD_BK, n, sv);
    FragC dk[4], dv[4];
    for (int t = 0; t < 4; t++) {
        wmma::fill_fragment(dk[t], 0.f);
        wmma::fill_fragment(dv[t], 0.f);
    }
    // The (32 × 64) products: warp w computes row tile w/2, column tiles 2·(w%2) and 2·(w%2)+1.
    const int rt = warp >> 1, ct = (warp & 1) * 2;
    for (int i0 = 0; i0 < n; i0 += BWD_BQ) {
        __syncthreads();  // the previous tile's readers are done (and sk, sv are loaded)
        load_rows(qkv_base(qkv, b, h, 0, n, heads), stride, i0, BWD_BQ, n, sq);
        load_rows(dout + ((long)b * n * heads + h) * D, ostride, i0, BWD_BQ, n, sdo);
        if (threadIdx.x < BWD_BQ) {
            const int q = i0 + threadIdx.x;
            s_lse[threadIdx.x] = q < n ? lse[(long)bh * n + q] : 0.f;
            s_delta[threadIdx.x] = q < n ? delta[(long)bh * n + q] : 0.f;
        }
        __syncthreads();
        // S = q·kᵀ (32 × 64 keys)
        mma_abt_16x32(sq + rt * 16 * LDH, sk + ct * 16 * LDH, ss + rt * 16 * LDS + ct * 16);
        __syncthreads();
        // p = exp(scale·s − lse) on real (query, key) pairs, else 0
        for (int e = threadIdx.x; e < BWD_BQ * BWD_BK; e += blockDim.x) {
            const int qi = e / BWD_BK, kj = e % BWD_BK;
            const bool real = i0 + qi < n && k0 + kj < n;
            const float p = real ? expf(ss[qi * LDS + kj] * scale - s_lse[qi]) : 0.f;
            sp[qi * LDH + kj] = __float2bfloat16(p);
        }
        __syncthreads();
        // dV (this warp's 16 keys × 64) += pᵀ·dO; dP = dO·vᵀ (32 × 64 keys) into ss
        mma_atb_acc(dv, sp + warp * 16, sdo, BWD_BQ);
        mma_abt_16x32(sdo + rt * 16 * LDH, sv + ct * 16 * LDH, ss + rt * 16 * LDS + ct * 16);
        __syncthreads();
        // dS = scale · p · (dP − D)
        for (int e = threadIdx.x; e < BWD_BQ * BWD_BK; e += blockDim.x) {
            const int qi = e / BWD_BK, kj = e % BWD_BK;
            const float p = __bfloat162float(sp[qi * LDH + kj]);
            sds[qi * LDH + kj] = __float2bfloat16(scale * p * (ss[qi * LDS + kj] - s_delta[qi]));
        }
        __syncthreads();
        // dK (this warp's 16 keys × 64) += dSᵀ·q; dQ (32 × 64) = dS·k into ss
        mma_atb_acc(dk, sds + warp * 16, sq, BWD_BQ);
        mma_ab_16x32(sds + rt * 16 * LDH, sk + ct * 16, ss + rt * 16 * LDS + ct * 16);
        __syncthreads();
        for (int e = threadIdx.x; e < BWD_BQ * D; e += blockDim.x) {
            const int qi = e / D, d = e % D, q = i0 + qi;
            if (q < n) atomicAdd(dq + (((long)b * n + q) * heads + h) * D + d, ss[qi * LDS + d]);
        }
    }
    __syncthreads();  // everyone is done with sk, sv: stage dK, dV there as f32
    float* stage = reinterpret_cast<float*>(raw);  // 64 × LDS f32 fits in the 2·64·LDH bf16
    for (int part = 1; part <= 2; part++) {
        for (int t = 0; t < 4; t++)
            wmma::store_matrix_sync(stage + warp * 16 * LDS + t * 16, part == 1 ? dk[t] : dv[t],
                                    LDS, wmma::mem_row_major);
        __syncthreads();
        for (int e = threadIdx.x; e < BWD_BK * D; e += blockDim.x) {
            const int kj = e / D, d = e % D, key = k0 + kj;
            if (key < n)
                dqkv[(((long)b * n + key) * 3 * heads + part * heads + h) * D + d] =
                    __float2bfloat16(stage[kj * LDS + d]);
        }
        __syncthreads();
    }
}

// dq (B, N, H, 64) f32 into dqkv's q slots (B, N, 3, H, 64) as bf16.
extern "C" __global__ void cim_flash_dq_bf16(const float* dq, __nv_bfloat16* dqkv, long total,
                                             int heads) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const long row = i / fa::D;  // (b·N + q)·H + h
    const int d = (int)(i % fa::D);
    dqkv[((row / heads) * 3 * heads + row % heads) * fa::D + d] = __float2bfloat16(dq[i]);
}

// ---- ReLU with a one-pass backward (src/ops/relu.rs): four elements per thread, as one word ----
// y = max(x, 0); dx = dy where y > 0, else 0 (PyTorch's rule: no gradient at x = 0). n % 4 == 0
// and every view 4-element aligned (the caller checks). f32 arithmetic; bf16 storage rounds nothing
// (each output is an input or 0).
template <typename T>
__device__ void relu_fwd4(const T* x, T* y, long long n4) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float v[4];
    load4(x, i, v);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = fmaxf(v[k], 0.0f);
    store4(y, i, v);
}
template <typename T>
__device__ void relu_bwd4(const T* y, const T* dy, T* dx, long long n4) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float v[4], g[4];
    load4(y, i, v);
    load4(dy, i, g);
#pragma unroll
    for (int k = 0; k < 4; ++k) g[k] = v[k] > 0.0f ? g[k] : 0.0f;
    store4(dx, i, g);
}
extern "C" __global__ void cim_relu_fwd_v4(const float* x, float* y, long long n4) {
    relu_fwd4(x, y, n4);
}
extern "C" __global__ void cim_relu_fwd_v4_bf16(const __nv_bfloat16* x, __nv_bfloat16* y,
                                                long long n4) {
    relu_fwd4(x, y, n4);
}
extern "C" __global__ void cim_relu_bwd_v4(const float* y, const float* dy, float* dx,
                                           long long n4) {
    relu_bwd4(y, dy, dx, n4);
}
extern "C" __global__ void cim_relu_bwd_v4_bf16(const __nv_bfloat16* y, const __nv_bfloat16* dy,
                                                __nv_bfloat16* dx, long long n4) {
    relu_bwd4(y, dy, dx, n4);
}
