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
    /// Creates the directory if needed and takes its lock, or says who holds it. The
    /// directory is made private to hale's user (0700, and no file or directory in it
    /// readable by others), so nobody else, an agent running as another user first, can
    /// read the log, the admin token or the signing key.
    pub fn open(path: impl AsRef<Path>) -> Result<DataDir, StoreError> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(path.join("snapshots")).map_err(StoreError::io("create", &path))?;
        make_private(&path).map_err(StoreError::io("chmod", &path))?;
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

/// Takes group and other permissions off `dir` (0700) and off everything directly in it
/// (the log and its WAL, the secrets, the snapshot and log directories), which a data
/// directory made by an earlier hale, or under a lax umask, may have. Only the bits
/// beyond the owner's: a traversable `agents` directory (0711) stays as hale made it.
fn make_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let set = |path: &Path, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    // 0711 is hale's own choice when agents of other users work under it.
    if mode & 0o077 != 0 && mode & 0o7777 != 0o711 {
        set(dir, mode & 0o700)?;
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() == "agents" {
            continue;
        }
        let meta = entry.metadata()?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 && !meta.file_type().is_symlink() {
            set(&entry.path(), mode & 0o700)?;
        }
    }
    Ok(())
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

    #[test]
    fn the_directory_and_what_is_in_it_become_private() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("hale.db"), b"").unwrap();
        std::fs::set_permissions(dir.join("hale.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let _open = DataDir::open(&dir).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("hale.db")), 0o600);
        assert_eq!(mode(&dir.join("snapshots")) & 0o077, 0);
    }
}
