//! `convnet-fuzz`: every file reader of convnet fed mutated files, on stable Rust.
//!
//! Each target takes an input (bytes), lays it out as the files a user would hand to
//! convnet (a CIFAR release folder, an IDX pair, a `.tar.gz` image folder, an image, a
//! safetensors checkpoint, a `.pt` zip with its pickle, a TOML/JSON model file, a training
//! state) and calls convnet's public reader on them. Inputs come from a committed seed
//! corpus (`fuzz/corpus/<target>/`, written by `convnet-fuzz seed`), mutated by byte-level
//! and structure-aware operators (numbers in text replaced by extreme ones, sizes in binary
//! headers set to edge values, splices of two seeds, the inside of compressed containers
//! mutated before compression).
//!
//! Every input must end without a panic, within a time bound, and allocate at most a
//! bound derived from its size (a counting allocator measures the peak of every call).
//! A reader may refuse an input with an error: that is the right answer to a bad file.
//!
//! ```text
//! cargo run --release -p convnet-fuzz -- seed                    # (re)write fuzz/corpus
//! cargo run --release -p convnet-fuzz -- run all --inputs 2000   # what CI runs
//! cargo run --release -p convnet-fuzz -- run pt --inputs 1000000 --seed 7
//! cargo run --release -p convnet-fuzz -- replay pt fuzz/crashes/pt-...
//! ```
//!
//! Findings (panics, bounds exceeded, hangs) are written to `fuzz/crashes/` with the target
//! in the name and reported; the run exits non-zero when there is any.

mod alloc;
mod mutate;
mod seeds;
mod targets;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// Time one input may take before the run is stopped as hung.
const TIME_LIMIT: Duration = Duration::from_secs(10);

fn usage() -> ! {
    eprintln!(
        "usage: convnet-fuzz seed [DIR]
       convnet-fuzz run (all|TARGET) [--inputs N] [--seed S] [--corpus DIR] [--crashes DIR]
       convnet-fuzz replay TARGET FILE...
       convnet-fuzz list
targets: {}",
        targets::ALL
            .iter()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    std::process::exit(2)
}

fn repo_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(sub)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { usage() };
    match cmd.as_str() {
        "list" => {
            for t in targets::ALL {
                println!("{:<16} {}", t.name, t.what);
            }
        }
        "seed" => {
            let dir = args
                .get(1)
                .map_or_else(|| repo_dir("corpus"), PathBuf::from);
            match seeds::write_all(&dir, &repo_dir("regressions")) {
                Ok(n) => println!("wrote {n} seed files under {}", dir.display()),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1)
                }
            }
        }
        "run" => {
            let Some(which) = args.get(1) else { usage() };
            let mut opts = RunOptions {
                inputs: 10_000,
                seed: 1,
                corpus: repo_dir("corpus"),
                crashes: repo_dir("crashes"),
            };
            let mut it = args[2..].iter();
            while let Some(flag) = it.next() {
                let value = it.next().unwrap_or_else(|| usage());
                match flag.as_str() {
                    "--inputs" => opts.inputs = value.parse().unwrap_or_else(|_| usage()),
                    "--seed" => opts.seed = value.parse().unwrap_or_else(|_| usage()),
                    "--corpus" => opts.corpus = PathBuf::from(value),
                    "--crashes" => opts.crashes = PathBuf::from(value),
                    _ => usage(),
                }
            }
            let chosen: Vec<&targets::Target> = if which == "all" {
                targets::ALL.iter().collect()
            } else {
                vec![targets::ALL
                    .iter()
                    .find(|t| t.name == which)
                    .unwrap_or_else(|| usage())]
            };
            let mut findings = 0;
            for t in chosen {
                findings += run(t, &opts);
            }
            if findings > 0 {
                eprintln!(
                    "{findings} finding(s); inputs saved under {}",
                    opts.crashes.display()
                );
                std::process::exit(1);
            }
        }
        "replay" => {
            let Some(which) = args.get(1) else { usage() };
            let t = targets::ALL
                .iter()
                .find(|t| t.name == which)
                .unwrap_or_else(|| usage());
            let work = Workdir::new();
            quiet_panics();
            let mut bad = 0;
            for file in &args[2..] {
                let input = std::fs::read(file).unwrap_or_else(|e| {
                    eprintln!("{file}: {e}");
                    std::process::exit(2)
                });
                let outcome = execute(t, &input, &work);
                println!("{file}: {outcome}");
                bad += usize::from(outcome.is_finding());
            }
            std::process::exit(i32::from(bad > 0));
        }
        _ => usage(),
    }
}

struct RunOptions {
    inputs: u64,
    seed: u64,
    corpus: PathBuf,
    crashes: PathBuf,
}

/// A scratch folder for one process's inputs (tmpfs when there is one).
pub struct Workdir(PathBuf);

impl Workdir {
    fn new() -> Workdir {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("convnet-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch folder");
        Workdir(dir)
    }

