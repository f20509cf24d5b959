//! GPU parity of the fused CUDA kernels against their CPU twins (values and gradients).
//! Exists only in `--features cuda` builds and needs a GPU: run on the GPU machine with
//! `cargo test -p cim-ops --features cuda --test ops_cuda` (or a test binary built elsewhere).
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor, Var};
use cim_ops as ops;

fn randn(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// `(f(inputs), gradients of sum(f(inputs) · up))` on `dev`.
fn run(
    dev: &Device,
    f: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    up: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let g = (&y * up.to_device(dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    (y, vars.iter().map(|v| g.get(v).unwrap().clone()).collect())
}

/// One GPU-against-CPU parity check.
type Check = fn(&Device);

/// Every parity check below, each run even when an earlier one failed (a device call is short:
/// one run should name every kernel that disagrees); prints `ok`/`FAIL` per check.
#[test]
fn cuda_kernels_match_the_cpu_kernels() {
    // Opened as cim-run opens it: no per-buffer events, freed memory kept in the pool.
    let gpu = cim_ops::device::open_cuda(0, true).expect("this test needs a CUDA GPU");
    ops::set_cuda_kernels(true);
    let checks: Vec<(&str, Check)> = vec![
        ("layer_norm, softmax, cross_entropy", row_kernels_parity),
        ("respix", respix_parity),
        ("adamw", adamw_parity),
        ("adamw_multi + sum_of_squares", adamw_multi_parity),
        ("attention", attention_parity),
        ("batch_norm", batch_norm_parity),
        ("max_pool", max_pool_parity),
        ("bias_gelu", bias_gelu_parity),
        ("conv", conv_parity),
        ("mixed_conv", mixed_conv_parity),
        ("channel_bias + resampling", channel_bias_parity),
        ("bf16", bf16_parity),
        ("block", block_parity),
        ("select_rows", select_rows_parity),
        ("residual_add", residual_add_parity),
        ("head copies, padded", head_copies_parity),
        ("argmax_channels", argmax_parity),
        ("running_average", running_average_parity),
        ("device pool high-water mark", pool_peak_check),
        ("flash attention (bf16, heads of 64)", flash_parity),
        ("relu (f32, bf16)", relu_parity),
        (
            "channels last: channel_bias, resampling, argmax",
            channels_last_parity,
        ),
        (
            "channels last: batch_norm, its fused tails, max_pool (f32, bf16)",
            channels_last_train_parity,
        ),
    ];
    #[cfg(feature = "cudnn")]
    let checks = [
        checks,
        vec![
            ("cudnn_conv", cudnn_conv_parity as Check),
            ("cudnn_conv channels last", cudnn_nhwc_parity as Check),
            (
                "cudnn_conv channels last, trainable",
                cudnn_nhwc_train_parity as Check,
            ),
        ],
    ]
    .concat();
    let mut failed = vec![];
    for (name, check) in checks {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&gpu)));
        // A failed check may leave a switch on.
        ops::set_cuda_kernels(true);
        ops::set_cudnn_conv(false);
        match result {
            Ok(()) => println!("ok   {name}"),
            Err(_) => {
                println!("FAIL {name} (its panic message is above)");
                failed.push(name);
            }
        }
    }
    ops::set_cuda_kernels(false);
    assert!(failed.is_empty(), "GPU parity failed for: {failed:?}");
}

/// LayerNorm, softmax and cross-entropy (the row kernels) on GPU against CPU.
fn row_kernels_parity(gpu: &Device) {
    let cpu = Device::Cpu;
    // LayerNorm at ViT-B width over 3·197 rows and a narrow odd width (the warp-per-row
    // kernels), and rows wider than 2048 (the block-per-row kernels).
    for (rows, d) in [(3 * 197, 768), (37, 33), (5, 3000)] {
        let x = randn(&[rows, d], 1, &cpu);
        let w = randn(&[d], 2, &cpu);
        let b = randn(&[d], 3, &cpu);
        let up = randn(&[rows, d], 4, &cpu);
        let f = |t: &[Tensor]| ops::layer_norm(&t[0], &t[1], &t[2], 1e-6).unwrap();
        let (yc, gc) = run(&cpu, &f, &[x.clone(), w.clone(), b.clone()], &up);
        let (yg, gg) = run(gpu, &f, &[x, w, b], &up);
        assert!(max_diff(&yc, &yg) < 1e-4, "layer_norm value ({rows}×{d})");
        for (i, (a, b)) in gc.iter().zip(&gg).enumerate() {
            // dw, db sum over rows: their rounding grows with the row count.
            let tol = if i == 0 { 1e-3 } else { 1e-4 * rows as f32 };
            let d = max_diff(a, b);
            assert!(d < tol, "layer_norm grad {i} ({rows}×{d}): {d}");
        }
    }
    // Softmax over attention rows (the warp-per-row kernels), a short odd width, and rows
    // longer than 1024 (the block-per-row kernels).
    for shape in [[2, 4, 197, 197], [3, 1, 5, 7], [2, 1, 3, 3000]] {
        let x = randn(&shape, 5, &cpu);
        let up = randn(&shape, 6, &cpu);
        let f = |t: &[Tensor]| ops::softmax_last_dim(&t[0]).unwrap();
        let (yc, gc) = run(&cpu, &f, std::slice::from_ref(&x), &up);
        let (yg, gg) = run(gpu, &f, std::slice::from_ref(&x), &up);
        assert!(max_diff(&yc, &yg) < 1e-5, "softmax value {shape:?}");
        assert!(max_diff(&gc[0], &gg[0]) < 1e-4, "softmax grad {shape:?}");
    }
    // (The bf16 softmax kernels run inside GEMM attention: `attention_parity` checks them.)
    // Cross-entropy over an 8192-token vocabulary.
    let x = randn(&[230, 8192], 7, &cpu);
    let t: Vec<u32> = (0..230).map(|i| (i * 131 % 8192) as u32).collect();
    let (tc, tg) = (
        Tensor::new(t.as_slice(), &cpu).unwrap(),
        Tensor::new(t.as_slice(), gpu).unwrap(),
    );
    let xc = Var::from_tensor(&x).unwrap();
    let xg = Var::from_tensor(&x.to_device(gpu).unwrap()).unwrap();
    let lc = ops::cross_entropy(&xc, &tc).unwrap();
    let lg = ops::cross_entropy(&xg, &tg).unwrap();
    assert!(max_diff(&lc, &lg) < 1e-4, "cross-entropy value");
    let (gc, gg) = (lc.backward().unwrap(), lg.backward().unwrap());
    assert!(
        max_diff(gc.get(&xc).unwrap(), gg.get(&xg).unwrap()) < 1e-6,
        "cross-entropy grad"
    );
    // bf16 logits (the mixed-precision generator's): read in bf16, the gradient written in bf16,
    // against the f32 kernels on the same rounded logits.
    use candle_core::DType;
    let xr = x.to_dtype(DType::BF16).unwrap();
    let xc = Var::from_tensor(&xr.to_dtype(DType::F32).unwrap()).unwrap();
    let xg = Var::from_tensor(&xr.to_device(gpu).unwrap()).unwrap();
    let lc = ops::cross_entropy(&xc, &tc).unwrap();
    let lg = ops::cross_entropy(&xg, &tg).unwrap();
    assert!(max_diff(&lc, &lg) < 1e-4, "bf16 cross-entropy value");
    let (gc, gg) = (lc.backward().unwrap(), lg.backward().unwrap());
    let g = gg.get(&xg).unwrap();
    assert_eq!(
        g.dtype(),
        DType::BF16,
        "the gradient of bf16 logits is bf16"
    );
    // Each gradient entry is rounded to bf16 once (|entries| ≤ 1/230).
    let d = max_diff(gc.get(&xc).unwrap(), &g.to_dtype(DType::F32).unwrap());
    assert!(d < 2e-5, "bf16 cross-entropy grad: {d}");
}

