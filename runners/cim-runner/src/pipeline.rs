//! Assembling a CiM model from the registry, and the forward half of one training step
//! (the book's "One training step"; the paper's Figure 1b, top to bottom).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;

use cim_api::config::select;
use cim_api::pixels::normalize;
use cim_api::registry::{BuildCtx, Entry, Kind, Variant};
use cim_api::{
    Corruption, CorruptionInput, Enhancer, Error, ExecChoices, Generator, Losses, Mask, Masking,
    Objective, ObjectiveBatch, ParamStore, Result, Sampler, TokenGrid, Tokenizer,
};

use crate::config::{DataConfig, DeviceChoice, Precision, Resolved};
use crate::data::Batch;

/// Seed of a randomly initialised tokenizer: a constant, so every run (whatever `run.seed`) sees the
/// same frozen tokenizer until real weights are loaded.
pub const RANDOM_TOKENIZER_SEED: u64 = 0xD417_E0D5;

/// The six components of a CiM run and where their parameters live.
pub struct Cim {
    pub tokenizer: Box<dyn Tokenizer>,
    pub masking: Box<dyn Masking>,
    pub generator: Box<dyn Generator>,
    pub sampler: Box<dyn Sampler>,
    pub corruption: Box<dyn Corruption>,
    pub enhancer: Box<dyn Enhancer>,
    pub objective: Box<dyn Objective>,
    /// Trainable parameters: `generator.*`, `enhancer.*`, `objective.*`.
    pub params: ParamStore,
    /// The frozen tokenizer's tensors (never seen by the optimizer).
    pub frozen: ParamStore,
    /// Non-trainable state saved with the weights (BatchNorm running statistics).
    pub buffers: ParamStore,
    pub grid: TokenGrid,
    pub names: BTreeMap<&'static str, String>,
    pub data: DataConfig,
    pub device: Device,
    /// Compute dtype of the generator and enhancer (`run.precision`); parameters stay f32.
    pub compute: DType,
    /// The `[run]` switches in force on `device` ([`crate::config::RunSection::in_force`]).
    pub run: crate::config::RunSection,
    /// Sums across the processes of a data-parallel job, for synchronised BatchNorm: the trainer
    /// fills it once they connect (`dist.sync_bn`).
    pub cross_rank: cim_api::CrossRankSlot,
}

fn build<K: Kind + ?Sized>(res: &Resolved, ctx: &BuildCtx) -> Result<Box<K>>
where
    Entry<K>: cim_api::inventory::Collect,
{
    let sel = select::<K>(&res.figment)?;
    (sel.entry.build)(&sel.params, Variant::Default, ctx).map_err(|e| {
        Error::msg(format!(
            "building {kind} `{name}` (its keys: [{kind}.{name}]): {e}",
            kind = K::KIND,
            name = sel.entry.name
        ))
    })
}

/// Sets the process-wide backend switches of a run's `[run]` section: cim's CUDA kernels
/// (`run.cuda_kernels`), its cuDNN convolutions (`run.cudnn_conv`) and TF32 matmuls
/// (`run.tf32`). The binary sets them once, before it builds a model, as candle's own
/// `set_gemm_reduced_precision_f32` is set (`cim-run`'s `main` does); without it CUDA runs
/// candle's composed ops. No effect on the CPU.
pub fn set_backend(run: &crate::config::RunSection) {
    cim_ops::set_cuda_kernels(run.cuda_kernels);
    cim_ops::set_cudnn_conv(run.cudnn_conv);
    candle_core::cuda::set_gemm_reduced_precision_f32(run.tf32);
}

/// Resolves `run.device`; a CUDA device is set up by `cim_ops::device::prepare` (`keep_freed`:
/// `run.cuda_keep_freed`). `"auto"` takes GPU `local_rank`: each process of a data-parallel job
/// its own GPU of the node.
pub fn device(choice: DeviceChoice, keep_freed: bool, local_rank: usize) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => {
            let dev = Device::cuda_if_available(local_rank)?;
            cim_ops::device::prepare(&dev, keep_freed)?;
            Ok(dev)
        }
        DeviceChoice::Cuda(n) => cim_ops::device::open_cuda(n, keep_freed).map_err(|e| {
            Error::config(format!(
                "run.device = \"{choice}\": {e} (this binary needs `--features cuda` and a GPU; use \"cpu\" or \"auto\")"
            ))
        }),
    }
}

