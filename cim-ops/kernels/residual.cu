#include "common.cuh"

// ---- Residual adds of the block node (src/residual.rs): y = a + (b [+ bias[j]]) ----
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