/// RESPIX target (224 px, k = 8) and loss (ViT-B/16 layout) on GPU against CPU.
fn respix_parity(gpu: &Device) {
    let cpu = Device::Cpu;
    let img = randn(&[2, 3, 224, 224], 8, &cpu).affine(0.2, 0.5).unwrap();
    let tc = ops::respix_sliding_target(&img, 8, 1e-6).unwrap().unwrap();
    let tg = ops::respix_sliding_target(&img.to_device(gpu).unwrap(), 8, 1e-6)
        .unwrap()
        .expect("CUDA kernels are on");
    assert!(max_diff(&tc, &tg) < 1e-3, "respix target");
    let pred = randn(&[2, 196, 768], 9, &cpu);
    let up = Tensor::new(1.5f32, &cpu).unwrap();
    let f = |t: &[Tensor]| {
        let target = t[1].detach();
        ops::respix_loss(&t[0], &target, 16).unwrap().unwrap()
    };
    let (lc, gc) = run_first(&cpu, &f, &[pred.clone(), tc.clone()], &up);
    let (lg, gg) = run_first(gpu, &f, &[pred, tc], &up);
    assert!(max_diff(&lc, &lg) < 1e-3, "respix loss value");
    assert!(max_diff(&gc, &gg) < 1e-7, "respix loss grad");
}

/// Like [`run`], for a scalar output and the gradient of the first input only.
fn run_first(
    dev: &Device,
    f: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    up: &Tensor,
) -> (Tensor, Tensor) {
    let v = Var::from_tensor(&inputs[0].to_device(dev).unwrap()).unwrap();
    let mut ts = vec![v.as_tensor().clone()];
    ts.extend(inputs[1..].iter().map(|t| t.to_device(dev).unwrap()));
    let y = f(&ts);
    let g = (&y * up.to_device(dev).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    (y, g.get(&v).unwrap().clone())
}

/// Three fused AdamW steps on a ViT-B-sized matrix, GPU against CPU.
fn adamw_parity(gpu: &Device) {
    let cpu = Device::Cpu;
    let p0 = randn(&[768, 3072], 10, &cpu);
    let n = p0.elem_count();
    let (pc, pg) = (p0.copy().unwrap(), p0.to_device(gpu).unwrap());
    let mvc = Tensor::zeros((2, n), candle_core::DType::F32, &cpu).unwrap();
    let mvg = mvc.to_device(gpu).unwrap();
    for t in 1..=3u64 {
        let g = randn(&[768, 3072], 20 + t, &cpu);
        let s = ops::AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.05,
            t,
            grad_scale: 0.5,
        };
        assert!(ops::adamw_update(&pc, &mvc, &g, &s).unwrap());
        assert!(ops::adamw_update(&pg, &mvg, &g.to_device(gpu).unwrap(), &s).unwrap());
    }
    assert!(max_diff(&pc, &pg) < 1e-6, "adamw parameter");
    assert!(max_diff(&mvc, &mvg) < 1e-5, "adamw moments");
}

/// The multi-tensor AdamW (70 parameters: two launches per step, sizes around the 4096-element
/// chunk, views starting inside their storage, per-parameter learning rates and decays) and the
/// one-launch sum of squares, GPU against the CPU's per-parameter kernels.
fn adamw_multi_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let sizes: Vec<usize> = (0..70)
        .map(|i| [1, 4095, 4096, 4097, 768 * 3 + i, 9000][i % 6])
        .collect();
    // Parameter i is a contiguous view starting at element i of a longer tensor.
    let make = |dev: &Device, seed: u64| -> Vec<Tensor> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                randn(&[n + i], seed + i as u64, &cpu)
                    .to_device(dev)
                    .unwrap()
                    .narrow(0, i, n)
                    .unwrap()
            })
            .collect()
    };
    let (pc, pg) = (make(&cpu, 1000), make(gpu, 1000));
    let zeros = |dev: &Device| -> Vec<Tensor> {
        sizes
            .iter()
            .map(|&n| Tensor::zeros((2, n), DType::F32, dev).unwrap())
            .collect()
    };
    let (mc, mg) = (zeros(&cpu), zeros(gpu));
    let launches = ops::adamw_multi_launches();
    for t in 1..=3u64 {
        let gc = make(&cpu, 5000 * t);
        let gg: Vec<Tensor> = gc.iter().map(|g| g.to_device(gpu).unwrap()).collect();
        let (refs_c, refs_g): (Vec<&Tensor>, Vec<&Tensor>) =
            (gc.iter().collect(), gg.iter().collect());
        let (sc, sg) = (
            ops::sum_of_squares(&refs_c).unwrap(),
            ops::sum_of_squares(&refs_g).unwrap(),
        );
        assert!((sc - sg).abs() < 1e-5 * sc, "sum of squares {sc} vs {sg}");
        let step = |i: usize| ops::AdamStep {
            lr: 1e-3 * (1 + i % 3) as f64,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: [0.0, 0.05][i % 2],
            t,
            grad_scale: 0.5,
        };
        for (p, m, g) in [(&pc, &mc, &gc), (&pg, &mg, &gg)] {
            let items: Vec<ops::AdamItem> = (0..sizes.len())
                .map(|i| ops::AdamItem {
                    param: &p[i],
                    moments: &m[i],
                    grad: &g[i],
                    step: step(i),
                })
                .collect();
            assert!(ops::adamw_update_all(&items).unwrap());
        }
    }
    assert_eq!(
        ops::adamw_multi_launches() - launches,
        3 * 2,
        "multi-tensor launches"
    );
    for i in 0..sizes.len() {
        assert!(max_diff(&pc[i], &pg[i]) < 1e-6, "adamw multi parameter {i}");
        assert!(max_diff(&mc[i], &mg[i]) < 1e-5, "adamw multi moments {i}");
    }
}

/// Fused attention at ViT-B/16 shape (197 tokens, 12 heads of 64) and an odd small one.
fn attention_parity(gpu: &Device) {
    let cpu = Device::Cpu;
    for (b, n, h, d) in [(2, 197, 12, 64), (3, 13, 2, 40)] {
        let qkv = (randn(&[b, n, 3 * h * d], 30, &cpu) * 0.5).unwrap();
        let up = randn(&[b, n, h * d], 31, &cpu);
        let scale = 1.0 / (d as f64).sqrt();
        // On the GPU attention_qkv is the one-node GEMM attention; the CUDA kernel is checked too.
        let f = |t: &[Tensor]| ops::attention_qkv(&t[0], h, scale, false).unwrap();
        let kernel = |t: &[Tensor]| {
            ops::attention_qkv_kernel(&t[0], h, scale)
                .unwrap()
                .expect("kernel applies")
        };
        let (yc, gc) = run(&cpu, &f, std::slice::from_ref(&qkv), &up);
        for (what, g) in [
            ("gemm", &f as &dyn Fn(&[Tensor]) -> Tensor),
            ("kernel", &kernel),
        ] {
            let (yg, gg) = run(gpu, g, std::slice::from_ref(&qkv), &up);
            assert!(
                max_diff(&yc, &yg) < 1e-4,
                "attention {what} value ({b}, {n}, {h}, {d})"
            );
            assert!(
                max_diff(&gc[0], &gg[0]) < 1e-3,
                "attention {what} grad ({b}, {n}, {h}, {d})"
            );
        }
        // bf16 on the GPU against the f32 CPU kernel, at bf16 tolerances.
        let bf = |t: &[Tensor]| {
            ops::attention_qkv(
                &t[0].to_dtype(candle_core::DType::BF16).unwrap(),
                h,
                scale,
                false,
            )
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
        };
        let (yg, gg) = run(gpu, &bf, std::slice::from_ref(&qkv), &up);
        assert!(
            max_diff(&yc, &yg) < 0.05,
            "attention bf16 value ({b}, {n}, {h}, {d})"
        );
        let gscale: f32 = gc[0].abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(
            max_diff(&gc[0], &gg[0]) < 0.05 * gscale.max(1.0),
            "attention bf16 grad ({b}, {n}, {h}, {d})"
        );
    }
}

