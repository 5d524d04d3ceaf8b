//! Scratch folders for tests: a path under the system temp dir, named after the test and
//! the process, removed with everything in it when the test ends, unless the test failed
//! (then it is kept, and its path printed, for a look). Shared by the library's and the
//! CLI's integration tests.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// A test's scratch path; see the module documentation.
pub struct Scratch(PathBuf);

impl Scratch {
    /// `convnet-{name}-{process id}` under the temp dir, emptied of anything an earlier run
    /// left there, and not created (for commands that create their output folder).
    pub fn path(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("convnet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Scratch(d)
    }

    /// [`Scratch::path`], created as an empty folder.
    pub fn folder(name: &str) -> Scratch {
        let s = Scratch::path(name);
        std::fs::create_dir_all(&s.0).expect("create a scratch folder");
        s
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<OsStr> for Scratch {
    fn as_ref(&self) -> &OsStr {
        self.0.as_os_str()
    }
}
