//! Conformance checks every registered component must pass (feature `testing`).
//!
//! Each check builds the tiny variant of a registered name on the CPU with a fresh trainable
//! [`ParamStore`], runs it on random input, and asserts output shapes, finiteness and — for
//! trainable components — that every parameter receives a non-zero gradient.
//! [`check_all_registered`] runs the check for every name of every kind, so a new plugin is
//! covered by linking it into a test binary.

use candle_core::{DType, Device, Tensor, Var};
use figment::Figment;
use rand::SeedableRng;

use crate::registry::{self, BuildCtx, Entry, Kind, Variant};
use crate::traits::{Corruption, Enhancer, Generator, Masking, Objective, Sampler, Tokenizer};
use crate::types::{CorruptionInput, EnhancerInfo, Features, Mask, ObjectiveBatch, TokenGrid};
use crate::{Error, ParamStore, Result};

/// Sizes used by the conformance checks.
pub const IMAGE: usize = 32;
pub const BATCH: usize = 2;
pub const VOCAB: usize = 64;
pub const GRID: TokenGrid = TokenGrid { h: 8, w: 8 };

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::msg(msg()))
    }
}

/// A build context for tiny components on the CPU.
pub fn tiny_ctx(store: &ParamStore, prefix: &str) -> BuildCtx {
    let dev = Device::Cpu;
    BuildCtx {
        device: dev.clone(),
        dtype: DType::F32,
        image_size: IMAGE,
        tokenizer_size: IMAGE,
        seed: 0,
        vocab_size: Some(VOCAB),
        token_grid: Some(GRID),
        enhancer: Some(EnhancerInfo {
            dim: 16,
            stride: 4,
            image_size: IMAGE,
            shareable_blocks: None,
        }),
        vb: store.var_builder(DType::F32, &dev).pp(prefix),
        buffers: ParamStore::frozen(0),
        enhancer_vb: None,
        exec: crate::ExecChoices::default(),
        cross_rank: Default::default(),
    }
}

fn entry<K: Kind + ?Sized>(name: &str) -> Result<&'static Entry<K>>
where
    Entry<K>: inventory::Collect,
{
    registry::lookup::<K>(name, "")
}

/// Asserts `t` holds only finite values.
pub fn assert_finite(t: &Tensor, what: &str) -> Result<()> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    ensure(v.iter().all(|x| x.is_finite()), || {
        format!("{what}: non-finite values")
    })
}

/// Asserts every parameter of `store` got a gradient with a non-zero entry from `loss`.
pub fn assert_all_grads_nonzero(store: &ParamStore, loss: &Tensor, what: &str) -> Result<()> {
    let grads = loss.backward()?;
    ensure(!store.is_empty(), || {
        format!("{what}: has no trainable parameters")
    })?;
    for (name, var) in store.vars() {
        let g = grads.get(var.as_tensor()).ok_or_else(|| {
            Error::msg(format!("{what}: parameter `{name}` received no gradient"))
        })?;
        let s = g
            .abs()?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        ensure(s > 0.0 && s.is_finite(), || {
            format!("{what}: gradient of `{name}` is {s} (must be non-zero and finite)")
        })?;
    }
    Ok(())
}

fn rand_image(seed: u64) -> Result<Tensor> {
    uniform((BATCH, 3, IMAGE, IMAGE), seed)
}

/// Deterministic uniform `[0,1)` tensor.
pub fn uniform(shape: impl Into<candle_core::Shape>, seed: u64) -> Result<Tensor> {
    use rand::Rng;
    let shape = shape.into();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.elem_count()).map(|_| rng.gen::<f32>()).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// A mask with `k` leading positions masked per image, rotated per image.
pub fn simple_mask(batch: usize, grid: TokenGrid, k: usize) -> Result<Mask> {
    let n = grid.len();
    let flags = (0..batch * n)
        .map(|i| ((i % n) + (i / n) * 3) % n < k)
        .collect();
    Mask::new(batch, grid, flags)
}

