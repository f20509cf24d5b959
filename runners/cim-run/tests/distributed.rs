//! Data-parallel training on the CPU through MPI: `mpirun -np 2 cim-run …` against one process
//! at the same global batch and micro-batch, resuming at another world size, and a rank that
//! dies or stalls. Built with `--features mpi` and run where OpenMPI's `mpirun` is on the PATH
//! (`tools/install-mpi.sh` installs it; `.ci/run` runs this file).
#![cfg(feature = "mpi")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use common::text;

/// 64 small random photographs in an ImageFolder, so the test needs no data set.
fn image_folder(dir: &Path) -> PathBuf {
    use rand::{Rng, SeedableRng};
    let root = dir.join("images/all");
    std::fs::create_dir_all(&root).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..64 {
        let img = image::RgbImage::from_fn(40, 40, |x, y| {
            let base = (x * 5 + y * 3 + i * 11) as u8;
            image::Rgb([base, base.wrapping_add(rng.gen_range(0..40)), 255 - base])
        });
        img.save(root.join(format!("{i:03}.png"))).unwrap();
    }
    dir.join("images")
}

/// The run: tiny_vit_respix on the folder, a global batch of 16 in micro-batches of 4 (one
/// process accumulates 4 of them, each of two ranks 2).
fn args(data: &Path, extra: &[&str]) -> Vec<String> {
    args_of("tiny_vit_respix", data, extra)
}

