#include "common.cuh"

// ---- Channel argmax of the dVAE's logits (src/argmax.rs): x (B, C, HW) f32, bf16 or f16 ----
// Block (32 pixels, 8 channel lanes): lane ty scans channels ty, ty + 8, … of its pixel (adjacent
// threads read adjacent pixels of one plane: coalesced), keeping the first maximum; the 8
// candidates are combined by value, ties to the lowest channel. The result is the sequential
// scan's (channel 0, then each strictly larger value): NaNs never win, and a NaN in channel 0
// keeps index 0, as in candle's argmax and the CPU op.
template <typename T>
__device__ void argmax_channels(const T* x, unsigned int* out, int B, int C, int HW) {
    __shared__ float best_v[8][32];
    __shared__ unsigned int best_i[8][32];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long pix = (long long)blockIdx.x * 32 + tx;
    const bool live = pix < (long long)B * HW;
    float best = -INFINITY;
    unsigned int arg = 0xffffffffu;
    if (live) {
        const long long b = pix / HW, p = pix % HW;
        const T* img = x + (size_t)b * C * HW + p;
        int ch = ty;
        if (ty == 0 && C > 0) {
            best = ld(img, 0);
            arg = 0;
            ch = 8;
        }
        for (; ch < C; ch += 8) {
            const float v = ld(img, (size_t)ch * HW);
            if (v > best || (arg == 0xffffffffu && v == best)) {
                best = v;
                arg = (unsigned int)ch;
            }
        }
    }
    best_v[ty][tx] = best;
    best_i[ty][tx] = arg;
    __syncthreads();
    if (ty == 0 && live) {
        // Channel 0's value NaN: the sequential scan never moves.
        if (!(best == best)) {
            out[pix] = 0;
            return;
        }
        for (int k = 1; k < 8; ++k) {
            const float v = best_v[k][tx];
            const unsigned int i = best_i[k][tx];
            if (i == 0xffffffffu) continue;
            if (v > best || (v == best && i < arg)) {
                best = v;
                arg = i;
            }
        }
        out[pix] = arg;
    }
}
extern "C" __global__ void cim_argmax_channels(const float* x, unsigned int* out, int B, int C,
                                               int HW) {
    argmax_channels(x, out, B, C, HW);
}
extern "C" __global__ void cim_argmax_channels_bf16(const __nv_bfloat16* x, unsigned int* out,
                                                    int B, int C, int HW) {
    argmax_channels(x, out, B, C, HW);
}
extern "C" __global__ void cim_argmax_channels_f16(const __half* x, unsigned int* out, int B,
                                                   int C, int HW) {
    argmax_channels(x, out, B, C, HW);
}

// Argmax over the last dimension of channels-last logits x (rows, C): one warp per row (8 rows per
// block), lane l scanning channels l, l + 32, … (a warp reads 32 adjacent values: coalesced),
// keeping its first maximum; the 32 candidates are combined by value, ties to the lowest channel.
// The sequential scan's result, as argmax_channels: NaNs never win, a NaN in channel 0 gives 0.
template <typename T>
__device__ void argmax_rows(const T* x, unsigned int* out, long long rows, int C) {
    const int lane = threadIdx.x;
    const long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const T* r = x + (size_t)row * C;
    float best = -INFINITY;
    unsigned int arg = 0xffffffffu;
    for (int ch = lane; ch < C; ch += 32) {
        const float v = ld(r, (size_t)ch);
        if (v > best || (arg == 0xffffffffu && v == best)) {
            best = v;
            arg = (unsigned int)ch;
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float v = __shfl_down_sync(0xffffffffu, best, off);
        const unsigned int i = __shfl_down_sync(0xffffffffu, arg, off);
        if (i != 0xffffffffu && (arg == 0xffffffffu || v > best || (v == best && i < arg))) {
            best = v;
            arg = i;
        }
    }
    if (lane == 0) {
        const float first = C > 0 ? ld(r, 0) : 0.0f;
        out[row] = (!(first == first) || arg == 0xffffffffu) ? 0u : arg;
    }
}
extern "C" __global__ void cim_argmax_rows(const float* x, unsigned int* out, long long rows, int C) {
    argmax_rows(x, out, rows, C);
}
extern "C" __global__ void cim_argmax_rows_bf16(const __nv_bfloat16* x, unsigned int* out,
                                                long long rows, int C) {
    argmax_rows(x, out, rows, C);
}
extern "C" __global__ void cim_argmax_rows_f16(const __half* x, unsigned int* out, long long rows,
                                               int C) {
    argmax_rows(x, out, rows, C);
}
