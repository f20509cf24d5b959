//! The training loop: data → [`Cim::forward`] → backward (accumulated over micro-batches) → clip →
//! AdamW, with per-step metrics, a divergence guard, checkpoints and exact resume.
//!
//! A run directory holds:
//! - `config.toml` — the resolved configuration (loadable with `--config`)
//! - `metrics.jsonl` — one JSON object per step: step, lr, every loss, grad norm, images/s
//! - `checkpoints/step-NNNNNNNN/` — the newest `run.keep_checkpoints` full checkpoints
//!   (weights, optimizer moments, [`TrainState`], config), each written atomically
//! - `model.safetensors` — the final trainable weights and buffers
//! - `samples.png`, `pictures/step-NNNNNNNN.png` — Figure 2/3-style grids; `loss_curve.png`

use std::collections::{BTreeSet, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use cim_api::{Error, Losses, Result};

use crate::checkpoint::{save_safetensors, write_checkpoint, TrainState};
use crate::config::{resolve, Layers, Resolved};
use crate::data::{self, HostBatch, Loader, Prefetch, Shard};
use crate::optim::{AdamW, Schedule};
use crate::pipeline::{Cim, StepRngs};
use crate::rundir::RunDir;
use cim_dist::{Dist, Launch};

/// `h:mm:ss` of `seconds`.
pub fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub lr: f64,
    #[serde(flatten)]
    pub losses: Losses,
    pub grad_norm: f64,
    pub images_per_s: f64,
    /// Distinct unreadable files skipped so far.
    pub skipped_files: usize,
    /// Milliseconds per phase: data, tok_encode, gen_fwd, sample_decode, enh_fwd, backward, optim
    /// (summed over micro-batches).
    pub phase_ms: std::collections::BTreeMap<&'static str, f64>,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct Summary {
    pub run_dir: PathBuf,
    /// Steps run by this call.
    pub steps: usize,
    /// The run's step count at the end.
    pub final_step: usize,
    pub records: Vec<StepRecord>,
    pub seconds: f64,
    /// Every file skipped as unreadable during the whole run.
    pub skipped: Vec<String>,
}

