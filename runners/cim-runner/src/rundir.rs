//! A run directory: one folder per run, created, named, locked and written in one place — its
//! `config.toml` (the resolved configuration), its `metrics.jsonl` (one JSON object per step or
//! evaluation) and whatever the run adds beside them (checkpoints, weights, pictures).
//!
//! A run directory has one writer at a time: [`RunDir::create`] and [`RunDir::open`] take an
//! exclusive lock on its `.lock` file, which holds the writer's process id, and keep it until the
//! [`RunDir`] is dropped or the process ends (the operating system releases it then, so a killed
//! run leaves no stale lock). A second writer — a run started with the same `--out`, or `--resume`
//! of a run that is still training — is refused with the holder's process id.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use cim_api::{Error, Result};

use crate::checkpoint::write_atomic;
use crate::config::Resolved;

/// Files whose presence means a folder holds a run already.
const RUN_MARKERS: [&str; 3] = ["metrics.jsonl", "checkpoints", "model.safetensors"];

/// A locked run directory.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    /// `None` for a follower ([`RunDir::follower`]).
    _lock: Option<PidLock>,
}

impl RunDir {
    /// `<root>/<name>-<unix time>`: where a run named `name` goes when no folder is given.
    pub fn default_path(root: &Path, name: &str) -> PathBuf {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        root.join(format!("{name}-{secs}"))
    }

    /// Creates `path` (and its parents) for a new run and locks it. A folder that holds a run
    /// already is refused, so nothing is overwritten; an empty or unrelated folder is used.
    pub fn create(path: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        let dir = Self::lock(path)?;
        if let Some(m) = RUN_MARKERS.iter().find(|m| dir.path.join(m).exists()) {
            return Err(Error::msg(format!(
                "{} already holds a run (it has {m}); choose another --out so nothing is overwritten, \
                 or --resume it",
                dir.path.display()
            )));
        }
        Ok(dir)
    }

    /// The run directory `path` as a rank other than 0 of a data-parallel job sees it: it reads
    /// checkpoints from it and writes nothing, so it neither creates nor locks it.
    pub fn follower(path: PathBuf) -> Self {
        Self { path, _lock: None }
    }

    /// Opens the existing run directory `path` to continue writing it, and locks it.
    pub fn open(path: PathBuf) -> Result<Self> {
        if !path.is_dir() {
            return Err(Error::msg(format!(
                "{}: no such run directory, so no complete checkpoint to continue from",
                path.display()
            )));
        }
        Self::lock(path)
    }

    fn lock(path: PathBuf) -> Result<Self> {
        match PidLock::take(&path.join(".lock"))? {
            Ok(lock) => Ok(Self {
                path,
                _lock: Some(lock),
            }),
            Err(holder) => Err(Error::msg(format!(
                "{} is in use by {holder} (a run writing to it); wait for it to finish, or \
                 choose another --out",
                path.display()
            ))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file or folder inside the run directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Writes the resolved configuration as `config.toml` (atomically).
    pub fn write_config(&self, resolved: &Resolved) -> Result<()> {
        write_atomic(&self.join("config.toml"), resolved.to_toml()?.as_bytes())
    }

    /// `metrics.jsonl`, opened for appending.
    pub fn metrics(&self) -> Result<Metrics> {
        let path = self.join("metrics.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Metrics {
            file,
            path,
            events: None,
        })
    }

    /// Drops the lines of `metrics.jsonl` after step `step` (they are redone when a run resumes
    /// from its checkpoint at `step`). Returns how many were dropped.
    pub fn truncate_metrics(&self, step: usize) -> Result<usize> {
        let path = self.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(0);
        };
        let mut kept = String::new();
        let mut dropped = 0;
        for line in text.lines() {
            let at = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64());
            match at {
                Some(s) if s as usize <= step => {
                    kept.push_str(line);
                    kept.push('\n');
                }
                _ => dropped += 1,
            }
        }
        write_atomic(&path, kept.as_bytes())?;
        Ok(dropped)
    }
}