pub fn check_tokenizer(name: &str) -> Result<()> {
    let e = entry::<dyn Tokenizer>(name)?;
    let store = ParamStore::frozen(0);
    let ctx = tiny_ctx(&store, "tokenizer");
    let tok = (e.build)(&Figment::new(), Variant::Tiny, &ctx)?;
    let grid = tok.grid((IMAGE, IMAGE))?;
    let ids = tok.encode(&rand_image(1)?)?;
    ensure(ids.dims() == [BATCH, grid.h, grid.w], || {
        format!(
            "tokenizer {name}: encode gave {:?}, expected [{BATCH}, {}, {}]",
            ids.dims(),
            grid.h,
            grid.w
        )
    })?;
    ensure(ids.dtype() == DType::U32, || {
        format!("tokenizer {name}: ids must be u32")
    })?;
    let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
    ensure(max < tok.vocab_size(), || {
        format!("tokenizer {name}: id {max} ≥ vocab")
    })?;
    let img = tok.decode(&ids)?;
    ensure(img.dims() == [BATCH, 3, IMAGE, IMAGE], || {
        format!("tokenizer {name}: decode gave {:?}", img.dims())
    })?;
    assert_finite(&img, name)?;
    let lo = img.flatten_all()?.min(0)?.to_scalar::<f32>()?;
    let hi = img.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    ensure(
        (0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi),
        || format!("tokenizer {name}: decoded pixels in [{lo}, {hi}], expected within [0, 1]"),
    )?;
    ensure(!ids.is_variable() && !img.is_variable(), || {
        format!("tokenizer {name}: outputs must not track gradients")
    })?;
    Ok(())
}

pub fn check_masking(name: &str) -> Result<()> {
    let e = entry::<dyn Masking>(name)?;
    let store = ParamStore::trainable(0);
    let m = (e.build)(&Figment::new(), Variant::Tiny, &tiny_ctx(&store, "masking"))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mask = m.sample(BATCH, GRID, &mut rng)?;
    ensure(mask.batch() == BATCH && mask.grid() == GRID, || {
        format!("masking {name}: wrong layout")
    })?;
    for k in mask.counts() {
        ensure(k > 0 && k < GRID.len(), || {
            format!("masking {name}: {k} of {} masked", GRID.len())
        })?;
    }
    let mut rng2 = rand::rngs::StdRng::seed_from_u64(3);
    ensure(m.sample(BATCH, GRID, &mut rng2)? == mask, || {
        format!("masking {name}: same seed gave another mask")
    })?;
    ensure(store.is_empty(), || {
        format!("masking {name}: must not create parameters")
    })
}

pub fn check_generator(name: &str) -> Result<()> {
    let e = entry::<dyn Generator>(name)?;
    let store = ParamStore::trainable(0);
    let g = (e.build)(
        &Figment::new(),
        Variant::Tiny,
        &tiny_ctx(&store, "generator"),
    )?;
    let mask = simple_mask(BATCH, GRID, 20)?;
    let logits = g.forward(&rand_image(2)?, &mask)?;
    ensure(logits.dims() == [mask.total(), VOCAB], || {
        format!(
            "generator {name}: logits {:?}, expected [{}, {VOCAB}]",
            logits.dims(),
            mask.total()
        )
    })?;
    assert_finite(&logits, name)?;
    let golden: Vec<u32> = (0..mask.total() as u32)
        .map(|i| (i * 7) % VOCAB as u32)
        .collect();
    let golden = Tensor::from_vec(golden, mask.total(), &Device::Cpu)?;
    let loss = g.mim_loss(&logits, &golden)?;
    ensure(loss.dims().is_empty(), || {
        format!("generator {name}: loss must be a scalar")
    })?;
    assert_finite(&loss, name)?;
    assert_all_grads_nonzero(&store, &loss, &format!("generator {name}"))
}

/// A tokenizer for corruption checks: token `t` decodes to a `4×4` block of grey `t / VOCAB`.
struct BlockTokenizer;

impl Tokenizer for BlockTokenizer {
    fn vocab_size(&self) -> usize {
        VOCAB
    }
    fn grid(&self, _size: (usize, usize)) -> Result<TokenGrid> {
        Ok(GRID)
    }
    fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(Tensor::zeros(
            (pixels.dim(0)?, GRID.h, GRID.w),
            DType::U32,
            pixels.device(),
        )?)
    }
    fn decode(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, gh, gw) = ids.dims3()?;
        let s = IMAGE / GRID.h;
        Ok((ids.to_dtype(DType::F32)? / VOCAB as f64)?
            .reshape((b, 1, gh, gw))?
            .upsample_nearest2d(gh * s, gw * s)?
            .broadcast_as((b, 3, gh * s, gw * s))?
            .contiguous()?)
    }
}

