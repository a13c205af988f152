//! From a cgroup id (what the kernel puts in events) to the cgroup's path, once per cgroup.
//!
//! Three sources, so that a cgroup's events resolve even when the cgroup is gone by the time they are
//! read (a short-lived container, a job): the hierarchy as it is when capture starts (a walk of the
//! cgroup2 mount: a directory's inode number is its cgroup id), every cgroup made after that (the
//! kernel's `cgroup:cgroup_mkdir` records, sent as it makes them and read before the TCP events of the
//! same drain), and, for an id neither saw, the kernel's own lookup by id (`open_by_handle_at` on the
//! mount, then the descriptor's path). What is known is kept in a bounded map; an id that cannot be
//! resolved is counted (`capture_cgroups_unresolved_total`) and its events carry no path, never a
//! guess.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustc_hash::FxHashMap;

use crate::event::Cgroup;

/// Upper bound on remembered cgroups (~a few hundred bytes each); past it the map starts over and
/// live cgroups are looked up again.
const MAX_KNOWN: usize = 65_536;

/// The cgroup2 mount point, from `/proc/mounts` (never assumed: hybrid hosts mount it under
/// `/sys/fs/cgroup/unified`, unified ones at `/sys/fs/cgroup`).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
        // Octal escapes (`\040` for a space) as /proc/mounts writes them.
        (kind == "cgroup2").then(|| PathBuf::from(unescape(dir)))
    })
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Known cgroups by id.
pub struct Resolver {
    mount: Option<PathBuf>,
    known: FxHashMap<u64, Option<Cgroup>>,
    /// The last id resolved and its answer: consecutive events are mostly of one cgroup.
    last: Option<(u64, Option<Cgroup>)>,
    unresolved: u64,
}

impl Resolver {
    /// Starts with the hierarchy as it is now. Call after the `cgroup_mkdir` program is attached, so
    /// that no cgroup made meanwhile is missed.
    pub fn of_this_host() -> Self {
        let mount = cgroup2_mount();
        let mut r = Resolver {
            mount: mount.clone(),
            known: FxHashMap::default(),
            last: None,
            unresolved: 0,
        };
        match &mount {
            Some(m) => r.walk(m, m),
            None => tracing::warn!(
                "no cgroup2 hierarchy is mounted (/proc/mounts): events carry cgroup ids but no \
                 cgroup paths, container ids, pod uids or systemd units"
            ),
        }
        r
    }

    /// Resolvers with only what they are told (tests).
    #[cfg(test)]
    fn empty() -> Self {
        Resolver {
            mount: None,
            known: FxHashMap::default(),
            last: None,
            unresolved: 0,
        }
    }

