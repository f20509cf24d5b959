//! End-to-end CiM runs on CPU: the quickstart, the pipeline's gradient routing, the divergence
//! guard, and a few hundred steps of the tiny CIFAR-10 preset.

use std::path::Path;

use candle_core::{DType, Device};
use rand::SeedableRng;

use cim_runner::config::{resolve, Layers};
use cim_runner::data::Loader;
use cim_runner::pipeline::{Cim, StepRngs};

fn layers(preset: &str, set: &[&str]) -> Layers {
    Layers {
        preset: Some(preset.into()),
        config_files: vec![],
        set: set.iter().map(|s| s.to_string()).collect(),
        env: false,
    }
}

fn cli(args: &[&str]) -> anyhow::Result<()> {
    let mut v = vec!["cim-run".to_string()];
    v.extend(args.iter().map(|s| s.to_string()));
    cim_run::cli::run(v)
}

fn read_metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// One forward pass of `cim` on the first batch (of `batch` images) of the run's data.
fn forward_first_batch(
    cim: &Cim,
    res: &cim_runner::config::Resolved,
    batch: usize,
) -> cim_runner::pipeline::StepOutput {
    let data = cim_runner::data::open(&res.cfg.data).unwrap();
    let loader = Loader::new(data, res.cfg.data.clone(), batch, 0).unwrap();
    cim.forward(&loader.batch(0, &Device::Cpu).unwrap(), &mut rngs())
        .unwrap()
}

/// Whether a gradient exists and has a non-zero entry.
fn nonzero(g: Option<&candle_core::Tensor>) -> bool {
    g.map(|g| {
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    })
    .unwrap_or(false)
}

fn rngs() -> StepRngs {
    StepRngs {
        mask: rand::rngs::StdRng::seed_from_u64(1),
        sample: rand::rngs::StdRng::seed_from_u64(2),
    }
}

