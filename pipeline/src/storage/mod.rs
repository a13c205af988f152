//! Storage: where bytes go — a local directory (the embedded default) or an S3-compatible bucket
//! (aws-sdk-s3) — behind one type, [`Store`]. It knows nothing of tables, commits or datasets (the lake
//! does); it only makes objects appear whole, lists, reads and deletes them.
//!
//! Files are written complete under a temporary name first and made visible in one step (a rename, or
//! one PUT / multipart completion), so a reader never sees half a file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::metrics::LogMetrics;

pub mod s3;
pub mod s3_requests;

/// Where files are written before they are committed (under the output directory or spool).
const STAGING_DIR: &str = ".staging";

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    S3(#[from] s3::S3Error),
    #[error("cannot write to output directory `{path}`: {source}")]
    NotWritable { path: PathBuf, source: io::Error },
    #[error("output `{0}` is a file, not a directory")]
    NotADirectory(PathBuf),
    #[error("`{0}` does not exist")]
    Missing(PathBuf),
    #[error("cannot read `{path}`: {source}")]
    NotReadable { path: PathBuf, source: io::Error },
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A local directory as the object store (the embedded default).
#[derive(Clone, Debug)]
pub struct LocalDir {
    root: PathBuf,
    /// Where the Delta log's requests to this directory are counted.
    log_requests: Arc<LogMetrics>,
}

impl LocalDir {
    /// Creates `root` if needed and proves it is writable before anything else starts.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        if root.is_file() {
            return Err(StoreError::NotADirectory(root));
        }
        let not_writable = |source| StoreError::NotWritable {
            path: root.clone(),
            source,
        };
        fs::create_dir_all(&root).map_err(not_writable)?;
        let probe = root.join(format!(".tcplake-write-test-{}", std::process::id()));
        fs::write(&probe, b"").map_err(not_writable)?;
        fs::remove_file(&probe).map_err(not_writable)?;
        let dir = LocalDir {
            root,
            log_requests: Arc::default(),
        };
        dir.remove_stale_staging();
        Ok(dir)
    }

    /// Opens an existing directory only to read it (a replay's source, which may be a read-only
    /// archive): nothing is created, probed or cleaned up in it.
    pub fn open_read_only(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(StoreError::NotADirectory(root)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing(root)),
            Err(source) => return Err(StoreError::NotReadable { path: root, source }),
        }
        fs::read_dir(&root).map_err(|source| StoreError::NotReadable {
            path: root.clone(),
            source,
        })?;
        Ok(LocalDir {
            root,
            log_requests: Arc::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A temporary path for the file that will become `key`: in `.staging/` under the root (same
    /// filesystem, so committing is a link), named after the key and this process. Hidden, and not
    /// ending in `.parquet`, so `**/*.parquet` globs never match it.
    pub fn staging_path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let dir = self.root.join(STAGING_DIR);
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        Ok(dir.join(format!(
            "{}.{}.tmp",
            key.replace('/', "%"),
            std::process::id()
        )))
    }

    /// Removes temporary files of runs that are no longer alive (killed mid-file): their rows were
    /// never committed, and the commit log makes the next run write them again.
    fn remove_stale_staging(&self) {
        let Ok(entries) = fs::read_dir(self.root.join(STAGING_DIR)) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_suffix(".tmp")
                .and_then(|n| n.rsplit('.').next())
                .and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                tracing::debug!(file = %name, "removing a temporary file left by a dead run");
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Makes a fully written, fsynced staging file visible under `key` unless something is already
    /// there (then `false`, and the staging file is removed). A hard link is atomic and never replaces.
    pub fn commit(&self, staged: &Path, key: &str) -> Result<bool, StoreError> {
        let final_path = self.root.join(key);
        if let Some(dir) = final_path.parent() {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        let created = match fs::hard_link(staged, &final_path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io_err("link into place", &final_path)(e)),
        };
        self.discard(staged);
        // Persist the link itself: without this a crash can forget a file we reported as written.
        if let Some(dir) = final_path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync directory", dir))?;
        }
        Ok(created)
    }

    /// Moves a fully written, fsynced staging file to `key` (replacing any file there) and persists the
    /// directory entry.
    pub fn move_into_place(&self, staged: &Path, key: &str) -> Result<(), StoreError> {
        let final_path = self.root.join(key);
        if let Some(dir) = final_path.parent() {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        if let Err(e) = fs::rename(staged, &final_path) {
            self.discard(staged);
            return Err(io_err("move into place", &final_path)(e));
        }
        if let Some(dir) = final_path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync directory", dir))?;
        }
        Ok(())
    }

    /// Writes a small object under `key` unless one exists (`false` then).
    pub fn put_if_absent(&self, key: &str, body: &[u8]) -> Result<bool, StoreError> {
        let staged = self.staging_path(key)?;
        fs::write(&staged, body)
            .and_then(|()| fs::File::open(&staged)?.sync_all())
            .map_err(io_err("write", &staged))?;
        self.commit(&staged, key)
    }

    /// Writes a small object under `key`, replacing any: a rename over the old file is atomic, so a
    /// reader sees the old bytes or the new, never a mix.
    pub fn replace(&self, key: &str, body: &[u8]) -> Result<(), StoreError> {
        let staged = self.staging_path(key)?;
        fs::write(&staged, body)
            .and_then(|()| fs::File::open(&staged)?.sync_all())
            .map_err(io_err("write", &staged))?;
        let final_path = self.root.join(key);
        if let Some(dir) = final_path.parent() {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        if let Err(e) = fs::rename(&staged, &final_path) {
            self.discard(&staged);
            return Err(io_err("rename into place", &final_path)(e));
        }
        if let Some(dir) = final_path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync directory", dir))?;
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.root.join(key);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    pub fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let path = self.root.join(key);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    /// Keys of the files directly under the directory `prefix` (which ends in `/`): not its
    /// subdirectories; hidden names (temporary files) are left out.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join(prefix);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &dir)(e)),
        };
        let mut keys = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("list", &dir))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with('.') {
                keys.push(format!("{prefix}{name}"));
            }
        }
        keys.sort();
        Ok(keys)
    }

    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.root.join(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Removes a staging file that will not be committed (error or abandoned write).
    pub fn discard(&self, staged: &Path) {
        if let Err(e) = fs::remove_file(staged) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %staged.display(), error = %e, "could not remove temporary file");
            }
        }
    }
}

