//! CUDA twins of the fused CPU kernels (`kernels/ops.cu`, compiled to PTX by build.rs).
//!
//! Used when [`super::set_cuda_kernels`] switched them on (config `run.cuda_kernels`, on by default
//! since their parity tests, `tests/ops_cuda.rs` with `--features cuda`, passed on an H200).

// Kernel launches are FFI: the only unsafe code of the workspace lives here.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape};

/// Storage types the kernels read and write (arithmetic is f32 either way).
pub trait KernelFloat:
    CudaDType
    + candle_core::WithDType
    + candle_core::cuda_backend::cudarc::driver::DeviceRepr
    + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
{
}
impl KernelFloat for f32 {}
impl KernelFloat for half::bf16 {}
impl KernelFloat for half::f16 {}

/// Runs `$f::<T>(args)` with `T` the storage type of `$s` (f32, bf16 or f16; which kernels
/// exist for a type is [`dtype_kernel`]'s to check).
macro_rules! by_dtype {
    ($s:expr, $f:ident($($arg:expr),*)) => {
        match $s.dtype() {
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            _ => $f::<f32>($($arg),*),
        }
    };
}

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cim_ops.ptx"));
const MODULE: &str = "cim_ops";
const THREADS: u32 = 256;

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("{what}: fused op needs a contiguous tensor"))
    })?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// An output buffer of `n` elements that the kernel about to be launched writes in full: not
/// zero-filled (`alloc_zeros` is a memset pass over it; the outputs here are activation-sized,
/// up to 1.6 GB for the dVAE's maps at batch 128).
fn alloc_written<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &candle_core::cuda_backend::CudaDevice,
    n: usize,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
    // SAFETY: every caller launches, right after, a kernel that writes all `n` elements (one
    // thread per element or one block per row covering every element of its row) before
    // anything reads them, or passes the buffer as a placeholder no kernel reads;
    // `tests/ops_cuda.rs` checks every kernel's output against the CPU.
    unsafe { dev.alloc::<T>(n) }
}

/// One block of `THREADS` per row.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn dims(l: &Layout) -> Result<(usize, usize)> {
    let d = super::last_dim(l)?;
    Ok((l.shape().elem_count() / d, d))
}

/// LayerNorm rows: `x` (and the output) f32 or bf16, weight and bias f32.
pub fn layer_norm_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s1, layer_norm_fwd_t(s1, l1, s2, l2, s3, l3, eps))
}

fn layer_norm_fwd_t<T: KernelFloat>(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (x, w, b) = (
        view::<T>(s1, l1, "x")?,
        view::<f32>(s2, l2, "weight")?,
        view::<f32>(s3, l3, "bias")?,
    );
    let (rows, d) = dims(l1)?;
    let y = alloc_written::<T>(&dev, rows * d)?;
    let (base, cfg) = row_kernel("cim_layer_norm_fwd", rows, d, 2048);
    let func = dev.get_or_load_custom_func(&dtype_kernel(&base, s1.dtype())?, MODULE, PTX)?;
    let (r, dd) = (rows as i32, d as i32);
    let mut a = func.builder();
    a.arg(&x).arg(&w).arg(&b).arg(&y).arg(&r).arg(&dd).arg(&eps);
    // SAFETY: argument types and counts match both kernels' signatures; buffers hold rows·d
    // values; `cfg` covers every row.
    unsafe { a.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// `(rows + 2, d)` f32: dx rows, then dw, then db (the CPU op's packing); `x` and `dy` f32 or
/// bf16 (one dtype).
pub fn layer_norm_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    same_dtype("layer_norm backward", ("x", s1), ("dy", s3))?;
    by_dtype!(s1, layer_norm_bwd_t(s1, l1, s2, l2, s3, l3, eps))
}

fn layer_norm_bwd_t<T: KernelFloat>(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (x, w, dy) = (
        view::<T>(s1, l1, "x")?,
        view::<f32>(s2, l2, "weight")?,
        view::<T>(s3, l3, "grad")?,
    );
    let (rows, d) = dims(l1)?;
    // dx rows (every row by the dx kernel) and dw, db (every column by the chunk sum) are all
    // written; so are the row statistics and the partials.
    let mut out = alloc_written::<f32>(&dev, (rows + 2) * d)?;
    let stats = alloc_written::<f32>(&dev, 2 * rows)?;
    let (r, dd) = (rows as i32, d as i32);
    {
        let mut dx = out.slice_mut(0..rows * d);
        let (base, cfg) = row_kernel("cim_layer_norm_bwd_dx", rows, d, 2048);
        let func = dev.get_or_load_custom_func(&dtype_kernel(&base, s1.dtype())?, MODULE, PTX)?;
        let mut a = func.builder();
        a.arg(&x)
            .arg(&w)
            .arg(&dy)
            .arg(&mut dx)
            .arg(&stats)
            .arg(&r)
            .arg(&dd)
            .arg(&eps);
        // SAFETY: as above; `stats` holds 2·rows floats.
        unsafe { a.launch(cfg) }.w()?;
    }
    {
        // dw, db: per-chunk partial sums, then their sum in chunk order (kernels/ops.cu).
        const LN_CHUNK: usize = 256;
        let chunks = rows.div_ceil(LN_CHUNK).max(1);
        let partial = alloc_written::<f32>(&dev, chunks * 2 * d)?;
        let func = dev.get_or_load_custom_func(
            &dtype_kernel("cim_layer_norm_bwd_dwdb_partial", s1.dtype())?,
            MODULE,
            PTX,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(32) as u32, chunks as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let mut a = func.builder();
        a.arg(&x)
            .arg(&dy)
            .arg(&stats)
            .arg(&partial)
            .arg(&r)
            .arg(&dd);
        // SAFETY: argument types and counts match the kernel's signature; `partial` holds
        // chunks·2·d floats.
        unsafe { a.launch(cfg) }.w()?;
        let mut dwdb = out.slice_mut(rows * d..);
        // The partials are chunks rows of 2·d columns (dw then db): the shared chunk sum.
        let func = dev.get_or_load_custom_func("cim_col_sum_chunks", MODULE, PTX)?;
        let (n_chunks, width) = (chunks as i32, 2 * d as i32);
        let mut a = func.builder();
        a.arg(&partial).arg(&mut dwdb).arg(&n_chunks).arg(&width);
        // SAFETY: one thread per output; `dwdb` holds 2·d floats.
        unsafe { a.launch(per_element(2 * d)) }.w()?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((rows + 2, d)),
    ))
}

/// Both inputs in one dtype (the backward kernels read `x` and `dy` through one type), else an
/// error naming the op and both dtypes.
fn same_dtype(op: &str, a: (&str, &CudaStorage), b: (&str, &CudaStorage)) -> Result<()> {
    if a.1.dtype() != b.1.dtype() {
        candle_core::bail!(
            "{op}: {} is {:?}, {} {:?}",
            a.0,
            a.1.dtype(),
            b.0,
            b.1.dtype()
        );
    }
    Ok(())
}

/// The kernel for `dtype`: `base` for f32, `base_bf16` for bf16, `base_f16` for f16 (the
/// dVAE's map kernels: [`channel_bias`], [`resample_2x`]).
fn dtype_kernel(base: &str, dtype: candle_core::DType) -> Result<String> {
    const WITH_F16: [&str; 7] = [
        "cim_channel_bias",
        "cim_max_pool_2x2",
        "cim_upsample_2x",
        "cim_argmax_channels",
        "cim_max_pool_2x2_nhwc",
        "cim_upsample_2x_nhwc",
        "cim_argmax_rows",
    ];
    match dtype {
        candle_core::DType::F32 => Ok(base.to_string()),
        candle_core::DType::BF16 => Ok(format!("{base}_bf16")),
        candle_core::DType::F16 if WITH_F16.contains(&base) => Ok(format!("{base}_f16")),
        other => candle_core::bail!("{base}: no kernel for {other:?}"),
    }
}

/// Softmax over the first `valid` entries of the last dimension (the rest 0), f32 or bf16 (f32
/// arithmetic).
pub fn softmax_fwd(s: &CudaStorage, l: &Layout, valid: usize) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s, softmax_fwd_t(s, l, valid))
}

fn softmax_fwd_t<T>(s: &CudaStorage, l: &Layout, valid: usize) -> Result<(CudaStorage, Shape)>
where
    T: CudaDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
{
    let dev = s.device().clone();
    let x = view::<T>(s, l, "x")?;
    let (rows, d) = dims(l)?;
    let y = alloc_written::<T>(&dev, rows * d)?;
    let (base, cfg) = row_kernel("cim_softmax_fwd", rows, d, 1024);
    let func = dev.get_or_load_custom_func(&dtype_kernel(&base, s.dtype())?, MODULE, PTX)?;
    let (r, dd, vv) = (rows as i32, d as i32, valid.min(d) as i32);
    let mut a = func.builder();
    a.arg(&x).arg(&y).arg(&r).arg(&dd).arg(&vv);
    // SAFETY: argument types and counts match both kernels' signatures; `cfg` covers every row.
    unsafe { a.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l.shape().clone()))
}

/// A row kernel for rows of `d` and its launch: `{base}_warp`, one warp per row (8 rows per
/// block), up to `warp_max` columns; `base`, one block per row, beyond.
fn row_kernel(base: &str, rows: usize, d: usize, warp_max: usize) -> (String, LaunchConfig) {
    const ROWS_PER_BLOCK: usize = THREADS as usize / 32;
    if d > warp_max {
        return (base.to_string(), per_row(rows));
    }
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    (format!("{base}_warp"), cfg)
}

/// `y · (dy − Σ dy·y)` per row, f32 or bf16 (both inputs of one dtype).
pub fn softmax_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    same_dtype("softmax backward", ("y", s1), ("dy", s2))?;
    by_dtype!(s1, softmax_bwd_t(s1, l1, s2, l2))
}