impl Summary {
    /// Mean of `key` over the first / last `n` steps (NaN when no step ran).
    pub fn mean(&self, key: &str, first: bool, n: usize) -> f64 {
        if self.records.is_empty() {
            return f64::NAN;
        }
        let n = n.min(self.records.len()).max(1);
        let slice = if first {
            &self.records[..n]
        } else {
            &self.records[self.records.len().saturating_sub(n)..]
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
    loader: Arc<Loader>,
    prefetch: Option<Prefetch>,
    /// Micro-batches this process accumulates per step.
    accum: usize,
    /// The processes of the run (one, unless launched by torchrun, mpirun or srun).
    dist: Arc<Dist>,
    step: usize,
    resolved: Resolved,
    run: RunDir,
    /// The newest checkpoint written or resumed from.
    last_checkpoint: Option<(usize, PathBuf)>,
    skipped: BTreeSet<String>,
}

impl Trainer {
    /// Creates and locks `run_dir` (refusing one that already holds a run, or that another
    /// process writes to), then builds the model and data.
    pub fn new(resolved: Resolved, run_dir: PathBuf) -> Result<Self> {
        Self::launched(resolved, run_dir, Launch::single())
    }

    /// [`Trainer::new`] as one rank of a data-parallel job: rank 0 creates and writes the run
    /// directory, the other ranks only compute.
    pub fn launched(resolved: Resolved, run_dir: PathBuf, launch: Launch) -> Result<Self> {
        let run = match launch.rank {
            0 => RunDir::create(run_dir)?,
            _ => RunDir::follower(run_dir),
        };
        let t = Self::build(resolved, run, launch)?;
        // An error of this rank alone ends the whole job: the others would wait for it forever.
        t.dist.or_end_job(t.initialise())?;
        Ok(t)
    }

    /// A new run's start: components from their `init.*` files, and (rank 0) `config.toml`.
    fn initialise(&self) -> Result<()> {
        for (component, spec) in self.resolved.cfg.init.sources() {
            let r = self.cim.init_from(component, spec)?;
            tracing::info!(component, file = %r.file, tensors = r.loaded, ignored = r.ignored.len(), "initialised from file");
        }
        if self.dist.is_leader() {
            self.run.write_config(&self.resolved)?;
        }
        Ok(())
    }

    /// The processes of the run.
    pub fn dist(&self) -> &Arc<Dist> {
        &self.dist
    }

    /// Continues the run in `run_dir` from its newest complete checkpoint. `set` may change `run.*`
    /// keys (device, max_steps, logging, checkpoint cadence) but nothing that shapes the model,
    /// the data or the optimisation. Metrics after the checkpoint are dropped (they are redone).
    pub fn resume(run_dir: PathBuf, set: Vec<String>) -> Result<Self> {
        Self::resume_launched(run_dir, set, Launch::single())
    }

    /// [`Trainer::resume`] as one rank of a data-parallel job. Every rank reads the checkpoint
    /// (the run directory is on a file system they share); the world size may differ from the
    /// run's before: the weights and optimizer state are the same, and the data position follows
    /// from the step.
    pub fn resume_launched(run_dir: PathBuf, set: Vec<String>, launch: Launch) -> Result<Self> {
        let leader = launch.rank == 0;
        let run = match leader {
            true => RunDir::open(run_dir)?,
            false => RunDir::follower(run_dir),
        };
        let stale = match leader {
            true => crate::checkpoint::remove_interrupted(run.path())?,
            false => 0,
        };
        if stale > 0 {
            tracing::warn!(
                stale,
                "removed the temporary folders of interrupted checkpoint writes"
            );
        }
        let ckpt = crate::checkpoint::load_latest(run.path())?;
        let saved = ckpt.dir.join("config.toml");
        let layers = |set: Vec<String>| Layers {
            preset: None,
            config_files: vec![saved.clone()],
            set,
            env: false,
        };
        let original = resolve(&layers(vec![]))?;
        let resolved = resolve(&layers(set))?;
        let strip = |r: &Resolved| -> Result<toml::Value> {
            let mut v = toml::Value::try_from(&r.cfg).map_err(|e| Error::msg(e.to_string()))?;
            if let Some(t) = v.as_table_mut() {
                t.remove("run");
                t.remove("dist");
            }
            Ok(v)
        };
        if strip(&original)? != strip(&resolved)? {
            return Err(Error::config(
                "--resume may only change `run.*` keys (device, max_steps, logging, checkpoints) and `dist.*`; \
                 the model, data and optimisation must stay as checkpointed",
            ));
        }
        let mut t = Self::build(resolved, run, launch)?;
        let resumed = t.resume_from(ckpt);
        t.dist.or_end_job(resumed)?;
        Ok(t)
    }

    fn resume_from(&mut self, ckpt: crate::checkpoint::Loaded) -> Result<()> {
        let t = self;
        let state = ckpt.state;
        if state.seed != t.resolved.cfg.run.seed {
            return Err(Error::config(format!(
                "{}: seed {} differs from the config's run.seed {}",
                ckpt.dir.display(),
                state.seed,
                t.resolved.cfg.run.seed
            )));
        }
        let (params, buffers): (Vec<_>, Vec<_>) = ckpt
            .weights
            .into_iter()
            .partition(|(k, _)| t.cim.params.get(k).is_some());
        let params = params.into_iter().collect();
        let buffers = buffers.into_iter().collect();
        let ctx = |e: Error| Error::msg(format!("{}: {e}", ckpt.dir.display()));
        t.cim.params.load(&params, true).map_err(ctx)?;
        t.cim.buffers.load(&buffers, true).map_err(ctx)?;
        t.opt
            .load_state(&ckpt.optimizer, state.optimizer_t)
            .map_err(ctx)?;
        t.step = state.step;
        t.skipped = state.skipped.into_iter().collect();
        t.last_checkpoint = Some((state.step, ckpt.dir.clone()));
        if t.dist.is_leader() {
            // metrics.jsonl: keep the lines up to the checkpoint.
            let dropped = t.run.truncate_metrics(state.step)?;
            if dropped > 0 {
                tracing::info!("dropped {dropped} metrics lines after step {}", state.step);
            }
            t.run.write_config(&t.resolved)?;
        }
        tracing::info!(checkpoint = %ckpt.dir.display(), step = state.step, "resumed");
        Ok(())
    }

    fn build(resolved: Resolved, run: RunDir, launch: Launch) -> Result<Self> {
        let cfg = &resolved.cfg;
        let t = &cfg.train;
        let (world, rank) = (launch.world, launch.rank);
        let (accum, micro) = t.split(world)?;
        let cim = Cim::build_on(&resolved, launch.local_rank)?;
        let dist = Arc::new(Dist::connect(
            launch,
            cfg.dist.backend,
            &cim.device,
            std::time::Duration::from_secs(cfg.dist.timeout_s),
        )?);
        if world > 1 && cfg.dist.sync_bn {
            cim.cross_rank
                .set(Arc::new(cim_dist::SyncSum::new(dist.clone())));
        }
        if world > 1 {
            eprintln!(
                "cim-run: {}, backend {}, device {:?}: {accum} micro-batch(es) of {micro} images per step of {}",
                dist.launch.describe(),
                dist.backend(),
                cim.device,
                t.batch_size
            );
        }
        let loader = dist
            .or_end_job(
                data::open(&cfg.data)
                    .and_then(|d| Loader::new(d, cfg.data.clone(), micro, cfg.run.seed)),
            )?
            .sharded(Shard::of_rank(rank, world, accum));
        let loader = Arc::new(loader);
        let per_epoch = loader.steps_per_epoch();
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
        tracing::info!(
            run_dir = %run.path().display(),
            data = %loader.dataset().describe(),
            workers = loader.workers(),
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
            prefetch: None,
            accum,
            dist,
            step: 0,
            resolved,
            run,
            last_checkpoint: None,
            skipped: BTreeSet::new(),
        })
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> usize {
        self.step
    }

    pub fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    /// The optimizer (its state is what checkpoints store).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub fn run_dir(&self) -> &Path {
        self.run.path()
    }

    /// Micro-batch `index` of the run, from the prefetch queue (restarted if out of order).
    fn host_batch(&mut self, index: u64) -> Result<HostBatch> {
        let depth = self.resolved.cfg.data.prefetch;
        if depth == 0 {
            return self.loader.host_batch(index);
        }
        if self.prefetch.as_ref().map(|p| p.position()) != Some(index) {
            self.prefetch = Some(Prefetch::start(self.loader.clone(), index, depth));
        }
        self.prefetch.as_mut().expect("just started").next_batch()
    }

    /// One optimizer step over `train.accum_steps` micro-batches (in a job of several
    /// processes: this rank's micro-batches, then the losses and gradients averaged over the
    /// ranks). A non-finite loss or gradient norm stops with an error naming the step and the
    /// component — on every rank at the same step, since they see the same averages; no
    /// parameter is changed.
    pub fn train_step(&mut self) -> Result<StepRecord> {
        let start = Instant::now();
        let cfg = &self.resolved.cfg;
        let (seed, accum) = (cfg.run.seed, self.accum);
        let (s, t) = (cfg.data.image_size, cfg.data.tokenizer_size);
        // This rank's micro-batches are parts first.. of the step's global batch.
        let first = self.dist.rank() * accum;
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut losses = Losses::default();
        let mut phase_ms = std::collections::BTreeMap::<&'static str, f64>::new();
        for j in 0..accum {
            let t0 = Instant::now();
            let local = (self.step * accum + j) as u64;
            let hb = self.host_batch(local)?;
            self.skipped.extend(hb.skipped.iter().cloned());
            let batch = hb.to_device(s, t, &self.cim.device)?;
            *phase_ms.entry("data").or_default() += t0.elapsed().as_secs_f64() * 1e3;
            let mut rngs = StepRngs::for_step(seed, self.step as u64, (first + j) as u64);
            // Parameter gradients of fused nodes go straight to the store (see `ops::GradSink`).
            let sink = cim_ops::GradSink::install_if(self.cim.run.grad_sink);
            // The forward and its backward are queued before any scalar is read, so on CUDA the
            // host does not wait between them; the losses are checked after the backward, still
            // before the update.
            let queued = self.cim.forward_queued(&batch, &mut rngs)?;
            let mut clock = crate::pipeline::PhaseClock::start();
            let total = if accum == 1 {
                queued.total.clone()
            } else {
                (&queued.total / accum as f64)?
            };
            let g = sink.backward(&total)?;
            drop(sink);
            clock.lap("backward");
            let out = self.cim.read(queued)?;
            let bad = out.losses.first_non_finite().is_some();
            match grads.as_mut() {
                None => grads = Some(g),
                Some(acc) => acc.extend(g)?,
            }
            for (k, v) in out.losses.0 {
                *losses.0.entry(k).or_default() += v / accum as f64;
            }
            for (k, v) in out.phase_ms.iter().chain(clock.phases.iter()) {
                *phase_ms.entry(k).or_default() += v;
            }
            if bad && self.dist.world() == 1 {
                break; // no update follows; the other micro-batches would not change that
            }
        }
        let mut grads = grads.expect("accum_steps ≥ 1");
        let mut clock = crate::pipeline::PhaseClock::start();
        // Every rank waits here for the others: past dist.timeout_s the watchdog ends the job.
        let _waiting = self.dist.watch(format!(
            "step {}: averaging losses and gradients",
            self.step + 1
        ));
        if self.dist.is_connected() {
            losses = self.average_losses(losses)?;
            self.average_gradients(&mut grads)?;
            clock.lap("all_reduce");
        }
        if let Some((name, v)) = losses.first_non_finite() {
            let obj = self.cim.names["objective"].clone();
            let component =
                if name == "loss_mim" || !losses.get("loss_mim").is_some_and(f64::is_finite) {
                    format!("generator `{}` (MIM loss)", self.cim.names["generator"])
                } else {
                    format!(
                        "enhancer `{}` / objective `{obj}`",
                        self.cim.names["enhancer"]
                    )
                };
            return Err(Error::Diverged {
                step: self.step + 1,
                message: format!(
                    "step {}: {name} is {v} in the {component} (loss_mim {:?}, loss_{obj} {:?}); \
                     stopping before the update — {}",
                    self.step + 1,
                    losses.get("loss_mim"),
                    losses.get(&format!("loss_{obj}")),
                    self.checkpoint_note()
                ),
            });
        }
        let lr = self.schedule.lr(self.step);
        let info = self
            .opt
            .step(&grads, lr, self.resolved.cfg.train.clip_grad)
            .map_err(|e| {
                let message = format!(
                    "step {}: {e}; stopping before the update — {}",
                    self.step + 1,
                    self.checkpoint_note()
                );
                match e {
                    Error::Diverged { .. } => Error::Diverged {
                        step: self.step + 1,
                        message,
                    },
                    _ => Error::msg(message),
                }
            })?;
        if self.dist.is_connected() {
            // BatchNorm statistics: rank 0's on every rank, as PyTorch DDP's broadcast_buffers.
            for (_, var) in self.cim.buffers.vars() {
                var.set(&self.dist.broadcast(var.as_tensor(), 0)?)?;
            }
        }
        clock.lap("optim");
        drop(_waiting);
        phase_ms.extend(clock.phases);
        self.step += 1;
        let secs = start.elapsed().as_secs_f64();
        Ok(StepRecord {
            step: self.step,
            lr,
            losses,
            grad_norm: info.grad_norm,
            images_per_s: self.resolved.cfg.train.batch_size as f64 / secs.max(1e-9),
            skipped_files: self.skipped.len(),
            phase_ms,
        })
    }

    /// The mean over ranks of every loss and diagnostic (a non-finite value on any rank makes
    /// the mean non-finite, so every rank stops at the same step).
    fn average_losses(&self, losses: Losses) -> Result<Losses> {
        let (keys, values): (Vec<String>, Vec<f64>) = losses.0.into_iter().unzip();
        let mean = self.dist.mean_f64(&values, &self.cim.device)?;
        Ok(Losses(keys.into_iter().zip(mean).collect()))
    }

    /// The mean over ranks of every trainable parameter's gradient, in the parameters' (sorted)
    /// order, in buckets of `dist.bucket_mb`; a parameter without a gradient on this rank
    /// contributes zeros, so every rank reduces the same buffers.
    fn average_gradients(&self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        let vars = self.cim.params.vars();
        let local = vars
            .iter()
            .map(|(_, v)| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bucket = (self.resolved.cfg.dist.bucket_mb * 1024.0 * 1024.0) as usize;
        let mean = self.dist.all_reduce_mean(&local, bucket.max(1))?;
        for ((_, v), g) in vars.iter().zip(mean) {
            grads.insert(v.as_tensor(), g);
        }
        Ok(())
    }

    /// Checks that every rank starts from the same weights, BatchNorm statistics and optimizer
    /// state (a checksum of each), so the ranks stay replicas.
    fn verify_replicas(&self) -> Result<()> {
        if !self.dist.is_connected() {
            return Ok(());
        }
        // Weights and buffers (`enhancer.…`) beside the moments (`m.…`, `v.…`), in name order.
        let state: std::collections::BTreeMap<String, candle_core::Tensor> = self
            .weights()
            .into_iter()
            .chain(self.opt.state()?)
            .collect();
        let mut h = cim_api::params::Fnv1a::default();
        for (name, t) in state {
            h.update(name.as_bytes());
            let v: Vec<f32> = t
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?;
            v.iter().for_each(|x| h.update(&x.to_bits().to_le_bytes()));
        }
        h.update(&(self.step as u64).to_le_bytes());
        let _waiting = self.dist.watch("comparing the ranks' starting weights");
        self.dist.agree(
            "the starting weights and optimizer state",
            h.0,
            &self.cim.device,
        )
    }

    fn checkpoint_note(&self) -> String {
        match &self.last_checkpoint {
            Some((s, dir)) => format!(
                "{} holds step {s}; continue with --resume {}",
                dir.display(),
                self.run.path().display()
            ),
            None => format!(
                "no checkpoint was written yet (run.checkpoint_every); {} has the finished steps",
                self.run.join("metrics.jsonl").display()
            ),
        }
    }

    /// The state beside the weights.
    pub fn state(&self) -> TrainState {
        TrainState {
            step: self.step,
            optimizer_t: self.opt.steps_taken(),
            seed: self.resolved.cfg.run.seed,
            micro_batches: (self.step * self.accum * self.dist.world()) as u64,
            epoch: (self.step / self.loader.steps_per_epoch()) as u64,
            skipped: self.skipped.iter().cloned().collect(),
        }
    }

    /// Writes a full checkpoint (atomically) and keeps the newest `run.keep_checkpoints`.
    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        let dir = write_checkpoint(
            self.run.path(),
            &self.state(),
            &self.weights(),
            &self.opt.state()?,
            &self.resolved.to_toml()?,
            self.resolved.cfg.run.keep_checkpoints,
        )?;
        self.last_checkpoint = Some((self.step, dir.clone()));
        Ok(dir)
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
    /// In a data-parallel job every rank draws its own (synchronised BatchNorm needs them all)
    /// and rank 0 writes.
    pub fn write_samples(&self, path: &Path) -> Result<()> {
        let batch = self.loader.batch(0, &self.cim.device)?;
        let mut rngs = StepRngs::for_step(self.resolved.cfg.run.seed ^ 0x5049_4354, 0, 0);
        let out = self.cim.forward(&batch, &mut rngs)?;
        let mut cols = vec![
            ("original", batch.image.clone()),
            (
                "masked input",
                crate::pictures::masked_view(&batch.image, &out.mask)?,
            ),
            ("corrupted", out.corrupted.clone()),
        ];
        if let (Some(p), Some(t)) = (&out.prediction, &out.target) {
            cols.push(("prediction", crate::pictures::show_normalised(p)?));
            cols.push(("target", crate::pictures::show_normalised(t)?));
        }
        match self.dist.is_leader() {
            true => crate::pictures::write_grid(path, &cols, 8),
            false => Ok(()),
        }
    }

    /// Runs until the run has taken `until` steps (default: `run.max_steps`, else the schedule's
    /// end), checkpointing every `run.checkpoint_every` steps and at the end.
    pub fn run(&mut self, until: Option<usize>) -> Result<Summary> {
        let target = until
            .filter(|&n| n > 0)
            .or(Some(self.resolved.cfg.run.max_steps).filter(|&n| n > 0))
            .unwrap_or(self.schedule.total);
        let steps = target.saturating_sub(self.step);
        self.verify_replicas()?;
        if steps == 0 {
            // A finished run (or a target below its step): nothing to train, nothing rewritten.
            return Ok(Summary {
                run_dir: self.run.path().to_path_buf(),
                steps: 0,
                final_step: self.step,
                records: vec![],
                seconds: 0.0,
                skipped: self.skipped.iter().cloned().collect(),
            });
        }
        let leader = self.dist.is_leader();
        let mut metrics = match leader {
            true => Some(self.run.metrics()?),
            false => None,
        };
        if self.resolved.cfg.run.tensorboard {
            if let Some(m) = metrics.take() {
                metrics = Some(m.tensorboard(&self.run)?);
            }
        }
        let bar = if leader && std::io::stderr().is_terminal() {
            let b = indicatif::ProgressBar::new(target as u64);
            b.set_position(self.step as u64);
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
        let run = self.resolved.cfg.run.clone();
        let log_every = run.log_every.max(1);
        let start = Instant::now();
        let mut records = vec![];
        for _ in 0..steps {
            let rec = self.train_step()?;
            if let Some(m) = metrics.as_mut() {
                m.append(&rec)?;
            }
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
                None if leader
                    && (rec.step % log_every == 0 || rec.step == 1 || rec.step == target) =>
                {
                    // Without a progress bar (a log file, a pipe): where the run is and how long
                    // it still needs, in the line itself.
                    let done = records.len() + 1;
                    let per_step = start.elapsed().as_secs_f64() / done as f64;
                    let eta = per_step * (target - rec.step) as f64;
                    let epoch = rec.step as f64 / self.loader.steps_per_epoch().max(1) as f64;
                    tracing::info!(
                        "step {}/{target} epoch {epoch:.2} eta {}: {msg}",
                        rec.step,
                        clock(eta)
                    );
                }
                None => {}
            }
            let step = rec.step;
            records.push(rec);
            // Rank 0 writes the run's files.
            if leader
                && run.checkpoint_every > 0
                && step % run.checkpoint_every == 0
                && step < target
            {
                if let Some(m) = metrics.as_mut() {
                    m.flush()?;
                }
                self.checkpoint()?;
            }
            if run.picture_every > 0 && step % run.picture_every == 0 {
                let dir = self.run.join("pictures");
                if leader {
                    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                }
                self.write_samples(&dir.join(format!("step-{step:08}.png")))?;
            }
        }
        if let Some(b) = bar {
            b.finish();
        }
        if let Some(metrics) = metrics.as_mut() {
            metrics.flush()?;
            if self.last_checkpoint.as_ref().map(|c| c.0) != Some(self.step) {
                self.checkpoint()?;
            }
            save_safetensors(&self.run.join("model.safetensors"), &self.weights())?;
        }
        self.write_samples(&self.run.join("samples.png"))?;
        if let Some(metrics) = metrics {
            crate::pictures::loss_curve(metrics.path(), &self.run.join("loss_curve.png"))?;
        }
        if !self.skipped.is_empty() {
            tracing::warn!(
                "skipped {} unreadable files: {}",
                self.skipped.len(),
                self.skipped.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        Ok(Summary {
            run_dir: self.run.path().to_path_buf(),
            steps,
            final_step: self.step,
            records,
            seconds: start.elapsed().as_secs_f64(),
            skipped: self.skipped.iter().cloned().collect(),
        })
    }
}