impl Cim {
    /// Builds every component through the registry, in dependency order: tokenizer (vocabulary,
    /// grid) → masking → enhancer (feature layout) → generator → sampler → objective.
    pub fn build(res: &Resolved) -> Result<Self> {
        Self::build_on(res, 0)
    }

    /// [`Cim::build`] for the process of a data-parallel job whose rank on its node is
    /// `local_rank` (`run.device = "auto"` takes that GPU).
    pub fn build_on(res: &Resolved, local_rank: usize) -> Result<Self> {
        let cfg_run = &res.cfg.run;
        let device = device(
            cfg_run.device,
            cfg_run.cuda_keep_freed && cfg_run.cuda_unverified,
            local_rank,
        )?;
        let mut run = cfg_run.in_force(device.is_cuda());
        if run.precision == Precision::Auto {
            let mixed =
                crate::config::validate_precision(Precision::Bf16, &res.components["enhancer"].0);
            run.precision = if device.is_cuda() && mixed.is_ok() {
                Precision::Bf16
            } else {
                Precision::F32
            };
        }
        if device.is_cuda() && !run.cuda_unverified {
            tracing::info!(
                "on CUDA, paths not yet checked on a GPU are off: {} (run.cuda_unverified = true runs them)",
                crate::config::UNVERIFIED_ON_GPU.join(", ")
            );
        }
        let exec = ExecChoices {
            fused_blocks: run.fused_blocks,
            flash_attention: run.flash_attention,
            regions: run.graft_regions,
            channels_last: device.is_cuda()
                && run.cuda_unverified
                && cim_ops::cudnn_conv()
                && cim_ops::cuda_kernels(),
        };
        let data = res.cfg.data.clone();
        let params = ParamStore::trainable(res.cfg.run.seed);
        let frozen = ParamStore::frozen(RANDOM_TOKENIZER_SEED);
        let buffers = ParamStore::frozen(res.cfg.run.seed);
        let mut ctx = BuildCtx {
            device: device.clone(),
            dtype: DType::F32,
            image_size: data.image_size,
            tokenizer_size: data.tokenizer_size,
            seed: res.cfg.run.seed,
            vocab_size: None,
            token_grid: None,
            enhancer: None,
            vb: frozen.var_builder(DType::F32, &device).pp("tokenizer"),
            buffers: buffers.clone(),
            enhancer_vb: None,
            exec,
            cross_rank: Default::default(),
        };
        let tokenizer = build::<dyn Tokenizer>(res, &ctx)?;
        let grid = tokenizer
            .grid((data.tokenizer_size, data.tokenizer_size))
            .map_err(|e| {
                Error::config(format!(
                    "data.tokenizer_size = {}: {e}",
                    data.tokenizer_size
                ))
            })?;
        ctx.vocab_size = Some(tokenizer.vocab_size());
        ctx.token_grid = Some(grid);
        let vb = params.var_builder(DType::F32, &device);
        let masking = build::<dyn Masking>(res, &ctx.with_vb(vb.pp("masking")))?;
        let enhancer = build::<dyn Enhancer>(res, &ctx.with_vb(vb.pp("enhancer")))?;
        ctx.enhancer = Some(enhancer.info());
        ctx.enhancer_vb = Some(vb.pp("enhancer"));
        let generator = build::<dyn Generator>(res, &ctx.with_vb(vb.pp("generator")))?;
        let sampler = build::<dyn Sampler>(res, &ctx.with_vb(vb.pp("sampler")))?;
        let corruption = build::<dyn Corruption>(res, &ctx.with_vb(vb.pp("corruption")))?;
        let objective = build::<dyn Objective>(res, &ctx.with_vb(vb.pp("objective")))?;
        let names = res
            .components
            .iter()
            .map(|(k, (n, _))| (*k, n.clone()))
            .collect();
        Ok(Self {
            tokenizer,
            masking,
            generator,
            sampler,
            corruption,
            enhancer,
            objective,
            params,
            frozen,
            buffers,
            grid,
            names,
            data,
            device,
            compute: if run.precision == Precision::Bf16 {
                DType::BF16
            } else {
                DType::F32
            },
            run,
            cross_rank: ctx.cross_rank.clone(),
        })
    }
}

