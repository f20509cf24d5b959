//! `cim-run sweep SPEC.toml`: a grid of pre-training runs (cells: a preset plus `--set`
//! overrides, each repeated over seeds), each evaluated by a linear probe and k-NN (optionally a
//! short fine-tune), beside the random-initialisation control of every distinct enhancer.
//!
//! Every unit of work leaves its result in its own folder, so a sweep resumes where it stopped:
//! a finished cell is skipped, an interrupted one continues from its newest checkpoint. A cell's
//! folder is named by a hash of its resolved configuration (seed included), so identical cells of
//! different specs that share a cells folder run once. A cell whose training diverges is recorded
//! ("diverged at step N") and the sweep goes on.
//!
//! Outputs in the sweep's folder: `results.csv` (one row per cell × seed, and the controls),
//! `results.md` (mean ± std over seeds per cell, the control row and each cell's difference to
//! it) and `results.png` (one bar per cell with its spread).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use cim_api::{Error, Result};

use crate::checkpoint::write_atomic;
use crate::config::{resolve, Layers, Resolved};
use crate::probe::{Init, Pooling, ProbeArgs};
use crate::rundir::PidLock;
use crate::train::Trainer;

/// A sweep spec (TOML). Unknown keys are errors.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Folder name of the sweep's results (`runs/sweeps/<name>`).
    pub name: String,
    /// The heading of `results.md`.
    #[serde(default)]
    pub title: String,
    /// What the paper reports, quoted under the heading.
    #[serde(default)]
    pub paper: String,
    /// The base preset of every cell.
    pub preset: String,
    /// Overrides for every cell, before the cell's own (`KEY=VALUE`, as `--set`).
    #[serde(default)]
    pub set: Vec<String>,
    /// Each cell runs once per seed (`run.seed`).
    pub seeds: Vec<u64>,
    /// Probe a randomly initialised copy of each distinct enhancer (the control row).
    #[serde(default = "yes")]
    pub control: bool,
    #[serde(default)]
    pub probe: ProbeSpec,
    /// A short fine-tune of every cell (and of the control) after the probe.
    #[serde(default)]
    pub finetune: Option<FinetuneSpec>,
    #[serde(rename = "cell")]
    pub cells: Vec<CellSpec>,
}

fn yes() -> bool {
    true
}

/// How cells are probed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSpec {
    /// The labelled data (a probe preset).
    pub preset: String,
    pub set: Vec<String>,
    /// Training / test images used (seeded subsets; 0 = all).
    pub train_limit: usize,
    pub test_limit: usize,
    pub k: usize,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        Self {
            preset: "probe_cifar10".into(),
            set: vec![],
            train_limit: 0,
            test_limit: 0,
            k: 20,
        }
    }
}

/// A fine-tuning preset and its overrides.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    pub preset: String,
    #[serde(default)]
    pub set: Vec<String>,
}

/// One cell: a name, overrides, and optionally the paper's figure for it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellSpec {
    pub name: String,
    #[serde(default)]
    pub set: Vec<String>,
    #[serde(default)]
    pub paper: String,
}

impl Spec {
    /// Reads a spec; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let spec: Spec = toml::from_str(&text).map_err(|e| Error::Data {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let bad = |m: &str| Error::Data {
            path: path.display().to_string(),
            message: m.into(),
        };
        if spec.cells.is_empty() {
            return Err(bad("no [[cell]] tables"));
        }
        if spec.seeds.is_empty() {
            return Err(bad("`seeds` is empty"));
        }
        let mut names: Vec<&str> = spec.cells.iter().map(|c| c.name.as_str()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(&format!("two cells are named `{}`", w[0])));
        }
        Ok(spec)
    }
}

/// Options of `cim-run sweep`.
#[derive(Clone, Debug)]
pub struct SweepArgs {
    pub spec: PathBuf,
    /// The sweep's results folder (default `runs/sweeps/<name>`).
    pub out: Option<PathBuf>,
    /// Where cells live (default `runs/sweeps/cells`, shared by every spec).
    pub cells: Option<PathBuf>,
    /// List the units and whether each is done, run nothing.
    pub dry_run: bool,
    /// Write the results of the finished units and run nothing.
    pub report_only: bool,
}

/// One cell × seed, resolved.
struct Unit {
    cell: usize,
    seed: u64,
    resolved: Resolved,
    dir: PathBuf,
    control: PathBuf,
}

