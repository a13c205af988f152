//! Kubernetes names for the pods of this node: a watch of the API server (list, then watch, with
//! kube-runtime's watcher and its backoff), kept as a directory from pod uid to [`Pod`] that live
//! capture reads when an event's cgroup names a pod (`pod_uid`, see [`crate::event::cgroup`]).
//!
//! One watch per capture process, of the pods scheduled on its node (`fieldSelector
//! spec.nodeName=…`), never a request per flow; of their metadata only (names, labels, owners): no
//! pod spec crosses the wire or is kept. A pod that is deleted keeps its names for
//! [`DELETED_KEPT`]: its last connections' events are read after it is gone. Lookups, misses, watch
//! errors and the pods known are metrics (`kubernetes_*`); a watch that fails is retried with backoff
//! and said once at warn level, and capture goes on without names meanwhile — never stopped by the
//! API server.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod as KubePod;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;

/// What the watch receives of a pod: its metadata.
type PodMeta = PartialObjectMeta<KubePod>;
use rustc_hash::FxHashMap;

use crate::event::Pod;
use crate::metrics::Metrics;

/// How long a deleted pod's names are kept for events read after it is gone.
pub const DELETED_KEPT: Duration = Duration::from_secs(600);

/// Where to find the API server and which node's pods to watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// The API server's URL without credentials (a `kubectl proxy`, or tests); `None`: the
    /// in-cluster service account, else the kubeconfig (`kube::Config::infer`).
    pub api: Option<String>,
    /// The node whose pods are watched (`spec.nodeName`).
    pub node: String,
}

