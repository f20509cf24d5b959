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
inline thread_local unsigned emu_tid;  // the linear thread index (x fastest), as CUDA forms warps
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

struct __half {
    uint16_t bits;
};
inline float __half2float(__half h) {
    const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1f,
                   man = h.bits & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal
            float f = std::ldexp(float(man), -24);
            std::memcpy(&u, &f, 4);
            u |= sign;
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __half __float2half(float f) {  // round to nearest even
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    if (std::isnan(f)) return {uint16_t(sign | 0x7e00u)};
    const float a = std::fabs(f);
    if (a >= 65520.f) return {uint16_t(sign | 0x7c00u)};
    if (a < 6.103515625e-05f) {  // subnormal half: multiples of 2^-24
        const float q = std::nearbyint(a * 16777216.f);
        return {uint16_t(sign | uint16_t(q))};
    }
    int e;
    const float m = std::frexp(a, &e);  // a = m·2^e, m in [0.5, 1)
    float q = std::nearbyint(m * 2048.f);  // 11 significant bits
    if (q == 2048.f) {
        q = 1024.f;
        e += 1;
    }
    return {uint16_t(sign | uint16_t((e + 14) << 10) | (uint16_t(q) & 0x3ffu))};
}

struct uint4 {
    uint32_t x, y, z, w;
};
struct uint2 {
    uint32_t x, y;
};
struct float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
inline uint2 make_uint2(uint32_t a, uint32_t b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
// CUDA's integer and float min/max overloads.
template <class A, class B>
inline auto min(A a, B b) -> decltype(a + b) { return a < b ? a : b; }
template <class A, class B>
inline auto max(A a, B b) -> decltype(a + b) { return a < b ? b : a; }

struct EmuBlock {
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> shfl;
};
inline thread_local EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->all->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    emu_block->warps[emu_tid >> 5]->arrive_and_wait();
}
// Warp shuffles through the warp's exchange slots (any 4- or 8-byte type).
template <class T>
inline T emu_shuffle(T v, unsigned (*src)(unsigned lane, unsigned arg), unsigned arg) {
    static_assert(sizeof(T) <= 8);
    const unsigned lane = emu_tid & 31, w = emu_tid >> 5;
    uint64_t* s = emu_block->shfl.data() + w * 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    s[lane] = bits;
    __syncwarp();
    const unsigned from = src(lane, arg);
    T r = v;
    if (from < 32) std::memcpy(&r, &s[from], sizeof(T));
    __syncwarp();
    return r;
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
    return emu_shuffle(v, [](unsigned lane, unsigned a) { return lane ^ a; }, unsigned(o));
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned o) {
    return emu_shuffle(v, [](unsigned lane, unsigned a) { return lane + a < 32 ? lane + a : 32u; }, o);
}
inline std::mutex emu_atomic;
template <class T>
inline T atomicAdd(T* p, T v) {
    std::lock_guard<std::mutex> g(emu_atomic);
    const T old = *p;
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
    if ((emu_tid & 31) != 0) return;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++)
            (layout == mem_row_major ? p[i * ld + j] : p[j * ld + i]) = f.v[i * 16 + j];
}
}  // namespace wmma
}  // namespace nvcuda

// Runs `kernel` on a grid of blocks, one block at a time: one std::thread per CUDA thread of a
// block, the same threads for every block, all of a block finished before the next one starts
// (its `__shared__` arrays are statics, shared by every block).
inline void emu_launch(Dim3 grid, Dim3 block, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    const unsigned threads = block.x * block.y * block.z;
    const size_t blocks = size_t(grid.x) * grid.y;
    std::vector<EmuBlock> state(blocks);
    for (EmuBlock& blk : state) {
        blk.all = std::make_unique<std::barrier<>>(threads);
        for (unsigned w = 0; w < (threads + 31) / 32; w++)
            blk.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
        blk.shfl.assign(threads, 0);
    }
    std::barrier<> block_done(threads);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; t++)
        ts.emplace_back([&, t] {
            emu_tid = t;
            threadIdx = Dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            for (size_t bi = 0; bi < blocks; bi++) {
                EmuBlock& blk = state[bi];
                emu_block = &blk;
                blockIdx = Dim3{unsigned(bi % grid.x), unsigned(bi / grid.x), 0};
                kernel();
                // A thread that has returned no longer takes part in the block's barriers (as on
                // a GPU, where the kernels return early for rows past the end, warp by warp).
                blk.warps[t >> 5]->arrive_and_drop();
                blk.all->arrive_and_drop();
                block_done.arrive_and_wait();
            }
        });
    for (auto& th : ts) th.join();
}

// A one-dimensional block of `threads`.
inline void emu_launch(Dim3 grid, unsigned threads, const std::function<void()>& kernel) {
    emu_launch(grid, Dim3{threads, 1, 1}, kernel);
}
