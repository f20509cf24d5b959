//! The training loop: data → [`Cim::forward`] → backward → clip → AdamW, with per-step metrics,
//! a divergence guard, and the run directory's files.
//!
//! A run directory holds:
//! - `config.toml` — the resolved configuration (loadable with `--config`)
//! - `metrics.jsonl` — one JSON object per step: step, lr, every loss, grad norm, images/s
//! - `model.safetensors` — every trainable parameter (`generator.*`, `enhancer.*`, `objective.*`)

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use serde::Serialize;

use cim_api::{Error, Losses, Result};

use crate::checkpoint::{save_safetensors, write_atomic};
use crate::config::Resolved;
use crate::data::{self, Loader};
use crate::optim::{AdamW, Schedule};
use crate::pipeline::{Cim, StepRngs};

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub lr: f64,
    #[serde(flatten)]
    pub losses: Losses,
    pub grad_norm: f64,
    pub images_per_s: f64,
    /// Milliseconds per phase: data, tok_encode, gen_fwd, sample_decode, enh_fwd, backward, optim.
    pub phase_ms: std::collections::BTreeMap<&'static str, f64>,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub records: Vec<StepRecord>,
    pub seconds: f64,
}

impl Summary {
    /// Mean of `key` over the first / last `n` steps.
    pub fn mean(&self, key: &str, first: bool, n: usize) -> f64 {
        let n = n.min(self.records.len()).max(1);
        let slice = if first {
            &self.records[..n]
        } else {
            &self.records[self.records.len() - n..]
        };
        slice
            .iter()
            .map(|r| r.losses.get(key).unwrap_or(f64::NAN))
            .sum::<f64>()
            / n as f64
    }
}

pub struct Trainer {
    pub cim: Cim,
    opt: AdamW,
    pub schedule: Schedule,
    loader: Loader,
    rngs: StepRngs,
    step: usize,
    resolved: Resolved,
    run_dir: PathBuf,
    /// Step of the last weights written to `model.safetensors`.
    last_checkpoint: Option<usize>,
}