fn softmax_bwd_t<T>(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)>
where
    T: CudaDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
{
    let dev = s1.device().clone();
    let (y, g) = (view::<T>(s1, l1, "y")?, view::<T>(s2, l2, "grad")?);
    let (rows, d) = dims(l1)?;
    let dx = alloc_written::<T>(&dev, rows * d)?;
    let (base, cfg) = row_kernel("cim_softmax_bwd", rows, d, 1024);
    let func = dev.get_or_load_custom_func(&dtype_kernel(&base, s1.dtype())?, MODULE, PTX)?;
    let (r, dd) = (rows as i32, d as i32);
    let mut a = func.builder();
    a.arg(&y).arg(&g).arg(&dx).arg(&r).arg(&dd);
    // SAFETY: argument types and counts match both kernels' signatures; `cfg` covers every row.
    unsafe { a.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), l1.shape().clone()))
}

/// Per-row `logsumexp(x) − x[t]` (f32) of logits `x` (f32 or bf16).
pub fn cross_entropy_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s1, cross_entropy_fwd_t(s1, l1, s2, l2))
}

fn cross_entropy_fwd_t<T: KernelFloat>(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (x, t) = (
        view::<T>(s1, l1, "logits")?,
        view::<u32>(s2, l2, "targets")?,
    );
    let (rows, v) = dims(l1)?;
    let loss = alloc_written::<f32>(&dev, rows)?;
    let func = dev.get_or_load_custom_func(
        &dtype_kernel("cim_cross_entropy_fwd", s1.dtype())?,
        MODULE,
        PTX,
    )?;
    let (r, vv) = (rows as i32, v as i32);
    let mut a = func.builder();
    a.arg(&x).arg(&t).arg(&loss).arg(&r).arg(&vv);
    // SAFETY: argument types and counts match the kernel's signature; targets < v is the
    // caller's contract (checked on CPU; on CUDA an out-of-range id reads out of the row).
    unsafe { a.launch(per_row(rows)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(loss, dev), Shape::from(rows)))
}

/// `(softmax(x) − onehot(t))·g` in `x`'s dtype (f32 or bf16), `g` f32 per row.
pub fn cross_entropy_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s1, cross_entropy_bwd_t(s1, l1, s2, l2, s3, l3))
}

fn cross_entropy_bwd_t<T: KernelFloat>(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (x, t, g) = (
        view::<T>(s1, l1, "logits")?,
        view::<u32>(s2, l2, "targets")?,
        view::<f32>(s3, l3, "grad")?,
    );
    let (rows, v) = dims(l1)?;
    let dx = alloc_written::<T>(&dev, rows * v)?;
    let func = dev.get_or_load_custom_func(
        &dtype_kernel("cim_cross_entropy_bwd", s1.dtype())?,
        MODULE,
        PTX,
    )?;
    let (r, vv) = (rows as i32, v as i32);
    let mut a = func.builder();
    a.arg(&x).arg(&t).arg(&g).arg(&dx).arg(&r).arg(&vv);
    // SAFETY: argument types and counts match the kernel's signature.
    unsafe { a.launch(per_row(rows)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), l1.shape().clone()))
}

/// One thread per element.
fn per_element(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub fn respix_target(
    s: &CudaStorage,
    l: &Layout,
    k: usize,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let x = view::<f32>(s, l, "x")?;
    let (b, c, h, w) = l.shape().dims4()?;
    let n = b * c * h * w;
    let y = alloc_written::<f32>(&dev, n)?;
    let func = dev.get_or_load_custom_func("cim_respix_target", MODULE, PTX)?;
    let (planes, hh, ww, kk) = ((b * c) as i32, h as i32, w as i32, k as i32);
    let mut a = func.builder();
    a.arg(&x)
        .arg(&y)
        .arg(&planes)
        .arg(&hh)
        .arg(&ww)
        .arg(&kk)
        .arg(&eps);
    // SAFETY: argument types and counts match the kernel's signature; n threads read x, write y.
    unsafe { a.launch(per_element(n)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l.shape().clone()))
}

pub fn respix_loss_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    [p, c, h, w]: [i32; 4],
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (pred, target) = (
        view::<f32>(s1, l1, "prediction")?,
        view::<f32>(s2, l2, "target")?,
    );
    let (rows, _) = dims(l1)?;
    let out = alloc_written::<f32>(&dev, rows)?;
    let func = dev.get_or_load_custom_func("cim_respix_loss_fwd", MODULE, PTX)?;
    let r = rows as i32;
    let mut a = func.builder();
    a.arg(&pred)
        .arg(&target)
        .arg(&out)
        .arg(&r)
        .arg(&p)
        .arg(&c)
        .arg(&h)
        .arg(&w);
    // SAFETY: argument types and counts match the kernel's signature; the caller checked that
    // the prediction tiles the target.
    unsafe { a.launch(per_row(rows)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
}

pub fn respix_loss_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    [p, c, h, w]: [i32; 4],
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (pred, target, g) = (
        view::<f32>(s1, l1, "prediction")?,
        view::<f32>(s2, l2, "target")?,
        view::<f32>(s3, l3, "grad")?,
    );
    let n = l1.shape().elem_count();
    let dp = alloc_written::<f32>(&dev, n)?;
    let func = dev.get_or_load_custom_func("cim_respix_loss_bwd", MODULE, PTX)?;
    let nn = n as i64;
    let mut a = func.builder();
    a.arg(&pred)
        .arg(&target)
        .arg(&g)
        .arg(&dp)
        .arg(&nn)
        .arg(&p)
        .arg(&c)
        .arg(&h)
        .arg(&w);
    // SAFETY: argument types and counts match the kernel's signature.
    unsafe { a.launch(per_element(n)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(dp, dev), l1.shape().clone()))
}

fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("{what}: fused op needs a contiguous tensor"))
    })
}

pub fn adamw_moments(
    s1: &mut CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    b1: f32,
    b2: f32,
    k: f32,
) -> Result<()> {
    let dev = s1.device().clone();
    let g = view::<f32>(s2, l2, "gradient")?;
    let n = l2.shape().elem_count();
    let (a, b) = offsets(l1, "moments")?;
    let mut mv = s1.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
    let func = dev.get_or_load_custom_func("cim_adamw_moments", MODULE, PTX)?;
    let nn = n as i64;
    let mut args = func.builder();
    args.arg(&mut mv).arg(&g).arg(&nn).arg(&b1).arg(&b2).arg(&k);
    // SAFETY: argument types and counts match the kernel's signature; mv holds 2n floats.
    unsafe { args.launch(per_element(n)) }.w()?;
    Ok(())
}

/// `r = keep·r + add·x` in place (f32, `r` and `x` of one length).
pub fn running_average(
    s1: &mut CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    keep: f32,
    add: f32,
) -> Result<()> {
    let dev = s1.device().clone();
    let x = view::<f32>(s2, l2, "batch statistic")?;
    let n = l1.shape().elem_count();
    let (a, b) = offsets(l1, "running statistic")?;
    let mut r = s1.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
    let func = dev.get_or_load_custom_func("cim_running_average", MODULE, PTX)?;
    let nn = n as i64;
    let mut args = func.builder();
    args.arg(&mut r).arg(&x).arg(&nn).arg(&keep).arg(&add);
    // SAFETY: argument types and counts match the kernel's signature; r and x hold n floats each
    // (shapes checked by the caller).
    unsafe { args.launch(per_element(n)) }.w()?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn adamw_apply(
    s1: &mut CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    lr: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
) -> Result<()> {
    let dev = s1.device().clone();
    let mv = view::<f32>(s2, l2, "moments")?;
    let n = l1.shape().elem_count();
    let (a, b) = offsets(l1, "parameter")?;
    let mut p = s1.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
    let func = dev.get_or_load_custom_func("cim_adamw_apply", MODULE, PTX)?;
    let nn = n as i64;
    let mut args = func.builder();
    args.arg(&mut p)
        .arg(&mv)
        .arg(&nn)
        .arg(&lr)
        .arg(&decay)
        .arg(&bc1)
        .arg(&bc2)
        .arg(&eps);
    // SAFETY: argument types and counts match the kernel's signature; p holds n floats, mv 2n.
    unsafe { args.launch(per_element(n)) }.w()?;
    Ok(())
}

/// Four warps (query rows) per block; grid `(⌈N/4⌉, B·H)` for the geometry `[B, N, H, Dh]`.
fn per_query_row([b, n, h, _]: [i32; 4]) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(4), (b * h) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Attention of `qkv` of geometry `g = [B, N, H, Dh]`, scores scaled by `scale`.
pub fn attention_fwd(
    s: &CudaStorage,
    l: &Layout,
    g: [i32; 4],
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let qkv = view::<f32>(s, l, "qkv")?;
    let [b, n, h, d] = g;
    let out = alloc_written::<f32>(&dev, (b * n * h * d) as usize)?;
    let func = dev.get_or_load_custom_func("cim_attention_fwd", MODULE, PTX)?;
    let mut a = func.builder();
    a.arg(&qkv)
        .arg(&out)
        .arg(&b)
        .arg(&n)
        .arg(&h)
        .arg(&d)
        .arg(&scale);
    // SAFETY: argument types and counts match the kernel's signature; D ≤ 128 was checked by
    // the caller (cuda_max_head_dim).
    unsafe { a.launch(per_query_row(g)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((b as usize, n as usize, (h * d) as usize)),
    ))
}

pub fn attention_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    g: [i32; 4],
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (qkv, dout) = (view::<f32>(s1, l1, "qkv")?, view::<f32>(s2, l2, "grad")?);
    let dqkv = dev.alloc_zeros::<f32>(l1.shape().elem_count())?;
    let func = dev.get_or_load_custom_func("cim_attention_bwd", MODULE, PTX)?;
    let [b, n, h, d] = g;
    let mut a = func.builder();
    a.arg(&qkv)
        .arg(&dout)
        .arg(&dqkv)
        .arg(&b)
        .arg(&n)
        .arg(&h)
        .arg(&d)
        .arg(&scale);
    // SAFETY: as above; dqkv is zeroed (the kernel accumulates dk, dv atomically).
    unsafe { a.launch(per_query_row(g)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(dqkv, dev), l1.shape().clone()))
}

