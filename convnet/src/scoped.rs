//! Thread-local settings that hold for the duration of a closure (recording, autocast
//! precision, Winograd convolutions): set on entry, restored on exit, also when the closure
//! panics.

use std::cell::Cell;
use std::thread::LocalKey;

/// Runs `f` with `setting` holding `value` on this thread, then restores the previous value.
pub(crate) fn with<T: Copy + 'static, R>(
    setting: &'static LocalKey<Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static LocalKey<Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(setting, setting.with(|c| c.replace(value)));
    f()
}