/// What [`Cim::init_from`] loaded.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InitReport {
    pub component: String,
    pub file: String,
    /// Parameters and buffers set from the file.
    pub loaded: usize,
    /// Tensors of the file that name nothing in the component (a classifier head,
    /// `num_batches_tracked`, other components of a run file).
    pub ignored: Vec<String>,
}

impl Cim {
    /// Sets every parameter (and BatchNorm buffer) of `component` (`generator`, `enhancer` or
    /// `objective`) from the weight file `spec` (local path or `hub:…`). The file may use the
    /// run's names (`enhancer.blocks.0…`) or the component's own (`blocks.0…`, as `cim-run export`
    /// writes them). A parameter the file lacks, or a shape that differs, is an error naming it.
    pub fn init_from(&self, component: &str, spec: &str) -> Result<InitReport> {
        let key = format!("init.{component}");
        let path = cim_api::weights::resolve(spec, &key)?;
        let file =
            candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| Error::Data {
                path: path.display().to_string(),
                message: format!("cannot read weights for {key}: {e}"),
            })?;
        let prefix = format!("{component}.");
        let prefixed = file.keys().any(|k| k.starts_with(&prefix));
        let (mut params, mut buffers) = (BTreeMap::new(), BTreeMap::new());
        let mut ignored = vec![];
        for (k, t) in file {
            let full = if prefixed {
                match k.strip_prefix(&prefix) {
                    Some(_) => k.clone(),
                    None => {
                        ignored.push(k);
                        continue;
                    }
                }
            } else {
                format!("{prefix}{k}")
            };
            if self.params.get(&full).is_some() {
                params.insert(full, t);
            } else if self.buffers.get(&full).is_some() {
                buffers.insert(full, t);
            } else {
                ignored.push(k);
            }
        }
        let ctx = |m: String| Error::Data {
            path: path.display().to_string(),
            message: format!("{key}: {m}"),
        };
        let missing: Vec<String> = self
            .params
            .names_under(component)
            .into_iter()
            .chain(self.buffers.names_under(component))
            .filter(|n| !params.contains_key(n) && !buffers.contains_key(n))
            .collect();
        if !missing.is_empty() {
            let name = self.names.get(component).map_or("?", |s| s.as_str());
            return Err(ctx(format!(
                "lacks {} of the {} tensors of {component} `{name}`: {}{} (names are matched {})",
                missing.len(),
                self.params.names_under(component).len()
                    + self.buffers.names_under(component).len(),
                missing
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                if missing.len() > 5 { ", …" } else { "" },
                if prefixed {
                    format!("with the `{prefix}` prefix")
                } else {
                    format!("after adding `{prefix}`")
                }
            )));
        }
        self.params
            .load(&params, false)
            .map_err(|e| ctx(e.to_string()))?;
        self.buffers
            .load(&buffers, false)
            .map_err(|e| ctx(e.to_string()))?;
        if !ignored.is_empty() {
            tracing::warn!(
                "{key}: {} tensors of {} name nothing in the {component} and were ignored: {}{}",
                ignored.len(),
                path.display(),
                ignored
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                if ignored.len() > 5 { ", …" } else { "" }
            );
        }
        Ok(InitReport {
            component: component.to_string(),
            file: path.display().to_string(),
            loaded: params.len() + buffers.len(),
            ignored,
        })
    }
}

/// The RNG streams of a step.
pub struct StepRngs {
    pub mask: StdRng,
    pub sample: StdRng,
}

impl StepRngs {
    /// The streams of micro-batch `micro` of optimizer step `step`: a function of the run's seed
    /// and the position only, so a resumed run draws exactly what an uninterrupted one would.
    pub fn for_step(seed: u64, step: u64, micro: u64) -> Self {
        use crate::data::mix;
        use rand::SeedableRng;
        let at = mix(step, micro);
        Self {
            mask: StdRng::seed_from_u64(mix(seed ^ 0x6D61_736B, at)),
            sample: StdRng::seed_from_u64(mix(seed ^ 0x7361_6D70, at)),
        }
    }
}