/// `[outer, C, inner]` of a BatchNorm map: `(B, C, H·W)` channels first, `(B·H·W, C, 1)` channels
/// last (`last`, dims `(B, H, W, C)`); the channel of element `i` is `(i / inner) % C` either way.
fn bn_geom(l: &Layout, last: bool) -> Result<[i32; 3]> {
    let (a, b, c, d) = l.shape().dims4()?;
    let dims = match last {
        false => [a, b, c * d],
        true => [a * b * c, d, 1],
    };
    dims.iter()
        .map(|&v| {
            i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("batch_norm: {v} exceeds i32")))
        })
        .collect::<Result<Vec<_>>>()
        .map(|v| [v[0], v[1], v[2]])
}

/// The BatchNorm reductions' grid: `(C, chunks)` blocks, each over `ipc` whole planes of one
/// channel (about 16 384 elements), so that even C = 64 at batch 128 fills the GPU.
fn bn_grid(b: i32, c: i32, hw: i32) -> (LaunchConfig, i32, i32) {
    let ipc = (16_384 / hw.max(1)).clamp(1, b.max(1));
    let chunks = (b + ipc - 1) / ipc;
    let cfg = LaunchConfig {
        grid_dim: (c as u32, chunks.max(1) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    (cfg, ipc, chunks.max(1))
}

/// The channels-last reductions' grid: `(⌈C/32⌉, chunks)` blocks of 32 channels × 8 row lanes,
/// each over `rpc` rows (a multiple of 8), about four blocks per SM of an H100 in all, and at
/// least 2048 rows a chunk.
fn bn_grid_cl(r: i32, c: i32) -> (LaunchConfig, i32, i32) {
    let tiles = (c + 31) / 32;
    let want = (528 / tiles.max(1)).max(1);
    let rpc = (((r + want - 1) / want).max(2048) + 7) / 8 * 8;
    let chunks = ((r + rpc - 1) / rpc).max(1);
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, chunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    (cfg, rpc, chunks)
}

/// The launch of a BatchNorm reduction kernel: channels first on [`bn_grid`] (`(kernel, cfg,
/// items per chunk, chunks)`), channels last (`inner` 1) its `_cl` twin on [`bn_grid_cl`].
fn bn_reduction(base: &str, [outer, c, inner]: [i32; 3]) -> (String, LaunchConfig, i32, i32) {
    if inner == 1 {
        let (cfg, rpc, chunks) = bn_grid_cl(outer, c);
        (format!("{base}_cl"), cfg, rpc, chunks)
    } else {
        let (cfg, ipc, chunks) = bn_grid(outer, c, inner);
        (base.to_string(), cfg, ipc, chunks)
    }
}

/// `[mean; biased var]` `(2, C)` of `x` `(B, C, H, W)` (or, `last`, `(B, H, W, C)`), f32 or bf16,
/// or with `affine` = (γ, β) (f32 `(C,)`) `[γ; β; mean; biased var]` `(4, C)`: f64 partial sums
/// on the [`bn_grid`] ([`bn_grid_cl`]), added per channel in chunk order.
pub fn channel_moments(
    s: &CudaStorage,
    l: &Layout,
    last: bool,
    affine: Option<(Arg, Arg)>,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s, channel_moments_t(s, l, last, affine))
}

fn channel_moments_t<T: KernelFloat>(
    s: &CudaStorage,
    l: &Layout,
    last: bool,
    affine: Option<(Arg, Arg)>,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let x = view::<T>(s, l, "x")?;
    let geo @ [outer, c, inner] = bn_geom(l, last)?;
    let (kernel, cfg, per_chunk, chunks) = bn_reduction("cim_bn_moment_partials", geo);
    let partial = alloc_written::<f64>(&dev, 2 * (chunks * c) as usize)?;
    let func = dev.get_or_load_custom_func(&dtype_kernel(&kernel, s.dtype())?, MODULE, PTX)?;
    let mut a = func.builder();
    a.arg(&x).arg(&partial);
    if inner == 1 {
        a.arg(&outer).arg(&c).arg(&per_chunk);
    } else {
        a.arg(&outer).arg(&c).arg(&inner).arg(&per_chunk);
    }
    // SAFETY: argument types and counts match the kernel's signature (the `_cl` kernel has no
    // plane size); block (·, k) writes its channels' two partials of the 2·chunks·C.
    unsafe { a.launch(cfg) }.w()?;
    let rows: i32 = if affine.is_some() { 4 } else { 2 };
    let out = alloc_written::<f32>(&dev, (rows * c) as usize)?;
    let func = dev.get_or_load_custom_func("cim_bn_moments_finish", MODULE, PTX)?;
    let n = outer as f64 * inner as f64;
    let gb = affine
        .map(|((gs, gl), (bs, bl))| -> Result<_> {
            Ok((view::<f32>(gs, gl, "gamma")?, view::<f32>(bs, bl, "beta")?))
        })
        .transpose()?;
    let with = i32::from(gb.is_some());
    let mut a = func.builder();
    a.arg(&partial);
    match &gb {
        Some((g, b)) => a.arg(g).arg(b),
        // Without γ and β the output stands in for them (never read).
        None => a.arg(&out).arg(&out),
    };
    a.arg(&out).arg(&c).arg(&chunks).arg(&n).arg(&with);
    // SAFETY: one thread per channel; out holds rows·C floats, γ and β C each.
    unsafe { a.launch(per_element(c as usize)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((rows as usize, c as usize)),
    ))
}

use crate::Bn;

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// The normalisation and its tail: `x` (and the output, and the residual `r`, which is `x` again
/// and unread without one) f32 or bf16, `p = [γ; β; mean; var]` f32.
pub fn batch_norm_fwd(x: Arg, p: Arg, r: Arg, bn: Bn) -> Result<(CudaStorage, Shape)> {
    same_dtype("batch_norm", ("x", x.0), ("residual", r.0))?;
    by_dtype!(x.0, batch_norm_fwd_t(x, p, r, bn))
}

fn batch_norm_fwd_t<T: KernelFloat>(
    (s1, l1): Arg,
    (s2, l2): Arg,
    (s3, l3): Arg,
    bn: Bn,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (x, p, r) = (
        view::<T>(s1, l1, "x")?,
        view::<f32>(s2, l2, "params")?,
        view::<T>(s3, l3, "residual")?,
    );
    let [_, c, hw] = bn_geom(l1, bn.last)?;
    let n = l1.shape().elem_count();
    let y = alloc_written::<T>(&dev, n)?;
    let (kernel, per) = bn_fours("cim_batch_norm_fwd", n, c, hw, &[l1, l3]);
    let func = dev.get_or_load_custom_func(&dtype_kernel(&kernel, s1.dtype())?, MODULE, PTX)?;
    let (nn, mode) = ((n / per) as i64, bn.mode as i32);
    let mut a = func.builder();
    a.arg(&x)
        .arg(&p)
        .arg(&r)
        .arg(&y)
        .arg(&nn)
        .arg(&c)
        .arg(&hw)
        .arg(&bn.eps)
        .arg(&mode);
    // SAFETY: argument types and counts match the kernel's signature; one thread per element,
    // or per four of them (`bn_fours` checked the sizes and every view's start).
    unsafe { a.launch(per_element(n / per)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// The four-per-thread `{kernel}_v4` where `n` and the channel run (C channels last, the plane
/// HW channels first) are multiples of 4 and every view starts on a 4-element boundary, else
/// `kernel`: `(name, elements per thread)`.
fn bn_fours(kernel: &str, n: usize, c: i32, hw: i32, layouts: &[&Layout]) -> (String, usize) {
    let run = if hw == 1 { c } else { hw };
    let fours = n.is_multiple_of(4)
        && run % 4 == 0
        && layouts.iter().all(|l| l.start_offset().is_multiple_of(4));
    match fours {
        true => (format!("{kernel}_v4"), 4),
        false => (kernel.to_string(), 1),
    }
}

/// `[p; dγ; dβ]` `(6, C)` f32 from `x`, `dy` (and the residual; one dtype, f32 or bf16) and
/// `p = [γ; β; mean; var]` (copied ahead of the sums, for the dx kernel).
pub fn batch_norm_grad_sums(
    x: Arg,
    dy: Arg,
    p: Arg,
    r: Option<Arg>,
    bn: Bn,
) -> Result<(CudaStorage, Shape)> {
    same_dtype("batch_norm backward", ("x", x.0), ("dy", dy.0))?;
    let r = r.unwrap_or(x);
    same_dtype("batch_norm backward", ("x", x.0), ("residual", r.0))?;
    by_dtype!(x.0, batch_norm_grad_sums_t(x, dy, p, r, bn))
}

fn batch_norm_grad_sums_t<T: KernelFloat>(
    (s1, l1): Arg,
    (s2, l2): Arg,
    (s3, l3): Arg,
    (s4, l4): Arg,
    bn: Bn,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (x, dy, p, r) = (
        view::<T>(s1, l1, "x")?,
        view::<T>(s2, l2, "grad")?,
        view::<f32>(s3, l3, "params")?,
        view::<T>(s4, l4, "residual")?,
    );
    let geo @ [outer, c, inner] = bn_geom(l1, bn.last)?;
    let (kernel, cfg, per_chunk, chunks) = bn_reduction("cim_bn_grad_partials", geo);
    let partial = alloc_written::<f64>(&dev, 2 * (chunks * c) as usize)?;
    let func = dev.get_or_load_custom_func(&dtype_kernel(&kernel, s1.dtype())?, MODULE, PTX)?;
    let mode = bn.mode as i32;
    let mut a = func.builder();
    a.arg(&x)
        .arg(&dy)
        .arg(&r)
        .arg(&p)
        .arg(&partial)
        .arg(&outer)
        .arg(&c);
    if inner != 1 {
        a.arg(&inner);
    }
    a.arg(&per_chunk).arg(&bn.eps).arg(&mode);
    // SAFETY: argument types and counts match the kernel's signature (the `_cl` kernel has no
    // plane size); block (·, k) writes its channels' two partials.
    unsafe { a.launch(cfg) }.w()?;
    let out = alloc_written::<f32>(&dev, 6 * c as usize)?;
    let func = dev.get_or_load_custom_func("cim_bn_grad_finish", MODULE, PTX)?;
    let mut a = func.builder();
    a.arg(&partial).arg(&p).arg(&out).arg(&c).arg(&chunks);
    // SAFETY: one thread per channel; p holds 4·C floats, out 6·C.
    unsafe { a.launch(per_element(c as usize)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((6, c as usize)),
    ))
}

/// `dx` in `x`'s dtype from `x`, `dy` (and the residual) and `p = [γ; β; mean; var; dγ; dβ]`
/// `(6, C)`; with a ReLU and a residual (`mode` 3) `[dx; dr]` `(2, …)`.
pub fn batch_norm_dx(
    x: Arg,
    dy: Arg,
    p: Arg,
    r: Option<Arg>,
    bn: Bn,
    shape: Shape,
) -> Result<(CudaStorage, Shape)> {
    same_dtype("batch_norm backward", ("x", x.0), ("dy", dy.0))?;
    let r = r.unwrap_or(x);
    same_dtype("batch_norm backward", ("x", x.0), ("residual", r.0))?;
    by_dtype!(x.0, batch_norm_dx_t(x, dy, p, r, bn, shape))
}

fn batch_norm_dx_t<T: KernelFloat>(
    (s1, l1): Arg,
    (s2, l2): Arg,
    (s3, l3): Arg,
    (s4, l4): Arg,
    bn: Bn,
    shape: Shape,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (x, dy, p, r) = (
        view::<T>(s1, l1, "x")?,
        view::<T>(s2, l2, "grad")?,
        view::<f32>(s3, l3, "params")?,
        view::<T>(s4, l4, "residual")?,
    );
    let [b, c, hw] = bn_geom(l1, bn.last)?;
    let n = l1.shape().elem_count();
    let both = bn.mode == 3;
    let mut out = alloc_written::<T>(&dev, if both { 2 * n } else { n })?;
    // dr is the second half with a ReLU and a residual; otherwise a one-element placeholder the
    // kernel never writes.
    let mut spare = match both {
        true => None,
        false => Some(alloc_written::<T>(&dev, 1)?),
    };
    let (kernel, per) = bn_fours("cim_bn_dx", n, c, hw, &[l1, l2, l4]);
    let func = dev.get_or_load_custom_func(&dtype_kernel(&kernel, s1.dtype())?, MODULE, PTX)?;
    let (nn, count, mode) = ((n / per) as i64, b as f32 * hw as f32, bn.mode as i32);
    {
        let (mut dx, mut dr) = match &mut spare {
            None => out.split_at_mut(n),
            Some(spare) => (out.slice_mut(..), spare.slice_mut(..)),
        };
        let mut a = func.builder();
        a.arg(&x)
            .arg(&dy)
            .arg(&r)
            .arg(&p)
            .arg(&mut dx)
            .arg(&mut dr)
            .arg(&nn)
            .arg(&c)
            .arg(&hw)
            .arg(&count)
            .arg(&bn.eps)
            .arg(&mode);
        // SAFETY: argument types and counts match the kernel's signature; one thread per element
        // (or per four: `bn_fours` checked the sizes and views) writes dx and (mode 3) dr there;
        // dr starts n elements in, on a 4-element boundary with n.
        unsafe { a.launch(per_element(n / per)) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// A convolution filter `(O, C, k, k)` to cuDNN's channels-last `(O, k, k, C)` (`to_krsc`) or
/// back, cast to `out`: f32 → f32 or bf16 to channels last, f32 or bf16 → f32 back (for cim's
/// cuDNN convolution only).
#[cfg(feature = "cudnn")]
pub fn filter_layout(
    s: &CudaStorage,
    l: &Layout,
    to_krsc: bool,
    out: candle_core::DType,
) -> Result<(CudaStorage, Shape)> {
    use candle_core::DType;
    match (s.dtype(), out, to_krsc) {
        (DType::F32, DType::F32, _) => filter_layout_t::<f32, f32>(s, l, to_krsc),
        (DType::F32, DType::BF16, true) => filter_layout_t::<f32, half::bf16>(s, l, to_krsc),
        (DType::BF16, DType::F32, false) => filter_layout_t::<half::bf16, f32>(s, l, to_krsc),
        (from, to, _) => candle_core::bail!("filter layout: no kernel from {from:?} to {to:?}"),
    }
}

#[cfg(feature = "cudnn")]
fn filter_layout_t<Ti: KernelFloat, To: KernelFloat>(
    s: &CudaStorage,
    l: &Layout,
    to_krsc: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let d = l.dims();
    let (o, c, k) = match to_krsc {
        true => (d[0], d[1], d[2]),
        false => (d[0], d[3], d[1]),
    };
    let n = o * c * k * k;
    let (dir, from, to) = (
        if to_krsc { "to" } else { "from" },
        Ti::DTYPE.as_str(),
        To::DTYPE.as_str(),
    );
    let func =
        dev.get_or_load_custom_func(&format!("cim_filter_{dir}_krsc_{from}_{to}"), MODULE, PTX)?;
    let w = view::<Ti>(s, l, "filter")?;
    let y = alloc_written::<To>(&dev, n)?;
    let (nn, cc, kk) = (n as i64, c as i32, (k * k) as i32);
    let mut a = func.builder();
    a.arg(&w).arg(&y).arg(&nn).arg(&cc).arg(&kk);
    // SAFETY: argument types and counts match the kernel's signature; one thread per output
    // element, every one written.
    unsafe { a.launch(per_element(n)) }.w()?;
    let shape = match to_krsc {
        true => Shape::from((o, k, k, c)),
        false => Shape::from((o, c, k, k)),
    };
    Ok((CudaStorage::wrap_cuda_slice(y, dev), shape))
}

/// `(planes, h, w, ho, wo, cl)` of a 3×3 stride-2 pool of `(B, C, H, W)`, or (`last`, `cl` = C)
/// of `(B, H, W, C)`.
fn pool_dims(l: &Layout, last: bool) -> Result<(i64, i32, i32, i32, i32, i32)> {
    let (b, c, h, w) = match last {
        false => l.shape().dims4()?,
        true => {
            let (b, h, w, c) = l.shape().dims4()?;
            (b, c, h, w)
        }
    };
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    let cl = if last { c as i32 } else { 0 };
    Ok(((b * c) as i64, h as i32, w as i32, ho as i32, wo as i32, cl))
}

/// `MaxPool2d(3, 2, 1)` of a channels-first (or, `last`, channels-last) map, f32 or bf16.
pub fn max_pool_fwd(s: &CudaStorage, l: &Layout, last: bool) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s, max_pool_fwd_t(s, l, last))
}

fn max_pool_fwd_t<T: KernelFloat>(
    s: &CudaStorage,
    l: &Layout,
    last: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let x = view::<T>(s, l, "x")?;
    let (planes, h, w, ho, wo, cl) = pool_dims(l, last)?;
    let n = planes as usize * (ho * wo) as usize;
    let y = alloc_written::<T>(&dev, n)?;
    let func =
        dev.get_or_load_custom_func(&dtype_kernel("cim_max_pool_fwd", s.dtype())?, MODULE, PTX)?;
    let mut a = func.builder();
    a.arg(&x)
        .arg(&y)
        .arg(&planes)
        .arg(&h)
        .arg(&w)
        .arg(&ho)
        .arg(&wo)
        .arg(&cl);
    // SAFETY: argument types and counts match the kernel's signature; one thread per output.
    unsafe { a.launch(per_element(n)) }.w()?;
    let d = l.shape().dims();
    let shape = match last {
        false => Shape::from((d[0], d[1], ho as usize, wo as usize)),
        true => Shape::from((d[0], ho as usize, wo as usize, d[3])),
    };
    Ok((CudaStorage::wrap_cuda_slice(y, dev), shape))
}

/// The pool's `dx` from `x` and `dy` (one dtype, f32 or bf16), either layout.
pub fn max_pool_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    last: bool,
) -> Result<(CudaStorage, Shape)> {
    same_dtype("max_pool backward", ("x", s1), ("dy", s2))?;
    by_dtype!(s1, max_pool_bwd_t(s1, l1, s2, l2, last))
}

fn max_pool_bwd_t<T: KernelFloat>(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    last: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (x, dy) = (view::<T>(s1, l1, "x")?, view::<T>(s2, l2, "grad")?);
    let (planes, h, w, ho, wo, cl) = pool_dims(l1, last)?;
    let n = l1.shape().elem_count();
    let dx = alloc_written::<T>(&dev, n)?;
    let func =
        dev.get_or_load_custom_func(&dtype_kernel("cim_max_pool_bwd", s1.dtype())?, MODULE, PTX)?;
    let mut a = func.builder();
    a.arg(&x)
        .arg(&dy)
        .arg(&dx)
        .arg(&planes)
        .arg(&h)
        .arg(&w)
        .arg(&ho)
        .arg(&wo)
        .arg(&cl);
    // SAFETY: argument types and counts match the kernel's signature; one thread per input.
    unsafe { a.launch(per_element(n)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), l1.shape().clone()))
}

/// `x` (and the output) f32 or bf16, the bias f32.
fn bias_fwd(
    kernel: &str,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s1, bias_fwd_t(kernel, s1, l1, s2, l2))
}

fn bias_fwd_t<T: KernelFloat>(
    kernel: &str,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (x, b) = (view::<T>(s1, l1, "x")?, view::<f32>(s2, l2, "bias")?);
    let (rows, d) = dims(l1)?;
    let n = rows * d;
    let y = alloc_written::<T>(&dev, n)?;
    let (kernel, per, dd) = by_fours(kernel, d, &[l1, l2]);
    let func = dev.get_or_load_custom_func(&dtype_kernel(&kernel, s1.dtype())?, MODULE, PTX)?;
    let nn = (n / per) as i64;
    let mut a = func.builder();
    a.arg(&x).arg(&b).arg(&y).arg(&nn).arg(&dd);
    // SAFETY: argument types and counts match the kernel's signature; one thread per element, or
    // per four of them (`by_fours` checked d and every view's start).
    unsafe { a.launch(per_element(n / per)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// The four-per-thread `{kernel}_v4` for rows of `d % 4 == 0` whose views all start on a
/// 4-element boundary, else `kernel`: `(name, elements per thread, d in those units)`.
fn by_fours(kernel: &str, d: usize, layouts: &[&Layout]) -> (String, usize, i32) {
    let fours = d.is_multiple_of(4) && layouts.iter().all(|l| l.start_offset().is_multiple_of(4));
    match fours {
        true => (format!("{kernel}_v4"), 4, (d / 4) as i32),
        false => (kernel.to_string(), 1, d as i32),
    }
}

pub fn bias_add_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    bias_fwd("cim_bias_add_fwd", s1, l1, s2, l2)
}

pub fn bias_gelu_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    bias_fwd("cim_bias_gelu_fwd", s1, l1, s2, l2)
}

/// Column sums of `a` `(rows, d)` (f32 or bf16) into `out` (d floats): per-chunk partials, then
/// their sum in chunk order (kernels/ops.cu).
fn col_sum_into<T: KernelFloat>(
    dev: &candle_core::CudaDevice,
    a: &CudaView<T>,
    rows: usize,
    d: usize,
    out: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<f32>,
) -> Result<()> {
    const COL_CHUNK: usize = 256;
    let chunks = rows.div_ceil(COL_CHUNK).max(1);
    // Every (chunk, column) partial is written by stage 1.
    let partial = alloc_written::<f32>(dev, chunks * d)?;
    let (r, dd, c) = (rows as i32, d as i32, chunks as i32);
    let kernel = dtype_kernel("cim_col_sum_partial", T::DTYPE)?;
    let func = dev.get_or_load_custom_func(&kernel, MODULE, PTX)?;
    let cfg = LaunchConfig {
        grid_dim: (d.div_ceil(32) as u32, chunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let mut a1 = func.builder();
    a1.arg(a).arg(&partial).arg(&r).arg(&dd);
    // SAFETY: argument types and counts match the kernel's signature; `partial` holds chunks·d
    // floats.
    unsafe { a1.launch(cfg) }.w()?;
    let func = dev.get_or_load_custom_func("cim_col_sum_chunks", MODULE, PTX)?;
    let mut a2 = func.builder();
    a2.arg(&partial).arg(out).arg(&c).arg(&dd);
    // SAFETY: one thread per column; `out` holds d floats.
    unsafe { a2.launch(per_element(d)) }.w()?;
    Ok(())
}

/// `(d,)`: column sums of a contiguous `(…, d)` tensor.
pub fn col_sum(s: &CudaStorage, l: &Layout, d: usize) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s, col_sum_t(s, l, d))
}

fn col_sum_t<T: KernelFloat>(
    s: &CudaStorage,
    l: &Layout,
    d: usize,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let a = view::<T>(s, l, "grad")?;
    let rows = l.shape().elem_count() / d;
    // Stage 2 writes every column.
    let mut out = alloc_written::<f32>(&dev, d)?;
    col_sum_into(&dev, &a, rows, d, &mut out.slice_mut(..))?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(d)))
}

/// `(rows + 1, d)` f32: dx rows, then db (the CPU op's packing); `x` and `dy` f32 or bf16.
pub fn bias_gelu_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    same_dtype("bias_gelu backward", ("x", s1), ("dy", s3))?;
    by_dtype!(s1, bias_gelu_bwd_t(s1, l1, s2, l2, s3, l3))
}

