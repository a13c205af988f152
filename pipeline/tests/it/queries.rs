//! Every query in docs/queries.md, run with DuckDB against a synthetic output and checked against the
//! same question answered from the raw `events/` log (the truth the flows are projected from).

use crate::common::*;

/// (heading in docs/queries.md, the answer computed from `events/`). `EV` is replaced by the event
/// log; both sides are ordered the same way.
const REFERENCES: &[(&str, &str)] = &[
    (
        "Top talkers by bytes",
        "SELECT comm, pid,
                sum(bytes) FILTER (kind = 'bytes_sent') AS sent,
                sum(bytes) FILTER (kind = 'bytes_received') AS received,
                sum(coalesce(bytes, 0)) AS total
         FROM EV GROUP BY comm, pid ORDER BY total DESC, comm, pid LIMIT 10",
    ),
    (
        "Retransmit hot spots",
        "SELECT remote_addr, remote_port,
                count(*) FILTER (kind = 'retransmit') AS retransmits,
                count(DISTINCT (pid, comm)) AS processes
         FROM EV GROUP BY remote_addr, remote_port
         HAVING count(*) FILTER (kind = 'retransmit') > 0
         ORDER BY retransmits DESC, remote_addr, remote_port LIMIT 10",
    ),
    (
        "Connection churn per process",
        "SELECT comm,
                count(*) FILTER (kind = 'state_change' AND new_state = 'ESTABLISHED') AS opened,
                count(*) FILTER (kind = 'state_change' AND new_state = 'CLOSE' AND old_state IN
                    ('ESTABLISHED', 'FIN_WAIT1', 'FIN_WAIT2', 'TIME_WAIT', 'CLOSE_WAIT', 'LAST_ACK',
                     'CLOSING')) AS closed,
                count(*) FILTER (kind = 'state_change' AND new_state = 'CLOSE'
                    AND old_state IN ('ESTABLISHED', 'CLOSE_WAIT')) AS resets
         FROM EV GROUP BY comm ORDER BY opened DESC, comm",
    ),
    (
        "Top pods by retransmits",
        "SELECT pod_uid, any_value(pod_namespace) AS pod_namespace, any_value(pod_name) AS pod_name,
                count(*) FILTER (kind = 'retransmit') AS retransmits,
                count(*) FILTER (kind = 'state_change' AND new_state = 'ESTABLISHED') AS connections,
                count(DISTINCT container_id) AS containers
         FROM EV WHERE pod_uid IS NOT NULL GROUP BY pod_uid
         ORDER BY retransmits DESC, pod_uid LIMIT 10",
    ),
    (
        "Inbound vs outbound bytes per service",
        "SELECT coalesce(pod_namespace || '/' || workload_name, systemd_unit, cgroup_path) AS service,
                coalesce(sum(bytes) FILTER (role = 'server'), 0) AS inbound_bytes,
                coalesce(sum(bytes) FILTER (role = 'client'), 0) AS outbound_bytes
         FROM EV GROUP BY service ORDER BY inbound_bytes + outbound_bytes DESC, service",
    ),
    (
        "Flows per window",
        "SELECT to_timestamp(floor(epoch_us(ts) / 10000000) * 10) AS window_start,
                count(DISTINCT (node, pid, comm, cgroup_id, cgroup_path, pod_name, role, local_addr, local_port, remote_addr, remote_port)) AS flows,
                count(*) AS events,
                sum(coalesce(bytes, 0)) AS bytes
         FROM EV GROUP BY ALL ORDER BY window_start",
    ),
];

/// The SQL block under each `## heading` of the cookbook.
fn cookbook() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/queries.md"))
        .expect("docs/queries.md");
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(h) = line.strip_prefix("## ") {
            heading = h.trim().to_string();
        } else if line.trim() == "```sql" {
            let sql: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            out.push((heading.clone(), sql.join("\n")));
        }
    }
    out
}

#[test]
fn every_cookbook_query_runs_and_agrees_with_the_event_log() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tcplake-data");
    synthetic_run(&out, "12", "cook", 300_000, &[]);
    let queries = cookbook();
    assert_eq!(queries.len(), 10, "{queries:?}");
    let local = |sql: &str| sql.replace("tcplake-data", &out.display().to_string());
    let events = dataset(&out, "events");
    for (heading, sql) in &queries {
        let got = duckdb(&local(sql));
        assert!(!got.is_empty(), "{heading}: no rows");
        if let Some((_, reference)) = REFERENCES.iter().find(|(h, _)| h == heading) {
            let want = duckdb(&reference.replace("EV", &events));
            assert_eq!(got, want, "{heading}: flows and events disagree");
        }
    }
    // RTT: the sketch's p99 is within 3 % of the exact quantile of each flow window's samples, per
    // remote service and per service of the node.
    for (heading, keys) in [
        (
            "RTT p99 per remote service",
            &[
                ("remote_addr", "remote_addr"),
                ("remote_port", "remote_port"),
            ][..],
        ),
        (
            "RTT p99 per service",
            &[(
                "coalesce(pod_namespace || '/' || workload_name, systemd_unit, cgroup_path)",
                "service",
            )][..],
        ),
    ] {
        let (_, rtt) = queries.iter().find(|(h, _)| h == heading).unwrap();
        let got = duckdb(&local(rtt));
        let n = keys.len();
        let exprs: Vec<String> = keys.iter().map(|(e, a)| format!("{e} AS {a}")).collect();
        let names: Vec<&str> = keys.iter().map(|(_, a)| *a).collect();
        let exact = duckdb(&format!(
            "WITH w AS (
               SELECT {}, node, pid, comm, cgroup_id, cgroup_path, pod_name, role, local_addr, local_port,
                      remote_addr, remote_port, floor(epoch_us(ts) / 10000000) AS win,
                      quantile_disc(srtt_us, 0.99) AS p99, count(*) AS n
               FROM {events} WHERE kind = 'rtt' GROUP BY ALL)
             SELECT {names}, max(p99), sum(n) FROM w GROUP BY ALL",
            exprs.join(", "),
            names = names.join(", ")
        ));
        assert!(got.len() > 1, "{heading}: {got:?}");
        for row in &got {
            let ex = exact
                .iter()
                .find(|e| e[..n] == row[..n])
                .unwrap_or_else(|| panic!("{heading}: {row:?} not in the event log"));
            assert_eq!(row[n + 1], ex[n + 1], "{heading}: RTT sample counts agree");
            let (a, b) = (row[n].as_f64().unwrap(), ex[n].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 0.031 * b,
                "{heading}: p99 {a} vs exact {b}"
            );
        }
    }
    // Time travel: version 1 is the first commit of the flows (fewer rows than now in a run of
    // several commits, the same when there was one).
    let (_, travel) = queries.iter().find(|(h, _)| h == "Time travel").unwrap();
    let first = duckdb(&local(travel));
    let now = duckdb_int(&format!("SELECT count(*) FROM {}", dataset(&out, "flows")));
    let at_1 = first[0][0].as_i64().unwrap();
    assert!(at_1 > 0 && at_1 <= now, "{first:?} vs {now}");
    // The glob, right after a clean run: the same rows as the table.
    let (_, glob) = queries
        .iter()
        .find(|(h, _)| h.starts_with("Reading the files directly"))
        .unwrap();
    assert_eq!(duckdb(&local(glob))[0][0].as_i64().unwrap(), now);
}