/// What one pre-training cell (or a control) gave; `<dir>/result.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CellResult {
    /// `ok` or `diverged`.
    pub status: String,
    /// Steps trained (the step it diverged at, for a divergent cell).
    pub steps: usize,
    pub message: String,
    /// Means of the last tenth of the steps.
    pub loss_mim: f64,
    pub loss_objective: f64,
    pub linear_top1: f64,
    pub linear_top5: f64,
    pub knn_top1: f64,
    pub knn_top5: f64,
    /// Best top-1 of the fine-tune, when the spec asks for one. A cell's fine-tunes live in
    /// folders of their own (`finetune-<init>-<hash of the fine-tuning config>`), so the rows of
    /// specs that fine-tune one shared cell differently each get their own.
    #[serde(default)]
    pub finetune_top1: Option<f64>,
    /// Seconds of pre-training and evaluation together (`train_s + eval_s`).
    pub wall_s: f64,
    /// Seconds of the training steps, from `metrics.jsonl` (so a resumed cell counts them all).
    #[serde(default)]
    pub train_s: f64,
    /// Seconds of the probe (and fine-tune).
    #[serde(default)]
    pub eval_s: f64,
}

/// A row of `results.csv`.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub sweep: String,
    pub cell: String,
    pub seed: u64,
    pub dir: String,
    #[serde(flatten)]
    pub result: CellResult,
}

/// The rows of a finished sweep and where its files went.
#[derive(Clone, Debug)]
pub struct SweepReport {
    pub out: PathBuf,
    pub rows: Vec<Row>,
    pub controls: Vec<Row>,
    pub units_run: usize,
    /// Cell × seed runs not done yet (0 when the sweep is complete).
    pub pending: usize,
    pub seconds: f64,
}

/// 64-bit FNV-1a: a stable name for a resolved configuration.
fn fnv(text: &str) -> String {
    format!("{:016x}", cim_api::params::fnv1a(text))
}

/// A preset with overrides, under the user's `CIM_*` environment as every command is (so
/// `CIM_DATA__ROOT` says where the data sets are).
fn layers(preset: &str, sets: &[&[String]]) -> Layers {
    Layers::from_flags(
        Some(preset.to_string()),
        vec![],
        sets.iter().flat_map(|s| s.iter().cloned()).collect(),
    )
}

/// The name of a cell: a hash of its resolved configuration without `data.root` and `[dist]`
/// (where the data set lies, and how processes would talk, do not change the experiment).
fn cell_key(resolved: &Resolved) -> Result<String> {
    let mut t: toml::Table = toml::from_str(&resolved.to_toml()?)
        .map_err(|e| Error::msg(format!("a resolved configuration does not parse: {e}")))?;
    if let Some(data) = t.get_mut("data").and_then(|d| d.as_table_mut()) {
        data.remove("root");
    }
    t.remove("dist");
    Ok(fnv(&t.to_string()))
}

/// The name of a fine-tuning configuration: a hash of its `[finetune]` and `[data]` (without
/// `data.root`); the network and its seed come from the run it fine-tunes.
fn finetune_key(resolved: &Resolved) -> Result<String> {
    #[derive(Serialize)]
    struct Key<'a> {
        data: crate::config::DataConfig,
        finetune: &'a crate::config::FinetuneConfig,
    }
    let key = Key {
        data: crate::config::DataConfig {
            root: None,
            ..resolved.cfg.data.clone()
        },
        finetune: &resolved.cfg.finetune,
    };
    let text =
        toml::to_string(&key).map_err(|e| Error::msg(format!("cannot write config: {e}")))?;
    Ok(fnv(&text))
}

/// Resolves every cell × seed before anything runs, so a spec error stops the sweep at once.
fn plan<'a>(
    spec: &'a Spec,
    spec_path: &Path,
    cells_root: &Path,
) -> Result<(Vec<Unit>, Option<Finetune<'a>>)> {
    let named =
        |e: Error, what: &str| Error::Config(format!("{} ({what}): {e}", spec_path.display()));
    resolve(&layers(&spec.probe.preset, &[&spec.probe.set])).map_err(|e| named(e, "[probe]"))?;
    let finetune = match &spec.finetune {
        None => None,
        Some(ft) => {
            let resolved =
                resolve(&layers(&ft.preset, &[&ft.set])).map_err(|e| named(e, "[finetune]"))?;
            Some(Finetune {
                spec: ft,
                key: finetune_key(&resolved)?,
            })
        }
    };
    let mut units = vec![];
    for (ci, cell) in spec.cells.iter().enumerate() {
        for &seed in &spec.seeds {
            let seed_set = vec![format!("run.seed={seed}")];
            let resolved = resolve(&layers(&spec.preset, &[&spec.set, &cell.set, &seed_set]))
                .map_err(|e| named(e, &format!("cell `{}`", cell.name)))?;
            let dir = cells_root.join(cell_key(&resolved)?);
            // The control: the same enhancer (and data), freshly initialised with the same seed.
            let data = crate::config::DataConfig {
                root: None,
                ..resolved.cfg.data.clone()
            };
            let enh = format!(
                "{}\n{:?}\n{}",
                toml::to_string(&resolved.components["enhancer"].1).unwrap_or_default(),
                resolved.components["enhancer"].0,
                toml::to_string(&data).unwrap_or_default()
            );
            let control = cells_root.join(format!("control-{}-seed{seed}", fnv(&enh)));
            units.push(Unit {
                cell: ci,
                seed,
                resolved,
                dir,
                control,
            });
        }
    }
    Ok((units, finetune))
}

