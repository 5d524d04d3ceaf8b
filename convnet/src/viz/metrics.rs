//! Reading a training run's `metrics.jsonl` (one JSON object per epoch, as `convnet train`
//! writes it) into [`RunCurves`], with errors that name the folder, file and line.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The name of the metrics file in a run folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One epoch of a run: every value is optional (a run without a test set has no `test_*`,
/// a diverged one may have written `null`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpochMetrics {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Learning rate at the end of the epoch.
    pub lr: Option<f64>,
    /// Mean training loss.
    pub train_loss: Option<f64>,
    /// Training accuracy, a fraction.
    pub train_accuracy: Option<f64>,
    /// Test loss.
    pub test_loss: Option<f64>,
    /// Test accuracy, a fraction.
    pub test_accuracy: Option<f64>,
    /// Seconds the epoch took.
    pub seconds: Option<f64>,
    /// Training throughput.
    pub train_images_per_sec: Option<f64>,
}

/// The metrics of one run, epoch by epoch, under a name for legends.
#[derive(Clone, Debug, PartialEq)]
pub struct RunCurves {
    /// The name legends show (the run folder's name).
    pub name: String,
    /// The epochs in increasing order, each once.
    pub epochs: Vec<EpochMetrics>,
}

impl RunCurves {
    /// Reads `dir/metrics.jsonl`; the run is named after the folder.
    ///
    /// ```
    /// let dir = std::env::temp_dir().join(format!("convnet-doc-run-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// std::fs::write(dir.join("metrics.jsonl"), "{\"epoch\": 1, \"train_loss\": 2.1, \"test_accuracy\": 0.3}\n")?;
    /// let run = convnet::viz::RunCurves::from_folder(&dir)?;
    /// assert_eq!(run.epochs[0].train_loss, Some(2.1));
    /// assert_eq!(run.epochs[0].test_loss, None);
    /// std::fs::remove_file(dir.join("metrics.jsonl"))?;
    /// let err = convnet::viz::RunCurves::from_folder(&dir).unwrap_err().to_string();
    /// assert!(err.contains("holds no metrics.jsonl"), "{err}");
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<RunCurves> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::Format {
                path: dir.to_path_buf(),
                msg: "is not a folder: give the run folder `convnet train --out` wrote".into(),
            });
        }
        let file = dir.join(METRICS_FILE);
        if !file.is_file() {
            return Err(Error::Format {
                path: dir.to_path_buf(),
                msg: format!(
                    "holds no {METRICS_FILE}: not a run folder of `convnet train`, or the run has not finished an epoch"
                ),
            });
        }
        let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
            path: file.clone(),
            source,
        })?;
        RunCurves::parse(run_name(dir), &text, &file)
    }

    /// Parses the text of a metrics file; `file` names it in errors, which also give the
    /// line number. Blank lines are skipped; a later line for the same epoch replaces an
    /// earlier one.
    ///
    /// ```
    /// use convnet::viz::RunCurves;
    /// let f = std::path::Path::new("run/metrics.jsonl");
    /// let run = RunCurves::parse("run", "{\"epoch\":2,\"lr\":0.1}\n{\"epoch\":1,\"lr\":null}\n", f)?;
    /// assert_eq!(run.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(), [1, 2]);
    /// let err = RunCurves::parse("run", "{\"epoch\":1}\nnot json\n", f).unwrap_err().to_string();
    /// assert!(err.starts_with("run/metrics.jsonl: line 2:"), "{err}");
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn parse(name: impl Into<String>, text: &str, file: &Path) -> Result<RunCurves> {
        let bad = |line: usize, msg: String| Error::Format {
            path: file.to_path_buf(),
            msg: format!("line {line}: {msg}"),
        };
        let mut epochs: Vec<EpochMetrics> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| bad(n, format!("not a JSON object ({e})")))?;
            let obj = v
                .as_object()
                .ok_or_else(|| bad(n, "not a JSON object".into()))?;
            let epoch = match obj.get("epoch") {
                Some(e) => e
                    .as_u64()
                    .filter(|&e| e >= 1)
                    .ok_or_else(|| bad(n, format!("\"epoch\" is {e}, not a positive integer")))?,
                None => return Err(bad(n, "has no \"epoch\"".into())),
            } as usize;
            let num = |key: &str| -> Result<Option<f64>> {
                match obj.get(key) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(v) => v
                        .as_f64()
                        .map(|x| Some(x).filter(|x| x.is_finite()))
                        .ok_or_else(|| bad(n, format!("\"{key}\" is {v}, not a number"))),
                }
            };
            let m = EpochMetrics {
                epoch,
                lr: num("lr")?,
                train_loss: num("train_loss")?,
                train_accuracy: num("train_accuracy")?,
                test_loss: num("test_loss")?,
                test_accuracy: num("test_accuracy")?,
                seconds: num("seconds")?,
                train_images_per_sec: num("train_images_per_sec")?,
            };
            match epochs.iter_mut().find(|e| e.epoch == epoch) {
                Some(e) => *e = m,
                None => epochs.push(m),
            }
        }
        if epochs.is_empty() {
            return Err(Error::Format {
                path: file.to_path_buf(),
                msg: "holds no epochs: the run has not finished one yet".into(),
            });
        }
        epochs.sort_by_key(|e| e.epoch);
        Ok(RunCurves {
            name: name.into(),
            epochs,
        })
    }

    /// The epoch with the highest test accuracy and that accuracy (the first such epoch on
    /// a tie), or `None` when the run has no test accuracy.
    ///
    /// ```
    /// use convnet::viz::RunCurves;
    /// let text = "{\"epoch\":1,\"test_accuracy\":0.4}\n{\"epoch\":2,\"test_accuracy\":0.6}\n{\"epoch\":3,\"test_accuracy\":0.5}";
    /// let run = RunCurves::parse("r", text, "m.jsonl".as_ref())?;
    /// assert_eq!(run.best_test_accuracy(), Some((2, 0.6)));
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn best_test_accuracy(&self) -> Option<(usize, f64)> {
        self.epochs
            .iter()
            .filter_map(|e| e.test_accuracy.map(|a| (e.epoch, a)))
            .fold(None, |best, (e, a)| match best {
                Some((_, b)) if b >= a => best,
                _ => Some((e, a)),
            })
    }
}