/// Training BatchNorm at a ResNet-50 layer1 shape: statistics, values, dx, dγ, dβ.
fn batch_norm_parity(gpu: &Device) {
    let cpu = Device::Cpu;
    // Batch 12 at 56²: three chunks of planes per channel on the GPU (the reduction grid), and 7²
    // at 2048 channels (one chunk, many channels).
    for (b, c, h, w) in [(12, 64, 56, 56), (3, 2048, 7, 7)] {
        let x = randn(&[b, c, h, w], 40, &cpu).affine(2.0, 0.5).unwrap();
        let gamma = randn(&[c], 41, &cpu);
        let beta = randn(&[c], 42, &cpu);
        let up = randn(&[b, c, h, w], 43, &cpu);
        let f = |t: &[Tensor]| {
            let stats = ops::channel_moments(&t[0]).unwrap().expect("fused");
            ops::batch_norm_train(&t[0], &stats, &t[1], &t[2], 1e-5).unwrap()
        };
        let args = [x.clone(), gamma.clone(), beta.clone()];
        let (yc, gc) = run(&cpu, &f, &args, &up);
        let (yg, gg) = run(gpu, &f, &args, &up);
        assert!(
            max_diff(&yc, &yg) < 1e-3,
            "batch norm value {b}x{c}x{h}x{w}"
        );
        let count = (b * h * w) as f32;
        for (i, (a, e)) in gc.iter().zip(&gg).enumerate() {
            // dγ, dβ sum B·H·W values per channel.
            let tol = if i == 0 { 1e-3 } else { 3e-6 * count };
            let d = max_diff(a, e);
            assert!(d < tol, "batch norm grad {i} {b}x{c}x{h}x{w}: {d}");
        }
        // bf16 maps on the GPU (f32 statistics and arithmetic) against the f32 CPU kernels on
        // the widened input: within bf16 rounding.
        use candle_core::DType;
        let bf = |t: &[Tensor]| {
            let x = t[0].to_dtype(DType::BF16).unwrap();
            let stats = ops::channel_moments(&x)
                .unwrap()
                .expect("bf16 fuses on CUDA");
            ops::batch_norm_train(&x, &stats, &t[1], &t[2], 1e-5)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let wide = [
            x.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
            gamma.clone(),
            beta.clone(),
        ];
        let (yc, gc) = run(&cpu, &f, &wide, &up);
        let (yg, gg) = run(gpu, &bf, &args, &up);
        let rel = |a: &Tensor, e: &Tensor| {
            let s: f32 = e.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            max_diff(a, e) / s.max(1e-6)
        };
        assert!(
            rel(&yg, &yc) < 1e-2,
            "bf16 batch norm value: {}",
            rel(&yg, &yc)
        );
        for (i, (a, e)) in gc.iter().zip(&gg).enumerate() {
            assert!(rel(e, a) < 2e-2, "bf16 batch norm grad {i}: {}", rel(e, a));
        }
    }
}

/// The ResNet stem pool at its ImageNet shape (112×112 → 56×56) and an odd size.
fn max_pool_parity(gpu: &Device) {
    let cpu = Device::Cpu;
    for (b, c, h, w) in [(2, 64, 112, 112), (1, 3, 9, 8)] {
        let x = randn(&[b, c, h, w], 50, &cpu);
        let up = randn(&[b, c, (h - 1) / 2 + 1, (w - 1) / 2 + 1], 51, &cpu);
        let f = |t: &[Tensor]| ops::max_pool_3x3_s2(&t[0]).unwrap().expect("fused");
        let (yc, gc) = run(&cpu, &f, std::slice::from_ref(&x), &up);
        let (yg, gg) = run(gpu, &f, &[x], &up);
        assert!(max_diff(&yc, &yg) == 0.0, "max pool value");
        assert!(max_diff(&gc[0], &gg[0]) < 1e-5, "max pool grad");
    }
}

/// The bias add and the MLP's bias + GELU at ViT-B's hidden width over 3·197 rows, and a narrow
/// odd width.
fn bias_gelu_parity(gpu: &Device) {
    let cpu = Device::Cpu;
    for (rows, d) in [(3 * 197, 3072), (37, 33)] {
        let x = randn(&[rows, d], 60, &cpu);
        let b = randn(&[d], 61, &cpu);
        let up = randn(&[rows, d], 62, &cpu);
        // db sums over rows: its rounding grows with the row count.
        let tol = 1e-4 * rows as f32;
        let f = |t: &[Tensor]| ops::bias_gelu(&t[0], &t[1]).unwrap();
        let (yc, gc) = run(&cpu, &f, &[x.clone(), b.clone()], &up);
        let (yg, gg) = run(gpu, &f, &[x.clone(), b.clone()], &up);
        assert!(max_diff(&yc, &yg) < 1e-5, "bias_gelu value ({rows}×{d})");
        assert!(max_diff(&gc[0], &gg[0]) < 1e-4, "bias_gelu dx ({rows}×{d})");
        assert!(max_diff(&gc[1], &gg[1]) < tol, "bias_gelu db ({rows}×{d})");
        let f = |t: &[Tensor]| ops::bias_add(&t[0], &t[1]).unwrap();
        let (yc, gc) = run(&cpu, &f, &[x.clone(), b.clone()], &up);
        let (yg, gg) = run(gpu, &f, &[x, b], &up);
        assert!(max_diff(&yc, &yg) < 1e-6, "bias_add value ({rows}×{d})");
        assert!(max_diff(&gc[0], &gg[0]) == 0.0, "bias_add dx ({rows}×{d})");
        assert!(max_diff(&gc[1], &gg[1]) < tol, "bias_add db ({rows}×{d})");
    }
}

/// Convolution on CUDA (cuDNN forward, im2col/col2im kernels in the backward) against the CPU's
/// im2col + GEMM: ResNet's 7×7/2 stem, 3×3 and strided 1×1 and 3×3, the dVAE's 3×3 at 112 px.
/// cuDNN may run f32 convolutions on TF32 tensor cores: tolerances are relative to the largest
/// value.
fn conv_parity(gpu: &Device) {
    let cpu = Device::Cpu;
    for (i, &(b, c, h, w, c_out, k, stride, pad)) in [
        (2, 3, 32, 32, 8, 7, 2, 3),
        (2, 16, 28, 28, 32, 3, 1, 1),
        (2, 16, 14, 14, 32, 1, 2, 0),
        (2, 8, 9, 9, 4, 3, 2, 1),
        (1, 64, 112, 112, 16, 3, 1, 1),
    ]
    .iter()
    .enumerate()
    {
        let x = randn(&[b, c, h, w], 70 + i as u64, &cpu);
        let wt = (randn(&[c_out, c, k, k], 80 + i as u64, &cpu) * 0.1).unwrap();
        let (ho, wo) = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        let up = randn(&[b, c_out, ho, wo], 90 + i as u64, &cpu);
        let f = |t: &[Tensor]| ops::conv2d(&t[0], &t[1], pad, stride).unwrap();
        let (yc, gc) = run(&cpu, &f, &[x.clone(), wt.clone()], &up);
        let (yg, gg) = run(gpu, &f, &[x, wt], &up);
        let rel = |a: &Tensor, e: &Tensor| {
            let scale: f32 = e.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            max_diff(a, e) / scale.max(1e-6)
        };
        assert!(rel(&yg, &yc) < 3e-3, "conv {i} value: {}", rel(&yg, &yc));
        assert!(
            rel(&gg[0], &gc[0]) < 3e-3,
            "conv {i} dx: {}",
            rel(&gg[0], &gc[0])
        );
        assert!(
            rel(&gg[1], &gc[1]) < 3e-3,
            "conv {i} dw: {}",
            rel(&gg[1], &gc[1])
        );
    }
}

/// Mixed precision (`run.precision = "bf16"`, ResNet-50): bf16 activations with an f32 master
/// weight — cuDNN's bf16 forward and the f32 im2col backward on CUDA against the CPU's f32 kernel on
/// widened copies; `dx` comes back bf16, `dw` f32. Both sides round to bf16, so the tolerance is
/// bf16's.
fn mixed_conv_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    for (i, &(b, c, h, c_out, k, stride, pad)) in [
        (2, 3, 32, 8, 7, 2, 3),
        (2, 16, 28, 32, 3, 1, 1),
        (2, 16, 14, 32, 1, 2, 0),
    ]
    .iter()
    .enumerate()
    {
        let x = randn(&[b, c, h, h], 170 + i as u64, &cpu)
            .to_dtype(DType::BF16)
            .unwrap();
        let wt = (randn(&[c_out, c, k, k], 180 + i as u64, &cpu) * 0.1).unwrap();
        let o = (h + 2 * pad - k) / stride + 1;
        let up = randn(&[b, c_out, o, o], 190 + i as u64, &cpu);
        let f = |t: &[Tensor]| {
            let y = ops::conv2d(&t[0], &t[1], pad, stride).unwrap();
            assert_eq!(y.dtype(), DType::BF16);
            y.to_dtype(DType::F32).unwrap()
        };
        let (yc, gc) = run(&cpu, &f, &[x.clone(), wt.clone()], &up);
        let (yg, gg) = run(gpu, &f, &[x, wt], &up);
        assert_eq!((gg[0].dtype(), gg[1].dtype()), (DType::BF16, DType::F32));
        let rel = |a: &Tensor, e: &Tensor| {
            let (a, e) = (
                a.to_dtype(DType::F32).unwrap(),
                e.to_dtype(DType::F32).unwrap(),
            );
            let scale: f32 = e.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            max_diff(&a, &e) / scale.max(1e-6)
        };
        for (what, a, e) in [
            ("value", &yg, &yc),
            ("dx", &gg[0], &gc[0]),
            ("dw", &gg[1], &gc[1]),
        ] {
            let r = rel(a, e);
            assert!(r < 2e-2, "mixed conv {i} {what}: {r}");
        }
    }
}

