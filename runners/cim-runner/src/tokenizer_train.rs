//! `cim-run tokenizer-train`: trains the `vq` tokenizer on `[data]`'s images (their tokenizer
//! view) and writes a safetensors file any preset can use as its frozen tokenizer.
//!
//! A seeded subset of `tokenizer_train.eval_images` images is held out of training; at the end the
//! command reports the reconstruction PSNR on them (centre views, quantised codes) and the codebook
//! usage there (perplexity = exp of the usage entropy, and the number of codes used).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use serde::Serialize;

use cim_api::registry::Variant;
use cim_api::{Error, ParamStore, Result, Tokenizer};
use cim_plugin_vq::{perplexity, reset_dead_codes, to_safetensors, VqConfig, VqModel};

use crate::config::{resolve, Layers};
use crate::data::{center_views, subset, Dataset, Loader};
use crate::optim::AdamW;

/// Options of `cim-run tokenizer-train`.
#[derive(Debug, Clone)]
pub struct TokenizerTrainArgs {
    pub layers: Layers,
    /// The weights to write (`.safetensors`); a report `.json` and a reconstruction grid `.png`
    /// are written beside it.
    pub out: PathBuf,
    /// Override `tokenizer_train.steps`.
    pub steps: Option<usize>,
}

/// What `tokenizer-train` prints (one JSON line) and writes beside the weights.
#[derive(Debug, Clone, Serialize)]
pub struct TokenizerReport {
    pub weights: String,
    pub steps: usize,
    pub seconds: f64,
    pub data: String,
    pub train_images: usize,
    pub eval_images: usize,
    /// Mean over held-out images of `10·log10(1 / mse)`, pixels in `[0, 1]`.
    pub psnr_db: f64,
    /// exp(entropy) of code usage over the held-out token grids.
    pub perplexity: f64,
    pub codes_used: usize,
    pub vocab_size: usize,
    /// Mean reconstruction mse of the first and last `log_every` training steps.
    pub train_mse_first: f64,
    pub train_mse_last: f64,
    /// Codes re-seeded over the run.
    pub codes_reset: usize,
    pub config: VqConfig,
}

/// A dataset restricted to some of its indices.
struct Subset {
    inner: Arc<dyn Dataset>,
    idx: Vec<usize>,
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.idx.len()
    }
    fn get(&self, i: usize) -> Result<image::RgbImage> {
        self.inner.get(self.idx[i])
    }
    fn describe(&self) -> String {
        format!("{} images of {}", self.idx.len(), self.inner.describe())
    }
}

/// `(mean PSNR, usage counts)` of `model` on `images` (centre tokenizer views), in batches.
pub fn evaluate(
    model: &VqModel,
    images: &dyn Dataset,
    cfg: &crate::config::DataConfig,
    device: &candle_core::Device,
    batch: usize,
) -> Result<(f64, Vec<u64>, Tensor, Tensor)> {
    let t = cfg.tokenizer_size;
    let mut counts = vec![0u64; model.config().vocab_size];
    let (mut psnr_sum, mut n) = (0.0, 0usize);
    let mut first = None;
    for start in (0..images.len()).step_by(batch.max(1)) {
        let end = (start + batch).min(images.len());
        let mut pix = vec![];
        for i in start..end {
            pix.extend(center_views(&images.get(i)?, cfg).tok_view);
        }
        let x = Tensor::from_vec(pix, (end - start, 3, t, t), device)?;
        let ids = model.tokens(&x)?;
        let rec = model.render(&ids)?.clamp(0f32, 1f32)?;
        let mse: Vec<f32> = (&rec - &x)?.sqr()?.flatten_from(1)?.mean(1)?.to_vec1()?;
        for m in mse {
            psnr_sum += -10.0 * (m.max(1e-10) as f64).log10();
            n += 1;
        }
        for id in ids.flatten_all()?.to_vec1::<u32>()? {
            counts[id as usize] += 1;
        }
        if first.is_none() {
            first = Some((x, rec));
        }
    }
    let (x, rec) = first.ok_or_else(|| Error::msg("no held-out images to evaluate on"))?;
    Ok((psnr_sum / n.max(1) as f64, counts, x, rec))
}

