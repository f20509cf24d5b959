//! `cim-run bench`: the throughput of one CiM training step, phase by phase, in the JSON fields of
//! the PyTorch reference of one CiM step (`torch_cim_ref.py`; book: Performance) so the two can be
//! set side by side.
//!
//! Like the reference, one batch is prepared once and reused (here: the embedded photographs at the
//! preset's sizes), the phases are timed in order — `tok_encode`, `gen_fwd_bwd`, `sample_decode`,
//! `enh_fwd_bwd`, `optim` — and the generator's and enhancer's backward passes run separately (their
//! gradients are summed before the update, which equals the backward of the summed loss).

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;

use candle_core::Device;
use rand::SeedableRng;
use serde::Serialize;

use cim_api::Result;
use cim_ops::device::Mark;

use crate::config::{resolve, Layers};
use crate::data::{self, Loader};
use crate::optim::AdamW;
use crate::pipeline::{Cim, StepRngs};

/// Options of `cim-run bench`.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub layers: Layers,
    /// Images per step (default: the preset's micro-batch, `train.batch_size / train.accum_steps`, at most 128).
    pub batch: Option<usize>,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first (kernel JIT, allocator warm-up).
    pub warmup: usize,
    /// Overrides `run.device` ("cpu", "cuda:0", "auto").
    pub device: Option<String>,
    /// On CUDA, synchronise the device at every phase boundary and time phases on the host.
    /// Default: CUDA events, no host synchronisation inside the timed
    /// loop, as the reference times its phases. No effect on the CPU, which always does this.
    pub sync_phases: bool,
    /// On CUDA, a measurement switch: run the steps with candle's upload cache on
    /// (`cim_ops::device::cache_small_uploads`), so the small host→device copies before strided
    /// and reduction kernels are made once. Its cache never shrinks, so training does not use it.
    pub upload_cache: bool,
    /// On the CPU, caps cim's fused kernels at an instance: "portable", "avx2" or "avx512" (the
    /// default is the CPU's widest). A measurement switch for comparing them in one binary;
    /// candle's matmuls (the gemm crate) pick their own instructions regardless.
    pub cpu_kernels: Option<cim_ops::CpuKernels>,
}

/// The JSON line `cim-run bench` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub preset: Option<String>,
    pub tokenizer: String,
    pub generator: String,
    pub enhancer: String,
    pub objective: String,
    pub batch: usize,
    pub img: usize,
    pub tok_res: usize,
    pub tokens: usize,
    pub dtype: String,
    /// Whether the fused CUDA kernels ran (a CUDA device and `run.cuda_kernels`); false on the CPU,
    /// whose runs always use the CPU kernels.
    pub cuda_kernels: bool,
    /// Whether transformer blocks ran as one graph node each (`run.fused_blocks`, where the
    /// fused kernels run: always on the CPU, on CUDA with `cuda_kernels`).
    pub fused_blocks: bool,
    /// Whether each step was differentiated through a `GradSink` (`run.grad_sink`).
    pub grad_sink: bool,
    /// Whether plugins' regions of fused nodes were one graph node each (`run.graft_regions`,
    /// with the sink).
    pub graft_regions: bool,
    /// How phases were timed: `"device events"` (CUDA, no host synchronisation in the timed
    /// loop, the reference's method) or `"host sync"` (the CPU, or `--sync-phases`).
    pub phase_timing: &'static str,
    /// Whether bf16 attention with 64-wide heads ran cim's flash kernels (`run.flash_attention`
    /// on CUDA with the kernels on).
    pub flash_attention: bool,
    /// Whether the steps ran with candle's upload cache on (`--upload-cache`; CUDA only).
    pub upload_cache: bool,
    /// Whether freed device memory stayed in the pool across synchronisations
    /// (`run.cuda_keep_freed`; CUDA only).
    pub cuda_keep_freed: bool,
    /// Whether CUDA convolutions ran their forward through cim's cuDNN call (`run.cudnn_conv` in a
    /// `cudnn` build, still on after the run: a cuDNN error switches it off).
    pub cudnn_conv: bool,
    /// Which instance of cim's fused CPU kernels runs on the host's CPU: `"avx512"`,
    /// `"avx2+fma"` or `"portable"` (SSE2); on CUDA they do not run, but the field says what the host would use.
    pub cpu_kernels: &'static str,
    /// Threads of rayon's pool, which runs cim's CPU kernels and candle's matmuls.
    pub cpu_threads: usize,
    /// The tokenizer's precision and its token agreement with f32 (first batch), where it
    /// reports one (`dalle_dvae`).
    pub tok_precision: Option<cim_api::PrecisionReport>,
    pub device: String,
    pub params_m: f64,
    pub steps: usize,
    pub warmup: usize,
    pub build_s: f64,
    pub warmup_s: f64,
    pub step_ms: f64,
    pub images_per_s: f64,
    pub phase_ms: BTreeMap<&'static str, f64>,
    pub phase_sum_ms: f64,
    pub loss_first: f64,
    pub loss_last: f64,
    pub loss_finite: bool,
    /// CUDA: the allocator pool's high-water mark of memory in use over the timed steps (what
    /// the reference reports, `torch.cuda.max_memory_allocated`); CPU: the process's peak
    /// resident set.
    pub peak_mem_gib: Option<f64>,
}