/// A corruption returns an image of the input's shape in `[0, 1]`, flags changes only at masked
/// positions, repeats with its seed and creates no parameters.
pub fn check_corruption(name: &str) -> Result<()> {
    let e = entry::<dyn Corruption>(name)?;
    let store = ParamStore::trainable(0);
    let c = (e.build)(
        &Figment::new(),
        Variant::Tiny,
        &tiny_ctx(&store, "corruption"),
    )?;
    let image = uniform((BATCH, 3, IMAGE, IMAGE), 7)?;
    let flags: Vec<bool> = (0..BATCH * GRID.len()).map(|i| i % 3 == 0).collect();
    let mask = Mask::new(BATCH, GRID, flags.clone())?;
    let golden: Vec<u32> = (0..BATCH * GRID.len())
        .map(|i| (i * 5 % VOCAB) as u32)
        .collect();
    let golden = Tensor::from_vec(golden, (BATCH, GRID.h, GRID.w), &Device::Cpu)?;
    let at_mask = mask.indices_tensor(&Device::Cpu)?;
    let sampled: Vec<u32> = (0..mask.total()).map(|i| (i * 11 % VOCAB) as u32).collect();
    let sampled = Tensor::from_vec(sampled, mask.total(), &Device::Cpu)?;
    let input = CorruptionInput {
        image: &image,
        golden: &golden,
        mask: &mask,
        at_mask: &at_mask,
        sampled: &sampled,
        tokenizer: &BlockTokenizer,
    };
    let run = |seed| c.corrupt(&input, &mut rand::rngs::StdRng::seed_from_u64(seed));
    let out = run(5)?;
    ensure(out.image.dims() == image.dims(), || {
        format!(
            "corruption {name}: image {:?}, expected {:?}",
            out.image.dims(),
            image.dims()
        )
    })?;
    assert_finite(&out.image, name)?;
    let px = out.image.flatten_all()?.to_vec1::<f32>()?;
    ensure(px.iter().all(|v| (0.0..=1.0).contains(v)), || {
        format!("corruption {name}: pixels outside [0, 1]")
    })?;
    ensure(out.replaced.dims() == [BATCH, GRID.len()], || {
        format!(
            "corruption {name}: replaced {:?}, expected [{BATCH}, {}]",
            out.replaced.dims(),
            GRID.len()
        )
    })?;
    let replaced = out.replaced.flatten_all()?.to_vec1::<f32>()?;
    ensure(
        replaced
            .iter()
            .zip(&flags)
            .all(|(&r, &m)| r == 0.0 || (r == 1.0 && m)),
        || format!("corruption {name}: a change flagged outside the mask, or a flag not 0/1"),
    )?;
    ensure(run(5)?.image.flatten_all()?.to_vec1::<f32>()? == px, || {
        format!("corruption {name}: same seed gave another image")
    })?;
    ensure(store.is_empty(), || {
        format!("corruption {name}: must not create parameters")
    })
}

pub fn check_sampler(name: &str) -> Result<()> {
    let e = entry::<dyn Sampler>(name)?;
    let store = ParamStore::trainable(0);
    let s = (e.build)(&Figment::new(), Variant::Tiny, &tiny_ctx(&store, "sampler"))?;
    let logits = uniform((10, VOCAB), 4)?.affine(4.0, -2.0)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let ids = s.sample(&logits, &mut rng)?;
    ensure(ids.dims() == [10] && ids.dtype() == DType::U32, || {
        format!(
            "sampler {name}: got {:?} {:?}, expected [10] u32",
            ids.dims(),
            ids.dtype()
        )
    })?;
    let v: Vec<u32> = ids.to_vec1()?;
    ensure(v.iter().all(|&i| (i as usize) < VOCAB), || {
        format!("sampler {name}: id out of range")
    })?;
    let mut rng2 = rand::rngs::StdRng::seed_from_u64(5);
    ensure(s.sample(&logits, &mut rng2)?.to_vec1::<u32>()? == v, || {
        format!("sampler {name}: same seed gave other tokens")
    })?;
    ensure(store.is_empty(), || {
        format!("sampler {name}: must not create parameters")
    })
}