    /// An empty folder for the next input.
    pub fn fresh(&self) -> PathBuf {
        let dir = self.0.join("in");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch folder");
        dir
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How one input ended.
enum Outcome {
    Accepted,
    Refused(String),
    Panicked(String),
    TooMuchMemory { peak: usize, bound: usize },
}

impl Outcome {
    fn is_finding(&self) -> bool {
        matches!(self, Outcome::Panicked(_) | Outcome::TooMuchMemory { .. })
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Accepted => write!(f, "accepted"),
            Outcome::Refused(e) => write!(f, "refused: {e}"),
            Outcome::Panicked(m) => write!(f, "PANIC: {m}"),
            Outcome::TooMuchMemory { peak, bound } => {
                write!(f, "ALLOCATED {peak} bytes at the peak, bound {bound}")
            }
        }
    }
}

/// Panics are findings, reported with where they happened (instead of printed by the
/// default hook).
fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        // The first frame in convnet's own code, else where the panic was raised.
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        let ours = trace
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("at ") && l.contains("convnet/src/"))
            .map(|l| l.trim_start_matches("at ").to_string());
        let at = ours.or_else(|| {
            info.location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
        });
        *PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()) = at.unwrap_or_default();
    }));
}

/// Where the last panic happened (set by the run's panic hook).
static PANIC_AT: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Runs `target` on `input`, measuring the allocation peak.
fn execute(target: &targets::Target, input: &[u8], work: &Workdir) -> Outcome {
    let base = alloc::start_window();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (target.run)(input, work)));
    let peak = alloc::window_peak().saturating_sub(base);
    let bound = (target.bound)(input.len());
    match result {
        Err(p) => Outcome::Panicked(format!(
            "{} at {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into()),
            PANIC_AT.lock().unwrap_or_else(|e| e.into_inner())
        )),
        Ok(_) if peak > bound => Outcome::TooMuchMemory { peak, bound },
        Ok(Ok(())) => Outcome::Accepted,
        Ok(Err(e)) => Outcome::Refused(e),
    }
}

/// Fuzzes one target; returns the number of findings.
fn run(target: &targets::Target, opts: &RunOptions) -> usize {
    // Past findings first: each must now be refused or read within the bounds.
    let regressions = repo_dir("regressions").join(target.name);
    let mut findings = 0;
    if let Ok(inputs) = seeds::load(&regressions) {
        let work = Workdir::new();
        quiet_panics();
        for (i, input) in inputs.iter().enumerate() {
            let outcome = execute(target, input, &work);
            if outcome.is_finding() {
                findings += 1;
                eprintln!(
                    "{}: regression {i} in {}: {outcome}",
                    target.name,
                    regressions.display()
                );
            }
        }
    }
    let corpus = seeds::load(&opts.corpus.join(target.corpus)).unwrap_or_default();
    if corpus.is_empty() {
        eprintln!(
            "{}: no seed corpus under {} (run `convnet-fuzz seed`)",
            target.name,
            opts.corpus.join(target.corpus).display()
        );
        return 1;
    }
    let work = Workdir::new();
    quiet_panics();
    let started = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    watchdog(target.name, started.clone(), epoch);
    let mut rng = mutate::Rng::new(opts.seed ^ fnv(target.name));
    let (mut accepted, mut refused) = (0u64, 0u64);
    let mut peak_ratio = 0f64;
    let t0 = Instant::now();
    for i in 0..opts.inputs {
        // The seeds themselves first, then mutants.
        let input = if (i as usize) < corpus.len() {
            corpus[i as usize].clone()
        } else {
            let base = &corpus[rng.below(corpus.len())];
            mutate::mutate(&mut rng, base, &corpus)
        };
        started.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        let outcome = execute(target, &input, &work);
        started.store(0, Ordering::SeqCst);
        match &outcome {
            Outcome::Accepted => accepted += 1,
            Outcome::Refused(_) => refused += 1,
            _ => {
                findings += 1;
                let name = format!("{}-{}-{i}", target.name, opts.seed);
                let _ = std::fs::create_dir_all(&opts.crashes);
                let _ = std::fs::write(opts.crashes.join(&name), &input);
                eprintln!("{}: input {i}: {outcome} (saved as {name})", target.name);
            }
        }
        if let Outcome::Accepted | Outcome::Refused(_) = outcome {
            let bound = (target.bound)(input.len()) as f64;
            peak_ratio = peak_ratio.max(alloc::last_peak() as f64 / bound);
        }
    }
    println!(
        "{:<16} {:>9} inputs in {:>7.1} s: {:>8} accepted, {:>8} refused, {} finding(s); worst allocation {:.1}% of its bound",
        target.name,
        opts.inputs,
        t0.elapsed().as_secs_f64(),
        accepted,
        refused,
        findings,
        100.0 * peak_ratio
    );
    findings
}

/// Stops the process with a message when one input runs past [`TIME_LIMIT`] (the input is
/// still in the scratch folder for a replay).
fn watchdog(name: &'static str, started: Arc<AtomicU64>, epoch: Instant) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        let s = started.load(Ordering::SeqCst);
        if s > 0 && epoch.elapsed().as_millis() as u64 + 1 > s + TIME_LIMIT.as_millis() as u64 {
            eprintln!("{name}: an input ran past {TIME_LIMIT:?}: HANG");
            std::process::exit(3);
        }
    });
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
