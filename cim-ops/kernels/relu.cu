#include "common.cuh"

// ---- ReLU with a one-pass backward (src/relu.rs): four elements per thread, as one word ----
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
