// Runs cim's flash-attention CUDA kernels (kernels/ops.cu, `cim_flash_*`) on the CPU through
// cuda_emu.h and checks them against attention computed directly in double precision: the
// log-sum-exp statistics, the output, and d qkv, on bf16 inputs at several shapes (token counts
// that are no multiple of the 64- and 32-row tiles, one and several heads and items). Built and
// run by cim-api's test `flash_kernels_emulated`; `flash_section.inc` is the kernels' source, cut
// from ops.cu by that test. Prints one line per shape; exits 1 when a shape is off.
#include "cuda_emu.h"
#include "flash_section.inc"

#include <random>

namespace {
constexpr int D = 64;

std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& x) {
    std::vector<__nv_bfloat16> out(x.size());
    for (size_t i = 0; i < x.size(); i++) out[i] = __float2bfloat16(x[i]);
    return out;
}

float max_abs_diff(const std::vector<double>& want, const float* got, size_t n, double* scale) {
    double d = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        d = std::max(d, std::fabs(want[i] - got[i]));
        s = std::max(s, std::fabs(want[i]));
    }
    *scale = s;
    return float(d);
}

bool run_case(int b, int n, int h, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> qkv(size_t(b) * n * 3 * h * D), dout(size_t(b) * n * h * D);
    for (float& v : qkv) v = __bfloat162float(__float2bfloat16(0.5f * nd(rng)));
    for (float& v : dout) v = __bfloat162float(__float2bfloat16(nd(rng)));
    const float scale = 0.125f;
    auto at = [&](int bi, int i, int part, int hi) { return ((size_t(bi) * n + i) * 3 + part) * h * D + size_t(hi) * D; };
    auto oat = [&](int bi, int i, int hi) { return (size_t(bi) * n + i) * h * D + size_t(hi) * D; };
    // The reference, in double.
    std::vector<double> lse_ref(size_t(b) * h * n), out_ref(dout.size(), 0.0), dqkv_ref(qkv.size(), 0.0);
    for (int bi = 0; bi < b; bi++)
        for (int hi = 0; hi < h; hi++) {
            std::vector<double> p(size_t(n) * n);
            for (int i = 0; i < n; i++) {
                double m = -INFINITY;
                for (int j = 0; j < n; j++) {
                    double s = 0;
                    for (int e = 0; e < D; e++) s += double(qkv[at(bi, i, 0, hi) + e]) * qkv[at(bi, j, 1, hi) + e];
                    p[size_t(i) * n + j] = s * scale;
                    m = std::max(m, s * scale);
                }
                double l = 0;
                for (int j = 0; j < n; j++) l += std::exp(p[size_t(i) * n + j] - m);
                lse_ref[(size_t(bi) * h + hi) * n + i] = m + std::log(l);
                for (int j = 0; j < n; j++) p[size_t(i) * n + j] = std::exp(p[size_t(i) * n + j] - m) / l;
            }
            for (int i = 0; i < n; i++)
                for (int j = 0; j < n; j++)
                    for (int e = 0; e < D; e++)
                        out_ref[oat(bi, i, hi) + e] += p[size_t(i) * n + j] * qkv[at(bi, j, 2, hi) + e];
            for (int i = 0; i < n; i++) {
                double delta = 0;
                for (int e = 0; e < D; e++) delta += double(dout[oat(bi, i, hi) + e]) * out_ref[oat(bi, i, hi) + e];
                for (int j = 0; j < n; j++) {
                    const double pij = p[size_t(i) * n + j];
                    double dp = 0;
                    for (int e = 0; e < D; e++) dp += double(dout[oat(bi, i, hi) + e]) * qkv[at(bi, j, 2, hi) + e];
                    const double ds = scale * pij * (dp - delta);
                    for (int e = 0; e < D; e++) {
                        dqkv_ref[at(bi, j, 2, hi) + e] += pij * dout[oat(bi, i, hi) + e];
                        dqkv_ref[at(bi, i, 0, hi) + e] += ds * qkv[at(bi, j, 1, hi) + e];
                        dqkv_ref[at(bi, j, 1, hi) + e] += ds * qkv[at(bi, i, 0, hi) + e];
                    }
                }
            }
        }
    // The kernels, launched as src/ops/cuda.rs launches them.
    const auto qkv_b = to_bf16(qkv), dout_b = to_bf16(dout);
    std::vector<__nv_bfloat16> out_b(dout.size()), dqkv_b(qkv.size());
    std::vector<float> lse(lse_ref.size()), delta(lse_ref.size()), dq(dout.size(), 0.f);
    const unsigned tiles = unsigned((n + 63) / 64), bh = unsigned(b * h);
    emu_launch({tiles, bh, 1}, 128, [&] { cim_flash_stats_bf16(qkv_b.data(), lse.data(), n, h, scale); });
    emu_launch({tiles, bh, 1}, 128, [&] { cim_flash_out_bf16(qkv_b.data(), lse.data(), out_b.data(), n, h, scale); });
    const long rows = long(b) * n * h;
    emu_launch({unsigned((rows + 7) / 8), 1, 1}, 256,
               [&] { cim_flash_delta_bf16(out_b.data(), dout_b.data(), delta.data(), rows, n, h); });
    emu_launch({tiles, bh, 1}, 128, [&] {
        cim_flash_bwd_bf16(qkv_b.data(), dout_b.data(), lse.data(), delta.data(), dqkv_b.data(), dq.data(), n, h, scale);
    });
    const long total = long(dout.size());
    emu_launch({unsigned((total + 255) / 256), 1, 1}, 256, [&] { cim_flash_dq_bf16(dq.data(), dqkv_b.data(), total, h); });
    std::vector<float> out_f(out_b.size()), dqkv_f(dqkv_b.size());
    for (size_t i = 0; i < out_b.size(); i++) out_f[i] = __bfloat162float(out_b[i]);
    for (size_t i = 0; i < dqkv_b.size(); i++) dqkv_f[i] = __bfloat162float(dqkv_b[i]);
    double s_lse, s_out, s_dqkv;
    const float d_lse = max_abs_diff(lse_ref, lse.data(), lse.size(), &s_lse);
    const float d_out = max_abs_diff(out_ref, out_f.data(), out_f.size(), &s_out);
    const float d_dqkv = max_abs_diff(dqkv_ref, dqkv_f.data(), dqkv_f.size(), &s_dqkv);
    // bf16 outputs and bf16 probabilities in the products: a few parts in a thousand of the scale.
    const bool ok = d_lse < 1e-3 && d_out < 0.02 * s_out && d_dqkv < 0.03 * s_dqkv;
    std::printf("%s (B %d, N %d, H %d): lse %.2e, out %.2e of %.2e, dqkv %.2e of %.2e\n", ok ? "ok  " : "FAIL", b, n, h,
                d_lse, d_out, s_out, d_dqkv, s_dqkv);
    return ok;
}
}  // namespace

int main() {
    bool ok = true;
    ok &= run_case(1, 5, 1, 1);
    ok &= run_case(2, 70, 2, 2);
    ok &= run_case(1, 197, 2, 3);
    ok &= run_case(1, 130, 1, 4);
    return ok ? 0 : 1;
}
