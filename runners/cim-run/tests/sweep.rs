//! `cim-run sweep` end to end on the embedded quickstart photographs and a small labelled set the
//! test writes in CIFAR-10's binary format: cells and their control run, results are written, a
//! rerun skips what is done, a divergent cell is a result, and spec errors stop the sweep before
//! any cell runs.

use std::path::Path;

/// `n` CIFAR-10 records: label `i % 10`, pixels a seeded pattern that depends on the label.
fn cifar_records(n: usize, salt: u8) -> Vec<u8> {
    let mut v = vec![];
    for i in 0..n {
        let label = (i % 10) as u8;
        v.push(label);
        for p in 0..3072usize {
            v.push((label as usize * 23 + p * 7 + i * 3 + salt as usize) as u8);
        }
    }
    v
}

/// `<dir>/cifar/{train,test}.bin` with `train` and `test` records.
fn cifar_dir(dir: &Path, train: usize, test: usize) -> std::path::PathBuf {
    let data = dir.join("cifar");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("train.bin"), cifar_records(train, 0)).unwrap();
    std::fs::write(data.join("test.bin"), cifar_records(test, 1)).unwrap();
    data
}

mod common;
use common::text;

fn cim_run(args: &[&str]) -> std::process::Output {
    common::cim_run(args, &[])
}

/// `cim-run sweep SPEC --out OUT --cells CELLS`.
fn sweep(spec: &Path, out: &Path, cells: &Path) -> std::process::Output {
    cim_run(&[
        "sweep",
        spec.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--cells",
        cells.to_str().unwrap(),
    ])
}

