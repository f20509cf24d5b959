// Runs CUDA kernels of cim (kernels/ops.cu, included whole) on the CPU through cuda_emu.h, launched
// as src/cuda.rs launches them, and checks each against a direct computation:
//   - flash attention (`cim_flash_*`): the log-sum-exp statistics, the output and d qkv against
//     attention in double precision, on bf16 inputs, at token counts that are no multiple of the
//     64- and 32-row tiles, one and several heads and items;
//   - kernels that have not yet passed the GPU parity test that a
//     bf16 ViT-B/16 RESPIX step runs by default: the warp-per-row softmax (forward over the first
//     `valid` columns, backward) and LayerNorm (forward, backward dx and row statistics), the
//     four-per-thread bias + GELU (forward, backward into bf16) and bias add, the row argmax of
//     the dVAE's f16 logits, and the dVAE's channels-last 2×2 max-pool and nearest upsampling;
//   - the kernels of the ResNet-50 enhancer channels last: BatchNorm's column
//     reductions (`cim_bn_*_partials_cl`) and the stem's 3×3 max-pool in either layout.
// Built and run by cim-ops' test `cuda_kernels_emulated`. One line per check; exit 1 when one is off.
#include "cuda_emu.h"
#include "ops.cu"

#include <random>

namespace {
constexpr int D = 64;

std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& x) {
    std::vector<__nv_bfloat16> out(x.size());
    for (size_t i = 0; i < x.size(); i++) out[i] = __float2bfloat16(x[i]);
    return out;
}

// Outputs start as NaN (see `nan_filled`), so an element a kernel never wrote shows as infinitely
// off.
double off(double want, float got) { return std::isnan(got) ? INFINITY : std::fabs(want - got); }

template <class T>
std::vector<T> nan_filled(size_t n);
template <>
std::vector<__nv_bfloat16> nan_filled(size_t n) { return std::vector<__nv_bfloat16>(n, __nv_bfloat16{0x7fc0}); }
template <>
std::vector<__half> nan_filled(size_t n) { return std::vector<__half>(n, __half{0x7e00}); }
template <>
std::vector<float> nan_filled(size_t n) { return std::vector<float>(n, NAN); }

float max_abs_diff(const std::vector<double>& want, const float* got, size_t n, double* scale) {
    double d = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        d = std::max(d, off(want[i], got[i]));
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
    // The kernels, launched as src/cuda.rs launches them.
    const auto qkv_b = to_bf16(qkv), dout_b = to_bf16(dout);
    auto out_b = nan_filled<__nv_bfloat16>(dout.size()), dqkv_b = nan_filled<__nv_bfloat16>(qkv.size());
    auto lse = nan_filled<float>(lse_ref.size()), delta = nan_filled<float>(lse_ref.size());
    std::vector<float> dq(dout.size(), 0.f);  // zeroed by cuda.rs before the atomics
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
    std::printf("%s flash attention (B %d, N %d, H %d): lse %.2e, out %.2e of %.2e, dqkv %.2e of %.2e\n", ok ? "ok  " : "FAIL", b, n, h,
                d_lse, d_out, s_out, d_dqkv, s_dqkv);
    return ok;
}
}  // namespace

// ---- the other kernels ----
namespace {

std::vector<float> randv(size_t n, unsigned seed, float sd = 1.f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, sd);
    std::vector<float> v(n);
    for (float& x : v) x = nd(rng);
    return v;
}
template <class T>
std::vector<T> cast_to(const std::vector<float>& x);
template <>
std::vector<__nv_bfloat16> cast_to(const std::vector<float>& x) { return to_bf16(x); }
template <>
std::vector<__half> cast_to(const std::vector<float>& x) {
    std::vector<__half> out(x.size());
    for (size_t i = 0; i < x.size(); i++) out[i] = __float2half(x[i]);
    return out;
}
float back(__nv_bfloat16 v) { return __bfloat162float(v); }
float back(__half v) { return __half2float(v); }
float back(float v) { return v; }
template <class T>
std::vector<float> floats(const std::vector<T>& x) {
    std::vector<float> out(x.size());
    for (size_t i = 0; i < x.size(); i++) out[i] = back(x[i]);
    return out;
}
// Rounds through T and back: the inputs the kernels see.
template <class T>
std::vector<float> rounded(const std::vector<float>& x) { return floats(cast_to<T>(x)); }

bool report(const char* what, double diff, double tol) {
    const bool ok = diff <= tol;
    std::printf("%s %s: max diff %.2e (tolerance %.1e)\n", ok ? "ok  " : "FAIL", what, diff, tol);
    return ok;
}
double max_diff(const std::vector<double>& want, const std::vector<float>& got) {
    double d = 0;
    for (size_t i = 0; i < want.size(); i++) d = std::max(d, off(want[i], got[i]));
    return d;
}

// Row kernels "_warp": one warp per row, 8 rows per block of 256 (cuda.rs `row_kernel`).
Dim3 warp_rows(int rows) { return {unsigned((rows + 7) / 8), 1, 1}; }

bool softmax_checks() {
    const int rows = 37, d = 200, valid = 197;  // attention's padded scores
    const auto x = rounded<__nv_bfloat16>(randv(size_t(rows) * d, 11, 3.f));
    const auto xb = to_bf16(x);
    auto yb = nan_filled<__nv_bfloat16>(xb.size());
    emu_launch(warp_rows(rows), 256, [&] { cim_softmax_fwd_warp_bf16(xb.data(), yb.data(), rows, d, valid); });
    std::vector<double> want(x.size());
    for (int r = 0; r < rows; r++) {
        double m = -INFINITY, s = 0;
        for (int j = 0; j < valid; j++) m = std::max(m, double(x[size_t(r) * d + j]));
        for (int j = 0; j < valid; j++) s += std::exp(x[size_t(r) * d + j] - m);
        for (int j = 0; j < d; j++) want[size_t(r) * d + j] = j < valid ? std::exp(x[size_t(r) * d + j] - m) / s : 0.0;
    }
    bool ok = report("softmax forward (warp per row, bf16, 197 of 200 columns)", max_diff(want, floats(yb)), 4e-3);
    const auto dy = rounded<__nv_bfloat16>(randv(x.size(), 12));
    const auto dyb = to_bf16(dy);
    auto dxb = nan_filled<__nv_bfloat16>(xb.size());
    emu_launch(warp_rows(rows), 256, [&] { cim_softmax_bwd_warp_bf16(yb.data(), dyb.data(), dxb.data(), rows, d); });
    const auto y = floats(yb);
    std::vector<double> dwant(x.size());
    for (int r = 0; r < rows; r++) {
        double dot = 0;
        for (int j = 0; j < d; j++) dot += double(y[size_t(r) * d + j]) * dy[size_t(r) * d + j];
        for (int j = 0; j < d; j++) dwant[size_t(r) * d + j] = y[size_t(r) * d + j] * (dy[size_t(r) * d + j] - dot);
    }
    ok &= report("softmax backward (warp per row, bf16)", max_diff(dwant, floats(dxb)), 4e-3);
    return ok;
}

