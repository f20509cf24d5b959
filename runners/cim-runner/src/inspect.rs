//! Looking at what the pipeline does: `cim-run corrupt` (Figure-2-style grids for given images) and
//! `cim-run bench-data` (loader throughput per stage).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use cim_api::{Error, Result};

use crate::config::{resolve, Layers};
use crate::data::{center_views, read_image, Batch, Dataset, Folder, Loader};
use crate::pipeline::{Cim, StepRngs};

/// Options of `cim-run corrupt`.
#[derive(Debug, Clone)]
pub struct CorruptArgs {
    pub layers: Layers,
    /// Images to corrupt (JPEG or PNG); each becomes one row.
    pub images: Vec<PathBuf>,
    /// Trained weights: a run directory (its `model.safetensors`, else its newest checkpoint) or a
    /// `.safetensors` file. Without it the generator is freshly initialised.
    pub weights: Option<PathBuf>,
    /// Corrupted samples per image (columns after the original and the masked input).
    pub samples: usize,
    /// Seed of the mask and the samples.
    pub seed: u64,
    /// Output PNG.
    pub out: PathBuf,
}

/// Loads trained weights into `cim` from a run directory (its `model.safetensors`, else its newest
/// checkpoint) or a `.safetensors` file; returns the file read.
pub fn load_weights(cim: &Cim, from: &std::path::Path) -> Result<PathBuf> {
    let file = if from.is_dir() {
        crate::checkpoint::weights_file(from)?
    } else {
        from.to_path_buf()
    };
    let all = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).map_err(|e| {
        Error::Data {
            path: file.display().to_string(),
            message: e.to_string(),
        }
    })?;
    let (params, buffers): (
        std::collections::BTreeMap<_, _>,
        std::collections::BTreeMap<_, _>,
    ) = all
        .into_iter()
        .partition(|(k, _)| cim.params.get(k).is_some());
    let ctx = |e: Error| Error::msg(format!("{}: {e}", file.display()));
    cim.params.load(&params, false).map_err(ctx)?;
    cim.buffers.load(&buffers, false).map_err(ctx)?;
    Ok(file)
}

/// Writes a grid: original | masked input | `samples` corrupted images, one row per image.
/// Returns the fraction of masked tokens that the samples replaced by a different token.
pub fn corrupt(args: &CorruptArgs) -> Result<f64> {
    let res = resolve(&args.layers)?;
    let cim = Cim::build(&res)?;
    if let Some(w) = &args.weights {
        load_weights(&cim, w)?;
    }
    let cfg = &res.cfg.data;
    let (mut image, mut tok) = (vec![], vec![]);
    for p in &args.images {
        let img = read_image(p)?;
        let v = center_views(&img, cfg);
        image.extend(v.image);
        tok.extend(v.tok_view);
    }
    let (b, s, t) = (args.images.len(), cfg.image_size, cfg.tokenizer_size);
    let batch = Batch {
        image: Tensor::from_vec(image, (b, 3, s, s), &cim.device)?,
        tok_view: Tensor::from_vec(tok, (b, 3, t, t), &cim.device)?,
        indices: (0..b).collect(),
    };
    let golden = cim.tokens(&batch)?;
    let mut rngs = StepRngs::for_step(args.seed, 0, 0);
    let mim = cim.mim(&batch, golden, &mut rngs)?;
    let mut cols = vec![
        ("original".to_string(), batch.image.clone()),
        (
            "masked input".to_string(),
            crate::pictures::masked_view(&batch.image, &mim.mask)?,
        ),
    ];
    let mut replaced = 0.0;
    for k in 0..args.samples.max(1) {
        let mut r = StepRngs::for_step(args.seed, 0, 1 + k as u64);
        let c = cim.corrupt(&batch, &mim, &mut r)?;
        replaced += c.n_replaced.to_scalar::<f32>()? as f64 / mim.mask.total().max(1) as f64;
        cols.push((format!("sample {}", k + 1), c.image));
    }
    let cols: Vec<crate::pictures::Column> =
        cols.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    crate::pictures::write_grid(&args.out, &cols, b)?;
    Ok(replaced / args.samples.max(1) as f64)
}

