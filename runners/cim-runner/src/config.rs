//! The run configuration and its layering.
//!
//! Precedence, lowest first — the one place it is stated ([`mod@figment`]):
//! built-in defaults → `configs/base.toml` → the preset → `--config FILE`s → `CIM_` environment
//! variables (`__` separates levels: `CIM_TRAIN__LR=1e-3`) → `--set key=value`.
//!
//! Fixed sections (`run`, `data`, `train`) reject unknown keys through serde; component sections
//! (`tokenizer`, `masking`, `generator`, `sampler`, `enhancer`, `objective`) are validated against
//! the plugin registry by [`cim_api::config::select`]. Errors name the key and the file, variable
//! or `--set` that set it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cim_api::figment::providers::{Env, Format, Serialized, Toml};
use cim_api::figment::value::{Dict, Map, Value};
use cim_api::figment::{Figment, Metadata, Profile, Provider, Source};
use cim_api::registry::Variant;
use cim_api::{
    Corruption, Enhancer, Error, Generator, Masking, Objective, Result, Sampler, Tokenizer,
};
use serde::{Deserialize, Serialize};

include!(concat!(env!("OUT_DIR"), "/presets.rs"));

/// `run.device`: `"auto"` (the first GPU if the binary has CUDA, else the CPU), `"cpu"` or
/// `"cuda:N"`. Any other string is an error naming the key at resolve time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("must be \"auto\", \"cpu\" or \"cuda:N\", got \"{s}\"")),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `run.precision`: the compute precision of the generator and the enhancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    F32,
    /// Mixed precision: bf16 matmuls, convolutions and activations; f32 master weights, optimizer
    /// state, normalisation, softmax and losses.
    Bf16,
    /// `bf16` on CUDA for an enhancer with a mixed-precision path, `f32` otherwise (the CPU's
    /// f32 kernels are its fast ones). What the paper presets use.
    Auto,
}

/// `data.split`: which part of a labelled data set a run reads (CIFAR-10's `train.bin` or
/// `test.bin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Split {
    #[default]
    Train,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "test",
        }
    }
}

/// `finetune.pooling`: the image summary the fine-tuning head reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadPooling {
    /// The mean of the per-position features (BEiT's default).
    #[default]
    Mean,
    /// The ViT class token (an error for enhancers without one).
    Cls,
}

