#include "common.cuh"

// ---- MaxPool2d(3, stride 2, padding 1) (src/max_pool.rs). P planes of h × w, channels first
// (plane p at p·h·w) or, with cl = C > 0, channels last (p = b·C + c; pixel (y, x) of it at
// ((b·h + y)·w + x)·C + c). f32 or bf16 (a maximum of bf16 values is exact). ----

// Where plane p's pixels lie: pixel q (row-major in the plane) at base + q·step.
struct PoolMap {
    long long base;
    int step;
};
__device__ __forceinline__ PoolMap pool_map(long long p, int h, int w, int cl) {
    if (cl == 0) return {p * h * w, 1};
    return {(p / cl) * h * w * cl + p % cl, cl};
}

// Element i of a map laid out as pool_map says, as (plane, row, column).
__device__ __forceinline__ void pool_coords(long long i, int h, int w, int cl, long long* p, int* y,
                                            int* x) {
    if (cl == 0) {
        *x = (int)(i % w);
        *y = (int)((i / w) % h);
        *p = i / ((long long)h * w);
    } else {
        const long long q = i / cl;
        *x = (int)(q % w);
        *y = (int)((q / w) % h);
        *p = (q / ((long long)h * w)) * cl + i % cl;
    }
}

// Row-major index (within the plane) of the first maximum of output (oy, ox)'s window.
template <typename T>
__device__ __forceinline__ int pool_argmax(const T* x, PoolMap m, int h, int w, int oy, int ox) {
    const int y0 = max(2 * oy - 1, 0), x0 = max(2 * ox - 1, 0);
    const int y1 = min(2 * oy + 2, h), x1 = min(2 * ox + 2, w);
    int best = y0 * w + x0;
    float bv = ld(x, m.base + (size_t)best * m.step);
    for (int iy = y0; iy < y1; ++iy)
        for (int ix = x0; ix < x1; ++ix) {
            const float v = ld(x, m.base + (size_t)(iy * w + ix) * m.step);
            if (v > bv) {
                bv = v;
                best = iy * w + ix;
            }
        }
    return best;
}

// One thread per output element (consecutive threads: consecutive outputs in either layout).
template <typename T>
__device__ void max_pool_fwd(const T* x, T* y, long long planes, int h, int w, int ho, int wo,
                             int cl) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= planes * ho * wo) return;
    long long p;
    int oy, ox;
    pool_coords(i, ho, wo, cl, &p, &oy, &ox);
    const PoolMap m = pool_map(p, h, w, cl);
    y[i] = x[m.base + (size_t)pool_argmax(x, m, h, w, oy, ox) * m.step];
}
extern "C" __global__ void cim_max_pool_fwd(const float* x, float* y, long long planes, int h,
                                            int w, int ho, int wo, int cl) {
    max_pool_fwd(x, y, planes, h, w, ho, wo, cl);
}
extern "C" __global__ void cim_max_pool_fwd_bf16(const __nv_bfloat16* x, __nv_bfloat16* y,
                                                 long long planes, int h, int w, int ho, int wo,
                                                 int cl) {
    max_pool_fwd(x, y, planes, h, w, ho, wo, cl);
}

// One thread per input pixel, gathering from the ≤ 4 windows that cover it (deterministic).
template <typename T>
__device__ void max_pool_bwd(const T* x, const T* dy, T* dx, long long planes, int h, int w,
                             int ho, int wo, int cl) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= planes * h * w) return;
    long long p;
    int iy, ix;
    pool_coords(i, h, w, cl, &p, &iy, &ix);
    const PoolMap m = pool_map(p, h, w, cl), g = pool_map(p, ho, wo, cl);
    const int me = iy * w + ix;
    float s = 0.0f;
    for (int oy = max(iy / 2, 0); oy <= min((iy + 1) / 2, ho - 1); ++oy)
        for (int ox = max(ix / 2, 0); ox <= min((ix + 1) / 2, wo - 1); ++ox)
            if (2 * oy - 1 <= iy && iy <= 2 * oy + 1 && 2 * ox - 1 <= ix && ix <= 2 * ox + 1 &&
                pool_argmax(x, m, h, w, oy, ox) == me)
                s += ld(dy, g.base + (size_t)(oy * wo + ox) * g.step);
    st(dx, i, s);
}
extern "C" __global__ void cim_max_pool_bwd(const float* x, const float* dy, float* dx,
                                            long long planes, int h, int w, int ho, int wo,
                                            int cl) {
    max_pool_bwd(x, dy, dx, planes, h, w, ho, wo, cl);
}
extern "C" __global__ void cim_max_pool_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* dy,
                                                 __nv_bfloat16* dx, long long planes, int h, int w,
                                                 int ho, int wo, int cl) {
    max_pool_bwd(x, dy, dx, planes, h, w, ho, wo, cl);
}
