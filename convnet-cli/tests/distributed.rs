//! `convnet` under `mpirun` (built with `--features mpi`): data-parallel training gives the
//! weights one process gives with the same global batch, resumes with another number of
//! ranks, runs over TCP alone, evaluates and benchmarks on several ranks, and a failing or
//! killed rank ends the whole job quickly with a message.
//!
//! The launcher is Open MPI's `mpirun --oversubscribe` unless `CONVNET_MPIRUN` names another
//! (e.g. `mpiexec` for MPICH); runs as root are allowed, as CI runs as root.
#![cfg(feature = "mpi")]

mod common;

use common::temp;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_convnet");

fn cache_dir() -> PathBuf {
    std::env::temp_dir().join(format!("convnet-dist-cache-{}", std::process::id()))
}

/// The working directory of every process started here: runs given no `--out` (the
/// refused and failing ones) make their `runs/` folder there, not in the source tree. One
/// folder for every run of these tests, emptied when a test process first uses it, so at
/// most one is left behind.
fn work_dir() -> PathBuf {
    static FRESH: std::sync::Once = std::sync::Once::new();
    let d = std::env::temp_dir().join("convnet-dist-cwd");
    FRESH.call_once(|| {
        let _ = std::fs::remove_dir_all(&d);
    });
    std::fs::create_dir_all(&d).expect("create the working directory");
    d
}

/// The launcher with `-np ranks` and the settings every run here needs.
fn mpirun(ranks: usize, mca: &[&str]) -> Command {
    let launcher =
        std::env::var("CONVNET_MPIRUN").unwrap_or_else(|_| "mpirun --oversubscribe".into());
    let mut words = launcher.split_whitespace();
    let mut cmd = Command::new(words.next().unwrap_or("mpirun"));
    cmd.args(words)
        .args(mca)
        .args(["-np", &ranks.to_string()])
        .current_dir(work_dir())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("CONVNET_CACHE_DIR", cache_dir());
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().expect("run the launcher or convnet")
}

/// `convnet ARGS` as one process, or on `ranks` MPI ranks (`ranks` > 1).
fn convnet(ranks: usize, args: &[&str]) -> Output {
    if ranks == 1 {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(work_dir())
            .env("CONVNET_CACHE_DIR", cache_dir());
        return run(cmd);
    }
    let mut cmd = mpirun(ranks, &[]);
    cmd.arg(BIN).args(args);
    run(cmd)
}