fn bias_gelu_bwd_t<T: KernelFloat>(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (x, b, dy) = (
        view::<T>(s1, l1, "x")?,
        view::<f32>(s2, l2, "bias")?,
        view::<T>(s3, l3, "grad")?,
    );
    let (rows, d) = dims(l1)?;
    let n = rows * d;
    // The dx kernel writes all n values, the column sums all d.
    let mut out = alloc_written::<f32>(&dev, n + d)?;
    {
        let mut dx = out.slice_mut(0..n);
        let (kernel, per, dd) = by_fours("cim_bias_gelu_bwd_dx", d, &[l1, l2, l3]);
        let func = dev.get_or_load_custom_func(&dtype_kernel(&kernel, s1.dtype())?, MODULE, PTX)?;
        let nn = (n / per) as i64;
        let mut a = func.builder();
        a.arg(&x).arg(&b).arg(&dy).arg(&mut dx).arg(&nn).arg(&dd);
        // SAFETY: argument types and counts match the kernel's signature; one thread per element
        // or per four (`by_fours`); the f32 output is fresh.
        unsafe { a.launch(per_element(n / per)) }.w()?;
    }
    let (dx, mut db) = out.split_at_mut(n);
    col_sum_into(&dev, &dx.as_view(), rows, d, &mut db)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((rows + 1, d)),
    ))
}