/// Bytes of the memset that marks the end of phase 0 (`CIM_PHASE_MARKERS`, on CUDA); phase `i`
/// is marked by `PHASE_MARKER_BYTES + 2·i` (odd: no f32/bf16 tensor has that many bytes).
/// `benches/cupti/kernel_times.c` splits its records by them.
pub const PHASE_MARKER_BYTES: usize = 1001;

pub const PHASES: [&str; 5] = [
    "tok_encode",
    "gen_fwd_bwd",
    "sample_decode",
    "enh_fwd_bwd",
    "optim",
];

/// The process's peak resident set so far, in GiB (Linux; `None` elsewhere).
fn cpu_peak_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / (1024.0 * 1024.0))
}

/// Runs the benchmark and returns its report.
pub fn bench(args: &BenchArgs) -> Result<BenchReport> {
    let t_build = Instant::now();
    let mut layers = args.layers.clone();
    if let Some(d) = &args.device {
        layers.set.push(format!("run.device=\"{d}\""));
    }
    // Data: the embedded photographs, so a benchmark needs no dataset on disk.
    layers.set.push("data.source=\"quickstart\"".into());
    let probe = resolve(&layers)?;
    // One step of one micro-batch: the preset's (batch_size / accum_steps), at most 128.
    let (_, micro) = probe.cfg.train.split(1)?;
    let batch = args.batch.unwrap_or(micro.min(128)).max(1);
    layers.set.push(format!("train.batch_size={batch}"));
    layers.set.push("train.accum_steps=1".into());
    layers.set.push("train.micro_batch=0".into());
    let res = resolve(&layers)?;
    let cfg = &res.cfg;
    let cim = Cim::build(&res)?;
    let dev = cim.device.clone();
    let loader = Loader::new(
        data::open(&cfg.data)?,
        cfg.data.clone(),
        batch,
        cfg.run.seed,
    )?;
    let b = loader.batch(0, &dev)?;
    let mut opt = AdamW::new(
        cim.params.vars(),
        cfg.train.betas,
        cfg.train.adam_eps,
        cfg.train.weight_decay,
    )?;
    let mut rngs = StepRngs {
        mask: rand::rngs::StdRng::seed_from_u64(cfg.run.seed ^ 0x6D61_736B),
        sample: rand::rngs::StdRng::seed_from_u64(cfg.run.seed ^ 0x7361_6D70),
    };
    dev.synchronize()?;
    let build_s = t_build.elapsed().as_secs_f64();
    let weight = cim.objective.weight();
    // CUDA: phases are timed by marks in the device's queue (the reference's CUDA events), unless
    // `--sync-phases` asks for a host synchronisation and a host clock at every boundary.
    let use_marks = dev.is_cuda() && !args.sync_phases;
    let mut step = |lap: &mut Lap| -> Result<candle_core::Tensor> {
        lap.begin()?;
        // As in training: parameter gradients of fused nodes go straight to the store.
        let sink = cim_ops::GradSink::install_if(cim.run.grad_sink);
        let golden = cim.tokens(&b)?;
        lap.end("tok_encode")?;
        let mim = cim.mim(&b, golden, &mut rngs)?;
        let mut grads = sink.backward(&mim.loss)?;
        lap.end("gen_fwd_bwd")?;
        let corruption = cim.corrupt(&b, &mim, &mut rngs)?;
        lap.end("sample_decode")?;
        let out = cim.enhance(&b, &mim, &corruption)?;
        let enh = (&out.loss * weight)?;
        grads.extend(sink.backward(&enh)?)?;
        lap.end("enh_fwd_bwd")?;
        opt.step(&grads, cfg.train.lr, cfg.train.clip_grad)?;
        lap.end("optim")?;
        Ok((&mim.loss + enh)?.detach())
    };
    if let Some(cap) = args.cpu_kernels {
        cim_ops::set_cpu_kernels(cap);
    }
    let _upload_cache = args
        .upload_cache
        .then(|| cim_ops::device::cache_small_uploads(&dev));
    let t0 = Instant::now();
    let mut lap = Lap::new(&dev, use_marks);
    for _ in 0..args.warmup {
        step(&mut lap)?;
    }
    dev.synchronize()?;
    let warmup_s = t0.elapsed().as_secs_f64();
    // Peak memory is reported, not needed: a pool that cannot be read leaves it out.
    let pool_ok = cim_ops::device::reset_peak(&dev)
        .map_err(|e| tracing::warn!("peak memory not measured: {e}"))
        .is_ok();
    let mut lap = Lap::new(&dev, use_marks);
    let mut losses = vec![];
    let t0 = Instant::now();
    for _ in 0..args.steps.max(1) {
        losses.push(step(&mut lap)?);
    }
    dev.synchronize()?;
    let wall = t0.elapsed().as_secs_f64();
    let n = args.steps.max(1) as f64;
    let phase_ms: BTreeMap<&'static str, f64> = lap
        .totals_ms()?
        .into_iter()
        .map(|(k, v)| (k, v / n))
        .collect();
    let peak = match dev.is_cuda() {
        true => pool_ok
            .then(|| cim_ops::device::peak_bytes(&dev).ok().flatten())
            .flatten()
            .map(|bytes| bytes as f64 / (1u64 << 30) as f64),
        false => cpu_peak_gib(),
    };
    let losses: Vec<f64> = losses
        .iter()
        .map(|t| t.to_scalar::<f32>().map(|v| v as f64))
        .collect::<candle_core::Result<_>>()?;
    let step_ms = wall / n * 1e3;
    Ok(BenchReport {
        preset: args.layers.preset.clone(),
        tokenizer: cim.names["tokenizer"].clone(),
        generator: cim.names["generator"].clone(),
        enhancer: cim.names["enhancer"].clone(),
        objective: cim.names["objective"].clone(),
        batch,
        img: cfg.data.image_size,
        tok_res: cfg.data.tokenizer_size,
        tokens: cim.grid.len(),
        dtype: match (cim.run.precision, dev.is_cuda() && cfg.run.tf32) {
            (crate::config::Precision::Bf16, _) => "bf16 (f32 master weights)".into(),
            (_, true) => "fp32 (tf32 matmul)".into(),
            _ => "fp32".into(),
        },
        cuda_kernels: dev.is_cuda() && cim_ops::cuda_kernels(),
        fused_blocks: cfg.run.fused_blocks && cim_ops::kernels_run_on(&dev),
        grad_sink: cim.run.grad_sink,
        graft_regions: cim.run.grad_sink && cim.run.graft_regions,
        phase_timing: if use_marks {
            "device events"
        } else {
            "host sync"
        },
        upload_cache: args.upload_cache && dev.is_cuda(),
        flash_attention: cim.run.flash_attention && dev.is_cuda() && cim_ops::cuda_kernels(),
        cuda_keep_freed: cim.run.cuda_keep_freed && dev.is_cuda(),
        cudnn_conv: dev.is_cuda() && cim_ops::cudnn_conv(),
        cpu_kernels: cim_ops::cpu_kernels().name(),
        cpu_threads: rayon::current_num_threads(),
        tok_precision: cim.tokenizer.precision(),
        device: format!("{dev:?}"),
        params_m: cim.params.num_params() as f64 / 1e6,
        steps: n as usize,
        warmup: args.warmup,
        build_s,
        warmup_s,
        step_ms,
        images_per_s: batch as f64 / (step_ms / 1e3),
        phase_sum_ms: phase_ms.values().sum(),
        phase_ms,
        loss_first: losses[0],
        loss_last: *losses.last().expect("at least one step"),
        loss_finite: losses.iter().all(|l| l.is_finite()),
        peak_mem_gib: peak,
    })
}

