//! A run survives what happens to long jobs: `--resume DIR` alone continues a run as it was
//! started; SIGKILL at random instants (and in the middle of checkpoint writes) never
//! costs more than the epoch in progress and never changes the result; a full disk or a
//! read-only folder gives a clear error and keeps the last checkpoint; two processes
//! cannot write one folder; absurd model descriptions and non-finite weights are refused
//! before anything is allocated or run.

mod common;

use common::{convnet, last_json, temp, tensors, Scratch};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_convnet");

/// A small, deterministic run: seed-cnn on 320 training images, one thread.
const RUN: [&str; 8] = [
    "--limit-train",
    "320",
    "--limit-test",
    "100",
    "--threads",
    "1",
    "--batch-size",
    "32",
];

fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train"];
    args.extend_from_slice(&RUN);
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    convnet(&args)
}

fn ok(out: std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "failed: {}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn failed(out: std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "should have failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// The checkpoints of two run folders hold the same tensors, bit for bit.
fn assert_same_model(a: &Path, b: &Path) {
    assert_eq!(
        tensors(&a.join("model.safetensors")),
        tensors(&b.join("model.safetensors")),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

/// The epochs of a run folder's metrics file, in order.
fn metric_epochs(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("a JSON line")["epoch"]
                .as_u64()
                .expect("an epoch")
        })
        .collect()
}

/// Temporary files of atomic writes in `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn resume_alone_continues_the_run_as_it_was_started() {
    let mut parts = Vec::new();
    for schedule in ["constant", "cosine"] {
        let (whole, part) = (
            temp(&format!("whole-{schedule}")),
            temp(&format!("part-{schedule}")),
        );
        ok(train(&whole, &["--epochs", "3", "--schedule", schedule]));
        ok(train(
            &part,
            &["--epochs", "3", "--stop-after", "1", "--schedule", schedule],
        ));
        // No flags: the run's own epochs (3, not the default 10) and schedule.
        let r = last_json(&convnet(&[
            "train",
            "--resume",
            part.to_str().unwrap(),
            "--json",
        ]));
        assert_eq!(r["epochs"], 3, "{schedule}");
        assert_same_model(&whole, &part);
        assert_eq!(metric_epochs(&part), [1, 2, 3]);
        parts.push(part);
    }
    // A run-defining flag that differs is refused; one that agrees, or one that only says
    // how to compute, is taken; more epochs extend a constant-rate run and say so.
    let (part, cosine) = (&parts[0], &parts[1]);
    let stderr = failed(convnet(&[
        "train",
        "--resume",
        part.to_str().unwrap(),
        "--lr",
        "0.1",
    ]));
    assert!(
        stderr.contains("--lr 0.1 differs from the run's 0.01"),
        "{stderr}"
    );
    let stderr = ok(convnet(&[
        "train",
        "--resume",
        part.to_str().unwrap(),
        "--lr",
        "0.01",
        "--threads",
        "2",
        "--epochs",
        "4",
    ]));
    assert!(stderr.contains("changed: --epochs 3 -> 4"), "{stderr}");
    assert_eq!(metric_epochs(part), [1, 2, 3, 4]);
    let stderr = failed(convnet(&[
        "train",
        "--resume",
        cosine.to_str().unwrap(),
        "--epochs",
        "5",
    ]));
    assert!(stderr.contains("cosine learning-rate schedule"), "{stderr}");
}

/// Starts `convnet ARGS` in the background.
fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start convnet")
}

