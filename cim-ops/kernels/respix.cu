#include "common.cuh"

// ---- RESPIX (src/respix.rs) ----

// Sliding-window target, one thread per pixel of `planes` (B·C) planes of h×w.
extern "C" __global__ void cim_respix_target(const float* x, float* y, int planes, int h, int w,
                                             int k, float eps) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long n = (long long)planes * h * w;
    if (i >= n) return;
    const int col = (int)(i % w), row = (int)((i / w) % h);
    const float* xp = x + (i / ((long long)h * w)) * h * w;
    const int before = k / 2;
    const int r0 = max(row - before, 0), r1 = min(row - before + k, h);
    const int c0 = max(col - before, 0), c1 = min(col - before + k, w);
    float s = 0.0f, s2 = 0.0f;
    for (int r = r0; r < r1; ++r)
        for (int c = c0; c < c1; ++c) {
            const float v = xp[r * w + c];
            s += v;
            s2 += v * v;
        }
    const float cnt = (float)((r1 - r0) * (c1 - c0));
    const float mean = s / cnt;
    const float var = fmaxf(s2 / cnt - mean * mean, 0.0f);
    y[i] = (xp[row * w + col] - mean) / sqrtf(var + eps);
}

// Target index of element j of prediction row `row` (layout (p, p, c) per grid position).
__device__ __forceinline__ long long respix_index(long long row, int j, int p, int c, int h, int w) {
    const int gh = h / p, gw = w / p;
    const long long b = row / (gh * gw);
    const int l = (int)(row % (gh * gw));
    const int gy = l / gw, gx = l % gw;
    const int py = j / (p * c), rest = j % (p * c);
    const int px = rest / c, ch = rest % c;
    return ((b * c + ch) * h + gy * p + py) * (long long)w + gx * p + px;
}

// Per prediction row: sum of |d| + d². One block per row.
extern "C" __global__ void cim_respix_loss_fwd(const float* pred, const float* target, float* out,
                                               int rows, int p, int c, int h, int w) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int e = p * p * c;
    const float* pr = pred + (long long)r * e;
    float s = 0.0f;
    for (int j = threadIdx.x; j < e; j += blockDim.x) {
        const float d = pr[j] - target[respix_index(r, j, p, c, h, w)];
        s += fabsf(d) + d * d;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) out[r] = s;
}

// d pred = g[row] · (sign(d) + 2d). One thread per element.
extern "C" __global__ void cim_respix_loss_bwd(const float* pred, const float* target,
                                               const float* g, float* dp, long long n, int p,
                                               int c, int h, int w) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int e = p * p * c;
    const long long r = i / e;
    const float d = pred[i] - target[respix_index(r, (int)(i % e), p, c, h, w)];
    const float sign = d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f);
    dp[i] = g[r] * (sign + 2.0f * d);
}