/// A run's name: its folder's last component (of the absolute path for `.` and the like).
fn run_name(dir: &Path) -> String {
    let named = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    named(dir)
        .or_else(|| std::fs::canonicalize(dir).ok().and_then(|p| named(&p)))
        .unwrap_or_else(|| dir.display().to_string())
}

/// Reads the runs in `dirs`; runs whose folders share a name are named by their paths.
pub(crate) fn read_runs<P: AsRef<Path>>(dirs: &[P]) -> Result<Vec<RunCurves>> {
    let mut runs = dirs
        .iter()
        .map(RunCurves::from_folder)
        .collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for (run, dir) in runs.iter_mut().zip(dirs) {
        if names.iter().filter(|n| **n == run.name).count() > 1 {
            run.name = PathBuf::from(dir.as_ref()).display().to_string();
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RunCurves> {
        RunCurves::parse("r", text, Path::new("runs/r/metrics.jsonl"))
    }

    #[test]
    fn reads_what_train_writes_and_runs_without_a_test_set() {
        let run = parse(concat!(
            r#"{"epoch":1,"lr":0.01,"train_loss":2.0,"train_accuracy":0.25,"test_loss":1.8,"test_accuracy":0.36,"seconds":2.9,"train_images_per_sec":1744.0}"#,
            "\n\n",
            r#"{"epoch":2,"lr":0.01,"train_loss":1.6,"train_accuracy":0.4,"test_loss":null}"#,
            "\n"
        ))
        .unwrap();
        assert_eq!(run.epochs.len(), 2);
        assert_eq!(run.epochs[0].seconds, Some(2.9));
        assert_eq!(run.epochs[1].test_loss, None);
        assert_eq!(run.epochs[1].test_accuracy, None);
        assert_eq!(run.best_test_accuracy(), Some((1, 0.36)));
    }

    #[test]
    fn a_later_line_replaces_an_epoch() {
        let run = parse("{\"epoch\":1,\"lr\":1}\n{\"epoch\":1,\"lr\":2}\n").unwrap();
        assert_eq!(run.epochs.len(), 1);
        assert_eq!(run.epochs[0].lr, Some(2.0));
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let e = |t: &str| parse(t).unwrap_err().to_string();
        assert_eq!(
            e("{\"epoch\":1}\n{\"epoch\":0}"),
            "runs/r/metrics.jsonl: line 2: \"epoch\" is 0, not a positive integer"
        );
        assert!(e("{\"lr\":1}").contains("line 1: has no \"epoch\""));
        assert!(e("[1,2]").contains("line 1: not a JSON object"));
        assert!(e("{\"epoch\":1,\"lr\":\"fast\"}").contains("\"lr\" is \"fast\", not a number"));
        assert!(e("{\"epoch\":1,").contains("line 1: not a JSON object ("));
        assert!(e("\n\n").contains("holds no epochs"));
    }

    #[test]
    fn runs_are_named_after_their_folders() {
        assert_eq!(run_name(Path::new("runs/lr-0.1")), "lr-0.1");
        assert_eq!(run_name(Path::new("runs/lr-0.1/")), "lr-0.1");
    }
}
