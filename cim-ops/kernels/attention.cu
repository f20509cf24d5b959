#include "common.cuh"

// ---- Attention from packed qkv (src/attention.rs) ----
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