/// Where a run writes: chosen by `--out` (`DIR` or `s3://bucket/prefix`).
#[derive(Clone, Debug)]
pub enum Store {
    Local(LocalDir),
    S3(s3::S3Store),
}

impl Store {
    /// Counts the Delta log's requests to this store in `m` (the process's metrics).
    pub fn counting_log_requests(self, m: Arc<LogMetrics>) -> Store {
        match self {
            Store::Local(mut d) => {
                d.log_requests = m;
                Store::Local(d)
            }
            Store::S3(s) => Store::S3(s.counting_log_requests(m)),
        }
    }

    /// Where the Delta log's requests to this store are counted.
    pub fn log_requests(&self) -> Arc<LogMetrics> {
        match self {
            Store::Local(d) => Arc::clone(&d.log_requests),
            Store::S3(s) => s.log_requests(),
        }
    }

    /// A temporary local path for the file that will be committed as `key`.
    pub fn staging_path(&self, key: &str) -> Result<PathBuf, StoreError> {
        match self {
            Store::Local(d) => d.staging_path(key),
            Store::S3(s) => s.spool().staging_path(key),
        }
    }

    /// Makes a sealed file visible under its key, then forgets the temporary copy. `false`: an object
    /// was already there and was left as it is.
    pub async fn commit(&self, staged: &Path, key: &str) -> Result<bool, StoreError> {
        match self {
            Store::Local(d) => crate::blocking::run(|| d.commit(staged, key)),
            Store::S3(s) => {
                let result = s.put_file(staged, key).await.map_err(StoreError::from);
                s.spool().discard(staged);
                result
            }
        }
    }

