//! An opt-in op profiler: wall time and FLOPs of every forward op and every backward kernel,
//! aggregated by op and shape. Off by default (one relaxed atomic load per op); `convnet
//! bench --profile` turns it on to find where a training step spends its time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static ROWS: Mutex<Option<HashMap<String, ProfileRow>>> = Mutex::new(None);

/// Aggregated timings of one op at one shape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProfileRow {
    /// Op and shape, e.g. `conv2d [64, 16, 32, 32] w[16, 16, 3, 3] s1 p1`.
    pub key: String,
    /// Forward calls.
    pub forward_calls: u64,
    /// Forward wall time in seconds.
    pub forward_secs: f64,
    /// Forward floating-point operations (conv and linear only).
    pub forward_flops: f64,
    /// Backward calls.
    pub backward_calls: u64,
    /// Backward wall time in seconds.
    pub backward_secs: f64,
    /// Backward floating-point operations (conv and linear only).
    pub backward_flops: f64,
}

/// Turns profiling on or off (and clears the collected rows when turning it on).
pub fn enable(on: bool) {
    if on {
        *ROWS.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashMap::new());
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether profiling is on.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The rows collected so far, slowest first.
pub fn rows() -> Vec<ProfileRow> {
    let guard = ROWS.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<ProfileRow> = guard
        .as_ref()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    v.sort_by(|a, b| {
        (b.forward_secs + b.backward_secs).total_cmp(&(a.forward_secs + a.backward_secs))
    });
    v
}

/// Runs `f`, charging its time to `key()` (computed only when profiling).
pub(crate) fn timed<R>(
    backward: bool,
    key: impl FnOnce() -> String,
    flops: impl FnOnce() -> f64,
    f: impl FnOnce() -> R,
) -> R {
    if !is_enabled() {
        return f();
    }
    let t0 = Instant::now();
    let r = f();
    let secs = t0.elapsed().as_secs_f64();
    let (key, flops) = (key(), flops());
    let mut guard = ROWS.lock().unwrap_or_else(|e| e.into_inner());
    let row = guard
        .get_or_insert_with(HashMap::new)
        .entry(key.clone())
        .or_insert_with(|| ProfileRow {
            key,
            ..Default::default()
        });
    if backward {
        row.backward_calls += 1;
        row.backward_secs += secs;
        row.backward_flops += flops;
    } else {
        row.forward_calls += 1;
        row.forward_secs += secs;
        row.forward_flops += flops;
    }
    r
}
