//! From a cgroup id (what the kernel puts in events) to the cgroup's path, once per cgroup.
//!
//! Three sources, so that a cgroup's events resolve even when the cgroup is gone by the time they are
//! read (a short-lived container, a job): the hierarchy as it is when capture starts (a walk of the
//! cgroup2 mount: a directory's inode number is its cgroup id), every cgroup made after that (the
//! kernel's `cgroup:cgroup_mkdir` records, sent as it makes them and read before the TCP events of the
//! same drain), and, for an id neither saw, the kernel's own lookup by id (`open_by_handle_at` on the
//! mount, then the descriptor's path; it needs `CAP_DAC_READ_SEARCH`) or, without it, a new walk.
//! The walk is repeated every [`REWALK_EVERY`]: a cgroup no walk has seen for [`GONE_KEPT`] (it was
//! removed) is forgotten, so the map holds the live cgroups and the recently removed ones, however
//! many come and go. An id that cannot be resolved is counted (`capture_cgroups_unresolved_total`),
//! tried again after [`MISS_RETRY`], and its events carry no path meanwhile, never a guess.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::event::Cgroup;

/// How often the hierarchy is walked again (it refreshes the live cgroups, and lets removed ones go).
const REWALK_EVERY: Duration = Duration::from_secs(300);
/// How long a cgroup no walk sees any more (removed) is still resolved: its last events are read after
/// it is gone.
const GONE_KEPT: Duration = Duration::from_secs(600);
/// An id that resolved to nothing is tried again after this long (with a new walk, at most this often).
const MISS_RETRY: Duration = Duration::from_secs(10);

/// The cgroup id of a cgroup2 hierarchy's root (its root directory's inode number).
const ROOT_CGROUP_ID: u64 = 1;

/// Where this process can read the cgroup2 hierarchy.
#[derive(Debug, PartialEq, Eq)]
pub enum Mount {
    /// Its root is mounted here.
    Root(PathBuf),
    /// Only a subtree is (a container's own view in a cgroup namespace): paths read there would be
    /// relative to that subtree, and other containers' cgroups are not in it.
    Subtree(PathBuf),
    /// It is mounted here, but the mount cannot be read (`stat` fails).
    Unreadable(PathBuf),
    /// No cgroup2 is mounted.
    None,
}

/// The cgroup2 mount, from `/proc/mounts` (never assumed: hybrid hosts mount it under
/// `/sys/fs/cgroup/unified`, unified ones at `/sys/fs/cgroup`). Of several, the hierarchy's root:
/// a pod that mounts the host's hierarchy may still have its own namespaced view mounted elsewhere.
pub fn cgroup2_mount() -> Mount {
    use std::os::unix::fs::MetadataExt;
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return Mount::None;
    };
    choose_mount(&mounts, |dir| std::fs::metadata(dir).ok().map(|m| m.ino()))
}

fn choose_mount(mounts: &str, inode: impl Fn(&Path) -> Option<u64>) -> Mount {
    let dirs: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            // Octal escapes (`\040` for a space) as /proc/mounts writes them.
            (kind == "cgroup2").then(|| PathBuf::from(unescape(dir)))
        })
        .collect();
    let inodes: Vec<Option<u64>> = dirs.iter().map(|d| inode(d)).collect();
    let found = |want: &dyn Fn(Option<u64>) -> bool| {
        dirs.iter()
            .zip(&inodes)
            .find(|(_, i)| want(**i))
            .map(|(d, _)| d.clone())
    };
    if let Some(root) = found(&|i| i == Some(ROOT_CGROUP_ID)) {
        return Mount::Root(root);
    }
    if let Some(view) = found(&|i| i.is_some()) {
        return Mount::Subtree(view);
    }
    dirs.into_iter()
        .next()
        .map_or(Mount::None, Mount::Unreadable)
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

/// A cgroup id's answer and when it was last confirmed (walk or kernel report; a miss: when tried).
struct Entry {
    cgroup: Option<Cgroup>,
    seen: Instant,
}

/// Known cgroups by id.
pub struct Resolver {
    mount: Option<PathBuf>,
    known: FxHashMap<u64, Entry>,
    last_walk: Instant,
    /// The last id resolved and its answer: consecutive events are mostly of one cgroup.
    last: Option<(u64, Option<Cgroup>)>,
    unresolved: u64,
}

impl Resolver {
    /// Starts with the hierarchy as it is now. Call after the `cgroup_mkdir` program is attached, so
    /// that no cgroup made meanwhile is missed.
    pub fn of_this_host() -> Self {
        let mount = match cgroup2_mount() {
            Mount::Root(m) => Some(m),
            // Paths read there would name the wrong cgroups (relative to a subtree): only the
            // kernel's reports of new cgroups, which carry full paths, are used.
            Mount::Subtree(m) => {
                tracing::warn!(
                    "the cgroup2 hierarchy mounted at {} is a cgroup namespace's view, not the \
                     host's: cgroups that exist before capture starts get no paths, container \
                     ids, pod uids or systemd units (counted in \
                     capture_cgroups_unresolved_total); mount the host's /sys/fs/cgroup (the \
                     Kubernetes manifests do)",
                    m.display()
                );
                None
            }
            Mount::Unreadable(m) => {
                tracing::warn!(
                    "the cgroup2 hierarchy mounted at {} cannot be read: cgroups that exist before \
                     capture starts get no paths, container ids, pod uids or systemd units",
                    m.display()
                );
                None
            }
            Mount::None => {
                tracing::warn!(
                    "no cgroup2 hierarchy is mounted (/proc/mounts): events carry cgroup ids but \
                     no cgroup paths, container ids, pod uids or systemd units"
                );
                None
            }
        };
        let mut r = Resolver {
            mount: mount.clone(),
            known: FxHashMap::default(),
            last_walk: Instant::now(),
            last: None,
            unresolved: 0,
        };
        if let Some(m) = &mount {
            r.walk(m, m, Instant::now());
        }
        r
    }

