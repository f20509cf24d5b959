//! The training engine's promises: exact resume, crash-safe checkpoints, bad files skipped and
//! reported, gradient accumulation, picture grids and the loss curve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

use cim_runner::checkpoint::{list_checkpoints, load_latest};
use cim_runner::config::{resolve, Layers};
use cim_runner::train::Trainer;

/// The quickstart pipeline, shrunk: batch 4, a 6-step schedule.
fn small(extra: &[&str]) -> Vec<String> {
    let mut set: Vec<String> = [
        "train.batch_size=4",
        "train.total_steps=6",
        "train.warmup_steps=2",
        "run.checkpoint_every=3",
        "run.log_every=1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    set.extend(extra.iter().map(|s| s.to_string()));
    set
}

fn trainer(dir: &Path, set: Vec<String>) -> Trainer {
    let res = resolve(&Layers {
        preset: Some("quickstart".into()),
        config_files: vec![],
        set,
        env: false,
    })
    .unwrap();
    Trainer::new(res, dir.to_path_buf()).unwrap()
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Every tensor equal bit for bit.
fn assert_bit_identical(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    assert!(!ta.is_empty());
    for (k, x) in &ta {
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert!(
            bits(x) == bits(&tb[k]),
            "{k} differs between {a:?} and {b:?}"
        );
    }
}

fn losses(dir: &Path) -> Vec<f64> {
    metric(dir, "loss")
}

/// One number per step from `metrics.jsonl`.
fn metric(dir: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()[key]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn n_steps_plus_resume_for_n_is_bit_identical_to_2n_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // Gradient accumulation (2 micro-batches of 2) and different loader thread counts on the way:
    // neither may change a bit.
    let mut ta = trainer(&a, small(&["train.accum_steps=2", "data.workers=1"]));
    ta.run(Some(6)).unwrap();

    let mut tb = trainer(&b, small(&["train.accum_steps=2", "data.workers=3"]));
    tb.run(Some(3)).unwrap();
    drop(tb);
    let mut tb = Trainer::resume(b.clone(), vec![]).unwrap();
    assert_eq!(tb.step(), 3);
    let s = tb.run(Some(6)).unwrap();
    assert_eq!((s.steps, s.final_step), (3, 6));

    assert_bit_identical(&a.join("model.safetensors"), &b.join("model.safetensors"));
    let ca = list_checkpoints(&a).unwrap();
    let cb = list_checkpoints(&b).unwrap();
    assert_eq!(
        ca.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![3, 6],
        "checkpoint cadence 3 and the end"
    );
    assert_eq!(cb.iter().map(|c| c.0).collect::<Vec<_>>(), vec![3, 6]);
    assert_bit_identical(
        &ca[1].1.join("optimizer.safetensors"),
        &cb[1].1.join("optimizer.safetensors"),
    );
    // Same losses step by step, and metrics.jsonl holds each step once.
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(losses(&b).len(), 6);
}

#[test]
fn resume_refuses_to_change_the_model_and_needs_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    trainer(&dir, small(&[])).run(Some(3)).unwrap();
    let e = Trainer::resume(dir.clone(), vec!["train.lr=1.0".into()])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("run.*"), "{e}");
    // run.* keys may change.
    Trainer::resume(dir, vec!["run.log_every=5".into()]).unwrap();
    let e = Trainer::resume(tmp.path().join("nothing"), vec![])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no complete checkpoint"), "{e}");
}

fn cim_run(args: &[&str], fault: Option<&str>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cim-run"));
    c.args(args).env("RUST_LOG", "warn");
    if let Some(f) = fault {
        c.env("CIMRUN_FAULT", f);
    }
    c.output().unwrap()
}

fn with_sets<'a>(base: &[&'a str], sets: &'a [String]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    for s in sets {
        v.push("--set");
        v.push(s);
    }
    v
}

