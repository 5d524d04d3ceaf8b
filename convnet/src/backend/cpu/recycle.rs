//! Recycled host buffers: the activations and gradients of a training step have the same
//! sizes every step, so the large buffers that tensors free are kept and handed to the next
//! kernel that asks for one of that size and overwrites all of it. This saves the zeroing
//! pass (a full write of the buffer) that a fresh zeroed allocation costs on reused memory.
//!
//! Only kernels documented to write every element of their output take a recycled buffer
//! ([`take_overwritten`]); everything else allocates zeroed memory as before. The pool keeps
//! a freed buffer only for a size that such kernels ask for, and only as many of that size
//! as they have needed at once (the count grows by one each time a request finds none), so
//! buffers that nobody would take again go back to the allocator. Buffers below [`MIN_LEN`]
//! are not kept (zeroing them is cheap), and the pool holds at most [`MAX_BYTES`].
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
    by_len: HashMap<usize, Kept>,
    bytes: usize,
}

/// The buffers of one size, and how many of that size the pool may hold.
#[derive(Default)]
struct Kept {
    buffers: Vec<Vec<f32>>,
    limit: usize,
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
            let kept = p.by_len.entry(len).or_default();
            match kept.buffers.pop() {
                Some(v) => {
                    p.bytes -= len * 4;
                    Some(v)
                }
                None => {
                    // One more of this size was needed than the pool held.
                    kept.limit += 1;
                    None
                }
            }
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
        let Some(kept) = p.by_len.get_mut(&len) else {
            return; // a size no kernel asks for
        };
        if kept.buffers.len() < kept.limit && p.bytes + len * 4 <= MAX_BYTES {
            p.bytes += len * 4;
            kept.buffers.push(v);
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
    fn keeps_only_sizes_asked_for_and_only_as_many_as_needed() {
        clear();
        let len = MIN_LEN + 3;
        // A size nobody asked for is not kept.
        give_back(vec![1.0f32; len]);
        assert!(
            take_overwritten(len).iter().all(|&v| v == 0.0),
            "fresh and zeroed"
        );
        // That request registered the size with room for one buffer: the next one freed is
        // kept and handed out again, a second one is not kept.
        let (a, b) = (vec![1.0f32; len], vec![2.0f32; len]);
        let ptr = a.as_ptr();
        give_back(a);
        give_back(b);
        let again = take_overwritten(len);
        assert_eq!(
            again.as_ptr(),
            ptr,
            "the same allocation is handed out again"
        );
        assert!(
            take_overwritten(len).iter().all(|&v| v == 0.0),
            "only one was kept"
        );
        // Small buffers are never kept.
        let _ = take_overwritten(10);
        give_back(vec![2.0f32; 10]);
        assert!(take_overwritten(10).iter().all(|&v| v == 0.0));
        clear();
    }
}