/// `dx` of bias + GELU in bf16, shaped like `x` (bf16 `x` and `dy`, f32 bias): the block node's
/// backward, without an f32 copy of the MLP's widest gradient.
pub fn bias_gelu_bwd_bf16_dx(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    use candle_core::DType;
    if s1.dtype() != DType::BF16 || s3.dtype() != DType::BF16 {
        candle_core::bail!(
            "bias_gelu bf16 backward: x is {:?}, dy {:?}",
            s1.dtype(),
            s3.dtype()
        );
    }
    let dev = s1.device().clone();
    let (x, b, dy) = (
        view::<half::bf16>(s1, l1, "x")?,
        view::<f32>(s2, l2, "bias")?,
        view::<half::bf16>(s3, l3, "grad")?,
    );
    let (rows, d) = dims(l1)?;
    let n = rows * d;
    let dx = alloc_written::<half::bf16>(&dev, n)?;
    let (kernel, per, dd) = by_fours("cim_bias_gelu_bwd_dx_bf16_out", d, &[l1, l2, l3]);
    let func = dev.get_or_load_custom_func(&kernel, MODULE, PTX)?;
    let nn = (n / per) as i64;
    let mut a = func.builder();
    a.arg(&x).arg(&b).arg(&dy).arg(&dx).arg(&nn).arg(&dd);
    // SAFETY: argument types and counts match the kernel's signature; one thread per element or
    // per four (`by_fours`).
    unsafe { a.launch(per_element(n / per)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), l1.shape().clone()))
}

/// Geometry shared by im2col and col2im: `(h, w, k, stride, pad, ho, wo)`.
pub type ConvGeometry = [i32; 7];

/// `x` `(B, C, h, w)` → patch matrix `(B, C·k·k, ho·wo)`.
pub fn im2col(s: &CudaStorage, l: &Layout, g: ConvGeometry) -> Result<(CudaStorage, Shape)> {
    let (b, c, _, _) = l.shape().dims4()?;
    let [_, _, k, _, _, ho, wo] = g;
    let shape = Shape::from((b, c * (k * k) as usize, (ho * wo) as usize));
    conv_geometry_kernel("cim_im2col", s, l, "x", shape, g)
}

/// Patch-matrix gradient `(B, C·k·k, ho·wo)` → input gradient `(B, C, h, w)`.
pub fn col2im(s: &CudaStorage, l: &Layout, g: ConvGeometry) -> Result<(CudaStorage, Shape)> {
    let (b, ckk, _) = l.shape().dims3()?;
    let [h, w, k, ..] = g;
    let shape = Shape::from((b, ckk / (k * k) as usize, h as usize, w as usize));
    conv_geometry_kernel("cim_col2im", s, l, "grad", shape, g)
}

/// Launches im2col or col2im (same arguments: input, output, element count, geometry) with one
/// thread per element of the `out` shape.
fn conv_geometry_kernel(
    kernel: &str,
    s: &CudaStorage,
    l: &Layout,
    what: &str,
    out: Shape,
    g: ConvGeometry,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let input = view::<f32>(s, l, what)?;
    let n = out.elem_count();
    let y = alloc_written::<f32>(&dev, n)?;
    let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
    let nn = n as i64;
    let mut a = func.builder();
    a.arg(&input).arg(&y).arg(&nn);
    for v in &g {
        a.arg(v);
    }
    // SAFETY: argument types and counts match both kernels' signatures (input, output, n, then
    // h, w, k, stride, pad, ho, wo); one thread per output element.
    unsafe { a.launch(per_element(n)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), out))
}

/// `[r +] g·(x + b[c])`, optionally ReLU'd; `x` (and `r`) `(B, C, H, W)` with `H·W % 4 == 0`, or
/// with `cl` channels last, `(B, H, W, C)` with `B·H·W·C % 4 == 0`; all f32 (16-byte aligned
/// views), all bf16 or all f16.
pub fn channel_bias(
    x: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    r: Option<(&CudaStorage, &Layout)>,
    g: f32,
    (relu, pair, cl): (bool, bool, bool),
) -> Result<(CudaStorage, Shape)> {
    let dtypes = [Some(x.0.dtype()), Some(b.0.dtype()), r.map(|r| r.0.dtype())];
    if dtypes.iter().flatten().any(|&d| d != x.0.dtype()) {
        candle_core::bail!("channel_bias: x, bias and residual must share a dtype: {dtypes:?}");
    }
    by_dtype!(x.0, channel_bias_t(x, b, r, g, (relu, pair, cl)))
}

fn channel_bias_t<T: KernelFloat>(
    x: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    r: Option<(&CudaStorage, &Layout)>,
    g: f32,
    (relu, pair, cl): (bool, bool, bool),
) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device().clone();
    let xv = view::<T>(x.0, x.1, "x")?;
    let bv = view::<T>(b.0, b.1, "bias")?;
    let rv = match r {
        Some((s, l)) => view::<T>(s, l, "residual")?,
        None => view::<T>(x.0, x.1, "x")?,
    };
    let (d0, d1, d2, d3) = x.1.shape().dims4()?;
    // Channels and pixels per channel plane (channels last: one pixel per "plane" row).
    let (c, hw) = match cl {
        true => (d3, 1),
        false => (d1, d2 * d3),
    };
    let n = x.1.shape().elem_count();
    let y = alloc_written::<T>(&dev, if pair { 2 * n } else { n })?;
    let kernel = dtype_kernel("cim_channel_bias", x.0.dtype())?;
    let func = dev.get_or_load_custom_func(&kernel, MODULE, PTX)?;
    let (n4, c, hw4) = ((n / 4) as i64, c as i32, (hw / 4) as i32);
    let (has_r, relu, pair_i, cl_i) = (r.is_some() as i32, relu as i32, pair as i32, cl as i32);
    let mut a = func.builder();
    a.arg(&xv)
        .arg(&bv)
        .arg(&rv)
        .arg(&y)
        .arg(&n4)
        .arg(&c)
        .arg(&hw4)
        .arg(&g)
        .arg(&has_r)
        .arg(&relu)
        .arg(&pair_i)
        .arg(&cl_i);
    // SAFETY: argument types and counts match the kernels' signatures; four elements per thread,
    // n % 4 == 0 and, for the kernels' 4-element word loads, every view starting on a 4-element
    // boundary (checked by the caller); with `pair` the output holds 2n values, the kernel writes
    // both halves.
    unsafe { a.launch(per_element(n / 4)) }.w()?;
    let shape = match pair {
        true => Shape::from((2, d0, d1, d2, d3)),
        false => x.1.shape().clone(),
    };
    Ok((CudaStorage::wrap_cuda_slice(y, dev), shape))
}