/// cim's cuDNN convolution (`ops::set_cudnn_conv`, tensor-core bf16/f16): the forward of a frozen
/// convolution in f32, bf16 and f16 against candle's and the CPU's (dVAE-like shapes, a stride-2
/// 7×7 and a 1×1), and the trainable f32 and mixed bf16 paths — cuDNN forward, backward data and
/// backward filter — against the CPU (values and both gradients).
#[cfg(feature = "cudnn")]
fn cudnn_conv_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let cases = [
        (2, 64, 28, 128, 3, 1, 1),
        (2, 3, 32, 16, 7, 2, 3),
        (2, 48, 14, 96, 1, 1, 0),
    ];
    for (i, &(b, c, h, c_out, k, stride, pad)) in cases.iter().enumerate() {
        let x = randn(&[b, c, h, h], 200 + i as u64, &cpu);
        let w = (randn(&[c_out, c, k, k], 210 + i as u64, &cpu) * 0.05).unwrap();
        let want = x.conv2d(&w, pad, stride, 1, 1).unwrap();
        let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        for (dt, tol) in [(DType::F32, 3e-3), (DType::BF16, 2e-2), (DType::F16, 5e-3)] {
            let (xg, wg) = (
                x.to_dtype(dt).unwrap().to_device(gpu).unwrap(),
                w.to_dtype(dt).unwrap().to_device(gpu).unwrap(),
            );
            ops::set_cudnn_conv(true);
            let ours = ops::conv2d(&xg, &wg, pad, stride).unwrap();
            assert!(
                ops::cudnn_conv(),
                "cuDNN call failed and switched itself off ({i}, {dt:?})"
            );
            ops::set_cudnn_conv(false);
            let theirs = xg.conv2d(&wg, pad, stride, 1, 1).unwrap();
            let (ours, theirs) = (
                ours.to_dtype(DType::F32).unwrap(),
                theirs.to_dtype(DType::F32).unwrap(),
            );
            let d = max_diff(&ours, &want) / scale;
            assert!(d < tol, "cudnn conv {i} {dt:?} vs f32 CPU: {d}");
            // candle's f16 convolution accumulates in f16 (its cuDNN descriptor's compute type
            // is the data type): 1.4% of the largest value off in an H200 run (2026-11-27), where
            // cim's (f32 accumulation) met the f32 bound above. Compared for f32 and bf16 only.
            if dt != DType::F16 {
                let d = max_diff(&ours, &theirs) / scale;
                assert!(d < tol, "cudnn conv {i} {dt:?} vs candle's: {d}");
            }
        }
        // Trainable: f32 (cuDNN forward, cim's backward) and mixed bf16, against the CPU.
        let o = (h + 2 * pad - k) / stride + 1;
        let up = randn(&[b, c_out, o, o], 220 + i as u64, &cpu);
        for (dt, tol) in [(DType::F32, 3e-3), (DType::BF16, 2e-2)] {
            let xin = x.to_dtype(dt).unwrap();
            let f = |t: &[Tensor]| {
                ops::conv2d(&t[0], &t[1], pad, stride)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let (yc, gc) = run(&cpu, &f, &[xin.clone(), w.clone()], &up);
            ops::set_cudnn_conv(true);
            let (yg, gg) = run(gpu, &f, &[xin, w.clone()], &up);
            assert!(
                ops::cudnn_conv(),
                "cuDNN call failed in training ({i}, {dt:?})"
            );
            ops::set_cudnn_conv(false);
            for (what, a, e) in [
                ("value", &yg, &yc),
                ("dx", &gg[0], &gc[0]),
                ("dw", &gg[1], &gc[1]),
            ] {
                let (a, e) = (
                    a.to_dtype(DType::F32).unwrap(),
                    e.to_dtype(DType::F32).unwrap(),
                );
                let s: f32 = e.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let d = max_diff(&a, &e) / s.max(1e-6);
                assert!(d < tol, "cudnn trainable conv {i} {dt:?} {what}: {d}");
            }
        }
    }
}

/// The conv epilogue `act(r + g·(x + b[c]))` in its four forms, at a dVAE map size and a small one.
fn channel_bias_parity(gpu: &Device) {
    let cpu = Device::Cpu;
    for (b, c, h, w) in [(2, 64, 56, 56), (3, 5, 2, 6)] {
        let x = randn(&[b, c, h, w], 100, &cpu);
        let bias = randn(&[c], 101, &cpu);
        let r = randn(&[b, c, h, w], 102, &cpu);
        let up = randn(&[b, c, h, w], 103, &cpu);
        for (res, relu, gain) in [
            (false, true, 1.0),
            (true, false, 1.0 / 64.0),
            (true, true, 0.5),
        ] {
            let f = |t: &[Tensor]| ops::channel_bias(&t[0], &t[1], t.get(2), gain, relu).unwrap();
            let mut ins = vec![x.clone(), bias.clone()];
            if res {
                ins.push(r.clone());
            }
            let (yc, gc) = run(&cpu, &f, &ins, &up);
            let (yg, gg) = run(gpu, &f, &ins, &up);
            let what = format!("channel_bias {b}x{c}x{h}x{w} res={res} relu={relu}");
            assert!(max_diff(&yc, &yg) < 1e-5, "{what} value");
            assert!(max_diff(&gc[0], &gg[0]) < 1e-5, "{what} dx");
            assert!(
                max_diff(&gc[1], &gg[1]) < 1e-4 * (b * h * w) as f32,
                "{what} db"
            );
        }
        // The dVAE's 2× resampling, f32, bf16 and f16: equal values (the CPU kernel on the
        // widened input: pooling and copying commute with the rounding).
        for dt in [
            candle_core::DType::F32,
            candle_core::DType::BF16,
            candle_core::DType::F16,
        ] {
            let f32s = |t: Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
            let xd = x.to_dtype(dt).unwrap();
            let (xc, xg) = (f32s(xd.clone()), xd.to_device(gpu).unwrap());
            let pool = (
                ops::max_pool_2x2(&xc).unwrap(),
                ops::max_pool_2x2(&xg).unwrap(),
            );
            let up = (
                ops::upsample_nearest_2x(&xc).unwrap(),
                ops::upsample_nearest_2x(&xg).unwrap(),
            );
            for (what, (want, got)) in [("max_pool_2x2", pool), ("upsample_nearest_2x", up)] {
                let got = f32s(got);
                assert_eq!(want.dims(), got.dims(), "{what} {dt:?} shape");
                let d = max_diff(&want, &got);
                assert_eq!(d, 0.0, "{what} {dt:?} on {b}x{c}x{h}x{w}");
            }
        }
        // bf16 and f16 maps (the dVAE in reduced precision): the CUDA kernel against the CPU's
        // f32 kernel on the widened inputs, both rounded to the dtype (one step apart at most).
        for half in [candle_core::DType::BF16, candle_core::DType::F16] {
            use candle_core::DType;
            let bf = |t: &Tensor| t.to_dtype(half).unwrap();
            let (xb, bb, rb) = (bf(&x), bf(&bias), bf(&r));
            let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            for res in [false, true] {
                let want = ops::channel_bias(
                    &wide(&xb),
                    &wide(&bb),
                    res.then(|| wide(&rb)).as_ref(),
                    0.5,
                    true,
                )
                .unwrap();
                let (xg, bg, rg) = (
                    xb.to_device(gpu).unwrap(),
                    bb.to_device(gpu).unwrap(),
                    rb.to_device(gpu).unwrap(),
                );
                let got = ops::channel_bias(&xg, &bg, res.then_some(&rg), 0.5, true).unwrap();
                assert_eq!(got.dtype(), half);
                let (want, got) = (wide(&bf(&want)), wide(&got));
                let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let d = max_diff(&want, &got) / scale.max(1e-6);
                assert!(
                    d < 1e-2,
                    "channel_bias {half:?} {b}x{c}x{h}x{w} res={res}: {d}"
                );
                let (y, yr) =
                    ops::channel_bias_and_relu(&xg, &bg, res.then_some(&rg), 0.5).unwrap();
                let yr_want = wide(&y).relu().unwrap();
                assert_eq!(max_diff(&wide(&yr), &yr_want), 0.0, "{half:?} pair relu");
            }
        }
        // The value and its ReLU from one pass (frozen dVAE blocks), with and without residual.
        for res in [false, true] {
            let rr = res.then_some(&r);
            let (yc, rc) = ops::channel_bias_and_relu(&x, &bias, rr, 0.5).unwrap();
            let (xg, bg, rg) = (
                x.to_device(gpu).unwrap(),
                bias.to_device(gpu).unwrap(),
                r.to_device(gpu).unwrap(),
            );
            let (yg, rgl) = ops::channel_bias_and_relu(&xg, &bg, res.then_some(&rg), 0.5).unwrap();
            let what = format!("channel_bias_and_relu {b}x{c}x{h}x{w} res={res}");
            assert!(max_diff(&yc, &yg) < 1e-5, "{what} value");
            assert!(max_diff(&rc, &rgl) < 1e-5, "{what} relu");
        }
    }
}

