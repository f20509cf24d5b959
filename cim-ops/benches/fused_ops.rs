//! Fused vs composed ops, forward + backward, on the CPU (or CUDA with `--features cuda`, kernels
//! switched on): `cargo bench -p cim-ops --bench fused_ops`. Prints one line per op and shape:
//! milliseconds per forward+backward, composed / fused, and the speed-up.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use cim_ops as ops;

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() * 1e3 / reps as f64
}

fn report(name: &str, reps: usize, composed: impl FnMut(), fused: impl FnMut()) {
    report_as(name, reps, ("composed", composed), ("fused", fused));
}

/// One line: `a`'s and `b`'s milliseconds and `a / b`.
fn report_as(name: &str, reps: usize, a: (&str, impl FnMut()), b: (&str, impl FnMut())) {
    let (ta, tb) = (time(reps, a.1), time(reps, b.1));
    let (la, lb) = (a.0, b.0);
    println!(
        "{name:<44} {la} {ta:8.2} ms  {lb} {tb:8.2} ms  ×{:.2}",
        ta / tb
    );
}

fn main() -> candle_core::Result<()> {
    // The thread settings of `cim-run` (no spinning element-wise pool beside rayon's), and as
    // there, the work runs on one of rayon's workers.
    cim_ops::threads::settle_cpu_threads();
    cim_ops::threads::on_pool(bench)
}

