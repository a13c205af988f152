//! Who owns a socket beyond its process: the cgroup v2 path of the owning task and what the path says
//! about it — the container (`container_id`), the Kubernetes pod (`pod_uid`) and the systemd unit
//! (`systemd_unit`).
//!
//! A [`Cgroup`] is built once per path (by the capture's resolver, or once per distinct path of a batch
//! read back) and shared by reference between every event of that cgroup: events never parse or copy
//! the path. What a path says is read from its shape alone, as container runtimes and kubelet lay them
//! out (both cgroup drivers):
//!
//! | shape (last matching component wins) | gives |
//! |---|---|
//! | `docker-<64 hex>.scope`, `cri-containerd-<64 hex>.scope`, `crio-<64 hex>.scope`, `libpod-<64 hex>.scope` (systemd driver), `…:cri-containerd:<64 hex>` | `container_id` |
//! | a component that is just `<64 hex>` (cgroupfs driver: `/docker/<id>`, `/kubepods/burstable/pod<uid>/<id>`) | `container_id` |
//! | `kubepods-<qos>-pod<uid with _>.slice`, `kubepods-pod<uid>.slice`, `pod<uid>` | `pod_uid` (with `-`) |
//! | `<name>.service`, `<name>.scope` that is not a container's | `systemd_unit` |
//!
//! A `conmon` scope (`crio-conmon-<id>.scope`, `libpod-conmon-<id>.scope`) is the runtime's monitor,
//! not the container: it names no container (it is a systemd unit).

use super::shared::{Keyed, Shared};

/// A cgroup v2 path (`/system.slice/nginx.service`, `/` for the root) and what it says; one key per
/// path (its hash is computed once: flows are keyed by cgroup, and hashing the path per event would
/// cost as much as the rest of the key).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cgroup(Shared<Info>);

struct Info {
    path: Box<str>,
    container_id: Option<Box<str>>,
    pod_uid: Option<Box<str>>,
    systemd_unit: Option<Box<str>>,
}

impl Cgroup {
    /// Where the shared value lives: rows holding the same one give the same address.
    pub(crate) fn addr(&self) -> usize {
        self.0.addr()
    }

    /// Reads what `path` says about its owner.
    pub fn new(path: &str) -> Self {
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let container = components
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, c)| container_id(c).map(|id| (i, id)));
        let pod_uid = components.iter().rev().find_map(|c| pod_uid(c));
        let systemd_unit = components
            .iter()
            .enumerate()
            .rev()
            .find(|(i, c)| {
                (c.ends_with(".service") || c.ends_with(".scope"))
                    && container.as_ref().is_none_or(|(ci, _)| ci != i)
            })
            .map(|(_, c)| Box::from(*c));
        Cgroup(Shared::new(Info {
            path: path.into(),
            container_id: container.map(|(_, id)| id.into()),
            pod_uid: pod_uid.map(Into::into),
            systemd_unit,
        }))
    }

    pub fn path(&self) -> &str {
        &self.0.path
    }

    /// The container's id (64 hex digits), when the cgroup is a container's.
    pub fn container_id(&self) -> Option<&str> {
        self.0.container_id.as_deref()
    }

    /// The Kubernetes pod's uid (`8-4-4-4-12` hex digits, with dashes), when the cgroup is in a pod.
    pub fn pod_uid(&self) -> Option<&str> {
        self.0.pod_uid.as_deref()
    }

    /// The innermost systemd unit (`nginx.service`, `session-3.scope`) that is not a container's.
    pub fn systemd_unit(&self) -> Option<&str> {
        self.0.systemd_unit.as_deref()
    }
}

/// Everything else a path says is read from it.
impl Keyed for Info {
    type Key = str;
    fn key(&self) -> &str {
        &self.path
    }
}

impl std::fmt::Debug for Cgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.path())
    }
}

/// Shares one [`Cgroup`] per distinct path among the rows of a batch read back (the wire, Parquet).
#[derive(Default)]
pub struct Paths(rustc_hash::FxHashMap<Box<str>, Cgroup>);

