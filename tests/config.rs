//! Configuration layering and its error messages, through the same entry points the CLI uses.

use std::path::Path;

use cim_runner::config::{resolve, Layers};

fn layers(preset: &str, set: &[&str]) -> Layers {
    Layers {
        preset: Some(preset.to_string()),
        config_files: vec![],
        set: set.iter().map(|s| s.to_string()).collect(),
        env: false,
    }
}

fn err(l: Layers) -> String {
    match resolve(&l) {
        Ok(_) => panic!("expected an error for {l:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_preset_lists_the_available_ones() {
    let e = err(layers("nope", &[]));
    assert!(e.contains("unknown preset `nope`"), "{e}");
    assert!(
        e.contains("quickstart") && e.contains("tiny_vit_respix") && e.contains("vit_b16_respix"),
        "{e}"
    );
}

#[test]
fn unknown_key_in_a_component_section_names_key_source_and_alternatives() {
    let e = err(layers("tiny_vit_respix", &["enhancer.widht=3"]));
    assert!(e.contains("unknown key `enhancer.widht`"), "{e}");
    assert!(e.contains("--set"), "{e}");
    assert!(e.contains("resnet50, vit_b16, vit_s16, vit_tiny"), "{e}");
    assert!(
        e.contains("width"),
        "the selected plugin's parameters are listed: {e}"
    );
}

#[test]
fn unknown_plugin_parameter_names_the_table_and_the_fields() {
    let e = err(layers("tiny_vit_respix", &["enhancer.vit_tiny.widht=3"]));
    assert!(
        e.contains("[enhancer.vit_tiny]") && e.contains("widht") && e.contains("`width`"),
        "{e}"
    );
    // Tables of plugins that are not selected are validated too.
    let e = err(layers("tiny_vit_respix", &["enhancer.vit_b16.depht=3"]));
    assert!(
        e.contains("[enhancer.vit_b16]") && e.contains("depht"),
        "{e}"
    );
}

#[test]
fn unknown_plugin_name_lists_the_registered_ones() {
    let e = err(layers("quickstart", &["sampler.name=gumble"]));
    assert!(e.contains("unknown sampler `gumble`"), "{e}");
    assert!(e.contains("argmax, gumbel, top_k, top_p, uniform"), "{e}");
}

#[test]
fn wrong_type_and_unknown_fixed_keys_name_the_key() {
    let e = err(layers("quickstart", &["train.lr=fast"]));
    assert!(
        e.contains("train.lr") && e.contains("f64") && e.contains("--set"),
        "{e}"
    );
    let e = err(layers("quickstart", &["train.lrr=1"]));
    assert!(e.contains("lrr") && e.contains("`lr`"), "{e}");
}

#[test]
fn errors_from_a_config_file_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mine.toml");
    std::fs::write(&f, "[train]\nbatch_size = \"many\"\n").unwrap();
    let mut l = layers("quickstart", &[]);
    l.config_files.push(f.clone());
    let e = err(l);
    assert!(
        e.contains("train.batch_size") && e.contains("mine.toml"),
        "{e}"
    );
    // A missing file is an error, not silently skipped.
    let mut l = layers("quickstart", &[]);
    l.config_files.push(dir.path().join("absent.toml"));
    assert!(err(l).contains("absent.toml"));
}

#[test]
fn precedence_is_base_preset_config_set() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(&f, "[train]\nlr = 0.5\nbatch_size = 3\n").unwrap();
    let mut l = layers("quickstart", &["train.lr=0.25"]);
    l.config_files.push(f);
    let r = resolve(&l).unwrap();
    assert_eq!(r.cfg.train.lr, 0.25); // --set beats --config
    assert_eq!(r.cfg.train.batch_size, 3); // --config beats the preset (16)
    assert_eq!(r.cfg.data.image_size, 64); // the preset beats base (224)
    assert_eq!(r.cfg.train.weight_decay, 0.05); // base beats built-in defaults… (equal here)
    assert_eq!(r.cfg.train.betas, [0.9, 0.98]); // …and fills what the preset leaves out
}

#[test]
fn switching_a_plugin_by_name_leaves_no_stale_keys() {
    // The quickstart sets [enhancer.vit_tiny]; selecting vit_s16 uses vit_s16's own defaults.
    let r = resolve(&layers("quickstart", &["enhancer.name=vit_s16"])).unwrap();
    let (name, params) = &r.components["enhancer"];
    assert_eq!(name, "vit_s16");
    let d = params.as_dict().unwrap();
    assert_eq!(d["width"].to_num().unwrap().to_u128(), Some(384));
}