fn bench() -> candle_core::Result<()> {
    let dev = if cfg!(feature = "cuda") {
        ops::set_cuda_kernels(true);
        cim_ops::device::open_cuda(0, true)?
    } else {
        Device::Cpu
    };
    let sync = |t: &Tensor| {
        let _ = t
            .sum_all()
            .and_then(|s| s.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>());
    };
    // (batch, tokens, heads, head width): the tiny CPU preset, ViT-S/16 and ViT-B/16 at 224 px.
    for (b, n, h, d, reps) in [(32, 65, 2, 32, 10), (8, 197, 6, 64, 5), (4, 197, 12, 64, 5)] {
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, 3 * h * d), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (b, n, h * d), &dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        let run = |fused: bool| {
            let o = if fused {
                ops::attention_qkv(&qkv, h, scale, false)
            } else {
                ops::attention_composed(&qkv, h, scale)
            }
            .unwrap();
            let g = (o * &up).unwrap().sum_all().unwrap().backward().unwrap();
            sync(g.get(&qkv).unwrap());
        };
        report(
            &format!("attention B{b} N{n} H{h} D{d}"),
            reps,
            || run(false),
            || run(true),
        );
        if dev.is_cpu() && ops::avx2_kernels() {
            // The fused CPU kernel's portable (SSE2) instance against its fast one, and on an
            // AVX-512 CPU its AVX2 + FMA instance against the AVX-512 one.
            let capped = |cap| {
                move || {
                    ops::set_cpu_kernels(cap);
                    run(true);
                    ops::set_cpu_kernels(ops::CpuKernels::Avx512);
                }
            };
            let best = ops::cpu_kernels();
            report_as(
                &format!("attention kernel B{b} N{n} H{h} D{d}"),
                reps,
                ("sse2", capped(ops::CpuKernels::Portable)),
                (best.name(), || run(true)),
            );
            if best == ops::CpuKernels::Avx512 {
                report_as(
                    &format!("attention kernel B{b} N{n} H{h} D{d}"),
                    reps,
                    ("avx2+fma", capped(ops::CpuKernels::Avx2Fma)),
                    ("avx512", || run(true)),
                );
            }
        }
        if dev.is_cuda() {
            // The CUDA attention kernel, against the same composed ops.
            let kernel = || {
                let o = ops::attention_qkv_kernel(&qkv, h, scale).unwrap().unwrap();
                let g = (o * &up).unwrap().sum_all().unwrap().backward().unwrap();
                sync(g.get(&qkv).unwrap());
            };
            report(
                &format!("attention kernel B{b} N{n} H{h} D{d}"),
                reps,
                || run(false),
                kernel,
            );
        }
    }
    if dev.is_cuda() {
        // bf16 attention of ViT-B/16's shape at batch 32: the GEMM path (the default) against the
        // flash kernels (`run.flash_attention`), forward + backward.
        let (b, n, h, d) = (32, 197, 12, 64);
        let qkv = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (b, n, 3 * h * d), &dev)?
                .to_dtype(candle_core::DType::BF16)?,
        )?;
        let up =
            Tensor::randn(0f32, 1.0, (b, n, h * d), &dev)?.to_dtype(candle_core::DType::BF16)?;
        let scale = 1.0 / (d as f64).sqrt();
        let run = |flash: bool| {
            let o = ops::attention_qkv(&qkv, h, scale, flash).unwrap();
            let g = (o * &up).unwrap().sum_all().unwrap().backward().unwrap();
            sync(g.get(&qkv).unwrap());
        };
        report_as(
            &format!("bf16 attention B{b} N{n} H{h} D{d}"),
            10,
            ("gemm", || run(false)),
            ("flash", || run(true)),
        );
    }
    // The MLP's bias + GELU: the tiny CPU preset's enhancer and ViT-B/16 (8 images).
    for (rows, d, reps) in [(32 * 65, 256, 10), (8 * 197, 3072, 3)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, d), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, d, &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (rows, d), &dev)?;
        let run = |fused: bool| {
            let y = if fused {
                ops::bias_gelu(&x, &bias)
            } else {
                ops::bias_gelu_composed(&x, &bias)
            }
            .unwrap();
            let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            sync(g.get(&x).unwrap());
            sync(g.get(&bias).unwrap());
        };
        report(
            &format!("bias + gelu {rows}x{d}"),
            reps,
            || run(false),
            || run(true),
        );
    }
    // Training BatchNorm at a ResNet-50 layer1 shape.
    let (b, c, hw) = (8, 256, 56);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, hw, hw), &dev)?)?;
    let gamma = Var::from_tensor(&Tensor::ones(c, candle_core::DType::F32, &dev)?)?;
    let beta = Var::from_tensor(&Tensor::zeros(c, candle_core::DType::F32, &dev)?)?;
    let up = Tensor::randn(0f32, 1.0, (b, c, hw, hw), &dev)?;
    let bn = |fused: bool| {
        let y = if fused {
            let stats = ops::channel_moments(&x).unwrap().unwrap();
            ops::batch_norm_train(&x, &stats, &gamma, &beta, 1e-5)
        } else {
            ops::batch_norm_train_composed(&x, &gamma, &beta, 1e-5)
        }
        .unwrap();
        let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        sync(g.get(&x).unwrap());
    };
    report(
        &format!("batch norm B{b} C{c} {hw}x{hw}"),
        3,
        || bn(false),
        || bn(true),
    );
    // A bottleneck's end, relu(bn(x) + r): the BatchNorm node, the add and the ReLU as separate
    // nodes against one node (under a gradient sink, as a training step runs it).
    let r = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, hw, hw), &dev)?)?;
    let tail = |one: bool| {
        let sink = ops::GradSink::install_if(one);
        let (xa, ra) = (
            (x.as_tensor() * 1.0).unwrap(),
            (r.as_tensor() * 1.0).unwrap(),
        );
        let stats = ops::channel_moments(&xa).unwrap().unwrap();
        let y = if one {
            let t = ops::BnTail {
                residual: Some(&ra),
                relu: true,
            };
            ops::batch_norm_train_tail(&xa, &stats, &gamma, &beta, 1e-5, false, t)
        } else {
            let y = ops::batch_norm_train(&xa, &stats, &gamma, &beta, 1e-5).unwrap();
            ops::relu(&(y + &ra).unwrap())
        }
        .unwrap();
        let g = sink
            .backward(&(y * &up).unwrap().sum_all().unwrap())
            .unwrap();
        sync(g.get(&x).unwrap());
    };
    report_as(
        &format!("relu(bn(x) + r) B{b} C{c} {hw}x{hw}"),
        3,
        ("separate", || tail(false)),
        ("one node", || tail(true)),
    );
    // The ResNet stem pool (112 → 56) against the composed 9-view maximum.
    let x = Var::from_tensor(&Tensor::rand(0f32, 1.0, (b, 64, 112, 112), &dev)?)?;
    let up = Tensor::randn(0f32, 1.0, (b, 64, 56, 56), &dev)?;
    let pool = |fused: bool| {
        let y = if fused {
            ops::max_pool_3x3_s2(&x).unwrap().unwrap()
        } else {
            composed_pool(&x).unwrap()
        };
        let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        sync(g.get(&x).unwrap());
    };
    report(
        &format!("max pool 3x3/2 B{b} C64 112x112"),
        3,
        || pool(false),
        || pool(true),
    );
    // Convolution: im2col + GEMM against candle's conv2d (CPU only: CUDA keeps candle's/cuDNN's).
    // ResNet-50's stem and a layer1 3×3 with both gradients; the real dVAE encoder's first-group
    // 3×3 forward only (it is frozen); the tiny CPU presets' sizes, where one image's GEMM is a few
    // MFLOP (cim runs one image per thread).
    if dev.is_cpu() {
        for (name, (b, c, hw, c_out, k, stride), grads, reps) in [
            (
                "conv 7x7/2 3->64 B8 224x224 fwd+bwd",
                (8, 3, 224, 64, 7, 2),
                true,
                3,
            ),
            (
                "conv 3x3 64->64 B8 56x56 fwd+bwd",
                (8, 64, 56, 64, 3, 1),
                true,
                3,
            ),
            (
                "conv 3x3 64->64 B8 112x112 fwd (dVAE)",
                (8, 64, 112, 64, 3, 1),
                false,
                3,
            ),
            (
                "conv 3x3 16->16 B32 32x32 fwd (tiny dVAE)",
                (32, 16, 32, 16, 3, 1),
                false,
                20,
            ),
            (
                "conv 3x3 32->32 B32 16x16 fwd+bwd (tiny)",
                (32, 32, 16, 32, 3, 1),
                true,
                20,
            ),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, hw, hw), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (c_out, c, k, k), &dev)?)?;
            let conv = |fused: bool| {
                let y = if fused {
                    ops::conv2d(&x, &w, k / 2, stride).unwrap()
                } else {
                    x.conv2d(&w, k / 2, stride, 1, 1).unwrap()
                };
                if grads {
                    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    sync(g.get(&x).unwrap());
                    sync(g.get(&w).unwrap());
                } else {
                    sync(&y);
                }
            };
            report(name, reps, || conv(false), || conv(true));
        }
    }
    // The tokenizer's argmax over the paper's dVAE vocabulary (8192) at its 14×14 grid.
    if dev.is_cpu() {
        let logits = Tensor::randn(0f32, 1.0, (32, 8192, 14, 14), &dev)?;
        report(
            "argmax channels B32 C8192 14x14",
            5,
            || {
                sync(
                    &logits
                        .argmax(1)
                        .unwrap()
                        .to_dtype(candle_core::DType::F32)
                        .unwrap(),
                )
            },
            || {
                let ids = ops::argmax_channels(&logits).unwrap();
                sync(&ids.to_dtype(candle_core::DType::F32).unwrap())
            },
        );
    }
    // RESPIX target + loss at 224 px, ViT-B/16 head layout.
    let b = 8;
    let img = Tensor::rand(0f32, 1.0, (b, 3, 224, 224), &dev)?;
    let tokens = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, 196, 768), &dev)?)?;
    let loss = |fused: bool| {
        let (target, pred) = if fused {
            (
                ops::respix_sliding_target(&img, 8, 1e-6).unwrap().unwrap(),
                None,
            )
        } else {
            (
                composed_target(&img).unwrap(),
                Some(unpatchify(&tokens).unwrap()),
            )
        };
        let l = match pred {
            None => ops::respix_loss(&tokens, &target, 16).unwrap().unwrap(),
            Some(p) => {
                let d = (p - &target).unwrap();
                (d.abs().unwrap().mean_all().unwrap() + d.sqr().unwrap().mean_all().unwrap())
                    .unwrap()
            }
        };
        sync(l.backward().unwrap().get(&tokens).unwrap());
    };
    report(
        &format!("respix target+loss B{b} 224px"),
        5,
        || loss(false),
        || loss(true),
    );
    // AdamW over ViT-B-sized parameters (86 M in 150 tensors of 768×768·k).
    let params: Vec<Tensor> = (0..50)
        .map(|i| Tensor::randn(0f32, 1.0, (768, 768 * (1 + i % 4)), &dev))
        .collect::<candle_core::Result<_>>()?;
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.ones_like())
        .collect::<candle_core::Result<_>>()?;
    let mut moments: Vec<Tensor> = params
        .iter()
        .map(|p| Tensor::zeros((2, p.elem_count()), candle_core::DType::F32, &dev))
        .collect::<candle_core::Result<_>>()?;
    let step = ops::AdamStep {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay: 0.05,
        t: 1,
        grad_scale: 1.0,
    };
    let mut composed_params = params.clone();
    let mut composed_moments = moments.clone();
    report(
        &format!(
            "adamw {} M params",
            params.iter().map(|p| p.elem_count()).sum::<usize>() / 1_000_000
        ),
        3,
        || {
            for i in 0..params.len() {
                let (p, m) = ops::adamw_composed(
                    &composed_params[i],
                    &composed_moments[i],
                    &grads[i],
                    &step,
                )
                .unwrap();
                composed_params[i] = p;
                composed_moments[i] = m;
            }
            sync(&composed_params[0]);
        },
        || {
            for i in 0..params.len() {
                assert!(ops::adamw_update(&params[i], &moments[i], &grads[i], &step).unwrap());
            }
            sync(&params[0]);
        },
    );
    moments.clear();
    // The optimizer step as the runner runs it — the clipping norm over every gradient, then AdamW
    // — over ViT-B/16's 12 blocks (144 tensors, 85 M values, biases and norms included): per
    // parameter (candle ops for the norm, two kernels per parameter) against
    // `sum_of_squares` + `adamw_update_all` (on CUDA one launch for the norm, one per 64 tensors).
    let shapes: Vec<Vec<usize>> = (0..12)
        .flat_map(|_| {
            [
                vec![2304, 768],
                vec![2304],
                vec![768, 768],
                vec![768],
                vec![3072, 768],
                vec![3072],
                vec![768, 3072],
                vec![768],
                vec![768],
                vec![768],
                vec![768],
                vec![768],
            ]
        })
        .collect();
    let params: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(0f32, 1.0, s.as_slice(), &dev))
        .collect::<candle_core::Result<_>>()?;
    let grads: Vec<Tensor> = params.iter().map(|p| (p * 0.01).unwrap()).collect();
    let moments: Vec<Tensor> = params
        .iter()
        .map(|p| Tensor::zeros((2, p.elem_count()), candle_core::DType::F32, &dev))
        .collect::<candle_core::Result<_>>()?;
    let grad_refs: Vec<&Tensor> = grads.iter().collect();
    let items: Vec<ops::AdamItem> = (0..params.len())
        .map(|i| ops::AdamItem {
            param: &params[i],
            moments: &moments[i],
            grad: &grads[i],
            step,
        })
        .collect();
    report_as(
        &format!("optimizer step, {} tensors", params.len()),
        5,
        ("per param", || {
            let sums: Vec<Tensor> = grads
                .iter()
                .map(|g| ops::square_sums_composed(g).unwrap())
                .collect();
            let norm = Tensor::cat(&sums, 0).unwrap().sum_all().unwrap();
            let _ = norm.to_scalar::<f32>().unwrap();
            for it in &items {
                assert!(ops::adamw_update(it.param, it.moments, it.grad, &it.step).unwrap());
            }
            sync(&params[0]);
        }),
        ("all at once", || {
            let _ = ops::sum_of_squares(&grad_refs).unwrap();
            assert!(ops::adamw_update_all(&items).unwrap());
            sync(&params[0]);
        }),
    );
    drop(items);
    // A whole pre-norm transformer block, recorded op by op (the fused ops above) against one
    // node (ops::pre_norm_block): the tiny CPU preset and ViT-B/16 (on CUDA also in bf16 with f32
    // parameters, at 32 images).
    let vitb_batch = if dev.is_cuda() { 32 } else { 2 };
    let dtypes: &[candle_core::DType] = if dev.is_cuda() {
        &[candle_core::DType::F32, candle_core::DType::BF16]
    } else {
        &[candle_core::DType::F32]
    };
    for (b, n, d, h, reps) in [(32, 65, 64, 2, 20), (vitb_batch, 197, 768, 12, 5)] {
        let params = ops::block_param_shapes(d, 4 * d)
            .iter()
            .map(|(_, s)| Var::from_tensor(&(Tensor::randn(0f32, 0.02, s.as_slice(), &dev)?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        for &dt in dtypes {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, d), &dev)?)?;
            let up = Tensor::randn(0f32, 1.0, (b, n, d), &dev)?.to_dtype(dt)?;
            let p: Vec<&Tensor> = params.iter().map(|v| v.as_tensor()).collect();
            let run = |fused: bool| {
                let xt = x.as_tensor().to_dtype(dt).unwrap();
                let y = if fused {
                    let bp = ops::BlockParams::from_slice(&std::array::from_fn(|i| p[i]));
                    ops::pre_norm_block(&xt, &bp, h, 1e-6, None, false)
                        .unwrap()
                        .unwrap()
                } else {
                    recorded_block(&xt, &p, h).unwrap()
                };
                let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                sync(g.get(&x).unwrap());
            };
            report(
                &format!("block B{b} N{n} D{d} H{h} {dt:?}"),
                reps,
                || run(false),
                || run(true),
            );
            // The same node with its parameters packed into one graph input against sunk into a
            // GradSink (as `cim-run` trains): the block input is an activation here, as in a model.
            let node = |sunk: bool| {
                let xt = x
                    .as_tensor()
                    .affine(1.0, 0.0)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let sink = sunk.then(ops::GradSink::install);
                let bp = ops::BlockParams::from_slice(&std::array::from_fn(|i| p[i]));
                let y = ops::pre_norm_block(&xt, &bp, h, 1e-6, None, false)
                    .unwrap()
                    .unwrap();
                let loss = (y * &up).unwrap().sum_all().unwrap();
                let g = match &sink {
                    Some(s) => s.backward(&loss).unwrap(),
                    None => loss.backward().unwrap(),
                };
                sync(g.get(&params[11]).unwrap());
            };
            report_as(
                &format!("block node B{b} N{n} D{d} H{h} {dt:?}"),
                reps,
                ("packed", || node(false)),
                ("sunk", || node(true)),
            );
        }
    }
    Ok(())
}

