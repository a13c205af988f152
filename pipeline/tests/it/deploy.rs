//! The deployment material, checked offline: every Kubernetes manifest parses (PyYAML) and every
//! workload names a pinned image, resource requests and limits, liveness and readiness probes, and no
//! more privilege than it needs (only capture holds capabilities, and only BPF and PERFMON). Each
//! tcplake container's command line, with its environment and mounted config file, passes
//! `tcplake --check-config`; so does the systemd unit's, which `systemd-analyze verify` accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every document of a YAML file, as JSON.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let o = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(path)
        .output_bounded()
        .expect("python3");
    assert!(
        o.status.success(),
        "{} does not parse (PyYAML from scripts/setup.sh): {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn manifests() -> Vec<(PathBuf, Vec<Value>)> {
    let mut out = Vec::new();
    for dir in ["deploy-monolith/kubernetes", "deploy-split/kubernetes"] {
        for f in files_under(&repo().join(dir)) {
            if f.extension().is_some_and(|e| e == "yaml") {
                let docs = yaml_docs(&f);
                out.push((f, docs));
            }
        }
    }
    assert!(out.len() >= 3, "{out:?}");
    out
}

/// A value for an env entry taken from the downward API, as Kubernetes would fill it in.
fn sample(field: &str) -> &'static str {
    match field {
        "spec.nodeName" => "node-a",
        "metadata.name" => "tcplake-aggregate-1",
        "metadata.labels['apps.kubernetes.io/pod-index']" => "1",
        other => panic!("no sample value for fieldRef {other}"),
    }
}

/// Runs a tcplake container's command line with `--check-config`, as its pod would start it.
fn check_container(c: &Value, configs: &BTreeMap<String, String>, tmp: &Path) {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else if let Some(f) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            sample(f).to_string()
        } else if e["valueFrom"]["secretKeyRef"].is_object() {
            "from-a-secret".to_string()
        } else {
            panic!("unsupported env entry {e}")
        };
        env.insert(name, value);
    }
    let mut args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let mut a = a.as_str().unwrap().to_string();
            for (k, v) in &env {
                a = a.replace(&format!("$({k})"), v);
            }
            a
        })
        .collect();
    // The config file comes from the ConfigMap mounted at /etc/tcplake.
    if let Some(i) = args.iter().position(|a| a == "--config") {
        let wanted = &args[i + 1];
        let name = Path::new(wanted).file_name().unwrap().to_str().unwrap();
        let text = configs
            .get(name)
            .unwrap_or_else(|| panic!("no ConfigMap provides {wanted}"));
        let path = tmp.join(format!("{}-{name}", c["name"].as_str().unwrap()));
        std::fs::write(&path, text).unwrap();
        args[i + 1] = path.display().to_string();
    }
    args.push("--check-config".into());
    let mut cmd = tcplake_cmd();
    cmd.env_remove("TCPLAKE_METRICS_ADDR")
        .args(&args)
        .envs(&env);
    let o = cmd.output_bounded().unwrap();
    assert!(
        o.status.success(),
        "container {}: `tcplake {}` is refused: {}",
        c["name"],
        args.join(" "),
        stderr(&o)
    );
    assert!(stdout(&o).starts_with("tcplake: configuration ok:"));
}