/// `[run]`: where, on what, for how long.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub seed: u64,
    /// `"auto"`, `"cpu"` or `"cuda:N"`.
    pub device: DeviceChoice,
    /// Parent folder of run directories (`<out_root>/<preset>-<unix time>`), unless `--out` names one.
    pub out_root: PathBuf,
    /// Stop after this many optimizer steps (the schedule still spans the whole run); 0 = run it all.
    pub max_steps: usize,
    /// Log a line every this many steps when no progress bar is shown.
    pub log_every: usize,
    /// Write a checkpoint (atomically) every this many steps, and always at the end; 0 = end only.
    pub checkpoint_every: usize,
    /// Checkpoints kept in `<run>/checkpoints/` (the newest K; at least 1).
    pub keep_checkpoints: usize,
    /// Write a picture grid `pictures/step-NNNNNNN.png` every this many steps; 0 = only at the end.
    pub picture_every: usize,
    /// Also write each step's numbers as TensorBoard scalars into `<run>/tensorboard/`
    /// (`tensorboard --logdir runs/`).
    pub tensorboard: bool,
    /// On CUDA, let f32 matmuls use TF32 tensor cores (PyTorch's `allow_tf32`).
    pub tf32: bool,
    /// On CUDA, use cim's fused kernels (`cim_ops`: LayerNorm, softmax, cross-entropy,
    /// attention softmax, RESPIX, AdamW, BatchNorm, conv backward, …) instead of composed candle
    /// ops. Their GPU parity test is `cim-ops/tests/ops_cuda.rs` (book: Performance).
    pub cuda_kernels: bool,
    /// Run each transformer block (generator and ViT enhancer) as one graph node with a
    /// hand-written backward (`cim_ops::pre_norm_block`) wherever the fused kernels run;
    /// `false` records every op of the block (stochastic depth included).
    pub fused_blocks: bool,
    /// Differentiate each step through a `cim_ops::GradSink`: fused graph nodes hand their
    /// parameters' gradients to it instead of to candle's graph (no per-parameter zero tensor and
    /// add, no packing of a block's twelve parameters). `false`: plain `Tensor::backward`, the
    /// same gradients (to measure the difference).
    pub grad_sink: bool,
    /// With the gradient sink, differentiate chains of fused nodes that a plugin marks as a
    /// region (`cim_ops::region`: ResNet-50's bottlenecks) as one graph node whose backward
    /// hands each gradient to the next node directly — no zero tensor and add per activation
    /// edge. `false`: every fused node in candle's graph, the same gradients (to measure the
    /// difference).
    pub graft_regions: bool,
    /// On CUDA (`--features cudnn` builds), run convolutions (forward; backward of trainable ones)
    /// through cim's own cuDNN calls (`cim_ops::set_cudnn_conv`: tensor-core math for
    /// bf16/f16, algorithm and workspace kept per shape) instead of candle's forward and cim's
    /// im2col backward. No effect in builds without the feature or off CUDA; a cuDNN error
    /// switches it off with a warning (book: Performance).
    pub cudnn_conv: bool,
    /// On CUDA, keep device memory that a step frees in the allocator's pool across
    /// synchronisations, as PyTorch's caching allocator does (`cim_ops::device::prepare`: the
    /// pool's release threshold raised to the maximum). `false` is CUDA's default, which hands
    /// it back to the driver at every synchronisation, so the next step maps it again.
    pub cuda_keep_freed: bool,
    /// On CUDA, run bf16 attention with 64-wide heads through cim's flash kernels
    /// (tensor cores, nothing N×N in global memory, q, k, v read in place) instead of the GEMM
    /// attention. Off by default: its GPU parity check (`cim-ops/tests/ops_cuda.rs`) has not run
    /// on a GPU yet (book: Performance, "Not yet measured").
    pub flash_attention: bool,
    /// On CUDA, also run the paths whose GPU parity check has not run on a GPU yet
    /// ([`UNVERIFIED_ON_GPU`]; book: Performance, "Not yet measured"). `false` (the default): on
    /// CUDA those switches are off whatever they say; they keep their values on the CPU, where
    /// their tests run.
    pub cuda_unverified: bool,
    /// Compute precision of the generator and enhancer: `"f32"`, or `"bf16"` (mixed precision:
    /// f32 master weights, optimizer state, LayerNorm, softmax and losses; bf16 matmuls and
    /// activations; ResNet-50's BatchNorm in f32). bf16 needs a ViT or the ResNet-50 enhancer.
    pub precision: Precision,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            seed: 0,
            device: DeviceChoice::Auto,
            out_root: "runs".into(),
            max_steps: 0,
            log_every: 10,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            picture_every: 0,
            tensorboard: true,
            tf32: true,
            cuda_kernels: true,
            fused_blocks: true,
            grad_sink: true,
            graft_regions: true,
            cudnn_conv: true,
            cuda_keep_freed: true,
            flash_attention: false,
            cuda_unverified: false,
            precision: Precision::F32,
        }
    }
}

/// The execution paths written since the last GPU run: they pass their CPU tests and the CUDA
/// kernels' emulation test, but not yet `cim-ops/tests/ops_cuda.rs` on a GPU. On CUDA each runs
/// only with `run.cuda_unverified = true` ([`RunSection::in_force`]).
pub const UNVERIFIED_ON_GPU: [&str; 5] = [
    "run.grad_sink",
    "run.graft_regions",
    "run.cuda_keep_freed",
    "run.flash_attention",
    "layout = \"auto\" as channels last (cuDNN NHWC)",
];

impl RunSection {
    /// The switches in force on a device: on CUDA without `cuda_unverified`, those of
    /// [`UNVERIFIED_ON_GPU`] are off. Elsewhere the section as configured.
    pub fn in_force(&self, cuda: bool) -> RunSection {
        let mut run = self.clone();
        if cuda && !run.cuda_unverified {
            run.grad_sink = false;
            run.graft_regions = false;
            run.cuda_keep_freed = false;
            run.flash_attention = false;
        }
        run
    }
}

/// Where images come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// The photographs embedded in the binary.
    Quickstart,
    /// CIFAR-10 binary records (`path` = folder holding `train.bin`/`test.bin`, or the file).
    Cifar10,
    /// ImageFolder layout: `path/<class>/*.{jpg,jpeg,png}`.
    Folder,
}

