#include "common.cuh"

// ---- channel bias (src/channel.rs): y = [r +] g·(x + b[c]), then max(·, 0) if relu; x, r, y
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
// the f16 kernel slower than the f32 one in an H200 profile (2026-11-27): 20.2 against 16.3 ms).
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