fn read_result(dir: &Path) -> Option<CellResult> {
    let text = std::fs::read_to_string(dir.join("result.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_result(dir: &Path, r: &CellResult) -> Result<()> {
    let text = serde_json::to_string_pretty(r).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(&dir.join("result.json"), text.as_bytes())
}

/// From a run's `metrics.jsonl`: the means of the last tenth of its `loss_mim` and
/// `loss_<objective>`, and the seconds its steps took (`batch / images_per_s` summed).
fn from_metrics(dir: &Path, objective: &str, batch: usize) -> (f64, f64, f64) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
    let recs: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let train_s = recs
        .iter()
        .filter_map(|r| r["images_per_s"].as_f64())
        .filter(|&ips| ips > 0.0)
        .map(|ips| batch as f64 / ips)
        .sum();
    let n = (recs.len() / 10).max(1).min(recs.len());
    let tail = &recs[recs.len() - n..];
    let mean = |k: &str| {
        let v: Vec<f64> = tail.iter().filter_map(|r| r[k].as_f64()).collect();
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    (
        mean("loss_mim"),
        mean(&format!("loss_{objective}")),
        train_s,
    )
}

fn probe_args(spec: &Spec, run_dir: &Path, init: Init) -> ProbeArgs {
    ProbeArgs {
        run_dir: run_dir.to_path_buf(),
        data: crate::config::DataSource::Cifar10,
        path: None,
        layers: layers(&spec.probe.preset, &[&spec.probe.set]),
        feature: Pooling::Mean,
        init,
        train_limit: spec.probe.train_limit,
        test_limit: spec.probe.test_limit,
        k: spec.probe.k,
        temperature: 0.07,
        batch: 256,
    }
}

fn probe(spec: &Spec, run_dir: &Path, init: Init, r: &mut CellResult) -> Result<()> {
    let p = crate::probe::probe(&probe_args(spec, run_dir, init))?;
    r.linear_top1 = p.linear.top1;
    r.linear_top5 = p.linear.top5;
    r.knn_top1 = p.knn.top1;
    r.knn_top5 = p.knn.top5;
    Ok(())
}

/// The spec's `[finetune]`, when it has one, and the name of its resolved configuration.
struct Finetune<'a> {
    spec: &'a FinetuneSpec,
    key: String,
}

impl Finetune<'_> {
    /// Where the fine-tune of `run_dir` (a cell or a control) under this configuration lives.
    fn dir(&self, run_dir: &Path, init: Init) -> PathBuf {
        run_dir.join(format!("finetune-{init:?}-{}", self.key).to_lowercase())
    }

    /// The best top-1 of a finished fine-tune of `run_dir`.
    fn result(&self, run_dir: &Path, init: Init) -> Option<f64> {
        let text = std::fs::read_to_string(self.dir(run_dir, init).join("result.json")).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?["best_top1"].as_f64()
    }

    /// Fine-tunes `run_dir`'s enhancer (an interrupted fine-tune starts again) and records it.
    fn run(&self, run_dir: &Path, init: Init) -> Result<f64> {
        let out = self.dir(run_dir, init);
        if out.exists() {
            std::fs::remove_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        }
        let s = crate::finetune::finetune(&crate::finetune::FinetuneArgs {
            run_dir: run_dir.to_path_buf(),
            layers: layers(&self.spec.preset, &[&self.spec.set]),
            init,
            out: Some(out.clone()),
        })?;
        let text = serde_json::to_string_pretty(&s).map_err(|e| Error::msg(e.to_string()))?;
        write_atomic(&out.join("result.json"), text.as_bytes())?;
        Ok(s.best_top1)
    }
}

/// The result of a finished cell or control — probed, and fine-tuned when the spec asks for it
/// (a diverged cell is finished as it is) — with the fine-tune's score; `None` while work is left.
fn recorded(run_dir: &Path, init: Init, ft: Option<&Finetune>) -> Option<CellResult> {
    let mut r = read_result(run_dir)?;
    if let (Some(f), "ok") = (ft, r.status.as_str()) {
        r.finetune_top1 = Some(f.result(run_dir, init)?);
    } else {
        r.finetune_top1 = None;
    }
    Some(r)
}