/// `[data]`: the dataset and BEiT's two views of one RandomResizedCrop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub source: DataSource,
    /// The data set's folder (or CIFAR-10 file). A relative path is looked for in the working
    /// directory first, then under `root` (see [`crate::data::locate`]).
    pub path: Option<PathBuf>,
    /// Where `cim-run data get` puts data sets and where relative `path`s are also looked for;
    /// unset: `$XDG_CACHE_HOME/cim/data`, else `~/.cache/cim/data` ([`crate::data::default_root`]).
    pub root: Option<PathBuf>,
    /// CIFAR-10 split: `"train"` or `"test"`.
    pub split: Split,
    /// Side of the generator/enhancer view (paper: 224), bicubic.
    pub image_size: usize,
    /// Side of the tokenizer view (paper: 112), Lanczos.
    pub tokenizer_size: usize,
    /// RandomResizedCrop area range (torchvision default 0.08–1).
    pub crop_scale: [f64; 2],
    /// RandomResizedCrop aspect-ratio range (3/4–4/3).
    pub crop_ratio: [f64; 2],
    /// Horizontal flip with probability 0.5.
    pub hflip: bool,
    /// Input normalisation of the generator and enhancer views.
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// Decode/augment threads; 0 = one per core.
    pub workers: usize,
    /// Batches prepared ahead of the training step (bounded queue).
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: DataSource::Quickstart,
            path: None,
            root: None,
            split: Split::Train,
            image_size: 224,
            tokenizer_size: 112,
            crop_scale: [0.08, 1.0],
            crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
            hflip: true,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            workers: 0,
            prefetch: 2,
        }
    }
}

/// `[train]`: optimisation (paper Table 9).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    pub min_lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub adam_eps: f64,
    /// Global gradient-norm clip; 0 disables.
    pub clip_grad: f64,
    pub epochs: usize,
    pub warmup_epochs: usize,
    /// If > 0, the schedule's length in steps (instead of epochs × steps per epoch).
    pub total_steps: usize,
    /// If > 0, warmup length in steps (instead of warmup_epochs × steps per epoch).
    pub warmup_steps: usize,
    /// Gradient accumulation: each optimizer step sums gradients over this many micro-batches of
    /// `batch_size / accum_steps` images (`batch_size` stays the effective batch). In a job of
    /// several processes each rank accumulates this many micro-batches of
    /// `batch_size / (world × accum_steps)` images.
    pub accum_steps: usize,
    /// If > 0, the micro-batch in images, whatever the number of processes: each rank then
    /// accumulates `batch_size / (world × micro_batch)` micro-batches (and `accum_steps` must be
    /// left at 1). A run fixed by `batch_size` and `micro_batch` computes the same steps on one
    /// process or many.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub micro_batch: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl TrainConfig {
    /// Micro-batches each of `world` ranks accumulates per step, and their size in images; an
    /// indivisible batch is an error naming the keys.
    pub fn split(&self, world: usize) -> Result<(usize, usize)> {
        let (b, w) = (self.batch_size, world.max(1));
        if self.micro_batch > 0 {
            let m = self.micro_batch;
            if self.accum_steps != 1 {
                return Err(Error::config(format!(
                    "train.micro_batch = {m} fixes the accumulation itself; leave train.accum_steps at 1 (it is {})",
                    self.accum_steps
                )));
            }
            if !b.is_multiple_of(w * m) {
                return Err(Error::config(format!(
                    "train.batch_size = {b} is not a multiple of {w} rank(s) × train.micro_batch = {m}"
                )));
            }
            return Ok((b / (w * m), m));
        }
        let a = self.accum_steps;
        if a == 0 {
            return Err(Error::config("train.accum_steps must be ≥ 1"));
        }
        if !b.is_multiple_of(w * a) {
            return Err(Error::config(format!(
                "train.batch_size = {b} does not split into {w} rank(s) × {a} micro-batch(es) of equal size (train.accum_steps = {a})"
            )));
        }
        Ok((a, b / (w * a)))
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 2048,
            lr: 1.5e-3,
            min_lr: 1e-5,
            weight_decay: 0.05,
            betas: [0.9, 0.98],
            adam_eps: 1e-8,
            clip_grad: 3.0,
            epochs: 300,
            warmup_epochs: 10,
            total_steps: 0,
            warmup_steps: 0,
            accum_steps: 1,
            micro_batch: 0,
        }
    }
}

/// Loss of the fine-tuning classifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneLoss {
    /// Softmax cross-entropy on (mixed, smoothed) soft targets (ViT recipe, Table 10).
    Ce,
    /// Per-class binary cross-entropy on the same targets (ResNet recipe, Table 11).
    Bce,
}