#[test]
fn kubernetes_manifests_are_complete_least_privileged_and_accepted_by_tcplake() {
    let tmp = tempfile::tempdir().unwrap();
    let mut workloads = 0;
    for (path, docs) in manifests() {
        let file = path.display().to_string();
        let configs: BTreeMap<String, String> = docs
            .iter()
            .filter(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "tcplake")
            .flat_map(|d| d["data"].as_object().unwrap().clone())
            .map(|(k, v)| (k, v.as_str().unwrap().to_string()))
            .collect();
        for d in &docs {
            for key in ["apiVersion", "kind"] {
                assert!(d[key].is_string(), "{file}: a document without {key}");
            }
            assert!(
                d["metadata"]["name"].is_string(),
                "{file}: unnamed {}",
                d["kind"]
            );
            let kind = d["kind"].as_str().unwrap();
            if !matches!(kind, "DaemonSet" | "Deployment" | "StatefulSet") {
                continue;
            }
            workloads += 1;
            let what = format!("{file}: {kind} {}", d["metadata"]["name"]);
            let spec = &d["spec"];
            let labels = spec["template"]["metadata"]["labels"].as_object().unwrap();
            for (k, v) in spec["selector"]["matchLabels"].as_object().unwrap() {
                assert_eq!(
                    labels.get(k),
                    Some(v),
                    "{what}: selector does not match the pods"
                );
            }
            let pod = &spec["template"]["spec"];
            assert_ne!(pod["hostNetwork"], true, "{what}: hostNetwork");
            assert_ne!(pod["hostPID"], true, "{what}: hostPID");
            for c in pod["containers"].as_array().unwrap() {
                let name = c["name"].as_str().unwrap();
                let image = c["image"].as_str().unwrap();
                assert!(
                    image.contains(':') && !image.ends_with(":latest"),
                    "{what}/{name}: pin the image tag ({image})"
                );
                for r in ["requests", "limits"] {
                    for res in ["cpu", "memory"] {
                        assert!(
                            c["resources"][r][res].is_string(),
                            "{what}/{name}: resources.{r}.{res}"
                        );
                    }
                }
                for probe in ["livenessProbe", "readinessProbe"] {
                    assert!(
                        c[probe]["httpGet"]["path"].is_string(),
                        "{what}/{name}: {probe}"
                    );
                }
                let sc = &c["securityContext"];
                assert_ne!(sc["privileged"], true, "{what}/{name}: privileged");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}/{name}");
                assert_eq!(
                    sc["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{what}/{name}"
                );
                let added: Vec<&str> = sc["capabilities"]["add"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                let captures = image.contains("tcplake")
                    && !c["args"].to_string().contains("\"aggregate\"")
                    && !c["args"].to_string().contains("\"sink\"");
                if captures {
                    assert_eq!(added, ["BPF", "PERFMON"], "{what}/{name}: capabilities");
                } else {
                    assert!(added.is_empty(), "{what}/{name}: needs no capabilities");
                    assert_eq!(sc["runAsNonRoot"], true, "{what}/{name}: runAsNonRoot");
                }
                if image.contains("tcplake") {
                    check_container(c, &configs, tmp.path());
                }
            }
        }
    }
    // monolith DaemonSet; nats; capture, aggregate, sink.
    assert_eq!(workloads, 5);
}

#[test]
fn the_systemd_unit_verifies_and_its_command_is_accepted() {
    let unit =
        std::fs::read_to_string(repo().join("deploy-monolith/systemd/tcplake.service")).unwrap();
    let config = repo().join("deploy-monolith/tcplake.toml");
    let caps = |key: &str| -> Vec<String> {
        let line = unit
            .lines()
            .find(|l| l.starts_with(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}"));
        let mut v: Vec<String> = line[key.len() + 1..]
            .split_whitespace()
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    let want = ["CAP_BPF", "CAP_PERFMON"];
    assert_eq!(caps("AmbientCapabilities"), want);
    assert_eq!(caps("CapabilityBoundingSet"), want);
    assert!(
        unit.contains("\nUser=tcplake\n"),
        "runs as a system user, not root"
    );

    // The unit with this build's binary and the example config in place of the installed paths.
    let tmp = tempfile::tempdir().unwrap();
    let local = unit
        .replace("/usr/local/bin/tcplake", env!("CARGO_BIN_EXE_tcplake"))
        .replace("/etc/tcplake/tcplake.toml", config.to_str().unwrap());
    let path = tmp.path().join("tcplake.service");
    std::fs::write(&path, &local).unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output_bounded()
        .expect("systemd-analyze (scripts/setup.sh installs systemd)");
    let err = String::from_utf8_lossy(&o.stderr);
    // Complaints about the host itself (no running systemd in a container) are not the unit's.
    let about_unit: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("tcplake.service:") || l.contains("Unknown"))
        .collect();
    assert!(about_unit.is_empty(), "{err}");

    let exec = local
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let mut words = exec.split_whitespace();
    let bin = words.next().unwrap();
    let o = Command::new(bin)
        .args(words)
        .arg("--check-config")
        .env_remove("TCPLAKE_METRICS_ADDR")
        .output_bounded()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}