    fn walk(&mut self, root: &Path, dir: &Path) {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(dir) else {
            return;
        };
        if let Some(path) = relative(root, dir) {
            self.learn(meta.ino(), &path);
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.walk(root, &entry.path());
            }
        }
    }

    /// A cgroup `id` with `path` (from the hierarchy's root, `/a/b`).
    pub fn learn(&mut self, id: u64, path: &str) {
        if self.known.len() >= MAX_KNOWN {
            self.known.clear();
        }
        self.known.insert(id, Some(Cgroup::new(path)));
        if self.last.as_ref().is_some_and(|(l, _)| *l == id) {
            self.last = None;
        }
    }

    /// Ids that could not be resolved since the last call (for the metric).
    pub fn take_unresolved(&mut self) -> u64 {
        std::mem::take(&mut self.unresolved)
    }

    /// The cgroup of id `id`; `None` for 0 (unknown owner) or an id that resolves to nothing.
    pub fn resolve(&mut self, id: u64) -> Option<Cgroup> {
        if id == 0 {
            return None;
        }
        if let Some((last, c)) = &self.last {
            if *last == id {
                return c.clone();
            }
        }
        let c = match self.known.get(&id) {
            Some(c) => c.clone(),
            None => {
                let c = self.lookup(id).map(|p| Cgroup::new(&p));
                if c.is_none() {
                    self.unresolved += 1;
                    tracing::debug!(id, "cgroup id resolves to no path (counted)");
                }
                if self.known.len() >= MAX_KNOWN {
                    self.known.clear();
                }
                self.known.insert(id, c.clone());
                c
            }
        };
        self.last = Some((id, c.clone()));
        c
    }

    /// The kernel's answer for a live cgroup: open it by id (a cgroup2 file handle is its id), read
    /// the descriptor's path.
    fn lookup(&self, id: u64) -> Option<String> {
        let mount = self.mount.as_ref()?;
        #[repr(C)]
        struct Handle {
            bytes: u32,
            kind: i32,
            id: u64,
        }
        /// `FILEID_KERNFS`: kernfs (cgroupfs) file handles are the node's id.
        const FILEID_KERNFS: i32 = 0xfe;
        let c = CString::new(mount.as_os_str().as_bytes()).ok()?;
        // SAFETY: a valid C string; the descriptors are closed below.
        let mount_fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
        if mount_fd < 0 {
            return None;
        }
        let mut handle = Handle {
            bytes: 8,
            kind: FILEID_KERNFS,
            id,
        };
        // SAFETY: `handle` has the layout of `struct file_handle` with 8 bytes of `f_handle`.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount_fd,
                (&raw mut handle).cast::<libc::file_handle>(),
                libc::O_RDONLY | libc::O_DIRECTORY,
            )
        };
        // SAFETY: our descriptor.
        unsafe { libc::close(mount_fd) };
        if fd < 0 {
            return None;
        }
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}"));
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        relative(mount, &target.ok()?)
    }
}

/// `dir` as a cgroup path: from the mount's root, `/` for the root itself.
fn relative(root: &Path, dir: &Path) -> Option<String> {
    let rest = dir.strip_prefix(root).ok()?;
    Some(format!("/{}", rest.to_str()?))
}

/// A path from a `cgroup_mkdir` record: up to its NUL, `None` if cut or unreadable.
pub fn record_path(rec: &probe_common::CgroupRecord) -> Option<&str> {
    let len = rec.len as usize;
    if len == 0 || len > rec.path.len() {
        return None;
    }
    let end = rec
        .path
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(rec.path.len());
    std::str::from_utf8(&rec.path[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_are_read_not_assumed() {
        assert_eq!(
            unescape(r"/sys/fs/cgroup/with\040space"),
            "/sys/fs/cgroup/with space"
        );
        assert_eq!(
            relative(
                Path::new("/sys/fs/cgroup/unified"),
                Path::new("/sys/fs/cgroup/unified")
            ),
            Some("/".into())
        );
        assert_eq!(
            relative(
                Path::new("/sys/fs/cgroup"),
                Path::new("/sys/fs/cgroup/system.slice/a.service")
            ),
            Some("/system.slice/a.service".into())
        );
    }

    #[test]
    fn learned_ids_resolve_and_unknown_ones_are_counted_once() {
        let mut r = Resolver::empty();
        r.learn(44, "/system.slice/nginx.service");
        assert_eq!(r.resolve(44).unwrap().systemd_unit(), Some("nginx.service"));
        assert_eq!(r.resolve(0), None);
        assert_eq!(r.resolve(99), None);
        assert_eq!(r.resolve(99), None);
        assert_eq!(r.take_unresolved(), 1);
        // A path learned later wins over the remembered miss.
        r.learn(99, "/late");
        assert_eq!(r.resolve(99).unwrap().path(), "/late");
    }

    #[test]
    fn record_paths_stop_at_their_nul_and_cut_ones_are_refused() {
        let mut rec = probe_common::CgroupRecord {
            id: 1,
            len: 4,
            _pad: 0,
            path: [0xaa; probe_common::CGROUP_PATH_LEN],
        };
        rec.path[..4].copy_from_slice(b"/ab\0");
        assert_eq!(record_path(&rec), Some("/ab"));
        rec.len = probe_common::CGROUP_PATH_LEN as u32 + 1;
        assert_eq!(record_path(&rec), None);
        rec.len = 0;
        assert_eq!(record_path(&rec), None);
    }
}