// ---- Multi-tensor AdamW and sum of squares (`kernels/ops.cu`, `super::adamw`) ----

/// Words per tensor in the AdamW table (`MT_WORDS` in `ops.cu`).
const MT_WORDS: usize = 5;

use super::chunks::chunk_words;

/// One block of [`THREADS`] per chunk.
fn per_chunk(chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (chunks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn cuda_storage<'a>(s: &'a candle_core::Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        candle_core::Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("{what}: tensor is not on a CUDA device"),
    }
}

/// `Σ x²` of every tensor (f32, contiguous, one CUDA device) in one launch: partial sums per
/// chunk of 4096 elements (f32 within a chunk, as the CPU twin), returned in order.
pub fn sum_squares_multi(ts: &[&candle_core::Tensor]) -> Result<Vec<f64>> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let Some((first, _)) = guards.first() else {
        return Ok(vec![]);
    };
    let dev = cuda_storage(first, "sum of squares")?.device().clone();
    let stream = dev.cuda_stream();
    let mut table = Vec::with_capacity(2 * ts.len());
    let mut reads = Vec::with_capacity(ts.len());
    for (g, l) in &guards {
        let (a, b) = offsets(l, "sum of squares")?;
        let slice = cuda_storage(g, "sum of squares")?.as_cuda_slice::<f32>()?;
        let (ptr, sync) = slice.device_ptr(&stream);
        reads.push(sync);
        table.extend([ptr + (a * 4) as u64, (b - a) as u64]);
    }
    let chunks = chunk_words(guards.iter().map(|(_, l)| l.shape().elem_count()))?;
    if chunks.is_empty() {
        return Ok(vec![]);
    }
    table.extend(&chunks);
    let table = dev.clone_htod(&table)?;
    let mut partials = dev.alloc_zeros::<f64>(chunks.len())?;
    let func = dev.get_or_load_custom_func("cim_sum_squares_multi", MODULE, PTX)?;
    let tensors = ts.len() as i32;
    let mut a = func.builder();
    a.arg(&table).arg(&tensors).arg(&mut partials);
    // SAFETY: argument types and counts match the kernel's signature; the table holds, per
    // tensor, the address of its first element and its length (read guards held until after the
    // launch), then one chunk word per launched block.
    unsafe { a.launch(per_chunk(chunks.len())) }.w()?;
    drop(reads);
    dev.clone_dtoh(&partials)
}

/// One parameter of [`adamw_multi`]: f32 contiguous tensors on one CUDA device, storages all
/// distinct (the caller checks).
pub struct AdamTensors<'a> {
    pub param: &'a candle_core::Tensor,
    /// `(2, n)`: `[m; v]`.
    pub moments: &'a candle_core::Tensor,
    pub grad: &'a candle_core::Tensor,
    pub lr: f32,
    /// `1 − lr · weight_decay`.
    pub decay: f32,
}

/// The shared scalars of [`adamw_multi`]: `(β₁, β₂, gradient scale, bias corrections 1 and 2, ε)`.
pub type AdamShared = (f32, f32, f32, f32, f32, f32);

/// Tensors whose storages one multi-tensor AdamW launch holds write locks on (parameter and
/// moments each): bounds the lock nesting below to 128 levels.
const ADAM_GROUP: usize = 64;

/// AdamW over every parameter in `⌈len / 64⌉` launches: per element the arithmetic of the two
/// per-parameter kernels (`cim_adamw_moments` then `cim_adamw_apply`), in registers.
pub fn adamw_multi(items: &[AdamTensors], shared: AdamShared) -> Result<()> {
    for group in items.chunks(ADAM_GROUP) {
        adamw_group(group, shared)?;
        ADAM_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

static ADAM_LAUNCHES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Multi-tensor AdamW launches so far in this process (the GPU parity test checks that the
/// kernel, not the per-parameter fallback, ran).
pub fn adamw_multi_launches() -> usize {
    ADAM_LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

fn adamw_group(items: &[AdamTensors], (b1, b2, k, bc1, bc2, eps): AdamShared) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    // Gradients are read: read guards, held until after the launch.
    let guards: Vec<_> = items.iter().map(|i| i.grad.storage_and_layout()).collect();
    let dev = cuda_storage(&guards[0].0, "adamw")?.device().clone();
    let stream = dev.cuda_stream();
    let mut grads = Vec::with_capacity(items.len());
    let mut reads = Vec::with_capacity(items.len());
    for (g, l) in &guards {
        let (a, _) = offsets(l, "adamw gradient")?;
        let (ptr, sync) = cuda_storage(g, "adamw")?
            .as_cuda_slice::<f32>()?
            .device_ptr(&stream);
        reads.push(sync);
        grads.push(ptr + (a * 4) as u64);
    }
    let lens: Vec<usize> = items.iter().map(|i| i.param.elem_count()).collect();
    let chunks = chunk_words(lens.iter().copied())?;
    // Parameters and moments are written: candle hands out a storage's write access only inside
    // an in-place op, so the launch runs innermost in a nest of them, one per written tensor.
    let written: Vec<&candle_core::Tensor> =
        items.iter().flat_map(|i| [i.param, i.moments]).collect();
    let mut launch = |ptrs: &[u64]| -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let mut table = Vec::with_capacity(MT_WORDS * items.len() + chunks.len());
        for (i, it) in items.iter().enumerate() {
            let scalars = u64::from(it.lr.to_bits()) | u64::from(it.decay.to_bits()) << 32;
            table.extend([
                ptrs[2 * i],
                ptrs[2 * i + 1],
                grads[i],
                lens[i] as u64,
                scalars,
            ]);
        }
        table.extend(&chunks);
        let table = dev.clone_htod(&table)?;
        let func = dev.get_or_load_custom_func("cim_adamw_multi", MODULE, PTX)?;
        let tensors = items.len() as i32;
        let mut a = func.builder();
        a.arg(&table)
            .arg(&tensors)
            .arg(&b1)
            .arg(&b2)
            .arg(&k)
            .arg(&bc1)
            .arg(&bc2)
            .arg(&eps);
        // SAFETY: argument types and counts match the kernel's signature; per tensor the table
        // holds the first-element addresses of the parameter (n floats) and moments (2n floats),
        // both under write locks held by the enclosing in-place ops until after this launch, and
        // of the gradient (n floats, read guard held); one chunk word per launched block.
        unsafe { a.launch(per_chunk(chunks.len())) }.w()?;
        Ok(())
    };
    let ptrs = std::cell::RefCell::new(Vec::with_capacity(written.len()));
    let f: Innermost = std::cell::RefCell::new(&mut launch);
    nest_writes(&written, &ptrs, &f)?;
    drop(reads);
    Ok(())
}

/// What runs innermost in [`nest_writes`], given every written tensor's address.
type Innermost<'f> = std::cell::RefCell<&'f mut dyn FnMut(&[u64]) -> Result<()>>;

/// Write access to the storage of every tensor in `ts` at once: an in-place op on the first whose
/// CUDA body records its address (under candle's write lock) and recurses into the rest; `f` runs
/// innermost with all addresses, in order.
fn nest_writes(
    ts: &[&candle_core::Tensor],
    ptrs: &std::cell::RefCell<Vec<u64>>,
    f: &Innermost,
) -> Result<()> {
    match ts.split_first() {
        Some((t, rest)) => t.inplace_op1(&Nest { rest, ptrs, f }),
        None => {
            let ptrs = ptrs.borrow();
            (f.borrow_mut())(&ptrs)
        }
    }
}

struct Nest<'a, 'f> {
    rest: &'a [&'a candle_core::Tensor],
    ptrs: &'a std::cell::RefCell<Vec<u64>>,
    f: &'a Innermost<'f>,
}

impl candle_core::InplaceOp1 for Nest<'_, '_> {
    fn name(&self) -> &'static str {
        "cim-multi-tensor-write"
    }
    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("multi-tensor kernels run on CUDA tensors only")
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
        let (a, _) = offsets(l, "multi-tensor update")?;
        let stream = s.device().cuda_stream();
        let (ptr, _write) = s.as_cuda_slice_mut::<f32>()?.device_ptr_mut(&stream);
        self.ptrs.borrow_mut().push(ptr + (a * 4) as u64);
        // `_write` (cudarc's event bookkeeping for this write) drops after the launch inside.
        nest_writes(self.rest, self.ptrs, self.f)
    }
}

// ---- 2× resampling (`kernels/ops.cu`, `super::resample`) ----

/// `max_pool2d(2)` (`pool`) or nearest 2× upsampling of contiguous `x`, NCHW or (`nhwc`)
/// channels last `(B, H, W, C)`; f32, bf16 or f16.
pub fn resample_2x(
    s: &CudaStorage,
    l: &Layout,
    pool: bool,
    nhwc: bool,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s, resample_2x_t(s, l, pool, nhwc))
}

