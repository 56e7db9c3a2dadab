//! Files watched for a change, so key and certificate files are re-read when they change.

use super::*;

/// A file's identity and version, as `stat` (following symlinks) reports them: Kubernetes
/// publishes a Secret update by swapping a symlink, which changes the inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    inode: u64,
    modified: Option<std::time::SystemTime>,
    len: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            inode: meta.ino(),
            modified: meta.modified().ok(),
            len: meta.len(),
        })
    }
}

/// Files watched for a change (a new inode, as when Kubernetes or cert-manager swaps a
/// mounted Secret, a new modification time or length). Cheap: one `stat` per file and look.
#[derive(Debug)]
pub(crate) struct WatchedFiles {
    /// Each file, and what it looked like at the last look.
    files: Mutex<Vec<(PathBuf, Option<FileStamp>)>>,
}

impl WatchedFiles {
    /// Each path with its stamp from when the file was last read.
    pub(crate) fn new(files: Vec<(PathBuf, Option<FileStamp>)>) -> Self {
        Self {
            files: Mutex::new(files),
        }
    }

    /// Whether any of the files changed since the last look; this look counts as seen.
    pub(crate) fn changed(&self) -> bool {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let mut changed = false;
        for (path, seen) in files.iter_mut() {
            let now = FileStamp::of(path);
            changed |= *seen != now;
            *seen = now;
        }
        changed
    }
}