impl Trainer {
    /// Builds the model and data and creates `run_dir` (refusing one that already holds a run).
    pub fn new(resolved: Resolved, run_dir: PathBuf) -> Result<Self> {
        if run_dir.join("model.safetensors").exists() || run_dir.join("metrics.jsonl").exists() {
            return Err(Error::msg(format!(
                "{} already holds a run; choose another --out so nothing is overwritten",
                run_dir.display()
            )));
        }
        let cim = Cim::build(&resolved)?;
        let cfg = &resolved.cfg;
        let dataset = data::open(&cfg.data)?;
        let loader = Loader::new(
            dataset,
            cfg.data.clone(),
            cfg.train.batch_size,
            cfg.run.seed,
        )?;
        let per_epoch = loader.batches_per_epoch();
        let t = &cfg.train;
        let total = if t.total_steps > 0 {
            t.total_steps
        } else {
            t.epochs * per_epoch
        };
        let warmup = if t.warmup_steps > 0 {
            t.warmup_steps
        } else {
            t.warmup_epochs * per_epoch
        };
        let schedule = Schedule {
            base: t.lr,
            min: t.min_lr,
            warmup: warmup.min(total),
            total: total.max(1),
        };
        let opt = AdamW::new(cim.params.vars(), t.betas, t.adam_eps, t.weight_decay)?;
        let seed = cfg.run.seed;
        let rngs = StepRngs {
            mask: rand::rngs::StdRng::seed_from_u64(seed ^ 0x6D61_736B),
            sample: rand::rngs::StdRng::seed_from_u64(seed ^ 0x7361_6D70),
        };
        std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
        write_atomic(&run_dir.join("config.toml"), resolved.to_toml()?.as_bytes())?;
        tracing::info!(
            run_dir = %run_dir.display(),
            data = %loader.dataset().describe(),
            trainable = cim.params.num_params(),
            grid = %cim.grid,
            device = ?cim.device,
            "built {}",
            cim.names.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        );
        Ok(Self {
            cim,
            opt,
            schedule,
            loader,
            rngs,
            step: 0,
            resolved,
            run_dir,
            last_checkpoint: None,
        })
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// One optimizer step. A non-finite loss or gradient norm stops with an error naming the step
    /// and the loss; no parameter is changed by the failing step.
    pub fn train_step(&mut self) -> Result<StepRecord> {
        let start = Instant::now();
        let batch = self.loader.batch(self.step as u64, &self.cim.device)?;
        let data_ms = start.elapsed().as_secs_f64() * 1e3;
        let out = self.cim.forward(&batch, &mut self.rngs)?;
        let mut clock = crate::pipeline::PhaseClock::start();
        if let Some((name, v)) = out.losses.first_non_finite() {
            return Err(Error::msg(format!(
                "step {}: {name} is {v} (generator MIM loss {:?}, {} loss {:?}); stopping before the update — {}",
                self.step + 1,
                out.losses.get("loss_mim"),
                self.cim.names["objective"],
                out.losses.get(&format!("loss_{}", self.cim.names["objective"])),
                self.checkpoint_note()
            )));
        }
        let grads = out.total.backward()?;
        clock.lap("backward");
        let lr = self.schedule.lr(self.step);
        let info = self
            .opt
            .step(&grads, lr, self.resolved.cfg.train.clip_grad)
            .map_err(|e| {
                Error::msg(format!(
                    "step {}: {e}; stopping before the update",
                    self.step + 1
                ))
            })?;
        clock.lap("optim");
        self.step += 1;
        let secs = start.elapsed().as_secs_f64();
        let mut phase_ms: std::collections::BTreeMap<&'static str, f64> = out
            .phase_ms
            .iter()
            .chain(clock.phases.iter())
            .copied()
            .collect();
        phase_ms.insert("data", data_ms);
        Ok(StepRecord {
            step: self.step,
            lr,
            losses: out.losses,
            grad_norm: info.grad_norm,
            images_per_s: self.resolved.cfg.train.batch_size as f64 / secs.max(1e-9),
            phase_ms,
        })
    }

    fn checkpoint_note(&self) -> String {
        match self.last_checkpoint {
            Some(s) => format!(
                "{} holds the weights of step {s}",
                self.run_dir.join("model.safetensors").display()
            ),
            None => format!(
                "no weights were written yet (run.checkpoint_every); {} has the finished steps",
                self.run_dir.join("metrics.jsonl").display()
            ),
        }
    }

    /// Writes the current weights to `model.safetensors` atomically.
    pub fn checkpoint(&mut self) -> Result<()> {
        save_safetensors(&self.run_dir.join("model.safetensors"), &self.weights())?;
        self.last_checkpoint = Some(self.step);
        Ok(())
    }

    /// Trainable parameters and buffers (BatchNorm statistics) as a name → tensor map.
    pub fn weights(&self) -> HashMap<String, candle_core::Tensor> {
        self.cim
            .params
            .vars()
            .into_iter()
            .chain(self.cim.buffers.vars())
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// Draws the first batch of the run through the current model and writes a picture grid:
    /// original | masked input | corrupted image | prediction and target (pixel objectives).
    pub fn write_samples(&self, path: &Path) -> Result<()> {
        let batch = self.loader.batch(0, &self.cim.device)?;
        let mut rngs = StepRngs {
            mask: rand::rngs::StdRng::seed_from_u64(self.resolved.cfg.run.seed ^ 0x5049_4354),
            sample: rand::rngs::StdRng::seed_from_u64(self.resolved.cfg.run.seed ^ 0x5341_4d50),
        };
        let out = self.cim.forward(&batch, &mut rngs)?;
        let mut cols = vec![
            batch.image.clone(),
            crate::pictures::masked_view(&batch.image, &out.mask)?,
            out.corrupted.clone(),
        ];
        if let (Some(p), Some(t)) = (&out.prediction, &out.target) {
            cols.push(crate::pictures::show_normalised(p)?);
            cols.push(crate::pictures::show_normalised(t)?);
        }
        crate::pictures::write_grid(path, &cols, 8)
    }

    /// Runs until `max_steps` (or the schedule's end), then writes the weights.
    pub fn run(&mut self, max_steps: Option<usize>) -> Result<Summary> {
        let steps = max_steps.filter(|&n| n > 0).unwrap_or(self.schedule.total);
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| Error::io(&metrics_path, e))?;
        let bar = if std::io::stderr().is_terminal() {
            let b = indicatif::ProgressBar::new(steps as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            Some(b)
        } else {
            None
        };
        let obj_key = format!("loss_{}", self.cim.names["objective"]);
        let log_every = self.resolved.cfg.run.log_every.max(1);
        let ckpt_every = self.resolved.cfg.run.checkpoint_every;
        let start = Instant::now();
        let mut records = vec![];
        for _ in 0..steps {
            let rec = self.train_step()?;
            let line = serde_json::to_string(&rec).map_err(|e| Error::msg(e.to_string()))?;
            writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
            let msg = format!(
                "loss {:.4} mim {:.4} {} {:.4} lr {:.2e} {:.1} img/s",
                rec.losses.get("loss").unwrap_or(f64::NAN),
                rec.losses.get("loss_mim").unwrap_or(f64::NAN),
                obj_key.trim_start_matches("loss_"),
                rec.losses.get(&obj_key).unwrap_or(f64::NAN),
                rec.lr,
                rec.images_per_s
            );
            match &bar {
                Some(b) => {
                    b.set_message(msg);
                    b.inc(1);
                }
                None if rec.step % log_every == 0 || rec.step == 1 || rec.step == steps => {
                    tracing::info!(step = rec.step, "{msg}");
                }
                None => {}
            }
            let step = rec.step;
            records.push(rec);
            if ckpt_every > 0 && step % ckpt_every == 0 && step < steps {
                self.checkpoint()?;
            }
        }
        if let Some(b) = bar {
            b.finish();
        }
        metrics.flush().map_err(|e| Error::io(&metrics_path, e))?;
        self.checkpoint()?;
        self.write_samples(&self.run_dir.join("samples.png"))?;
        Ok(Summary {
            run_dir: self.run_dir.clone(),
            steps,
            records,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}
