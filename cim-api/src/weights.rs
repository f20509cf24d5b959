//! Where weight files come from: one code path for every `weights` / `init` key.
//!
//! A source is either a local path or `hub:OWNER/REPO[@REVISION]/FILE`, a file of a Hugging Face
//! model repository (`FILE` may contain `/`; `REVISION` is a branch, tag or commit hash and
//! defaults to `main`). Hub files are looked up in the Hugging Face cache first — the layout
//! `huggingface_hub` and `hf-hub` share (`<cache>/models--OWNER--REPO/refs/REV` holding a commit,
//! `snapshots/<commit>/FILE`) — and downloaded into it with `hf-hub` otherwise.
//!
//! The environment is honoured as `huggingface_hub` does: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1` never touches the network; `HF_ENDPOINT` points
//! at a mirror. A file that is neither cached nor downloadable is an error naming the key, the
//! repository, the file and the ways to provide it.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A parsed weight source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightSource {
    Local(PathBuf),
    Hub {
        /// `OWNER/REPO`.
        repo: String,
        /// Branch, tag or commit (`main` when not given).
        revision: String,
        /// Path of the file inside the repository.
        file: String,
    },
}

impl WeightSource {
    /// Parses `hub:OWNER/REPO[@REVISION]/FILE` or a local path.
    pub fn parse(spec: &str) -> Result<Self> {
        let Some(rest) = spec.strip_prefix("hub:") else {
            if spec.is_empty() {
                return Err(Error::config("an empty weight source"));
            }
            return Ok(Self::Local(PathBuf::from(spec)));
        };
        let bad = |why: &str| {
            Error::config(format!(
                "`{spec}` is not a hub source ({why}); the form is hub:OWNER/REPO[@REVISION]/FILE, \
                 e.g. hub:openai/dall-e@main/dvae.safetensors"
            ))
        };
        let (owner, rest) = rest.split_once('/').ok_or_else(|| bad("no OWNER/"))?;
        let (repo_rev, file) = rest.split_once('/').ok_or_else(|| bad("no /FILE"))?;
        let (name, revision) = match repo_rev.split_once('@') {
            Some((n, r)) => (n, r),
            None => (repo_rev, "main"),
        };
        if owner.is_empty() || name.is_empty() {
            return Err(bad("empty OWNER or REPO"));
        }
        if revision.is_empty() {
            return Err(bad("empty REVISION after @"));
        }
        if file.is_empty() || file.ends_with('/') || file.split('/').any(|p| p == "..") {
            return Err(bad("FILE must name a file inside the repository"));
        }
        Ok(Self::Hub {
            repo: format!("{owner}/{name}"),
            revision: revision.to_string(),
            file: file.to_string(),
        })
    }
}

/// The Hugging Face settings a lookup uses (normally [`HubEnv::from_env`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubEnv {
    /// The hub cache folder (the one holding `models--*`).
    pub cache: PathBuf,
    /// Never use the network.
    pub offline: bool,
    /// Base URL of the hub (`https://huggingface.co` unless `HF_ENDPOINT` says otherwise).
    pub endpoint: String,
}

impl HubEnv {
    /// `HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE` and `HF_ENDPOINT`, as `huggingface_hub` reads them.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| Path::new(&h).join("hub")))
            .or_else(|| {
                var("HOME").map(|h| Path::new(&h).join(".cache").join("huggingface").join("hub"))
            })
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
        let offline = var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
        Self {
            cache,
            offline,
            endpoint,
        }
    }

    /// `<cache>/models--OWNER--REPO`.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The cached copy of `file` at `revision`, if any: the commit that `refs/<revision>` names,
    /// or `revision` itself when it is a commit hash with a snapshot.
    pub fn cached(&self, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
        let dir = self.repo_dir(repo);
        let commit = std::fs::read_to_string(dir.join("refs").join(revision))
            .ok()
            .map(|c| c.trim().to_string())
            .or_else(|| is_commit(revision).then(|| revision.to_string()))?;
        let p = dir.join("snapshots").join(commit).join(file);
        p.is_file().then_some(p)
    }
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Resolves `spec` (the value of config key `key`) to a local file, with the process environment.
pub fn resolve(spec: &str, key: &str) -> Result<PathBuf> {
    resolve_with(spec, key, &HubEnv::from_env())
}

/// [`resolve`] with explicit hub settings.
pub fn resolve_with(spec: &str, key: &str, env: &HubEnv) -> Result<PathBuf> {
    match WeightSource::parse(spec).map_err(|e| Error::config(format!("{key}: {e}")))? {
        WeightSource::Local(p) => {
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::config(format!(
                    "{key} = \"{spec}\": no such file{}",
                    if p.exists() { " (it is a folder)" } else { "" }
                )))
            }
        }
        WeightSource::Hub {
            repo,
            revision,
            file,
        } => {
            if let Some(p) = env.cached(&repo, &revision, &file) {
                tracing::debug!(%repo, %revision, %file, path = %p.display(), "weights from the hub cache");
                return Ok(p);
            }
            let how = format!(
                "Provide it by (a) running `huggingface-cli download {repo} {file} --revision {revision}` \
                 on a machine with network and copying its cache here (point HF_HOME or HF_HUB_CACHE at it), \
                 or (b) downloading the file by hand and setting {key} to its local path"
            );
            if env.offline {
                return Err(Error::config(format!(
                    "{key} = \"{spec}\": file `{file}` of Hugging Face repo `{repo}` (revision {revision}) is not in \
                     the hub cache {} and HF_HUB_OFFLINE is set. {how}.",
                    env.cache.display()
                )));
            }
            download(&repo, &revision, &file, env).map_err(|why| {
                Error::config(format!(
                    "{key} = \"{spec}\": file `{file}` of Hugging Face repo `{repo}` (revision {revision}) is not in \
                     the hub cache {} and could not be downloaded from {}: {why}. {how}.",
                    env.cache.display(),
                    env.endpoint
                ))
            })
        }
    }
}