/// Everything one forward pass produced.
pub struct StepOutput {
    /// `MIM + w · objective`, the scalar to differentiate.
    pub total: Tensor,
    pub mim: Tensor,
    pub objective: Tensor,
    /// Scalar losses and diagnostics.
    pub losses: Losses,
    pub mask: Mask,
    /// `(B, 3, H, W)` corrupted images in `[0, 1]`, as the enhancer saw them (before normalisation).
    pub corrupted: Tensor,
    pub prediction: Option<Tensor>,
    pub target: Option<Tensor>,
    /// Wall time of each forward phase in ms (host-side; meaningful on CPU, and on CUDA only
    /// where a phase ends with a host read).
    pub phase_ms: Vec<(&'static str, f64)>,
}

/// A forward step whose scalars are not read yet ([`Cim::forward_queued`]).
pub struct QueuedStep {
    /// `MIM + w · objective`, the scalar to differentiate.
    pub total: Tensor,
    pub mim: MimOut,
    pub corruption: CorruptionOut,
    pub out: cim_api::ObjectiveOutput,
    /// Host wall time of each forward phase in ms (the time to queue it, on CUDA).
    pub phase_ms: Vec<(&'static str, f64)>,
}

/// Wall-clock laps of named phases.
pub struct PhaseClock {
    last: std::time::Instant,
    pub phases: Vec<(&'static str, f64)>,
}

impl PhaseClock {
    pub fn start() -> Self {
        Self {
            last: std::time::Instant::now(),
            phases: vec![],
        }
    }
    pub fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.phases
            .push((name, (now - self.last).as_secs_f64() * 1e3));
        self.last = now;
    }
}

/// Stage 3's result: the mask and the generator's MIM prediction.
pub struct MimOut {
    /// `(B, gh, gw)` golden token ids.
    pub golden: Tensor,
    pub mask: Mask,
    /// `(M, V)` logits at the masked positions.
    pub logits: Tensor,
    /// `(M,)` flat positions `b·N + n` of the masked tokens, on the device.
    pub at_mask: Tensor,
    /// `(M,)` golden ids at the masked positions.
    pub golden_m: Tensor,
    /// The MIM cross-entropy (gradient into the generator).
    pub loss: Tensor,
}

/// Stages 4–7: the corrupted image and REVDET's label.
pub struct CorruptionOut {
    /// `(B, 3, H, W)` in `[0, 1]` at the enhancer's size, detached.
    pub image: Tensor,
    /// `(B, N)` 1 where the token was replaced by a different one.
    pub replaced: Tensor,
    /// `()` f32: how many tokens were replaced (on the device; read it when it is logged).
    pub n_replaced: Tensor,
}

impl Cim {
    /// Stage 1: golden tokens from the frozen tokenizer, `(B, gh, gw)`.
    pub fn tokens(&self, batch: &Batch) -> Result<Tensor> {
        self.tokenizer.encode(&batch.tok_view)
    }

    /// Stages 2–3: mask, generator forward, MIM loss at the masked positions.
    pub fn mim(&self, batch: &Batch, golden: Tensor, rngs: &mut StepRngs) -> Result<MimOut> {
        let b = golden.dim(0)?;
        let mask = self.masking.sample(b, self.grid, &mut rngs.mask)?;
        let image_n =
            normalize(&batch.image, self.data.mean, self.data.std)?.to_dtype(self.compute)?;
        // (M, V), f32 for the loss and the sampler whatever the compute precision.
        let logits = self
            .generator
            .forward(&image_n, &mask)?
            .to_dtype(DType::F32)?;
        let at_mask = mask.indices_tensor(&self.device)?;
        let golden_m = golden.flatten_all()?.index_select(&at_mask, 0)?;
        let loss = self.generator.mim_loss(&logits, &golden_m)?;
        Ok(MimOut {
            golden,
            mask,
            logits,
            at_mask,
            golden_m,
            loss,
        })
    }

    /// Stages 4–7, without gradients: sample at the masked positions, then the corruption
    /// (CiM's: replace, decode, resize).
    pub fn corrupt(
        &self,
        batch: &Batch,
        mim: &MimOut,
        rngs: &mut StepRngs,
    ) -> Result<CorruptionOut> {
        let sampled = self
            .sampler
            .sample(&mim.logits.detach(), &mut rngs.sample)?;
        let out = self.corruption.corrupt(
            &CorruptionInput {
                image: &batch.image,
                golden: &mim.golden,
                mask: &mim.mask,
                at_mask: &mim.at_mask,
                sampled: &sampled,
                tokenizer: self.tokenizer.as_ref(),
            },
            &mut rngs.sample,
        )?;
        let n_replaced = out.replaced.sum_all()?;
        Ok(CorruptionOut {
            image: out.image,
            replaced: out.replaced,
            n_replaced,
        })
    }