/// `[finetune]`: end-to-end fine-tuning of the pre-trained enhancer (paper Tables 10–11; the
/// defaults are Table 10's ViT-B/16 RESPIX recipe). The data come from `[data]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    pub epochs: usize,
    pub warmup_epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (of the head; blocks get less under layer decay).
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub adam_eps: f64,
    /// Layer-wise learning-rate decay for ViT enhancers: block `i` of `L` gets
    /// `lr · decay^(L − i)`, embeddings `lr · decay^(L + 1)`; 1.0 switches it off.
    pub layer_decay: f64,
    /// Stochastic depth of ViT enhancers (the last block's rate).
    pub drop_path: f64,
    pub label_smoothing: f64,
    /// Mixup's Beta(α, α) parameter; 0 = off.
    pub mixup: f64,
    /// CutMix's Beta(α, α) parameter; 0 = off.
    pub cutmix: f64,
    /// Probability that a batch is mixed at all.
    pub mix_prob: f64,
    /// With both on: probability of CutMix rather than Mixup for a batch.
    pub switch_prob: f64,
    /// RandAugment: operations per image (0 = off), magnitude (0–10) and its per-op noise std.
    pub randaugment_n: usize,
    pub randaugment_m: f64,
    pub randaugment_mstd: f64,
    pub loss: FinetuneLoss,
    /// Image summary fed to the head: `mean` of the position features (BEiT's default) or `cls`.
    pub pooling: HeadPooling,
    /// Test-time centre crop: resize the shorter side to `size / crop_ratio`, crop `size`.
    pub test_crop_ratio: f64,
    /// Evaluate on the test split every N epochs (and at the end).
    pub eval_every: usize,
    /// Stop after this many optimizer steps (0 = all epochs).
    pub max_steps: usize,
    /// Use at most this many training / test images (seeded subset; 0 = all).
    pub train_limit: usize,
    pub test_limit: usize,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            warmup_epochs: 5,
            batch_size: 1024,
            lr: 3e-3,
            min_lr: 1e-6,
            weight_decay: 0.05,
            betas: [0.9, 0.999],
            adam_eps: 1e-8,
            layer_decay: 0.8,
            drop_path: 0.1,
            label_smoothing: 0.1,
            mixup: 0.8,
            cutmix: 1.0,
            mix_prob: 1.0,
            switch_prob: 0.5,
            randaugment_n: 2,
            randaugment_m: 9.0,
            randaugment_mstd: 0.5,
            loss: FinetuneLoss::Ce,
            pooling: HeadPooling::Mean,
            test_crop_ratio: 0.95,
            eval_every: 1,
            max_steps: 0,
            train_limit: 0,
            test_limit: 0,
        }
    }
}

/// `[init]`: start trainable components from weight files instead of their seeded initialisation
/// (new runs only; `--resume` restores checkpoints). Each value is a local path or
/// `hub:OWNER/REPO[@REV]/FILE`: a run's `model.safetensors` or checkpoint (names `enhancer.*`, …), or
/// a file with the component's own names — e.g. `cim-run export`'s timm/torchvision file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    pub generator: Option<String>,
    pub enhancer: Option<String>,
    pub objective: Option<String>,
}

impl InitConfig {
    /// `(component, source)` pairs that are set, in build order.
    pub fn sources(&self) -> Vec<(&'static str, &str)> {
        [
            ("generator", &self.generator),
            ("enhancer", &self.enhancer),
            ("objective", &self.objective),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}

/// `[tokenizer_train]`: `cim-run tokenizer-train` (training the `vq` tokenizer on `[data]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerTrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate (AdamW, no weight decay; linear warmup, cosine decay to `min_lr`).
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// Re-seed codes that no batch chose during the last this many steps (0 = never).
    pub reset_every: usize,
    /// Images held out of training (seeded subset of the dataset) for PSNR and perplexity.
    pub eval_images: usize,
    /// Log a line every this many steps.
    pub log_every: usize,
}

impl Default for TokenizerTrainConfig {
    fn default() -> Self {
        Self {
            steps: 3000,
            batch_size: 64,
            lr: 2e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            reset_every: 100,
            eval_images: 1000,
            log_every: 100,
        }
    }
}

/// The layers that rebuild a run from its directory's `config.toml` (environment ignored), plus
/// `set`; a directory without one is an error saying so.
pub fn run_layers(run_dir: &std::path::Path, set: Vec<String>) -> Result<Layers> {
    let file = run_dir.join("config.toml");
    if !file.is_file() {
        return Err(Error::msg(format!(
            "{}: not a run directory (no config.toml)",
            run_dir.display()
        )));
    }
    Ok(Layers {
        preset: None,
        config_files: vec![file],
        set,
        env: false,
    })
}

/// A component section as written: `name` plus one table per plugin. Validated by the registry.
pub type Section = BTreeMap<String, Value>;

fn section(name: &str) -> Section {
    BTreeMap::from([("name".to_string(), Value::from(name.to_string()))])
}

/// The whole configuration as extracted from the layered figment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub tokenizer: Section,
    pub masking: Section,
    pub generator: Section,
    pub sampler: Section,
    pub corruption: Section,
    pub enhancer: Section,
    pub objective: Section,
    pub finetune: FinetuneConfig,
    pub tokenizer_train: TokenizerTrainConfig,
    pub init: InitConfig,
    pub dist: DistConfig,
}