/// The bf16 kernels (bf16 storage, f32 arithmetic) on the GPU against their CPU twins (the f32
/// kernels on widened copies): LayerNorm and bias + GELU through their mixed-precision graph nodes
/// at ViT-B widths. Both sides round to bf16, so values may differ by one bf16 step.
fn bf16_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let rel = |a: &Tensor, e: &Tensor| {
        let scale: f32 = f32s(e)
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        max_diff(&f32s(a), &f32s(e)) / scale.max(1e-6)
    };
    // The value and each named gradient of the GPU run within 1 % (relative) of the CPU run's.
    let close = |op: &str,
                 grads: &[&str],
                 (yg, gg): (Tensor, Vec<Tensor>),
                 (yc, gc): (Tensor, Vec<Tensor>)| {
        assert!(rel(&yg, &yc) < 0.01, "bf16 {op} value: {}", rel(&yg, &yc));
        for (i, what) in grads.iter().enumerate() {
            let d = rel(&gg[i], &gc[i]);
            assert!(d < 0.01, "bf16 {op} {what}: {d}");
        }
    };
    let (rows, d) = (3 * 197, 768);
    let x = randn(&[rows, d], 110, &cpu);
    let w = (randn(&[d], 111, &cpu) * 0.2).unwrap();
    let b = randn(&[d], 112, &cpu);
    let up = randn(&[rows, d], 113, &cpu);
    let ln = |t: &[Tensor]| f32s(&ops::layer_norm_mixed(&bf(&t[0]), &t[1], &t[2], 1e-6).unwrap());
    let want = run(&cpu, &ln, &[x.clone(), w.clone(), b.clone()], &up);
    let got = run(gpu, &ln, &[x.clone(), w, b.clone()], &up);
    close("layer_norm", &["dx", "dw", "db"], got, want);
    let (rows, d) = (3 * 197, 3072);
    let x = randn(&[rows, d], 114, &cpu);
    let b = randn(&[d], 115, &cpu);
    let up = randn(&[rows, d], 116, &cpu);
    let gelu = |t: &[Tensor]| f32s(&ops::bias_gelu(&bf(&t[0]), &t[1]).unwrap());
    let want = run(&cpu, &gelu, &[x.clone(), b.clone()], &up);
    let got = run(gpu, &gelu, &[x, b.clone()], &up);
    close("bias_gelu", &["dx", "db"], got, want);
    // A bf16 Linear's bias add (f32 bias; bf16 gradient summed in f32 for db) against the f32
    // op on the widened input.
    let x = randn(&[rows, d], 117, &cpu);
    let f32_op = |t: &[Tensor]| ops::bias_add(&f32s(&bf(&t[0])), &t[1]).unwrap();
    let bf16_op = |t: &[Tensor]| f32s(&ops::bias_add(&bf(&t[0]), &t[1]).unwrap());
    let want = run(&cpu, &f32_op, &[x.clone(), b.clone()], &up);
    let got = run(gpu, &bf16_op, &[x, b], &up);
    close("bias_add", &["dx", "db"], got, want);
}

/// A whole pre-norm block as one node (ViT-S/16 sizes) on the GPU against the CPU, in f32 and in
/// bf16 with f32 parameters: values and the gradients of the input and all twelve parameters.
fn block_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let (b, n, d, hidden, heads) = (2, 197, 384, 1536, 6);
    let mut inputs = vec![randn(&[b, n, d], 120, &cpu)];
    for (i, (_, s)) in ops::block_param_shapes(d, hidden).iter().enumerate() {
        let scale = if s.len() == 2 { 0.02 } else { 0.1 };
        let t = (randn(s, 121 + i as u64, &cpu) * scale).unwrap();
        let t = if i == 0 || i == 6 {
            (t + 1.0).unwrap()
        } else {
            t
        };
        inputs.push(t);
    }
    let up = randn(&[b, n, d], 140, &cpu);
    for dt in [DType::F32, DType::BF16] {
        let f = |t: &[Tensor]| {
            let p = ops::BlockParams::from_slice(&std::array::from_fn(|i| &t[i + 1]));
            let x = t[0].to_dtype(dt).unwrap();
            ops::pre_norm_block(&x, &p, heads, 1e-6, None, false)
                .unwrap()
                .expect("the block node runs with the kernels on")
                .to_dtype(DType::F32)
                .unwrap()
        };
        let (yc, gc) = run(&cpu, &f, &inputs, &up);
        let (yg, gg) = run(gpu, &f, &inputs, &up);
        let tol = if dt == DType::F32 { 1e-3 } else { 2e-2 };
        let rel = |a: &Tensor, e: &Tensor| {
            let s: f32 = e.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            max_diff(a, e) / s.max(1e-6)
        };
        assert!(rel(&yg, &yc) < tol, "block {dt:?} value: {}", rel(&yg, &yc));
        for (i, (a, e)) in gc.iter().zip(&gg).enumerate() {
            let r = rel(e, a);
            assert!(r < tol, "block {dt:?} gradient of input {i}: relative {r}");
        }
    }
}

/// The generator's masked-row selection (a gather whose backward is a gather) on the GPU against
/// the CPU, bf16 at ViT-B width: exact, both are copies.
fn select_rows_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let (r, d) = (4 * 196, 768);
    let rows: Vec<u32> = (0..r as u32).filter(|i| (i * 7919) % 5 < 3).collect();
    let x = randn(&[r, d], 150, &cpu);
    let up = randn(&[rows.len(), d], 151, &cpu);
    let f = |t: &[Tensor]| {
        ops::select_rows(&t[0].to_dtype(DType::BF16).unwrap(), &rows)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (yc, gc) = run(&cpu, &f, std::slice::from_ref(&x), &up);
    let (yg, gg) = run(gpu, &f, &[x], &up);
    assert!(max_diff(&yc, &yg) == 0.0, "select_rows value");
    assert!(max_diff(&gc[0], &gg[0]) == 0.0, "select_rows grad");
}

/// The block node's residual adds on the GPU against the CPU's f32 op on widened inputs: `a + (b +
/// bias)` and `a + b` for a and b f32, both bf16, and a bf16 with b f32 (the backward's LayerNorm
/// gradient); bf16 results one rounding apart at most.
fn residual_add_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let (rows, d) = (3 * 197, 768);
    let a = randn(&[rows, d], 130, &cpu);
    let b = randn(&[rows, d], 131, &cpu);
    let bias = randn(&[d], 132, &cpu);
    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    for (da, db) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::BF16, DType::F32),
    ] {
        let (ar, br) = (a.to_dtype(da).unwrap(), b.to_dtype(db).unwrap());
        for with_bias in [false, true] {
            let want = ops::residual_add(&f32s(&ar), &f32s(&br), with_bias.then_some(&bias))
                .unwrap()
                .to_dtype(da)
                .unwrap();
            let bg = bias.to_device(gpu).unwrap();
            let got = ops::residual_add(
                &ar.to_device(gpu).unwrap(),
                &br.to_device(gpu).unwrap(),
                with_bias.then_some(&bg),
            )
            .unwrap();
            assert_eq!(got.dtype(), da, "{da:?} + {db:?}: dtype");
            let scale: f32 = f32s(&want)
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            let diff = max_diff(&f32s(&got), &f32s(&want)) / scale;
            let tol = if da == DType::F32 { 1e-6 } else { 1e-2 };
            assert!(
                diff < tol,
                "residual_add {da:?} + {db:?} bias={with_bias}: {diff}"
            );
        }
    }
}

