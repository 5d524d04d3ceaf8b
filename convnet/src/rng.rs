//! Seeded random numbers: a small, fast, reproducible generator (xoshiro256++ seeded
//! through SplitMix64) and the process-wide default generator used for initialisation and
//! dropout, in the manner of `torch.manual_seed`.
//!
//! The sequence for a given seed is part of the format: it never changes between versions,
//! so a seed reproduces a run.

use std::sync::Mutex;

/// A seeded pseudo-random generator whose whole state can be saved and restored.
///
/// ```
/// let mut a = convnet::Rng::new(7);
/// let mut b = convnet::Rng::new(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// let x = a.uniform(-1.0, 1.0);
/// assert!((-1.0..1.0).contains(&x));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// Creates a generator from a seed.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// The generator's full state, for checkpoints.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// Restores a state returned by [`Rng::state`].
    pub fn from_state(s: [u64; 4]) -> Self {
        Rng { s }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform `f32` in `[0, 1)` with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform `f64` in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform `f32` in `[low, high)`.
    pub fn uniform(&mut self, low: f32, high: f32) -> f32 {
        (low as f64 + (high as f64 - low as f64) * self.next_f64()) as f32
    }

    /// Standard normal `f32` (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Uniform integer in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Shuffles a slice in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

static GLOBAL: Mutex<Option<Rng>> = Mutex::new(None);

/// Seeds the process-wide generator used by layer initialisation and dropout.
///
/// ```
/// convnet::manual_seed(42);
/// let a = convnet::with_global_rng(|r| r.next_u64());
/// convnet::manual_seed(42);
/// assert_eq!(a, convnet::with_global_rng(|r| r.next_u64()));
/// ```
pub fn manual_seed(seed: u64) {
    *GLOBAL.lock().unwrap_or_else(|e| e.into_inner()) = Some(Rng::new(seed));
}

/// Runs `f` with the process-wide generator (seeded with 0 if never seeded).
pub fn with_global_rng<R>(f: impl FnOnce(&mut Rng) -> R) -> R {
    let mut guard = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(|| Rng::new(0)))
}

/// The process-wide generator's state (for checkpoints), seeding it with 0 if never seeded.
pub fn global_rng_state() -> [u64; 4] {
    with_global_rng(|r| r.state())
}

/// Restores the process-wide generator from [`global_rng_state`].
pub fn set_global_rng_state(state: [u64; 4]) {
    *GLOBAL.lock().unwrap_or_else(|e| e.into_inner()) = Some(Rng::from_state(state));
}