/// `[dist]`: how the processes of a data-parallel job talk (book: Training on many GPUs). Who
/// is which rank comes from the launcher (`torchrun`, `mpirun`, `srun`), not from here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    /// `"auto"` (NCCL on CUDA, MPI on the CPU), `"mpi"` or `"nccl"`.
    pub backend: cim_dist::Backend,
    /// Seconds a rank waits in a collective (or for the rendezvous) before it ends the job.
    pub timeout_s: u64,
    /// Gradients are averaged in flat buckets of at most this many MiB, one collective each.
    pub bucket_mb: f64,
    /// BatchNorm in training normalises with the statistics of the whole global micro-batch
    /// (every rank's), not each rank's own (PyTorch's SyncBatchNorm).
    pub sync_bn: bool,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            backend: cim_dist::Backend::Auto,
            timeout_s: 300,
            bucket_mb: 25.0,
            sync_bn: true,
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            run: RunSection::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            tokenizer: section("dalle_dvae"),
            masking: section("random"),
            generator: section("beit"),
            sampler: section("gumbel"),
            corruption: section("tokens"),
            enhancer: section("vit_b16"),
            objective: section("respix"),
            finetune: FinetuneConfig::default(),
            tokenizer_train: TokenizerTrainConfig::default(),
            init: InitConfig::default(),
            dist: DistConfig::default(),
        }
    }
}

/// A provider with a name of our choosing, so errors say "preset tiny_vit_respix
/// (configs/tiny_vit_respix.toml)" rather than "TOML source string".
struct Named<P> {
    inner: P,
    name: String,
    source: Option<String>,
}

impl<P: Provider> Provider for Named<P> {
    fn metadata(&self) -> Metadata {
        let md = Metadata::named(self.name.clone());
        match &self.source {
            Some(s) => md.source(Source::Custom(s.clone())),
            None => md,
        }
    }
    fn data(&self) -> std::result::Result<Map<Profile, Dict>, cim_api::figment::Error> {
        self.inner.data()
    }
}

/// `--set key=value` pairs, in order (later wins). Values are TOML (`3`, `1e-3`, `true`,
/// `[100, 120]`, `"text"`); anything that does not parse as TOML is taken as a string.
#[derive(Clone, Debug, Default)]
pub struct SetArgs(pub Vec<(String, Value)>);

impl SetArgs {
    pub fn parse(items: &[String]) -> Result<Self> {
        let mut out = vec![];
        for item in items {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| Error::config(format!("--set expects key=value, got `{item}`")))?;
            let k = k.trim();
            if k.is_empty() || k.split('.').any(|p| p.is_empty()) {
                return Err(Error::config(format!("--set: bad key `{k}` in `{item}`")));
            }
            let v = v.trim();
            let value: Value = match toml::from_str::<toml::Table>(&format!("v = {v}")) {
                Ok(mut t) => t
                    .remove("v")
                    .expect("parsed table has v")
                    .try_into()
                    .map_err(|e| Error::config(format!("--set {item}: {e}")))?,
                Err(_) => Value::from(v.to_string()),
            };
            out.push((k.to_string(), value));
        }
        Ok(Self(out))
    }
}

impl Provider for SetArgs {
    fn metadata(&self) -> Metadata {
        Metadata::named("--set")
    }
    fn data(&self) -> std::result::Result<Map<Profile, Dict>, cim_api::figment::Error> {
        // Built by hand (not through an inner Figment) so the values carry no foreign tags and
        // errors can point at "--set".
        let mut dict = Dict::new();
        for (k, v) in &self.0 {
            if let Value::Dict(_, d) = cim_api::figment::util::nest(k, v.clone()) {
                merge_into(&mut dict, d);
            }
        }
        Ok(Map::from([(Profile::Default, dict)]))
    }
}