/// Whether a cell or control is finished (see [`recorded`]).
fn is_done(run_dir: &Path, init: Init, ft: Option<&Finetune>) -> bool {
    recorded(run_dir, init, ft).is_some()
}

/// Pre-trains (or resumes) and evaluates one cell; a divergence is a result.
fn run_cell(spec: &Spec, u: &Unit) -> Result<CellResult> {
    let objective = u.resolved.components["objective"].0.clone();
    let batch = u.resolved.cfg.train.batch_size;
    let finished = u.dir.join("model.safetensors").is_file();
    let mut r = CellResult {
        status: "ok".into(),
        ..CellResult::default()
    };
    if !finished {
        let resumable = crate::checkpoint::list_checkpoints(&u.dir)
            .map(|c| !c.is_empty())
            .unwrap_or(false);
        let trainer = if resumable {
            tracing::info!("resuming {}", u.dir.display());
            Trainer::resume(u.dir.clone(), vec![])
        } else {
            if u.dir.exists() {
                // Stopped before its first checkpoint: nothing to continue from.
                std::fs::remove_dir_all(&u.dir).map_err(|e| Error::io(&u.dir, e))?;
            }
            Trainer::new(u.resolved.clone(), u.dir.clone())
        };
        match trainer.and_then(|mut t| t.run(None)) {
            Ok(_) => {}
            Err(Error::Diverged { step, message }) => {
                r.status = "diverged".into();
                r.steps = step;
                r.message = message;
                (r.loss_mim, r.loss_objective, r.train_s) = from_metrics(&u.dir, &objective, batch);
                r.wall_s = r.train_s;
                std::fs::create_dir_all(&u.dir).map_err(|e| Error::io(&u.dir, e))?;
                write_result(&u.dir, &r)?;
                return Ok(r);
            }
            Err(e) => return Err(e),
        }
    }
    r.steps = crate::checkpoint::load_latest(&u.dir)
        .map(|l| l.state.step)
        .unwrap_or(0);
    (r.loss_mim, r.loss_objective, r.train_s) = from_metrics(&u.dir, &objective, batch);
    let start = Instant::now();
    probe(spec, &u.dir, Init::Pretrained, &mut r)?;
    r.eval_s = start.elapsed().as_secs_f64();
    r.wall_s = r.train_s + r.eval_s;
    write_result(&u.dir, &r)?;
    Ok(r)
}

/// The control of a unit: its enhancer freshly initialised, probed the same way.
fn run_control(spec: &Spec, u: &Unit) -> Result<CellResult> {
    let start = Instant::now();
    std::fs::create_dir_all(&u.control).map_err(|e| Error::io(&u.control, e))?;
    write_atomic(
        &u.control.join("config.toml"),
        u.resolved.to_toml()?.as_bytes(),
    )?;
    let mut r = CellResult {
        status: "ok".into(),
        ..CellResult::default()
    };
    probe(spec, &u.control, Init::Scratch, &mut r)?;
    r.eval_s = start.elapsed().as_secs_f64();
    r.wall_s = r.eval_s;
    write_result(&u.control, &r)?;
    Ok(r)
}