/// Why the API server could not be reached at all (the watch's own failures are retried).
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("the Kubernetes API URL `{url}` is not a URL")]
    Url {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error(
        "no Kubernetes configuration: not in a cluster (no service account) and no kubeconfig"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("making the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// Pods by uid, as the watch last saw them.
#[derive(Default)]
pub struct PodDirectory {
    inner: RwLock<Known>,
    /// Changes whenever a pod's names appear, change or are forgotten: lookups cached by a reader stay
    /// valid until it moves.
    generation: AtomicU64,
    /// The initial list has been read (capture holds its first batches a little for it, so their
    /// events are named).
    listed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Known {
    pods: FxHashMap<Box<str>, Pod>,
    /// Deleted pods, oldest first, forgotten after [`DELETED_KEPT`].
    deleted: VecDeque<(Instant, Box<str>)>,
}

impl PodDirectory {
    /// The names of the pod with uid `uid`, if the watch knows it.
    pub fn get(&self, uid: &str) -> Option<Pod> {
        self.inner.read().ok()?.pods.get(uid).cloned()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.inner.read().map_or(0, |k| k.pods.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The initial list has been read.
    pub fn is_listed(&self) -> bool {
        self.listed.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A pod seen (added or modified): a change of generation only if its names are new.
    fn upsert(&self, uid: &str, pod: Pod) {
        let Ok(mut k) = self.inner.write() else {
            return;
        };
        if k.pods.get(uid) != Some(&pod) {
            k.pods.insert(uid.into(), pod);
            self.bump();
        }
    }

    /// A pod deleted: kept for [`DELETED_KEPT`], then forgotten.
    fn delete(&self, uid: &str, now: Instant) {
        let Ok(mut k) = self.inner.write() else {
            return;
        };
        k.deleted.push_back((now, uid.into()));
        self.forget_old(&mut k, now);
    }

    /// The list the watch (re)started with: pods not in it count as deleted.
    fn relisted(&self, listed: FxHashMap<Box<str>, Pod>, now: Instant) {
        let Ok(mut k) = self.inner.write() else {
            return;
        };
        let gone: Vec<Box<str>> = k
            .pods
            .keys()
            .filter(|uid| !listed.contains_key(*uid))
            .cloned()
            .collect();
        k.deleted.extend(gone.into_iter().map(|uid| (now, uid)));
        // Listed now: not deleted, whatever an earlier list said.
        k.deleted.retain(|(_, uid)| !listed.contains_key(uid));
        for (uid, pod) in listed {
            k.pods.insert(uid, pod);
        }
        self.forget_old(&mut k, now);
        self.bump();
        drop(k);
        self.listed.store(true, Ordering::Release);
    }

    fn forget_old(&self, k: &mut Known, now: Instant) {
        while let Some((at, _)) = k.deleted.front() {
            if now.duration_since(*at) < DELETED_KEPT {
                break;
            }
            let (_, uid) = k.deleted.pop_front().expect("front exists");
            // Unless it is in the queue again (deleted twice: the later entry decides).
            if !k.deleted.iter().any(|(_, u)| *u == uid) {
                k.pods.remove(&uid);
                self.bump();
            }
        }
    }

    #[cfg(test)]
    fn with(pods: &[(&str, Pod)]) -> Self {
        let d = PodDirectory::default();
        d.relisted(
            pods.iter()
                .map(|(u, p)| (Box::from(*u), p.clone()))
                .collect(),
            Instant::now(),
        );
        d
    }
}

/// The workload that runs a pod: its controller, with a ReplicaSet of a Deployment named after the
/// Deployment (`web-5d8f7c9b4` with label `pod-template-hash=5d8f7c9b4` is Deployment `web`); a
/// pod no controller owns is its own workload (`Pod`, its name).
fn workload(p: &PodMeta) -> (String, String) {
    let controller = p
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let Some(owner) = controller else {
        return ("Pod".into(), p.name_any());
    };
    if owner.kind == "ReplicaSet" {
        let hash = p.labels().get("pod-template-hash");
        if let Some(deployment) = hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
            return ("Deployment".into(), deployment.to_string());
        }
    }
    (owner.kind.clone(), owner.name.clone())
}

/// A pod's uid and names (on `node`, the one the watch selects); `None` for an object without a uid.
fn names(p: &PodMeta, node: &str) -> Option<(Box<str>, Pod)> {
    let uid = p.metadata.uid.as_deref()?;
    let (kind, workload) = workload(p);
    Some((
        uid.into(),
        Pod::new(
            &p.name_any(),
            &p.namespace().unwrap_or_default(),
            &kind,
            &workload,
            node,
        ),
    ))
}

/// A client for the API server `cfg` names (must be called inside a tokio runtime).
pub async fn client(cfg: &KubernetesConfig) -> Result<kube::Client, KubernetesError> {
    // rustls needs one process-wide crypto provider; both are in the tree, so choose (ring, which
    // the broker's TLS uses too). Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match &cfg.api {
        Some(url) => {
            let uri = url.parse().map_err(|source| KubernetesError::Url {
                url: url.clone(),
                source,
            })?;
            let mut c = kube::Config::new(uri);
            if url.starts_with("http://") {
                // No TLS: do not require the system's CA certificates (minimal images have none).
                c.root_cert = Some(Vec::new());
            }
            c
        }
        None => kube::Config::infer()
            .await
            .map_err(KubernetesError::Infer)?,
    };
    kube::Client::try_from(config).map_err(KubernetesError::Client)
}

/// Watches the pods of `cfg.node` into `dir` until `stop` fires.
pub async fn watch(
    client: kube::Client,
    cfg: KubernetesConfig,
    dir: Arc<PodDirectory>,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let selector = format!("spec.nodeName={}", cfg.node);
    let api = kube::Api::<KubePod>::all(client);
    let mut events = std::pin::pin!(watcher::metadata_watcher(
        api,
        watcher::Config::default().fields(&selector)
    )
    .default_backoff());
    let mut listing: FxHashMap<Box<str>, Pod> = FxHashMap::default();
    let mut failing = false;
    let k = &metrics.kubernetes;
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            e = events.next() => e,
        };
        let now = Instant::now();
        match event {
            None => break,
            Some(Err(e)) => {
                k.watch_errors.add(1);
                if !failing {
                    tracing::warn!(error = %e, node = %cfg.node, "watching the node's pods failed: events are written without Kubernetes names until it recovers (retrying with backoff)");
                }
                failing = true;
                continue;
            }
            Some(Ok(event)) => {
                if failing {
                    tracing::info!(node = %cfg.node, "watching the node's pods again");
                }
                failing = false;
                match event {
                    Event::Init => listing.clear(),
                    Event::InitApply(p) => listing.extend(names(&p, &cfg.node)),
                    Event::InitDone => {
                        dir.relisted(std::mem::take(&mut listing), now);
                        tracing::info!(node = %cfg.node, pods = dir.len(), "listed the node's pods");
                    }
                    Event::Apply(p) => {
                        if let Some((uid, pod)) = names(&p, &cfg.node) {
                            dir.upsert(&uid, pod);
                        }
                    }
                    Event::Delete(p) => {
                        if let Some(uid) = p.metadata.uid.as_deref() {
                            dir.delete(uid, now);
                        }
                    }
                }
            }
        }
        k.pods.set(dir.len() as i64);
    }
}

/// What one capture reads from the directory, cached per cgroup id until the directory changes.
pub struct PodLookup {
    dir: Arc<PodDirectory>,
    generation: u64,
    cache: FxHashMap<u64, Option<Pod>>,
}

impl PodLookup {
    pub fn new(dir: Arc<PodDirectory>) -> Self {
        PodLookup {
            generation: dir.generation(),
            dir,
            cache: FxHashMap::default(),
        }
    }

    /// The pod of an event of cgroup `cgroup_id` whose path names pod `uid`; lookups and misses
    /// counted once per cgroup and directory generation.
    pub fn get(&mut self, cgroup_id: u64, uid: &str, metrics: &Metrics) -> Option<Pod> {
        let generation = self.dir.generation();
        if generation != self.generation || self.cache.len() > 65_536 {
            self.cache.clear();
            self.generation = generation;
        }
        if let Some(p) = self.cache.get(&cgroup_id) {
            return p.clone();
        }
        let pod = self.dir.get(uid);
        metrics.kubernetes.lookups.add(1);
        if pod.is_none() {
            metrics.kubernetes.misses.add(1);
            tracing::debug!(uid, "no pod with this uid on the node (counted)");
        }
        self.cache.insert(cgroup_id, pod.clone());
        pod
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> PodMeta {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn workloads_are_the_controllers_with_deployments_behind_their_replica_sets() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "web-5d8f7c9b4-x2x9q", "namespace": "shop", "uid": "u1",
                "labels": {"pod-template-hash": "5d8f7c9b4"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-5d8f7c9b4", "uid": "r1", "controller": true}]},
            "spec": {"nodeName": "n1", "containers": []}
        }));
        let (uid, names) = names(&p, "n1").unwrap();
        assert_eq!(&*uid, "u1");
        assert_eq!(
            (
                names.name(),
                names.namespace(),
                names.workload_kind(),
                names.workload_name(),
                names.node()
            ),
            ("web-5d8f7c9b4-x2x9q", "shop", "Deployment", "web", "n1")
        );
        let job = pod(serde_json::json!({
            "metadata": {"name": "backup-29000000-abcde", "namespace": "ops", "uid": "u2",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                    "name": "backup-29000000", "uid": "j1", "controller": true}]}
        }));
        assert_eq!(workload(&job), ("Job".into(), "backup-29000000".into()));
        let bare = pod(serde_json::json!({"metadata": {"name": "debug", "uid": "u3"}}));
        assert_eq!(workload(&bare), ("Pod".into(), "debug".into()));
        let (_, names) = super::names(&bare, "watched-node").unwrap();
        assert_eq!(names.node(), "watched-node");
        // A ReplicaSet of no Deployment (no hash label) is named as it is.
        let rs = pod(serde_json::json!({
            "metadata": {"name": "rs-abc", "uid": "u4",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "rs", "uid": "r2", "controller": true}]}
        }));
        assert_eq!(workload(&rs), ("ReplicaSet".into(), "rs".into()));
    }

    #[test]
    fn deleted_pods_are_kept_a_while_then_forgotten_and_lookups_follow_changes() {
        let a = Pod::new("a", "ns", "Pod", "a", "n");
        let dir = Arc::new(PodDirectory::with(&[("u1", a.clone())]));
        let metrics = Metrics::default();
        let mut lookup = PodLookup::new(Arc::clone(&dir));
        assert_eq!(lookup.get(7, "u1", &metrics), Some(a.clone()));
        assert_eq!(lookup.get(7, "u1", &metrics), Some(a.clone()), "cached");
        assert_eq!(lookup.get(8, "u2", &metrics), None);
        assert_eq!(
            (
                metrics.kubernetes.lookups.get(),
                metrics.kubernetes.misses.get()
            ),
            (2, 1)
        );
        // The pod appears: the cached miss is dropped.
        let b = Pod::new("b", "ns", "Pod", "b", "n");
        dir.upsert("u2", b.clone());
        assert_eq!(lookup.get(8, "u2", &metrics), Some(b));
        let t = Instant::now();
        dir.delete("u1", t);
        assert_eq!(dir.get("u1"), Some(a), "kept after deletion");
        dir.delete("u3", t + DELETED_KEPT);
        assert_eq!(dir.get("u1"), None, "forgotten after DELETED_KEPT");
    }
}
