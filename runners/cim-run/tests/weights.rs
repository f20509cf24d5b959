//! Weight sources end to end: `hub:` keys resolved through a fake Hugging Face cache (no network),
//! the offline error, and trainable components initialised from files.

use std::path::{Path, PathBuf};
use std::process::Command;

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn fixture_dvae() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dalle/dvae_small.safetensors")
}

/// `tokenize` on two embedded photos with the fixture dVAE's sizes and `weights`, under HF_HOME.
fn tokenize(weights: &str, hf_home: &Path, offline: bool) -> std::process::Output {
    let assets = format!(
        "{}/../cim-runner/assets/quickstart",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut c = Command::new(env!("CARGO_BIN_EXE_cim-run"));
    c.args(["tokenize", "--preset", "quickstart"]);
    for s in [
        "tokenizer.name=dalle_dvae",
        "tokenizer.dalle_dvae.vocab_size=64",
        "tokenizer.dalle_dvae.n_hid=16",
        "tokenizer.dalle_dvae.dec_n_hid=16",
        "tokenizer.dalle_dvae.dec_n_init=8",
        "tokenizer.dalle_dvae.group_count=3",
        "tokenizer.dalle_dvae.n_blk_per_group=2",
        &format!("tokenizer.dalle_dvae.weights={weights}"),
    ] {
        c.args(["--set", s]);
    }
    c.arg(format!("{assets}/chelsea.jpg"))
        .arg(format!("{assets}/coffee.jpg"))
        .env("RUST_LOG", "warn")
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        // A closed loopback port: were anything to go online, it would fail at once.
        .env("HF_ENDPOINT", "http://127.0.0.1:9");
    if offline {
        c.env("HF_HUB_OFFLINE", "1");
    } else {
        c.env_remove("HF_HUB_OFFLINE");
    }
    c.output().unwrap()
}

#[test]
fn hub_weights_come_from_the_cache_and_match_the_local_file() {
    let tmp = tempfile::tempdir().unwrap();
    // The cache layout huggingface_hub writes: refs/main → commit → snapshots/commit/FILE.
    let repo = tmp.path().join("hub/models--acme--dvae-small");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(fixture_dvae(), snap.join("dvae.safetensors")).unwrap();

    let local = tokenize(fixture_dvae().to_str().unwrap(), tmp.path(), true);
    assert!(
        local.status.success(),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    for online in [false, true] {
        let hub = tokenize("hub:acme/dvae-small/dvae.safetensors", tmp.path(), !online);
        assert!(
            hub.status.success(),
            "{}",
            String::from_utf8_lossy(&hub.stderr)
        );
        // Same tokens (the JSON lines differ only in nothing: same images, same weights).
        assert_eq!(
            String::from_utf8_lossy(&hub.stdout),
            String::from_utf8_lossy(&local.stdout)
        );
    }
    let line = String::from_utf8_lossy(&local.stdout);
    assert!(line.contains("\"tokenizer\":\"dalle_dvae\""), "{line}");
}

#[test]
fn hub_weights_missing_offline_fail_with_repo_file_and_remedy() {
    let tmp = tempfile::tempdir().unwrap();
    for offline in [true, false] {
        let out = tokenize(
            "hub:openai/dall-e@main/dvae.safetensors",
            tmp.path(),
            offline,
        );
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        for part in [
            "tokenizer.dalle_dvae.weights",
            "`openai/dall-e`",
            "`dvae.safetensors`",
            "huggingface-cli download",
            "local path",
        ] {
            assert!(
                err.contains(part),
                "`{part}` missing (offline {offline}): {err}"
            );
        }
        let why = if offline {
            "HF_HUB_OFFLINE is set"
        } else {
            "could not be downloaded from http://127.0.0.1:9"
        };
        assert!(err.contains(why), "{err}");
    }
}

mod init {
    use std::collections::BTreeMap;
    use std::path::Path;

    use candle_core::{Device, Tensor};
    use cim_runner::config::{resolve, Layers};
    use cim_runner::train::Trainer;

    fn trainer(dir: &Path, extra: &[String]) -> cim_api::Result<Trainer> {
        let mut set: Vec<String> = [
            "train.batch_size=4",
            "train.total_steps=2",
            "train.warmup_steps=1",
            "run.log_every=1000",
            "run.seed=7",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        set.extend(extra.iter().cloned());
        let res = resolve(&Layers {
            preset: Some("quickstart".into()),
            config_files: vec![],
            set,
            env: false,
        })?;
        Trainer::new(res, dir.to_path_buf())
    }

    fn values(t: &Trainer, prefix: &str) -> BTreeMap<String, Vec<f32>> {
        t.cim
            .params
            .vars()
            .into_iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    }

    fn file(path: &Path) -> std::collections::HashMap<String, Tensor> {
        candle_core::safetensors::load(path, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect()
    }

    #[test]
    fn components_start_from_run_files_and_exports_and_bad_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let a_dir = tmp.path().join("a");
        let mut a = trainer(&a_dir, &[]).unwrap();
        a.run(None).unwrap();
        let trained_enh = values(&a, "enhancer.");
        let trained_gen = values(&a, "generator.");
        let fresh = trainer(&tmp.path().join("fresh"), &[]).unwrap();
        assert_ne!(
            values(&fresh, "enhancer."),
            trained_enh,
            "2 steps must move the weights"
        );

        // The timm-named export (no prefix) initialises the enhancer only.
        let export = tmp.path().join("enh.safetensors");
        cim_runner::export::export(&cim_runner::export::ExportArgs {
            run_dir: a_dir.clone(),
            format: cim_runner::export::Format::Timm,
            out: export.clone(),
        })
        .unwrap();
        let b = trainer(
            &tmp.path().join("b"),
            &[format!("init.enhancer={}", export.display())],
        )
        .unwrap();
        assert_eq!(values(&b, "enhancer."), trained_enh);
        assert_eq!(values(&b, "generator."), values(&fresh, "generator."));
        let saved = std::fs::read_to_string(tmp.path().join("b/config.toml")).unwrap();
        assert!(
            saved.contains("[init]") && saved.contains("enh.safetensors"),
            "{saved}"
        );

        // A run's model.safetensors (prefixed names) initialises the generator.
        let model = a_dir.join("model.safetensors");
        let c = trainer(
            &tmp.path().join("c"),
            &[format!("init.generator={}", model.display())],
        )
        .unwrap();
        assert_eq!(values(&c, "generator."), trained_gen);
        assert_eq!(values(&c, "enhancer."), values(&fresh, "enhancer."));

        // A missing tensor and a wrong shape are errors naming the tensor.
        let mut w = file(&export);
        let gone = w.keys().find(|k| k.contains("blocks.1.")).unwrap().clone();
        w.remove(&gone);
        let partial = tmp.path().join("partial.safetensors");
        candle_core::safetensors::save(&w, &partial).unwrap();
        let e = trainer(
            &tmp.path().join("d"),
            &[format!("init.enhancer={}", partial.display())],
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("partial.safetensors")
                && e.contains("lacks 1")
                && e.contains(&format!("enhancer.{gone}")),
            "{e}"
        );
        let mut w = file(&export);
        let key = w.keys().find(|k| k.ends_with("pos_embed")).unwrap().clone();
        let t = w[&key].clone();
        w.insert(key.clone(), t.narrow(1, 0, t.dim(1).unwrap() - 1).unwrap());
        let wrong = tmp.path().join("wrong.safetensors");
        candle_core::safetensors::save(&w, &wrong).unwrap();
        let e = trainer(
            &tmp.path().join("e"),
            &[format!("init.enhancer={}", wrong.display())],
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains(&format!("enhancer.{key}")) && e.contains("shape"),
            "{e}"
        );
        // Unknown keys of [init] are refused.
        let e = trainer(&tmp.path().join("f"), &["init.tokenizer=x".to_string()])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tokenizer"), "{e}");
    }
}

#[test]
fn tokenizer_train_writes_a_tokenizer_that_presets_load() {
    use cim_runner::tokenizer_train::{tokenizer_train, TokenizerTrainArgs};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vq.safetensors");
    let sets = |extra: &[&str]| -> Vec<String> {
        [
            "tokenizer.name=vq",
            "tokenizer.vq.weights=random",
            "tokenizer.vq.channels=[8, 16, 16]",
            "tokenizer.vq.code_dim=8",
            "tokenizer.vq.vocab_size=32",
            "tokenizer_train.batch_size=4",
            "tokenizer_train.warmup_steps=2",
            "tokenizer_train.reset_every=5",
            "tokenizer_train.log_every=5",
            "tokenizer_train.lr=3e-3",
            "data.workers=1",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let args = TokenizerTrainArgs {
        layers: cim_run::cli::ConfigArgs {
            preset: Some("quickstart".into()),
            config: vec![],
            set: sets(&[]),
        }
        .layers(),
        out: out.clone(),
        steps: Some(40),
    };
    let r = tokenizer_train(&args).unwrap();
    assert_eq!((r.steps, r.vocab_size, r.eval_images), (40, 32, 3));
    assert!(r.train_mse_last < 0.5 * r.train_mse_first, "{r:?}");
    assert!(r.psnr_db.is_finite() && r.psnr_db > 10.0, "{r:?}");
    assert!(
        r.perplexity >= 1.0 && r.perplexity <= 32.0 && r.codes_used >= 1,
        "{r:?}"
    );
    for ext in ["json", "png"] {
        assert!(out.with_extension(ext).is_file(), "{ext} missing");
    }
    // The file is a tokenizer for any preset (same sizes) …
    let res = cim_runner::config::resolve(&cim_runner::config::Layers {
        preset: Some("quickstart".into()),
        config_files: vec![],
        set: sets(&[&format!("tokenizer.vq.weights={}", out.display())]),
        env: false,
    })
    .unwrap();
    let cim = cim_runner::pipeline::Cim::build(&res).unwrap();
    assert_eq!(cim.tokenizer.vocab_size(), 32);
    // … and a config that disagrees with it names the key.
    let res = cim_runner::config::resolve(&cim_runner::config::Layers {
        preset: Some("quickstart".into()),
        config_files: vec![],
        set: sets(&[
            &format!("tokenizer.vq.weights={}", out.display()),
            "tokenizer.vq.code_dim=16",
        ]),
        env: false,
    })
    .unwrap();
    let e = cim_runner::pipeline::Cim::build(&res)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tokenizer.vq.code_dim = 8"), "{e}");
    // Training another tokenizer is refused with the fix.
    let e = tokenizer_train(&TokenizerTrainArgs {
        layers: cim_run::cli::ConfigArgs {
            preset: Some("quickstart".into()),
            config: vec![],
            set: vec!["tokenizer.name=patch_kmeans".into()],
        }
        .layers(),
        out: tmp.path().join("x.safetensors"),
        steps: Some(1),
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("--set tokenizer.name=vq"), "{e}");
}