bool layer_norm_checks() {
    const int rows = 21, d = 768;
    const float eps = 1e-6f;
    const auto x = rounded<__nv_bfloat16>(randv(size_t(rows) * d, 21, 2.f));
    const auto w = randv(d, 22), b = randv(d, 23);
    const auto xb = to_bf16(x);
    auto yb = nan_filled<__nv_bfloat16>(xb.size());
    emu_launch(warp_rows(rows), 256, [&] { cim_layer_norm_fwd_warp_bf16(xb.data(), w.data(), b.data(), yb.data(), rows, d, eps); });
    std::vector<double> want(x.size()), mean(rows), rstd(rows);
    for (int r = 0; r < rows; r++) {
        double m = 0, v = 0;
        for (int j = 0; j < d; j++) m += x[size_t(r) * d + j];
        m /= d;
        for (int j = 0; j < d; j++) v += (x[size_t(r) * d + j] - m) * (x[size_t(r) * d + j] - m);
        mean[r] = m;
        rstd[r] = 1.0 / std::sqrt(v / d + eps);
        for (int j = 0; j < d; j++) want[size_t(r) * d + j] = (x[size_t(r) * d + j] - m) * rstd[r] * w[j] + b[j];
    }
    double scale = 0;
    for (double v : want) scale = std::max(scale, std::fabs(v));
    bool ok = report("LayerNorm forward (warp per row, bf16, 768 wide)", max_diff(want, floats(yb)), 8e-3 * scale);
    const auto dy = rounded<__nv_bfloat16>(randv(x.size(), 24));
    const auto dyb = to_bf16(dy);
    auto dx = nan_filled<float>(x.size()), stats = nan_filled<float>(2 * size_t(rows));
    emu_launch(warp_rows(rows), 256, [&] {
        cim_layer_norm_bwd_dx_warp_bf16(xb.data(), w.data(), dyb.data(), dx.data(), stats.data(), rows, d, eps);
    });
    std::vector<double> dwant(x.size()), st_want(2 * size_t(rows));
    for (int r = 0; r < rows; r++) {
        double sg = 0, sgx = 0;
        for (int j = 0; j < d; j++) {
            const double g = double(dy[size_t(r) * d + j]) * w[j], xh = (x[size_t(r) * d + j] - mean[r]) * rstd[r];
            sg += g;
            sgx += g * xh;
        }
        sg /= d;
        sgx /= d;
        for (int j = 0; j < d; j++) {
            const double g = double(dy[size_t(r) * d + j]) * w[j], xh = (x[size_t(r) * d + j] - mean[r]) * rstd[r];
            dwant[size_t(r) * d + j] = rstd[r] * (g - sg - xh * sgx);
        }
        st_want[2 * size_t(r)] = mean[r];
        st_want[2 * size_t(r) + 1] = rstd[r];
    }
    ok &= report("LayerNorm backward dx (warp per row, bf16)", max_diff(dwant, dx), 1e-4);
    ok &= report("LayerNorm backward row statistics", max_diff(st_want, stats), 1e-4);
    return ok;
}

double gelu(double z) { return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0))); }
double gelu_grad(double z) {
    return 0.5 * (1.0 + std::erf(z / std::sqrt(2.0))) + z * std::exp(-0.5 * z * z) / std::sqrt(2.0 * M_PI);
}

bool bias_checks() {
    const int rows = 9, d = 3072;
    const long long n4 = (long long)rows * d / 4;
    const int d4 = d / 4;
    const auto x = rounded<__nv_bfloat16>(randv(size_t(rows) * d, 31, 2.f));
    const auto b = randv(d, 32);
    const auto xb = to_bf16(x);
    const Dim3 grid{unsigned((n4 + 255) / 256), 1, 1};
    auto yb = nan_filled<__nv_bfloat16>(xb.size());
    emu_launch(grid, 256, [&] { cim_bias_gelu_fwd_v4_bf16(xb.data(), b.data(), yb.data(), n4, d4); });
    std::vector<double> want(x.size());
    for (size_t i = 0; i < x.size(); i++) want[i] = gelu(double(x[i]) + b[i % d]);
    double scale = 0;
    for (double v : want) scale = std::max(scale, std::fabs(v));
    bool ok = report("bias + GELU forward (4 per thread, bf16)", max_diff(want, floats(yb)), 8e-3 * scale);
    emu_launch(grid, 256, [&] { cim_bias_add_fwd_v4_bf16(xb.data(), b.data(), yb.data(), n4, d4); });
    for (size_t i = 0; i < x.size(); i++) want[i] = double(x[i]) + b[i % d];
    ok &= report("bias add forward (4 per thread, bf16)", max_diff(want, floats(yb)), 8e-3 * 8);
    const auto dy = rounded<__nv_bfloat16>(randv(x.size(), 33));
    const auto dyb = to_bf16(dy);
    auto dxb = nan_filled<__nv_bfloat16>(xb.size());
    emu_launch(grid, 256, [&] { cim_bias_gelu_bwd_dx_bf16_out_v4(xb.data(), b.data(), dyb.data(), dxb.data(), n4, d4); });
    for (size_t i = 0; i < x.size(); i++) want[i] = dy[i] * gelu_grad(double(x[i]) + b[i % d]);
    ok &= report("bias + GELU backward dx (4 per thread, into bf16)", max_diff(want, floats(dxb)), 8e-3 * 5);
    return ok;
}

