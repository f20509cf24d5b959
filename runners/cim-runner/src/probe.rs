//! `cim-run probe`: how good are the pre-trained enhancer's frozen features? A linear classifier
//! (multinomial logistic regression, weight decay chosen on a held-out part of the training split)
//! and a k-NN classifier (cosine similarity, temperature-weighted votes as in DINO), each against
//! the same network at random initialisation with `--init scratch`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use cim_api::pixels::normalize;
use cim_api::{Error, Result};

use crate::config::{resolve, DataConfig, DataSource};
use crate::data::{center_views, open_labelled, subset, Dataset};
use crate::optim::AdamW;
use crate::pipeline::Cim;

/// Which vector summarises an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean of the per-position features (ViT patch tokens; ResNet: global average pool).
    Mean,
    /// The ViT class token (an error for networks without one).
    Cls,
    /// Both, concatenated.
    Both,
}

/// Where the enhancer's weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// The run's final weights (`model.safetensors`, else its newest checkpoint).
    Pretrained,
    /// The same network freshly initialised with the run's seed: the control row.
    Scratch,
}

/// Options of `cim-run probe`.
#[derive(Debug, Clone)]
pub struct ProbeArgs {
    /// A pre-training run directory (its `config.toml` builds the enhancer).
    pub run_dir: PathBuf,
    /// Labelled data: `cifar10` (PATH holds train.bin/test.bin) or `folder` (PATH/train, PATH/val).
    /// Without --path, `data.source` and `data.path` of --preset/--config/--set are used.
    pub data: DataSource,
    pub path: Option<PathBuf>,
    pub layers: crate::config::Layers,
    pub feature: Pooling,
    pub init: Init,
    /// Use at most this many training / test images (a seeded random subset; 0 = all).
    pub train_limit: usize,
    pub test_limit: usize,
    /// Neighbours of the k-NN classifier.
    pub k: usize,
    /// Temperature of the k-NN votes (weight `exp(cos / T)`).
    pub temperature: f64,
    /// Images per forward pass when extracting features.
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassifierScore {
    pub top1: f64,
    pub top5: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub run_dir: String,
    pub enhancer: String,
    pub init: Init,
    pub feature: Pooling,
    pub dim: usize,
    pub train_images: usize,
    pub test_images: usize,
    pub classes: usize,
    pub linear: ClassifierScore,
    /// The weight decay the held-out split chose, and the held-out top-1 of each candidate.
    pub linear_weight_decay: f64,
    pub linear_sweep: Vec<(f64, f64)>,
    pub knn: ClassifierScore,
    pub knn_k: usize,
    /// Feature extraction throughput (decode + forward), images/s.
    pub images_per_s: f64,
    pub seconds: f64,
}

impl ProbeReport {
    /// The report as a table for people (`cim-run probe` prints it on stderr, the JSON line on
    /// stdout).
    pub fn table(&self) -> String {
        let pct = |x: f64| format!("{:6.2} %", 100.0 * x);
        let low = |x: &dyn std::fmt::Debug| format!("{x:?}").to_lowercase();
        let wd = |w: f64| {
            if w == 0.0 {
                "0".to_string()
            } else {
                format!("{w:.0e}")
            }
        };
        let mut t = format!(
            "probe of {} ({}, {} weights, {} feature of {} dims)\n\
             {} training / {} test images, {} classes\n\n\
             {:<24} {:>9} {:>9}\n",
            self.run_dir,
            self.enhancer,
            low(&self.init),
            low(&self.feature),
            self.dim,
            self.train_images,
            self.test_images,
            self.classes,
            "classifier",
            "top-1",
            "top-5",
        );
        t.push_str(&format!(
            "{:<24} {:>9} {:>9}\n{:<24} {:>9} {:>9}\n",
            format!("linear (wd {})", wd(self.linear_weight_decay)),
            pct(self.linear.top1),
            pct(self.linear.top5),
            format!("k-NN (k = {})", self.knn_k),
            pct(self.knn.top1),
            pct(self.knn.top5),
        ));
        let sweep: Vec<String> = self
            .linear_sweep
            .iter()
            .map(|(w, acc)| format!("{}: {:.2} %", wd(*w), 100.0 * acc))
            .collect();
        t.push_str(&format!(
            "\nweight decay chosen on held-out training images: {}\n{:.0} images/s, {:.1} s\n",
            sweep.join(", "),
            self.images_per_s,
            self.seconds
        ));
        t
    }
}

/// Features `(N, D)` and labels of a split, on the host.
pub struct FeatureSet {
    pub x: Vec<f32>,
    pub dim: usize,
    pub labels: Vec<u32>,
}

impl FeatureSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    fn tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.x,
            (self.len(), self.dim),
            &Device::Cpu,
        )?)
    }
}

