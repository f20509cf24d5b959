//! Atomic writes and training checkpoints.
//!
//! A file is either the old version or the complete new one, never half of each (temp file, fsync,
//! rename). A checkpoint is a folder `<run>/checkpoints/step-NNNNNNNN/` holding
//! `model.safetensors` (trainable weights and buffers), `optimizer.safetensors` (AdamW moments),
//! `state.json` ([`TrainState`]) and `config.toml`; it is written as a hidden temporary folder and
//! renamed into place, so a crash leaves either no new checkpoint or a complete one.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use candle_core::Tensor;

use cim_api::{Error, Result};

fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

fn commit(tmp: &Path, path: &Path) -> Result<()> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent() {
        // Persist the rename itself (best effort: not every platform can open a directory).
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    commit(&tmp, path)
}

/// Writes named tensors as safetensors, atomically.
pub fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = tmp_path(path);
    candle_core::safetensors::save(tensors, &tmp)?;
    commit(&tmp, path)
}

/// Where a run stands, beside its weights: enough to continue bit-exactly. All randomness of a step
/// (data order, crops, masks, samples) is a function of `(seed, step)`, so the step is the RNG state.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: usize,
    /// AdamW's step counter (bias correction).
    pub optimizer_t: u64,
    pub seed: u64,
    /// Micro-batches the whole job consumed (`step × world × accum_steps`), for the record: a
    /// resumed run finds its data position from `step` and the global batch, whatever the number
    /// of processes then.
    pub micro_batches: u64,
    /// Epochs completed at `step`.
    pub epoch: u64,
    /// Files skipped as unreadable so far.
    pub skipped: Vec<String>,
}

/// Test hook: `CIMRUN_FAULT=checkpoint:N` aborts the process in the middle of writing the N-th
/// checkpoint of this process (after the weights, before the state and the rename).
fn fault_point(count: usize) {
    if let Ok(spec) = std::env::var("CIMRUN_FAULT") {
        if spec
            .strip_prefix("checkpoint:")
            .and_then(|n| n.parse::<usize>().ok())
            == Some(count)
        {
            eprintln!("CIMRUN_FAULT: aborting while writing checkpoint {count}");
            std::process::abort();
        }
    }
}

static WRITTEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The folder of the checkpoint at `step`.
pub fn checkpoint_dir(run_dir: &Path, step: usize) -> std::path::PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:08}"))
}

/// Removes the temporary folders that interrupted checkpoint writes left in `run_dir`
/// (`checkpoints/.step-*`: a killed process, a full disk). Only the run's one writer (the holder
/// of its [`crate::rundir::RunDir`] lock) calls it, so none of them is being written. Returns
/// how many it removed.
pub fn remove_interrupted(run_dir: &Path) -> Result<usize> {
    let root = run_dir.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(0);
    };
    let mut removed = 0;
    for e in entries {
        let p = e.map_err(|e| Error::io(&root, e))?.path();
        let stale = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".step-"));
        if stale && p.is_dir() {
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// `tensors` as a safetensors file at `path`, an error naming the file.
fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|e| Error::Data {
        path: path.display().to_string(),
        message: format!("cannot write: {e}"),
    })
}

/// Writes a checkpoint folder atomically, then deletes all but the newest `keep` checkpoints.
/// A failed write (a full disk) removes its temporary folder again and says which step and file
/// it could not write; the checkpoints written before stay as they were.
pub fn write_checkpoint(
    run_dir: &Path,
    state: &TrainState,
    weights: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    config_toml: &str,
    keep: usize,
) -> Result<std::path::PathBuf> {
    remove_interrupted(run_dir)?;
    let root = run_dir.join("checkpoints");
    let tmp = root.join(format!(
        ".step-{:08}.tmp-{}",
        state.step,
        std::process::id()
    ));
    let written = write_checkpoint_in(run_dir, &tmp, state, weights, optimizer, config_toml, keep);
    written.map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        Error::msg(format!(
            "writing the checkpoint of step {}: {e}",
            state.step
        ))
    })
}