/// The composed sliding-window target (the objectives plugin's reference, restated here so the
/// bench depends on cim-ops only): box sums by shifted slices.
fn composed_target(x: &Tensor) -> candle_core::Result<Tensor> {
    let (k, before) = (8usize, 4usize);
    let box_sum = |t: &Tensor, dim: usize| -> candle_core::Result<Tensor> {
        let n = t.dim(dim)?;
        let padded = t.pad_with_zeros(dim, before, k - 1 - before)?;
        let mut acc = padded.narrow(dim, 0, n)?;
        for s in 1..k {
            acc = (acc + padded.narrow(dim, s, n)?)?;
        }
        Ok(acc)
    };
    let ones = x.ones_like()?;
    let count = box_sum(&box_sum(&ones, 2)?, 3)?;
    let mean = (box_sum(&box_sum(x, 2)?, 3)? / &count)?;
    let mean_sq = (box_sum(&box_sum(&x.sqr()?, 2)?, 3)? / &count)?;
    let var = (mean_sq - mean.sqr()?)?.relu()?;
    x.sub(&mean)?.div(&(var + 1e-6)?.sqrt()?)
}

fn unpatchify(t: &Tensor) -> candle_core::Result<Tensor> {
    let b = t.dim(0)?;
    t.reshape((b, 14, 14, 16, 16, 3))?
        .permute((0, 5, 1, 3, 2, 4))?
        .contiguous()?
        .reshape((b, 3, 224, 224))
}