bool argmax_checks() {
    const int rows = 19, c = 8192;
    const auto x = rounded<__half>(randv(size_t(rows) * c, 41));  // f16: ties happen
    const auto xh = cast_to<__half>(x);
    std::vector<unsigned> got(rows, 12345u);
    // A warp per row, blocks of (32, 8) (cuda.rs `argmax_rows_t`).
    emu_launch({unsigned((rows + 7) / 8), 1, 1}, Dim3{32, 8, 1}, [&] { cim_argmax_rows_f16(xh.data(), got.data(), rows, c); });
    int bad = 0;
    for (int r = 0; r < rows; r++) {
        unsigned best = 0;
        for (int j = 1; j < c; j++)
            if (x[size_t(r) * c + j] > x[size_t(r) * c + best]) best = unsigned(j);
        bad += got[r] != best;
    }
    return report("row argmax of f16 logits (first of equal maxima)", bad, 0);
}

bool nhwc_checks() {
    const int b = 2, h = 6, w = 10, c = 24;
    const auto x = rounded<__half>(randv(size_t(b) * h * w * c, 51));
    const auto xh = cast_to<__half>(x);
    const int ho = h / 2, wo = w / 2;
    // max-pool: one thread per output element; upsample: one per input element (cuda.rs).
    const long long npool = (long long)b * ho * wo * c, nup = (long long)b * h * w * c;
    auto pooled = nan_filled<__half>(npool), up = nan_filled<__half>(size_t(4) * nup);
    emu_launch({unsigned((npool + 255) / 256), 1, 1}, 256, [&] { cim_max_pool_2x2_nhwc_f16(xh.data(), pooled.data(), npool, h, w, ho, wo, c); });
    emu_launch({unsigned((nup + 255) / 256), 1, 1}, 256, [&] { cim_upsample_2x_nhwc_f16(xh.data(), up.data(), nup, h, w, 2 * h, 2 * w, c); });
    auto at = [&](int bi, int y, int xx, int ch) { return x[((size_t(bi) * h + y) * w + xx) * c + ch]; };
    std::vector<double> want_pool(npool), want_up(size_t(4) * nup);
    for (int bi = 0; bi < b; bi++)
        for (int y = 0; y < ho; y++)
            for (int xx = 0; xx < wo; xx++)
                for (int ch = 0; ch < c; ch++)
                    want_pool[((size_t(bi) * ho + y) * wo + xx) * c + ch] =
                        std::max(std::max(at(bi, 2 * y, 2 * xx, ch), at(bi, 2 * y, 2 * xx + 1, ch)),
                                 std::max(at(bi, 2 * y + 1, 2 * xx, ch), at(bi, 2 * y + 1, 2 * xx + 1, ch)));
    for (int bi = 0; bi < b; bi++)
        for (int y = 0; y < 2 * h; y++)
            for (int xx = 0; xx < 2 * w; xx++)
                for (int ch = 0; ch < c; ch++)
                    want_up[((size_t(bi) * 2 * h + y) * 2 * w + xx) * c + ch] = at(bi, y / 2, xx / 2, ch);
    bool ok = report("2×2 max-pool, channels last (f16)", max_diff(want_pool, floats(pooled)), 0);
    ok &= report("nearest 2× upsampling, channels last (f16)", max_diff(want_up, floats(up)), 0);
    return ok;
}
// The channels-first twins (the dVAE with `layout = "nchw"`), odd sides for the pool.
bool nchw_checks() {
    const int b = 2, c = 5, h = 7, w = 9;
    const auto x = rounded<__half>(randv(size_t(b) * c * h * w, 55));
    const auto xh = cast_to<__half>(x);
    const int ho = h / 2, wo = w / 2;
    const long long npool = (long long)b * c * ho * wo, nup = (long long)b * c * h * w;
    auto pooled = nan_filled<__half>(npool), up = nan_filled<__half>(size_t(4) * nup);
    emu_launch({unsigned((npool + 255) / 256), 1, 1}, 256, [&] { cim_max_pool_2x2_f16(xh.data(), pooled.data(), npool, h, w, ho, wo, c); });
    emu_launch({unsigned((nup + 255) / 256), 1, 1}, 256, [&] { cim_upsample_2x_f16(xh.data(), up.data(), nup, h, w, 2 * h, 2 * w, c); });
    auto at = [&](int p, int y, int xx) { return x[(size_t(p) * h + y) * w + xx]; };  // p = b·C + c
    std::vector<double> want_pool(npool), want_up(size_t(4) * nup);
    for (int p = 0; p < b * c; p++) {
        for (int y = 0; y < ho; y++)
            for (int xx = 0; xx < wo; xx++)
                want_pool[(size_t(p) * ho + y) * wo + xx] =
                    std::max(std::max(at(p, 2 * y, 2 * xx), at(p, 2 * y, 2 * xx + 1)),
                             std::max(at(p, 2 * y + 1, 2 * xx), at(p, 2 * y + 1, 2 * xx + 1)));
        for (int y = 0; y < 2 * h; y++)
            for (int xx = 0; xx < 2 * w; xx++) want_up[(size_t(p) * 2 * h + y) * 2 * w + xx] = at(p, y / 2, xx / 2);
    }
    bool ok = report("2×2 max-pool, channels first, odd sides (f16)", max_diff(want_pool, floats(pooled)), 0);
    ok &= report("nearest 2× upsampling, channels first (f16)", max_diff(want_up, floats(up)), 0);
    // The conv epilogue channels first: 4-element words inside one channel plane (H·W % 4 == 0).
    const int cc = 3, hw = 8 * 6;
    const size_t n = size_t(b) * cc * hw;
    const auto xe = rounded<__half>(randv(n, 56));
    const auto bias = rounded<__half>(randv(size_t(cc), 57));
    const auto xeh = cast_to<__half>(xe), bh = cast_to<__half>(bias);
    auto y = nan_filled<__half>(n);
    const long long n4 = (long long)n / 4;
    emu_launch({unsigned((n4 + 255) / 256), 1, 1}, 256, [&] {
        cim_channel_bias_f16(xeh.data(), bh.data(), xeh.data(), y.data(), n4, cc, hw / 4, 1.0f, 0, 1, 0, 0);
    });
    std::vector<double> want(n);
    for (size_t i = 0; i < n; i++)
        want[i] = __half2float(__float2half(std::max(xe[i] + bias[(i / hw) % cc], 0.f)));
    ok &= report("conv epilogue channels first: ReLU(x + b) (f16)", max_diff(want, floats(y)), 0);
    return ok;
}

