//! The integration tests: one binary, so a cold build links arrow, parquet and the AWS SDK once.
//!
//! Each module is one area, run against the real `tcplake` binary and real services (the kernel's
//! eBPF, NATS JetStream, an S3-compatible server, DuckDB and other lake readers); `common` holds
//! what they share. Tests run side by side: each uses its own ports, directories and servers.

mod common;

mod admin;
mod bad_input;
mod bench;
mod compact;
mod deploy;
mod docs_commands;
mod ebpf;
mod fuzz_regressions;
mod handoff;
mod lake_readers;
mod monolith;
mod privileges;
mod queries;
mod replay;
mod restart;
mod s3;
mod shutdown;
mod split;
