//! `cim-run finetune`: end-to-end fine-tuning of a run's enhancer with a classification head, the
//! paper's recipes (Tables 10–11) in `[finetune]`, and `--init scratch` as the control row: the same
//! network at random initialisation, trained identically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Module, Tensor};
use candle_nn::Init as NnInit;
use image::imageops::FilterType;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use cim_api::pixels::normalize;
use cim_api::{Error, ParamStore, Result};

use crate::augment::{mix_batch, rand_augment, smooth_targets};
use crate::checkpoint::save_safetensors;
use crate::config::{resolve, DataConfig, FinetuneConfig, FinetuneLoss, Layers};
use crate::data::{chw, mix, open_labelled, random_resized_crop, subset, Dataset};
use crate::optim::{AdamW, Schedule};
use crate::pipeline::Cim;
use crate::probe::{topk_accuracy, ClassifierScore, Init};
use crate::rundir::RunDir;

/// Options of `cim-run finetune`.
#[derive(Debug, Clone)]
pub struct FinetuneArgs {
    /// The pre-training run whose enhancer is fine-tuned (its `config.toml` builds the network).
    pub run_dir: PathBuf,
    /// The recipe and the labelled data: `--preset ft_tiny_cifar10`, `--set finetune.epochs=3`, …
    pub layers: Layers,
    pub init: Init,
    /// Output folder (default: `<RUN_DIR>/finetune-<init>-<unix time>`).
    pub out: Option<PathBuf>,
}

/// One evaluation on the test split.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRecord {
    pub eval: bool,
    pub epoch: usize,
    pub step: usize,
    pub top1: f64,
    pub top5: f64,
    pub train_loss: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FinetuneSummary {
    pub out: String,
    pub init: Init,
    pub enhancer: String,
    pub steps: usize,
    pub epochs: f64,
    pub best_top1: f64,
    pub last_top1: f64,
    pub curve: Vec<EvalRecord>,
    pub seconds: f64,
}

impl FinetuneSummary {
    /// The evaluations as a table for people (`cim-run finetune` prints it on stderr, the JSON
    /// line on stdout).
    pub fn table(&self) -> String {
        let mut t = format!(
            "fine-tuning of {} ({} weights) in {}: {} steps, {:.1} epochs, {:.1} s\n\n{:>6} {:>8} {:>11} {:>9} {:>9}\n",
            self.enhancer,
            format!("{:?}", self.init).to_lowercase(),
            self.out,
            self.steps,
            self.epochs,
            self.seconds,
            "epoch",
            "step",
            "train loss",
            "top-1",
            "top-5"
        );
        for r in self.curve.iter().filter(|r| r.eval) {
            t.push_str(&format!(
                "{:>6} {:>8} {:>11.4} {:>7.2} % {:>7.2} %\n",
                r.epoch,
                r.step,
                r.train_loss,
                100.0 * r.top1,
                100.0 * r.top5
            ));
        }
        t.push_str(&format!(
            "\nbest top-1 {:.2} %, last {:.2} %\n",
            100.0 * self.best_top1,
            100.0 * self.last_top1
        ));
        t
    }
}

/// The layer id of a parameter for layer-wise learning-rate decay (BEiT): embeddings 0, block `i`
/// `i + 1`, everything after the blocks (final norm, fc_norm, head) `depth + 1`.
pub fn layer_id(name: &str, depth: usize) -> usize {
    let leaf = name.strip_prefix("enhancer.").unwrap_or(name);
    if leaf.starts_with("cls_token")
        || leaf.starts_with("pos_embed")
        || leaf.starts_with("patch_embed")
    {
        return 0;
    }
    if let Some(rest) = leaf.strip_prefix("blocks.") {
        if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
            return i + 1;
        }
    }
    depth + 1
}

/// The learning-rate multiplier of a parameter: `decay^(depth + 1 − layer_id)`.
pub fn layer_scale(name: &str, depth: usize, decay: f64) -> f64 {
    decay.powi((depth + 1 - layer_id(name, depth)) as i32)
}

fn open_split(data: &DataConfig, train: bool) -> Result<Box<dyn Dataset>> {
    open_labelled(data, train, "fine-tuning")
}

/// Training view: RandomResizedCrop + flip + RandAugment, CHW in `[0, 1]`.
fn train_view(
    img: &image::RgbImage,
    data: &DataConfig,
    ft: &FinetuneConfig,
    rng: &mut impl Rng,
) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let (x, y, cw, ch) = random_resized_crop(w, h, data.crop_scale, data.crop_ratio, rng);
    let s = data.image_size as u32;
    let crop = image::imageops::crop_imm(img, x, y, cw, ch).to_image();
    let mut out = image::imageops::resize(&crop, s, s, FilterType::CatmullRom);
    if data.hflip && rng.gen_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    if ft.randaugment_n > 0 {
        rand_augment(
            &mut out,
            ft.randaugment_n,
            ft.randaugment_m,
            ft.randaugment_mstd,
            rng,
        );
    }
    chw(&out)
}

