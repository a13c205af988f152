//! The Kubernetes names of a pod: its name and namespace, the workload that runs it and the node it
//! is on, as the API server said when the event was captured (see `capture::kubernetes`).
//!
//! Like [`super::Cgroup`], one [`Pod`] is shared by every event of the pod; equal names are one flow
//! key whatever the allocation.

use super::shared::{Keyed, Shared};

/// A pod's names (their hash computed once: flows are keyed by them).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pod(Shared<Names>);

#[derive(PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Names {
    name: Box<str>,
    namespace: Box<str>,
    workload_kind: Box<str>,
    workload_name: Box<str>,
    node: Box<str>,
}

impl Keyed for Names {
    type Key = Names;
    fn key(&self) -> &Names {
        self
    }
}

impl Pod {
    /// Where the shared value lives: rows holding the same one give the same address.
    pub(crate) fn addr(&self) -> usize {
        self.0.addr()
    }

    pub fn new(
        name: &str,
        namespace: &str,
        workload_kind: &str,
        workload_name: &str,
        node: &str,
    ) -> Self {
        Pod(Shared::new(Names {
            name: name.into(),
            namespace: namespace.into(),
            workload_kind: workload_kind.into(),
            workload_name: workload_name.into(),
            node: node.into(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `ReplicaSet`, …; `Pod` for a pod no
    /// controller owns.
    pub fn workload_kind(&self) -> &str {
        &self.0.workload_kind
    }

    pub fn workload_name(&self) -> &str {
        &self.0.workload_name
    }

    /// The Kubernetes node the pod is scheduled on.
    pub fn node(&self) -> &str {
        &self.0.node
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
        // Hashing and the allocation shortcut: event/shared.rs.
        assert!(a < c);
        let mut pods = Pods::default();
        let one = pods.get("x", "y", "Pod", "x", "n");
        assert!(one.0.ptr_eq(&pods.get("x", "y", "Pod", "x", "n").0));
    }
}