/// GEMM attention's head-layout copies on the GPU against the CPU, equal values: padded to 200
/// rows per head (197 tokens; the 16-byte kernels), and at a head width of 6 (the one-element
/// kernels); q and dq scaled, f32 and bf16.
fn head_copies_parity(gpu: &Device) {
    for (n, h, hd, rows) in [(197, 12, 64, 200), (13, 3, 6, 16)] {
        head_copies_case(gpu, (2, n, h, hd, rows));
    }
}

fn head_copies_case(gpu: &Device, (b, n, h, hd, rows): (usize, usize, usize, usize, usize)) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let qkv = randn(&[b, n, 3 * h * hd], 140, &cpu);
    let x = randn(&[b, n, h * hd], 141, &cpu);
    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_device(&cpu).unwrap();
    for dt in [DType::F32, DType::BF16] {
        let (qc, xc) = (qkv.to_dtype(dt).unwrap(), x.to_dtype(dt).unwrap());
        let (qg, xg) = (qc.to_device(gpu).unwrap(), xc.to_device(gpu).unwrap());
        let pc = ops::split_qkv_padded(&qc, h, rows, 0.125).unwrap();
        let pg = ops::split_qkv_padded(&qg, h, rows, 0.125).unwrap();
        assert_eq!(
            max_diff(&f32s(&pc), &f32s(&pg)),
            0.0,
            "split_qkv_padded {dt:?}"
        );
        let sc = ops::split_heads_padded(&xc, h, rows).unwrap();
        let sg = ops::split_heads_padded(&xg, h, rows).unwrap();
        assert_eq!(
            max_diff(&f32s(&sc), &f32s(&sg)),
            0.0,
            "split_heads_padded {dt:?}"
        );
        let mc = ops::merge_heads_rows(&sc, n).unwrap();
        let mg = ops::merge_heads_rows(&sg, n).unwrap();
        assert_eq!(
            max_diff(&f32s(&mc), &f32s(&mg)),
            0.0,
            "merge_heads_rows {dt:?}"
        );
        let part = |p: &Tensor, i: usize| p.get(i).unwrap();
        let kc = ops::merge_qkv_rows(&part(&pc, 0), &part(&pc, 1), &part(&pc, 2), n, 8.0).unwrap();
        let kg = ops::merge_qkv_rows(&part(&pg, 0), &part(&pg, 1), &part(&pg, 2), n, 8.0).unwrap();
        assert_eq!(
            max_diff(&f32s(&kc), &f32s(&kg)),
            0.0,
            "merge_qkv_rows {dt:?}"
        );
        assert_eq!(
            max_diff(&f32s(&kg), &f32s(&qc)),
            0.0,
            "split then merge {dt:?}"
        );
    }
}

/// The dVAE's channel argmax on the GPU (f32, bf16, f16 logits) against candle's argmax on the CPU
/// over the same (widened) values: random logits over 700 channels (more than one lane's share),
/// and a pixel with a tie, a NaN, and one with a NaN in channel 0.
fn argmax_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let (b, c, h, w) = (3, 700, 5, 7);
    let mut v = randn(&[b, c, h, w], 150, &cpu)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let hw = h * w;
    // Image 0, pixel 0: channels 9 and 17 tie at the maximum, channel 12 is NaN.
    for (ch, val) in [(9, 9.0), (12, f32::NAN), (17, 9.0)] {
        v[ch * hw] = val;
    }
    // Image 1, pixel 3: channel 0 is NaN (the scan never moves: index 0).
    v[c * hw + 3] = f32::NAN;
    let x = Tensor::from_vec(v, (b, c, h, w), &cpu).unwrap();
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let xd = x.to_dtype(dt).unwrap();
        let want = xd
            .to_dtype(DType::F32)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec3::<u32>()
            .unwrap();
        let got = ops::argmax_channels(&xd.to_device(gpu).unwrap())
            .unwrap()
            .to_vec3::<u32>()
            .unwrap();
        assert_eq!(got, want, "argmax_channels {dt:?}");
        assert_eq!((got[0][0][0], got[1][0][3]), (9, 0), "tie and NaN {dt:?}");
    }
}

/// Channels-last (NHWC) maps, the dVAE's layout on cuDNN: the conv epilogue, its pair form, the 2×
/// pool and upsampling, and the last-dimension argmax, in f32, bf16 and f16, on the GPU against
/// the CPU kernels on widened copies — at a dVAE map size, a small one, and one whose element
/// count is not a multiple of 4 (the composed epilogue on CUDA).
fn channels_last_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_device(&cpu).unwrap();
    for (i, &(b, h, w, c)) in [(2, 56, 56, 64), (3, 2, 6, 6), (1, 3, 3, 3)]
        .iter()
        .enumerate()
    {
        let x = randn(&[b, h, w, c], 300 + i as u64, &cpu);
        let bias = randn(&[c], 310 + i as u64, &cpu);
        let r = randn(&[b, h, w, c], 320 + i as u64, &cpu);
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 1e-2)] {
            let (xd, bd, rd) = (
                x.to_dtype(dt).unwrap(),
                bias.to_dtype(dt).unwrap(),
                r.to_dtype(dt).unwrap(),
            );
            let on_gpu = |t: &Tensor| t.to_device(gpu).unwrap();
            let what = format!("{b}x{h}x{w}x{c} {dt:?}");
            for res in [false, true] {
                let want = ops::channel_bias_nhwc(
                    &wide(&xd),
                    &wide(&bd),
                    res.then(|| wide(&rd)).as_ref(),
                    0.5,
                    true,
                )
                .unwrap();
                let rg = on_gpu(&rd);
                let got = ops::channel_bias_nhwc(
                    &on_gpu(&xd),
                    &on_gpu(&bd),
                    res.then_some(&rg),
                    0.5,
                    true,
                )
                .unwrap();
                assert_eq!(got.dtype(), dt);
                let want = wide(&want.to_dtype(dt).unwrap());
                let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let d = max_diff(&want, &wide(&got)) / scale.max(1e-6);
                assert!(d < tol, "channel_bias_nhwc {what} res={res}: {d}");
                let (y, yr) = ops::channel_bias_and_relu_nhwc(
                    &on_gpu(&xd),
                    &on_gpu(&bd),
                    res.then_some(&rg),
                    0.5,
                )
                .unwrap();
                let y_want = ops::channel_bias_nhwc(
                    &wide(&xd),
                    &wide(&bd),
                    res.then(|| wide(&rd)).as_ref(),
                    0.5,
                    false,
                )
                .unwrap();
                let y_want = wide(&y_want.to_dtype(dt).unwrap());
                let d = max_diff(&y_want, &wide(&y)) / scale.max(1e-6);
                assert!(d < tol, "channel_bias_and_relu_nhwc {what} res={res}: {d}");
                assert_eq!(
                    max_diff(&wide(&yr), &wide(&y).relu().unwrap()),
                    0.0,
                    "{what} pair relu"
                );
            }
            if h >= 2 && w >= 2 {
                let want = ops::max_pool_2x2_nhwc(&wide(&xd)).unwrap();
                let got = ops::max_pool_2x2_nhwc(&on_gpu(&xd)).unwrap();
                assert_eq!(want.dims(), got.dims(), "max_pool_2x2_nhwc {what} shape");
                assert_eq!(
                    max_diff(&want, &wide(&got)),
                    0.0,
                    "max_pool_2x2_nhwc {what}"
                );
            }
            let want = ops::upsample_nearest_2x_nhwc(&wide(&xd)).unwrap();
            let got = ops::upsample_nearest_2x_nhwc(&on_gpu(&xd)).unwrap();
            assert_eq!(
                want.dims(),
                got.dims(),
                "upsample_nearest_2x_nhwc {what} shape"
            );
            assert_eq!(
                max_diff(&want, &wide(&got)),
                0.0,
                "upsample_nearest_2x_nhwc {what}"
            );
        }
    }
    // The last-dimension argmax: the dVAE's 8192 tokens over 14×14 pixels, an odd width, and
    // planted ties and NaNs (a NaN in column 0 gives 0; elsewhere it never wins).
    for (i, &(rows, c)) in [(2 * 196, 8192), (37, 45)].iter().enumerate() {
        let mut v = randn(&[rows, c], 330 + i as u64, &cpu)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        v[0] = f32::NAN;
        v[c + 3] = 9.0;
        v[c + 7] = 9.0;
        v[2 * c + 1] = f32::NAN;
        v[2 * c + 2] = 8.0;
        let x = Tensor::from_vec(v, (rows, c), &cpu).unwrap();
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let xd = x.to_dtype(dt).unwrap();
            let want = ops::argmax_last(&wide(&xd))
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            let got = ops::argmax_last(&xd.to_device(gpu).unwrap())
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            assert_eq!(
                (want[0], want[1], want[2]),
                (0, 3, 2),
                "argmax_last {dt:?} planted"
            );
            assert_eq!(got, want, "argmax_last {rows}x{c} {dt:?}");
        }
    }
}