/// Options of `cim-run bench-data`.
#[derive(Debug, Clone)]
pub struct BenchDataArgs {
    /// An ImageFolder (`DIR/<class>/*.jpg|png`).
    pub dir: PathBuf,
    /// Loader threads (0 = one per core).
    pub workers: usize,
    pub batch: usize,
    /// Batches to time (after one warm-up batch).
    pub batches: usize,
    pub image_size: usize,
    pub tokenizer_size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchDataReport {
    pub dir: String,
    pub images: usize,
    pub workers: usize,
    pub batch: usize,
    pub batches: usize,
    pub images_per_s: f64,
    pub images_per_s_per_worker: f64,
    /// Per image, one worker: read + decode, and crop + flip + two resizes (+ CHW float).
    pub decode_ms_per_image: f64,
    pub augment_ms_per_image: f64,
    pub skipped: usize,
}

pub fn bench_data(args: &BenchDataArgs) -> Result<BenchDataReport> {
    let folder = Arc::new(Folder::open(&args.dir)?);
    let n = folder.len();
    let cfg = crate::config::DataConfig {
        image_size: args.image_size,
        tokenizer_size: args.tokenizer_size,
        workers: args.workers,
        ..Default::default()
    };
    let loader = Loader::new(folder, cfg, args.batch, 0)?;
    loader.host_batch(0)?; // warm-up: page cache, thread pool
    let t0 = Instant::now();
    let (mut dec, mut aug, mut skipped) = (0.0, 0.0, 0);
    for i in 1..=args.batches as u64 {
        let b = loader.host_batch(i)?;
        dec += b.decode_ms;
        aug += b.augment_ms;
        skipped += b.skipped.len();
    }
    let secs = t0.elapsed().as_secs_f64();
    let imgs = (args.batches * args.batch) as f64;
    let ips = imgs / secs;
    Ok(BenchDataReport {
        dir: args.dir.display().to_string(),
        images: n,
        workers: loader.workers(),
        batch: args.batch,
        batches: args.batches,
        images_per_s: ips,
        images_per_s_per_worker: ips / loader.workers() as f64,
        decode_ms_per_image: dec / imgs,
        augment_ms_per_image: aug / imgs,
        skipped,
    })
}

/// Options of `cim-run tokenize`.
#[derive(Debug, Clone)]
pub struct TokenizeArgs {
    pub layers: Layers,
    /// Images (JPEG or PNG), centre-cropped to the tokenizer view (`data.tokenizer_size`).
    pub images: Vec<PathBuf>,
    /// Also write a PNG with each image's tokenizer view and its reconstruction from the tokens.
    pub decode: Option<PathBuf>,
}

/// One image's tokens.
#[derive(Debug, Clone, Serialize)]
pub struct Tokenized {
    pub image: String,
    pub tokenizer: String,
    pub grid: [usize; 2],
    /// Row-major token ids.
    pub tokens: Vec<Vec<u32>>,
    pub distinct: usize,
    /// PSNR (dB) of the reconstruction against the tokenizer view.
    pub psnr_db: f64,
}

/// Encodes each image with the configured tokenizer (and decodes it back).
pub fn tokenize(args: &TokenizeArgs) -> Result<Vec<Tokenized>> {
    let res = resolve(&args.layers)?;
    let cim = Cim::build(&res)?;
    let t = res.cfg.data.tokenizer_size;
    let mut px = vec![];
    for p in &args.images {
        let img = read_image(p)?;
        px.extend(center_views(&img, &res.cfg.data).tok_view);
    }
    let b = args.images.len();
    let view = Tensor::from_vec(px, (b, 3, t, t), &cim.device)?;
    let ids = cim.tokenizer.encode(&view)?;
    let recon = cim.tokenizer.decode(&ids)?;
    let mse: Vec<f32> = (&recon - &view)?
        .sqr()?
        .flatten_from(1)?
        .mean(1)?
        .to_vec1()?;
    if let Some(out) = &args.decode {
        crate::pictures::write_grid(
            out,
            &[
                ("tokenizer view", view.clone()),
                ("reconstruction", recon.clone()),
            ],
            b,
        )?;
    }
    let (gh, gw) = (ids.dim(1)?, ids.dim(2)?);
    let rows: Vec<Vec<Vec<u32>>> = ids.to_vec3()?;
    Ok(args
        .images
        .iter()
        .zip(rows)
        .zip(mse)
        .map(|((p, tokens), mse)| Tokenized {
            image: p.display().to_string(),
            tokenizer: cim.names["tokenizer"].clone(),
            grid: [gh, gw],
            distinct: tokens
                .iter()
                .flatten()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            tokens,
            psnr_db: 10.0 * (1.0 / (mse as f64).max(1e-12)).log10(),
        })
        .collect())
}
