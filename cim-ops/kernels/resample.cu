#include "common.cuh"

// ---- 2× resampling of the frozen dVAE's maps (src/resample.rs); f32, bf16 or f16 storage ----
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
// an H200 profile (2026-11-27)).
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

// ---- 2× resampling of channels-last maps (src/resample.rs, `*_nhwc`): x (B, H, W, C) ----

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