/// `CIM_*` variables set the configuration's sections (`CIM_TRAIN__LR`); one that names no
/// section (`CIM_HOME`) is ignored with a warning naming it, instead of failing every command.
#[test]
fn unrelated_cim_variables_are_ignored_with_a_warning() {
    let out = Command::new(env!("CARGO_BIN_EXE_cim-run"))
        .args(["--preset", "quickstart", "--print-config"])
        .env("RUST_LOG", "warn")
        .env("CIM_HOME", "/somewhere")
        .env("CIM_TRAIN__LR", "0.25")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("CIM_HOME"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("lr = 0.25"), "{stdout}");
}

/// Log lines redirected to a file carry no colour codes, and say step/total, epoch and ETA.
#[test]
fn logs_to_a_file_are_plain_and_say_where_the_run_is() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_cim-run"))
        .args([
            "--preset",
            "quickstart",
            "--steps",
            "4",
            "--out",
            dir.to_str().unwrap(),
        ])
        .args(["--set", "train.batch_size=4", "--set", "run.log_every=2"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "colour codes in a redirected log: {stderr}"
    );
    assert!(
        stderr.contains("step 2/4 epoch") && stderr.contains(" eta 0:"),
        "{stderr}"
    );
}

/// `--resume` of a finished run, or with `--steps` at or below its step, says so and succeeds
/// without training or rewriting anything; the stale temp folder of an interrupted checkpoint
/// write is removed on resume.
#[test]
fn resuming_a_finished_run_says_so_and_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("done");
    let d = dir.to_str().unwrap();
    let sets = small(&[]);
    let out = cim_run(
        &with_sets(&["--preset", "quickstart", "--out", d], &sets),
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let stale = dir.join("checkpoints/.step-00000009.tmp-4242");
    std::fs::create_dir_all(&stale).unwrap();
    for args in [vec!["--resume", d], vec!["--resume", d, "--steps", "2"]] {
        let out = cim_run(&args, None);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("nothing to do") && stdout.contains("at step 6"),
            "{stdout}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(),
        metrics
    );
    assert!(
        !stale.exists(),
        "the interrupted write's temp folder is removed"
    );
}

#[test]
fn a_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let killed = tmp.path().join("killed");
    let clean = tmp.path().join("clean");
    let sets = small(&[]);
    let k = killed.to_str().unwrap();
    // The second checkpoint (step 6, the end) is interrupted half-way: weights written, no state.
    let out = cim_run(
        &with_sets(&["--preset", "quickstart", "--out", k], &sets),
        Some("checkpoint:2"),
    );
    assert!(!out.status.success(), "the fault point must kill the run");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CIMRUN_FAULT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = killed.join("checkpoints");
    let names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with(".step-00000006.tmp")),
        "the half-written checkpoint is a temp folder: {names:?}"
    );
    // The previous checkpoint is complete and loadable.
    let latest = load_latest(&killed).unwrap();
    assert_eq!(latest.state.step, 3);
    assert!(!latest.weights.is_empty() && !latest.optimizer.is_empty());

    let out = cim_run(&["--resume", k], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("now at step 6"), "{stdout}");
    // …and ends where an uninterrupted run ends.
    let out = cim_run(
        &with_sets(
            &["--preset", "quickstart", "--out", clean.to_str().unwrap()],
            &sets,
        ),
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_bit_identical(
        &killed.join("model.safetensors"),
        &clean.join("model.safetensors"),
    );
}

/// An image folder with 5 good images (RGB JPEG, grayscale PNG, RGBA PNG) and 3 bad files.
fn folder_with_bad_files(root: &Path) -> Vec<PathBuf> {
    let class = root.join("class_a");
    std::fs::create_dir_all(&class).unwrap();
    let photo = |seed: u32, w: u32, h: u32| {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                ((x * 3 + seed * 40) % 256) as u8,
                ((y * 5 + seed * 17) % 256) as u8,
                ((x + y + seed * 90) % 256) as u8,
            ])
        })
    };
    for i in 0..3 {
        photo(i, 96 + 8 * i, 80)
            .save(class.join(format!("ok{i}.jpg")))
            .unwrap();
    }
    image::DynamicImage::ImageRgb8(photo(7, 70, 90))
        .to_luma8()
        .save(class.join("gray.png"))
        .unwrap();
    image::DynamicImage::ImageRgb8(photo(9, 90, 70))
        .to_rgba8()
        .save(class.join("rgba.png"))
        .unwrap();
    let good = std::fs::read(class.join("ok0.jpg")).unwrap();
    let bad = vec![
        class.join("truncated.jpg"),
        class.join("empty.jpg"),
        class.join("text.jpg"),
    ];
    std::fs::write(&bad[0], &good[..good.len() / 3]).unwrap();
    std::fs::write(&bad[1], b"").unwrap();
    std::fs::write(
        &bad[2],
        b"this is not a JPEG, just text with the wrong name\n",
    )
    .unwrap();
    bad
}

