#include "common.cuh"

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