fn resample_2x_t<T: KernelFloat>(
    s: &CudaStorage,
    l: &Layout,
    pool: bool,
    nhwc: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let x = view::<T>(s, l, "resample input")?;
    let (b, c, h, w) = match (nhwc, l.shape().dims4()?) {
        (true, (b, h, w, c)) => (b, c, h, w),
        (false, dims) => dims,
    };
    let (ho, wo) = match pool {
        true => (h / 2, w / 2),
        false => (2 * h, 2 * w),
    };
    let y = alloc_written::<T>(&dev, b * c * ho * wo)?;
    let base = match (pool, nhwc) {
        (true, false) => "cim_max_pool_2x2",
        (false, false) => "cim_upsample_2x",
        (true, true) => "cim_max_pool_2x2_nhwc",
        (false, true) => "cim_upsample_2x_nhwc",
    };
    let func = dev.get_or_load_custom_func(&dtype_kernel(base, s.dtype())?, MODULE, PTX)?;
    // Pooling: one thread per output element; upsampling: one per input element.
    let threads = if pool { b * c * ho * wo } else { b * c * h * w };
    let (nn, hh, ww) = (threads as i64, h as i32, w as i32);
    let (hho, wwo, cc) = (ho as i32, wo as i32, c as i32);
    let mut a = func.builder();
    a.arg(&x)
        .arg(&y)
        .arg(&nn)
        .arg(&hh)
        .arg(&ww)
        .arg(&hho)
        .arg(&wwo)
        .arg(&cc);
    // SAFETY: argument types and counts match the four kernels' signatures (the channels-first
    // ones ignore `c`); pooling: one thread per output element reading its 2×2 window inside the
    // input (odd sides rounded down); upsampling: one thread per input element (`nn` counts
    // them) writing its four copies inside the output.
    unsafe { a.launch(per_element(threads)) }.w()?;
    let shape = match nhwc {
        true => Shape::from((b, ho, wo, c)),
        false => Shape::from((b, c, ho, wo)),
    };
    Ok((CudaStorage::wrap_cuda_slice(y, dev), shape))
}

// ---- Head layouts of GEMM attention (`kernels/ops.cu`, `super::heads`) ----

/// The token-side and head-side geometry of a head-layout copy: `(B, N, H, hd)` tokens, `rows`
/// (≥ N) rows per head on the head side, part 0 (q or dq) multiplied by `scale`.
#[derive(Clone, Copy)]
pub struct HeadGeometry {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub hd: usize,
    pub rows: usize,
    pub scale: f32,
}

/// One of the head-layout copies (`cim_split_qkv`, `cim_merge_heads`, `cim_merge_qkv`): up to
/// three contiguous inputs of one dtype (f32 or bf16), output `shape`.
pub fn head_copy(
    kernel: &str,
    srcs: &[(&CudaStorage, &Layout)],
    shape: Shape,
    g: HeadGeometry,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(srcs[0].0, head_copy_t(kernel, srcs, shape, g))
}

fn head_copy_t<T: KernelFloat>(
    kernel: &str,
    srcs: &[(&CudaStorage, &Layout)],
    shape: Shape,
    g: HeadGeometry,
) -> Result<(CudaStorage, Shape)> {
    let dev = srcs[0].0.device().clone();
    let views = srcs
        .iter()
        .map(|(s, l)| view::<T>(s, l, "head copy input"))
        .collect::<Result<Vec<_>>>()?;
    let pick = |i: usize| &views[i.min(views.len() - 1)];
    let total = shape.elem_count();
    let out = alloc_written::<T>(&dev, total)?;
    // 16 bytes per thread where hd and every input view allow it (the output is fresh).
    let v = 16 / std::mem::size_of::<T>();
    let vec =
        g.hd.is_multiple_of(v) && srcs.iter().all(|(_, l)| l.start_offset().is_multiple_of(v));
    let (kernel, threads) = match vec {
        true => (format!("{kernel}_vec"), total / v),
        false => (kernel.to_string(), total),
    };
    let func =
        dev.get_or_load_custom_func(&dtype_kernel(&kernel, srcs[0].0.dtype())?, MODULE, PTX)?;
    let (tt, bb, nn, hh, dd) = (
        threads as i64,
        g.b as i32,
        g.n as i32,
        g.h as i32,
        g.hd as i32,
    );
    let rr = g.rows as i32;
    let mut a = func.builder();
    a.arg(pick(0))
        .arg(pick(1))
        .arg(pick(2))
        .arg(&out)
        .arg(&tt)
        .arg(&bb)
        .arg(&nn)
        .arg(&hh)
        .arg(&dd)
        .arg(&rr)
        .arg(&g.scale);
    // SAFETY: argument types and counts match the kernels' common signature; one thread per
    // output element (or per 16-byte vector of them, hd a multiple of the vector and every view
    // starting on one: checked above), each reading inside its input (shapes checked by
    // `super::heads`); inputs a kernel does not use alias the first.
    unsafe { a.launch(per_element(threads)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

// ---- Residual adds of the block node (`kernels/ops.cu`, `super::residual`) ----

/// `a + (b [+ bias])` → `a`'s dtype: `a` f32 with `b` f32, or `a` bf16 with `b` bf16 or f32;
/// `bias` (`third`, read only with `has_bias`) f32; rows of `d % 4 == 0`, views 4-element aligned
/// (checked by the caller).
pub fn residual_add(
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    third: (&CudaStorage, &Layout),
    has_bias: bool,
) -> Result<(CudaStorage, Shape)> {
    use candle_core::DType;
    match (a.0.dtype(), b.0.dtype()) {
        (DType::F32, DType::F32) => {
            residual_add_t::<f32, f32>("cim_residual_add", a, b, third, has_bias)
        }
        (DType::BF16, DType::BF16) => {
            residual_add_t::<half::bf16, half::bf16>("cim_residual_add_bf16", a, b, third, has_bias)
        }
        (DType::BF16, DType::F32) => {
            residual_add_t::<half::bf16, f32>("cim_residual_add_bf16_f32", a, b, third, has_bias)
        }
        (x, y) => candle_core::bail!("residual_add: no kernel for a {x:?} with b {y:?}"),
    }
}

fn residual_add_t<T: KernelFloat, U: KernelFloat>(
    kernel: &str,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    third: (&CudaStorage, &Layout),
    has_bias: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = a.0.device().clone();
    let av = view::<T>(a.0, a.1, "a")?;
    let bv = view::<U>(b.0, b.1, "b")?;
    let (n, d) = (
        a.1.shape().elem_count(),
        *a.1.shape().dims().last().unwrap_or(&1),
    );
    if !n.is_multiple_of(4) || !d.is_multiple_of(4) || b.1.shape().elem_count() != n {
        candle_core::bail!(
            "residual_add: {:?} needs rows of a multiple of 4",
            a.1.shape()
        );
    }
    // Without a bias the kernel never reads it: any f32 view stands in (the kernel's type).
    let bias = match has_bias {
        true => Some(view::<f32>(third.0, third.1, "bias")?),
        false => None,
    };
    // Never read (has_bias = 0): allocated, not filled.
    let dummy = alloc_written::<f32>(&dev, 4)?;
    let y = alloc_written::<T>(&dev, n)?;
    let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
    let (n4, d4, hb) = ((n / 4) as i64, (d / 4) as i32, has_bias as i32);
    let mut l = func.builder();
    l.arg(&av).arg(&bv);
    match &bias {
        Some(bias) => l.arg(bias),
        None => l.arg(&dummy),
    };
    l.arg(&y).arg(&n4).arg(&d4).arg(&hb);
    // SAFETY: argument types and counts match the kernel's signature; one thread per four
    // elements of n (n and d multiples of 4, views 4-element aligned: checked by the caller and
    // above); the bias (d floats) is read only with `has_bias`.
    unsafe { l.launch(per_element(n / 4)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), a.1.shape().clone()))
}

// ---- Channel argmax (`kernels/ops.cu`, `super::argmax`) ----

/// `(B, H, W)` u32: the index of the largest channel of `x` `(B, C, H, W)` (f32, bf16 or f16) at
/// every pixel.
pub fn argmax_channels(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s, argmax_channels_t(s, l))
}

fn argmax_channels_t<T: KernelFloat>(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let x = view::<T>(s, l, "logits")?;
    let (b, c, h, w) = l.shape().dims4()?;
    let pixels = b * h * w;
    let out = alloc_written::<u32>(&dev, pixels)?;
    let func = dev.get_or_load_custom_func(
        &dtype_kernel("cim_argmax_channels", s.dtype())?,
        MODULE,
        PTX,
    )?;
    let (bb, cc, hw) = (b as i32, c as i32, (h * w) as i32);
    let cfg = LaunchConfig {
        grid_dim: (pixels.div_ceil(32) as u32, 1, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let mut a = func.builder();
    a.arg(&x).arg(&out).arg(&bb).arg(&cc).arg(&hw);
    // SAFETY: argument types and counts match the kernel's signature; 32 pixels per block, each
    // written once by its lane-0 thread.
    unsafe { a.launch(cfg) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((b, h, w)),
    ))
}

/// `(rows)` u32: the index of the largest value of each row of contiguous `x` `(…, C)` (f32, bf16
/// or f16), one warp per row.
pub fn argmax_rows(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s, argmax_rows_t(s, l))
}

fn argmax_rows_t<T: KernelFloat>(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let x = view::<T>(s, l, "logits")?;
    let dims = l.dims();
    let (lead, c) = dims.split_at(dims.len() - 1);
    let (rows, c) = (lead.iter().product::<usize>(), c[0]);
    let out = alloc_written::<u32>(&dev, rows)?;
    let func =
        dev.get_or_load_custom_func(&dtype_kernel("cim_argmax_rows", s.dtype())?, MODULE, PTX)?;
    let (rr, cc) = (rows as i64, c as i32);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let mut a = func.builder();
    a.arg(&x).arg(&out).arg(&rr).arg(&cc);
    // SAFETY: argument types and counts match the kernel's signature; one warp per row (8 per
    // block), each row's result written once by its lane 0; rows beyond `rows` return at once.
    unsafe { a.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(lead)))
}

/// Reads (`set = None`) or sets one u64 attribute of the stream-ordered memory pool cudarc
/// allocates from (`cuMemAllocAsync` on the device's default pool); returns the value.
fn pool_attribute(
    dev: &candle_core::cuda_backend::CudaDevice,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    set: Option<u64>,
) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .w()?;
    let mut value = set.unwrap_or(0);
    let ptr = (&mut value as *mut u64).cast();
    // SAFETY: the attributes passed here (release threshold, used-memory high-water mark) are
    // cuuint64_t values read or written through the pointer; `pool` is the device's pool.
    unsafe {
        match set {
            Some(_) => sys::cuMemPoolSetAttribute(pool, attr, ptr),
            None => sys::cuMemPoolGetAttribute(pool, attr, ptr),
        }
    }
    .result()
    .w()?;
    Ok(value)
}