#[test]
fn unreadable_files_are_skipped_counted_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let bad = folder_with_bad_files(&data);
    let dir = tmp.path().join("run");
    let path = format!("data.path=\"{}\"", data.display());
    // 8 files, batch 4: two batches per epoch; 3 epochs visit every file.
    let mut t = trainer(
        &dir,
        small(&["data.source=\"folder\"", &path, "data.prefetch=2"]),
    );
    let s = t.run(Some(6)).unwrap();
    let mut want: Vec<String> = bad.iter().map(|p| p.display().to_string()).collect();
    want.sort();
    assert_eq!(s.skipped, want);
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["skipped_files"], 3);
    assert!(last["loss"].as_f64().unwrap().is_finite());
}

/// Each unreadable file is warned about once, however often the epochs draw it (here three
/// files, three epochs); the run's summary counts them.
#[test]
fn one_warning_per_unreadable_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let bad = folder_with_bad_files(&data);
    let out_dir = tmp.path().join("run");
    let path = format!("data.path=\"{}\"", data.display());
    let sets = small(&["data.source=\"folder\"", &path, "data.prefetch=2"]);
    let out = cim_run(
        &with_sets(
            &["--preset", "quickstart", "--out", out_dir.to_str().unwrap()],
            &sets,
        ),
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("skipping unreadable image").count(),
        bad.len(),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("skipped {} unreadable files", bad.len())),
        "{stdout}"
    );
}

#[test]
fn folders_without_images_are_an_error_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("empty/class")).unwrap();
    std::fs::write(tmp.path().join("empty/class/notes.txt"), "x").unwrap();
    for p in ["empty", "missing"] {
        let res = resolve(&Layers {
            preset: Some("quickstart".into()),
            config_files: vec![],
            set: vec![
                "data.source=\"folder\"".into(),
                format!("data.path=\"{}\"", tmp.path().join(p).display()),
            ],
            env: false,
        })
        .unwrap();
        let e = Trainer::new(res, tmp.path().join(format!("run-{p}")))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(p), "{e}");
    }
}

#[test]
fn accumulation_must_divide_the_batch() {
    // Refused when the configuration is resolved, before anything is built.
    let e = resolve(&Layers {
        preset: Some("quickstart".into()),
        config_files: vec![],
        set: small(&["train.accum_steps=3"]),
        env: false,
    })
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("train.accum_steps = 3") && e.contains("batch_size = 4"),
        "{e}"
    );
}

#[test]
fn pictures_and_loss_curve_are_valid_pngs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    trainer(&dir, small(&["run.picture_every=2"]))
        .run(Some(4))
        .unwrap();
    for step in [2, 4] {
        let p = dir.join(format!("pictures/step-{step:08}.png"));
        let img = image::open(&p).unwrap().to_rgb8();
        // 4 rows (batch 4) of 64-px tiles drawn at 128 px, 5 titled columns for RESPIX.
        assert_eq!(img.dimensions(), (5 * 132 + 4, 24 + 4 * 132 + 4), "{p:?}");
    }
    // One panel per loss: loss, loss_mim, loss_respix side by side.
    let curve = image::open(dir.join("loss_curve.png")).unwrap().to_rgb8();
    assert_eq!(curve.dimensions(), (3 * 420, 40 + 320));
    // Not a blank canvas: the curves put colour on it.
    let coloured = curve
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0;
            r.max(g).max(b) - r.min(g).min(b) > 60
        })
        .count();
    assert!(coloured > 500, "{coloured} coloured pixels");
}