/// cim's cuDNN convolution on channels-last maps (`ops::conv2d_nhwc`, the dVAE's layout on
/// CUDA): f32, bf16 and f16 against the CPU's f32 NCHW convolution transposed, at dVAE-like
/// shapes, a stride-2 7×7 and a 1×1 to 8192 channels.
#[cfg(feature = "cudnn")]
fn cudnn_nhwc_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let nhwc = |t: &Tensor| t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
    let cases = [
        (2, 64, 28, 128, 3, 1, 1),
        (2, 3, 32, 16, 7, 2, 3),
        (2, 64, 14, 8192, 1, 1, 0),
    ];
    for (i, &(b, c, h, c_out, k, stride, pad)) in cases.iter().enumerate() {
        let x = randn(&[b, c, h, h], 400 + i as u64, &cpu);
        let w = (randn(&[c_out, c, k, k], 410 + i as u64, &cpu) * 0.05).unwrap();
        let want = nhwc(&ops::conv2d(&x, &w, pad, stride).unwrap());
        let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        for (dt, tol) in [(DType::F32, 3e-3), (DType::BF16, 2e-2), (DType::F16, 5e-3)] {
            let (xg, wg) = (
                nhwc(&x).to_dtype(dt).unwrap().to_device(gpu).unwrap(),
                nhwc(&w).to_dtype(dt).unwrap().to_device(gpu).unwrap(),
            );
            ops::set_cudnn_conv(true);
            let got = ops::conv2d_nhwc(&xg, &wg, pad, stride).unwrap();
            assert!(
                ops::cudnn_conv(),
                "cuDNN NHWC call failed and switched itself off ({i}, {dt:?})"
            );
            ops::set_cudnn_conv(false);
            assert_eq!(got.dims(), want.dims(), "conv2d_nhwc {i} {dt:?} shape");
            let got = got.to_dtype(DType::F32).unwrap();
            let d = max_diff(&got, &want) / scale;
            assert!(d < tol, "conv2d_nhwc {i} {dt:?} vs f32 CPU: {d}");
        }
    }
}

/// The trainable channels-last convolution (`ops::conv2d_channels_last`, the ResNet-50 enhancer
/// channels last): cuDNN's NHWC forward, backward data and backward filter, in f32 and in mixed
/// bf16 (bf16 map, f32 weight), against the CPU (values, dx, and dw in the weight's
/// `(C_out, C, k, k)` order) at ResNet-50 shapes: a bottleneck's 1×1 and strided 3×3, the stem's
/// 7×7 on 3 channels.
#[cfg(feature = "cudnn")]
fn cudnn_nhwc_train_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let nhwc = |t: &Tensor| t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
    let cases = [
        (2, 256, 14, 128, 1, 1, 0),
        (2, 128, 28, 128, 3, 2, 1),
        (2, 3, 64, 64, 7, 2, 3),
    ];
    for (i, &(b, c, h, c_out, k, stride, pad)) in cases.iter().enumerate() {
        let x = nhwc(&randn(&[b, c, h, h], 430 + i as u64, &cpu));
        let w = (randn(&[c_out, c, k, k], 440 + i as u64, &cpu) * 0.05).unwrap();
        let o = (h + 2 * pad - k) / stride + 1;
        let up = randn(&[b, o, o, c_out], 450 + i as u64, &cpu);
        for (dt, tol) in [(DType::F32, 3e-3), (DType::BF16, 2e-2)] {
            let xin = x.to_dtype(dt).unwrap();
            let f = |t: &[Tensor]| {
                ops::conv2d_channels_last(&t[0], &t[1], pad, stride)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let (yc, gc) = run(&cpu, &f, &[xin.clone(), w.clone()], &up);
            ops::set_cudnn_conv(true);
            let (yg, gg) = run(gpu, &f, &[xin, w.clone()], &up);
            assert!(
                ops::cudnn_conv(),
                "cuDNN NHWC call failed in training ({i}, {dt:?})"
            );
            ops::set_cudnn_conv(false);
            assert_eq!(yg.dims(), &[b, o, o, c_out]);
            assert_eq!(gg[1].dims(), w.dims());
            assert_eq!(gg[1].dtype(), DType::F32, "dw in the master weight's dtype");
            for (what, a, e) in [
                ("value", &yg, &yc),
                ("dx", &gg[0], &gc[0]),
                ("dw", &gg[1], &gc[1]),
            ] {
                let (a, e) = (
                    a.to_dtype(DType::F32).unwrap(),
                    e.to_dtype(DType::F32).unwrap(),
                );
                let s: f32 = e.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let d = max_diff(&a, &e) / s.max(1e-6);
                assert!(d < tol, "cudnn NHWC trainable conv {i} {dt:?} {what}: {d}");
            }
        }
    }
}

/// Channels-last training BatchNorm (the column-reduction kernels) and stem max-pool, f32 and
/// bf16 on the GPU against the CPU's f32 kernels (on the bf16-rounded input for bf16), at a
/// ResNet-50 layer1 shape (many rows, 64 channels: many row chunks), layer4's (few rows, 2048
/// channels) and the stem pool's.
fn channels_last_train_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let rel = |a: &Tensor, e: &Tensor| {
        let a = a.to_dtype(DType::F32).unwrap();
        let e = e.to_dtype(DType::F32).unwrap();
        let s: f32 = e.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        max_diff(&a, &e) / s.max(1e-6)
    };
    for (b, h, w, c) in [(8, 56, 56, 64), (3, 7, 7, 2048), (2, 5, 3, 40)] {
        let x = randn(&[b, h, w, c], 460, &cpu).affine(2.0, 0.5).unwrap();
        let gamma = randn(&[c], 461, &cpu);
        let beta = randn(&[c], 462, &cpu);
        let up = randn(&[b, h, w, c], 463, &cpu);
        for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
            let f = |t: &[Tensor]| {
                let x = t[0].to_dtype(dt).unwrap();
                let stats = ops::channel_moments_nhwc(&x).unwrap().expect("fused");
                ops::batch_norm_train_nhwc(&x, &stats, &t[1], &t[2], 1e-5)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let xin = x.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap();
            let args = [xin, gamma.clone(), beta.clone()];
            let fc = |t: &[Tensor]| {
                let stats = ops::channel_moments_nhwc(&t[0]).unwrap().expect("fused");
                ops::batch_norm_train_nhwc(&t[0], &stats, &t[1], &t[2], 1e-5).unwrap()
            };
            let (yc, gc) = run(&cpu, &fc, &args, &up);
            let (yg, gg) = run(gpu, &f, &args, &up);
            let d = rel(&yg, &yc);
            assert!(d < tol, "NHWC batch norm {b}x{h}x{w}x{c} {dt:?} value: {d}");
            for (i, (a, e)) in gg.iter().zip(&gc).enumerate() {
                let d = rel(a, e);
                assert!(
                    d < 2.0 * tol,
                    "NHWC batch norm {b}x{h}x{w}x{c} {dt:?} grad {i}: {d}"
                );
            }
        }
    }
    // The bottleneck's end, relu(bn(x) + r), as one node under a gradient sink (as a training step
    // builds it), both layouts, f32 and bf16: values and the gradients of x, γ, β and r.
    for last in [false, true] {
        let dims = match last {
            false => [4, 64, 28, 28],
            true => [4, 28, 28, 64],
        };
        let c = 64;
        let x = randn(&dims, 480, &cpu).affine(2.0, 0.5).unwrap();
        let r = randn(&dims, 481, &cpu);
        let gamma = randn(&[c], 482, &cpu);
        let beta = randn(&[c], 483, &cpu);
        let up = randn(&dims, 484, &cpu);
        for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
            let wide = |t: &Tensor| t.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap();
            let args = [wide(&x), gamma.clone(), beta.clone(), wide(&r)];
            let run_tail = |dev: &Device, dt: DType| {
                let vars: Vec<Var> = args
                    .iter()
                    .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
                    .collect();
                let sink = ops::GradSink::install();
                // x and r as activations (not variables), as in a network.
                let act = |v: &Var| (v.as_tensor() * 1.0).unwrap().to_dtype(dt).unwrap();
                let (xa, ra) = (act(&vars[0]), act(&vars[3]));
                // [γ; β; mean; var] from one reduction (the ResNet plugin's form).
                let (g, b) = (vars[1].as_tensor(), vars[2].as_tensor());
                let stats = ops::channel_moments_affine(&xa, g, b, last)
                    .unwrap()
                    .expect("fused");
                let tail = ops::BnTail {
                    residual: Some(&ra),
                    relu: true,
                };
                let y = ops::batch_norm_train_tail(
                    &xa,
                    &stats,
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                    1e-5,
                    last,
                    tail,
                )
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
                let loss = (&y * up.to_device(dev).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let g = sink.backward(&loss).unwrap();
                let grads: Vec<Tensor> = vars.iter().map(|v| g.get(v).unwrap().clone()).collect();
                (y, grads)
            };
            let (yc, gc) = run_tail(&cpu, DType::F32);
            let (yg, gg) = run_tail(gpu, dt);
            let d = rel(&yg, &yc);
            assert!(d < tol, "bn tail last {last} {dt:?} value: {d}");
            for (i, (a, e)) in gg.iter().zip(&gc).enumerate() {
                let d = rel(a, e);
                // Pre-activations within rounding of 0 may take the other side of the mask in
                // bf16; the relative bound absorbs a few.
                assert!(d < 5.0 * tol, "bn tail last {last} {dt:?} grad {i}: {d}");
            }
        }
    }
    for (b, h, w, c) in [(2, 112, 112, 64), (1, 9, 8, 3)] {
        let x = randn(&[b, h, w, c], 470, &cpu);
        let up = randn(&[b, (h - 1) / 2 + 1, (w - 1) / 2 + 1, c], 471, &cpu);
        for dt in [DType::F32, DType::BF16] {
            let xin = x.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap();
            let f = |t: &[Tensor]| {
                ops::max_pool_3x3_s2_nhwc(&t[0].to_dtype(dt).unwrap())
                    .unwrap()
                    .expect("fused")
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            // The CPU kernel is f32's (on the rounded input: the same maxima).
            let fc = |t: &[Tensor]| ops::max_pool_3x3_s2_nhwc(&t[0]).unwrap().expect("fused");
            let (yc, gc) = run(&cpu, &fc, std::slice::from_ref(&xin), &up);
            let (yg, gg) = run(gpu, &f, &[xin], &up);
            assert!(max_diff(&yc, &yg) == 0.0, "NHWC max pool value {dt:?}");
            // bf16: the gradient rounded to bf16 on the way in and out.
            let tol = if dt == DType::F32 { 1e-5 } else { 2e-2 };
            assert!(rel(&gg[0], &gc[0]) < tol, "NHWC max pool grad {dt:?}");
        }
    }
}