/// Phase timing. With marks (CUDA, the default there), each phase boundary records a mark in the
/// device's queue and nothing waits: the host runs ahead as in training, and a phase's time is the
/// device's time between its marks, read after the loop — the reference's method. Without (the
/// CPU, or `--sync-phases`), the device is synchronised at every boundary and the host clock
/// read, so a phase's kernels are charged to it, at the cost of draining the queue each time.
struct Lap<'a> {
    dev: &'a Device,
    marks: bool,
    /// The boundary the next phase starts from.
    last: Option<(Instant, Option<Rc<Mark>>)>,
    /// Per phase: host-clock milliseconds so far, and the mark pairs still to read.
    host_ms: BTreeMap<&'static str, f64>,
    pending: Vec<(&'static str, Rc<Mark>, Rc<Mark>)>,
    /// For benches/cupti: the end of each phase as a memset of a size no float tensor has.
    markers: bool,
}

impl<'a> Lap<'a> {
    fn new(dev: &'a Device, marks: bool) -> Self {
        Self {
            dev,
            marks,
            last: None,
            host_ms: PHASES.iter().map(|&p| (p, 0.0)).collect(),
            pending: vec![],
            markers: dev.is_cuda() && std::env::var_os("CIM_PHASE_MARKERS").is_some(),
        }
    }