#[test]
fn tokenize_prints_token_grids_and_writes_the_reconstruction() {
    let tmp = tempfile::tempdir().unwrap();
    let assets = format!(
        "{}/../cim-runner/assets/quickstart",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = tmp.path().join("recon.png");
    let args = cim_runner::inspect::TokenizeArgs {
        layers: cim_run::cli::ConfigArgs {
            preset: Some("quickstart".into()),
            ..Default::default()
        }
        .layers(),
        images: vec![
            format!("{assets}/chelsea.jpg").into(),
            format!("{assets}/coffee.jpg").into(),
        ],
        decode: Some(out.clone()),
    };
    let t = cim_runner::inspect::tokenize(&args).unwrap();
    assert_eq!(t.len(), 2);
    for r in &t {
        assert_eq!(r.tokenizer, "vq");
        assert_eq!(r.grid, [8, 8]);
        assert_eq!(r.tokens.len(), 8);
        assert!(r
            .tokens
            .iter()
            .all(|row| row.len() == 8 && row.iter().all(|&i| i < 512)));
        assert!(r.distinct > 10, "{r:?}");
        // The embedded VQ tokenizer reconstructs a photo's 32-px view recognisably (blurred:
        // coffee.jpg 17.98 dB, CIFAR-10 test images 23.05 dB on average).
        assert!(r.psnr_db > 16.0, "{r:?}");
    }
    // Two titled columns (view, reconstruction) of 32-px tiles drawn at 128 px, two rows.
    let png = image::open(&out).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (2 * 132 + 4, 24 + 2 * 132 + 4));
}