/// The labelled data the flags name: `--data/--path` (with the config's `data.root`), else the
/// config's `[data]`.
fn data_source(args: &ProbeArgs) -> Result<DataConfig> {
    if args.path.is_none() && args.layers.preset.is_none() && args.layers.config_files.is_empty() {
        return Err(Error::config(
            "probe needs labelled data: --path DIR (with --data cifar10|folder) or --preset probe_cifar10",
        ));
    }
    let mut data = resolve(&args.layers)?.cfg.data;
    if let Some(p) = &args.path {
        data.source = args.data;
        data.path = Some(p.clone());
    }
    Ok(data)
}

fn open_split(args: &ProbeArgs, train: bool) -> Result<Box<dyn Dataset>> {
    open_labelled(&data_source(args)?, train, "probe")
}

/// Runs the enhancer over `indices` of `data` (centre crop at the run's size, normalised).
fn extract(
    cim: &Cim,
    data: &dyn Dataset,
    indices: &[usize],
    pooling: Pooling,
    batch: usize,
) -> Result<FeatureSet> {
    use rayon::prelude::*;
    let cfg = &cim.data;
    let s = cfg.image_size;
    let mut x = vec![];
    let mut labels = vec![];
    let mut dim = 0;
    for chunk in indices.chunks(batch.max(1)) {
        let views: Vec<Result<Vec<f32>>> = chunk
            .par_iter()
            .map(|&i| Ok(center_views(&data.get(i)?, cfg).image))
            .collect();
        let mut pixels = Vec::with_capacity(chunk.len() * 3 * s * s);
        for v in views {
            pixels.extend(v?);
        }
        let img = Tensor::from_vec(pixels, (chunk.len(), 3, s, s), &cim.device)?;
        let f = cim
            .enhancer
            .forward_t(&normalize(&img, cfg.mean, cfg.std)?, false)?;
        let mean = || f.tokens.mean(1);
        let cls = || {
            f.cls.clone().ok_or_else(|| {
                Error::config(format!(
                    "--feature cls: enhancer `{}` has no class token (use --feature mean)",
                    cim.names["enhancer"]
                ))
            })
        };
        let v = match pooling {
            Pooling::Mean => mean()?,
            Pooling::Cls => cls()?,
            Pooling::Both => Tensor::cat(&[&mean()?, &cls()?], 1)?,
        };
        dim = v.dim(1)?;
        x.extend(v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        for &i in chunk {
            labels.push(
                data.label(i)
                    .ok_or_else(|| Error::config(format!("{} has no labels", data.describe())))?
                    as u32,
            );
        }
    }
    Ok(FeatureSet { x, dim, labels })
}

fn cache_or_extract(
    path: &Path,
    fresh_than: Option<std::time::SystemTime>,
    make: impl FnOnce() -> Result<FeatureSet>,
) -> Result<(FeatureSet, bool)> {
    // A cache is valid unless the weights it was computed from are newer.
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let valid = match (modified, fresh_than) {
        (Some(m), Some(w)) => m >= w,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if valid {
        if let Ok(t) = candle_core::safetensors::load(path, &Device::Cpu) {
            if let (Some(x), Some(y)) = (t.get("features"), t.get("labels")) {
                return Ok((
                    FeatureSet {
                        x: x.flatten_all()?.to_vec1()?,
                        dim: x.dim(1)?,
                        labels: y.to_vec1()?,
                    },
                    true,
                ));
            }
        }
    }
    let f = make()?;
    let n = f.len();
    let tensors = std::collections::HashMap::from([
        ("features".to_string(), f.tensor()?),
        (
            "labels".to_string(),
            Tensor::from_slice(&f.labels, n, &Device::Cpu)?,
        ),
    ]);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::checkpoint::save_safetensors(path, &tensors)?;
    Ok((f, false))
}

/// Top-1 and top-5 accuracy of class scores `(N, C)` against labels.
pub fn topk_accuracy(scores: &[f32], classes: usize, labels: &[u32]) -> ClassifierScore {
    let (mut t1, mut t5) = (0usize, 0usize);
    for (row, &y) in scores.chunks(classes).zip(labels) {
        let mine = row[y as usize];
        // Rank = classes scoring strictly higher (ties count in the label's favour).
        let rank = row.iter().filter(|&&s| s > mine).count();
        t1 += (rank == 0) as usize;
        t5 += (rank < 5) as usize;
    }
    let n = labels.len().max(1) as f64;
    ClassifierScore {
        top1: t1 as f64 / n,
        top5: t5 as f64 / n,
    }
}

/// Mean and standard deviation per feature (for standardising before the linear probe).
fn moments(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(0)?;
    let std = x
        .broadcast_sub(&mean)?
        .sqr()?
        .mean_keepdim(0)?
        .sqrt()?
        .affine(1.0, 1e-6)?;
    Ok((mean, std))
}

/// Multinomial logistic regression, full batch, Adam until the loss stops improving
/// (relative change < 1e-6 over 25 iterations) or 3000 iterations. Returns `(W, b)`.
pub fn fit_linear(
    x: &Tensor,
    y: &[u32],
    classes: usize,
    weight_decay: f64,
) -> Result<(Tensor, Tensor)> {
    let d = x.dim(1)?;
    let w = Var::zeros((d, classes), DType::F32, x.device())?;
    let b = Var::zeros(classes, DType::F32, x.device())?;
    let yt = Tensor::from_slice(y, y.len(), x.device())?;
    // The L2 penalty is in the loss (the probe's regularisation), not decoupled in the optimizer.
    let mut opt = AdamW::new(
        vec![("w".into(), w.clone()), ("b".into(), b.clone())],
        [0.9, 0.999],
        1e-8,
        0.0,
    )?;
    let mut best = f64::INFINITY;
    let mut since = 0;
    for _ in 0..3000 {
        let logits = x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
        let ce = candle_nn::loss::cross_entropy(&logits, &yt)?;
        let loss = (ce + (w.as_tensor().sqr()?.sum_all()? * (0.5 * weight_decay))?)?;
        let l = loss.to_scalar::<f32>()? as f64;
        opt.step(&loss.backward()?, 0.01, 0.0)?;
        if l < best * (1.0 - 1e-6) {
            best = l;
            since = 0;
        } else {
            since += 1;
            if since >= 25 {
                break;
            }
        }
    }
    Ok((w.as_tensor().clone(), b.as_tensor().clone()))
}

fn linear_scores(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    Ok(x.matmul(w)?
        .broadcast_add(b)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// The linear probe's test score, the chosen weight decay, and `(decay, held-out top-1)` per candidate.
pub type LinearProbe = (ClassifierScore, f64, Vec<(f64, f64)>);

/// Weight decays tried on the held-out split.
pub const WEIGHT_DECAYS: [f64; 5] = [0.0, 1e-4, 1e-3, 1e-2, 1e-1];

/// The linear probe: standardise with training statistics, choose the weight decay on a 10 %
/// held-out part of the training split, refit on all of it, score the test split.
pub fn linear_probe(
    train: &FeatureSet,
    test: &FeatureSet,
    classes: usize,
    seed: u64,
) -> Result<LinearProbe> {
    let xt = train.tensor()?;
    let (mean, std) = moments(&xt)?;
    let z = |t: &Tensor| -> Result<Tensor> { Ok(t.broadcast_sub(&mean)?.broadcast_div(&std)?) };
    let xt = z(&xt)?;
    let xs = z(&test.tensor()?)?;
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x11E4));
    let held = (train.len() / 10).max(1).min(train.len().saturating_sub(1));
    let (val_idx, fit_idx) = order.split_at(held);
    let pick = |idx: &[usize]| -> Result<(Tensor, Vec<u32>)> {
        let i = Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            idx.len(),
            &Device::Cpu,
        )?;
        Ok((
            xt.index_select(&i, 0)?,
            idx.iter().map(|&i| train.labels[i]).collect(),
        ))
    };
    let (xf, yf) = pick(fit_idx)?;
    let (xv, yv) = pick(val_idx)?;
    let mut sweep = vec![];
    for &wd in &WEIGHT_DECAYS {
        let (w, b) = fit_linear(&xf, &yf, classes, wd)?;
        let acc = topk_accuracy(&linear_scores(&xv, &w, &b)?, classes, &yv).top1;
        sweep.push((wd, acc));
    }
    let best = sweep
        .iter()
        .copied()
        .fold((0.0, -1.0), |a, b| if b.1 > a.1 { b } else { a })
        .0;
    let (w, b) = fit_linear(&xt, &train.labels, classes, best)?;
    let score = topk_accuracy(&linear_scores(&xs, &w, &b)?, classes, &test.labels);
    Ok((score, best, sweep))
}

/// Weighted k-NN (DINO): cosine similarity to every training feature, the `k` nearest vote for
/// their class with weight `exp(cos / T)`.
pub fn knn(
    train: &FeatureSet,
    test: &FeatureSet,
    classes: usize,
    k: usize,
    temperature: f64,
) -> Result<ClassifierScore> {
    let unit = |t: Tensor| -> Result<Tensor> {
        let n = t.sqr()?.sum_keepdim(1)?.sqrt()?.affine(1.0, 1e-12)?;
        Ok(t.broadcast_div(&n)?)
    };
    let xt = unit(train.tensor()?)?.t()?.contiguous()?;
    let xs = unit(test.tensor()?)?;
    let k = k.clamp(1, train.len());
    let mut scores = vec![0f32; test.len() * classes];
    for start in (0..test.len()).step_by(256) {
        let m = 256.min(test.len() - start);
        let sims = xs.narrow(0, start, m)?.matmul(&xt)?.to_vec2::<f32>()?;
        for (r, row) in sims.into_iter().enumerate() {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
            let out = &mut scores[(start + r) * classes..(start + r + 1) * classes];
            for &j in &idx[..k] {
                out[train.labels[j] as usize] += ((row[j] as f64) / temperature).exp() as f32;
            }
        }
    }
    Ok(topk_accuracy(&scores, classes, &test.labels))
}

/// Builds the run's enhancer, extracts (or reuses cached) features, and scores both classifiers.
pub fn probe(args: &ProbeArgs) -> Result<ProbeReport> {
    let start = Instant::now();
    let res = resolve(&crate::config::run_layers(&args.run_dir, vec![])?)?;
    let cim = Cim::build(&res)?;
    let weights = match args.init {
        Init::Scratch => None,
        Init::Pretrained => {
            let file = crate::inspect::load_weights(&cim, &args.run_dir)?;
            std::fs::metadata(&file).and_then(|m| m.modified()).ok()
        }
    };
    let train_data = open_split(args, true)?;
    let test_data = open_split(args, false)?;
    let classes = train_data.num_classes().max(test_data.num_classes());
    let seed = res.cfg.run.seed;
    let tag = |split: &str, n: usize| {
        args.run_dir.join("probe").join(
            format!(
                "{}-{:?}-{}-{split}-{n}.safetensors",
                format!("{:?}", args.init).to_lowercase(),
                args.feature,
                format!(
                    "{:?}",
                    data_source(args).map(|d| d.source).unwrap_or(args.data)
                )
                .to_lowercase()
            )
            .to_lowercase(),
        )
    };
    let tr_idx = subset(train_data.len(), args.train_limit, seed ^ 0x7A1);
    let te_idx = subset(test_data.len(), args.test_limit, seed ^ 0x7E5);
    let t_extract = Instant::now();
    let (train, c1) = cache_or_extract(&tag("train", tr_idx.len()), weights, || {
        extract(&cim, train_data.as_ref(), &tr_idx, args.feature, args.batch)
    })?;
    let (test, c2) = cache_or_extract(&tag("test", te_idx.len()), weights, || {
        extract(&cim, test_data.as_ref(), &te_idx, args.feature, args.batch)
    })?;
    let extracted = (!c1) as usize * train.len() + (!c2) as usize * test.len();
    let images_per_s = extracted as f64 / t_extract.elapsed().as_secs_f64().max(1e-9);
    let (linear, wd, sweep) = linear_probe(&train, &test, classes, seed)?;
    let knn = knn(&train, &test, classes, args.k, args.temperature)?;
    Ok(ProbeReport {
        run_dir: args.run_dir.display().to_string(),
        enhancer: cim.names["enhancer"].clone(),
        init: args.init,
        feature: args.feature,
        dim: train.dim,
        train_images: train.len(),
        test_images: test.len(),
        classes,
        linear,
        linear_weight_decay: wd,
        linear_sweep: sweep,
        knn,
        knn_k: args.k,
        images_per_s,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// `n` points in `d` dimensions whose class is the argmax of a planted linear map of the first
    /// 4 coordinates; the other coordinates are noise.
    fn planted(n: usize, d: usize, classes: usize, seed: u64) -> FeatureSet {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w: Vec<f32> = (0..4 * classes)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let mut x = vec![];
        let mut labels = vec![];
        for _ in 0..n {
            let p: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let scores: Vec<f32> = (0..classes)
                .map(|c| (0..4).map(|j| p[j] * w[j * classes + c]).sum())
                .collect();
            let y = (0..classes)
                .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
                .unwrap();
            x.extend(p);
            labels.push(y as u32);
        }
        FeatureSet { x, dim: d, labels }
    }

    #[test]
    fn linear_probe_recovers_a_planted_linear_signal() -> Result<()> {
        let train = planted(2000, 16, 4, 1);
        let test = planted(500, 16, 4, 2);
        let (score, wd, sweep) = linear_probe(&train, &test, 4, 0)?;
        assert!(
            score.top1 > 0.93,
            "top-1 {} (wd {wd}, sweep {sweep:?})",
            score.top1
        );
        assert_eq!(score.top5, 1.0);
        assert_eq!(sweep.len(), WEIGHT_DECAYS.len());
        // Chance is ~25 %: random labels must not be learnable.
        let mut shuffled = planted(500, 16, 4, 3);
        shuffled
            .labels
            .shuffle(&mut rand::rngs::StdRng::seed_from_u64(4));
        let (s, _, _) = linear_probe(&train, &shuffled, 4, 0)?;
        assert!(s.top1 < 0.4, "{}", s.top1);
        Ok(())
    }

    #[test]
    fn knn_with_k1_on_its_own_training_set_is_perfect() -> Result<()> {
        let train = planted(300, 8, 5, 5);
        let s = knn(&train, &train, 5, 1, 0.07)?;
        assert_eq!(s.top1, 1.0);
        // And k-NN generalises on the planted signal.
        let test = planted(300, 8, 5, 6);
        let s = knn(&train, &test, 5, 20, 0.07)?;
        assert!(s.top1 > 0.6, "{}", s.top1);
        Ok(())
    }

    #[test]
    fn topk_counts_ranks() {
        let scores = [0.1, 0.5, 0.4, /* row 2 */ 0.9, 0.0, 0.2];
        let s = topk_accuracy(&scores, 3, &[2, 0]);
        assert_eq!((s.top1, s.top5), (0.5, 1.0));
    }
}