/// The 9-view composition of the stem pool (the ResNet plugin's reference, restated here).
fn composed_pool(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    let xp = x
        .pad_with_zeros(2, 1, 2 * ho + 1 - h)?
        .pad_with_zeros(3, 1, 2 * wo + 1 - w)?;
    let strided = |t: &Tensor, dim: usize, start: usize, n: usize| -> candle_core::Result<Tensor> {
        let mut shape = t.dims().to_vec();
        shape[dim] = n;
        shape.insert(dim + 1, 2);
        t.narrow(dim, start, 2 * n)?
            .reshape(shape)?
            .narrow(dim + 1, 0, 1)?
            .squeeze(dim + 1)
    };
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        let rows = strided(&xp, 2, dy, ho)?;
        for dx in 0..3 {
            let v = strided(&rows, 3, dx, wo)?;
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v)?,
            });
        }
    }
    Ok(out.expect("9 views"))
}

/// The ViT plugin's recorded block, restated from the public ops: mixed LayerNorm, linear layers
/// (weights cast to the activations' dtype, fused bias add), attention, bias + GELU, residuals.
fn recorded_block(x: &Tensor, p: &[&Tensor], heads: usize) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    let lin = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| -> candle_core::Result<Tensor> {
        let (bn, n, d) = x.dims3()?;
        let y = x
            .reshape((bn * n, d))?
            .matmul(&w.to_dtype(dt)?.t()?)?
            .reshape((bn, n, w.dim(0)?))?;
        match b {
            Some(b) => ops::bias_add(&y, &b.to_dtype(dt)?),
            None => Ok(y),
        }
    };
    let d = x.dim(2)?;
    let scale = 1.0 / ((d / heads) as f64).sqrt();
    let a = ops::attention_qkv(
        &lin(
            &ops::layer_norm_mixed(x, p[0], p[1], 1e-6)?,
            p[2],
            Some(p[3]),
        )?,
        heads,
        scale,
        false,
    )?;
    let x1 = (x + lin(&a, p[4], Some(p[5]))?)?;
    let h = ops::bias_gelu(
        &lin(&ops::layer_norm_mixed(&x1, p[6], p[7], 1e-6)?, p[8], None)?,
        p[9],
    )?;
    &x1 + lin(&h, p[10], Some(p[11]))?
}
