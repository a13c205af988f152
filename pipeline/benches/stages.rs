//! Per-stage cost on the synthetic workload (criterion): `cargo bench --bench stages`.
//!
//! Every group processes the same 100 000 events, so their throughputs compare directly: the synthetic
//! source must be far cheaper than the stages it feeds (it is the workload for every other benchmark,
//! and must not be what they measure), and the ratios show where a monolith spends its time.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use parquet::arrow::ArrowWriter;
use pipeline::aggregate::{WindowConfig, Windows};
use pipeline::capture::synthetic::{Synthetic, SyntheticConfig};
use pipeline::event::schema::{
    events_schema, events_to_batch, events_to_file_batch_on, flows_to_batch,
};
use pipeline::event::{Event, FlowRecord};
use pipeline::sink::encoder::Encoder;
use pipeline::sink::parquet_file::ParquetFile;

const EVENTS: u64 = 100_000;

fn source() -> Synthetic {
    Synthetic::new(
        "bench".into(),
        SyntheticConfig {
            seed: 1,
            total: EVENTS,
            start_us: 1_767_225_600_000_000,
            events_per_sim_sec: 20_000,
        },
    )
}

fn events() -> (Arc<str>, Vec<Event>) {
    let b = source().next_batch(EVENTS as usize).unwrap();
    (b.node, b.events)
}

fn window_cfg() -> WindowConfig {
    WindowConfig {
        window_us: 10_000_000,
        allowed_lateness_us: 5_000_000,
        horizon_us: 60_000_000,
    }
}

fn flows(node: &Arc<str>, events: &[Event]) -> Vec<FlowRecord> {
    let mut w = Windows::new(window_cfg());
    let mut out = Vec::new();
    for chunk in events.chunks(4096) {
        let pos = chunk[0].seq..chunk[chunk.len() - 1].seq + 1;
        w.add(node, chunk, pos, |_| true);
        w.emit_ready(&mut out);
    }
    w.emit_all(&mut out);
    out
}

fn stages(c: &mut Criterion) {
    let (node, evs) = events();
    let fl = flows(&node, &evs);
    let mut g = c.benchmark_group("per_100k_events");
    g.throughput(Throughput::Elements(EVENTS));
    g.sample_size(20);
    g.bench_function("synthetic_source", |b| {
        b.iter_batched(
            source,
            |mut s| while s.next_batch(4096).is_some() {},
            BatchSize::LargeInput,
        )
    });
    g.bench_function("aggregate", |b| b.iter(|| flows(&node, &evs)));
    g.bench_function("encode_events_arrow", |b| {
        b.iter(|| {
            for chunk in evs.chunks(4096) {
                events_to_batch(&node, chunk).unwrap();
            }
        })
    });
    g.bench_function("write_events_parquet_zstd", |b| {
        let batches: Vec<_> = evs
            .chunks(4096)
            .map(|c| events_to_batch(&node, c).unwrap())
            .collect();
        b.iter(|| {
            let mut w =
                ArrowWriter::try_new(std::io::sink(), batches[0].schema(), Some(props())).unwrap();
            for batch in &batches {
                w.write(batch).unwrap();
            }
            w.close().unwrap();
        })
    });
    // What the sink does: the same rows (owners' columns as dictionaries), columns encoded on every
    // core this process may use.
    g.bench_function("write_events_parquet_zstd_parallel", |b| {
        let batches: Vec<_> = evs
            .chunks(4096)
            .map(|c| events_to_file_batch_on(Encoder::SERIAL, &node, c).unwrap())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.parquet");
        b.iter(|| {
            let file = std::fs::File::create(&path).unwrap();
            let mut w = ParquetFile::try_new(
                file,
                events_schema(),
                &batches[0].schema(),
                props(),
                Encoder::new(pipeline::sink::encoder::threads()),
            )
            .unwrap();
            for batch in &batches {
                w.write(batch).unwrap();
            }
            w.finish().unwrap();
        })
    });
    g.bench_function("write_flows_parquet_zstd", |b| {
        let batch = flows_to_batch(&fl).unwrap();
        b.iter(|| {
            let mut w =
                ArrowWriter::try_new(std::io::sink(), batch.schema(), Some(props())).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
        })
    });
    g.finish();
}

/// Exactly what the sink writes with.
fn props() -> parquet::file::properties::WriterProperties {
    pipeline::lake::format::writer_properties("bench", 131_072)
}

criterion_group!(benches, stages);
criterion_main!(benches);
