#include "common.cuh"

// ---- BatchNorm, training mode (src/batch_norm.rs). x (B, C, HW), f32 or bf16. ----
// The per-channel reductions run on a grid (C, chunks): block (ch, k) covers items
// [k·ipc, (k+1)·ipc) of channel ch, its threads striding over the plane (no per-element division),
// and writes f64 partial sums; a second kernel adds a channel's partials in chunk order
// (deterministic). One block per channel would leave most of the GPU idle at
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

// The node's tail after the affine (src/batch_norm.rs `BnTail`): mode bit 1 a ReLU, bit 2 a
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

// Channels last: x (R, C), R = B·H·W rows (src/batch_norm.rs with `last`). Block
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
