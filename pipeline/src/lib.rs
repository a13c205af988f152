//! tcplake: TCP telemetry captured with eBPF, aggregated per flow and window, written as Parquet.
//!
//! The pipeline has three stages, each with one contract and no knowledge of transport:
//!
//! * [`capture`] yields batches of [`event::Event`]s (from the kernel, or the synthetic workload);
//! * [`aggregate`] folds events into per-flow, per-window [`event::FlowRecord`]s;
//! * [`sink`] writes batches of either as Parquet, Hive-partitioned by hour.
//!
//! [`edge`] holds what joins stages, and [`mode`] picks the edges: a deployment mode is only a choice
//! of edges, so every mode runs the same stage code. The raw events are kept as an append-only log
//! (`events/`): it is the source of truth and the flow table (`flows/`) is a projection of it.

pub mod admin;
pub mod aggregate;
pub mod blocking;
pub mod capture;
pub mod config;
pub mod edge;
pub mod event;
pub mod fuzz;
pub mod health;
pub mod lake;
pub mod metrics;
pub mod mode;
pub mod replay;
pub mod report;
pub mod retry;
pub mod secrets;
pub mod shutdown;
pub mod sink;
pub mod sketch;
pub mod storage;
pub mod summary;
pub mod time;