    /// Stages 8–9: the enhancer on the corrupted image and the pre-training objective.
    pub fn enhance(
        &self,
        batch: &Batch,
        mim: &MimOut,
        corruption: &CorruptionOut,
    ) -> Result<cim_api::ObjectiveOutput> {
        let features = self
            .enhancer
            .forward_t(
                &normalize(&corruption.image, self.data.mean, self.data.std)?
                    .to_dtype(self.compute)?,
                true,
            )?
            .to_dtype(DType::F32)?;
        self.objective.forward(
            &features,
            &ObjectiveBatch {
                original: &batch.image,
                corrupted: &corruption.image,
                mask: &mim.mask,
                replaced: &corruption.replaced,
            },
        )
    }

    /// Stages 1–9 of the training step (book: architecture), with the step's scalars read (see [`Cim::forward_queued`] and
    /// [`Cim::read`]).
    pub fn forward(&self, batch: &Batch, rngs: &mut StepRngs) -> Result<StepOutput> {
        let queued = self.forward_queued(batch, rngs)?;
        self.read(queued)
    }

    /// Stages 1–9 of the training step (book: architecture), nothing read back: on CUDA the whole forward is queued and the
    /// host goes on (to the backward, say) while the device runs it. Gradients flow into the
    /// generator only through the MIM loss and into the enhancer/objective only through the
    /// objective loss: sampled ids and decoded images are detached.
    pub fn forward_queued(&self, batch: &Batch, rngs: &mut StepRngs) -> Result<QueuedStep> {
        let mut clock = PhaseClock::start();
        let golden = self.tokens(batch)?;
        clock.lap("tok_encode");
        let mim = self.mim(batch, golden, rngs)?;
        clock.lap("gen_fwd");
        let corruption = self.corrupt(batch, &mim, rngs)?;
        clock.lap("sample_decode");
        let out = self.enhance(batch, &mim, &corruption)?;
        let total = (&mim.loss + (&out.loss * self.objective.weight())?)?;
        clock.lap("enh_fwd");
        Ok(QueuedStep {
            total,
            mim,
            corruption,
            out,
            phase_ms: clock.phases,
        })
    }

    /// Reads a queued step's scalars (this waits for the device to reach them).
    pub fn read(&self, q: QueuedStep) -> Result<StepOutput> {
        let losses = self.losses(&q.total, &q.mim, &q.corruption, &q.out.loss)?;
        Ok(StepOutput {
            total: q.total,
            mim: q.mim.loss,
            objective: q.out.loss,
            losses,
            mask: q.mim.mask,
            corrupted: q.corruption.image,
            prediction: q.out.prediction,
            target: q.out.target,
            phase_ms: q.phase_ms,
        })
    }

    /// The scalars of a step: losses, MIM accuracy, mask and replacement fractions.
    pub fn losses(
        &self,
        total: &Tensor,
        mim: &MimOut,
        corruption: &CorruptionOut,
        objective: &Tensor,
    ) -> Result<Losses> {
        let mut losses = Losses::default();
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64) };
        losses.insert("loss", scalar(total)?);
        losses.insert("loss_mim", scalar(&mim.loss)?);
        losses.insert(
            format!("loss_{}", self.names["objective"]),
            scalar(objective)?,
        );
        let acc = mim
            .logits
            .argmax(1)?
            .eq(&mim.golden_m)?
            .to_dtype(DType::F32)?
            .mean_all()?;
        losses.insert("mim_acc", scalar(&acc)?);
        let b = mim.golden.dim(0)?;
        let m = mim.mask.total().max(1) as f64;
        losses.insert("mask_frac", m / (b * self.grid.len()) as f64);
        losses.insert("replaced_frac", scalar(&corruption.n_replaced)? / m);
        // Distinct golden tokens in the batch: a collapsed tokenizer shows up here first.
        let golden_ids: Vec<u32> = mim.golden.flatten_all()?.to_vec1()?;
        let mut seen = vec![false; self.tokenizer.vocab_size().max(1)];
        let mut distinct = 0;
        for &id in &golden_ids {
            let id = id as usize;
            if id >= seen.len() {
                seen.resize(id + 1, false);
            }
            distinct += !seen[id] as usize;
            seen[id] = true;
        }
        losses.insert("golden_distinct", distinct as f64);
        Ok(losses)
    }
}