pub fn check_enhancer(name: &str) -> Result<()> {
    let e = entry::<dyn Enhancer>(name)?;
    let store = ParamStore::trainable(0);
    let enh = (e.build)(
        &Figment::new(),
        Variant::Tiny,
        &tiny_ctx(&store, "enhancer"),
    )?;
    let info = enh.info();
    ensure(info.image_size == IMAGE, || {
        format!("enhancer {name}: built for {} px", info.image_size)
    })?;
    let f = enh.forward_t(&rand_image(6)?, true)?;
    let grid = info.grid();
    ensure(
        f.tokens.dims() == [BATCH, grid.len(), info.dim] && f.grid == grid,
        || {
            format!(
                "enhancer {name}: features {:?} on {}, expected [{BATCH}, {}, {}]",
                f.tokens.dims(),
                f.grid,
                grid.len(),
                info.dim
            )
        },
    )?;
    assert_finite(&f.tokens, name)?;
    let proj = uniform(f.tokens.shape().clone(), 7)?.affine(2.0, -1.0)?;
    let loss = (f.tokens * proj)?.sum_all()?;
    assert_all_grads_nonzero(&store, &loss, &format!("enhancer {name}"))
}

pub fn check_objective(name: &str) -> Result<()> {
    let e = entry::<dyn Objective>(name)?;
    let store = ParamStore::trainable(0);
    let ctx = tiny_ctx(&store, "objective");
    let info = ctx.enhancer.expect("tiny ctx has an enhancer");
    let obj = (e.build)(&Figment::new(), Variant::Tiny, &ctx)?;
    let grid = info.grid();
    let feats = Var::from_tensor(&uniform((BATCH, grid.len(), info.dim), 8)?)?;
    let features = Features {
        tokens: feats.as_tensor().clone(),
        grid,
        stride: info.stride,
        cls: None,
    };
    let original = rand_image(9)?;
    let corrupted = rand_image(10)?;
    let mask = simple_mask(BATCH, grid, 10)?;
    let replaced = mask.to_tensor(DType::F32, &Device::Cpu)?;
    let out = obj.forward(
        &features,
        &ObjectiveBatch {
            original: &original,
            corrupted: &corrupted,
            mask: &mask,
            replaced: &replaced,
        },
    )?;
    ensure(out.loss.dims().is_empty(), || {
        format!("objective {name}: loss must be a scalar")
    })?;
    assert_finite(&out.loss, name)?;
    ensure(obj.weight().is_finite() && obj.weight() > 0.0, || {
        format!("objective {name}: bad weight")
    })?;
    if let Some(p) = &out.prediction {
        ensure(p.dims() == [BATCH, 3, IMAGE, IMAGE], || {
            format!("objective {name}: prediction {:?}", p.dims())
        })?;
    }
    let grads = out.loss.backward()?;
    ensure(grads.get(feats.as_tensor()).is_some(), || {
        format!("objective {name}: no gradient reaches the enhancer features")
    })?;
    assert_all_grads_nonzero(&store, &out.loss, &format!("objective {name}"))
}

/// Runs the conformance check of every registered name of every kind. Returns the names checked.
pub fn check_all_registered() -> Result<Vec<String>> {
    let mut done = vec![];
    let mut run = |kind: &str, names: Vec<&'static str>, f: fn(&str) -> Result<()>| -> Result<()> {
        for n in names {
            f(n).map_err(|e| Error::msg(format!("conformance of {kind} `{n}` failed: {e}")))?;
            done.push(format!("{kind}/{n}"));
        }
        Ok(())
    };
    run(
        "tokenizer",
        registry::names::<dyn Tokenizer>()?,
        check_tokenizer,
    )?;
    run("masking", registry::names::<dyn Masking>()?, check_masking)?;
    run(
        "generator",
        registry::names::<dyn Generator>()?,
        check_generator,
    )?;
    run("sampler", registry::names::<dyn Sampler>()?, check_sampler)?;
    run(
        "corruption",
        registry::names::<dyn Corruption>()?,
        check_corruption,
    )?;
    run(
        "enhancer",
        registry::names::<dyn Enhancer>()?,
        check_enhancer,
    )?;
    run(
        "objective",
        registry::names::<dyn Objective>()?,
        check_objective,
    )?;
    Ok(done)
}