fn succeeded(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn last_json(out: &Output) -> serde_json::Value {
    let stdout = succeeded(out);
    serde_json::from_str(stdout.lines().last().expect("output")).expect("last line is JSON")
}

/// Trains with `args` on `ranks` ranks (1 thread each) into a fresh folder; returns it.
fn train(tag: &str, ranks: usize, args: &[&str]) -> common::Scratch {
    let out = temp(tag);
    let mut all = vec!["train", "--threads", "1", "--limit-test", "200", "--out"];
    all.push(out.to_str().unwrap());
    all.extend_from_slice(args);
    succeeded(&convnet(ranks, &all));
    out
}

/// The float32 tensors of a checkpoint, by name.
fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        .map(|(n, t)| {
            let data = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, data)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The run folders' checkpoints hold the same weights: every element within
/// `|a - b| <= 1e-5 |b| + 1e-6` (the suite's float32 tolerance), except at most `outliers`
/// elements, and every tensor of n elements within the same bound in norm
/// (`||a - b|| <= 1e-5 ||b|| + 1e-6 sqrt(n)`).
///
/// Outliers are for Adam: its step `m / (sqrt(v) + eps)` turns a gradient element near 0
/// into a step of up to the learning rate whose sign is that of the element, so the order
/// in which a near-zero sum was added up (which differs between one process and several,
/// as between thread counts) moves a handful of such weights by a fraction of the rate.
fn assert_same_weights(what: &str, a: &Path, b: &Path, outliers: usize) {
    let (wa, wb) = (
        weights(&a.join("model.safetensors")),
        weights(&b.join("model.safetensors")),
    );
    assert_eq!(
        wa.iter().map(|t| &t.0).collect::<Vec<_>>(),
        wb.iter().map(|t| &t.0).collect::<Vec<_>>(),
        "{what}: tensor names"
    );
    let mut outside = Vec::new();
    for ((name, x), (_, y)) in wa.iter().zip(&wb) {
        let (mut diff2, mut norm2) = (0f64, 0f64);
        for (i, (&p, &q)) in x.iter().zip(y).enumerate() {
            let d = (p - q).abs();
            if d.is_nan() || d > 1e-5 * q.abs() + 1e-6 {
                outside.push(format!("{name}[{i}]: {p} vs {q}"));
            }
            diff2 += (d as f64).powi(2);
            norm2 += (q as f64).powi(2);
        }
        assert!(
            diff2.sqrt() <= 1e-5 * norm2.sqrt() + 1e-6 * (x.len() as f64).sqrt(),
            "{what}: {name} differs by {:e} in norm (relative)",
            diff2.sqrt() / norm2.sqrt().max(1e-30)
        );
    }
    assert!(
        outside.len() <= outliers,
        "{what}: {} elements outside rtol 1e-5 / atol 1e-6 (at most {outliers} allowed): {:?}",
        outside.len(),
        &outside[..outside.len().min(5)]
    );
}

/// Trains one epoch with `args` once in one process and once on each `(ranks, global
/// batch, images)`, and compares the weights (see [`assert_same_weights`]).
fn train_like_one_process(
    tag: &str,
    cases: &[(usize, &str, &str)],
    args: &[&str],
    outliers: usize,
) {
    for &(ranks, batch, images) in cases {
        let mut all = vec![
            "--epochs",
            "1",
            "--batch-size",
            batch,
            "--limit-train",
            images,
        ];
        all.extend_from_slice(args);
        let one = train(&format!("{tag}1-{ranks}"), 1, &all);
        let many = train(&format!("{tag}n-{ranks}"), ranks, &all);
        assert_same_weights(&format!("{tag}, {ranks} ranks"), &many, &one, outliers);
    }
}

/// SGD with momentum: 2 ranks (20 steps of 64) and 3 ranks with a global batch of 48 and
/// a short last batch of 40 (slices of 14, 13, 13) give one process's weights.
///
/// The learning rate is 1e-3: at the default 1e-2, 20 steps on these images are chaotic
/// enough (a ReLU that flips on a rounding difference changes a whole gradient term) that
/// one process on one thread and on two already differ by 5e-6 (75 weights outside the
/// tolerance), and at 3e-3 three ranks do; at 1e-3 all agree to 1e-10.
#[test]
fn ranks_train_seed_cnn_like_one_process_with_sgd() {
    let cases = [(2, "64", "1280"), (3, "48", "1000")];
    train_like_one_process("sgd", &cases, &["--lr", "1e-3"], 0);
}

/// AdamW: the same over 10 steps, with at most a handful of Adam's near-zero-gradient
/// weights apart.
///
/// Ten steps, not twenty: Adam's step does not shrink with the gradient, so the rounding
/// difference between one process and several (the batch is summed in two halves) grows
/// until, late in the run, a unit on the edge of a ReLU or a max-pool tie goes one way in
/// one run and the other way in the other. Measured with 2 ranks on these images: 0 weights
/// outside the tolerance after 10 and 15 steps, 6 after 18 and 869 after 20, and which run
/// lands on which side changes with the order in which the convolution kernels add up.
///
/// Both runs take the direct kernel (`--kernels direct`): Winograd's weight gradient adds
/// the images' sums in the transformed domain, where they are larger than the result, so
/// summing the batch in two halves moves more of Adam's near-zero-gradient weights (11
/// outside the tolerance with the rules' kernels). The SGD test above runs the rules.
#[test]
fn ranks_train_seed_cnn_like_one_process_with_adamw() {
    let cases = [(2, "64", "640"), (3, "48", "480")];
    let args = [
        "--optimizer",
        "adamw",
        "--lr",
        "1e-4",
        "--weight-decay",
        "0.01",
        "--kernels",
        "direct",
    ];
    train_like_one_process("adamw", &cases, &args, 10);
}

/// resnet20 with synchronised batch norm: ten steps on 2 ranks give one process's weights
/// and running statistics (a small learning rate: at 1e-2 ten steps of resnet20 on these
/// images already differ by 1e-3 between one process on one thread and on two). The direct
/// kernel, as in the AdamW test: with the rules' Winograd weight gradients 26 weights of
/// the first convolution land just outside 1e-5 of one process's.
#[test]
fn resnet20_with_sync_bn_trains_like_one_process() {
    let args = [
        "--model",
        "resnet20",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--limit-train",
        "640",
        "--lr",
        "1e-4",
        "--kernels",
        "direct",
    ];
    let one = train("syncbn1", 1, &args);
    let mut sync = args.to_vec();
    sync.push("--sync-bn");
    let many = train("syncbn2", 2, &sync);
    assert_same_weights("resnet20 --sync-bn, 2 ranks", &many, &one, 10);
}

/// A run stopped after one epoch continues on another number of ranks (1 -> 2, 2 -> 1) to
/// the weights of the uninterrupted run.
#[test]
fn resuming_with_another_number_of_ranks_matches_an_uninterrupted_run() {
    let args = [
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--limit-train",
        "640",
    ];
    let whole = train("resume-whole", 1, &args);
    for (first, second) in [(1, 2), (2, 1)] {
        let mut stop = args.to_vec();
        stop.extend(["--stop-after", "1"]);
        let dir = train(&format!("resume-{first}-{second}"), first, &stop);
        succeeded(&convnet(
            second,
            &[
                "train",
                "--threads",
                "1",
                "--epochs",
                "2",
                "--resume",
                dir.to_str().unwrap(),
            ],
        ));
        assert_same_weights(&format!("{first} rank(s) then {second}"), &dir, &whole, 0);
    }
}

/// Over TCP alone (no shared memory) two ranks give the same weights as over shared
/// memory, bit for bit (a sum of two numbers does not depend on the transport).
#[test]
fn two_ranks_over_tcp_only_give_the_same_weights() {
    let args = [
        "train",
        "--threads",
        "1",
        "--epochs",
        "1",
        "--limit-train",
        "640",
        "--limit-test",
        "200",
    ];
    let shm = temp("shm");
    let tcp = temp("tcp");
    for (dir, mca) in [(&shm, vec![]), (&tcp, vec!["--mca", "btl", "tcp,self"])] {
        let mut cmd = mpirun(2, &mca);
        cmd.arg(BIN)
            .args(args)
            .args(["--out", dir.to_str().unwrap()]);
        succeeded(&run(cmd));
    }
    assert_eq!(
        weights(&shm.join("model.safetensors")),
        weights(&tcp.join("model.safetensors")),
        "TCP and shared memory"
    );
}

/// `eval` on 3 ranks counts every test image once: the report equals one process's.
#[test]
fn evaluation_on_three_ranks_equals_one_process() {
    let args = [
        "eval",
        "--pretrained",
        "seed-cnn-cifar10",
        "--threads",
        "1",
        "--json",
    ];
    let one = last_json(&convnet(1, &args));
    let three = last_json(&convnet(3, &args));
    assert_eq!(one["confusion_matrix"], three["confusion_matrix"]);
    let (l1, l3) = (
        one["loss"].as_f64().unwrap(),
        three["loss"].as_f64().unwrap(),
    );
    assert!((l1 - l3).abs() <= 1e-6 * l1, "loss {l1} vs {l3}");
}

/// `bench` under mpirun reports the global batch's images/s and how much of the step was
/// spent waiting for communication.
#[test]
fn bench_reports_global_images_per_second_and_communication_share() {
    let out = convnet(
        2,
        &[
            "bench",
            "--model",
            "resnet20",
            "--batch-size",
            "32",
            "--threads",
            "1",
            "--steps",
            "4",
            "--warmup",
            "1",
            "--json",
        ],
    );
    let r = last_json(&out);
    assert_eq!(r["ranks"], 2);
    assert_eq!(r["batch_size"], 32);
    let share = r["comm_share"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&share), "communication share {share}");
    assert!(r["gradient_buckets"].as_u64().unwrap() >= 1);
    // One JSON line in all: only rank 0 reports.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with('{')).count(),
        1,
        "{stdout}"
    );
}