#[test]
fn cmyk_and_grayscale_jpegs_decode_to_rgb() {
    // cmyk.jpg (make_cmyk.py): left half cyan, right half yellow, stored as CMYK.
    let bytes = std::fs::read(format!(
        "{}/tests/fixtures/cmyk.jpg",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let img = cim_runner::data::decode_image(&bytes).unwrap();
    assert_eq!(img.dimensions(), (16, 16));
    let [r, g, b] = img.get_pixel(2, 8).0;
    assert!(r < 60 && g > 200 && b > 200, "cyan, got {:?}", (r, g, b));
    let [r, g, b] = img.get_pixel(13, 8).0;
    assert!(r > 200 && g > 200 && b < 60, "yellow, got {:?}", (r, g, b));
    // Grayscale JPEG: three equal channels.
    let gray = image::GrayImage::from_fn(8, 8, |x, _| image::Luma([(x * 30) as u8]));
    let mut buf = vec![];
    image::DynamicImage::ImageLuma8(gray)
        .write_to(
            &mut std::io::Cursor::new(&mut buf),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let rgb = cim_runner::data::decode_image(&buf).unwrap();
    let p = rgb.get_pixel(5, 3).0;
    assert!(p[0] == p[1] && p[1] == p[2] && p[0] > 100, "{p:?}");
}

/// Trains the quickstart pipeline (with `extra` settings) in f32 and in bf16 on the same seed,
/// batches and masks: the first step's loss within 1 % and gradient norm within `first_norm` of
/// f32's, every later loss within `drift` of f32's and not all equal, master weights and optimizer state
/// f32, every parameter moved.
fn check_bf16_against_f32(extra: &[&str], (first_norm, drift): (f64, f64)) {
    let tmp = tempfile::tempdir().unwrap();
    let set = |precision: &str| {
        let p = format!("run.precision={precision}");
        let mut all = extra.to_vec();
        all.push(&p);
        small(&all)
    };
    let run = |name: &str, precision: &str| -> (Vec<f64>, Vec<f64>, Trainer) {
        let dir = tmp.path().join(name);
        let mut t = trainer(&dir, set(precision));
        t.run(None).unwrap();
        (losses(&dir), metric(&dir, "grad_norm"), t)
    };
    let (f32_losses, f32_norms, _) = run("f32", "f32");
    let (bf16_losses, bf16_norms, t) = run("bf16", "bf16");
    assert_eq!(t.cim.compute, candle_core::DType::BF16);
    // Same seed, same batches and masks: bf16 rounding (8-bit mantissa) moves the losses a little.
    // The first step is the forward and backward alone (no update has diverged yet): its loss and
    // gradient norm agree closely; later steps drift as the two runs' weights part.
    let close = |a: f64, b: f64, tol: f64| b.is_finite() && (a - b).abs() < tol * a.abs();
    assert!(
        close(f32_losses[0], bf16_losses[0], 0.01)
            && close(f32_norms[0], bf16_norms[0], first_norm),
        "first step: f32 loss {} / grad norm {} vs bf16 {} / {}",
        f32_losses[0],
        f32_norms[0],
        bf16_losses[0],
        bf16_norms[0]
    );
    for (a, b) in f32_losses.iter().zip(&bf16_losses) {
        assert!(
            close(*a, *b, drift),
            "f32 {a} vs bf16 {b}: {f32_losses:?} vs {bf16_losses:?}"
        );
    }
    assert_ne!(
        f32_losses, bf16_losses,
        "bf16 must actually compute in bf16"
    );
    // Master weights and optimizer state stay f32, and every parameter moved.
    let fresh = trainer(&tmp.path().join("fresh"), set("bf16"));
    for ((name, v), (_, v0)) in t
        .cim
        .params
        .vars()
        .iter()
        .zip(fresh.cim.params.vars().iter())
    {
        assert_eq!(v.dtype(), candle_core::DType::F32, "{name}");
        let d = (v.as_tensor() - v0.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d > 0.0, "{name} did not change");
    }
    assert!(t
        .optimizer()
        .state()
        .unwrap()
        .values()
        .all(|s| s.dtype() == candle_core::DType::F32));
}

#[test]
fn bf16_mixed_precision_trains_with_f32_masters_close_to_f32() {
    check_bf16_against_f32(&[], (0.02, 0.03));
}

/// ResNet-50 in bf16: convolutions in bf16 forward with f32 weight gradients, BatchNorm in f32.
#[test]
fn bf16_resnet_trains_with_f32_masters_close_to_f32() {
    check_bf16_against_f32(
        &[
            "enhancer.name=\"resnet50\"",
            "enhancer.resnet50.layers=[1, 1, 1, 1]",
            "enhancer.resnet50.width=8",
            "generator.beit.width=96",
        ],
        // Training-mode BatchNorm normalises layer4's 2×2 maps over 4 images — 16 values per
        // channel — and its backward amplifies bf16's rounding: the first step's gradient norm
        // measured 6.68 against f32's 6.34 (5.3 %; losses 0.05 % apart). Later losses part as the
        // runs' weights do (Adam steps every weight by ~lr whatever its gradient's size).
        (0.08, 0.05),
    );
}

#[test]
fn bf16_is_refused_for_an_enhancer_without_a_mixed_precision_path() {
    use cim_runner::config::Precision;
    let e = cim_runner::config::validate_precision(Precision::Bf16, "my_enhancer")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("run.precision") && e.contains("my_enhancer"),
        "{e}"
    );
    assert!(cim_runner::config::validate_precision(Precision::Bf16, "resnet50").is_ok());
    assert!(cim_runner::config::validate_precision(Precision::F32, "my_enhancer").is_ok());
}

/// Started by a launcher as rank 1 of 2 (torchrun's variables): a subcommand refuses to run as
/// one of several copies, and training in a binary without a backend for the device says which
/// build it needs — both naming the rank.
#[test]
fn launched_as_one_of_several_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cim-run"))
            .args(args)
            .env("RANK", "1")
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", "1")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["plot", tmp.path().to_str().unwrap()]);
    assert!(
        e.contains("rank 1 of 2 (torchrun") && e.contains("subcommands run in one process"),
        "{e}"
    );
    let out = tmp.path().join("r");
    let mut args = vec!["--steps", "1", "--out", out.to_str().unwrap()];
    let sets = small(&[]);
    args.extend(with_sets(&[], &sets));
    let e = run(&args);
    assert!(e.contains("rank 1 of 2 (torchrun"), "{e}");
    if cfg!(not(feature = "mpi")) {
        assert!(
            e.contains("needs a cim-run built with `--features mpi`"),
            "{e}"
        );
    }
}