/// Trains the tokenizer the config's `[tokenizer.vq]` describes and writes it to `args.out`.
pub fn tokenizer_train(args: &TokenizerTrainArgs) -> Result<TokenizerReport> {
    let mut layers = args.layers.clone();
    if let Some(n) = args.steps {
        layers.set.push(format!("tokenizer_train.steps={n}"));
    }
    let res = resolve(&layers)?;
    if res.name_of("tokenizer") != "vq" {
        return Err(Error::config(format!(
            "tokenizer-train trains the `vq` tokenizer, but tokenizer.name = \"{}\" (add --set tokenizer.name=vq)",
            res.name_of("tokenizer")
        )));
    }
    let entry = cim_api::registry::lookup::<dyn Tokenizer>("vq", "")?;
    let params = (entry.params)(&res.figment.focus("tokenizer.vq"), Variant::Default)?;
    let vq: VqConfig = params
        .deserialize()
        .map_err(|e| Error::config(format!("tokenizer.vq: {e}")))?;
    let tc = res.cfg.tokenizer_train.clone();
    let data_cfg = res.cfg.data.clone();
    if tc.steps == 0 || tc.batch_size == 0 {
        return Err(Error::config(
            "tokenizer_train.steps and tokenizer_train.batch_size must be ≥ 1",
        ));
    }
    let device = crate::pipeline::device(
        res.cfg.run.device,
        res.cfg.run.cuda_keep_freed && res.cfg.run.cuda_unverified,
        0,
    )?;
    let seed = res.cfg.run.seed;

    let all = crate::data::open(&data_cfg)?;
    let n = all.len();
    let n_eval = tc.eval_images.min(n / 2).max(1);
    let eval_idx = subset(n, n_eval, seed ^ 0xE7A1);
    let held: std::collections::HashSet<usize> = eval_idx.iter().copied().collect();
    let train_idx: Vec<usize> = (0..n).filter(|i| !held.contains(i)).collect();
    let eval = Subset {
        inner: all.clone(),
        idx: eval_idx,
    };
    let train: Arc<dyn Dataset> = Arc::new(Subset {
        inner: all.clone(),
        idx: train_idx,
    });
    let train_images = train.len();
    let loader = Arc::new(Loader::new(
        train.clone(),
        data_cfg.clone(),
        tc.batch_size,
        seed,
    )?);
    let mut prefetch = crate::data::Prefetch::start(loader, 0, data_cfg.prefetch.max(1));

    let store = ParamStore::trainable(seed);
    let model = VqModel::new(vq.clone(), store.var_builder(DType::F32, &device))?;
    let vars = store.vars();
    let codebook = store
        .get("codebook")
        .ok_or_else(|| Error::msg("the VQ model has no `codebook` parameter"))?;
    let mut opt = AdamW::new(vars.clone(), [0.9, 0.99], 1e-8, 0.0)?;
    let schedule = crate::optim::Schedule {
        base: tc.lr,
        min: tc.min_lr,
        warmup: tc.warmup_steps,
        total: tc.steps,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED);
    let mut usage = vec![0u64; vq.vocab_size];
    let (mut codes_reset, mut mse_hist) = (0usize, vec![]);
    let t0 = Instant::now();
    tracing::info!(
        data = %all.describe(), train_images, eval_images = eval.len(), steps = tc.steps,
        params = store.num_params(), "training the vq tokenizer"
    );
    for step in 0..tc.steps {
        let hb = prefetch.next_batch()?;
        let x = hb
            .to_device(data_cfg.image_size, data_cfg.tokenizer_size, &device)?
            .tok_view;
        if step == 0 {
            // Codebook from encoder outputs (every code counts as dead).
            let rows = model.losses(&x)?.rows;
            reset_dead_codes(&codebook, &vec![0; vq.vocab_size], &rows, &mut rng)?;
        }
        let lr = schedule.lr(step);
        let s = model.losses(&x)?;
        let total = s.total.to_scalar::<f32>()?;
        if !total.is_finite() {
            return Err(Error::msg(format!(
                "tokenizer-train step {step}: loss is {total}; stopping (nothing written; lower tokenizer_train.lr)"
            )));
        }
        opt.step(&s.total.backward()?, lr, 0.0)?;
        for id in s.ids.to_vec1::<u32>()? {
            usage[id as usize] += 1;
        }
        mse_hist.push(s.recon.to_scalar::<f32>()? as f64);
        if tc.reset_every > 0 && (step + 1) % tc.reset_every == 0 && step + 1 < tc.steps {
            codes_reset += reset_dead_codes(&codebook, &usage, &s.rows, &mut rng)?;
            usage.iter_mut().for_each(|c| *c = 0);
        }
        if tc.log_every > 0 && (step + 1) % tc.log_every == 0 {
            let k = tc.log_every.min(mse_hist.len());
            let m = mse_hist[mse_hist.len() - k..].iter().sum::<f64>() / k as f64;
            tracing::info!(
                step = step + 1,
                recon_mse = format!("{m:.5}"),
                codebook = format!("{:.5}", s.codebook.to_scalar::<f32>()?),
                lr = format!("{lr:.2e}"),
                codes_reset,
                "tokenizer-train"
            );
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let (psnr_db, counts, x, rec) = evaluate(&model, &eval, &data_cfg, &device, 256)?;
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let bytes = to_safetensors(&tensors, &vq)?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::checkpoint::write_atomic(&args.out, &bytes)?;
    let k = tc.log_every.clamp(1, mse_hist.len());
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let report = TokenizerReport {
        weights: args.out.display().to_string(),
        steps: tc.steps,
        seconds,
        data: all.describe(),
        train_images,
        eval_images: eval.len(),
        psnr_db,
        perplexity: perplexity(&counts),
        codes_used: counts.iter().filter(|&&c| c > 0).count(),
        vocab_size: vq.vocab_size,
        train_mse_first: mean(&mse_hist[..k]),
        train_mse_last: mean(&mse_hist[mse_hist.len() - k..]),
        codes_reset,
        config: vq,
    };
    let side = |ext: &str| -> PathBuf { args.out.with_extension(ext) };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::msg(e.to_string()))?;
    crate::checkpoint::write_atomic(&side("json"), json.as_bytes())?;
    let rows = x.dim(0)?.min(8);
    crate::pictures::write_grid(
        &side("png"),
        &[
            ("held-out image", x.narrow(0, 0, rows)?),
            ("reconstruction", rec.narrow(0, 0, rows)?),
        ],
        rows,
    )?;
    Ok(report)
}

/// The report file written beside `weights`.
pub fn report_path(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}