fn write_spec(dir: &Path, data: &Path, cells: &str) -> std::path::PathBuf {
    let p = dir.join("spec.toml");
    std::fs::write(
        &p,
        format!(
            r#"name = "two-cells"
title = "Two samplers"
preset = "quickstart"
set = ["train.total_steps=3", "train.warmup_steps=1", "train.batch_size=4", "data.workers=1"]
seeds = [0]

[probe]
set = ['data.path="{data}"']
k = 3

{cells}"#,
            data = data.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn a_two_cell_sweep_runs_resumes_and_records_a_divergent_cell() {
    let tmp = tempfile::tempdir().unwrap();
    let data = cifar_dir(tmp.path(), 40, 20);
    let spec = write_spec(
        tmp.path(),
        &data,
        r#"[[cell]]
name = "gumbel"
set = ["sampler.name=\"gumbel\""]
paper = "84.0"

[[cell]]
name = "argmax"
set = ["sampler.name=\"argmax\""]

[[cell]]
name = "blowup"
set = ["train.total_steps=30", "train.lr=1e12", "train.clip_grad=0"]
"#,
    );
    let out = tmp.path().join("out");
    let cells = tmp.path().join("cells");
    let o = sweep(&spec, &out, &cells);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("sweep two-cells: 4/4 done"), "{t}");
    assert!(t.contains("3 cells × seeds, 1 controls; 4 run now"), "{t}");

    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 4, "{csv}");
    let by = |cell: &str| rows.iter().find(|r| r[1].starts_with(cell)).unwrap();
    for cell in ["gumbel", "argmax", "control"] {
        let r = by(cell);
        assert_eq!(r[3], "ok", "{cell}: {csv}");
        let top1: f64 = r[7].parse().unwrap();
        assert!((0.0..=1.0).contains(&top1), "{cell}: {top1}");
    }
    assert_eq!(by("gumbel")[4], "3");
    // The divergent cell is a row, with the step it stopped at.
    let blow = by("blowup");
    assert_eq!(blow[3], "diverged", "{csv}");
    let step: usize = blow[4].parse().unwrap();
    assert!((1..=30).contains(&step), "{csv}");

    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.starts_with("# Two samplers"), "{md}");
    assert!(!md.contains("Still running"), "{md}");
    assert!(md.contains("| gumbel | 84.0 |"), "{md}");
    assert!(md.contains("| control (vit_tiny at random init) |"), "{md}");
    assert!(md.contains(&format!("1/1: seed 0 at step {step}")), "{md}");
    let png = image::open(out.join("results.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (140 + 110 * 4, 420));

    // A rerun finds every unit done and rewrites the same results.
    let o = sweep(&spec, &out, &cells);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("0 run now"), "{t}");
    let again = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(again, csv);

    // The cells are shared: a second spec with one of the same cells reuses its folder.
    let spec2 = tmp.path().join("spec2.toml");
    let text2 = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("name = \"two-cells\"", "name = \"other\"");
    let cut = text2.find("[[cell]]\nname = \"argmax\"").unwrap();
    std::fs::write(&spec2, &text2[..cut]).unwrap();
    let o = sweep(&spec2, &tmp.path().join("out2"), &cells);
    assert!(text(&o).contains("0 run now"), "{}", text(&o));

    // Fine-tuning the shared, finished cell and its control runs only the fine-tunes; each
    // fine-tuning configuration has its own folder and its own rows.
    let finetune = |lr: &str| {
        let p = tmp.path().join(format!("spec-ft-{lr}.toml"));
        let mut t = std::fs::read_to_string(&spec2).unwrap();
        let at = t.find("[[cell]]").unwrap();
        t.insert_str(
            at,
            &format!(
                "[finetune]\npreset = \"ft_tiny_cifar10\"\nset = ['data.path=\"{}\"', \"finetune.epochs=1\", \
                 \"finetune.batch_size=8\", \"finetune.lr={lr}\", \"data.workers=1\", \"data.image_size=64\"]\n\n",
                data.display()
            ),
        );
        std::fs::write(&p, t).unwrap();
        let out = tmp.path().join(format!("out-ft-{lr}"));
        (text(&sweep(&p, &out, &cells)), out)
    };
    let (t, out_ft) = finetune("1e-3");
    assert!(t.contains("2 run now"), "{t}");
    assert!(
        !t.contains("resuming") && !t.contains("step 1/3"),
        "pre-trained again: {t}"
    );
    let csv_ft = std::fs::read_to_string(out_ft.join("results.csv")).unwrap();
    for row in csv_ft.lines().skip(1) {
        let top1: f64 = row.split(',').nth(11).unwrap().parse().unwrap();
        assert!((0.0..=1.0).contains(&top1), "{csv_ft}");
    }
    let gumbel = cells.join(
        rows.iter().find(|r| r[1] == "gumbel").unwrap()[15]
            .rsplit('/')
            .next()
            .unwrap(),
    );
    let folders = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("finetune-pretrained-")
            })
            .count()
    };
    assert_eq!(folders(&gumbel), 1);
    assert!(finetune("1e-3").0.contains("0 run now"));
    let (t, _) = finetune("3e-3");
    assert!(t.contains("2 run now"), "{t}");
    assert_eq!(folders(&gumbel), 2);
}

#[test]
fn an_interrupted_cell_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = cifar_dir(tmp.path(), 20, 10);
    let spec = write_spec(
        tmp.path(),
        &data,
        "[[cell]]\nname = \"only\"\nset = [\"train.total_steps=4\", \"run.checkpoint_every=2\"]\n",
    );
    let cells = tmp.path().join("cells");
    let base = [
        "sweep",
        spec.to_str().unwrap(),
        "--cells",
        cells.to_str().unwrap(),
        "--out",
    ];
    // Kill the process while it writes its second checkpoint (step 4), after the one at step 2.
    let out = tmp.path().join("out");
    let mut args = base.to_vec();
    args.push(out.to_str().unwrap());
    let o = common::cim_run(&args, &[("CIMRUN_FAULT", "checkpoint:2".as_ref())]);
    assert!(!o.status.success(), "{}", text(&o));
    let cell = std::fs::read_dir(&cells)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("control")
        })
        .unwrap();
    assert!(cell.join("checkpoints/step-00000002").is_dir());
    assert!(!cell.join("result.json").exists());
    // --report writes what is finished (the control) and runs nothing.
    let mut report = args.clone();
    report.push("--report");
    let o = cim_run(&report);
    assert!(o.status.success(), "{}", text(&o));
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("Still running: 1 of 1"), "{md}");
    assert!(md.contains("| control (vit_tiny at random init) |"), "{md}");
    assert!(!cell.join("result.json").exists());
    let o = cim_run(&args);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("resuming"), "{t}");
    let m = std::fs::read_to_string(cell.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = m
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
}