/// Test view: shorter side to `size / crop_ratio`, centre crop `size` (BEiT's eval transform).
fn test_view(img: &image::RgbImage, size: usize, crop_ratio: f64) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let short = ((size as f64 / crop_ratio).round() as u32).max(size as u32);
    let (nw, nh) = if w <= h {
        (
            short,
            ((h as f64 * short as f64 / w as f64).round() as u32).max(short),
        )
    } else {
        (
            ((w as f64 * short as f64 / h as f64).round() as u32).max(short),
            short,
        )
    };
    let r = image::imageops::resize(img, nw, nh, FilterType::CatmullRom);
    let s = size as u32;
    chw(&image::imageops::crop_imm(&r, (nw - s) / 2, (nh - s) / 2, s, s).to_image())
}

/// The classifier on top of the enhancer: pooled features → LayerNorm (`fc_norm`) → Linear.
struct Head {
    /// `fc_norm`: LayerNorm written out (candle_nn's fused LayerNorm has no backward).
    norm_w: Tensor,
    norm_b: Tensor,
    linear: candle_nn::Linear,
    cls: bool,
}

impl Head {
    fn logits(&self, cim: &Cim, x: &Tensor, train: bool) -> Result<Tensor> {
        let f = cim.enhancer.forward_t(x, train)?;
        let pooled = if self.cls {
            f.cls.ok_or_else(|| {
                Error::config(format!(
                    "finetune.pooling = \"cls\": enhancer `{}` has no class token",
                    cim.names["enhancer"]
                ))
            })?
        } else {
            f.tokens.mean(1)?
        };
        let mean = pooled.mean_keepdim(1)?;
        let centred = pooled.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(1)?;
        let normed = centred
            .broadcast_div(&(var + 1e-6)?.sqrt()?)?
            .broadcast_mul(&self.norm_w)?
            .broadcast_add(&self.norm_b)?;
        Ok(self.linear.forward(&normed)?)
    }
}