    fn boundary(&self) -> Result<(Instant, Option<Rc<Mark>>)> {
        if self.marks {
            Ok((Instant::now(), Mark::now(self.dev)?.map(Rc::new)))
        } else {
            self.dev.synchronize()?;
            Ok((Instant::now(), None))
        }
    }

    /// The start of a step.
    fn begin(&mut self) -> Result<()> {
        self.last = Some(self.boundary()?);
        Ok(())
    }

    fn end(&mut self, name: &'static str) -> Result<()> {
        if self.markers {
            let i = PHASES
                .iter()
                .position(|&p| p == name)
                .unwrap_or(PHASES.len());
            candle_core::Tensor::zeros(
                PHASE_MARKER_BYTES + 2 * i,
                candle_core::DType::U8,
                self.dev,
            )?;
        }
        let (t, m) = self.boundary()?;
        let (t0, m0) = self.last.take().expect("Lap::begin before Lap::end");
        *self.host_ms.entry(name).or_default() += (t - t0).as_secs_f64() * 1e3;
        if let (Some(m0), Some(m)) = (m0, &m) {
            self.pending.push((name, m0, m.clone()));
        }
        // This phase's end starts the next one.
        self.last = Some((t, m));
        Ok(())
    }

    /// Milliseconds per phase over all steps timed.
    fn totals_ms(self) -> Result<BTreeMap<&'static str, f64>> {
        if !self.marks {
            return Ok(self.host_ms);
        }
        let mut out: BTreeMap<&'static str, f64> = PHASES.iter().map(|&p| (p, 0.0)).collect();
        for (name, a, b) in &self.pending {
            *out.entry(name).or_default() += a.ms_until(b)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_bench_reports_every_phase_of_the_reference() -> Result<()> {
        let args = BenchArgs {
            layers: Layers::preset("tiny_vit_respix"),
            batch: Some(2),
            steps: 2,
            warmup: 1,
            device: Some("cpu".into()),
            sync_phases: false,
            upload_cache: false,
            cpu_kernels: None,
        };
        let r = bench(&args)?;
        assert_eq!(r.batch, 2);
        assert_eq!(r.steps, 2);
        assert_eq!(r.phase_ms.keys().copied().collect::<Vec<_>>(), {
            let mut p = PHASES.to_vec();
            p.sort();
            p
        });
        assert!(r.phase_ms.values().all(|&v| v > 0.0), "{:?}", r.phase_ms);
        // The phases are the whole step, up to the loop's own overhead.
        assert!(r.phase_sum_ms <= r.step_ms * 1.001 + 0.5, "{r:?}");
        assert!(r.phase_sum_ms > 0.8 * r.step_ms, "{r:?}");
        assert!(r.images_per_s > 0.0 && r.loss_finite);
        assert!(r.peak_mem_gib.unwrap() > 0.0);
        // The CPU runs its ops as they are called: phases are timed on the host clock.
        assert_eq!(r.phase_timing, "host sync");
        assert!(!r.upload_cache && !r.cuda_keep_freed);
        let line = serde_json::to_string(&r).unwrap();
        for key in ["images_per_s", "step_ms", "phase_ms", "peak_mem_gib"] {
            assert!(line.contains(key), "{line}");
        }
        assert_eq!(
            r.tok_precision, None,
            "the vq tokenizer has no precision choice"
        );
        assert_eq!(
            (r.dtype.as_str(), r.cuda_kernels, r.fused_blocks),
            ("fp32", false, true)
        );
        let expected = cim_ops::cpu_kernels().name();
        assert_eq!(r.cpu_kernels, expected);
        assert_eq!(r.cpu_threads, rayon::current_num_threads());
        assert!(
            line.contains(&format!("\"cpu_kernels\":\"{expected}\"")),
            "{line}"
        );
        Ok(())
    }

    /// The dVAE's precision choice and agreement reach the bench line.
    #[test]
    fn bench_reports_the_tokenizer_precision_and_agreement() -> Result<()> {
        let args = BenchArgs {
            layers: Layers {
                preset: Some("tiny_vit_respix".into()),
                set: vec![
                    r#"tokenizer.name="dalle_dvae""#.into(),
                    r#"tokenizer.dalle_dvae.precision="f16""#.into(),
                ],
                ..Default::default()
            },
            batch: Some(2),
            steps: 1,
            warmup: 1,
            device: Some("cpu".into()),
            sync_phases: false,
            upload_cache: false,
            cpu_kernels: None,
        };
        let r = bench(&args)?;
        let p = r
            .tok_precision
            .clone()
            .expect("dalle_dvae reports its precision");
        assert_eq!(p.dtype, "f16");
        assert_eq!(p.tokens, 2 * r.tokens, "measured on the first batch");
        assert!((0.0..=1.0).contains(&p.agreement), "{p:?}");
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains(r#""tok_precision":{"dtype":"f16""#), "{line}");
        Ok(())
    }
}
