//! The command line: `cim-run --preset NAME [--config FILE]… [--set KEY=VALUE]… [--steps N] [--out DIR]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use cim_api::registry;
use cim_api::{Enhancer, Generator, Masking, Objective, Sampler, Tokenizer};

use crate::config::{preset_names, resolve, Layers};
use crate::train::Trainer;

#[derive(Debug, Parser)]
#[command(
    name = "cim-run",
    version,
    about = "Corrupted Image Modeling (CiM) pre-training",
    after_help = "Configuration precedence, lowest first: built-in defaults → configs/base.toml → --preset → \
                  --config FILE(s) → CIM_* environment variables (CIM_TRAIN__LR=1e-3) → --set KEY=VALUE.\n\
                  Without --preset or --config, the `quickstart` preset runs."
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
        let preset = match (&self.preset, self.config.is_empty()) {
            (None, true) => Some("quickstart".to_string()),
            (p, _) => p.clone(),
        };
        Layers {
            preset,
            config_files: self.config.clone(),
            set: self.set.clone(),
            env: true,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Fit a `patch_kmeans` tokenizer codebook (k-means on random image patches).
    FitKmeans(crate::fit::FitKmeans),
    /// Time one training step phase by phase; prints one JSON line (the reference's fields).
    Bench(crate::bench::BenchArgs),
    /// Figure-2-style grids for given images: original, masked input, several sampled corruptions.
    Corrupt(crate::inspect::CorruptArgs),
    /// Data-loader throughput on an ImageFolder (decode and augmentation time per image).
    BenchData(crate::inspect::BenchDataArgs),
    /// Linear-probe and k-NN accuracy of a run's frozen enhancer on labelled data.
    Probe(crate::probe::ProbeArgs),
    /// Fine-tune a run's enhancer end to end on labelled data (`--init scratch`: the control).
    Finetune(crate::finetune::FinetuneArgs),
    /// Write a run's enhancer with timm's or torchvision's names (+ a JSON mapping).
    Export(crate::export::ExportArgs),
    /// Print each image's token grid as JSON (`--decode OUT.png`: view and reconstruction).
    Tokenize(crate::inspect::TokenizeArgs),
    /// Train the `vq` tokenizer on the images of the data table; prints PSNR and codebook perplexity on held-out images.
    TokenizerTrain(crate::tokenizer_train::TokenizerTrainArgs),
}

fn subcommand(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::FitKmeans(opts) => fit(opts),
        Command::Bench(args) => {
            let report = crate::bench::bench(&args)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Corrupt(args) => {
            let frac = crate::inspect::corrupt(&args)?;
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
            let report = crate::probe::probe(&args)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Finetune(args) => {
            let summary = crate::finetune::finetune(&args)?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Export(args) => {
            let r = crate::export::export(&args)?;
            println!(
                "wrote {} ({} tensors, {:?} names for {}) and {}",
                args.out.display(),
                r.tensors.len(),
                r.format,
                r.model,
                crate::export::mapping_path(&args.out).display()
            );
            Ok(())
        }
        Command::Tokenize(args) => {
            for t in crate::inspect::tokenize(&args)? {
                println!("{}", serde_json::to_string(&t)?);
            }
            Ok(())
        }
        Command::TokenizerTrain(args) => {
            let r = crate::tokenizer_train::tokenizer_train(&args)?;
            println!("{}", serde_json::to_string(&r)?);
            eprintln!(
                "wrote {} (and {}, a reconstruction grid .png): held-out PSNR {:.2} dB, perplexity {:.1} of {} codes ({} used)",
                r.weights,
                crate::tokenizer_train::report_path(&args.out).display(),
                r.psnr_db,
                r.perplexity,
                r.vocab_size,
                r.codes_used
            );
            Ok(())
        }
        Command::BenchData(args) => {
            let report = crate::inspect::bench_data(&args)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

fn fit(opts: crate::fit::FitKmeans) -> anyhow::Result<()> {
    let hist = crate::fit::fit_kmeans(&opts)?;
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
    kind("enhancer", registry::about::<dyn Enhancer>()?);
    kind("objective", registry::about::<dyn Objective>()?);
    s.push_str(&format!("presets:\n  {}\n", preset_names().join(", ")));
    Ok(s)
}

/// Runs the CLI on `args` (the first item is the program name).
pub fn run(args: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(args).map_err(|e| {
        if e.use_stderr() {
            anyhow::anyhow!("{e}")
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
        return subcommand(cmd);
    }
    if cli.list {
        print!("{}", list()?);
        return Ok(());
    }
    let mut trainer = match &cli.resume {
        Some(dir) => {
            let mut set = cli.cfg.set.clone();
            if let Some(n) = cli.steps {
                set.push(format!("run.max_steps={n}"));
            }
            Trainer::resume(dir.clone(), set)?
        }
        None => {
            let mut layers = cli.cfg.layers();
            let preset = layers.preset.clone();
            if let Some(n) = cli.steps {
                layers.set.push(format!("run.max_steps={n}"));
            }
            let resolved = resolve(&layers)?;
            if cli.print_config {
                print!("{}", resolved.to_toml()?);
                return Ok(());
            }
            let run_dir = match &cli.out {
                Some(d) => d.clone(),
                None => {
                    let secs = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    resolved
                        .cfg
                        .run
                        .out_root
                        .join(format!("{}-{secs}", preset.as_deref().unwrap_or("run")))
                }
            };
            Trainer::new(resolved, run_dir)?
        }
    };
    let summary = trainer.run(None)?;
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

/// Entry point of `cim-run` and of custom runners that link more plugins.
pub fn main() -> ExitCode {
    crate::settle_cpu_threads();
    crate::keep_freed_memory();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
