//! A training run's folder: `train_state.safetensors` (everything needed to continue: the
//! weights, the optimizer, the position, the random state, the run's settings and its
//! metrics so far), `model.safetensors` (the checkpoint users load) and `metrics.jsonl`.
//!
//! Kill-safety: each file is written atomically (temporary file, fsync, rename), the
//! state first. The state alone decides where a resumed run stands; the checkpoint and the
//! metrics file are rewritten from it, so a process killed between two writes, or during
//! one, leaves a folder that resumes to the same result as a run never interrupted, with
//! each epoch's metrics exactly once. A run holds an advisory lock on `.convnet.lock`, so
//! that two processes never write one folder.

use anyhow::{bail, Context, Result};
use convnet::checkpoint::{save_checkpoint, write_atomic, CheckpointMeta};
use convnet::train::Trainer;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Metadata key of the metrics of the epochs so far (a JSON array of objects).
const METRICS_KEY: &str = "metrics";
/// Metadata key of the run's settings (JSON).
pub const RUN_KEY: &str = "run";
/// Metadata key of a quantization-aware run's activation ranges (JSON pairs).
pub const QAT_RANGES_KEY: &str = "qat_ranges";

/// The files of a run, and the lock that keeps other processes out of them.
pub struct RunFolder {
    pub checkpoint: PathBuf,
    pub state: PathBuf,
    /// The int8 model of a quantization-aware run.
    pub int8: PathBuf,
    metrics: PathBuf,
    /// Held for the life of the run (released by the OS if the process dies).
    _lock: Option<File>,
}

impl RunFolder {
    /// The folder of a run, made if needed and locked (by rank 0, the only rank that
    /// writes, when `lead`). A new run refuses a folder that already holds a checkpoint; a
    /// resumed one first removes the temporary files a killed process may have left.
    pub fn open(out: &Path, resuming: bool, lead: bool) -> Result<RunFolder> {
        let mut folder = RunFolder {
            checkpoint: out.join("model.safetensors"),
            state: out.join("train_state.safetensors"),
            int8: out.join("model-int8.safetensors"),
            metrics: out.join("metrics.jsonl"),
            _lock: None,
        };
        if !lead {
            return Ok(folder);
        }
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        folder._lock = Some(lock(out)?);
        if !resuming && (folder.checkpoint.exists() || folder.state.exists()) {
            bail!(
                "{} already holds a run; continue it with --resume {} or choose another --out",
                out.display(),
                out.display()
            );
        }
        remove_stale_temporaries(out);
        Ok(folder)
    }

    /// Saves the run after `trainer`'s last epoch: the state (with `history`, the metrics
    /// of every epoch so far), then the checkpoint, then the metrics file.
    pub fn save(
        &self,
        trainer: &Trainer,
        meta: &CheckpointMeta,
        run_json: &str,
        history: &[serde_json::Value],
    ) -> Result<()> {
        let mut extra = HashMap::from([
            (RUN_KEY.to_string(), run_json.to_string()),
            (
                METRICS_KEY.to_string(),
                serde_json::Value::Array(history.to_vec()).to_string(),
            ),
        ]);
        let qat = convnet::quant::qat::QatNet::of(trainer.model());
        if let Some(qat) = qat {
            extra.insert(
                QAT_RANGES_KEY.to_string(),
                serde_json::to_string(&qat.ranges())?,
            );
        }
        trainer.save_state(&self.state, &extra)?;
        save_checkpoint(&self.checkpoint, &trainer.model().state_dict(), meta)?;
        if let Some(qat) = qat {
            // Before the first epoch no range has been observed yet.
            if trainer.epoch() > 0 {
                qat.convert()
                    .and_then(|q| q.save(&self.int8, meta))
                    .with_context(|| format!("cannot write {}", self.int8.display()))?;
            }
        }
        self.write_metrics(history)
    }

    /// Where the run's averaged weights go (`model-swa.safetensors`, `model-ema.safetensors`).
    pub fn averaged(&self, kind: convnet::optim::Averaging) -> PathBuf {
        self.checkpoint.with_file_name(match kind {
            convnet::optim::Averaging::Swa => "model-swa.safetensors",
            convnet::optim::Averaging::Ema { .. } => "model-ema.safetensors",
        })
    }

    /// Rewrites `metrics.jsonl` with one line per epoch of `history`.
    fn write_metrics(&self, history: &[serde_json::Value]) -> Result<()> {
        let mut text = String::new();
        for line in history {
            text.push_str(&line.to_string());
            text.push('\n');
        }
        write_atomic(&self.metrics, text.as_bytes())
            .with_context(|| format!("cannot write {}", self.metrics.display()))
    }
}

impl RunFolder {
    /// The metrics of the epochs a training state (with metadata `meta`) has completed:
    /// from the state itself, or, for states of older versions, the lines of
    /// `metrics.jsonl` up to its epoch (each once).
    pub fn history(&self, meta: &HashMap<String, String>, epochs: usize) -> Vec<serde_json::Value> {
        history(meta, &self.metrics, epochs)
    }
}

fn history(
    meta: &HashMap<String, String>,
    metrics_file: &Path,
    epochs: usize,
) -> Vec<serde_json::Value> {
    if let Some(saved) = meta
        .get(METRICS_KEY)
        .and_then(|m| serde_json::from_str::<Vec<serde_json::Value>>(m).ok())
    {
        return saved;
    }
    let mut by_epoch: Vec<Option<serde_json::Value>> = vec![None; epochs];
    for line in std::fs::read_to_string(metrics_file)
        .unwrap_or_default()
        .lines()
    {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(e) = v["epoch"].as_u64().map(|e| e as usize) {
                if (1..=epochs).contains(&e) {
                    by_epoch[e - 1] = Some(v);
                }
            }
        }
    }
    by_epoch.into_iter().flatten().collect()
}

/// Takes the folder's advisory lock, or says which process holds it.
fn lock(out: &Path) -> Result<File> {
    let path = out.join(".convnet.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "{} is in use by another `convnet train` ({}); wait for it to end, or choose another --out",
                out.display(),
                match holder.trim() {
                    "" => "a process".to_string(),
                    pid => format!("process {pid}"),
                }
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Removes temporary files of atomic writes (`.NAME.tmp-PID`) left by a process that was
/// killed while writing (only called with the folder locked, so none is being written).
fn remove_stale_temporaries(out: &Path) {
    for entry in std::fs::read_dir(out).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
