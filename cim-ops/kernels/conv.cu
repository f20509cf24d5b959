#include "common.cuh"

// ---- Convolution filters between PyTorch's (O, C, k, k) and cuDNN's channels-last (O, k, k, C),
// with the cast the mixed-precision step needs anyway (src/conv.rs `FilterLayout`): one kernel
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


// ---- im2col / col2im (src/conv.rs). x (P = B·C planes, h, w); cols (B, C·k·k, ho·wo) with
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