/// Runs (or resumes) a sweep and writes its results.
pub fn sweep(args: &SweepArgs) -> Result<SweepReport> {
    let start = Instant::now();
    let spec = Spec::load(&args.spec)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/sweeps").join(&spec.name));
    let cells_root = args
        .cells
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/sweeps/cells"));
    let (units, finetune) = plan(&spec, &args.spec, &cells_root)?;
    let ft = finetune.as_ref();
    let cell_done = |u: &Unit| is_done(&u.dir, Init::Pretrained, ft);
    let control_done = |u: &Unit| is_done(&u.control, Init::Scratch, ft);
    // The work: every unit, then each distinct control once.
    let mut controls: Vec<usize> = vec![];
    for (i, u) in units.iter().enumerate() {
        if spec.control && !controls.iter().any(|&j| units[j].control == u.control) {
            controls.push(i);
        }
    }
    let total = units.len() + controls.len();
    let done_before = units.iter().filter(|u| cell_done(u)).count()
        + controls
            .iter()
            .filter(|&&i| control_done(&units[i]))
            .count();
    if args.dry_run {
        for u in &units {
            println!(
                "{:<24} seed {:<4} {} {}",
                spec.cells[u.cell].name,
                u.seed,
                if cell_done(u) { "done   " } else { "to run " },
                u.dir.display()
            );
        }
        for &i in &controls {
            let u = &units[i];
            println!(
                "{:<24} seed {:<4} {} {}",
                "control",
                u.seed,
                if control_done(u) {
                    "done   "
                } else {
                    "to run "
                },
                u.control.display()
            );
        }
        return Ok(SweepReport {
            out,
            rows: vec![],
            controls: vec![],
            units_run: 0,
            pending: units.len(),
            seconds: 0.0,
        });
    }
    for dir in [&out, &cells_root] {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut progress = Progress {
        name: spec.name.clone(),
        total,
        done: done_before,
        left: [
            units.iter().filter(|u| !cell_done(u)).count(),
            controls
                .iter()
                .filter(|&&i| !control_done(&units[i]))
                .count(),
        ],
        secs: [0.0; 2],
        ran: [0; 2],
    };
    // The controls first: they are short, and every cell's difference needs one. Where cells
    // differ in their enhancer's shape (one control each), a control's name lists its cells.
    let control_key = |u: &Unit| {
        u.control
            .display()
            .to_string()
            .rsplit_once("-seed")
            .map(|(k, _)| k.to_string())
    };
    let mut keys: Vec<Option<String>> = units.iter().map(control_key).collect();
    keys.sort();
    keys.dedup();
    let several = keys.len() > 1;
    let mut numbered: Vec<Option<String>> = vec![];
    let mut control_rows = vec![];
    for &i in &controls {
        let u = &units[i];
        if !numbered.contains(&control_key(u)) {
            numbered.push(control_key(u));
        }
        let number = 1 + numbered
            .iter()
            .position(|k| *k == control_key(u))
            .expect("just added");
        let mut of: Vec<&str> = vec![];
        for v in units.iter().filter(|v| control_key(v) == control_key(u)) {
            let name = spec.cells[v.cell].name.as_str();
            if !of.contains(&name) {
                of.push(name);
            }
        }
        let label = format!("control seed {}", u.seed);
        let Some((result, _)) =
            progress.unit(CONTROL, &label, &u.control, ft, args.report_only, || {
                run_control(&spec, u)
            })?
        else {
            continue;
        };
        control_rows.push(Row {
            sweep: spec.name.clone(),
            cell: match several {
                false => format!(
                    "control ({} at random init)",
                    u.resolved.components["enhancer"].0
                ),
                true => format!(
                    "control {number} ({} at random init) of {}",
                    u.resolved.components["enhancer"].0,
                    of.join("; ")
                ),
            },
            seed: u.seed,
            dir: u.control.display().to_string(),
            result,
        });
    }
    let mut report = SweepReport {
        out: out.clone(),
        rows: vec![],
        controls: control_rows,
        units_run: 0,
        pending: units.len(),
        seconds: 0.0,
    };
    for u in &units {
        let cell = &spec.cells[u.cell].name;
        let label = format!("cell `{cell}` seed {}", u.seed);
        let Some((result, fresh)) =
            progress.unit(CELL, &label, &u.dir, ft, args.report_only, || {
                run_cell(&spec, u)
            })?
        else {
            continue;
        };
        report.rows.push(Row {
            sweep: spec.name.clone(),
            cell: cell.clone(),
            seed: u.seed,
            dir: u.dir.display().to_string(),
            result,
        });
        report.pending -= 1;
        if fresh && report.pending > 0 {
            // The results so far, so a long sweep can be read while it runs.
            write_results(&spec, &args.spec, &report, &units)?;
        }
    }
    report.units_run = progress.ran.iter().sum();
    report.seconds = start.elapsed().as_secs_f64();
    write_results(&spec, &args.spec, &report, &units)?;
    Ok(report)
}

/// A unit's scores for the log.
fn scores(r: &CellResult) -> String {
    if r.status != "ok" {
        return format!("diverged at step {}", r.steps);
    }
    let mut s = format!(
        "linear {:.2} %, k-NN {:.2} %",
        100.0 * r.linear_top1,
        100.0 * r.knn_top1
    );
    if let Some(top1) = r.finetune_top1 {
        s.push_str(&format!(", fine-tune {:.2} %", 100.0 * top1));
    }
    s
}

const CELL: usize = 0;
const CONTROL: usize = 1;

/// The log's progress lines: units done of all, and the time left estimated per kind of unit
/// (a control is a probe, a cell a whole pre-training), once one of each kind has run.
struct Progress {
    name: String,
    total: usize,
    done: usize,
    /// Cells and controls still to run.
    left: [usize; 2],
    secs: [f64; 2],
    ran: [usize; 2],
}

impl Progress {
    fn eta(&self) -> String {
        let mut left = 0.0;
        for k in [CELL, CONTROL] {
            if self.left[k] > 0 {
                if self.ran[k] == 0 {
                    return String::new();
                }
                left += self.left[k] as f64 * self.secs[k] / self.ran[k] as f64;
            }
        }
        format!(", about {} left", crate::train::clock(left))
    }

    fn starts(&self, label: &str) {
        tracing::info!(
            "sweep {}: {}/{} done{}; {label}",
            self.name,
            self.done,
            self.total,
            self.eta()
        );
    }

    /// A cell's (`CELL`) or control's (`CONTROL`) result, read back or computed now, and whether
    /// it was computed now; `None` when it is not done and only a report is asked for. A probed
    /// unit whose fine-tune is missing is only fine-tuned.
    fn unit(
        &mut self,
        kind: usize,
        label: &str,
        run_dir: &Path,
        ft: Option<&Finetune>,
        report_only: bool,
        compute: impl FnOnce() -> Result<CellResult>,
    ) -> Result<Option<(CellResult, bool)>> {
        let init = [Init::Pretrained, Init::Scratch][kind];
        if let Some(r) = recorded(run_dir, init, ft) {
            return Ok(Some((r, false)));
        }
        if report_only {
            return Ok(None);
        }
        // One process per unit: a sweep sharing this folder (the same spec, or another with
        // identical cells) that holds it keeps it, and this one goes on to the next unit.
        let lock_path = run_dir.with_file_name(format!(
            "{}.lock",
            run_dir.file_name().unwrap_or_default().to_string_lossy()
        ));
        let _lock = match PidLock::take(&lock_path)? {
            Ok(lock) => lock,
            Err(holder) => {
                tracing::info!(
                    "sweep {}: {label} is being run by {holder} ({}); left to it",
                    self.name,
                    lock_path.display()
                );
                self.left[kind] = self.left[kind].saturating_sub(1);
                return Ok(None);
            }
        };
        // Another process may have finished it since the first look.
        if let Some(r) = recorded(run_dir, init, ft) {
            self.left[kind] = self.left[kind].saturating_sub(1);
            self.done += 1;
            return Ok(Some((r, false)));
        }
        self.starts(label);
        let t = Instant::now();
        let mut r = match read_result(run_dir) {
            Some(r) => r,
            None => compute()?,
        };
        if let (Some(f), "ok") = (ft, r.status.as_str()) {
            r.finetune_top1 = Some(f.run(run_dir, init)?);
        }
        let secs = t.elapsed().as_secs_f64();
        self.finished(kind, secs, &format!("{label}: {}", scores(&r)));
        Ok(Some((r, true)))
    }

    fn finished(&mut self, kind: usize, secs: f64, label: &str) {
        self.done += 1;
        self.left[kind] = self.left[kind].saturating_sub(1);
        self.secs[kind] += secs;
        self.ran[kind] += 1;
        self.starts(label);
    }
}

/// `results.csv`, `results.md` and `results.png` of the rows so far.
fn write_results(
    spec: &Spec,
    spec_path: &Path,
    report: &SweepReport,
    units: &[Unit],
) -> Result<()> {
    write_csv(&report.out.join("results.csv"), report)?;
    let md = markdown(spec, spec_path, report, units);
    write_atomic(&report.out.join("results.md"), md.as_bytes())?;
    chart(&report.out.join("results.png"), spec, report)
}

fn write_csv(path: &Path, r: &SweepReport) -> Result<()> {
    let mut s = String::from(
        "sweep,cell,seed,status,steps,loss_mim,loss_objective,linear_top1,linear_top5,knn_top1,knn_top5,finetune_top1,wall_s,train_s,eval_s,dir\n",
    );
    for row in r.rows.iter().chain(&r.controls) {
        let x = &row.result;
        s.push_str(&format!(
            "{},{},{},{},{},{:.5},{:.5},{:.5},{:.5},{:.5},{:.5},{},{:.1},{:.1},{:.1},{}\n",
            row.sweep,
            csv_field(&row.cell),
            row.seed,
            x.status,
            x.steps,
            x.loss_mim,
            x.loss_objective,
            x.linear_top1,
            x.linear_top5,
            x.knn_top1,
            x.knn_top5,
            x.finetune_top1
                .map(|v| format!("{v:.5}"))
                .unwrap_or_default(),
            x.wall_s,
            x.train_s,
            x.eval_s,
            csv_field(&row.dir)
        ));
    }
    write_atomic(path, s.as_bytes())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
    (m, var.sqrt())
}

/// Per cell (in spec order): its rows.
fn by_cell<'a>(spec: &Spec, rows: &'a [Row]) -> Vec<(&'a str, Vec<&'a Row>)> {
    let mut out: Vec<(&str, Vec<&Row>)> = vec![];
    for c in &spec.cells {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.cell == c.name).collect();
        if let Some(first) = rs.first() {
            out.push((first.cell.as_str(), rs));
        }
    }
    out
}