    /// Resolvers with only what they are told (tests).
    #[cfg(test)]
    fn empty() -> Self {
        Resolver {
            mount: None,
            known: FxHashMap::default(),
            last_walk: Instant::now(),
            last: None,
            unresolved: 0,
        }
    }

    /// Walks the hierarchy again if it is time: every [`REWALK_EVERY`], or after a miss (at most every
    /// [`MISS_RETRY`]). Cgroups no walk has seen for [`GONE_KEPT`] are forgotten.
    fn rewalk(&mut self, now: Instant) {
        let Some(mount) = self.mount.clone() else {
            return;
        };
        self.walk(&mount, &mount, now);
        self.last_walk = now;
        self.last = None;
        self.known
            .retain(|_, e| now.duration_since(e.seen) < GONE_KEPT);
    }

    /// Called once per drain: the periodic walk.
    pub fn maintain(&mut self, now: Instant) {
        if now.duration_since(self.last_walk) >= REWALK_EVERY {
            self.rewalk(now);
        }
    }

    fn walk(&mut self, root: &Path, dir: &Path, now: Instant) {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(dir) else {
            return;
        };
        if let Some(path) = relative(root, dir) {
            self.learn_at(meta.ino(), &path, now);
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.walk(root, &entry.path(), now);
            }
        }
    }

    /// A cgroup `id` with `path` (from the hierarchy's root, `/a/b`), as the kernel reported it.
    pub fn learn(&mut self, id: u64, path: &str) {
        self.learn_at(id, path, Instant::now());
    }

    fn learn_at(&mut self, id: u64, path: &str, now: Instant) {
        match self.known.get_mut(&id) {
            // The same path: keep the one allocation every event of it shares.
            Some(Entry {
                cgroup: Some(c),
                seen,
            }) if c.path() == path => *seen = now,
            _ => {
                self.known.insert(
                    id,
                    Entry {
                        cgroup: Some(Cgroup::new(path)),
                        seen: now,
                    },
                );
                if self.last.as_ref().is_some_and(|(l, _)| *l == id) {
                    self.last = None;
                }
            }
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
        let now = Instant::now();
        let c = match self.known.get(&id) {
            Some(Entry {
                cgroup: Some(c), ..
            }) => Some(c.clone()),
            Some(Entry { cgroup: None, seen }) if now.duration_since(*seen) < MISS_RETRY => None,
            _ => {
                let mut c = self.lookup(id).map(|p| Cgroup::new(&p));
                if c.is_none() && now.duration_since(self.last_walk) >= MISS_RETRY {
                    // Without the lookup's privilege: the walk finds what exists now.
                    self.rewalk(now);
                    c = self.known.get(&id).and_then(|e| e.cgroup.clone());
                }
                if c.is_none() {
                    self.unresolved += 1;
                    tracing::debug!(id, "cgroup id resolves to no path (counted)");
                }
                self.known.insert(
                    id,
                    Entry {
                        cgroup: c.clone(),
                        seen: now,
                    },
                );
                c
            }
        };
        // Only answers are kept as the last: a miss is tried again after MISS_RETRY.
        self.last = c.clone().map(|c| (id, Some(c)));
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
    fn the_hierarchys_root_is_chosen_and_a_namespaced_view_is_told_apart() {
        let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n\
                      proc /proc proc rw 0 0\n\
                      cgroup2 /host/cgroup cgroup2 rw 0 0\n";
        // The container's own view first, the host's hierarchy (root inode 1) second.
        let inode = |d: &Path| {
            Some(if d == Path::new("/host/cgroup") {
                1
            } else {
                4242
            })
        };
        assert_eq!(
            choose_mount(mounts, inode),
            Mount::Root("/host/cgroup".into())
        );
        assert_eq!(
            choose_mount(mounts, |_| Some(4242)),
            Mount::Subtree("/sys/fs/cgroup".into())
        );
        assert_eq!(choose_mount("proc /proc proc rw 0 0\n", inode), Mount::None);
        // A mount that cannot be read is not taken for a namespace's view.
        assert_eq!(
            choose_mount(mounts, |_| None),
            Mount::Unreadable("/sys/fs/cgroup".into())
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

    /// The hierarchy of this host: its cgroups resolve; one made later is found by the walk a miss
    /// makes (without the lookup by id); one no walk sees any more is forgotten after GONE_KEPT.
    #[test]
    fn walks_find_new_cgroups_and_let_removed_ones_go() {
        let Mount::Root(mount) = cgroup2_mount() else {
            return;
        };
        let mut r = Resolver::of_this_host();
        use std::os::unix::fs::MetadataExt;
        let root_id = std::fs::metadata(&mount).unwrap().ino();
        assert_eq!(r.resolve(root_id).unwrap().path(), "/");
        // An id no walk saw stays unresolved, and is forgotten GONE_KEPT after it was tried.
        let t = Instant::now();
        r.known.insert(
            u64::MAX - 1,
            Entry {
                cgroup: Some(Cgroup::new("/gone")),
                seen: t,
            },
        );
        r.rewalk(t + GONE_KEPT);
        assert!(
            !r.known.contains_key(&(u64::MAX - 1)),
            "removed cgroup forgotten"
        );
        assert!(r.known.contains_key(&root_id), "live cgroups stay");
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