#[test]
fn quickstart_runs_and_writes_its_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    cli(&[
        "--preset",
        "quickstart",
        "--steps",
        "4",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    let m = read_metrics(&out);
    assert_eq!(m.len(), 4);
    for (i, rec) in m.iter().enumerate() {
        assert_eq!(rec["step"], i + 1);
        for k in [
            "loss",
            "loss_mim",
            "loss_respix",
            "grad_norm",
            "lr",
            "images_per_s",
        ] {
            let v = rec[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{k} missing in {rec}"));
            assert!(v.is_finite(), "{k} = {v}");
        }
        let total = rec["loss"].as_f64().unwrap();
        let parts = rec["loss_mim"].as_f64().unwrap() + 10.0 * rec["loss_respix"].as_f64().unwrap();
        assert!(
            (total - parts).abs() < 1e-3 * total,
            "total {total} ≠ mim + 10·respix {parts}"
        );
    }
    // Weights: every trainable component, nothing of the frozen tokenizer.
    let w = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    for prefix in ["generator.", "enhancer.", "objective."] {
        assert!(
            w.keys().any(|k| k.starts_with(prefix)),
            "no {prefix}* in the checkpoint"
        );
    }
    assert!(!w.keys().any(|k| k.starts_with("tokenizer.")));
    // The picture grid is a valid PNG: 8 rows of 64-px tiles drawn at 128 px under a title band,
    // 5 columns (RESPIX adds two).
    let png = image::open(out.join("samples.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (5 * 132 + 4, 24 + 8 * 132 + 4));
    // TensorBoard: every step's numbers as scalars, the same values as metrics.jsonl.
    let events: Vec<_> = std::fs::read_dir(out.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let scalars = cim::run::tensorboard::read_scalars(&events[0]).unwrap();
    let loss: Vec<(u64, f32)> = scalars
        .iter()
        .filter(|s| s.tag == "loss")
        .map(|s| (s.step, s.value))
        .collect();
    let want: Vec<(u64, f32)> = m
        .iter()
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["loss"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(loss, want);
    assert!(scalars
        .iter()
        .any(|s| s.tag == "phase_ms/backward" && s.step == 4));
    // The resolved config loads back.
    let again = resolve(&Layers {
        preset: None,
        config_files: vec![out.join("config.toml")],
        set: vec![],
        env: false,
    })
    .unwrap();
    assert_eq!(again.cfg.data.image_size, 64);
    // A second run into the same directory is refused instead of overwriting it.
    let e = cli(&[
        "--preset",
        "quickstart",
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("already holds a run"), "{e}");
}

#[test]
fn masked_count_matches_config() {
    for (set, lo, hi) in [
        (
            vec!["masking.random.mode=count", "masking.random.count=[20, 30]"],
            20,
            30,
        ),
        (
            vec![
                "masking.random.mode=ratio",
                "masking.random.ratio=[0.25, 0.5]",
            ],
            16,
            32,
        ),
    ] {
        let res = resolve(&layers("quickstart", &set)).unwrap();
        let cim = Cim::build(&res).unwrap();
        let data = cim_runner::data::open(&res.cfg.data).unwrap();
        let loader = Loader::new(data, res.cfg.data.clone(), 8, 0).unwrap();
        let mut r = rngs();
        for step in 0..3 {
            let out = cim
                .forward(&loader.batch(step, &Device::Cpu).unwrap(), &mut r)
                .unwrap();
            for k in out.mask.counts() {
                assert!((lo..=hi).contains(&k), "{set:?}: {k} masked");
            }
        }
    }
}

/// No gradient from the enhancer's loss reaches the generator, none of the MIM loss reaches the
/// enhancer, and the total reaches every trainable variable.
#[test]
fn gradients_are_routed_as_in_the_paper() {
    let res = resolve(&layers("quickstart", &[])).unwrap();
    let cim = Cim::build(&res).unwrap();
    let out = forward_first_batch(&cim, &res, 4);
    let vars = cim.params.vars();
    let enh_grads = out.objective.backward().unwrap();
    let mim_grads = out.mim.backward().unwrap();
    let all = out.total.backward().unwrap();
    for (name, var) in &vars {
        let t = var.as_tensor();
        let is_gen = name.starts_with("generator.");
        assert_eq!(
            nonzero(enh_grads.get(t)),
            !is_gen,
            "objective-loss gradient on {name}"
        );
        assert_eq!(nonzero(mim_grads.get(t)), is_gen, "MIM gradient on {name}");
        assert!(nonzero(all.get(t)), "no gradient on {name}");
    }
    assert!(
        vars.iter().any(|(n, _)| n.starts_with("generator."))
            && vars.iter().any(|(n, _)| n.starts_with("enhancer."))
    );
    assert_eq!(
        cim.frozen
            .vars()
            .iter()
            .filter(|(_, v)| all.get(v.as_tensor()).is_some())
            .count(),
        0
    );
}

/// The training step's gradients under a `GradSink` (how `cim-run` differentiates: fused nodes
/// hand their parameters' gradients to the sink, not to candle's graph) equal the plain graph's
/// for every trainable variable, the blocks the generator shares with the enhancer included.
#[test]
fn sunk_gradients_equal_the_graph_ones_for_every_variable() {
    let res = resolve(&layers("quickstart", &["generator.beit.share_blocks=2"])).unwrap();
    let cim = Cim::build(&res).unwrap();
    let plain = forward_first_batch(&cim, &res, 4).total.backward().unwrap();
    let sink = cim_ops::GradSink::install();
    let out = forward_first_batch(&cim, &res, 4);
    let sunk = sink.backward(&out.total).unwrap();
    drop(sink);
    let vars = cim.params.vars();
    for (name, var) in &vars {
        let (a, b) = (sunk.get(var.as_tensor()), plain.get(var.as_tensor()));
        let (a, b) = (a.expect(name), b.expect(name));
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-5 * scale, "{name}: {d} (scale {scale})");
    }
    assert!(vars
        .iter()
        .any(|(n, _)| n.contains("blocks.1.attn.qkv.weight")));
}

/// The dVAE's map layout is a configuration choice that changes nothing but speed: channels last
/// (`tokenizer.dalle_dvae.layout = "nhwc"`, on the CPU its convolutions between transposes) gives
/// the step the same losses as channels first.
#[test]
fn dvae_layouts_give_the_same_step() {
    let loss = |layout: &str| {
        let set = [
            "tokenizer.name=\"dalle_dvae\"".to_string(),
            format!("tokenizer.dalle_dvae.layout=\"{layout}\""),
        ];
        let set: Vec<&str> = set.iter().map(String::as_str).collect();
        let res = resolve(&layers("quickstart", &set)).unwrap();
        let cim = Cim::build(&res).unwrap();
        let out = forward_first_batch(&cim, &res, 4);
        out.total.to_scalar::<f32>().unwrap()
    };
    assert_eq!(loss("nhwc").to_bits(), loss("nchw").to_bits());
    let e = resolve(&layers(
        "quickstart",
        &["tokenizer.dalle_dvae.layout=\"nwhc\""],
    ))
    .and_then(|r| Cim::build(&r).map(|_| ()))
    .unwrap_err()
    .to_string();
    assert!(e.contains("nwhc"), "{e}");
}

#[test]
fn divergence_stops_the_run_naming_step_and_loss() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let e = cli(&[
        "--preset",
        "quickstart",
        "--steps",
        "30",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.lr=1e12",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "train.clip_grad=0",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("step ") && (e.contains("NaN") || e.contains("inf")),
        "{e}"
    );
    // The steps before the failure were logged; the failing one was not.
    let m = read_metrics(&out);
    assert!(m.len() < 30);
    for rec in &m {
        assert!(rec["loss"].as_f64().is_some_and(f64::is_finite));
    }
}

/// CIFAR-10's binary files (`train.bin`, `test.bin`) for the tests that train on it: the folder
/// `CIFAR10_DIR` names, when it holds them (`.ci/run` sets it where the data set is at hand).
fn cifar10_dir() -> Option<String> {
    let dir = std::env::var("CIFAR10_DIR").ok()?;
    Path::new(&dir).join("train.bin").exists().then_some(dir)
}

/// A few hundred CPU steps of the tiny CIFAR-10 preset: both losses fall.
#[test]
fn tiny_cifar10_losses_fall() {
    let Some(data) = cifar10_dir() else {
        eprintln!("SKIPPED tiny_cifar10_losses_fall: set CIFAR10_DIR to CIFAR-10's binary files");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    cli(&[
        "--preset",
        "tiny_vit_respix",
        "--steps",
        "300",
        "--out",
        out.to_str().unwrap(),
        "--set",
        &format!("data.path={data}"),
    ])
    .unwrap();
    let m = read_metrics(&out);
    assert_eq!(m.len(), 300);
    let mean = |k: &str, r: std::ops::Range<usize>| {
        r.clone().map(|i| m[i][k].as_f64().unwrap()).sum::<f64>() / r.len() as f64
    };
    let (mim0, mim1) = (mean("loss_mim", 0..10), mean("loss_mim", 250..300));
    let (enh0, enh1) = (mean("loss_respix", 0..10), mean("loss_respix", 250..300));
    eprintln!("loss_mim {mim0:.4} → {mim1:.4}; loss_respix {enh0:.4} → {enh1:.4}");
    // Measured with the embedded vq tokenizer (release build): loss_mim 6.225 → 5.536 (×0.889),
    // loss_respix 1.263 → 1.166 (×0.923). vq's tokens are harder to predict than patch_kmeans's.
    assert!(
        mim1 < 0.93 * mim0,
        "generator loss did not fall: {mim0} → {mim1}"
    );
    assert!(
        enh1 < 0.95 * enh0,
        "enhancer loss did not fall: {enh0} → {enh1}"
    );
}

/// Paper Table 5: the generator reuses the enhancer's patch embedding and first 2 blocks — one
/// set of variables, trained by both losses.
#[test]
fn weight_sharing_uses_one_set_of_variables_trained_by_both_losses() {
    let res = resolve(&layers("quickstart", &["generator.beit.share_blocks=2"])).unwrap();
    let cim = Cim::build(&res).unwrap();
    let vars = cim.params.vars();
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    for gone in [
        "generator.patch_embed.",
        "generator.blocks.0.",
        "generator.blocks.1.",
    ] {
        assert!(
            !names.iter().any(|n| n.starts_with(gone)),
            "{gone}* should be the enhancer's"
        );
    }
    assert!(names.iter().any(|n| n.starts_with("generator.blocks.2.")));
    let out = forward_first_batch(&cim, &res, 4);
    let mim = out.mim.backward().unwrap();
    let enh = out.objective.backward().unwrap();
    let mut shared = 0;
    for (name, var) in &vars {
        let is_shared = [
            "enhancer.patch_embed.",
            "enhancer.blocks.0.",
            "enhancer.blocks.1.",
        ]
        .iter()
        .any(|p| name.starts_with(p));
        if is_shared {
            shared += 1;
            assert!(
                nonzero(mim.get(var.as_tensor())) && nonzero(enh.get(var.as_tensor())),
                "{name} needs both gradients"
            );
        } else if name.starts_with("enhancer.") {
            assert!(
                !nonzero(mim.get(var.as_tensor())),
                "{name} is not shared but got MIM gradient"
            );
        }
    }
    // patch_embed (2) + 2 blocks × 12 tensors.
    assert_eq!(shared, 2 + 2 * 12);
}

#[test]
fn weight_sharing_is_refused_for_a_resnet_enhancer() {
    let res = resolve(&layers(
        "quickstart",
        &[
            "enhancer.name=resnet50",
            "enhancer.resnet50.width=8",
            "enhancer.resnet50.layers=[1,1,1,1]",
            "generator.beit.width=64",
            "generator.beit.share_blocks=2",
        ],
    ))
    .unwrap();
    let e = Cim::build(&res)
        .err()
        .expect("sharing with a ResNet must fail")
        .to_string();
    assert!(
        e.contains("share_blocks") && e.contains("needs a ViT enhancer"),
        "{e}"
    );
}

/// Every tiny preset: 100 CPU steps with finite losses and a falling generator loss.
#[test]
fn every_tiny_preset_trains_for_100_steps() {
    let Some(data) = cifar10_dir() else {
        eprintln!(
            "SKIPPED every_tiny_preset_trains_for_100_steps: set CIFAR10_DIR to CIFAR-10's binary files"
        );
        return;
    };
    for preset in cim_runner::config::preset_names()
        .into_iter()
        .filter(|p| p.starts_with("tiny_"))
    {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        cli(&[
            "--preset",
            preset,
            "--steps",
            "100",
            "--out",
            out.to_str().unwrap(),
            "--set",
            &format!("data.path={data}"),
        ])
        .unwrap_or_else(|e| panic!("{preset}: {e}"));
        let m = read_metrics(&out);
        assert_eq!(m.len(), 100, "{preset}");
        assert!(
            m.iter()
                .all(|r| r["loss"].as_f64().is_some_and(f64::is_finite)),
            "{preset}"
        );
        let mean = |r: std::ops::Range<usize>| {
            r.clone()
                .map(|i| m[i]["loss_mim"].as_f64().unwrap())
                .sum::<f64>()
                / r.len() as f64
        };
        let (a, b) = (mean(0..10), mean(80..100));
        eprintln!("{preset}: loss_mim {a:.4} → {b:.4}");
        assert!(b < 0.95 * a, "{preset}: generator loss {a} → {b}");
    }
}

/// The paper-sized presets build (full widths, 224 px, the 8192-token dVAE) and take one step at
/// batch 2 on the CPU, on the embedded photographs.
#[test]
fn full_size_presets_build_and_take_one_step() {
    for preset in [
        "vit_s16_respix",
        "vit_s16_revdet",
        "vit_b16_respix",
        "vit_b16_revdet",
        "resnet50_respix",
        "resnet50_revdet",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        cli(&[
            "--preset",
            preset,
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "data.source=quickstart",
            "--set",
            "train.batch_size=2",
            "--set",
            "train.micro_batch=2",
            "--set",
            "run.device=cpu",
            "--set",
            "tokenizer.dalle_dvae.weights=random",
        ])
        .unwrap_or_else(|e| panic!("{preset}: {e}"));
        let m = read_metrics(&out);
        assert_eq!(m.len(), 1);
        assert!(
            m[0]["loss"].as_f64().is_some_and(f64::is_finite),
            "{preset}: {}",
            m[0]
        );
        // 100–120 of 196 masked.
        let frac = m[0]["mask_frac"].as_f64().unwrap();
        assert!(
            (100.0 / 196.0 - 1e-9..=120.0 / 196.0 + 1e-9).contains(&frac),
            "{preset}: mask_frac {frac}"
        );
    }
}

/// The paper presets refuse to pre-train on a random dVAE unless asked to: without weights the
/// error says where OpenAI's come from and how to ask for a random one; with
/// `weights = "random"` the pipeline builds.
#[test]
fn paper_presets_refuse_a_random_dvae_unless_asked() {
    for preset in ["vit_b16_respix", "resnet50_revdet"] {
        let res = resolve(&Layers::preset(preset)).unwrap();
        let e = match Cim::build(&res) {
            Ok(_) => panic!("{preset}: built on a random dVAE without being asked"),
            Err(e) => e.to_string(),
        };
        for want in [
            "tokenizer.dalle_dvae.weights",
            "https://cdn.openai.com/dall-e/encoder.pkl",
            "tools/convert_dalle.py",
            "\"random\"",
        ] {
            assert!(e.contains(want), "{preset}: {want} missing from: {e}");
        }
    }
    let res = resolve(&Layers {
        set: vec!["tokenizer.dalle_dvae.weights=\"random\"".into()],
        ..Layers::preset("vit_b16_respix")
    })
    .unwrap();
    Cim::build(&res).unwrap();
}
