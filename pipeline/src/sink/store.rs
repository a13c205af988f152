//! Where committed files go: a local directory (the embedded default) or an S3-compatible bucket.
//!
//! Files are written complete under a temporary name first and made visible in one step (a rename, or
//! one PUT / multipart completion), so a reader never sees half a file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    S3(#[from] super::s3::S3Error),
    #[error("cannot write to output directory `{path}`: {source}")]
    NotWritable { path: PathBuf, source: io::Error },
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
}

impl LocalDir {
    /// Creates `root` if needed and proves it is writable before anything else starts.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let not_writable = |source| StoreError::NotWritable {
            path: root.clone(),
            source,
        };
        fs::create_dir_all(&root).map_err(not_writable)?;
        let probe = root.join(format!(".tcplake-write-test-{}", std::process::id()));
        fs::write(&probe, b"").map_err(not_writable)?;
        fs::remove_file(&probe).map_err(not_writable)?;
        Ok(LocalDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A temporary path in the same directory as `key` (so the commit is a same-filesystem rename). The
    /// name starts with a dot and does not end in `.parquet`, so `**/*.parquet` globs never match it.
    pub fn staging_path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let final_path = self.root.join(key);
        let dir = final_path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let name = final_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(dir.join(format!(".{name}.{}.tmp", std::process::id())))
    }

    /// Makes a fully written, fsynced staging file visible under `key`.
    pub fn commit(&self, staged: &Path, key: &str) -> Result<(), StoreError> {
        let final_path = self.root.join(key);
        fs::rename(staged, &final_path).map_err(io_err("rename into place", &final_path))?;
        // Persist the rename itself: without this a crash can forget a file we reported as written.
        if let Some(dir) = final_path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync directory", dir))?;
        }
        Ok(())
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
    S3(super::s3::S3Store),
}

impl Store {
    /// A temporary local path for the file that will be committed as `key`.
    pub fn staging_path(&self, key: &str) -> Result<PathBuf, StoreError> {
        match self {
            Store::Local(d) => d.staging_path(key),
            Store::S3(s) => s.spool().staging_path(key),
        }
    }

    /// Makes a sealed file visible under its key, then forgets the temporary copy.
    pub async fn commit(&self, staged: &Path, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Local(d) => d.commit(staged, key),
            Store::S3(s) => {
                let result = s.put_file(staged, key).await.map_err(StoreError::from);
                s.spool().discard(staged);
                result
            }
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