/// Deep merge: tables merge key by key, anything else is replaced.
fn merge_into(into: &mut Dict, from: Dict) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Dict(_, a)), Value::Dict(_, b)) => merge_into(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Embedded preset names (every `configs/*.toml` but `base`).
pub fn preset_names() -> Vec<&'static str> {
    EMBEDDED
        .iter()
        .map(|(n, _, _)| *n)
        .filter(|n| *n != "base")
        .collect()
}

/// What a preset is for, read from the tables it sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresetKind {
    /// `cim-run --preset NAME`: CiM pre-training.
    Pretrain,
    /// `cim-run finetune RUN_DIR --preset NAME` (it sets `[finetune]`).
    Finetune,
    /// `cim-run probe RUN_DIR --preset NAME` (it sets only `[data]`).
    Probe,
    /// `cim-run tokenizer-train --preset NAME` (it sets `[tokenizer_train]`).
    TokenizerTrain,
}

impl PresetKind {
    /// How the kind's presets are run, for `--list` and refusals.
    pub fn usage(self) -> &'static str {
        match self {
            Self::Pretrain => "cim-run --preset NAME",
            Self::Finetune => "cim-run finetune RUN_DIR --preset NAME",
            Self::Probe => "cim-run probe RUN_DIR --preset NAME",
            Self::TokenizerTrain => "cim-run tokenizer-train --preset NAME --out FILE",
        }
    }
}

/// The kind of an embedded preset (`None`: no such preset).
pub fn preset_kind(name: &str) -> Option<PresetKind> {
    let (_, text) = embedded(name)?;
    let table: toml::Table = toml::from_str(text).ok()?;
    Some(if table.contains_key("finetune") {
        PresetKind::Finetune
    } else if table.contains_key("tokenizer_train") {
        PresetKind::TokenizerTrain
    } else if table.keys().all(|k| k == "data") {
        PresetKind::Probe
    } else {
        PresetKind::Pretrain
    })
}

fn embedded(name: &str) -> Option<(&'static str, &'static str)> {
    EMBEDDED
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, p, c)| (*p, *c))
}

/// The configuration layers a command names: a preset, config files, `--set` overrides, and
/// whether `CIM_*` environment variables count.
#[derive(Clone, Debug, Default)]
pub struct Layers {
    pub preset: Option<String>,
    pub config_files: Vec<PathBuf>,
    pub set: Vec<String>,
    /// Read `CIM_*` environment variables (the CLI does; tests may not want to).
    pub env: bool,
}

impl Layers {
    /// The layers of a command line's `--preset`, `--config` and `--set` flags, environment
    /// included. Without `--preset` the `quickstart` preset is the layer under the files: a
    /// config file alone starts from a run that fits a CPU, never from `base.toml`'s paper-sized
    /// defaults (ViT-B/16 at batch 2048).
    pub fn from_flags(
        preset: Option<String>,
        config_files: Vec<PathBuf>,
        set: Vec<String>,
    ) -> Self {
        Self {
            preset: Some(preset.unwrap_or_else(|| "quickstart".to_string())),
            config_files,
            set,
            env: true,
        }
    }

    /// A preset alone, without the environment (what tests and examples build from).
    pub fn preset(name: &str) -> Self {
        Self {
            preset: Some(name.to_string()),
            ..Self::default()
        }
    }
}

/// The top-level sections of a configuration, the only ones `CIM_*` variables may set.
pub const SECTIONS: [&str; 14] = [
    "run",
    "data",
    "train",
    "dist",
    "tokenizer",
    "masking",
    "generator",
    "sampler",
    "corruption",
    "enhancer",
    "objective",
    "finetune",
    "tokenizer_train",
    "init",
];

/// The `CIM_*` environment variables of the configuration (`CIM_TRAIN__LR=1e-3` is `train.lr`).
/// A `CIM_*` variable whose first part names no section (`CIM_HOME`, another tool's) is not the
/// configuration's: it is ignored, with a warning once per process.
fn config_env() -> Env {
    fn section(key: &str) -> String {
        key.split("__")
            .next()
            .unwrap_or("")
            .split('.')
            .next()
            .unwrap_or("")
            .to_lowercase()
    }
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        for (key, _) in std::env::vars() {
            if let Some(rest) = key.strip_prefix("CIM_") {
                // cim's own switches that are no configuration key (`cim-run bench`'s markers).
                let own = key == "CIM_PHASE_MARKERS";
                let first = section(rest);
                if !own && !SECTIONS.contains(&first.as_str()) {
                    tracing::warn!(
                        "ignoring the environment variable {key}: `{first}` is no configuration section ({})",
                        SECTIONS.join(", ")
                    );
                }
            }
        }
    });
    Env::prefixed("CIM_")
        .filter(|k| SECTIONS.contains(&section(k.as_str()).as_str()))
        .split("__")
}