fn kill(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Waits until `dir` holds a temporary file of an atomic write of `file` (it is being
/// written), or `limit` passes.
fn wait_for_write(dir: &Path, file: &str, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if temporaries(dir)
            .iter()
            .any(|t| t.starts_with(&format!(".{file}")))
        {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// At least 30 SIGKILLs, every third one while a file of the run is being written (the
/// state, the checkpoint and the metrics in turn) and the others at random instants, each
/// followed by `--resume`: the run always resumes, ends
/// with the uninterrupted run's weights bit for bit, and has each epoch's metrics once.
#[test]
fn killed_at_random_instants_the_run_always_resumes_to_the_same_weights() {
    const EPOCHS: &str = "8";
    let (whole, killed) = (temp("kill-whole"), temp("kill-target"));
    ok(train(&whole, &["--epochs", EPOCHS]));
    let mut args = vec!["train"];
    args.extend_from_slice(&RUN);
    args.extend_from_slice(&["--epochs", EPOCHS, "--out", killed.to_str().unwrap()]);
    let resume = [
        "train",
        "--resume",
        killed.to_str().unwrap(),
        "--threads",
        "1",
    ];
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut kills, mut during_writes, mut attempts) = (0, 0, 0);
    loop {
        attempts += 1;
        assert!(attempts < 400, "the run did not finish");
        // Killed before its first state was written, a run is started again as it was
        // (what its user would do); afterwards it is resumed.
        let command: &[&str] = if killed.join("train_state.safetensors").exists() {
            &resume
        } else {
            &args
        };
        if kills >= 30 {
            // The last start runs to the end.
            ok(convnet(command));
            break;
        }
        let mut child = spawn(command);
        {
            if kills % 3 == 2 {
                // In turn while the state, the checkpoint and the metrics are written.
                let file = ["train_state", "model", "metrics"][(kills / 3) % 3];
                wait_for_write(&killed, file, Duration::from_secs(5));
            } else {
                std::thread::sleep(Duration::from_millis(20 + next() % 700));
            }
            kill(&mut child);
            kills += 1;
            // A temporary file left behind shows the kill landed in the middle of a write.
            if !temporaries(&killed).is_empty() {
                during_writes += 1;
            }
        }
    }
    eprintln!("{kills} kills ({during_writes} while a checkpoint file was being written) over {attempts} starts");
    assert!(kills >= 30);
    assert!(
        during_writes >= 5,
        "only {during_writes} kills landed during writes"
    );
    assert_same_model(&whole, &killed);
    assert_eq!(metric_epochs(&killed), (1..=8).collect::<Vec<u64>>());
    assert!(
        temporaries(&killed).is_empty(),
        "{:?}",
        temporaries(&killed)
    );
}

/// A tmpfs of `size` mounted at a fresh folder, if this process may mount (as root in a
/// container that allows it); unmounted (and the folder removed) when dropped.
struct Tmpfs(Scratch);

impl Tmpfs {
    fn mount(name: &str, size: &str) -> Option<Tmpfs> {
        let dir = temp(name);
        std::fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&*dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }
    fn remount_read_only(&self) -> bool {
        Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&*self.0)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&*self.0).status();
    }
}

/// After a failed write: the previous state and checkpoint are intact (the run resumes
/// elsewhere to the uninterrupted result, the checkpoint evaluates) and no temporary file
/// is left.
fn assert_previous_run_intact(dir: &Path, what: &str) {
    assert!(
        temporaries(dir).is_empty(),
        "{what}: {:?}",
        temporaries(dir)
    );
    let r = last_json(&convnet(&[
        "eval",
        "--checkpoint",
        dir.join("model.safetensors").to_str().unwrap(),
        "--limit-test",
        "100",
        "--json",
    ]));
    assert!(r["accuracy"].as_f64().is_some(), "{what}");
    assert_eq!(metric_epochs(dir), [1], "{what}");
}

#[test]
fn a_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary_files() {
    // A file-size limit (`ulimit -f`, with SIGXFSZ ignored so that writes fail with EFBIG):
    // the state of epoch 2 (4 MiB) cannot be written.
    let dir = temp("fsize");
    ok(train(&dir, &["--epochs", "2", "--stop-after", "1"]));
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 1024; exec {BIN} train --resume {} --threads 1",
            dir.display()
        ))
        .output()
        .unwrap();
    let stderr = failed(out);
    assert!(
        stderr.contains("train_state.safetensors") && stderr.contains("too large"),
        "{stderr}"
    );
    assert_previous_run_intact(&dir, "file-size limit");
    // A real full file system, where this process may mount one: after epoch 1 a file
    // fills all but 1 MiB of it.
    match Tmpfs::mount("full-disk", "32m") {
        Some(fs) => {
            let dir = fs.0.join("run");
            ok(train(&dir, &["--epochs", "3", "--stop-after", "1"]));
            let free = Command::new("df")
                .args(["--output=avail", "-B1"])
                .arg(&fs.0)
                .output()
                .unwrap();
            let free: u64 = String::from_utf8_lossy(&free.stdout)
                .lines()
                .nth(1)
                .and_then(|l| l.trim().parse().ok())
                .expect("df reports the free space");
            std::fs::write(fs.0.join("filler"), vec![0u8; (free - (1 << 20)) as usize]).unwrap();
            let stderr = failed(convnet(&[
                "train",
                "--resume",
                dir.to_str().unwrap(),
                "--threads",
                "1",
            ]));
            assert!(stderr.contains("No space left on device"), "{stderr}");
            assert_previous_run_intact(&dir, "full tmpfs");
        }
        None => eprintln!(
            "note: cannot mount a tmpfs here; the full-disk case ran with a file-size limit only"
        ),
    }
}

#[test]
fn a_read_only_folder_gives_a_clear_error_and_keeps_the_checkpoint() {
    let Some(fs) = Tmpfs::mount("read-only", "64m") else {
        eprintln!("note: cannot mount a tmpfs here (read-only folders are refused by the OS for root otherwise); not tested");
        return;
    };
    let dir = fs.0.join("run");
    ok(train(&dir, &["--epochs", "2", "--stop-after", "1"]));
    assert!(fs.remount_read_only());
    let stderr = failed(convnet(&[
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--threads",
        "1",
    ]));
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert_previous_run_intact(&dir, "read-only");
}

