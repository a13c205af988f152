//! The fuzz targets' bodies (`pipeline::fuzz`, run by cargo-fuzz from `fuzz/`) on every CI run:
//! every saved input (`fuzz/corpus/*`, and `fuzz/regressions/*` where each crash found becomes a
//! file), then tens of thousands of deterministic mutations of valid messages and config files.
//! A panic anywhere fails the test with the input that caused it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pipeline::aggregate::{WindowConfig, Windows};
use pipeline::capture::synthetic::{Synthetic, SyntheticConfig};
use pipeline::edge::wire;
use pipeline::event::{FlowBatch, ReplayPoint};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn saved_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let Ok(dir) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else {
            continue;
        };
        for e in dir.flatten() {
            out.push((e.path(), std::fs::read(e.path()).unwrap()));
        }
    }
    out
}

/// Runs `body` on `input`, naming the input if it panics.
fn check(body: fn(&[u8]), what: &str, input: &[u8]) {
    if std::panic::catch_unwind(|| body(input)).is_err() {
        let path = std::env::temp_dir().join(format!("tcplake-fuzz-{what}.bin"));
        std::fs::write(&path, input).unwrap();
        panic!(
            "{what}: panicked on an input saved to {} (copy it to fuzz/regressions/)",
            path.display()
        );
    }
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random edit: flip, overwrite, truncate, cut out, duplicate or insert bytes.
fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)];
            }
            2 => v.truncate(rng.below(len + 1)),
            3 if len > 1 => {
                let a = rng.below(len);
                let b = (a + rng.below(32)).min(len);
                v.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + rng.below(64)).min(len);
                let chunk = v[a..b].to_vec();
                let at = rng.below(len);
                v.splice(at..at, chunk);
            }
            _ => {
                let at = rng.below(len + 1);
                v.insert(at, rng.next() as u8);
            }
        }
    }
    v
}

fn wire_seeds() -> Vec<Vec<u8>> {
    let mut src = Synthetic::new(
        "fuzz-node".into(),
        SyntheticConfig {
            seed: 3,
            total: 400,
            start_us: 1_767_225_600_000_000,
            events_per_sim_sec: 200,
        },
    );
    let batch = src.next_batch(400).unwrap();
    let mut w = Windows::new(WindowConfig {
        window_us: 1_000_000,
        allowed_lateness_us: 0,
        horizon_us: 0,
    });
    w.add(&batch.node, &batch.events, batch.position.clone(), |_| true);
    let mut records = Vec::new();
    w.emit_all(&mut records);
    let flows = FlowBatch {
        producer: Arc::from("agg-0"),
        seq: 7,
        first_row: 0,
        total_rows: records.len() as u32,
        records,
        replay: ReplayPoint {
            from_seq: 1,
            through_seq: 3,
            max_ts: vec![(Arc::from("n"), 2)],
            events_through: vec![(Arc::from("n"), 4)],
        },
        replay_before: None,
        shard_count: 2,
        windows: Some(pipeline::aggregate::WindowConfig {
            window_us: 1_000_000,
            allowed_lateness_us: 0,
            horizon_us: 0,
        }),
    };
    let mut small = batch.clone();
    small.events.truncate(3);
    let mut seeds = Vec::new();
    for compress in [false, true] {
        seeds.push(wire::encode_events(&small, compress));
        seeds.push(wire::encode_events(&batch, compress));
        seeds.push(wire::encode_flows(&flows, compress));
    }
    seeds
}

const CONFIG_SEEDS: [&str; 3] = [
    "mode = \"monolith\"\nnode = \"n1\"\nmetrics_addr = \"127.0.0.1:9477\"\n[capture]\nsource = \"synthetic\"\nevents = 1000\n[aggregate]\nwindow_secs = 10\n[sink]\n",
    "mode = \"sink\"\n[broker]\nurl = \"nats://127.0.0.1:4222\"\nmax_bytes = \"1GiB\"\nack_wait = \"30s\"\n[sink]\nshards = 2\n\0--out\0s3://bucket/prefix\0--s3-endpoint\0http://127.0.0.1:9000",
    "[capture]\nsource = \"replay\"\nreplay_from = \"/tmp/x\"\nreplay_since = \"2026-01-01T00:00:00Z\"\n\0--window\x0030\0replay\0--from\0a\0--to\0b\0--until\x002026-01-02T00:00:00Z",
];

#[test]
fn wire_codec_survives_saved_and_mutated_inputs() {
    for (path, input) in saved_inputs("wire") {
        check(pipeline::fuzz::wire, &path.display().to_string(), &input);
    }
    let seeds = wire_seeds();
    for s in &seeds {
        pipeline::fuzz::wire(s);
    }
    let mut rng = Rng(0x7c9f_11d3_5a2b_e001);
    for i in 0..30_000 {
        let seed = seeds[i % seeds.len()].clone();
        let input = mutate(&mut rng, seed);
        check(pipeline::fuzz::wire, "wire", &input);
    }
    // Seeds for cargo-fuzz, written on request (TCPLAKE_WRITE_FUZZ_SEEDS=1).
    if std::env::var_os("TCPLAKE_WRITE_FUZZ_SEEDS").is_some() {
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(fuzz_dir().join(format!("corpus/wire/seed-{i}")), s).unwrap();
        }
        for (i, s) in CONFIG_SEEDS.iter().enumerate() {
            std::fs::write(fuzz_dir().join(format!("corpus/config/seed-{i}")), s).unwrap();
        }
    }
}

#[test]
fn config_parser_survives_saved_and_mutated_inputs() {
    for (path, input) in saved_inputs("config") {
        check(pipeline::fuzz::config, &path.display().to_string(), &input);
    }
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for i in 0..5_000 {
        let seed = CONFIG_SEEDS[i % CONFIG_SEEDS.len()].as_bytes().to_vec();
        let input = mutate(&mut rng, seed);
        check(pipeline::fuzz::config, "config", &input);
    }
}