/// Every paper preset keeps the paper's global batch of 2048 but runs it on one GPU as micro-batches
/// of 128 (gradient accumulation) in bf16 there, f32 on the CPU (`run.precision = "auto"`).
#[test]
fn paper_presets_fit_one_gpu_and_keep_the_global_batch() {
    use cim_runner::config::Precision;
    for preset in [
        "vit_b16_respix",
        "vit_b16_revdet",
        "vit_s16_respix",
        "vit_s16_revdet",
        "resnet50_respix",
        "resnet50_revdet",
    ] {
        let r = resolve(&layers(preset, &[])).unwrap();
        let t = &r.cfg.train;
        assert_eq!(
            (
                t.batch_size,
                t.split(1).unwrap(),
                t.split(8).unwrap(),
                r.cfg.run.precision
            ),
            (2048, (16, 128), (2, 128), Precision::Auto),
            "{preset}"
        );
    }
    // "auto" is f32 on the CPU, where the fused kernels are f32's.
    let q = resolve(&layers(
        "quickstart",
        &["run.precision=\"auto\"", "run.device=\"cpu\""],
    ))
    .unwrap();
    let cim = cim_runner::pipeline::Cim::build(&q).unwrap();
    assert_eq!(
        (cim.compute, cim.run.precision),
        (candle_core::DType::F32, Precision::F32)
    );
}