#[test]
fn a_second_run_on_the_same_folder_refuses() {
    let dir = temp("locked");
    let mut first = spawn(&[
        "train",
        "--epochs",
        "50",
        "--threads",
        "1",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let start = Instant::now();
    while !dir.join("model.safetensors").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the first run never wrote"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for args in [
        vec!["train", "--resume", dir.to_str().unwrap()],
        vec!["train", "--out", dir.to_str().unwrap()],
    ] {
        let stderr = failed(convnet(&args));
        assert!(
            stderr.contains("in use by another `convnet train`")
                || stderr.contains("already holds a run"),
            "{args:?}: {stderr}"
        );
    }
    let stderr = failed(convnet(&["train", "--resume", dir.to_str().unwrap()]));
    assert!(
        stderr.contains(&format!("process {}", first.id())),
        "{stderr}"
    );
    kill(&mut first);
    // Once the first process is gone, the folder is free again.
    ok(convnet(&[
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--stop-after",
        "1",
    ]));
}

/// `cmd` under a 2 GiB address-space limit, so that an attempt to allocate a model of
/// absurd size would abort instead of being refused.
fn limited(args: &str) -> std::process::Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -v 2097152; exec {BIN} {args}"))
        .output()
        .unwrap()
}

#[test]
fn absurd_model_descriptions_fail_before_allocating() {
    let dir = temp("bombs");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bomb.toml");
    std::fs::write(
        &file,
        "name = \"bomb\"\n[[layer]]\ntype = \"conv2d\"\nname = \"wide\"\nout_channels = 4000000000\nkernel_size = 3\n[[layer]]\ntype = \"flatten\"\n[[layer]]\ntype = \"linear\"\nout_features = \"classes\"\n",
    )
    .unwrap();
    let start = Instant::now();
    let out = limited(&format!(
        "summary --model-file {} --input 3x32x32",
        file.display()
    ));
    let stderr = failed(out);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        stderr.contains("\"wide\"") && stderr.contains("parameters"),
        "{stderr}"
    );
    // Padding that overflows the size arithmetic.
    std::fs::write(
        &file,
        "name = \"pad\"\n[[layer]]\ntype = \"conv2d\"\nname = \"padded\"\nout_channels = 4\nkernel_size = 3\npadding = 4000000000\n[[layer]]\ntype = \"flatten\"\n[[layer]]\ntype = \"linear\"\nout_features = \"classes\"\n",
    )
    .unwrap();
    let stderr = failed(limited(&format!(
        "summary --model-file {} --input 3x32x32",
        file.display()
    )));
    assert!(
        stderr.contains("\"padded\"") && stderr.contains("larger than"),
        "{stderr}"
    );
    // A zoo model sized for 100000x100000 images (as a checkpoint's metadata may claim).
    let stderr = failed(limited("summary --model seed-cnn --input 3x100000x100000"));
    assert!(
        stderr.contains("conv1") && stderr.contains("larger than"),
        "{stderr}"
    );
}

#[test]
fn a_checkpoint_with_non_finite_weights_is_refused_before_running() {
    let dir = temp("nan-weights");
    ok(train(&dir, &["--epochs", "1"]));
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    // The last 4 bytes are the last float of the last tensor: make it NaN.
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    for cmd in ["eval", "predict"] {
        let mut args = vec![cmd, "--checkpoint", path.to_str().unwrap()];
        if cmd == "predict" {
            args.push("any.png");
        }
        let stderr = failed(convnet(&args));
        assert!(stderr.contains("NaN or infinite"), "{cmd}: {stderr}");
    }
}

/// `bytes` (a safetensors file) with its first tensor's header entry edited by `edit`.
fn edit_first_tensor(bytes: &[u8], edit: impl Fn(&str) -> String) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let start = header.find("\"shape\"").unwrap();
    let end = start + header[start..].find('}').unwrap();
    let edited = format!(
        "{}{}{}",
        &header[..start],
        edit(&header[start..end]),
        &header[end..]
    );
    let mut out = (edited.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(edited.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

#[test]
fn a_checkpoint_claiming_a_huge_tensor_fails_before_allocating() {
    let dir = temp("huge-state");
    ok(train(&dir, &["--epochs", "1", "--stop-after", "1"]));
    let good = std::fs::read(dir.join("model.safetensors")).unwrap();
    let path = dir.join("huge.safetensors");
    // A 10^12-element tensor: once on the tensor's own bytes, once with offsets to match.
    for (what, entry) in [
        (
            "shape",
            "\"shape\":[1000000,1000000],\"data_offsets\":[0,4]",
        ),
        (
            "shape and offsets",
            "\"shape\":[1000000,1000000],\"data_offsets\":[0,4000000000000]",
        ),
    ] {
        std::fs::write(&path, edit_first_tensor(&good, |_| entry.to_string())).unwrap();
        for cmd in ["eval", "predict"] {
            let start = Instant::now();
            let args = format!("{cmd} --checkpoint {}", path.display());
            let args = if cmd == "predict" {
                args + " any.png"
            } else {
                args
            };
            let stderr = failed(limited(&args));
            assert!(start.elapsed() < Duration::from_secs(10), "{what}: {cmd}");
            assert!(
                stderr.contains("huge.safetensors"),
                "{what}: {cmd}: {stderr}"
            );
        }
    }
}
