//! The command line: `cim-run --preset NAME [--config FILE]… [--set KEY=VALUE]… [--steps N] [--out DIR]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use cim_api::registry;
use cim_api::{Corruption, Enhancer, Generator, Masking, Objective, Sampler, Tokenizer};
use cim_runner::config::{preset_names, resolve, run_layers, DataSource, Layers, Split};
use cim_runner::export::Format;
use cim_runner::probe::{Init, Pooling};
use cim_runner::rundir::RunDir;
use cim_runner::train::Trainer;
use cim_runner::{bench, datasets, export, finetune, fit, inspect, probe, tokenizer_train};

#[derive(Debug, Parser)]
#[command(
    name = "cim-run",
    version,
    about = "Corrupted Image Modeling (CiM) pre-training",
    after_help = "Configuration precedence, lowest first: built-in defaults → configs/base.toml → --preset → \
                  --config FILE(s) → CIM_* environment variables (CIM_TRAIN__LR=1e-3) → --set KEY=VALUE.\n\
                  Without --preset, the `quickstart` preset is the layer under --config files and --set."
)]
pub struct Cli {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// List registered components by kind, and the presets.
    #[arg(long)]
    pub list: bool,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Stop after N optimizer steps (the schedule still spans the configured run).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Run directory (default: `<run.out_root>/<preset>-<unix time>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its newest checkpoint (with --steps N: until step N).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["preset", "config", "out"])]
    pub resume: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Where the configuration comes from; shared by training and the subcommands.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// Preset name (an embedded `configs/NAME.toml`).
    #[arg(long)]
    pub preset: Option<String>,
    /// Extra TOML config files, applied in order.
    #[arg(long = "config", value_name = "FILE")]
    pub config: Vec<PathBuf>,
    /// Override one key, e.g. `--set train.lr=1e-3 --set enhancer.name=vit_s16`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// The config layers these flags name (`quickstart` when neither a preset nor a file is given).
    pub fn layers(&self) -> Layers {
        Layers::from_flags(self.preset.clone(), self.config.clone(), self.set.clone())
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Data sets: `data get NAME` downloads, checks and unpacks one under the data root; `data list`.
    #[command(subcommand)]
    Data(DataCmd),
    /// Run a grid of pre-training cells over seeds, probe each beside its random-init control,
    /// and write results.csv, results.md and results.png; a rerun continues where it stopped.
    Sweep(SweepCmd),
    /// Draw a run's loss curves from its metrics.jsonl now (also while it trains); the run writes
    /// `loss_curve.png` itself only when it ends.
    Plot(PlotCmd),
    /// Fit a `patch_kmeans` tokenizer codebook (k-means on random image patches).
    FitKmeans(FitKmeansCmd),
    /// Time one training step phase by phase; prints one JSON line (the reference's fields).
    Bench(BenchCmd),
    /// Figure-2-style grids for given images: original, masked input, several sampled corruptions.
    Corrupt(CorruptCmd),
    /// Data-loader throughput on an ImageFolder (decode and augmentation time per image).
    BenchData(BenchDataCmd),
    /// Linear-probe and k-NN accuracy of a run's frozen enhancer on labelled data.
    Probe(ProbeCmd),
    /// Fine-tune a run's enhancer end to end on labelled data (`--init scratch`: the control).
    Finetune(FinetuneCmd),
    /// Write a run's enhancer with timm's or torchvision's names (+ a JSON mapping).
    Export(ExportCmd),
    /// Print each image's token grid as JSON (`--decode OUT.png`: view and reconstruction).
    Tokenize(TokenizeCmd),
    /// Train the `vq` tokenizer on the images of the data table; prints PSNR and codebook perplexity on held-out images.
    TokenizerTrain(TokenizerTrainCmd),
}

/// `cim-run sweep`.
#[derive(Debug, Clone, clap::Args)]
pub struct SweepCmd {
    /// The sweep spec (`configs/sweeps/*.toml`).
    pub spec: PathBuf,
    /// The results folder (default: `runs/sweeps/<spec name>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the cells' run folders live (default `runs/sweeps/cells`); specs sharing it share
    /// identical cells.
    #[arg(long)]
    pub cells: Option<PathBuf>,
    /// List every cell × seed and control with whether it is done; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Write results.csv/md/png from the units finished so far and run nothing (while another
    /// process runs the sweep, or to stop a sweep at a table that is enough).
    #[arg(long, conflicts_with = "dry_run")]
    pub report: bool,
}

/// `cim-run plot`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlotCmd {
    /// A pre-training or fine-tuning run directory (its `metrics.jsonl`).
    pub run_dir: PathBuf,
    /// Output PNG (default: `RUN_DIR/loss_curve.png`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `cim-run data`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DataCmd {
    /// Download a data set from its publisher, check its checksum and unpack it to the layout the
    /// presets read (`<data.root>/NAME`). An interrupted download continues when run again.
    Get(DataGetCmd),
    /// The data sets `data get` knows, and where they are (or would be) under the data root.
    List(DataListCmd),
}

/// `cim-run data get`.
#[derive(Debug, Clone, clap::Args)]
pub struct DataGetCmd {
    /// `cifar10`, `imagenette` or `imagenette-160` (`cim-run data list`).
    pub name: String,
    /// Destination folder (default: `<data.root>/NAME`, where the presets look).
    #[arg(long, value_name = "DIR")]
    pub to: Option<PathBuf>,
    /// A mirror of the publisher's archive (checked against the publisher's checksum).
    #[arg(long)]
    pub url: Option<String>,
    /// The MD5 of the whole archive at --url, when it is not the publisher's file.
    #[arg(long, requires = "url")]
    pub md5: Option<String>,
    /// `data.root` comes from here (`--set data.root=DIR`, `CIM_DATA__ROOT=DIR`, a config file).
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `cim-run data list`.
#[derive(Debug, Clone, clap::Args)]
pub struct DataListCmd {
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `cim-run bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchCmd {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Images per step (default: the preset's micro-batch, `train.batch_size / train.accum_steps`, at most 128).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first (kernel JIT, allocator warm-up).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Overrides `run.device` ("cpu", "cuda:0", "auto").
    #[arg(long)]
    pub device: Option<String>,
    /// On CUDA, synchronise the device at every phase boundary and time phases on the host.
    /// Default: CUDA events, no host synchronisation inside the timed loop, as the reference
    /// times its phases. No effect on the CPU, which always does this.
    #[arg(long)]
    pub sync_phases: bool,
    /// On CUDA, a measurement switch: run the steps with candle's upload cache on, so the small
    /// host→device copies before strided and reduction kernels are made once. Its cache never
    /// shrinks, so training does not use it.
    #[arg(long)]
    pub upload_cache: bool,
    /// On the CPU, caps cim's fused kernels at an instance: "portable", "avx2" or "avx512" (the
    /// default is the CPU's widest). A measurement switch for comparing them in one binary;
    /// candle's matmuls (the gemm crate) pick their own instructions regardless.
    #[arg(long, value_parser = parse_cpu_kernels)]
    pub cpu_kernels: Option<cim_ops::CpuKernels>,
}

fn parse_cpu_kernels(name: &str) -> std::result::Result<cim_ops::CpuKernels, String> {
    cim_ops::CpuKernels::parse(name).ok_or_else(|| {
        format!("unknown CPU kernel instance {name:?}; available: portable, avx2, avx512")
    })
}

impl From<BenchCmd> for bench::BenchArgs {
    fn from(c: BenchCmd) -> Self {
        Self {
            layers: c.config.layers(),
            batch: c.batch,
            steps: c.steps,
            warmup: c.warmup,
            device: c.device,
            sync_phases: c.sync_phases,
            upload_cache: c.upload_cache,
            cpu_kernels: c.cpu_kernels,
        }
    }
}

/// `cim-run probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeCmd {
    /// A pre-training run directory (its `config.toml` builds the enhancer).
    pub run_dir: PathBuf,
    /// Labelled data: `cifar10` (PATH holds train.bin/test.bin) or `folder` (PATH/train, PATH/val).
    /// Without --path, `data.source` and `data.path` of --preset/--config/--set are used.
    #[arg(long, value_enum, default_value = "cifar10")]
    pub data: DataSource,
    /// The labelled data set's folder (see --data).
    #[arg(long)]
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Which vector summarises an image.
    #[arg(long, value_enum, default_value = "mean")]
    pub feature: Pooling,
    /// The run's weights, or the same network freshly initialised (the control row).
    #[arg(long, value_enum, default_value = "pretrained")]
    pub init: Init,
    /// Use at most this many training images (a seeded random subset; 0 = all).
    #[arg(long, default_value_t = 0)]
    pub train_limit: usize,
    /// Use at most this many test images (a seeded random subset; 0 = all).
    #[arg(long, default_value_t = 0)]
    pub test_limit: usize,
    /// Neighbours of the k-NN classifier.
    #[arg(long, default_value_t = 20)]
    pub k: usize,
    /// Temperature of the k-NN votes (weight `exp(cos / T)`).
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f64,
    /// Images per forward pass when extracting features.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
}

impl From<ProbeCmd> for probe::ProbeArgs {
    fn from(c: ProbeCmd) -> Self {
        // A probe without --preset/--config reads its data from --data/--path, not the quickstart.
        let layers = match (&c.config.preset, c.config.config.is_empty()) {
            (None, true) => Layers {
                set: c.config.set.clone(),
                env: true,
                ..Layers::default()
            },
            _ => c.config.layers(),
        };
        Self {
            run_dir: c.run_dir,
            data: c.data,
            path: c.path,
            layers,
            feature: c.feature,
            init: c.init,
            train_limit: c.train_limit,
            test_limit: c.test_limit,
            k: c.k,
            temperature: c.temperature,
            batch: c.batch,
        }
    }
}

/// `cim-run finetune`.
#[derive(Debug, Clone, clap::Args)]
pub struct FinetuneCmd {
    /// The pre-training run whose enhancer is fine-tuned (its `config.toml` builds the network).
    pub run_dir: PathBuf,
    /// The recipe and the labelled data: `--preset ft_tiny_cifar10`, `--set finetune.epochs=3`, …
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The run's weights, or the same network freshly initialised (the control row).
    #[arg(long, value_enum, default_value = "pretrained")]
    pub init: Init,
    /// Output folder (default: `<RUN_DIR>/finetune-<init>-<unix time>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl From<FinetuneCmd> for finetune::FinetuneArgs {
    fn from(c: FinetuneCmd) -> Self {
        Self {
            run_dir: c.run_dir,
            layers: c.config.layers(),
            init: c.init,
            out: c.out,
        }
    }
}

/// `cim-run export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportCmd {
    /// A pre-training run directory (its `model.safetensors`, else its newest checkpoint).
    pub run_dir: PathBuf,
    /// The library whose names the state dict carries.
    #[arg(long, value_enum)]
    pub format: Format,
    /// The output `.safetensors`; the mapping goes beside it as `.json`.
    pub out: PathBuf,
}

impl From<ExportCmd> for export::ExportArgs {
    fn from(c: ExportCmd) -> Self {
        Self {
            run_dir: c.run_dir,
            format: c.format,
            out: c.out,
        }
    }
}

/// `cim-run corrupt`.
#[derive(Debug, Clone, clap::Args)]
pub struct CorruptCmd {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Images to corrupt (JPEG or PNG); each becomes one row.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Trained weights: a run directory (its `model.safetensors`, else its newest checkpoint) or a
    /// `.safetensors` file. Without it the generator is freshly initialised.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Corrupted samples per image (columns after the original and the masked input).
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Seed of the mask and the samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output PNG.
    #[arg(long, default_value = "corrupt.png")]
    pub out: PathBuf,
}

impl From<CorruptCmd> for inspect::CorruptArgs {
    fn from(c: CorruptCmd) -> Self {
        Self {
            layers: c.config.layers(),
            images: c.images,
            weights: c.weights,
            samples: c.samples,
            seed: c.seed,
            out: c.out,
        }
    }
}

/// `cim-run bench-data`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchDataCmd {
    /// An ImageFolder (`DIR/<class>/*.jpg|png`).
    pub dir: PathBuf,
    /// Loader threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Batches to time (after one warm-up batch).
    #[arg(long, default_value_t = 8)]
    pub batches: usize,
    /// Side of the generator/enhancer view.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Side of the tokenizer view.
    #[arg(long, default_value_t = 112)]
    pub tokenizer_size: usize,
}

impl From<BenchDataCmd> for inspect::BenchDataArgs {
    fn from(c: BenchDataCmd) -> Self {
        Self {
            dir: c.dir,
            workers: c.workers,
            batch: c.batch,
            batches: c.batches,
            image_size: c.image_size,
            tokenizer_size: c.tokenizer_size,
        }
    }
}

/// `cim-run tokenize`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenizeCmd {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Images (JPEG or PNG), centre-cropped to the tokenizer view (`data.tokenizer_size`).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Also write a PNG with each image's tokenizer view and its reconstruction from the tokens.
    #[arg(long, value_name = "OUT.png")]
    pub decode: Option<PathBuf>,
}

impl From<TokenizeCmd> for inspect::TokenizeArgs {
    fn from(c: TokenizeCmd) -> Self {
        Self {
            layers: c.config.layers(),
            images: c.images,
            decode: c.decode,
        }
    }
}

/// `cim-run tokenizer-train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenizerTrainCmd {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The weights to write (`.safetensors`); a report `.json` and a reconstruction grid `.png`
    /// are written beside it.
    #[arg(long)]
    pub out: PathBuf,
    /// Override `tokenizer_train.steps`.
    #[arg(long)]
    pub steps: Option<usize>,
}

impl From<TokenizerTrainCmd> for tokenizer_train::TokenizerTrainArgs {
    fn from(c: TokenizerTrainCmd) -> Self {
        Self {
            layers: c.config.layers(),
            out: c.out,
            steps: c.steps,
        }
    }
}

/// `cim-run fit-kmeans`.
#[derive(Clone, Debug, clap::Args)]
pub struct FitKmeansCmd {
    /// Dataset kind.
    #[arg(
        long = "data",
        value_name = "KIND",
        value_enum,
        default_value = "cifar10"
    )]
    pub source: DataSource,
    /// The data set's folder.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// CIFAR-10 split.
    #[arg(long, value_enum, default_value = "train")]
    pub split: Split,
    /// Images are resized to this square side first (use the tokenizer view size).
    #[arg(long, default_value_t = 32)]
    pub size: u32,
    /// Side of a square patch.
    #[arg(long, default_value_t = 4)]
    pub patch: usize,
    /// Codebook size (the tokenizer's vocabulary).
    #[arg(long, default_value_t = 512)]
    pub vocab: usize,
    /// Random patches to fit on.
    #[arg(long, default_value_t = 200_000)]
    pub samples: usize,
    /// k-means iterations.
    #[arg(long, default_value_t = 30)]
    pub iters: usize,
    /// Seed of the patch sampling and the initial centroids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output safetensors file (holds `codebook`).
    #[arg(long)]
    pub out: PathBuf,
}

impl From<FitKmeansCmd> for fit::FitKmeans {
    fn from(c: FitKmeansCmd) -> Self {
        Self {
            source: c.source,
            path: c.path,
            split: c.split,
            size: c.size,
            patch: c.patch,
            vocab: c.vocab,
            samples: c.samples,
            iters: c.iters,
            seed: c.seed,
            out: c.out,
        }
    }
}

/// Sets the process-wide backend switches from the `[run]` section of `layers` (see
/// `cim_runner::pipeline::set_backend`), once, before the command builds anything.
fn set_backend(layers: &Layers) -> anyhow::Result<()> {
    cim_runner::pipeline::set_backend(&resolve(layers)?.cfg.run);
    Ok(())
}

fn data(cmd: DataCmd) -> anyhow::Result<()> {
    match cmd {
        DataCmd::Get(c) => {
            let root = cim_runner::data::root(&resolve(&c.config.layers())?.cfg.data);
            let r = datasets::get(&datasets::GetArgs {
                name: c.name,
                root,
                to: c.to,
                url: c.url,
                md5: c.md5,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            })?;
            if r.fetched {
                println!(
                    "{}: {} files in {} (downloaded {} MB{})",
                    r.name,
                    r.files,
                    r.path.display(),
                    r.downloaded / 1_000_000,
                    if r.resumed_from > 0 {
                        format!(
                            ", continuing {} MB fetched before",
                            r.resumed_from / 1_000_000
                        )
                    } else {
                        String::new()
                    }
                );
            } else {
                println!(
                    "{}: already complete in {} ({} files)",
                    r.name,
                    r.path.display(),
                    r.files
                );
            }
            Ok(())
        }
        DataCmd::List(c) => {
            let root = cim_runner::data::root(&resolve(&c.config.layers())?.cfg.data);
            println!(
                "data root: {} (data.root; relative data.path values are also looked for here)",
                root.display()
            );
            for k in datasets::KNOWN {
                let dir = root.join(k.name);
                let state = if datasets::is_complete(&dir) {
                    "present"
                } else {
                    "absent"
                };
                println!(
                    "  {:<15} {:<8} {}\n  {:<15} {:<8} {} ({} MB)",
                    k.name,
                    state,
                    k.about,
                    "",
                    "",
                    k.url,
                    k.size / 1_000_000
                );
            }
            Ok(())
        }
    }
}

fn subcommand(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Data(c) => data(c),
        Command::Sweep(c) => {
            let r = cim_runner::sweep::sweep(&cim_runner::sweep::SweepArgs {
                spec: c.spec,
                out: c.out,
                cells: c.cells,
                dry_run: c.dry_run,
                report_only: c.report,
            })?;
            if !c.dry_run {
                println!(
                    "wrote {dir}/results.csv, {dir}/results.md, {dir}/results.png ({} cells × seeds, {} controls; {} run now in {:.1} min){}",
                    r.rows.len(),
                    r.controls.len(),
                    r.units_run,
                    r.seconds / 60.0,
                    match r.pending {
                        0 => String::new(),
                        n => format!(
                            "; {n} cells × seeds not finished: run the sweep again, or `--report` \
                             once the processes running them end"
                        ),
                    },
                    dir = r.out.display()
                );
            }
            Ok(())
        }
        Command::Plot(c) => {
            let out = c.out.unwrap_or_else(|| c.run_dir.join("loss_curve.png"));
            cim_runner::pictures::loss_curve(&c.run_dir.join("metrics.jsonl"), &out)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::FitKmeans(opts) => fit(opts.into()),
        Command::Bench(args) => {
            let args = bench::BenchArgs::from(args);
            set_backend(&args.layers)?;
            let report = bench::bench(&args)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Corrupt(args) => {
            let args = inspect::CorruptArgs::from(args);
            set_backend(&args.layers)?;
            let frac = inspect::corrupt(&args)?;
            println!(
                "wrote {} ({} images × {} samples); {:.1}% of masked tokens replaced by a different one",
                args.out.display(),
                args.images.len(),
                args.samples,
                100.0 * frac
            );
            Ok(())
        }
        Command::Probe(args) => {
            let args = probe::ProbeArgs::from(args);
            set_backend(&run_layers(&args.run_dir, vec![])?)?;
            let report = probe::probe(&args)?;
            eprint!("\n{}", report.table());
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Finetune(args) => {
            let args = finetune::FinetuneArgs::from(args);
            set_backend(&args.layers)?;
            let summary = finetune::finetune(&args)?;
            eprint!("\n{}", summary.table());
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Export(args) => {
            let args = export::ExportArgs::from(args);
            let r = export::export(&args)?;
            println!(
                "wrote {} ({} tensors, {:?} names for {}) and {}",
                args.out.display(),
                r.tensors.len(),
                r.format,
                r.model,
                export::mapping_path(&args.out).display()
            );
            Ok(())
        }
        Command::Tokenize(args) => {
            let args = inspect::TokenizeArgs::from(args);
            set_backend(&args.layers)?;
            for t in inspect::tokenize(&args)? {
                println!("{}", serde_json::to_string(&t)?);
            }
            Ok(())
        }
        Command::TokenizerTrain(args) => {
            let args = tokenizer_train::TokenizerTrainArgs::from(args);
            set_backend(&args.layers)?;
            let r = tokenizer_train::tokenizer_train(&args)?;
            println!("{}", serde_json::to_string(&r)?);
            eprintln!(
                "wrote {} (and {}, a reconstruction grid .png): held-out PSNR {:.2} dB, perplexity {:.1} of {} codes ({} used)",
                r.weights,
                tokenizer_train::report_path(&args.out).display(),
                r.psnr_db,
                r.perplexity,
                r.vocab_size,
                r.codes_used
            );
            Ok(())
        }
        Command::BenchData(args) => {
            let report = inspect::bench_data(&args.into())?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

fn fit(opts: fit::FitKmeans) -> anyhow::Result<()> {
    let hist = fit::fit_kmeans(&opts)?;
    println!(
        "fitted {} centroids of {p}×{p} patches on {} samples; mean squared error per patch {:.5} → {:.5} over {} iterations; wrote {}",
        opts.vocab,
        opts.samples,
        hist.first().copied().unwrap_or(f64::NAN),
        hist.last().copied().unwrap_or(f64::NAN),
        hist.len(),
        opts.out.display(),
        p = opts.patch,
    );
    Ok(())
}

fn list() -> anyhow::Result<String> {
    let mut s = String::new();
    let mut kind = |k: &str, rows: Vec<(&str, &str)>| {
        s.push_str(&format!("{k}:\n"));
        for (n, a) in rows {
            s.push_str(&format!("  {n:<14} {a}\n"));
        }
    };
    kind("tokenizer", registry::about::<dyn Tokenizer>()?);
    kind("masking", registry::about::<dyn Masking>()?);
    kind("generator", registry::about::<dyn Generator>()?);
    kind("sampler", registry::about::<dyn Sampler>()?);
    kind("corruption", registry::about::<dyn Corruption>()?);
    kind("enhancer", registry::about::<dyn Enhancer>()?);
    kind("objective", registry::about::<dyn Objective>()?);
    use cim_runner::config::{preset_kind, PresetKind};
    for (kind, title) in [
        (PresetKind::Pretrain, "pre-training presets"),
        (PresetKind::Finetune, "fine-tuning presets"),
        (PresetKind::Probe, "probe presets (labelled data)"),
        (PresetKind::TokenizerTrain, "tokenizer-training presets"),
    ] {
        let names: Vec<&str> = preset_names()
            .into_iter()
            .filter(|n| preset_kind(n) == Some(kind))
            .collect();
        s.push_str(&format!(
            "{title} ({}):\n  {}\n",
            kind.usage(),
            names.join(", ")
        ));
    }
    Ok(s)
}

/// Runs the CLI on `args` (the first item is the program name).
pub fn run(args: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(args).map_err(|e| {
        if e.use_stderr() {
            // clap's message starts with its own "error: "; `main` prints one.
            let msg = e.to_string();
            anyhow::anyhow!("{}", msg.strip_prefix("error: ").unwrap_or(&msg).trim_end())
        } else {
            // --help / --version: print and succeed.
            print!("{e}");
            anyhow::anyhow!(HelpShown)
        }
    });
    let cli = match cli {
        Ok(c) => c,
        Err(e) if e.is::<HelpShown>() => return Ok(()),
        Err(e) => return Err(e),
    };
    if let Some(cmd) = cli.command {
        // Only pre-training is data-parallel; several copies of a subcommand would write the
        // same files.
        let launch = cim_dist::Launch::from_env()?;
        if launch.world > 1 {
            anyhow::bail!(
                "{}: subcommands run in one process; start it without torchrun, mpirun or srun \
                 (only pre-training, `cim-run --preset …`, spreads over several)",
                launch.describe()
            );
        }
        return subcommand(cmd);
    }
    if cli.list {
        print!("{}", list()?);
        return Ok(());
    }
    // One process of a data-parallel job when torchrun, mpirun or srun started it.
    let launch = cim_dist::Launch::from_env()?;
    let mut trainer = match &cli.resume {
        Some(dir) => {
            let mut set = cli.cfg.set.clone();
            if let Some(n) = cli.steps {
                set.push(format!("run.max_steps={n}"));
            }
            set_backend(&run_layers(dir, set.clone())?)?;
            Trainer::resume_launched(dir.clone(), set, launch)?
        }
        None => {
            let mut layers = cli.cfg.layers();
            let preset = layers.preset.clone();
            if let Some(name) = preset.as_ref().filter(|_| !cli.print_config) {
                use cim_runner::config::{preset_kind, PresetKind};
                match preset_kind(name) {
                    Some(PresetKind::Pretrain) | None => {}
                    Some(kind) => anyhow::bail!(
                        "--preset {name} is not a pre-training preset: run it as `{}` (`cim-run --list` shows the presets by kind)",
                        kind.usage().replace("NAME", name)
                    ),
                }
            }
            if let Some(n) = cli.steps {
                layers.set.push(format!("run.max_steps={n}"));
            }
            let resolved = resolve(&layers)?;
            if cli.print_config {
                let (accum, micro) = resolved.cfg.train.split(launch.world)?;
                print!(
                    "# this process: {}; each rank accumulates {accum} micro-batch(es) of {micro} images\n{}",
                    launch.describe(),
                    resolved.to_toml()?
                );
                return Ok(());
            }
            cim_runner::pipeline::set_backend(&resolved.cfg.run);
            let run_dir = match &cli.out {
                Some(d) => d.clone(),
                None => RunDir::default_path(
                    &resolved.cfg.run.out_root,
                    preset.as_deref().unwrap_or("run"),
                ),
            };
            Trainer::launched(resolved, run_dir, launch)?
        }
    };
    let summary = match trainer.run(None) {
        // A divergence is seen by every rank at the same step; any other error may be this
        // rank's alone, and the others would wait for it: it ends the job.
        Err(e) if !matches!(e, cim_api::Error::Diverged { .. }) => {
            trainer.dist().or_end_job(Err(e))
        }
        r => r,
    }?;
    if !trainer.dist().is_leader() {
        return Ok(()); // rank 0 reports
    }
    if summary.steps == 0 {
        println!(
            "nothing to do: {} is at step {}, where it ends; --steps N with N > {} trains it further",
            summary.run_dir.display(),
            summary.final_step,
            summary.final_step
        );
        return Ok(());
    }
    let obj = format!("loss_{}", trainer.cim.names["objective"]);
    let n = (summary.steps / 10).max(1);
    println!(
        "done: {} steps (now at step {}) in {:.1}s; loss_mim {:.4} → {:.4}, {obj} {:.4} → {:.4} (means of first/last {n} steps)\n\
         wrote {dir}/config.toml, {dir}/metrics.jsonl, {dir}/checkpoints/, {dir}/model.safetensors, {dir}/samples.png, {dir}/loss_curve.png",
        summary.steps,
        summary.final_step,
        summary.seconds,
        summary.mean("loss_mim", true, n),
        summary.mean("loss_mim", false, n),
        summary.mean(&obj, true, n),
        summary.mean(&obj, false, n),
        dir = summary.run_dir.display()
    );
    if !summary.skipped.is_empty() {
        println!("skipped {} unreadable files:", summary.skipped.len());
        for p in &summary.skipped {
            println!("  {p}");
        }
    }
    Ok(())
}

#[derive(Debug)]
struct HelpShown;
impl std::fmt::Display for HelpShown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("help shown")
    }
}
impl std::error::Error for HelpShown {}

/// Entry point of `cim-run` and of custom runners that link more plugins: the process set-up
/// (CPU threads, the allocator's purge setting, logging), then the command on a worker of rayon's
/// pool. Call it first thing in `main`.
pub fn main() -> ExitCode {
    // Processes sharing a node (a data-parallel job) share its cores. (A malformed launcher
    // variable is reported by the command; here it counts as a job of one.)
    let launch = cim_dist::Launch::from_env().unwrap_or_else(|_| cim_dist::Launch::single());
    if launch.local_world > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var(
            "RAYON_NUM_THREADS",
            (cores / launch.local_world).max(1).to_string(),
        );
    }
    cim_ops::threads::settle_cpu_threads();
    crate::keep_freed_memory();
    // Ranks other than 0 of a job log warnings and errors only; rank 0 tells the progress.
    let default = if launch.rank == 0 { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
    // The command runs on one of rayon's workers: its parallel kernels then split in place rather
    // than wait for the pool (cim_ops::threads' module doc).
    let args: Vec<String> = std::env::args().collect();
    match cim_ops::threads::on_pool(|| run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand and every option says what it is for in `--help`.
    #[test]
    fn every_command_and_option_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg
                    .get_help()
                    .is_none_or(|h| h.to_string().trim().is_empty())
                {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing);
            }
        }
        let mut missing = vec![];
        walk(
            &<Cli as clap::CommandFactory>::command(),
            "cim-run",
            &mut missing,
        );
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