bool head_copy_checks() {
    // ViT-B/16-like, small: 197 tokens padded to 200 rows per head, 3 heads of 64; 16-byte words.
    const int B = 2, N = 197, H = 3, hd = 64, R = 200;
    const float scale = 0.125f;
    const size_t tok = size_t(B) * N * H * hd, head = size_t(B) * H * R * hd;
    const auto qkv = rounded<__nv_bfloat16>(randv(3 * tok, 61));
    const auto qkvb = to_bf16(qkv);
    auto parts = nan_filled<__nv_bfloat16>(3 * head);
    const long long words = (long long)(3 * head) / 8;
    emu_launch({unsigned((words + 255) / 256), 1, 1}, 256, [&] {
        cim_split_qkv_vec_bf16(qkvb.data(), nullptr, nullptr, parts.data(), words, B, N, H, hd, R, scale);
    });
    std::vector<double> want(3 * head, 0.0);
    for (int s = 0; s < 3; s++)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int t = 0; t < N; t++)
                    for (int d = 0; d < hd; d++) {
                        const double v = qkv[((size_t(b) * N + t) * 3 + s) * H * hd + size_t(h) * hd + d];
                        // part 0 is scaled in f32 and rounded once to bf16
                        want[(((size_t(s) * B + b) * H + h) * R + t) * hd + d] =
                            s == 0 ? __bfloat162float(__float2bfloat16(float(v) * scale)) : v;
                    }
    bool ok = report("split qkv into padded heads (16-byte words, bf16, q scaled)", max_diff(want, floats(parts)), 0);
    // merge_qkv: the three per-head gradients back into the packed layout, part 0 scaled.
    auto merged = nan_filled<__nv_bfloat16>(3 * tok);
    const long long mwords = (long long)(3 * tok) / 8;
    const __nv_bfloat16* pa = parts.data();
    emu_launch({unsigned((mwords + 255) / 256), 1, 1}, 256, [&] {
        cim_merge_qkv_vec_bf16(pa, pa + head, pa + 2 * head, merged.data(), mwords, B, N, H, hd, R, scale);
    });
    std::vector<double> mwant(3 * tok);
    const auto pf = floats(parts);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < N; t++)
            for (int s = 0; s < 3; s++)
                for (int h = 0; h < H; h++)
                    for (int d = 0; d < hd; d++) {
                        const float v = pf[(((size_t(s) * B + b) * H + h) * R + t) * hd + d];
                        mwant[((size_t(b) * N + t) * 3 + s) * H * hd + size_t(h) * hd + d] =
                            s == 0 ? __bfloat162float(__float2bfloat16(v * scale)) : v;
                    }
    ok &= report("merge per-head gradients into packed dqkv (16-byte words, bf16)", max_diff(mwant, floats(merged)), 0);
    // merge_heads: one per-head tensor (B, H, R, hd) into tokens (B, N, H·hd), unscaled.
    auto out = nan_filled<__nv_bfloat16>(tok);
    const long long owords = (long long)tok / 8;
    emu_launch({unsigned((owords + 255) / 256), 1, 1}, 256, [&] {
        cim_merge_heads_vec_bf16(pa, nullptr, nullptr, out.data(), owords, B, N, H, hd, R, 1.0f);
    });
    std::vector<double> owant(tok);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < N; t++)
            for (int h = 0; h < H; h++)
                for (int d = 0; d < hd; d++)
                    owant[((size_t(b) * N + t) * H + h) * hd + d] = pf[((size_t(b) * H + h) * R + t) * hd + d];
    ok &= report("merge heads into tokens (16-byte words, bf16)", max_diff(owant, floats(out)), 0);
    return ok;
}

bool residual_checks() {
    const int rows = 7, d = 768;
    const long long n4 = (long long)rows * d / 4;
    const auto a = rounded<__nv_bfloat16>(randv(size_t(rows) * d, 71));
    const auto bb = rounded<__nv_bfloat16>(randv(size_t(rows) * d, 72));
    const auto bf = randv(size_t(rows) * d, 73);
    const auto bias = randv(d, 74);
    const auto ab = to_bf16(a), bbb = to_bf16(bb);
    auto y = nan_filled<__nv_bfloat16>(a.size());
    const Dim3 grid{unsigned((n4 + 255) / 256), 1, 1};
    emu_launch(grid, 256, [&] { cim_residual_add_bf16(ab.data(), bbb.data(), bias.data(), y.data(), n4, d / 4, 1); });
    std::vector<double> want(a.size());
    for (size_t i = 0; i < a.size(); i++)
        want[i] = __bfloat162float(__float2bfloat16(a[i] + (bb[i] + bias[i % d])));
    bool ok = report("residual add + bias (bf16 + bf16)", max_diff(want, floats(y)), 0);
    emu_launch(grid, 256, [&] { cim_residual_add_bf16_f32(ab.data(), bf.data(), nullptr, y.data(), n4, d / 4, 0); });
    for (size_t i = 0; i < a.size(); i++) want[i] = __bfloat162float(__float2bfloat16(a[i] + bf[i]));
    ok &= report("residual add (bf16 + f32, no bias)", max_diff(want, floats(y)), 0);
    return ok;
}

