//! The Kubernetes names of a pod: its name and namespace, the workload that runs it and the node it
//! is on, as the API server said when the event was captured (see `capture::kubernetes`).
//!
//! Like [`super::Cgroup`], one [`Pod`] is shared by every event of the pod; equal names are one flow
//! key whatever the allocation.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A pod's names.
#[derive(Clone)]
pub struct Pod(Arc<Info>);

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Names {
    name: Box<str>,
    namespace: Box<str>,
    workload_kind: Box<str>,
    workload_name: Box<str>,
    node: Box<str>,
}

struct Info {
    names: Names,
    /// Hash of `names`, computed once (flows are keyed by it).
    hash: u64,
}

impl Pod {
    pub fn new(
        name: &str,
        namespace: &str,
        workload_kind: &str,
        workload_name: &str,
        node: &str,
    ) -> Self {
        let names = Names {
            name: name.into(),
            namespace: namespace.into(),
            workload_kind: workload_kind.into(),
            workload_name: workload_name.into(),
            node: node.into(),
        };
        let mut h = rustc_hash::FxHasher::default();
        for part in [name, namespace, workload_kind, workload_name, node] {
            part.hash(&mut h);
        }
        Pod(Arc::new(Info {
            names,
            hash: h.finish(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.0.names.name
    }

    pub fn namespace(&self) -> &str {
        &self.0.names.namespace
    }

    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `ReplicaSet`, …; `Pod` for a pod no
    /// controller owns.
    pub fn workload_kind(&self) -> &str {
        &self.0.names.workload_kind
    }

    pub fn workload_name(&self) -> &str {
        &self.0.names.workload_name
    }

    /// The Kubernetes node the pod is scheduled on.
    pub fn node(&self) -> &str {
        &self.0.names.node
    }
}

impl PartialEq for Pod {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.names == other.0.names
    }
}

impl Eq for Pod {}

impl Hash for Pod {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

impl PartialOrd for Pod {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pod {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if Arc::ptr_eq(&self.0, &other.0) {
            return std::cmp::Ordering::Equal;
        }
        self.0.names.cmp(&other.0.names)
    }
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} ({} {}, node {})",
            self.namespace(),
            self.name(),
            self.workload_kind(),
            self.workload_name(),
            self.node()
        )
    }
}

/// Shares one [`Pod`] per distinct set of names among the rows of a batch read back.
#[derive(Default)]
pub struct Pods {
    known: rustc_hash::FxHashMap<String, Pod>,
    /// The five names joined, reused from row to row.
    key: String,
}

impl Pods {
    pub fn get(
        &mut self,
        name: &str,
        namespace: &str,
        workload_kind: &str,
        workload_name: &str,
        node: &str,
    ) -> Pod {
        self.key.clear();
        for part in [name, namespace, workload_kind, workload_name, node] {
            // NUL cannot be in a Kubernetes name: the parts cannot run into one another.
            self.key.push_str(part);
            self.key.push('\0');
        }
        if let Some(p) = self.known.get(&self.key) {
            return p.clone();
        }
        let p = Pod::new(name, namespace, workload_kind, workload_name, node);
        self.known.insert(self.key.clone(), p.clone());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_names_are_one_key() {
        let a = Pod::new("web-1", "shop", "Deployment", "web", "n1");
        let b = Pod::new("web-1", "shop", "Deployment", "web", "n1");
        let c = Pod::new("web-2", "shop", "Deployment", "web", "n1");
        assert_eq!(a, b);
        assert_ne!(a, c);
        let hash = |p: &Pod| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            p.hash(&mut h);
            h.finish()
        };
        assert_eq!(hash(&a), hash(&b));
        assert!(a < c);
        let mut pods = Pods::default();
        let one = pods.get("x", "y", "Pod", "x", "n");
        assert!(Arc::ptr_eq(&one.0, &pods.get("x", "y", "Pod", "x", "n").0));
    }
}