    /// Makes a sealed file visible under `key`, replacing whatever is there, then forgets the temporary
    /// copy. For names nothing else references (a table only references what it committed, and a
    /// commit's file names are new): a leftover of an interrupted attempt is simply replaced.
    pub async fn upload(&self, staged: &Path, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Local(d) => crate::blocking::run(|| d.move_into_place(staged, key)),
            Store::S3(s) => {
                let result = s
                    .upload_file(staged, key, false)
                    .await
                    .map(|_| ())
                    .map_err(StoreError::from);
                s.spool().discard(staged);
                result
            }
        }
    }

    /// Creates a small object unless one exists (`false` then).
    pub async fn put_if_absent(&self, key: &str, body: &[u8]) -> Result<bool, StoreError> {
        match self {
            Store::Local(d) => d.put_if_absent(key, body),
            Store::S3(s) => Ok(s.put_bytes(key, body).await?),
        }
    }

    /// Writes a small object, replacing any (atomically: readers see old or new bytes).
    pub async fn replace(&self, key: &str, body: &[u8]) -> Result<(), StoreError> {
        match self {
            Store::Local(d) => d.replace(key, body),
            Store::S3(s) => Ok(s.replace_bytes(key, body).await?),
        }
    }

    /// The whole object, or `None` if there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::Local(d) => d.get(key),
            Store::S3(s) => Ok(s.get(key).await?),
        }
    }

    /// The object's size, or `None` if there is none.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Local(d) => d.size(key),
            Store::S3(s) => Ok(s.head(key).await?),
        }
    }

    /// Keys of the objects directly under `prefix` (a directory, ending in `/`), sorted: on both
    /// stores, not those under its subdirectories (an S3 listing is flat; what it finds deeper is
    /// left out here).
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Local(d) => d.list(prefix),
            Store::S3(s) => Ok(s
                .list(prefix)
                .await?
                .into_iter()
                .filter(|k| {
                    k.strip_prefix(prefix)
                        .is_some_and(|rest| !rest.contains('/'))
                })
                .collect()),
        }
    }

    /// Names of the "directories" directly under `prefix` (ending in `/`), sorted.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Local(d) => {
                let dir = d.root().join(prefix);
                let entries = match fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(io_err("list", &dir)(e)),
                };
                let mut names: Vec<String> = entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                Ok(names)
            }
            Store::S3(s) => {
                let mut names: Vec<String> = s
                    .list(prefix)
                    .await?
                    .iter()
                    .filter_map(|k| {
                        k.strip_prefix(prefix)?
                            .split_once('/')
                            .map(|(d, _)| d.to_string())
                    })
                    .collect();
                names.dedup();
                Ok(names)
            }
        }
    }

    /// Removes an object (absent is fine).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Local(d) => d.delete(key),
            Store::S3(s) => Ok(s.delete(key).await?),
        }
    }

    pub fn discard(&self, staged: &Path) {
        match self {
            Store::Local(d) => d.discard(staged),
            Store::S3(s) => s.spool().discard(staged),
        }
    }

    /// `DIR` or `s3://bucket/prefix`, for summaries and logs.
    pub fn describe(&self) -> String {
        match self {
            Store::Local(d) => d.root().display().to_string(),
            Store::S3(s) => s.url(),
        }
    }
}

/// 16 random hex digits (from the kernel's generator; the clock and pid when it cannot be read).
pub fn new_id() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/random/uuid") {
        Ok(u) => u.trim().replace('-', "").chars().take(16).collect(),
        Err(_) => format!(
            "{:08x}{:08x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `list` names the files directly under a prefix: not subdirectories or what they hold (S3's
    /// flat listing is cut the same way), nor hidden temporary files.
    #[tokio::test]
    async fn list_is_the_files_directly_under_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("p/sub")).unwrap();
        for f in ["p/b.json", "p/a.json", "p/.tmp-x", "p/sub/c.json"] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        let store = Store::Local(LocalDir::open(root).unwrap());
        assert_eq!(store.list("p/").await.unwrap(), ["p/a.json", "p/b.json"]);
        assert_eq!(store.list_dirs("p/").await.unwrap(), ["sub"]);
        assert!(store.list("none/").await.unwrap().is_empty());
    }
}
