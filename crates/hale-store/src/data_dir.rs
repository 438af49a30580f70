use crate::error::StoreError;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A data directory, locked for this process for as long as the value lives.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed and takes its lock, or says who holds it.
    pub fn open(path: impl AsRef<Path>) -> Result<DataDir, StoreError> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(path.join("snapshots")).map_err(StoreError::io("create", &path))?;
        let lock_path = path.join("LOCK");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(StoreError::io("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder =
                    if holder.trim().is_empty() { "pid unknown".to_string() } else { holder.trim().to_string() };
                return Err(StoreError::Locked { dir: path, holder });
            }
            Err(TryLockError::Error(source)) => return Err(StoreError::Io { action: "lock", path: lock_path, source }),
        }
        lock.set_len(0).map_err(StoreError::io("write", &lock_path))?;
        write!(lock, "pid {}", std::process::id()).map_err(StoreError::io("write", &lock_path))?;
        Ok(DataDir { path, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The SQLite database that holds the log.
    pub fn log_path(&self) -> PathBuf {
        self.path.join("hale.db")
    }

    /// The directory of snapshot files.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.path.join("snapshots")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_is_refused_while_the_first_lives() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open(dir.path()).unwrap();
        let refused = DataDir::open(dir.path()).unwrap_err();
        assert!(matches!(&refused, StoreError::Locked { holder, .. } if holder.starts_with("pid ")), "{refused}");
        drop(first);
        DataDir::open(dir.path()).unwrap();
    }
}