bool channel_bias_checks() {
    bool ok = true;
    // Channels last at 6 channels (4-element words straddle pixels) and at 12.
    for (int c : {6, 12}) {
        const int b = 2, h = 3, w = 4;
        const size_t n = size_t(b) * h * w * c;
        const auto x = rounded<__half>(randv(n, 81));
        const auto r = rounded<__half>(randv(n, 82));
        const auto bias = rounded<__half>(randv(size_t(c), 83));
        const auto xh = cast_to<__half>(x), rh = cast_to<__half>(r), bh = cast_to<__half>(bias);
        auto y = nan_filled<__half>(2 * n);
        const long long n4 = (long long)n / 4;
        const float g = 0.5f;
        emu_launch({unsigned((n4 + 255) / 256), 1, 1}, 256, [&] {
            cim_channel_bias_f16(xh.data(), bh.data(), rh.data(), y.data(), n4, c, 0, g, 1, 0, 1, 1);
        });
        std::vector<double> want(2 * n);
        for (size_t i = 0; i < n; i++) {
            const float v = g * (x[i] + bias[i % c]) + r[i];
            want[i] = __half2float(__float2half(v));
            want[n + i] = __half2float(__float2half(std::max(v, 0.f)));
        }
        char what[120];
        std::snprintf(what, sizeof what, "conv epilogue channels last, %d channels: g·(x + b) + r, and its ReLU (f16)", c);
        ok &= report(what, max_diff(want, floats(y)), 0);
    }
    return ok;
}
// Training BatchNorm on bf16 maps (the ResNet-50 enhancer in bf16) with its tail (`mode`: 1 a
// ReLU, 2 a residual added before it): statistics, the normalisation, the backward sums and dx
// (and, mode 3, the shortcut's gradient dr). Channels first: 5 items of 4096 pixels, 4 items per
// block, so two chunks, the second partial (cuda.rs `bn_grid`). Channels last: 2500 rows of 40
// channels, tiles of 32 channels and chunks of 2048 rows, both partial (cuda.rs `bn_grid_cl`);
// the elementwise kernels then run with HW = 1.
bool batch_norm_case(bool last, int mode) {
    const int B = last ? 2500 : 5, C = last ? 40 : 2, HW = last ? 1 : 4096;
    const float eps = 1e-5f;
    const size_t n = size_t(B) * C * HW;
    const auto x = rounded<__nv_bfloat16>(randv(n, 91, 2.f));
    const auto dy = rounded<__nv_bfloat16>(randv(n, 92));
    const auto res = rounded<__nv_bfloat16>(randv(n, 96));
    const auto xb = to_bf16(x), dyb = to_bf16(dy), rb = to_bf16(res);
    // Without a residual the kernels get x again (unread).
    const __nv_bfloat16* r = (mode & 2) ? rb.data() : xb.data();
    auto chan = [&](size_t i) { return int((i / HW) % C); };
    const int per_chunk = last ? 2048 : std::min(std::max(16384 / HW, 1), B);
    const int chunks = (B + per_chunk - 1) / per_chunk;
    const Dim3 grid = last ? Dim3{unsigned((C + 31) / 32), unsigned(chunks), 1} : Dim3{unsigned(C), unsigned(chunks), 1};
    const Dim3 block = last ? Dim3{32, 8, 1} : Dim3{256, 1, 1};
    char tag[64];
    std::snprintf(tag, sizeof tag, "%s, mode %d (bf16)", last ? "channels last" : "channels first", mode);
    char what[160];
    std::vector<double> partial(2 * size_t(chunks) * C, NAN);
    auto stats = nan_filled<float>(2 * size_t(C));
    emu_launch(grid, block, [&] {
        if (last) cim_bn_moment_partials_cl_bf16(xb.data(), partial.data(), B, C, per_chunk);
        else cim_bn_moment_partials_bf16(xb.data(), partial.data(), B, C, HW, per_chunk);
    });
    // Without γ and β (the output stands in for them, unread), and with them ahead (below).
    emu_launch({1, 1, 1}, 256, [&] {
        cim_bn_moments_finish(partial.data(), stats.data(), stats.data(), stats.data(), C, chunks, double(B) * HW, 0);
    });
    std::vector<double> mean(C, 0), var(C, 0), st_want(2 * size_t(C));
    for (size_t i = 0; i < n; i++) mean[chan(i)] += x[i];
    for (int c = 0; c < C; c++) mean[c] /= double(B) * HW;
    for (size_t i = 0; i < n; i++) var[chan(i)] += (x[i] - mean[chan(i)]) * (x[i] - mean[chan(i)]);
    for (int c = 0; c < C; c++) {
        var[c] /= double(B) * HW;
        st_want[c] = mean[c];
        st_want[C + c] = var[c];
    }
    bool ok = true;
    if (mode == 0) {
        std::snprintf(what, sizeof what, "BatchNorm moments [mean; biased var], %s", tag);
        ok &= report(what, max_diff(st_want, stats), 1e-5);
    }
    const auto gamma = randv(C, 93), beta = randv(C, 94);
    std::vector<float> p4(4 * size_t(C));
    for (int c = 0; c < C; c++) {
        p4[c] = gamma[c];
        p4[C + c] = beta[c];
        p4[2 * C + c] = stats[c];
        p4[3 * C + c] = stats[C + c];
    }
    if (mode == 0) {
        // [γ; β; mean; var] in one buffer (`channel_moments_affine`): the head copied, then the
        // same statistics.
        auto with_head = nan_filled<float>(4 * size_t(C));
        emu_launch({1, 1, 1}, 256, [&] {
            cim_bn_moments_finish(partial.data(), gamma.data(), beta.data(), with_head.data(), C, chunks, double(B) * HW, 1);
        });
        std::vector<double> p4d(p4.begin(), p4.end());
        std::snprintf(what, sizeof what, "BatchNorm [γ; β; mean; var] in one buffer, %s", tag);
        ok &= report(what, max_diff(p4d, with_head), 0);
    }
    auto y = nan_filled<__nv_bfloat16>(n);
    const Dim3 per_el{unsigned((n + 255) / 256), 1, 1};
    emu_launch(per_el, 256, [&] { cim_batch_norm_fwd_bf16(xb.data(), p4.data(), r, y.data(), (long long)n, C, HW, eps, mode); });
    // The reference: the tail's pre-activation and the gradient through its ReLU, in double.
    std::vector<double> y_want(n), xhat(n), g(n);
    double scale = 0, near = 0;
    for (size_t i = 0; i < n; i++) {
        const int c = chan(i);
        xhat[i] = (x[i] - mean[c]) / std::sqrt(var[c] + eps);
        double pre = xhat[i] * gamma[c] + beta[c] + ((mode & 2) ? res[i] : 0.0);
        y_want[i] = (mode & 1) ? std::max(pre, 0.0) : pre;
        g[i] = ((mode & 1) && pre <= 0.0) ? 0.0 : dy[i];
        scale = std::max(scale, std::fabs(y_want[i]));
        // Pre-activations within rounding of 0 may take the other side of the mask.
        if ((mode & 1) && std::fabs(pre) < 1e-5) near += std::fabs(dy[i]);
    }
    std::snprintf(what, sizeof what, "BatchNorm normalisation and tail, %s", tag);
    ok &= report(what, max_diff(y_want, floats(y)), 8e-3 * scale);
    // Four per thread (the default where sizes allow): the same values, bit for bit.
    auto y4 = nan_filled<__nv_bfloat16>(n);
    const Dim3 per_four{unsigned((n / 4 + 255) / 256), 1, 1};
    emu_launch(per_four, 256, [&] { cim_batch_norm_fwd_v4_bf16(xb.data(), p4.data(), r, y4.data(), (long long)n / 4, C, HW, eps, mode); });
    std::vector<double> y_scalar(n);
    for (size_t i = 0; i < n; i++) y_scalar[i] = __bfloat162float(y[i]);
    std::snprintf(what, sizeof what, "BatchNorm normalisation and tail, 4 per thread = 1 per thread, %s", tag);
    ok &= report(what, max_diff(y_scalar, floats(y4)), 0);
    // [γ; β; mean; var; dγ; dβ] (6, C): the parameters copied ahead of the sums.
    auto p6 = nan_filled<float>(6 * size_t(C));
    std::fill(partial.begin(), partial.end(), NAN);
    emu_launch(grid, block, [&] {
        if (last) cim_bn_grad_partials_cl_bf16(xb.data(), dyb.data(), r, p4.data(), partial.data(), B, C, per_chunk, eps, mode);
        else cim_bn_grad_partials_bf16(xb.data(), dyb.data(), r, p4.data(), partial.data(), B, C, HW, per_chunk, eps, mode);
    });
    emu_launch({1, 1, 1}, 256, [&] { cim_bn_grad_finish(partial.data(), p4.data(), p6.data(), C, chunks); });
    const std::vector<float> sums(p6.begin() + 4 * C, p6.end());
    std::vector<double> p4d(p4.begin(), p4.end());
    const std::vector<float> head(p6.begin(), p6.begin() + 4 * C);
    std::snprintf(what, sizeof what, "BatchNorm backward: parameters copied ahead of the sums, %s", tag);
    ok &= report(what, max_diff(p4d, head), 0);
    std::vector<double> sums_want(2 * size_t(C), 0.0);
    for (size_t i = 0; i < n; i++) {
        sums_want[chan(i)] += g[i] * xhat[i];
        sums_want[C + chan(i)] += g[i];
    }
    std::snprintf(what, sizeof what, "BatchNorm backward sums [dγ; dβ], %s", tag);
    ok &= report(what, max_diff(sums_want, sums), 1e-2 + 2 * near);
    auto dx = nan_filled<__nv_bfloat16>(n), dr = nan_filled<__nv_bfloat16>(mode == 3 ? n : 1);
    emu_launch(per_el, 256, [&] {
        cim_bn_dx_bf16(xb.data(), dyb.data(), r, p6.data(), dx.data(), dr.data(), (long long)n, C, HW, float(B) * HW, eps, mode);
    });
    std::vector<double> dx_want(n);
    const double count = double(B) * HW;
    double dscale = 0;
    for (size_t i = 0; i < n; i++) {
        const int c = chan(i);
        dx_want[i] = gamma[c] / std::sqrt(var[c] + eps) *
                     (g[i] - sums_want[C + c] / count - xhat[i] * sums_want[c] / count);
        dscale = std::max(dscale, std::fabs(dx_want[i]));
    }
    // dx and dr elementwise: the mask may flip only where the pre-activation is within rounding
    // of 0, so compare the elements away from there.
    auto masked_diff = [&](const std::vector<double>& want, const std::vector<float>& got) {
        double d = 0;
        for (size_t i = 0; i < n; i++) {
            const int c = chan(i);
            const double pre = xhat[i] * gamma[c] + beta[c] + ((mode & 2) ? res[i] : 0.0);
            if ((mode & 1) && std::fabs(pre) < 1e-5) continue;
            d = std::max(d, off(want[i], got[i]));
        }
        return d;
    };
    std::snprintf(what, sizeof what, "BatchNorm backward dx, %s", tag);
    ok &= report(what, masked_diff(dx_want, floats(dx)), 8e-3 * dscale);
    auto dx4 = nan_filled<__nv_bfloat16>(n), dr4 = nan_filled<__nv_bfloat16>(mode == 3 ? n : 1);
    emu_launch(per_four, 256, [&] {
        cim_bn_dx_v4_bf16(xb.data(), dyb.data(), r, p6.data(), dx4.data(), dr4.data(), (long long)n / 4, C, HW, float(B) * HW, eps, mode);
    });
    std::vector<double> dx_scalar(n);
    for (size_t i = 0; i < n; i++) dx_scalar[i] = __bfloat162float(dx[i]);
    std::snprintf(what, sizeof what, "BatchNorm backward dx, 4 per thread = 1 per thread, %s", tag);
    ok &= report(what, max_diff(dx_scalar, floats(dx4)), 0);
    if (mode == 3) {
        std::vector<double> dr_scalar(n);
        for (size_t i = 0; i < n; i++) dr_scalar[i] = __bfloat162float(dr[i]);
        ok &= report("BatchNorm backward dr, 4 per thread = 1 per thread", max_diff(dr_scalar, floats(dr4)), 0);
    }
    if (mode == 3) {
        std::snprintf(what, sizeof what, "BatchNorm backward dr (the shortcut), %s", tag);
        ok &= report(what, masked_diff(g, floats(dr)), 0);
    }
    if (!last && mode == 0) {
    // The running statistics, in place: r = keep·r + add·x.
        auto r = randv(2 * size_t(C), 95);
        const auto r0 = r;
        emu_launch({1, 1, 1}, 256, [&] { cim_running_average(r.data(), stats.data(), 2LL * C, 0.9f, 0.1f * 1.0001f); });
        std::vector<double> r_want(r.size());
        for (size_t i = 0; i < r.size(); i++) r_want[i] = 0.9 * r0[i] + 0.1 * 1.0001 * stats[i];
        ok &= report("BatchNorm running average (in place)", max_diff(r_want, r), 1e-6);
    }
    return ok;
}
bool batch_norm_checks() {
    bool ok = true;
    for (int mode : {0, 3}) ok &= batch_norm_case(false, mode);
    for (int mode : {0, 1, 3}) ok &= batch_norm_case(true, mode);
    return ok;
}
// Convolution filters (O, C, k, k) ↔ cuDNN's channels-last (O, k, k, C) with their casts (the
// trainable channels-last convolution's weight and dw): every element where the permutation puts
// it, rounded once.
bool filter_layout_checks() {
    const int O = 6, C = 5, k = 3, kk = k * k;
    const size_t n = size_t(O) * C * kk;
    const auto w = randv(n, 141);
    auto kcrs = [&](int o, int c, int q) { return (size_t(o) * C + c) * kk + q; };
    auto krsc = [&](int o, int c, int q) { return (size_t(o) * kk + q) * C + c; };
    std::vector<double> want_bf16(n), want_f32(n);
    for (int o = 0; o < O; o++)
        for (int c = 0; c < C; c++)
            for (int q = 0; q < kk; q++) {
                want_f32[krsc(o, c, q)] = w[kcrs(o, c, q)];
                want_bf16[krsc(o, c, q)] = __bfloat162float(__float2bfloat16(w[kcrs(o, c, q)]));
            }
    const Dim3 grid{unsigned((n + 255) / 256), 1, 1};
    auto to16 = nan_filled<__nv_bfloat16>(n);
    auto to32 = nan_filled<float>(n);
    emu_launch(grid, 256, [&] { cim_filter_to_krsc_f32_bf16(w.data(), to16.data(), (long long)n, C, kk); });
    emu_launch(grid, 256, [&] { cim_filter_to_krsc_f32_f32(w.data(), to32.data(), (long long)n, C, kk); });
    bool ok = report("filter (O, C, k, k) → (O, k, k, C), f32 → bf16", max_diff(want_bf16, floats(to16)), 0);
    ok &= report("filter (O, C, k, k) → (O, k, k, C), f32", max_diff(want_f32, to32), 0);
    // And back: the bf16 channels-last filter (a dw) to f32 (O, C, k, k), and f32 → f32.
    auto back16 = nan_filled<float>(n), back32 = nan_filled<float>(n);
    emu_launch(grid, 256, [&] { cim_filter_from_krsc_bf16_f32(to16.data(), back16.data(), (long long)n, C, kk); });
    emu_launch(grid, 256, [&] { cim_filter_from_krsc_f32_f32(to32.data(), back32.data(), (long long)n, C, kk); });
    std::vector<double> w16(n), w32(w.begin(), w.end());
    for (size_t i = 0; i < n; i++) w16[i] = __bfloat162float(__float2bfloat16(w[i]));
    ok &= report("filter (O, k, k, C) → (O, C, k, k), bf16 → f32", max_diff(w16, back16), 0);
    ok &= report("filter (O, k, k, C) → (O, C, k, k), f32", max_diff(w32, back32), 0);
    return ok;
}