impl Paths {
    pub fn get(&mut self, path: &str) -> Cgroup {
        if let Some(c) = self.0.get(path) {
            return c.clone();
        }
        let c = Cgroup::new(path);
        self.0.insert(path.into(), c.clone());
        c
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container id a path component names, if any.
fn container_id(component: &str) -> Option<&str> {
    if component.contains("conmon") {
        return None;
    }
    let stem = component.strip_suffix(".scope").unwrap_or(component);
    // A name is any bytes a cgroup's creator chose (delegated subtrees included): cut only between
    // characters, as 64 hex digits end on one anyway.
    let cut = stem
        .len()
        .checked_sub(64)
        .filter(|&c| stem.is_char_boundary(c))?;
    let (prefix, id) = stem.split_at(cut);
    let prefixed = prefix.is_empty() || prefix.ends_with('-') || prefix.ends_with(':');
    (prefixed && is_hex64(id)).then_some(id)
}

/// The pod uid a path component names, if any (`_` of the systemd driver's slice names as `-`).
fn pod_uid(component: &str) -> Option<String> {
    // containerd's systemd form: `<pod slice>:cri-containerd:<id>`.
    let component = component.split(':').next().unwrap_or(component);
    let stem = component.strip_suffix(".slice").unwrap_or(component);
    let at = stem.rfind("pod")?;
    let before = &stem[..at];
    if !(before.is_empty() || before.ends_with('-')) || !component_is_pod(component) {
        return None;
    }
    let uid: String = stem[at + 3..]
        .chars()
        .map(|c| if c == '_' { '-' } else { c })
        .collect();
    let groups: Vec<&str> = uid.split('-').collect();
    let shape = groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12];
    (shape
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit())))
    .then_some(uid)
}

/// `pod<uid>` (cgroupfs driver) or a kubepods slice (systemd driver).
fn component_is_pod(component: &str) -> bool {
    component.starts_with("pod") || component.starts_with("kubepods-")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789abcdef";
    const UID: &str = "0c7a8f2e-5b1d-4d3e-9f60-1a2b3c4d5e6f";

    fn says(path: &str) -> (Option<String>, Option<String>, Option<String>) {
        let c = Cgroup::new(path);
        (
            c.container_id().map(Into::into),
            c.pod_uid().map(Into::into),
            c.systemd_unit().map(Into::into),
        )
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn kubernetes_pods_under_either_driver() {
        let uid_ = UID.replace('-', "_");
        // systemd driver, containerd and cri-o.
        for runtime in ["cri-containerd", "crio"] {
            let path = format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/{runtime}-{ID}.scope"
            );
            assert_eq!(says(&path), (some(ID), some(UID), None), "{path}");
        }
        // Guaranteed QoS has no QoS slice.
        let path = format!("/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope");
        assert_eq!(says(&path), (some(ID), some(UID), None));
        // cgroupfs driver.
        let path = format!("/kubepods/besteffort/pod{UID}/{ID}");
        assert_eq!(says(&path), (some(ID), some(UID), None));
        // containerd's systemd form without a scope of its own.
        let path = format!(
            "/system.slice/containerd.service/kubepods-besteffort-pod{uid_}.slice:cri-containerd:{ID}"
        );
        assert_eq!(
            says(&path),
            (some(ID), some(UID), some("containerd.service"))
        );
        // The pod's own slice (its sandbox-less processes): a pod, no container.
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice"
        );
        assert_eq!(says(&path), (None, some(UID), None));
    }

    #[test]
    fn docker_podman_and_systemd_units() {
        assert_eq!(
            says(&format!("/system.slice/docker-{ID}.scope")),
            (some(ID), None, None)
        );
        assert_eq!(says(&format!("/docker/{ID}")), (some(ID), None, None));
        // Rootless podman puts the container's processes in a child of its scope.
        let path = format!(
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
        );
        assert_eq!(says(&path), (some(ID), None, some("user@1000.service")));
        // The monitor is not the container.
        assert_eq!(
            says(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            (None, None, some(&format!("libpod-conmon-{ID}.scope")))
        );
        assert_eq!(
            says("/system.slice/nginx.service"),
            (None, None, some("nginx.service"))
        );
        assert_eq!(
            says("/user.slice/user-1000.slice/session-3.scope"),
            (None, None, some("session-3.scope"))
        );
        assert_eq!(says("/"), (None, None, None));
        // Almost: 63 hex digits, a uid of the wrong shape, a name merely containing "pod".
        assert_eq!(says(&format!("/docker/{}", &ID[1..])), (None, None, None));
        assert_eq!(says("/kubepods/burstable/pod1234"), (None, None, None));
        assert_eq!(says(&format!("/ipod{UID}")), (None, None, None));
        // Any name a creator chose is read without a panic, wherever its characters' bytes fall.
        for pad in 0..4 {
            for suffix in [".service", ".scope"] {
                let name = format!("{}é€{}{suffix}", "ü".repeat(40), "x".repeat(pad));
                let path = format!("/system.slice/{name}");
                assert_eq!(says(&path), (None, None, Some(name)));
            }
        }
    }

    #[test]
    fn equal_paths_are_one_key_whatever_the_allocation() {
        let a = Cgroup::new("/system.slice/a.service");
        let b = Cgroup::new("/system.slice/a.service");
        let c = Cgroup::new("/system.slice/b.service");
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Hashing and the allocation shortcut: event/shared.rs.
        assert!(a < c);
        let mut paths = Paths::default();
        let one = paths.get("/x");
        assert!(one.0.ptr_eq(&paths.get("/x").0));
    }
}