/// `cim-run --preset vit_b16_respix --print-config` shows the paper's Table 9 values.
#[test]
fn vit_b16_respix_resolves_to_table_9() {
    let r = resolve(&layers("vit_b16_respix", &[])).unwrap();
    let t = &r.cfg.train;
    assert_eq!((t.lr, t.batch_size, t.weight_decay), (1.5e-3, 2048, 0.05));
    assert_eq!(
        (t.betas, t.clip_grad, t.epochs, t.warmup_epochs),
        ([0.9, 0.98], 3.0, 300, 10)
    );
    assert_eq!(
        (r.cfg.data.image_size, r.cfg.data.tokenizer_size),
        (224, 112)
    );
    let text = r.to_toml().unwrap();
    for needle in [
        "lr = 0.0015",
        "batch_size = 2048",
        "weight_decay = 0.05",
        "betas = [0.9, 0.98]",
        "clip_grad = 3.0",
        "epochs = 300",
        "warmup_epochs = 10",
        "count = [100, 120]",
        "depth = 4",
        "patch_size = 16",
        "width = 768",
        "weight = 10.0",
        "temperature = 1.0",
        "window = 8",
        "name = \"vit_b16\"",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
    // The printed config loads back to the same resolution.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("resolved.toml");
    std::fs::write(&f, &text).unwrap();
    let again = resolve(&Layers {
        preset: None,
        config_files: vec![f],
        set: vec![],
        env: false,
    })
    .unwrap();
    let body = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(body(&again.to_toml().unwrap()), body(&text));
}

#[test]
fn cli_reports_bad_presets_and_keys() {
    let run = |args: &[&str]| {
        let mut v = vec!["cim-run".to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        cim_run::cli::run(v)
    };
    let e = run(&["--preset", "nope"]).unwrap_err().to_string();
    assert!(e.contains("unknown preset `nope`"), "{e}");
    let e = run(&["--preset", "tiny_vit_respix", "--set", "enhancer.widht=3"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("enhancer.widht") && e.contains("vit_tiny"),
        "{e}"
    );
    assert!(run(&["--list"]).is_ok());
    // Presets of the other commands are refused by the training command, naming the right one.
    let e = run(&["--preset", "ft_tiny_cifar10", "--steps", "1"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cim-run finetune RUN_DIR --preset ft_tiny_cifar10"),
        "{e}"
    );
    let e = run(&["--preset", "probe_cifar10"]).unwrap_err().to_string();
    assert!(
        e.contains("cim-run probe RUN_DIR --preset probe_cifar10"),
        "{e}"
    );
    use cim_runner::config::{preset_kind, PresetKind};
    assert_eq!(preset_kind("vq_cifar10"), Some(PresetKind::TokenizerTrain));
    assert_eq!(preset_kind("vit_b16_respix"), Some(PresetKind::Pretrain));
    assert_eq!(preset_kind("nope"), None);
}

/// An error caused by one component's choice names that component and the key to set: the
/// generator's width follows the enhancer's, so heads that do not divide it point at
/// `generator.beit.heads`; an enhancer whose heads do not divide its width names its table.
#[test]
fn build_errors_name_the_component_and_the_key() {
    let build = |set: &[&str]| {
        let res = resolve(&layers("quickstart", set)).unwrap();
        match cim_runner::pipeline::Cim::build(&res) {
            Ok(_) => panic!("expected a build error for {set:?}"),
            Err(e) => e.to_string(),
        }
    };
    let e = build(&["generator.beit.heads=5"]);
    assert!(
        e.contains("generator `beit`") && e.contains("generator.beit.heads") && e.contains("96"),
        "{e}"
    );
    assert!(e.contains("the enhancer's width"), "{e}");
    let e = build(&["enhancer.vit_tiny.width=100"]);
    assert!(
        e.contains("enhancer `vit_tiny`") && e.contains("[enhancer.vit_tiny]"),
        "{e}"
    );
    // A zero width is an error naming it, not a panic deep in a kernel.
    let e = build(&["enhancer.vit_tiny.width=0"]);
    assert!(
        e.contains("[enhancer.vit_tiny]") && e.contains("width = 0"),
        "{e}"
    );
}

/// Sizes and counts that would panic or hang deep inside a run are refused at resolve time with
/// the key named.
#[test]
fn sizes_and_worker_counts_are_checked_at_resolve_time() {
    for (set, key) in [
        ("data.image_size=0", "data.image_size"),
        ("data.tokenizer_size=0", "data.tokenizer_size"),
        ("data.workers=100000", "data.workers"),
    ] {
        let e = err(layers("quickstart", &[set]));
        assert!(e.contains(key), "{set}: {e}");
    }
}

/// `--config FILE` without `--preset` layers the file over the quickstart preset, never over
/// `base.toml`'s paper-sized defaults (ViT-B/16, batch 2048).
#[test]
fn a_config_file_alone_starts_from_the_quickstart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mine.toml");
    std::fs::write(&file, "[train]\nlr = 0.5\n").unwrap();
    let l = cim_run::cli::ConfigArgs {
        preset: None,
        config: vec![file],
        set: vec![],
    }
    .layers();
    let res = resolve(&Layers { env: false, ..l }).unwrap();
    assert_eq!(res.cfg.train.lr, 0.5);
    assert_eq!(res.cfg.enhancer["name"].as_str(), Some("vit_tiny"));
    assert_eq!(res.cfg.train.batch_size, 16);
}

/// A command-line mistake reads `error: …` once, and a missing file names the path and the
/// operating system's reason once.
#[test]
fn error_messages_say_things_once() {
    let run = |args: &[&str]| {
        let mut v = vec!["cim-run".to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        format!("{:#}", cim_run::cli::run(v).unwrap_err())
    };
    let e = run(&["--no-such-flag"]);
    assert!(
        !e.starts_with("error:") && e.contains("--no-such-flag"),
        "{e}"
    );
    let e = run(&["--config", "/no/such/file.toml", "--print-config"]);
    assert!(e.contains("/no/such/file.toml"), "{e}");
    let e = format!(
        "{:#}",
        anyhow::Error::from(cim_api::Error::io(
            "/no/such/file",
            std::io::Error::from(std::io::ErrorKind::NotFound)
        ))
    );
    assert_eq!(e.matches("not found").count(), 1, "{e}");
}

/// Every sweep spec in `configs/sweeps/` resolves all its cells (a dry run plans every cell × seed
/// and control and runs none).
#[test]
fn every_sweep_spec_resolves() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/sweeps");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let spec = e.unwrap().path();
        let tmp = tempfile::tempdir().unwrap();
        let r = cim_runner::sweep::sweep(&cim_runner::sweep::SweepArgs {
            spec: spec.clone(),
            out: Some(tmp.path().join("out")),
            cells: Some(tmp.path().join("cells")),
            dry_run: true,
            report_only: false,
        })
        .unwrap_or_else(|e| panic!("{}: {e}", spec.display()));
        assert_eq!(r.units_run, 0);
        assert!(!tmp.path().join("cells").exists());
        n += 1;
    }
    assert!(n >= 6, "{n} specs");
}