/// Two sweeps sharing a cells folder split the work: a unit whose lock another process holds is
/// left to it (not run twice, not counted as done), and is picked up by the next run once free.
#[test]
fn a_unit_another_sweep_holds_is_left_to_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = cifar_dir(tmp.path(), 20, 10);
    let spec = write_spec(
        tmp.path(),
        &data,
        "[[cell]]\nname = \"gumbel\"\nset = [\"sampler.name=\\\"gumbel\\\"\"]\n\n\
         [[cell]]\nname = \"argmax\"\nset = [\"sampler.name=\\\"argmax\\\"\"]\n",
    );
    let out = tmp.path().join("out");
    let cells = tmp.path().join("cells");
    let plan = text(&cim_run(&[
        "sweep",
        spec.to_str().unwrap(),
        "--cells",
        cells.to_str().unwrap(),
        "--dry-run",
    ]));
    let gumbel = plan
        .lines()
        .find(|l| l.starts_with("gumbel"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("{plan}"));
    std::fs::create_dir_all(&cells).unwrap();
    let lock = cim_runner::rundir::PidLock::take(Path::new(&format!("{gumbel}.lock")))
        .unwrap()
        .unwrap();

    let o = sweep(&spec, &out, &cells);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "cell `gumbel` seed 0 is being run by process {}",
            std::process::id()
        )),
        "{t}"
    );
    assert!(t.contains("2 run now"), "{t}");
    assert!(t.contains("1 cells × seeds not finished"), "{t}");
    assert!(!Path::new(gumbel).join("result.json").exists());
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("Still running: 1 of 2"), "{md}");
    // One seed: no spread to state.
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    assert!(md.contains("(1 seed)"), "{md}");
    assert!(rows.iter().all(|l| !l.contains('±')), "{md}");

    drop(lock);
    let o = sweep(&spec, &out, &cells);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("1 run now") && !t.contains("not finished"),
        "{t}"
    );
    assert!(Path::new(gumbel).join("result.json").is_file());
}

#[test]
fn spec_errors_stop_the_sweep_before_any_cell_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    let cells = tmp.path().join("cells");
    for (cells_text, want) in [
        (
            "[[cell]]\nname = \"a\"\nset = [\"sampler.nmae=\\\"argmax\\\"\"]\n[[cell]]\nname = \"b\"\n",
            "cell `a`",
        ),
        ("[[cell]]\nname = \"a\"\nsetting = []\n", "setting"),
    ] {
        let spec = write_spec(tmp.path(), &data, cells_text);
        let o = sweep(&spec, &tmp.path().join("out"), &cells);
        let t = text(&o);
        assert!(!o.status.success());
        assert!(t.contains(want), "{want}: {t}");
        assert!(!cells.exists(), "a cell ran: {t}");
    }
    let spec = write_spec(tmp.path(), &data, "[[cell]]\nname = \"a\"\n");
    let s = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("preset = \"quickstart\"", "preset = \"no_such_preset\"");
    std::fs::write(&spec, s).unwrap();
    let o = cim_run(&[
        "sweep",
        spec.to_str().unwrap(),
        "--cells",
        cells.to_str().unwrap(),
    ]);
    assert!(
        text(&o).contains("unknown preset `no_such_preset`"),
        "{}",
        text(&o)
    );
    assert!(!cells.exists());
}