/// A run's `metrics.jsonl`: one JSON object per line, appended; with [`Metrics::tensorboard`],
/// also TensorBoard scalars.
#[derive(Debug)]
pub struct Metrics {
    file: File,
    path: PathBuf,
    events: Option<crate::tensorboard::EventWriter>,
}

impl Metrics {
    /// Also writes every record's numbers as TensorBoard scalars into `<run>/tensorboard/`
    /// (`run.tensorboard`).
    pub fn tensorboard(mut self, run: &RunDir) -> Result<Self> {
        self.events = Some(crate::tensorboard::EventWriter::create(
            &run.join("tensorboard"),
        )?);
        Ok(self)
    }

    /// Appends `record` as one line, and its numbers as scalars at its `step` (else `epoch`):
    /// `loss`, `lr`, … and nested maps as `phase_ms/data`.
    pub fn append(&mut self, record: &impl Serialize) -> Result<()> {
        // The line keeps the record's field order (`step` first); the scalars need the fields.
        let line = serde_json::to_string(record).map_err(|e| Error::msg(e.to_string()))?;
        writeln!(self.file, "{line}").map_err(|e| Error::io(&self.path, e))?;
        let Some(ev) = &mut self.events else {
            return Ok(());
        };
        let value = serde_json::to_value(record).map_err(|e| Error::msg(e.to_string()))?;
        if let Some(obj) = value.as_object() {
            let step = obj
                .get("step")
                .or_else(|| obj.get("epoch"))
                .and_then(|s| s.as_u64())
                .unwrap_or(0);
            for (k, v) in obj {
                if k == "step" || k == "epoch" {
                    continue;
                }
                match v {
                    serde_json::Value::Number(n) => {
                        ev.scalar(k, step, n.as_f64().unwrap_or(f64::NAN))?
                    }
                    serde_json::Value::Object(inner) => {
                        for (k2, v2) in inner {
                            if let Some(x) = v2.as_f64() {
                                ev.scalar(&format!("{k}/{k2}"), step, x)?;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        if let Some(ev) = &mut self.events {
            ev.flush()?;
        }
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// An exclusive lock on a file that holds the holder's process id, kept until it is dropped or the
/// process ends (the operating system releases it then, so a killed process leaves no stale lock).
#[derive(Debug)]
pub struct PidLock {
    _file: File,
}

impl PidLock {
    /// Takes the lock on `path`, creating the file if needed; `Ok(Err(holder))` when another
    /// holds it, the holder named as "process N" (or "another process" before it wrote its id).
    pub fn take(path: &Path) -> Result<std::result::Result<Self, String>> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Ok(Err(match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("process {pid}"),
                }));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
        }
        file.set_len(0).map_err(|e| Error::io(path, e))?;
        file.rewind().map_err(|e| Error::io(path, e))?;
        write!(file, "{}", std::process::id()).map_err(|e| Error::io(path, e))?;
        file.flush().map_err(|e| Error::io(path, e))?;
        Ok(Ok(Self { _file: file }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One writer at a time: a second lock on a live run names the holder's process id; after the
    /// first is dropped the folder can be opened again. A folder that holds a run is not created
    /// over.
    #[test]
    fn a_run_directory_has_one_writer() -> Result<()> {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run");
        let first = RunDir::create(path.clone())?;
        let e = RunDir::open(path.clone()).unwrap_err().to_string();
        assert!(
            e.contains("in use by process") && e.contains(&std::process::id().to_string()),
            "{e}"
        );
        let mut m = first.metrics()?;
        m.append(&serde_json::json!({"step": 1}))?;
        m.append(&serde_json::json!({"step": 2}))?;
        m.flush()?;
        drop(first);
        let again = RunDir::open(path.clone())?;
        assert_eq!(again.truncate_metrics(1)?, 1);
        let text = std::fs::read_to_string(path.join("metrics.jsonl")).unwrap();
        assert_eq!(text, "{\"step\":1}\n");
        drop(again);
        let e = RunDir::create(path).unwrap_err().to_string();
        assert!(e.contains("already holds a run"), "{e}");
        Ok(())
    }
}