#[cfg(feature = "hub")]
fn download(
    repo: &str,
    revision: &str,
    file: &str,
    env: &HubEnv,
) -> std::result::Result<PathBuf, String> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};
    tracing::info!(%repo, %revision, %file, endpoint = %env.endpoint, "downloading weights");
    let api = ApiBuilder::from_cache(Cache::new(env.cache.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_progress(false)
        .build()
        .map_err(|e| e.to_string())?;
    api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ))
    .download(file)
    .map_err(|e| e.to_string())
}

#[cfg(not(feature = "hub"))]
fn download(_: &str, _: &str, _: &str, _: &HubEnv) -> std::result::Result<PathBuf, String> {
    Err("this build of cim-api has no `hub` feature (no downloads)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    /// A hub cache as huggingface_hub leaves it: refs/main → COMMIT, one snapshot with a file in
    /// a sub-folder, and a `v1` tag.
    fn fake_cache() -> (tempfile::TempDir, HubEnv) {
        let dir = tempfile::tempdir().unwrap();
        let env = HubEnv {
            cache: dir.path().join("hub"),
            offline: true,
            endpoint: "http://127.0.0.1:9".into(),
        };
        let repo = env.repo_dir("acme/tiny-dvae");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{COMMIT}\n")).unwrap();
        std::fs::write(repo.join("refs/v1"), COMMIT).unwrap();
        let snap = repo.join("snapshots").join(COMMIT).join("sub");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("w.safetensors"), b"weights").unwrap();
        (dir, env)
    }

    #[test]
    fn parses_hub_and_local_sources() {
        assert_eq!(
            WeightSource::parse("hub:openai/dall-e@v2/a/b.safetensors").unwrap(),
            WeightSource::Hub {
                repo: "openai/dall-e".into(),
                revision: "v2".into(),
                file: "a/b.safetensors".into()
            }
        );
        assert_eq!(
            WeightSource::parse("hub:o/r/f").unwrap(),
            WeightSource::Hub {
                repo: "o/r".into(),
                revision: "main".into(),
                file: "f".into()
            }
        );
        assert_eq!(
            WeightSource::parse("w/x.safetensors").unwrap(),
            WeightSource::Local("w/x.safetensors".into())
        );
        for bad in [
            "hub:o",
            "hub:o/r",
            "hub:/r/f",
            "hub:o/r@/f",
            "hub:o/r/",
            "hub:o/r/../x",
            "",
        ] {
            assert!(WeightSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn finds_cached_files_by_branch_tag_and_commit() {
        let (_d, env) = fake_cache();
        let want = env
            .repo_dir("acme/tiny-dvae")
            .join("snapshots")
            .join(COMMIT)
            .join("sub/w.safetensors");
        for spec in [
            "hub:acme/tiny-dvae/sub/w.safetensors".to_string(),
            "hub:acme/tiny-dvae@v1/sub/w.safetensors".to_string(),
            format!("hub:acme/tiny-dvae@{COMMIT}/sub/w.safetensors"),
        ] {
            assert_eq!(resolve_with(&spec, "k", &env).unwrap(), want, "{spec}");
        }
    }

    #[test]
    fn offline_and_not_cached_names_repo_file_and_remedy() {
        let (_d, env) = fake_cache();
        let e = resolve_with(
            "hub:openai/dall-e@main/dvae.safetensors",
            "tokenizer.dalle_dvae.weights",
            &env,
        )
        .unwrap_err()
        .to_string();
        for part in [
            "tokenizer.dalle_dvae.weights",
            "`dvae.safetensors`",
            "`openai/dall-e`",
            "HF_HUB_OFFLINE",
            "huggingface-cli download openai/dall-e dvae.safetensors",
            "local path",
        ] {
            assert!(e.contains(part), "{part} missing from: {e}");
        }
        // A file the cached repo does not have is just as missing.
        let e = resolve_with("hub:acme/tiny-dvae/other.bin", "k", &env).unwrap_err();
        assert!(e.to_string().contains("`other.bin`"), "{e}");
    }

    #[cfg(feature = "hub")]
    #[test]
    fn online_failure_is_reported_with_the_endpoint() {
        // Port 9 on the loopback: the connection is refused at once; no network is used.
        let (_d, mut env) = fake_cache();
        env.offline = false;
        let e = resolve_with("hub:openai/dall-e/dvae.safetensors", "k", &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("could not be downloaded from http://127.0.0.1:9")
                && e.contains("`openai/dall-e`"),
            "{e}"
        );
        // The cache still wins without going online.
        assert!(resolve_with("hub:acme/tiny-dvae/sub/w.safetensors", "k", &env).is_ok());
    }

    #[test]
    fn local_paths_must_be_files() {
        let (d, env) = fake_cache();
        let e = resolve_with("/nonexistent/w.safetensors", "enhancer.init", &env).unwrap_err();
        assert!(e
            .to_string()
            .contains("enhancer.init = \"/nonexistent/w.safetensors\": no such file"));
        let e = resolve_with(d.path().to_str().unwrap(), "k", &env).unwrap_err();
        assert!(e.to_string().contains("it is a folder"), "{e}");
    }
}