/// The layered figment. See the module docs for the precedence.
pub fn figment(layers: &Layers) -> Result<Figment> {
    let (base_path, base) = embedded("base").expect("configs/base.toml is embedded");
    let mut fig = Figment::from(Serialized::defaults(RunConfig::default())).merge(Named {
        inner: Toml::string(base),
        name: "base config".into(),
        source: Some(base_path.into()),
    });
    if let Some(p) = &layers.preset {
        let (path, text) = embedded(p).filter(|_| p != "base").ok_or_else(|| {
            Error::config(format!(
                "unknown preset `{p}`; available: {}",
                preset_names().join(", ")
            ))
        })?;
        fig = fig.merge(Named {
            inner: Toml::string(text),
            name: format!("preset {p}"),
            source: Some(path.into()),
        });
    }
    for f in &layers.config_files {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
        fig = fig.merge(Named {
            inner: Toml::string(&text),
            name: "--config".into(),
            source: Some(f.display().to_string()),
        });
    }
    if layers.env {
        fig = fig.merge(config_env());
    }
    Ok(fig.merge(SetArgs::parse(&layers.set)?))
}

/// The resolved configuration: fixed sections plus each component's name and full parameters.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub preset: Option<String>,
    pub figment: Figment,
    pub cfg: RunConfig,
    /// kind → (name, parameters with defaults filled in).
    pub components: BTreeMap<&'static str, (String, Value)>,
}

impl Resolved {
    pub fn name_of(&self, kind: &str) -> &str {
        &self.components[kind].0
    }

    /// The configuration as TOML, loadable again with `--config`.
    pub fn to_toml(&self) -> Result<String> {
        let mut root = toml::Table::new();
        root.insert("run".into(), to_toml(&self.cfg.run)?);
        root.insert("data".into(), to_toml(&self.cfg.data)?);
        root.insert("train".into(), to_toml(&self.cfg.train)?);
        root.insert("dist".into(), to_toml(&self.cfg.dist)?);
        if self.cfg.init != InitConfig::default() {
            root.insert("init".into(), to_toml(&self.cfg.init)?);
        }
        for (kind, (name, params)) in &self.components {
            let mut t = toml::Table::new();
            t.insert("name".into(), toml::Value::String(name.clone()));
            t.insert(name.clone(), to_toml(params)?);
            root.insert(kind.to_string(), toml::Value::Table(t));
        }
        let mut text = String::new();
        if let Some(p) = &self.preset {
            text.push_str(&format!("# resolved from preset `{p}`\n"));
        }
        text.push_str(&toml::to_string(&root).map_err(|e| Error::msg(e.to_string()))?);
        Ok(text)
    }
}

fn to_toml<T: Serialize>(v: &T) -> Result<toml::Value> {
    toml::Value::try_from(v).map_err(|e| Error::msg(format!("cannot write config: {e}")))
}

fn component<K: cim_api::registry::Kind + ?Sized>(fig: &Figment) -> Result<(String, Value)>
where
    cim_api::registry::Entry<K>: cim_api::inventory::Collect,
{
    let sel = cim_api::config::select::<K>(fig)?;
    let params = (sel.entry.params)(&sel.params, Variant::Default)
        .map_err(|e| Error::config(format!("in [{}.{}]: {e}", K::KIND, sel.entry.name)))?;
    Ok((sel.entry.name.to_string(), params))
}

/// Extracts and validates everything; errors name the bad key and where it was set.
pub fn resolve(layers: &Layers) -> Result<Resolved> {
    let figment = figment(layers)?;
    let cfg: RunConfig = figment.extract()?;
    let mut components = BTreeMap::new();
    components.insert("tokenizer", component::<dyn Tokenizer>(&figment)?);
    components.insert("masking", component::<dyn Masking>(&figment)?);
    components.insert("generator", component::<dyn Generator>(&figment)?);
    components.insert("sampler", component::<dyn Sampler>(&figment)?);
    components.insert("corruption", component::<dyn Corruption>(&figment)?);
    components.insert("enhancer", component::<dyn Enhancer>(&figment)?);
    components.insert("objective", component::<dyn Objective>(&figment)?);
    validate(&cfg)?;
    Ok(Resolved {
        preset: layers.preset.clone(),
        figment,
        cfg,
        components,
    })
}

