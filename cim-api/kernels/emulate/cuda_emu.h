// A CPU stand-in for the parts of CUDA that cim's flash-attention kernels use, so that their source
// (the `namespace fa` section of ../ops.cu onwards, pasted in by flash_emu.cpp's build) runs here:
// one std::thread per CUDA thread, a barrier for __syncthreads and one per warp for __syncwarp,
// warp shuffles through a per-warp exchange array, and WMMA fragments that hold their whole
// 16×16 tile in every lane (loads and the product computed per lane, stores by lane 0, which the
// kernels follow with __syncwarp or __syncthreads as WMMA requires). Fragment loads and stores
// check WMMA's alignment rules (256-bit pointers, ldm a multiple of 16 bytes). Blocks run one
// after another, so `__shared__` arrays are function statics.
#pragma once
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;

struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = uint32_t(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, as CUDA's
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return {0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {uint16_t(u >> 16)};
}

struct uint4 {
    uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }

struct EmuBlock {
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<float> shfl;
};
inline EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->all->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    emu_block->warps[threadIdx.x >> 5]->arrive_and_wait();
}
inline float __shfl_xor_sync(unsigned, float v, int o) {
    const unsigned lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    float* s = emu_block->shfl.data() + w * 32;
    s[lane] = v;
    __syncwarp();
    const float r = s[lane ^ unsigned(o)];
    __syncwarp();
    return r;
}
inline std::mutex emu_atomic;
inline float atomicAdd(float* p, float v) {
    std::lock_guard<std::mutex> g(emu_atomic);
    const float old = *p;
    *p = old + v;
    return old;
}

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
// The tile as a logical 16×16 matrix: (m, k) for matrix_a, (k, n) for matrix_b, (m, n) else.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    float v[256];
};
template <class F>
inline void fill_fragment(F& f, float x) {
    for (float& e : f.v) e = x;
}
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float to_f(float x) { return x; }
template <class T>
inline void check(const T* p, unsigned ld) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ld * sizeof(T)) % 16 != 0) {
        std::fprintf(stderr, "WMMA alignment violated: pointer %p, ldm %u\n", (const void*)p, ld);
        std::abort();
    }
}
template <class Use, class T>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major>& f, const T* p, unsigned ld) {
    check(p, ld);
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) f.v[i * 16 + j] = to_f(p[i * ld + j]);
}
template <class Use, class T>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, col_major>& f, const T* p, unsigned ld) {
    check(p, ld);
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) f.v[i * 16 + j] = to_f(p[j * ld + i]);
}
template <class A, class B>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const A& a, const B& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
    float out[256];
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            float s = c.v[m * 16 + n];
            for (int k = 0; k < 16; k++) s += a.v[m * 16 + k] * b.v[k * 16 + n];
            out[m * 16 + n] = s;
        }
    std::memcpy(d.v, out, sizeof out);
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ld, layout_t layout) {
    check(p, ld);
    if ((threadIdx.x & 31) != 0) return;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++)
            (layout == mem_row_major ? p[i * ld + j] : p[j * ld + i]) = f.v[i * 16 + j];
}
}  // namespace wmma
}  // namespace nvcuda

// Runs `kernel` on a grid of blocks, one block at a time, one std::thread per CUDA thread.
inline void emu_launch(Dim3 grid, unsigned threads, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = Dim3{threads, 1, 1};
    for (unsigned by = 0; by < grid.y; by++)
        for (unsigned bx = 0; bx < grid.x; bx++) {
            EmuBlock blk;
            blk.all = std::make_unique<std::barrier<>>(threads);
            for (unsigned w = 0; w < (threads + 31) / 32; w++)
                blk.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
            blk.shfl.assign(threads, 0.f);
            emu_block = &blk;
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < threads; t++)
                ts.emplace_back([&, t] {
                    threadIdx = Dim3{t, 0, 0};
                    blockIdx = Dim3{bx, by, 0};
                    kernel();
                });
            for (auto& th : ts) th.join();
        }
}

// The warp sum of ops.cu (defined before the flash section there).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
