#include "common.cuh"

// ---- Head layouts of GEMM attention (src/heads.rs): copies, f32 or bf16 ----
// All take (a, b, c, out, total, B, N, H, hd, R, scale); one thread per word of W: one element
// (W = T), or 16 bytes (W = uint4: 4 f32 or 8 bf16 along hd; hd a multiple of that and every view
// 16-byte aligned, which the caller checks — one element per thread, with its index arithmetic,
// ran at ~4.6× the bandwidth bound in an H200 profile (2026-11-27)). `total` counts words. The
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
