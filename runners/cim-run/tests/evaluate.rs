//! `probe` and `finetune` end to end on a small synthetic labelled set in CIFAR-10's binary format.

use std::path::Path;

use cim_run::cli::ConfigArgs;
use cim_runner::config::{resolve, Layers};
use cim_runner::finetune::{finetune, read_curve, FinetuneArgs};
use cim_runner::probe::{probe, Init, Pooling, ProbeArgs};
use cim_runner::train::Trainer;

/// CIFAR-10 records whose class is visible: class `c` has a colour ramp whose hue and stripe
/// period depend on `c`, plus per-image noise.
fn write_cifar(dir: &Path, split: &str, n: usize, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut bytes = Vec::with_capacity(n * 3073);
    for i in 0..n {
        let c = (i % 10) as u8;
        bytes.push(c);
        for ch in 0..3u32 {
            for p in 0..1024u32 {
                let (x, y) = (p % 32, p / 32);
                let stripe = ((x + y * (c as u32 % 3)) / (2 + c as u32 / 3)) % 2;
                let base = (40 + 20 * ((c as u32 + ch * 3) % 10)) as i32;
                let v = base + 60 * stripe as i32 + rng.gen_range(-20..=20);
                bytes.push(v.clamp(0, 255) as u8);
            }
        }
    }
    std::fs::write(dir.join(format!("{split}.bin")), bytes).unwrap();
}

/// A 3-step tiny ViT pre-training run on the synthetic set.
fn pretrain(root: &Path) -> std::path::PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_cifar(&data, "train", 400, 1);
    write_cifar(&data, "test", 100, 2);
    let run = root.join("pre");
    let res = resolve(&Layers {
        preset: Some("tiny_vit_respix".into()),
        config_files: vec![],
        set: vec![
            format!("data.path=\"{}\"", data.display()),
            "train.batch_size=8".into(),
            "train.total_steps=3".into(),
        ],
        env: false,
    })
    .unwrap();
    Trainer::new(res, run.clone()).unwrap().run(None).unwrap();
    run
}

#[test]
fn probe_scores_pretrained_and_scratch_features_and_caches_them() {
    let tmp = tempfile::tempdir().unwrap();
    let run = pretrain(tmp.path());
    let args = |init| ProbeArgs {
        run_dir: run.clone(),
        data: cim_runner::config::DataSource::Cifar10,
        path: Some(tmp.path().join("data")),
        layers: ConfigArgs::default().layers(),
        feature: Pooling::Both,
        init,
        train_limit: 0,
        test_limit: 0,
        k: 20,
        temperature: 0.07,
        batch: 64,
    };
    let r = probe(&args(Init::Pretrained)).unwrap();
    assert_eq!((r.train_images, r.test_images, r.classes), (400, 100, 10));
    assert_eq!(r.dim, 2 * 64, "mean ⊕ cls of a 64-wide ViT");
    // The classes are linearly visible in any reasonable features: far above chance (10 %).
    assert!(r.linear.top1 > 0.5, "{r:?}");
    assert!(r.knn.top1 > 0.3, "{r:?}");
    assert!(r.linear.top5 >= r.linear.top1 && r.knn.top5 >= r.knn.top1);
    let cached = std::fs::read_dir(run.join("probe")).unwrap().count();
    assert_eq!(cached, 2, "train and test features cached");
    let again = probe(&args(Init::Pretrained)).unwrap();
    assert_eq!(again.linear.top1, r.linear.top1);
    assert_eq!(again.images_per_s, 0.0, "second call extracts nothing");
    let scratch = probe(&args(Init::Scratch)).unwrap();
    assert_eq!(std::fs::read_dir(run.join("probe")).unwrap().count(), 4);
    assert!(scratch.linear.top1 > 0.0);
    // ResNet-style `cls` on a ViT works; a bad folder is a clear error.
    let mut bad = args(Init::Pretrained);
    bad.path = Some(tmp.path().join("nowhere"));
    let e = probe(&bad).err().unwrap().to_string();
    assert!(e.contains("nowhere"), "{e}");
}

#[test]
fn finetune_trains_evaluates_and_keeps_best_and_last() {
    let tmp = tempfile::tempdir().unwrap();
    let run = pretrain(tmp.path());
    let data = tmp.path().join("data");
    let ft = |init, out: &str| FinetuneArgs {
        run_dir: run.clone(),
        layers: ConfigArgs {
            preset: Some("ft_tiny_cifar10".into()),
            config: vec![],
            set: vec![
                format!("data.path=\"{}\"", data.display()),
                "finetune.batch_size=40".into(),
                "finetune.epochs=2".into(),
                "finetune.warmup_epochs=0".into(),
                "finetune.lr=5e-3".into(),
            ],
        }
        .layers(),
        init,
        out: Some(tmp.path().join(out)),
    };
    let s = finetune(&ft(Init::Pretrained, "ft")).unwrap();
    assert_eq!(
        (s.steps, s.curve.len()),
        (20, 2),
        "2 epochs of 10 steps, one eval each"
    );
    for r in &s.curve {
        assert!((0.0..=1.0).contains(&r.top1) && r.top5 >= r.top1, "{r:?}");
        assert!(r.train_loss.is_finite());
    }
    assert!(s.best_top1 > 0.2, "learns the visible classes: {s:?}");
    let best = candle_core::safetensors::load(
        tmp.path().join("ft/best.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(best.contains_key("head.weight") && best.contains_key("fc_norm.weight"));
    assert!(best.keys().any(|k| k.starts_with("enhancer.blocks.")));
    assert!(!best.keys().any(|k| k.starts_with("generator.")));
    assert_eq!(best["head.weight"].dims(), &[10, 64]);
    assert!(tmp.path().join("ft/last.safetensors").is_file());
    assert_eq!(read_curve(&tmp.path().join("ft")).unwrap().len(), 2);
    // The control row runs the identical recipe from random initialisation.
    let scratch = finetune(&ft(Init::Scratch, "ft-scratch")).unwrap();
    assert_eq!(scratch.steps, 20);
    // Refuses to overwrite.
    let e = finetune(&ft(Init::Pretrained, "ft"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("already holds"), "{e}");
}