fn args_of(preset: &str, data: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--preset",
        preset,
        "--set",
        "data.source=\"folder\"",
        "--set",
        "train.batch_size=16",
        "--set",
        "train.micro_batch=4",
        "--set",
        "train.total_steps=6",
        "--set",
        "train.warmup_steps=2",
        "--set",
        "data.workers=1",
        "--set",
        "run.tensorboard=false",
        "--set",
        "dist.timeout_s=20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("--set".into());
    a.push(format!("data.path=\"{}\"", data.display()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn mpirun_command(np: usize, args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &np.to_string()])
        .arg(env!("CARGO_BIN_EXE_cim-run"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "info");
    c
}

fn mpirun(np: usize, args: &[String]) -> Output {
    let out = mpirun_command(np, args)
        .output()
        .expect("mpirun not found: install OpenMPI (tools/install-mpi.sh)");
    assert!(
        out.status.success(),
        "mpirun -np {np} failed:\n{}",
        text(&out)
    );
    out
}

fn single(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = common::cim_run(&args, &[("RAYON_NUM_THREADS", "1".as_ref())]);
    assert!(out.status.success(), "{}", text(&out));
    out
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn weights(run: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(run.join("model.safetensors"), &Device::Cpu).unwrap()
}

/// The largest relative difference of the losses per step (from step `from` on) and of the
/// final weights (per tensor: max |a − b| / max |b|), and separately the largest absolute
/// difference of the attention's key biases (the middle third of each `qkv.bias`).
///
/// A key bias adds the same `q·b` to every score of a query, which softmax cancels: its gradient
/// is zero but for rounding, and AdamW, which divides by the gradient's own scale, moves it by up
/// to the learning rate each step in whatever direction the rounding points. Summed in another
/// order, the rounding differs, and so do those weights, without changing what the network
/// computes.
fn max_rel_diff(a: &Path, b: &Path, from: u64) -> (f64, f64) {
    let (ma, mb) = (metrics(a), metrics(b));
    let pick = |m: &[serde_json::Value]| -> Vec<serde_json::Value> {
        m.iter()
            .filter(|r| r["step"].as_u64().unwrap() >= from)
            .cloned()
            .collect()
    };
    let (ma, mb) = (pick(&ma), pick(&mb));
    assert_eq!(ma.len(), mb.len(), "{} vs {} steps", ma.len(), mb.len());
    let mut worst = 0f64;
    for (ra, rb) in ma.iter().zip(&mb) {
        assert_eq!(ra["step"], rb["step"]);
        for key in ["loss", "loss_mim", "loss_respix", "grad_norm", "mim_acc"] {
            let (x, y) = (ra[key].as_f64().unwrap(), rb[key].as_f64().unwrap());
            worst = worst.max((x - y).abs() / y.abs().max(1e-12));
        }
    }
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    let rel = |x: &Tensor, y: &Tensor| -> f64 {
        let max = |t: &Tensor| {
            t.abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        max(&(x - y).unwrap()) / max(y).max(1e-12)
    };
    let mut key_bias = 0f64;
    for (k, ta) in &wa {
        let tb = &wb[k];
        if k.ends_with("attn.qkv.bias") {
            let d = ta.dim(0).unwrap() / 3;
            let part = |t: &Tensor, i: usize| t.narrow(0, i * d, d).unwrap();
            for i in [0, 2] {
                worst = worst.max(rel(&part(ta, i), &part(tb, i)));
            }
            let d = (part(ta, 1) - part(tb, 1))
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap();
            key_bias = key_bias.max(d.to_scalar::<f32>().unwrap() as f64);
        } else {
            worst = worst.max(rel(ta, tb));
        }
    }
    (worst, key_bias)
}

#[test]
fn two_ranks_match_one_process_at_the_same_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = image_folder(tmp.path());
    let dir = |n: &str| tmp.path().join(n);
    let run = |d: &Path, micro: &str| {
        args(
            &data,
            &["--steps", "4", "--out", d.to_str().unwrap(), "--set", micro],
        )
    };
    // Micro-batches of 8: each rank takes one per step, the one process accumulates two. Halving
    // is exact in floating point, so (g₀ + g₁)/2 is g₀/2 + g₁/2 bit for bit: the runs agree exactly.
    single(&run(&dir("one-8"), "train.micro_batch=8"));
    mpirun(2, &run(&dir("two-8"), "train.micro_batch=8"));
    let (worst, key_bias) = max_rel_diff(&dir("one-8"), &dir("two-8"), 1);
    eprintln!("micro-batch 8: largest relative difference {worst:.3e}, key biases {key_bias:.3e}");
    assert!(worst.max(key_bias) < 1e-5, "{worst} {key_bias}");
    // Micro-batches of 4: each rank accumulates two, the one process four. The gradients are
    // summed in another order, so they differ by rounding.
    single(&run(&dir("one"), "train.micro_batch=4"));
    let two = dir("two");
    let out = mpirun(2, &run(&two, "train.micro_batch=4"));
    let log = text(&out);
    assert!(
        log.contains("rank 0 of 2 (OpenMPI mpirun") && log.contains("rank 1 of 2"),
        "{log}"
    );
    assert!(
        log.contains("backend mpi") && log.contains("2 micro-batch(es) of 4 images"),
        "{log}"
    );
    // Only rank 0 reports and writes.
    assert_eq!(log.matches("done: 4 steps").count(), 1, "{log}");
    assert_eq!(metrics(&two).len(), 4);
    let (worst, key_bias) = max_rel_diff(&dir("one"), &two, 1);
    eprintln!("micro-batch 4: largest relative difference {worst:.3e}, key biases {key_bias:.3e}");
    assert!(worst < 1e-5, "largest relative difference {worst}");
    // AdamW moves a key bias by about the learning rate per step at most (≤ 1e-3 here).
    assert!(key_bias < 4.0 * 1e-3, "key biases differ by {key_bias}");
    // The losses fall: the two runs train, not merely agree.
    let m = metrics(&two);
    assert!(m[3]["loss"].as_f64().unwrap() < m[0]["loss"].as_f64().unwrap());
    // --print-config tells the process's place and the split.
    let cfg = Command::new(env!("CARGO_BIN_EXE_cim-run"))
        .args(args(&data, &["--print-config"]))
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .output()
        .unwrap();
    let cfg = text(&cfg);
    assert!(
        cfg.contains("# this process: rank 1 of 2 (torchrun"),
        "{cfg}"
    );
    assert!(
        cfg.contains("each rank accumulates 2 micro-batch(es) of 4 images"),
        "{cfg}"
    );
    assert!(
        cfg.contains("[dist]") && cfg.contains("timeout_s = 20"),
        "{cfg}"
    );
}

/// A job of one with the backend named still goes through it (every collective of one rank):
/// the same run as without, bit for bit. (On a GPU, `dist.backend = "nccl"` is the same check
/// of NCCL: benches/gpu-dist-check.sh.)
#[test]
fn one_rank_through_mpi_is_the_single_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = image_folder(tmp.path());
    let dir = |n: &str| tmp.path().join(n);
    let run = |d: &Path| {
        args(
            &data,
            &[
                "--steps",
                "3",
                "--out",
                d.to_str().unwrap(),
                "--set",
                "dist.backend=\"mpi\"",
            ],
        )
    };
    single(&args(
        &data,
        &["--steps", "3", "--out", dir("alone").to_str().unwrap()],
    ));
    let out = mpirun(1, &run(&dir("mpi")));
    assert!(
        !text(&out).contains("rank 0 of 1"),
        "a job of one says nothing of ranks"
    );
    let (worst, key_bias) = max_rel_diff(&dir("alone"), &dir("mpi"), 1);
    assert_eq!((worst, key_bias), (0.0, 0.0));
}

#[test]
fn a_two_rank_checkpoint_resumes_at_one_rank_and_at_two() {
    let tmp = tempfile::tempdir().unwrap();
    let data = image_folder(tmp.path());
    let dir = |n: &str| tmp.path().join(n);
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    // Uninterrupted: 2 ranks, 6 steps.
    mpirun(2, &args(&data, &["--out", &s(dir("whole"))]));
    // 2 ranks for 3 steps, then the rest at 1 rank and, from a copy, at 2 ranks.
    mpirun(
        2,
        &args(&data, &["--steps", "3", "--out", &s(dir("first"))]),
    );
    copy_dir(&dir("first"), &dir("at2"));
    std::fs::rename(dir("first"), dir("at1")).unwrap();
    let resume = |d: &str| {
        vec![
            "--resume".to_string(),
            s(dir(d)),
            "--steps".into(),
            "6".into(),
        ]
    };
    let out = single(&resume("at1"));
    assert!(text(&out).contains("now at step 6"), "{}", text(&out));
    mpirun(2, &resume("at2"));
    for d in ["at1", "at2"] {
        assert_eq!(metrics(&dir(d)).len(), 6, "{d}");
        let (worst, key_bias) = max_rel_diff(&dir(d), &dir("whole"), 4);
        eprintln!("resumed {d} vs uninterrupted: largest relative difference {worst:.3e}, key biases {key_bias:.3e}");
        assert!(worst < 1e-5, "{d}: largest relative difference {worst}");
        assert!(
            key_bias < 6.0 * 1e-3,
            "{d}: key biases differ by {key_bias}"
        );
    }
}

/// The ResNet enhancer normalises with the statistics of both ranks' micro-batches (SyncBN, on
/// by default); without it, each rank's own. (The layer itself is checked against one process's
/// BatchNorm in the resnet plugin's tests.)
#[test]
fn resnet_ranks_synchronise_batch_norm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = image_folder(tmp.path());
    let run = |name: &str, sync: &str| {
        let dir = tmp.path().join(name);
        let a = args_of(
            "tiny_resnet_respix",
            &data,
            &[
                "--steps",
                "2",
                "--out",
                dir.to_str().unwrap(),
                "--set",
                sync,
            ],
        );
        mpirun(2, &a);
        metrics(&dir)
    };
    let synced = run("sync", "dist.sync_bn=true");
    let own = run("own", "dist.sync_bn=false");
    assert_eq!(synced.len(), 2);
    let loss = |m: &[serde_json::Value], i: usize| m[i]["loss_respix"].as_f64().unwrap();
    assert!(loss(&synced, 0).is_finite() && loss(&synced, 1).is_finite());
    // The first step's forward differs only in the statistics BatchNorm normalises with.
    assert_ne!(loss(&synced, 0), loss(&own, 0));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The process ids of the ranks of the job whose environment holds `marker`.
fn rank_pid(marker: &str, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        let has = |v: &str| vars.contains(&v.as_bytes());
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        if has(marker)
            && has(&format!("OMPI_COMM_WORLD_RANK={rank}"))
            && exe.file_name().is_some_and(|n| n == "cim-run")
        {
            return Some(pid);
        }
    }
    None
}

/// Starts a long 2-rank run, waits for its first step, sends `signal` to rank 1 and returns how
/// long the job took to end after that, and what it printed.
fn disturb_rank_one(signal: &str, timeout_s: u64) -> (Duration, Output) {
    let tmp = tempfile::tempdir().unwrap();
    let data = image_folder(tmp.path());
    let run = tmp.path().join("run");
    let marker = format!("CIM_TEST_JOB={}", tmp.path().display());
    let mut a = args(
        &data,
        &[
            "--out",
            run.to_str().unwrap(),
            "--set",
            "train.total_steps=100000",
        ],
    );
    a.extend(["--set".into(), format!("dist.timeout_s={timeout_s}")]);
    let child = mpirun_command(2, &a)
        .env("CIM_TEST_JOB", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|m| m.lines().count() >= 2)
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the job did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = rank_pid(&marker, 1).expect("rank 1's process");
    let sent = Instant::now();
    assert!(Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let took = sent.elapsed();
    // A stopped process left behind would outlive the test.
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    (took, out)
}

#[test]
fn a_killed_rank_ends_the_job_naming_it() {
    let (took, out) = disturb_rank_one("-KILL", 10);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        took < Duration::from_secs(60),
        "the job took {took:?} to end:\n{log}"
    );
    assert!(log.contains("rank 1"), "{log}");
}

#[test]
fn a_stalled_rank_ends_the_job_after_the_timeout() {
    let (took, out) = disturb_rank_one("-STOP", 3);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        took < Duration::from_secs(60),
        "the job took {took:?} to end:\n{log}"
    );
    assert!(
        log.contains("rank 0 of 2") && log.contains("for the other ranks (dist.timeout_s = 3)"),
        "{log}"
    );
}
