//! Recycled host buffers: the activations and gradients of a training step have the same
//! sizes every step, so the large buffers that tensors free are kept and handed to the next
//! kernel that asks for one of that size and overwrites all of it. This saves the zeroing
//! pass (a full write of the buffer) that a fresh zeroed allocation costs on reused memory.
//!
//! Only kernels documented to write every element of their output take a recycled buffer
//! ([`take_overwritten`]); everything else allocates zeroed memory as before. Buffers below
//! [`MIN_LEN`] are not kept (zeroing them is cheap), and the pool holds at most
//! [`MAX_BYTES`]; what does not fit is freed.
//!
//! In builds with debug assertions a recycled buffer is filled with NaN before it is handed
//! out, so that a kernel that fails to write an element shows up in the tests as NaN rather
//! than as a stale value from an earlier step.

use std::collections::HashMap;
use std::sync::Mutex;

/// Smallest buffer (in floats) worth keeping: 256 KiB.
pub const MIN_LEN: usize = 1 << 16;
/// Most memory the pool keeps: 1 GiB.
pub const MAX_BYTES: usize = 1 << 30;

struct Pool {
    by_len: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn with_pool<R>(f: impl FnOnce(&mut Pool) -> R) -> R {
    // A panic while the lock was held cannot leave the pool inconsistent in a way that
    // matters (at worst a buffer is lost), so a poisoned lock is used as is.
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(|| Pool {
        by_len: HashMap::new(),
        bytes: 0,
    }))
}

/// A buffer of `len` floats whose contents are unspecified (zeros, or the values of an
/// earlier tensor): for a kernel that writes every element.
pub fn take_overwritten(len: usize) -> Vec<f32> {
    if len >= MIN_LEN {
        let reused = with_pool(|p| {
            let v = p.by_len.get_mut(&len)?.pop()?;
            p.bytes -= len * 4;
            Some(v)
        });
        if let Some(mut v) = reused {
            if cfg!(debug_assertions) {
                v.fill(f32::NAN);
            }
            return v;
        }
    }
    vec![0f32; len]
}

/// Returns a buffer to the pool (kept if large enough and there is room, else freed).
pub fn give_back(v: Vec<f32>) {
    let len = v.len();
    if len < MIN_LEN || v.capacity() != len {
        return;
    }
    with_pool(|p| {
        if p.bytes + len * 4 <= MAX_BYTES {
            p.bytes += len * 4;
            p.by_len.entry(len).or_default().push(v);
        }
    });
}

/// Frees every kept buffer.
pub fn clear() {
    with_pool(|p| {
        p.by_len.clear();
        p.bytes = 0;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_come_back_small_ones_do_not() {
        clear();
        let big = vec![1.0f32; MIN_LEN + 3];
        let ptr = big.as_ptr();
        give_back(big);
        let again = take_overwritten(MIN_LEN + 3);
        assert_eq!(
            again.as_ptr(),
            ptr,
            "the same allocation is handed out again"
        );
        assert_eq!(again.len(), MIN_LEN + 3);
        // Another size is a fresh, zeroed buffer.
        let other = take_overwritten(MIN_LEN + 4);
        assert!(other.iter().all(|&v| v == 0.0));
        give_back(vec![2.0f32; 10]);
        assert!(take_overwritten(10).iter().all(|&v| v == 0.0));
        clear();
    }
}