/// The controls by name (one per distinct enhancer), in the order they ran: their rows over seeds.
fn control_groups(r: &SweepReport) -> Vec<(&str, Vec<&Row>)> {
    let mut out: Vec<(&str, Vec<&Row>)> = vec![];
    for c in &r.controls {
        match out.iter_mut().find(|(name, _)| *name == c.cell) {
            Some((_, rows)) => rows.push(c),
            None => out.push((c.cell.as_str(), vec![c])),
        }
    }
    out
}

fn pm(rows: &[&Row], f: impl Fn(&CellResult) -> Option<f64>) -> (f64, f64, String) {
    let v: Vec<f64> = rows
        .iter()
        .filter(|r| r.result.status == "ok")
        .filter_map(|r| f(&r.result))
        .collect();
    let (m, s) = mean_std(&v);
    let text = match v.len() {
        0 => "—".into(),
        1 => format!("{:.2} (1 seed)", 100.0 * m),
        _ => format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * s),
    };
    (m, s, text)
}

fn markdown(spec: &Spec, spec_path: &Path, r: &SweepReport, units: &[Unit]) -> String {
    let mut s = format!(
        "# {}\n\n",
        if spec.title.is_empty() {
            &spec.name
        } else {
            &spec.title
        }
    );
    if !spec.paper.is_empty() {
        s.push_str(&format!("Paper: {}\n\n", spec.paper));
    }
    let mut steps: Vec<usize> = units
        .iter()
        .map(|u| u.resolved.cfg.train.total_steps)
        .collect();
    steps.sort();
    steps.dedup();
    let steps = match steps.as_slice() {
        [] => "0".to_string(),
        [n] => n.to_string(),
        [a, .., b] => format!("{a}–{b}"),
    };
    s.push_str(&format!(
        "`cim-run sweep {}` — preset `{}`{}, seeds {:?}, {} steps per cell; linear probe and k-NN \
         top-1 (%) on {} as mean ± std over seeds.\n\n",
        spec_path.display(),
        spec.preset,
        if spec.set.is_empty() {
            String::new()
        } else {
            format!(" with `{}`", spec.set.join("`, `"))
        },
        spec.seeds,
        steps,
        spec.probe.preset
    ));
    if r.pending > 0 {
        s.push_str(&format!(
            "**Still running: {} of {} cell × seed runs to come**; the rows below are the finished ones.\n\n",
            r.pending,
            units.len()
        ));
    }
    let ft = spec.finetune.is_some();
    s.push_str("| cell | paper | linear | k-NN | Δ linear | Δ k-NN |");
    s.push_str(if ft { " fine-tune |" } else { "" });
    s.push_str(" diverged | overrides |\n|---|---|---|---|---|---|");
    s.push_str(if ft { "---|" } else { "" });
    s.push_str("---|---|\n");
    // A cell's control: the one of its first unit.
    let control_of = |cell: &str| -> Vec<&Row> {
        let Some(ci) = spec.cells.iter().position(|c| c.name == cell) else {
            return vec![];
        };
        let dirs: Vec<String> = units
            .iter()
            .filter(|u| u.cell == ci)
            .map(|u| u.control.display().to_string())
            .collect();
        r.controls
            .iter()
            .filter(|c| dirs.contains(&c.dir))
            .collect()
    };
    for (cell, rows) in by_cell(spec, &r.rows) {
        let c = spec
            .cells
            .iter()
            .find(|c| c.name == cell)
            .expect("a spec cell");
        let (lin, _, lin_t) = pm(&rows, |x| Some(x.linear_top1));
        let (knn, _, knn_t) = pm(&rows, |x| Some(x.knn_top1));
        let ctrl = control_of(cell);
        let (clin, _, _) = pm(&ctrl, |x| Some(x.linear_top1));
        let (cknn, _, _) = pm(&ctrl, |x| Some(x.knn_top1));
        let delta = |a: f64, b: f64| {
            if a.is_finite() && b.is_finite() {
                format!("{:+.2}", 100.0 * (a - b))
            } else {
                "—".into()
            }
        };
        let diverged: Vec<String> = rows
            .iter()
            .filter(|r| r.result.status == "diverged")
            .map(|r| format!("seed {} at step {}", r.seed, r.result.steps))
            .collect();
        s.push_str(&format!(
            "| {cell} | {} | {lin_t} | {knn_t} | {} | {} |",
            c.paper,
            delta(lin, clin),
            delta(knn, cknn)
        ));
        if ft {
            s.push_str(&format!(" {} |", pm(&rows, |x| x.finetune_top1).2));
        }
        s.push_str(&format!(
            " {} | {} |\n",
            if diverged.is_empty() {
                format!("0/{}", rows.len())
            } else {
                format!("{}/{}: {}", diverged.len(), rows.len(), diverged.join(", "))
            },
            match c.set.is_empty() {
                true => "none".to_string(),
                false => format!("`{}`", c.set.join("`, `")),
            }
        ));
    }
    for (cell, rows) in control_groups(r) {
        s.push_str(&format!(
            "| {cell} | | {} | {} | | |",
            pm(&rows, |x| Some(x.linear_top1)).2,
            pm(&rows, |x| Some(x.knn_top1)).2
        ));
        if ft {
            s.push_str(&format!(" {} |", pm(&rows, |x| x.finetune_top1).2));
        }
        s.push_str(" | |\n");
    }
    let wall: f64 = r
        .rows
        .iter()
        .chain(&r.controls)
        .map(|x| x.result.wall_s)
        .sum();
    s.push_str(&format!(
        "\nWall time of all cells and controls: {:.1} min.\n",
        wall / 60.0
    ));
    s
}