/// Sets up a CUDA device for training on its one stream (see `crate::device::prepare`):
/// no per-allocation events, and, with `keep_freed`, a pool that keeps freed memory across
/// synchronisations.
pub fn prepare_device(dev: &candle_core::cuda_backend::CudaDevice, keep_freed: bool) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute;
    // SAFETY: cim runs every kernel and copy of a device on that device's one stream (candle's),
    // so the events cudarc would create per buffer to order uses across streams are never needed:
    // cudarc only records and waits on them in multi-stream mode, which cim never enters, but it
    // still creates and destroys two per allocation while tracking is on.
    unsafe { dev.disable_event_tracking() };
    if keep_freed {
        let attr = CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        // Only speed depends on it: a device without a settable pool trains as before.
        if let Err(e) = pool_attribute(dev, attr, Some(u64::MAX)) {
            tracing::warn!("run.cuda_keep_freed: the memory pool's release threshold stays CUDA's default ({e})");
        }
    }
    Ok(())
}

/// The device pool's high-water mark of memory in use, in bytes (what PyTorch calls
/// `max_memory_allocated`), since the device was opened or [`reset_pool_peak`].
pub fn pool_peak(dev: &candle_core::cuda_backend::CudaDevice) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute;
    pool_attribute(
        dev,
        CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        None,
    )
}

/// Resets [`pool_peak`] to the memory in use now (CUDA accepts only 0 for this attribute).
pub fn reset_pool_peak(dev: &candle_core::cuda_backend::CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute;
    pool_attribute(
        dev,
        CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        Some(0),
    )?;
    Ok(())
}

/// Flash attention's geometry from `qkv` `(B, N, 3·H·64)`: `(B, N)`.
fn flash_dims(l: &Layout, heads: usize) -> Result<(usize, usize)> {
    let (b, n, c3) = l.shape().dims3()?;
    if c3 != 3 * heads * 64 || n == 0 || b * heads > 65_535 {
        candle_core::bail!(
            "flash attention: qkv {:?} is not (B, N ≥ 1, 3 × {heads} × 64)",
            l.dims()
        );
    }
    Ok((b, n))
}

/// Rows (query rows in the forward, keys in the backward) per block of the flash kernels
/// (`FWD_BQ`, `BWD_BK` in `kernels/ops.cu`).
const FLASH_TILE: usize = 64;

/// The flash kernels' grid: `(tiles of FLASH_TILE rows, item × head)`, 128 threads per block.
fn flash_grid(n: usize, b: usize, heads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(FLASH_TILE) as u32, (b * heads) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `(B, H, N)` f32: log Σ_keys exp(scale · q·k) per query row, from bf16 `qkv` (head width 64).
pub fn flash_stats(
    s: &CudaStorage,
    l: &Layout,
    heads: usize,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let (b, n) = flash_dims(l, heads)?;
    let qkv = view::<half::bf16>(s, l, "qkv")?;
    let lse = alloc_written::<f32>(&dev, b * heads * n)?;
    let func = dev.get_or_load_custom_func("cim_flash_stats_bf16", MODULE, PTX)?;
    let (nn, hh) = (n as i32, heads as i32);
    let mut a = func.builder();
    a.arg(&qkv).arg(&lse).arg(&nn).arg(&hh).arg(&scale);
    // SAFETY: argument types and counts match the kernel's signature; the grid covers every
    // (item, head) and every 64 query rows; each real row's value is written once.
    unsafe { a.launch(flash_grid(n, b, heads)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(lse, dev),
        Shape::from((b, heads, n)),
    ))
}

/// `(B, N, H·64)` bf16: Σ_keys exp(scale · q·k − lse) · v, from bf16 `qkv` and [`flash_stats`].
pub fn flash_out(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    heads: usize,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (b, n) = flash_dims(l1, heads)?;
    let (qkv, lse) = (
        view::<half::bf16>(s1, l1, "qkv")?,
        view::<f32>(s2, l2, "lse")?,
    );
    let out = alloc_written::<half::bf16>(&dev, b * n * heads * 64)?;
    let func = dev.get_or_load_custom_func("cim_flash_out_bf16", MODULE, PTX)?;
    let (nn, hh) = (n as i32, heads as i32);
    let mut a = func.builder();
    a.arg(&qkv)
        .arg(&lse)
        .arg(&out)
        .arg(&nn)
        .arg(&hh)
        .arg(&scale);
    // SAFETY: as in `flash_stats`; every real (row, head) output row is written by its block.
    unsafe { a.launch(flash_grid(n, b, heads)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((b, n, heads * 64)),
    ))
}

/// `(B, H, N)` f32: Σ_d dout·out per row and head, from bf16 `out`, `dout` `(B, N, H·64)`.
pub fn flash_delta(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    heads: usize,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (b, n, c) = l1.shape().dims3()?;
    if c != heads * 64 || l2.dims() != l1.dims() {
        candle_core::bail!(
            "flash attention backward: out {:?}, dout {:?}",
            l1.dims(),
            l2.dims()
        );
    }
    let (out, dout) = (
        view::<half::bf16>(s1, l1, "out")?,
        view::<half::bf16>(s2, l2, "dout")?,
    );
    let delta = alloc_written::<f32>(&dev, b * heads * n)?;
    let func = dev.get_or_load_custom_func("cim_flash_delta_bf16", MODULE, PTX)?;
    let rows = (b * n * heads) as i64;
    let (nn, hh) = (n as i32, heads as i32);
    let cfg = LaunchConfig {
        grid_dim: ((b * n * heads).div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut a = func.builder();
    a.arg(&out)
        .arg(&dout)
        .arg(&delta)
        .arg(&rows)
        .arg(&nn)
        .arg(&hh);
    // SAFETY: argument types and counts match; one warp per row, rows beyond `rows` return.
    unsafe { a.launch(cfg) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(delta, dev),
        Shape::from((b, heads, n)),
    ))
}

/// `d qkv` `(B, N, 3·H·64)` bf16 from bf16 `qkv`, bf16 `dout` `(B, N, H·64)` and `stats`
/// `(2, B, H, N)` f32 = [lse; delta].
#[allow(clippy::too_many_arguments)]
pub fn flash_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    heads: usize,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (b, n) = flash_dims(l1, heads)?;
    if l2.dims() != [b, n, heads * 64] || l3.dims() != [2, b, heads, n] {
        candle_core::bail!(
            "flash attention backward: dout {:?}, stats {:?}",
            l2.dims(),
            l3.dims()
        );
    }
    let qkv = view::<half::bf16>(s1, l1, "qkv")?;
    let dout = view::<half::bf16>(s2, l2, "dout")?;
    let stats = view::<f32>(s3, l3, "stats")?;
    let m = b * heads * n;
    let (lse, delta) = (stats.slice(0..m), stats.slice(m..2 * m));
    let dqkv = alloc_written::<half::bf16>(&dev, b * n * 3 * heads * 64)?;
    let dq = dev.alloc_zeros::<f32>(b * n * heads * 64)?;
    let (nn, hh) = (n as i32, heads as i32);
    let func = dev.get_or_load_custom_func("cim_flash_bwd_bf16", MODULE, PTX)?;
    let mut a = func.builder();
    a.arg(&qkv)
        .arg(&dout)
        .arg(&lse)
        .arg(&delta)
        .arg(&dqkv)
        .arg(&dq);
    a.arg(&nn).arg(&hh).arg(&scale);
    // SAFETY: argument types and counts match; the grid covers every (item, head) and every 64
    // keys; the block of a key tile writes that tile's dk, dv rows; dq is zeroed and summed
    // into with atomics; its q slots of dqkv are written by the next launch.
    unsafe { a.launch(flash_grid(n, b, heads)) }.w()?;
    let total = (b * n * heads * 64) as i64;
    let func = dev.get_or_load_custom_func("cim_flash_dq_bf16", MODULE, PTX)?;
    let mut a = func.builder();
    a.arg(&dq).arg(&dqkv).arg(&total).arg(&hh);
    // SAFETY: one thread per dq element (grid rounded up; threads past `total` return).
    unsafe { a.launch(per_element(total as usize)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(dqkv, dev), l1.shape().clone()))
}

/// `max(x, 0)` (`dy` = None) or its backward `dy · [x > 0]` (`x` the input, or the output: the
/// mask is the same), four elements per thread; f32 or bf16, every view contiguous, 4-element aligned, of a multiple of 4 elements
/// (checked by the caller).
pub fn relu(
    x: (&CudaStorage, &Layout),
    dy: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(x.0, relu_t(x, dy))
}

fn relu_t<T: KernelFloat>(
    x: (&CudaStorage, &Layout),
    dy: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device().clone();
    let n = x.1.shape().elem_count();
    if !n.is_multiple_of(4) || dy.is_some_and(|(_, l)| l.shape().elem_count() != n) {
        candle_core::bail!("relu: {:?} needs a multiple of 4 elements", x.1.shape());
    }
    let xv = view::<T>(x.0, x.1, "x")?;
    let out = alloc_written::<T>(&dev, n)?;
    let n4 = (n / 4) as i64;
    let base = if dy.is_some() {
        "cim_relu_bwd_v4"
    } else {
        "cim_relu_fwd_v4"
    };
    let func = dev.get_or_load_custom_func(&dtype_kernel(base, x.0.dtype())?, MODULE, PTX)?;
    let mut a = func.builder();
    a.arg(&xv);
    let gv;
    if let Some((s, l)) = dy {
        gv = view::<T>(s, l, "dy")?;
        a.arg(&gv);
    }
    a.arg(&out).arg(&n4);
    // SAFETY: argument types and counts match the kernels' signatures; one thread per four
    // elements, every view 4-element aligned (checked by the caller).
    unsafe { a.launch(per_element(n / 4)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), x.1.shape().clone()))
}