// Cross-entropy over bf16 logits (the mixed-precision generator's): the per-row loss in f32 and
// (softmax − one-hot)·g written in bf16, one block of 256 per row (cuda.rs `per_row`), 1000
// columns (no multiple of the block).
bool cross_entropy_checks() {
    const int rows = 9, v = 1000;
    const auto x = rounded<__nv_bfloat16>(randv(size_t(rows) * v, 131, 3.f));
    const auto xb = to_bf16(x);
    std::vector<unsigned int> t(rows);
    for (int r = 0; r < rows; r++) t[r] = unsigned((r * 337) % v);
    std::vector<float> g(rows);
    for (int r = 0; r < rows; r++) g[r] = 0.5f + 0.1f * r;
    auto loss = nan_filled<float>(rows);
    auto dx = nan_filled<__nv_bfloat16>(size_t(rows) * v);
    emu_launch({unsigned(rows), 1, 1}, 256, [&] { cim_cross_entropy_fwd_bf16(xb.data(), t.data(), loss.data(), rows, v); });
    emu_launch({unsigned(rows), 1, 1}, 256, [&] { cim_cross_entropy_bwd_bf16(xb.data(), t.data(), g.data(), dx.data(), rows, v); });
    std::vector<double> loss_want(rows), dx_want(size_t(rows) * v);
    for (int r = 0; r < rows; r++) {
        const float* xr = &x[size_t(r) * v];
        double m = -INFINITY, s = 0;
        for (int j = 0; j < v; j++) m = std::max(m, double(xr[j]));
        for (int j = 0; j < v; j++) s += std::exp(xr[j] - m);
        loss_want[r] = m + std::log(s) - xr[t[r]];
        for (int j = 0; j < v; j++)
            dx_want[size_t(r) * v + j] = (std::exp(xr[j] - m) / s - (j == int(t[r]) ? 1.0 : 0.0)) * g[r];
    }
    bool ok = report("cross-entropy forward over bf16 logits", max_diff(loss_want, loss), 1e-4);
    // One bf16 rounding of entries up to |g| ≤ 1.3.
    ok &= report("cross-entropy backward into bf16", max_diff(dx_want, floats(dx)), 1.3 * 0x1p-8);
    return ok;
}

