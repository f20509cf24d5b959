// Shared device helpers: block and warp reductions, loads and stores in f32, bf16 and f16.
#pragma once

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
