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
    let assets = format!("{}/assets/quickstart", env!("CARGO_MANIFEST_DIR"));
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