// The stem's MaxPool2d(3, 2, 1): channels first in f32 (cl = 0) and channels last in bf16 (cl = C),
// forward and backward, against the window maximum (first in row-major order) written out. Odd
// height, even width: the last windows are cut by the edge.
bool max_pool_checks() {
    const int B = 2, C = 5, H = 9, W = 8, Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
    const size_t n = size_t(B) * C * H * W, no = size_t(B) * C * Ho * Wo;
    bool ok = true;
    for (const bool last : {false, true}) {
        // Values on a coarse grid so that windows hold ties (the first maximum wins).
        auto xv = randv(n, 121);
        for (float& v : xv) v = std::round(v * 2.f) / 2.f;
        const auto gv = rounded<__nv_bfloat16>(randv(no, 122));
        auto at = [&](int b, int c, int y, int x, int h, int w) {
            return last ? ((size_t(b) * h + y) * w + x) * C + c : ((size_t(b) * C + c) * h + y) * w + x;
        };
        std::vector<double> y_want(no), dx_want(n, 0.0);
        for (int b = 0; b < B; b++)
            for (int c = 0; c < C; c++)
                for (int oy = 0; oy < Ho; oy++)
                    for (int ox = 0; ox < Wo; ox++) {
                        size_t best = SIZE_MAX;
                        for (int iy = std::max(2 * oy - 1, 0); iy < std::min(2 * oy + 2, H); iy++)
                            for (int ix = std::max(2 * ox - 1, 0); ix < std::min(2 * ox + 2, W); ix++) {
                                const size_t i = at(b, c, iy, ix, H, W);
                                if (best == SIZE_MAX || xv[i] > xv[best]) best = i;
                            }
                        const size_t o = at(b, c, oy, ox, Ho, Wo);
                        y_want[o] = xv[best];
                        dx_want[best] += gv[o];
                    }
        const int cl = last ? C : 0;
        const long long planes = (long long)B * C;
        if (last) {
            const auto xb = to_bf16(xv), gb = to_bf16(gv);
            auto y = nan_filled<__nv_bfloat16>(no);
            auto dx = nan_filled<__nv_bfloat16>(n);
            emu_launch({unsigned((no + 255) / 256), 1, 1}, 256, [&] { cim_max_pool_fwd_bf16(xb.data(), y.data(), planes, H, W, Ho, Wo, cl); });
            emu_launch({unsigned((n + 255) / 256), 1, 1}, 256, [&] { cim_max_pool_bwd_bf16(xb.data(), gb.data(), dx.data(), planes, H, W, Ho, Wo, cl); });
            ok &= report("max-pool 3×3/2 forward, channels last (bf16)", max_diff(y_want, floats(y)), 0);
            // Up to four gradients meet at one pixel, summed in f32 and rounded once.
            ok &= report("max-pool 3×3/2 backward, channels last (bf16)", max_diff(dx_want, floats(dx)), 2e-2);
        } else {
            auto y = nan_filled<float>(no), dx = nan_filled<float>(n);
            emu_launch({unsigned((no + 255) / 256), 1, 1}, 256, [&] { cim_max_pool_fwd(xv.data(), y.data(), planes, H, W, Ho, Wo, cl); });
            emu_launch({unsigned((n + 255) / 256), 1, 1}, 256, [&] { cim_max_pool_bwd(xv.data(), gv.data(), dx.data(), planes, H, W, Ho, Wo, cl); });
            ok &= report("max-pool 3×3/2 forward, channels first (f32)", max_diff(y_want, y), 0);
            ok &= report("max-pool 3×3/2 backward, channels first (f32)", max_diff(dx_want, dx), 1e-6);
        }
    }
    return ok;
}
bool relu_checks() {
    const size_t n = 4 * 1000 + 4;
    auto xv = randv(n, 101);
    xv[5] = 0.f;  // the gradient at 0 is 0 (PyTorch's rule)
    const auto x = rounded<__nv_bfloat16>(xv);
    const auto g = rounded<__nv_bfloat16>(randv(n, 102));
    const auto xb = to_bf16(x), gb = to_bf16(g);
    auto y = nan_filled<__nv_bfloat16>(n), dx = nan_filled<__nv_bfloat16>(n);
    const long long n4 = (long long)n / 4;
    const Dim3 grid{unsigned((n4 + 255) / 256), 1, 1};
    emu_launch(grid, 256, [&] { cim_relu_fwd_v4_bf16(xb.data(), y.data(), n4); });
    emu_launch(grid, 256, [&] { cim_relu_bwd_v4_bf16(xb.data(), gb.data(), dx.data(), n4); });
    std::vector<double> want_y(n), want_dx(n);
    for (size_t i = 0; i < n; i++) {
        want_y[i] = std::max(x[i], 0.f);
        want_dx[i] = x[i] > 0.f ? g[i] : 0.0;
    }
    bool ok = report("ReLU forward (4 per thread, bf16)", max_diff(want_y, floats(y)), 0);
    ok &= report("ReLU backward dy·[x > 0] (4 per thread, bf16)", max_diff(want_dx, floats(dx)), 0);
    return ok;
}
}  // namespace

int main() {
    bool ok = true;
    ok &= run_case(1, 5, 1, 1);
    ok &= run_case(2, 70, 2, 2);
    ok &= run_case(1, 197, 2, 3);
    ok &= run_case(1, 130, 1, 4);
    ok &= softmax_checks();
    ok &= layer_norm_checks();
    ok &= bias_checks();
    ok &= argmax_checks();
    ok &= nhwc_checks();
    ok &= nchw_checks();
    ok &= head_copy_checks();
    ok &= residual_checks();
    ok &= channel_bias_checks();
    ok &= batch_norm_checks();
    ok &= relu_checks();
    ok &= max_pool_checks();
    ok &= cross_entropy_checks();
    ok &= filter_layout_checks();
    return ok ? 0 : 1;
}