/// Fine-tunes and evaluates; writes `metrics.jsonl`, `best.safetensors`, `last.safetensors`.
pub fn finetune(args: &FinetuneArgs) -> Result<FinetuneSummary> {
    let start = Instant::now();
    let ft_res = resolve(&args.layers)?;
    let ft = ft_res.cfg.finetune.clone();
    let data = ft_res.cfg.data.clone();
    let seed = ft_res.cfg.run.seed;
    // The network: the run's own config, with fine-tuning's stochastic depth.
    let layers = |set: Vec<String>| crate::config::run_layers(&args.run_dir, set);
    let pre = resolve(&layers(vec![])?)?;
    let enh_name = pre.cfg.enhancer["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut set = vec![format!("run.device=\"{}\"", ft_res.cfg.run.device)];
    if ft.drop_path > 0.0 {
        set.push(format!("enhancer.{enh_name}.drop_path={}", ft.drop_path));
    }
    let pre = resolve(&layers(set)?).map_err(|e| {
        Error::config(format!(
            "finetune.drop_path = {} for enhancer `{enh_name}`: {e} (set finetune.drop_path = 0 for networks without stochastic depth)",
            ft.drop_path
        ))
    })?;
    if pre.cfg.data.image_size != data.image_size {
        return Err(Error::config(format!(
            "data.image_size = {} but the run's enhancer was built for {} px",
            data.image_size, pre.cfg.data.image_size
        )));
    }
    let cim = Cim::build(&pre)?;
    if args.init == Init::Pretrained {
        crate::inspect::load_weights(&cim, &args.run_dir)?;
    }
    let train_data = open_split(&data, true)?;
    let test_data = open_split(&data, false)?;
    let classes = train_data.num_classes().max(test_data.num_classes());
    let dim = cim.enhancer.info().dim;
    // Head parameters: timm/BEiT names `fc_norm.*`, `head.*`.
    let head_store = ParamStore::trainable(seed ^ 0x4EAD);
    let vb = head_store.var_builder(DType::F32, &cim.device);
    let head = Head {
        norm_w: vb.get_with_hints(dim, "fc_norm.weight", NnInit::Const(1.0))?,
        norm_b: vb.get_with_hints(dim, "fc_norm.bias", NnInit::Const(0.0))?,
        linear: candle_nn::Linear::new(
            vb.get_with_hints(
                (classes, dim),
                "head.weight",
                NnInit::Randn {
                    mean: 0.0,
                    stdev: 2e-5,
                },
            )?,
            Some(vb.get_with_hints(classes, "head.bias", NnInit::Const(0.0))?),
        ),
        cls: ft.pooling == crate::config::HeadPooling::Cls,
    };
    let vars: Vec<_> = cim
        .params
        .vars()
        .into_iter()
        .filter(|(k, _)| k.starts_with("enhancer."))
        .chain(head_store.vars())
        .collect();
    let depth = vars
        .iter()
        .filter_map(|(k, _)| {
            k.strip_prefix("enhancer.blocks.")
                .and_then(|r| r.split('.').next()?.parse::<usize>().ok())
        })
        .max()
        .map_or(0, |d| d + 1);
    let mut opt = AdamW::new(vars.clone(), ft.betas, ft.adam_eps, ft.weight_decay)?;
    if depth > 0 && ft.layer_decay != 1.0 {
        opt.set_lr_scales(|n| layer_scale(n, depth, ft.layer_decay));
    }
    let train_idx = subset(train_data.len(), ft.train_limit, seed ^ 0xF7A1);
    let test_idx = subset(test_data.len(), ft.test_limit, seed ^ 0xF7E5);
    let bs = ft.batch_size.min(train_idx.len()).max(1);
    let per_epoch = (train_idx.len() / bs).max(1);
    let total = if ft.max_steps > 0 {
        ft.max_steps
    } else {
        ft.epochs * per_epoch
    };
    let schedule = Schedule {
        base: ft.lr,
        min: ft.min_lr,
        warmup: (ft.warmup_epochs * per_epoch).min(total),
        total: total.max(1),
    };
    let out = RunDir::create(match &args.out {
        Some(o) => o.clone(),
        None => {
            let init = format!("{:?}", args.init).to_lowercase();
            RunDir::default_path(&args.run_dir, &format!("finetune-{init}"))
        }
    })?;
    out.write_config(&ft_res)?;
    let mut metrics = out.metrics()?;
    if ft_res.cfg.run.tensorboard {
        metrics = metrics.tensorboard(&out)?;
    }
    tracing::info!(
        run = %args.run_dir.display(),
        init = ?args.init,
        enhancer = %enh_name,
        train = train_idx.len(),
        test = test_idx.len(),
        steps = total,
        depth,
        "fine-tuning"
    );

    let s = data.image_size;
    let weights = |head_store: &ParamStore| -> HashMap<String, Tensor> {
        vars.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .chain(
                cim.buffers
                    .vars()
                    .into_iter()
                    .map(|(k, v)| (k, v.as_tensor().clone())),
            )
            .chain(
                head_store
                    .vars()
                    .into_iter()
                    .map(|(k, v)| (k, v.as_tensor().clone())),
            )
            .collect()
    };
    let evaluate = |epoch: usize, step: usize, train_loss: f64| -> Result<EvalRecord> {
        use rayon::prelude::*;
        let mut scores = vec![];
        let mut labels = vec![];
        for chunk in test_idx.chunks(256) {
            let views: Vec<Result<Vec<f32>>> = chunk
                .par_iter()
                .map(|&i| Ok(test_view(&test_data.get(i)?, s, ft.test_crop_ratio)))
                .collect();
            let mut px = vec![];
            for v in views {
                px.extend(v?);
            }
            let x = Tensor::from_vec(px, (chunk.len(), 3, s, s), &cim.device)?;
            let z = head.logits(&cim, &normalize(&x, data.mean, data.std)?, false)?;
            scores.extend(z.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            for &i in chunk {
                labels.push(test_data.label(i).unwrap_or(0) as u32);
            }
        }
        let ClassifierScore { top1, top5 } = topk_accuracy(&scores, classes, &labels);
        Ok(EvalRecord {
            eval: true,
            epoch,
            step,
            top1,
            top5,
            train_loss,
        })
    };

    let mut curve = vec![];
    let mut best = f64::NEG_INFINITY;
    let mut loss_sum = (0.0, 0usize);
    for step in 0..total {
        use rayon::prelude::*;
        let epoch = step / per_epoch;
        let k = step % per_epoch;
        let mut order = train_idx.clone();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix(
            seed ^ 0xF1E7,
            epoch as u64,
        )));
        let idx = &order[k * bs..(k + 1) * bs];
        let views: Vec<Result<(Vec<f32>, u32)>> = idx
            .par_iter()
            .enumerate()
            .map(|(j, &i)| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(mix(
                    seed,
                    mix(epoch as u64, (k * bs + j) as u64),
                ));
                let img = train_data.get(i)?;
                let label = train_data.label(i).unwrap_or(0) as u32;
                Ok((train_view(&img, &data, &ft, &mut rng), label))
            })
            .collect();
        let mut px = Vec::with_capacity(bs * 3 * s * s);
        let mut labels = Vec::with_capacity(bs);
        for v in views {
            let (p, l) = v?;
            px.extend(p);
            labels.push(l);
        }
        let mut targets = smooth_targets(&labels, classes, ft.label_smoothing);
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(seed ^ 0x313C, step as u64));
        mix_batch(
            &mut px,
            &mut targets,
            bs,
            s,
            ft.mixup,
            ft.cutmix,
            ft.mix_prob,
            ft.switch_prob,
            &mut rng,
        );
        let x = Tensor::from_vec(px, (bs, 3, s, s), &cim.device)?;
        let t = Tensor::from_vec(targets, (bs, classes), &cim.device)?;
        // Parameter gradients of fused nodes go straight to the store (see `ops::GradSink`).
        let sink = cim_ops::GradSink::install_if(cim.run.grad_sink);
        let z = head.logits(&cim, &normalize(&x, data.mean, data.std)?, true)?;
        let loss = match ft.loss {
            FinetuneLoss::Ce => (candle_nn::ops::log_softmax(&z, 1)? * &t)?
                .sum(1)?
                .mean_all()?
                .neg()?,
            // BCE with logits: max(z, 0) − z·t + log(1 + exp(−|z|)).
            FinetuneLoss::Bce => {
                ((z.relu()? - (&z * &t)?)? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all()?
            }
        };
        let l = loss.to_scalar::<f32>()? as f64;
        if !l.is_finite() {
            return Err(Error::msg(format!(
                "fine-tuning step {}: loss is {l}; stopping (best weights so far: {})",
                step + 1,
                out.join("best.safetensors").display()
            )));
        }
        let grads = sink.backward(&loss)?;
        drop(sink);
        let lr = schedule.lr(step);
        opt.step(&grads, lr, 0.0)?;
        loss_sum.0 += l;
        loss_sum.1 += 1;
        metrics
            .append(&serde_json::json!({"step": step + 1, "epoch": epoch, "lr": lr, "loss": l}))?;
        let end_of_epoch = k + 1 == per_epoch;
        let last = step + 1 == total;
        if (end_of_epoch && (epoch + 1).is_multiple_of(ft.eval_every.max(1))) || last {
            let rec = evaluate(epoch + 1, step + 1, loss_sum.0 / loss_sum.1.max(1) as f64)?;
            loss_sum = (0.0, 0);
            tracing::info!(
                epoch = epoch + 1,
                top1 = rec.top1,
                top5 = rec.top5,
                train_loss = rec.train_loss,
                "eval"
            );
            metrics.append(&rec)?;
            let w = weights(&head_store);
            save_safetensors(&out.join("last.safetensors"), &w)?;
            if rec.top1 > best {
                best = rec.top1;
                save_safetensors(&out.join("best.safetensors"), &w)?;
            }
            curve.push(rec);
        }
    }
    metrics.flush()?;
    Ok(FinetuneSummary {
        out: out.path().display().to_string(),
        init: args.init,
        enhancer: enh_name,
        steps: total,
        epochs: total as f64 / per_epoch as f64,
        best_top1: best,
        last_top1: curve.last().map_or(f64::NAN, |r| r.top1),
        curve,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Reads the evaluation records of a fine-tuning run's `metrics.jsonl`.
pub fn read_curve(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let p = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["eval"] == true)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_decay_gives_each_group_its_documented_rate() {
        let (depth, d) = (12, 0.8f64);
        let lr = |n: &str| layer_scale(n, depth, d);
        // Head and norms: full rate; last block one step down; first block 12; embeddings 13.
        assert_eq!(lr("head.weight"), 1.0);
        assert_eq!(lr("fc_norm.bias"), 1.0);
        assert_eq!(lr("enhancer.norm.weight"), 1.0);
        assert!((lr("enhancer.blocks.11.mlp.fc1.weight") - 0.8).abs() < 1e-12);
        assert!((lr("enhancer.blocks.0.attn.qkv.weight") - d.powi(12)).abs() < 1e-12);
        assert!((lr("enhancer.patch_embed.proj.weight") - d.powi(13)).abs() < 1e-12);
        assert!((lr("enhancer.cls_token") - d.powi(13)).abs() < 1e-12);
        assert!((lr("enhancer.pos_embed") - d.powi(13)).abs() < 1e-12);
        assert_eq!(layer_id("enhancer.blocks.3.norm1.weight", depth), 4);
    }

    #[test]
    fn test_view_is_a_centre_crop_at_the_crop_ratio() {
        // 40×20 image whose columns encode x: the centre crop of the 0.5-ratio resize is centred.
        let img = image::RgbImage::from_fn(40, 20, |x, _| image::Rgb([(x * 6) as u8, 0, 0]));
        let v = test_view(&img, 10, 0.5);
        assert_eq!(v.len(), 3 * 100);
        let row: Vec<f32> = v[..10].to_vec();
        let mid = (row[4] + row[5]) / 2.0 * 255.0;
        assert!((mid - 117.0).abs() < 12.0, "{row:?}");
    }
}