/// One bar per cell (linear top-1 mean, whiskers ± std), the controls in grey.
fn chart(path: &Path, spec: &Spec, r: &SweepReport) -> Result<()> {
    use plotters::prelude::*;
    let mut bars: Vec<(String, f64, f64, bool)> = by_cell(spec, &r.rows)
        .into_iter()
        .map(|(cell, rows)| {
            let (m, s, _) = pm(&rows, |x| Some(x.linear_top1));
            (cell.to_string(), 100.0 * m, 100.0 * s, false)
        })
        .collect();
    let groups = control_groups(r);
    let several = groups.len() > 1;
    for (i, (_, rows)) in groups.into_iter().enumerate() {
        let (m, s, _) = pm(&rows, |x| Some(x.linear_top1));
        let name = match several {
            false => "control".to_string(),
            true => format!("control {}", i + 1),
        };
        bars.push((name, 100.0 * m, 100.0 * s, true));
    }
    let top = bars
        .iter()
        .filter(|b| b.1.is_finite())
        .map(|b| b.1 + b.2)
        .fold(10.0f64, f64::max)
        * 1.15;
    let err = |e: &dyn std::fmt::Display| Error::msg(format!("{}: {e}", path.display()));
    let n = bars.len();
    // Each bar's slot is wide enough for its label (13-px type: about 8 px a character).
    let longest = bars.iter().map(|b| b.0.chars().count()).max().unwrap_or(0);
    let slot = 110.max(8 * longest + 12);
    let (w, h) = ((140 + slot * n) as u32, 420u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        crate::pictures::register_font();
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                if spec.title.is_empty() {
                    &spec.name
                } else {
                    &spec.title
                },
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("linear probe top-1 (%)")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (_, m, s, control)) in bars.iter().enumerate() {
            if !m.is_finite() {
                continue;
            }
            let x = i as f64;
            let colour = if *control {
                RGBColor(150, 150, 150)
            } else {
                RGBColor(31, 119, 180)
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x - 0.35, 0.0), (x + 0.35, *m)],
                    colour.filled(),
                )))
                .map_err(|e| err(&e))?;
            chart
                .draw_series(std::iter::once(ErrorBar::new_vertical(
                    x,
                    m - s,
                    *m,
                    m + s,
                    BLACK.stroke_width(2),
                    12,
                )))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    crate::pictures::write_png(
        path,
        &image::RgbImage::from_raw(w, h, buf).expect("w·h·3 bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean_std(&[1.0, 3.0]), (2.0, 2f64.sqrt()));
        assert_eq!(mean_std(&[5.0]), (5.0, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }

    #[test]
    fn spec_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(
            &p,
            "name = \"x\"\npreset = \"quickstart\"\nseeds = [0]\nsedes = [1]\n[[cell]]\nname = \"a\"\n",
        )
        .unwrap();
        let e = Spec::load(&p).err().unwrap().to_string();
        assert!(e.contains("s.toml") && e.contains("sedes"), "{e}");
        std::fs::write(
            &p,
            "name = \"x\"\npreset = \"quickstart\"\nseeds = [0]\n[[cell]]\nname = \"a\"\n[[cell]]\nname = \"a\"\n",
        )
        .unwrap();
        let e = Spec::load(&p).err().unwrap().to_string();
        assert!(e.contains("two cells are named `a`"), "{e}");
    }

    #[test]
    fn identical_configurations_share_a_cell_and_seeds_do_not() {
        let a = fnv("[run]\nseed = 0\n");
        assert_eq!(a, fnv("[run]\nseed = 0\n"));
        assert_ne!(a, fnv("[run]\nseed = 1\n"));
        assert_eq!(a.len(), 16);
    }
}