fn write_checkpoint_in(
    run_dir: &Path,
    tmp: &Path,
    state: &TrainState,
    weights: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    config_toml: &str,
    keep: usize,
) -> Result<std::path::PathBuf> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let dest = checkpoint_dir(run_dir, state.step);
    std::fs::create_dir(tmp).map_err(|e| Error::io(tmp, e))?;
    let n = WRITTEN.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    let synced = |name: &str, write: &dyn Fn(&Path) -> Result<()>| -> Result<()> {
        let p = tmp.join(name);
        write(&p)?;
        File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&p, e))
    };
    synced("model.safetensors", &|p| save_tensors(weights, p))?;
    synced("optimizer.safetensors", &|p| save_tensors(optimizer, p))?;
    fault_point(n);
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::msg(e.to_string()))?;
    synced("state.json", &|p| {
        std::fs::write(p, json.as_bytes()).map_err(|e| Error::io(p, e))
    })?;
    synced("config.toml", &|p| {
        std::fs::write(p, config_toml.as_bytes()).map_err(|e| Error::io(p, e))
    })?;
    // Same step written again (e.g. a resume that had nothing left to do): move the old folder
    // aside first, so a complete checkpoint of this step exists at every moment.
    let old = root.join(format!(
        ".step-{:08}.old-{}",
        state.step,
        std::process::id()
    ));
    let replaced = dest.exists();
    if replaced {
        std::fs::rename(&dest, &old).map_err(|e| Error::io(&dest, e))?;
    }
    std::fs::rename(tmp, &dest).map_err(|e| Error::io(&dest, e))?;
    if replaced {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if let Ok(d) = File::open(&root) {
        let _ = d.sync_all();
    }
    let all = list_checkpoints(run_dir)?;
    for (_, old) in all.iter().rev().skip(keep.max(1)) {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(dest)
}

/// Complete checkpoints of a run, oldest first (temporary folders of interrupted writes are ignored).
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(usize, std::path::PathBuf)>> {
    let root = run_dir.join("checkpoints");
    let mut out = vec![];
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(out);
    };
    for e in entries {
        let p = e.map_err(|e| Error::io(&root, e))?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) {
            if p.join("state.json").is_file() {
                out.push((step, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The weights of a run: its final `model.safetensors`, else its newest checkpoint's.
pub fn weights_file(run_dir: &Path) -> Result<std::path::PathBuf> {
    let m = run_dir.join("model.safetensors");
    if m.is_file() {
        return Ok(m);
    }
    Ok(load_latest(run_dir)?.dir.join("model.safetensors"))
}

/// A checkpoint read back.
pub struct Loaded {
    pub dir: std::path::PathBuf,
    pub state: TrainState,
    pub weights: std::collections::BTreeMap<String, Tensor>,
    pub optimizer: std::collections::BTreeMap<String, Tensor>,
}

/// Reads the newest complete checkpoint of `run_dir` that reads back whole: one that does not
/// (a damaged file) is passed over with a warning naming it, for the one before.
pub fn load_latest(run_dir: &Path) -> Result<Loaded> {
    let mut all = list_checkpoints(run_dir)?;
    let newest = all.last().map(|c| c.0);
    while let Some((step, dir)) = all.pop() {
        match load(dir) {
            Ok(l) => {
                if Some(step) != newest {
                    tracing::warn!(
                        step,
                        "resuming from an older checkpoint: the newer ones do not read back"
                    );
                }
                return Ok(l);
            }
            Err(e) if all.is_empty() => return Err(e),
            Err(e) => tracing::warn!("passing over a damaged checkpoint: {e}"),
        }
    }
    Err(Error::msg(format!(
        "{}: no complete checkpoint to resume from (expected checkpoints/step-*/state.json)",
        run_dir.display()
    )))
}

/// Reads the checkpoint folder `dir`.
fn load(dir: std::path::PathBuf) -> Result<Loaded> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Data {
        path: state_path.display().to_string(),
        message: e.to_string(),
    })?;
    let read = |name: &str| -> Result<std::collections::BTreeMap<String, Tensor>> {
        let p = dir.join(name);
        let t = candle_core::safetensors::load(&p, &candle_core::Device::Cpu).map_err(|e| {
            Error::Data {
                path: p.display().to_string(),
                message: e.to_string(),
            }
        })?;
        Ok(t.into_iter().collect())
    };
    Ok(Loaded {
        weights: read("model.safetensors")?,
        optimizer: read("optimizer.safetensors")?,
        state,
        dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint's state at `step` (seed 1, epoch 0).
    fn state(step: usize) -> TrainState {
        TrainState {
            step,
            optimizer_t: step as u64,
            seed: 1,
            micro_batches: step as u64,
            epoch: 0,
            skipped: vec![],
        }
    }
    use candle_core::Device;

    #[test]
    fn safetensors_round_trip_and_no_temp_left() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let t = Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?;
        save_safetensors(&p, &HashMap::from([("a".to_string(), t)]))?;
        let back = candle_core::safetensors::load(&p, &Device::Cpu)?;
        assert_eq!(back["a"].to_vec1::<f32>()?, vec![1., 2., 3.]);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        Ok(())
    }

    #[test]
    fn checkpoints_keep_the_newest_k_and_ignore_interrupted_writes() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::new(&[1f32], &Device::Cpu)?;
        let w = HashMap::from([("a".to_string(), t)]);
        for step in [10, 20, 30] {
            let state = state(step);
            write_checkpoint(dir.path(), &state, &w, &w, "", 2)?;
        }
        // An interrupted write: a hidden temp folder and a step folder without state.json.
        std::fs::create_dir_all(dir.path().join("checkpoints/.step-00000040.tmp-1")).unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoints/step-00000050")).unwrap();
        let stale = dir.path().join("checkpoints/.step-00000040.tmp-1");
        let steps: Vec<usize> = list_checkpoints(dir.path())?
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(steps, vec![20, 30]);
        let l = load_latest(dir.path())?;
        assert_eq!((l.state.step, l.weights.len()), (30, 1));
        // Writing the same step again replaces it and leaves nothing else behind; the
        // interrupted write's temporary folder is gone with it.
        write_checkpoint(dir.path(), &l.state, &w, &w, "again", 2)?;
        assert!(!stale.exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("checkpoints/step-00000030/config.toml"))
                .unwrap(),
            "again"
        );
        assert_eq!(list_checkpoints(dir.path())?.len(), 2);
        let empty = tempfile::tempdir().unwrap();
        let e = load_latest(empty.path()).err().unwrap().to_string();
        assert!(e.contains("no complete checkpoint"), "{e}");
        Ok(())
    }

    /// A damaged newest checkpoint is passed over for the one before; when none reads back, the
    /// error names the damaged file.
    #[test]
    fn resume_falls_back_past_a_damaged_checkpoint() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let w = HashMap::from([("a".to_string(), Tensor::new(&[1f32], &Device::Cpu)?)]);
        for step in [10, 20] {
            let state = state(step);
            write_checkpoint(dir.path(), &state, &w, &w, "", 3)?;
        }
        let damaged = dir
            .path()
            .join("checkpoints/step-00000020/model.safetensors");
        std::fs::write(&damaged, b"not a safetensors file").unwrap();
        assert_eq!(load_latest(dir.path())?.state.step, 10);
        std::fs::write(
            dir.path()
                .join("checkpoints/step-00000010/model.safetensors"),
            b"truncated",
        )
        .unwrap();
        let e = load_latest(dir.path()).err().unwrap().to_string();
        assert!(e.contains("step-00000010/model.safetensors"), "{e}");
        Ok(())
    }

    /// A checkpoint that cannot be written (here: its folder is a file) says which step and
    /// removes what it began, so no temporary folder keeps the disk full.
    #[test]
    fn a_failed_checkpoint_write_names_the_step_and_leaves_no_temp() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let w = HashMap::from([("a".to_string(), Tensor::new(&[1f32], &Device::Cpu)?)]);
        let state = state(7);
        std::fs::write(dir.path().join("checkpoints"), b"in the way").unwrap();
        let e = write_checkpoint(dir.path(), &state, &w, &w, "", 3)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("step 7") && e.contains("checkpoints"), "{e}");
        std::fs::remove_file(dir.path().join("checkpoints")).unwrap();
        write_checkpoint(dir.path(), &state, &w, &w, "", 3)?;
        let names: Vec<String> = std::fs::read_dir(dir.path().join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["step-00000007"]);
        Ok(())
    }
}