/// Arguments that do not fit the ranks end with a message on every rank.
#[test]
fn a_batch_that_does_not_divide_and_ranks_started_differently_are_refused() {
    let out = convnet(3, &["train", "--batch-size", "64", "--epochs", "1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must divide by 3"), "{stderr}");
    // Rank 1 is given another learning rate than rank 0.
    let mut cmd = mpirun(1, &[]);
    cmd.args([
        BIN,
        "train",
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--limit-train",
        "128",
    ])
    .args([
        ":",
        "-np",
        "1",
        BIN,
        "train",
        "--epochs",
        "1",
        "--lr",
        "0.1",
        "--limit-train",
        "128",
    ]);
    let out = run(cmd);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rank 1 was started differently from rank 0") && stderr.contains("lr"),
        "{stderr}"
    );
}

/// Waits up to `limit` for `child` to end; kills it and fails if it does not.
fn wait_ended(child: &mut Child, limit: Duration, what: &str) -> (std::process::ExitStatus, f64) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, start.elapsed().as_secs_f64());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: the job was still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: the parent is the second field after the ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// A rank whose data file is bad (rank 1 here) ends every rank within seconds, with its
/// message and a non-zero status; so does an error on rank 0 in the middle of training.
#[test]
fn an_error_on_one_rank_stops_every_rank() {
    let bad = temp("bad-data");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("data_batch_1.bin"), b"not CIFAR").unwrap();
    let mut cmd = mpirun(1, &[]);
    cmd.args([BIN, "train", "--epochs", "1"])
        .args([":", "-np", "1", BIN, "train", "--epochs", "1", "--data"])
        .arg(&bad)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let (status, secs) = wait_ended(&mut child, Duration::from_secs(30), "bad file on rank 1");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("error on rank 1 of 2"), "{stderr}");
    assert!(
        stderr.contains("data_batch_1.bin") || stderr.contains(bad.to_str().unwrap()),
        "{stderr}"
    );
    eprintln!("bad file on rank 1: every rank gone after {secs:.1} s");

    // Rank 0 cannot write its metrics at the end of epoch 1 (a folder is in the way) while
    // rank 1 goes on to epoch 2.
    let out_dir = temp("metrics-blocked");
    std::fs::create_dir_all(out_dir.join("metrics.jsonl")).unwrap();
    let mut cmd = mpirun(2, &[]);
    cmd.args([
        BIN,
        "train",
        "--epochs",
        "3",
        "--limit-train",
        "256",
        "--threads",
        "1",
        "--out",
    ])
    .arg(&out_dir)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let (status, secs) = wait_ended(&mut child, Duration::from_secs(60), "error on rank 0");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("error on rank 0 of 2") && stderr.contains("metrics.jsonl"),
        "{stderr}"
    );
    eprintln!("error on rank 0 mid-run: every rank gone after {secs:.1} s");
}