/// `run.precision` for enhancer `enhancer`: f32 always; bf16 for the enhancers whose plugin
/// declares a mixed-precision path (`mixed_precision: true` in its registration).
pub fn validate_precision(precision: Precision, enhancer: &str) -> Result<()> {
    if precision != Precision::Bf16 {
        return Ok(());
    }
    let with_path: Vec<&str> = cim_api::registry::table::<dyn Enhancer>()?
        .values()
        .filter(|e| e.mixed_precision)
        .map(|e| e.name)
        .collect();
    if with_path.contains(&enhancer) {
        return Ok(());
    }
    Err(Error::config(format!(
        "`run.precision` = \"bf16\" needs an enhancer with a mixed-precision path ({}); `{enhancer}` runs in f32 only",
        with_path.join(", ")
    )))
}

/// The most loader threads `data.workers` may ask for.
pub const MAX_WORKERS: usize = 256;

fn validate(cfg: &RunConfig) -> Result<()> {
    let bad = |k: &str, why: String| Err(Error::config(format!("`{k}` {why}")));
    let enh = cfg
        .enhancer
        .get("name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    validate_precision(cfg.run.precision, enh)?;
    if cfg.train.batch_size == 0 {
        return bad("train.batch_size", "must be ≥ 1".into());
    }
    cfg.train.split(1)?;
    if cfg.dist.timeout_s == 0 {
        return bad("dist.timeout_s", "must be ≥ 1 (seconds)".into());
    }
    if !(cfg.dist.bucket_mb > 0.0) {
        return bad(
            "dist.bucket_mb",
            format!("must be > 0, got {}", cfg.dist.bucket_mb),
        );
    }
    if !(cfg.train.lr > 0.0) {
        return bad("train.lr", format!("must be > 0, got {}", cfg.train.lr));
    }
    for (key, size) in [
        ("data.image_size", cfg.data.image_size),
        ("data.tokenizer_size", cfg.data.tokenizer_size),
    ] {
        if size == 0 {
            return bad(key, "must be ≥ 1 (a side in pixels)".into());
        }
    }
    if cfg.data.workers > MAX_WORKERS {
        return bad(
            "data.workers",
            format!(
                "= {} is more loader threads than any machine uses; at most {MAX_WORKERS} (0 = one per core)",
                cfg.data.workers
            ),
        );
    }
    let [s0, s1] = cfg.data.crop_scale;
    if !(0.0 < s0 && s0 <= s1 && s1 <= 1.0) {
        return bad(
            "data.crop_scale",
            format!("must satisfy 0 < lo ≤ hi ≤ 1, got [{s0}, {s1}]"),
        );
    }
    let [r0, r1] = cfg.data.crop_ratio;
    if !(0.0 < r0 && r0 <= r1) {
        return bad(
            "data.crop_ratio",
            format!("must satisfy 0 < lo ≤ hi, got [{r0}, {r1}]"),
        );
    }
    if cfg.data.source != DataSource::Quickstart && cfg.data.path.is_none() {
        return bad(
            "data.path",
            format!("is required for data.source = {:?}", cfg.data.source),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On CUDA the paths not yet checked on a GPU are off unless `run.cuda_unverified`; the CPU
    /// keeps every switch as configured.
    #[test]
    fn unverified_gpu_paths_are_off_on_cuda_by_default() {
        let run = RunSection {
            flash_attention: true,
            ..RunSection::default()
        };
        let cuda = run.in_force(true);
        assert!(!cuda.grad_sink && !cuda.graft_regions && !cuda.cuda_keep_freed);
        assert!(!cuda.flash_attention && cuda.fused_blocks && cuda.cuda_kernels);
        assert_eq!(run.in_force(false), run);
        let opted = RunSection {
            cuda_unverified: true,
            ..run.clone()
        };
        assert_eq!(opted.in_force(true), opted);
        assert_eq!(UNVERIFIED_ON_GPU.len(), 5);
    }

    /// `SECTIONS` lists exactly the top-level tables of a configuration.
    #[test]
    fn sections_are_the_configurations_tables() {
        let v = toml::Value::try_from(RunConfig::default()).unwrap();
        let mut keys: Vec<&str> = v.as_table().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        let mut want = SECTIONS.to_vec();
        want.sort();
        assert_eq!(keys, want);
    }
}