/// BatchNorm's in-place running-statistic update on the GPU against the CPU, with the batch
/// statistic a view inside a `(2, C)` tensor (as the ResNet plugin passes it).
fn running_average_parity(gpu: &Device) {
    let cpu = Device::Cpu;
    let c = 2048;
    let stats = randn(&[2, c], 500, &cpu);
    let start = randn(&[c], 501, &cpu);
    let update = |dev: &Device| {
        let run = Var::from_tensor(&start.to_device(dev).unwrap()).unwrap();
        let s = stats.to_device(dev).unwrap();
        ops::running_average(&run, &s.get(1).unwrap(), 0.1, 1.0009).unwrap();
        run.as_tensor().to_device(&cpu).unwrap()
    };
    let d = max_diff(&update(&cpu), &update(gpu));
    assert!(d < 1e-6, "running_average: {d}");
}

/// `cim_ops::device::peak_bytes` sees a 256 MiB buffer, and `reset_peak` forgets it once freed.
fn pool_peak_check(gpu: &Device) {
    use cim_ops::device::{peak_bytes, reset_peak};
    const MIB: u64 = 1 << 20;
    gpu.synchronize().unwrap();
    reset_peak(gpu).unwrap();
    let base = peak_bytes(gpu).unwrap().expect("a CUDA device has a pool");
    let big = Tensor::ones(64 * MIB as usize, candle_core::DType::F32, gpu).unwrap();
    let last: f32 = big.get(64 * MIB as usize - 1).unwrap().to_scalar().unwrap();
    assert_eq!(last, 1.0);
    let with = peak_bytes(gpu).unwrap().unwrap();
    assert!(
        with >= base + 256 * MIB,
        "peak {with} after a 256 MiB buffer (base {base})"
    );
    drop(big);
    gpu.synchronize().unwrap();
    reset_peak(gpu).unwrap();
    let after = peak_bytes(gpu).unwrap().unwrap();
    assert!(
        after < with - 200 * MIB,
        "peak {after} after reset (was {with})"
    );
}

/// The flash kernels (bf16 on the GPU, tensor cores) against the f32 CPU attention on the same
/// bf16-rounded inputs: values, `dqkv`, and the log-sum-exp statistics on their own; ViT-B/16's
/// shape (197 tokens: no multiple of the 64- and 32-row tiles), a tiny one, and one longer than
/// the 64-key tiles of the backward several times over.
fn flash_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    for (b, n, h) in [(2, 197, 12), (1, 5, 1), (2, 300, 3)] {
        let d = 64;
        let round = |t: Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let qkv = round((randn(&[b, n, 3 * h * d], 40, &cpu) * 0.5).unwrap());
        let up = round(randn(&[b, n, h * d], 41, &cpu));
        let scale = 1.0 / (d as f64).sqrt();
        let f = |t: &[Tensor]| ops::attention_composed(&t[0], h, scale).unwrap();
        let (yc, gc) = run(&cpu, &f, std::slice::from_ref(&qkv), &up);
        let flash = |t: &[Tensor]| {
            ops::attention_qkv(&t[0].to_dtype(DType::BF16).unwrap(), h, scale, true)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let (yg, gg) = run(gpu, &flash, std::slice::from_ref(&qkv), &up);
        let dy = max_diff(&yc, &yg);
        assert!(dy < 0.03, "flash value ({b}, {n}, {h}): {dy}");
        let gscale: f32 = gc[0].abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        let dg = max_diff(&gc[0], &gg[0]);
        assert!(
            dg < 0.03 * gscale.max(1.0),
            "flash grad ({b}, {n}, {h}): {dg} of {gscale}"
        );
        let lse = |dev: &Device, dt: DType| {
            qkv.to_device(dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap()
                .apply_op1_no_bwd(&ops::FlashStatsOp {
                    heads: h,
                    scale: scale as f32,
                })
                .unwrap()
        };
        let dl = max_diff(&lse(&cpu, DType::F32), &lse(gpu, DType::BF16));
        assert!(dl < 1e-3, "flash log-sum-exp ({b}, {n}, {h}): {dl}");
        println!("     flash ({b}, {n}, {h}): value {dy:.2e}, dqkv {dg:.2e} (max {gscale:.2e}), lse {dl:.2e}");
    }
}

/// ReLU's one-pass kernels against the CPU's, f32 and bf16: values and gradients (exact: every
/// output is an input, a gradient or 0).
fn relu_parity(gpu: &Device) {
    use candle_core::DType;
    let cpu = Device::Cpu;
    let x = randn(&[4, 32, 14, 14], 110, &cpu);
    let up = randn(&[4, 32, 14, 14], 111, &cpu);
    let f = |t: &[Tensor]| ops::relu(&t[0]).unwrap();
    let (yc, gc) = run(&cpu, &f, std::slice::from_ref(&x), &up);
    let (yg, gg) = run(gpu, &f, std::slice::from_ref(&x), &up);
    assert_eq!(max_diff(&yc, &yg), 0.0, "relu f32 value");
    assert_eq!(max_diff(&gc[0], &gg[0]), 0.0, "relu f32 grad");
    let bf = |t: &[Tensor]| {
        ops::relu(&t[0].to_dtype(DType::BF16).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (yb, gb) = run(gpu, &bf, std::slice::from_ref(&x), &up);
    assert!(max_diff(&yc, &yb) < 0.02, "relu bf16 value");
    assert!(max_diff(&gc[0], &gb[0]) < 0.02, "relu bf16 grad");
}