/// A rank killed by a signal ends the job, and the last complete checkpoint still loads.
#[test]
fn a_killed_rank_ends_the_job_and_the_checkpoint_survives() {
    let out_dir = temp("killed");
    let mut cmd = mpirun(2, &[]);
    cmd.args([
        BIN,
        "train",
        "--epochs",
        "50",
        "--limit-train",
        "640",
        "--threads",
        "1",
        "--out",
    ])
    .arg(&out_dir)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let ckpt = out_dir.join("model.safetensors");
    let start = Instant::now();
    while !ckpt.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no checkpoint after a minute"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let training go on a little, then kill the last rank started by the launcher.
    std::thread::sleep(Duration::from_millis(300));
    let ranks = children(child.id());
    assert!(ranks.len() >= 2, "the launcher's processes: {ranks:?}");
    let victim = *ranks.iter().max().unwrap();
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let (status, secs) = wait_ended(&mut child, Duration::from_secs(30), "killed rank");
    assert!(!status.success());
    eprintln!("rank (pid {victim}) killed: job ended after {secs:.1} s");
    for pid in ranks {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z")),
            "rank process {pid} is still running"
        );
    }
    let eval = convnet(
        1,
        &[
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--limit-test",
            "100",
            "--json",
        ],
    );
    let r = last_json(&eval);
    assert!(r["accuracy"].as_f64().unwrap() > 0.0);
}

/// GPU ranks (here on the kernel emulator, `cuda:1000`) reduce their gradients through host
/// memory and MPI: two ranks give one process's weights on the same device.
#[cfg(feature = "cuda-emulator")]
#[test]
fn emulated_gpu_ranks_train_like_one_process_on_the_gpu() {
    let args = [
        "--device",
        "cuda:1000",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--limit-train",
        "256",
        "--lr",
        "1e-3",
        "--dist-backend",
        "mpi",
    ];
    let one = train("gpu1", 1, &args);
    let many = train("gpu2", 2, &args);
    assert_same_weights("2 ranks on the emulated GPU", &many, &one, 0);
    // Synchronised batch norm has no GPU kernels yet: refused with the reason.
    let out = convnet(
        2,
        &[
            "train",
            "--model",
            "resnet20",
            "--device",
            "cuda:1000",
            "--sync-bn",
            "--epochs",
            "1",
            "--limit-train",
            "64",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("synchronised batch norm runs on the CPU only"),
        "{stderr}"
    );
}

/// NCCL is for GPUs: asking for it on the CPU (or in a build without it) says so.
#[test]
fn nccl_without_a_gpu_or_without_nccl_support_is_refused() {
    let out = convnet(
        2,
        &[
            "train",
            "--epochs",
            "1",
            "--limit-train",
            "64",
            "--dist-backend",
            "nccl",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--dist-backend nccl") && stderr.contains("--device cuda"),
        "{stderr}"
    );
}
