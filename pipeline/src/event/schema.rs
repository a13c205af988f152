//! The explicit Arrow schemas of the two datasets, and conversions in both directions.
//!
//! Schemas are written out field by field, never inferred, and versioned: [`SCHEMA_VERSION`] goes into
//! every Parquet file's key-value metadata. Timestamps are microseconds, UTC (what DuckDB, Athena and
//! Spark all read correctly). Addresses are text (`127.0.0.1`, `::1`) so they read naturally in SQL.
//!
//! Version 2 uses the lake's standard types: signed integers only (`bigint` counts and ids, `int` ports,
//! pids and RTTs), as Delta Lake, Iceberg, Athena and Spark have no unsigned ones (Spark read version 1's
//! `u64` as `decimal(20,0)`, DuckDB summed it as `int128`). Ids wider than 63 bits (a kernel socket
//! address in `sock_id`) are stored bit for bit, so they may read negative. Readers take version 1 files
//! too: their unsigned columns are cast on read.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, DictionaryArray, Int32Array, Int64Array, RecordBatch, StringArray,
    StringBuilder, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;

use super::cgroup::Paths;
use super::pod::Pods;
use super::{Cgroup, Comm, Event, EventKind, FlowKey, FlowRecord, Pod, Role, TcpState};
use crate::sink::encoder::Encoder;

/// Version of both dataset schemas, stored in file metadata under [`SCHEMA_VERSION_KEY`]. Version 3
/// added who is talking ([`IDENTITY_FIELDS`]): `role`, the owner's cgroup (`cgroup_path`,
/// `container_id`, `pod_uid`, `systemd_unit`) and its pod's Kubernetes names (`pod_name`,
/// `pod_namespace`, `workload_kind`, `workload_name`, `k8s_node`), nullable, at the end of both
/// schemas.
pub const SCHEMA_VERSION: u32 = 3;
/// File metadata key holding [`SCHEMA_VERSION`].
pub const SCHEMA_VERSION_KEY: &str = "tcplake.schema_version";

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Schema of the `events/` dataset (the raw event log).
pub fn events_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(
            vec![
                Field::new("ts", ts_type(), false),
                Field::new("node", DataType::Utf8, false),
                Field::new("seq", DataType::Int64, false),
                Field::new("kind", DataType::Utf8, false),
                Field::new("pid", DataType::Int32, false),
                Field::new("comm", DataType::Utf8, false),
                Field::new("cgroup_id", DataType::Int64, false),
                Field::new("sock_id", DataType::Int64, false),
                Field::new("family", DataType::Utf8, false),
                Field::new("local_addr", DataType::Utf8, false),
                Field::new("local_port", DataType::Int32, false),
                Field::new("remote_addr", DataType::Utf8, false),
                Field::new("remote_port", DataType::Int32, false),
                Field::new("old_state", DataType::Utf8, true),
                Field::new("new_state", DataType::Utf8, true),
                Field::new("bytes", DataType::Int64, true),
                Field::new("srtt_us", DataType::Int32, true),
                Field::new("snd_cwnd", DataType::Int32, true),
            ]
            .into_iter()
            .chain(identity_fields())
            .collect::<Vec<_>>(),
        ))
    });
    SCHEMA.clone()
}

/// Schema of the `flows/` dataset (the projection).
pub fn flows_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(
            vec![
                Field::new("window_start", ts_type(), false),
                Field::new("window_end", ts_type(), false),
                Field::new("node", DataType::Utf8, false),
                Field::new("pid", DataType::Int32, false),
                Field::new("comm", DataType::Utf8, false),
                Field::new("cgroup_id", DataType::Int64, false),
                Field::new("family", DataType::Utf8, false),
                Field::new("local_addr", DataType::Utf8, false),
                Field::new("local_port", DataType::Int32, false),
                Field::new("remote_addr", DataType::Utf8, false),
                Field::new("remote_port", DataType::Int32, false),
                Field::new("bytes_sent", DataType::Int64, false),
                Field::new("bytes_received", DataType::Int64, false),
                Field::new("retransmits", DataType::Int64, false),
                Field::new("rtt_samples", DataType::Int64, false),
                Field::new("rtt_min_us", DataType::Int32, true),
                Field::new("rtt_p50_us", DataType::Int32, true),
                Field::new("rtt_p99_us", DataType::Int32, true),
                Field::new("rtt_max_us", DataType::Int32, true),
                Field::new("connections_opened", DataType::Int64, false),
                Field::new("connections_closed", DataType::Int64, false),
                Field::new("resets", DataType::Int64, false),
                Field::new("events", DataType::Int64, false),
            ]
            .into_iter()
            .chain(identity_fields())
            .collect::<Vec<_>>(),
        ))
    });
    SCHEMA.clone()
}

/// Why a record batch could not be read back as events or flows.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("column `{0}` is missing")]
    MissingColumn(&'static str),
    #[error("column `{column}` has type {found}, expected {expected}")]
    WrongType {
        column: &'static str,
        found: DataType,
        expected: &'static str,
    },
    #[error("row {row}: column `{column}`: {reason}")]
    BadValue {
        row: usize,
        column: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Arrow(#[from] ArrowError),
}

fn strings<'a, I: Iterator<Item = &'a str>>(len: usize, values: I) -> ArrayRef {
    let mut b = StringBuilder::with_capacity(len, len * 8);
    for v in values {
        b.append_value(v);
    }
    Arc::new(b.finish())
}

/// A string column of `f` of each row (null where it gives none), sized before it is filled: some
/// values are long (a pod's cgroup path is ~190 bytes), and growing by doubling would copy them
/// several times over.
fn optional_strings<'a, T: 'a, I>(
    len: usize,
    rows: I,
    f: impl Fn(&'a T) -> Option<&'a str>,
) -> ArrayRef
where
    I: Iterator<Item = Option<&'a T>> + Clone,
{
    let bytes = rows
        .clone()
        .map(|r| r.and_then(&f).map_or(0, str::len))
        .sum();
    let mut b = StringBuilder::with_capacity(len, bytes);
    for r in rows {
        b.append_option(r.and_then(&f));
    }
    Arc::new(b.finish())
}

/// Who is talking, per row, as both schemas hold it.
#[derive(Clone, Copy)]
struct Identity<'a> {
    role: Option<Role>,
    cgroup: Option<&'a Cgroup>,
    pod: Option<&'a Pod>,
}

/// Column `i` of the who-is-talking columns at the end of both schemas ([`IDENTITY_FIELDS`]).
fn identity_column<'a, I>(i: usize, len: usize, rows: I, form: &Form<'_>) -> ArrayRef
where
    I: Iterator<Item = Identity<'a>> + Clone,
{
    let cgroups = rows.clone().map(|r| r.cgroup);
    let pods = rows.clone().map(|r| r.pod);
    match (i, form) {
        (0, _) => Arc::new(StringArray::from_iter(
            rows.map(|r| r.role.map(Role::as_str)),
        )),
        (1, Form::Plain) => optional_strings(len, cgroups, |c: &Cgroup| Some(c.path())),
        (2, Form::Plain) => optional_strings(len, cgroups, Cgroup::container_id),
        (3, Form::Plain) => optional_strings(len, cgroups, Cgroup::pod_uid),
        (4, Form::Plain) => optional_strings(len, cgroups, Cgroup::systemd_unit),
        (5, Form::Plain) => optional_strings(len, pods, |p: &Pod| Some(p.name())),
        (6, Form::Plain) => optional_strings(len, pods, |p: &Pod| Some(p.namespace())),
        (7, Form::Plain) => optional_strings(len, pods, |p: &Pod| Some(p.workload_kind())),
        (8, Form::Plain) => optional_strings(len, pods, |p: &Pod| Some(p.workload_name())),
        (_, Form::Plain) => optional_strings(len, pods, |p: &Pod| Some(p.node())),
        (
            1,
            Form::Dictionary {
                cgroups: owners, ..
            },
        ) => owners.column(|c| Some(c.path())),
        (
            2,
            Form::Dictionary {
                cgroups: owners, ..
            },
        ) => owners.column(Cgroup::container_id),
        (
            3,
            Form::Dictionary {
                cgroups: owners, ..
            },
        ) => owners.column(Cgroup::pod_uid),
        (
            4,
            Form::Dictionary {
                cgroups: owners, ..
            },
        ) => owners.column(Cgroup::systemd_unit),
        (5, Form::Dictionary { pods: owners, .. }) => owners.column(|p| Some(p.name())),
        (6, Form::Dictionary { pods: owners, .. }) => owners.column(|p| Some(p.namespace())),
        (7, Form::Dictionary { pods: owners, .. }) => owners.column(|p| Some(p.workload_kind())),
        (8, Form::Dictionary { pods: owners, .. }) => owners.column(|p| Some(p.workload_name())),
        (_, Form::Dictionary { pods: owners, .. }) => owners.column(|p| Some(p.node())),
    }
}

/// How a batch holds the identity columns taken from a shared [`Cgroup`] or [`Pod`].
enum Form<'a> {
    /// A string per row ([`events_schema`]).
    Plain,
    /// Dictionaries of the batch's owners' values ([`events_file_batch_schema`]).
    Dictionary {
        cgroups: Owners<'a, Cgroup>,
        pods: Owners<'a, Pod>,
    },
}

/// The identity columns [`events_to_file_batch_on`] builds as dictionaries: every one whose value
/// comes from a shared [`Cgroup`] or [`Pod`] (all but `role`).
fn is_dictionary_identity(name: &str) -> bool {
    IDENTITY_FIELDS[1..].contains(&name)
}

/// The distinct owners (cgroups or pods) of a batch's rows, found once for all the columns taken
/// from them. Rows share an owner by reference, so it is known by its address; a socket's events come
/// in runs, so most rows repeat the row before's.
struct Owners<'a, T> {
    /// Per row, its owner's index in `distinct`.
    of_row: Vec<Option<u32>>,
    distinct: Vec<&'a T>,
}

impl<'a, T> Owners<'a, T> {
    fn new(len: usize, rows: impl Iterator<Item = Option<&'a T>>, addr: fn(&T) -> usize) -> Self {
        let mut of_row = Vec::with_capacity(len);
        let mut distinct = Vec::new();
        let mut index: rustc_hash::FxHashMap<usize, u32> = Default::default();
        let mut last: Option<(usize, u32)> = None;
        for row in rows {
            of_row.push(row.map(|owner| {
                let at = addr(owner);
                match last {
                    Some((a, i)) if a == at => i,
                    _ => {
                        let i = *index.entry(at).or_insert_with(|| {
                            distinct.push(owner);
                            (distinct.len() - 1) as u32
                        });
                        last = Some((at, i));
                        i
                    }
                }
            }));
        }
        Owners { of_row, distinct }
    }

    /// The dictionary column of `f` of each row's owner (null where there is none or it gives none):
    /// each value is copied once per batch instead of once per row (a pod's cgroup path is ~190
    /// bytes). Two owners with equal values both have an entry: the Parquet writer merges them.
    fn column(&self, f: impl Fn(&'a T) -> Option<&'a str>) -> ArrayRef {
        let mut values = StringBuilder::new();
        let mut next = 0;
        let key_of: Vec<Option<i32>> = self
            .distinct
            .iter()
            .map(|owner| {
                f(owner).map(|v| {
                    values.append_value(v);
                    next += 1;
                    next - 1
                })
            })
            .collect();
        let keys: Int32Array = self
            .of_row
            .iter()
            .map(|o| o.and_then(|i| key_of[i as usize]))
            .collect();
        Arc::new(DictionaryArray::<Int32Type>::new(
            keys,
            Arc::new(values.finish()),
        ))
    }
}

/// The who-is-talking columns (schema version 3), at the end of both schemas, in order.
pub const IDENTITY_FIELDS: [&str; 10] = [
    "role",
    "cgroup_path",
    "container_id",
    "pod_uid",
    "systemd_unit",
    "pod_name",
    "pod_namespace",
    "workload_kind",
    "workload_name",
    "k8s_node",
];
const IDENTITY_COLUMNS: usize = IDENTITY_FIELDS.len();
const _: () = assert!(18 + IDENTITY_COLUMNS == 28, "event_column's last arm");

fn identity_fields() -> impl Iterator<Item = Field> {
    IDENTITY_FIELDS
        .into_iter()
        .map(|name| Field::new(name, DataType::Utf8, true))
}

fn utc_micros(values: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
}

/// Encodes events captured on `node` as a record batch of [`events_schema`].
pub fn events_to_batch(node: &str, events: &[Event]) -> Result<RecordBatch, ArrowError> {
    events_to_batch_on(Encoder::SERIAL, node, events)
}

/// [`events_to_batch`], each column built on `encoder` (columns are independent of one another).
pub fn events_to_batch_on(
    encoder: Encoder,
    node: &str,
    events: &[Event],
) -> Result<RecordBatch, ArrowError> {
    events_batch(encoder, node, events, events_schema(), Form::Plain)
}

/// The schema of [`events_to_file_batch_on`]'s batches: [`events_schema`] with the identity columns
/// taken from a shared cgroup or pod as dictionaries of strings. Written to a file of
/// [`events_schema`], they are the same Parquet string column, and
/// [`crate::sink::parquet_file`] takes their statistics from the dictionary.
pub fn events_file_batch_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let fields: Vec<Field> = events_schema()
            .fields()
            .iter()
            .map(|f| {
                if is_dictionary_identity(f.name()) {
                    Field::new(
                        f.name(),
                        DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                        f.is_nullable(),
                    )
                } else {
                    f.as_ref().clone()
                }
            })
            .collect();
        Arc::new(Schema::new_with_metadata(
            fields,
            events_schema().metadata().clone(),
        ))
    });
    SCHEMA.clone()
}

/// The sink's form of [`events_to_batch_on`]: a batch of [`events_file_batch_schema`], for a Parquet
/// file of [`events_schema`]. Most of an event row's bytes are its owner's cgroup path and pod names,
/// shared by every event of the owner: this copies each once per batch, not once per row.
pub fn events_to_file_batch_on(
    encoder: Encoder,
    node: &str,
    events: &[Event],
) -> Result<RecordBatch, ArrowError> {
    let n = events.len();
    let (cgroups, pods) = encoder.join(
        n,
        || Owners::new(n, events.iter().map(|e| e.cgroup.as_ref()), Cgroup::addr),
        || Owners::new(n, events.iter().map(|e| e.pod.as_ref()), Pod::addr),
    );
    let form = Form::Dictionary { cgroups, pods };
    events_batch(encoder, node, events, events_file_batch_schema(), form)
}

fn events_batch(
    encoder: Encoder,
    node: &str,
    events: &[Event],
    schema: SchemaRef,
    form: Form<'_>,
) -> Result<RecordBatch, ArrowError> {
    let columns = encoder
        .map(events.len(), schema.fields().len(), |c| {
            event_column(c, node, events, &form)
        })
        .into_iter()
        .collect::<Result<_, _>>()?;
    RecordBatch::try_new(schema, columns)
}

/// Column `c` of [`events_schema`] for `events`, its owner columns in `form`.
fn event_column(
    c: usize,
    node: &str,
    events: &[Event],
    form: &Form<'_>,
) -> Result<ArrayRef, ArrowError> {
    let n = events.len();
    // Unsigned values are stored bit for bit in the signed types (see the module doc).
    let i64s = |f: fn(&Event) -> u64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(
            events.iter().map(|e| f(e) as i64),
        ))
    };
    let i32s = |f: fn(&Event) -> u32| -> ArrayRef {
        Arc::new(Int32Array::from_iter_values(
            events.iter().map(|e| f(e) as i32),
        ))
    };
    let addrs = |f: fn(&Event) -> IpAddr| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 12);
        let mut buf = String::with_capacity(48);
        for e in events {
            append_addr(&mut b, &mut buf, f(e));
        }
        Arc::new(b.finish())
    };
    let state = |f: fn(&EventKind) -> Option<TcpState>| -> ArrayRef {
        Arc::new(StringArray::from_iter(
            events.iter().map(|e| f(&e.kind).map(TcpState::name)),
        ))
    };
    Ok(match c {
        0 => utc_micros(events.iter().map(|e| e.ts_us).collect()),
        1 => strings(n, std::iter::repeat_n(node, n)),
        2 => i64s(|e| e.seq),
        3 => strings(n, events.iter().map(|e| e.kind.name())),
        4 => i32s(|e| e.pid),
        5 => {
            let mut b = StringBuilder::with_capacity(n, n * 8);
            for e in events {
                b.append_value(e.comm.as_str());
            }
            Arc::new(b.finish())
        }
        6 => i64s(|e| e.cgroup_id),
        7 => i64s(|e| e.sock_id),
        8 => strings(n, events.iter().map(|e| e.family().as_str())),
        9 => addrs(|e| e.local_addr),
        10 => i32s(|e| u32::from(e.local_port)),
        11 => addrs(|e| e.remote_addr),
        12 => i32s(|e| u32::from(e.remote_port)),
        13 => state(|k| match *k {
            EventKind::StateChange { old, .. } => Some(old),
            _ => None,
        }),
        14 => state(|k| match *k {
            EventKind::StateChange { new, .. } => Some(new),
            EventKind::Retransmit { state } => Some(state),
            _ => None,
        }),
        15 => Arc::new(Int64Array::from_iter(events.iter().map(|e| match e.kind {
            EventKind::BytesSent { bytes } | EventKind::BytesReceived { bytes } => {
                Some(bytes as i64)
            }
            _ => None,
        }))),
        16 => Arc::new(Int32Array::from_iter(events.iter().map(|e| match e.kind {
            EventKind::RttSample { srtt_us, .. } => Some(srtt_us as i32),
            _ => None,
        }))),
        17 => Arc::new(Int32Array::from_iter(events.iter().map(|e| match e.kind {
            EventKind::RttSample { snd_cwnd, .. } => Some(snd_cwnd as i32),
            _ => None,
        }))),
        // The last IDENTITY_COLUMNS columns.
        18..=27 => identity_column(
            c - 18,
            n,
            events.iter().map(|e| Identity {
                role: e.role,
                cgroup: e.cgroup.as_ref(),
                pod: e.pod.as_ref(),
            }),
            form,
        ),
        _ => {
            return Err(ArrowError::SchemaError(format!(
                "the events schema has no column {c}"
            )))
        }
    })
}

/// Encodes flow records as a record batch of [`flows_schema`].
pub fn flows_to_batch(records: &[FlowRecord]) -> Result<RecordBatch, ArrowError> {
    let n = records.len();
    let mut addr_buf = String::with_capacity(48);
    let mut local = StringBuilder::with_capacity(n, n * 12);
    let mut remote = StringBuilder::with_capacity(n, n * 12);
    let mut comm = StringBuilder::with_capacity(n, n * 8);
    for r in records {
        append_addr(&mut local, &mut addr_buf, r.key.local_addr);
        append_addr(&mut remote, &mut addr_buf, r.key.remote_addr);
        comm.append_value(r.key.comm.as_str());
    }
    let i64s = |f: fn(&FlowRecord) -> u64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(
            records.iter().map(|r| f(r) as i64),
        ))
    };
    let i32s = |f: fn(&FlowRecord) -> u32| -> ArrayRef {
        Arc::new(Int32Array::from_iter_values(
            records.iter().map(|r| f(r) as i32),
        ))
    };
    let rtt = |f: fn(&FlowRecord) -> Option<u32>| -> ArrayRef {
        Arc::new(
            records
                .iter()
                .map(|r| f(r).map(|v| v as i32))
                .collect::<Int32Array>(),
        )
    };
    let columns: Vec<ArrayRef> = vec![
        utc_micros(records.iter().map(|r| r.window_start_us).collect()),
        utc_micros(records.iter().map(|r| r.window_end_us).collect()),
        strings(n, records.iter().map(|r| &*r.key.node)),
        i32s(|r| r.key.pid),
        Arc::new(comm.finish()),
        i64s(|r| r.key.cgroup_id),
        strings(n, records.iter().map(|r| r.key.family().as_str())),
        Arc::new(local.finish()),
        i32s(|r| u32::from(r.key.local_port)),
        Arc::new(remote.finish()),
        i32s(|r| u32::from(r.key.remote_port)),
        i64s(|r| r.bytes_sent),
        i64s(|r| r.bytes_received),
        i64s(|r| r.retransmits),
        i64s(|r| r.rtt_samples),
        rtt(|r| r.rtt_min_us),
        rtt(|r| r.rtt_p50_us),
        rtt(|r| r.rtt_p99_us),
        rtt(|r| r.rtt_max_us),
        i64s(|r| r.connections_opened),
        i64s(|r| r.connections_closed),
        i64s(|r| r.resets),
        i64s(|r| r.events),
    ];
    let mut columns = columns;
    for i in 0..IDENTITY_COLUMNS {
        columns.push(identity_column(
            i,
            n,
            records.iter().map(|r| Identity {
                role: r.key.role,
                cgroup: r.key.cgroup.as_ref(),
                pod: r.key.pod.as_ref(),
            }),
            &Form::Plain,
        ));
    }
    RecordBatch::try_new(flows_schema(), columns)
}

fn append_addr(b: &mut StringBuilder, buf: &mut String, addr: IpAddr) {
    use std::fmt::Write;
    buf.clear();
    match addr {
        // The hot case, formatted by hand: `Display` costs several times more per address.
        IpAddr::V4(a) => {
            for (i, octet) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push('.');
                }
                push_decimal(buf, octet);
            }
        }
        // Writing to a String cannot fail.
        IpAddr::V6(a) => {
            let _ = write!(buf, "{a}");
        }
    }
    b.append_value(buf.as_str());
}

fn push_decimal(buf: &mut String, n: u8) {
    if n >= 100 {
        buf.push(char::from(b'0' + n / 100));
    }
    if n >= 10 {
        buf.push(char::from(b'0' + n / 10 % 10));
    }
    buf.push(char::from(b'0' + n % 10));
}

/// A batch in the layout of `schema`, whatever older layout it was written in: columns are picked by
/// name, a nullable column the file lacks (added by a later schema version) reads as all nulls, and
/// columns this build does not know are left out. A missing required column is left missing, for
/// [`Columns`] to report by name.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, SchemaError> {
    if batch.schema_ref().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        match batch.column_by_name(f.name()) {
            // Version 1 wrote unsigned integers: read them as the signed types, bit for bit.
            Some(c) if c.data_type().is_unsigned_integer() && f.data_type() != c.data_type() => {
                let cast = reinterpret_unsigned(c, f.data_type())?;
                fields.push(Field::new(f.name(), f.data_type().clone(), true));
                columns.push(cast);
            }
            Some(c) => {
                fields.push(Field::new(f.name(), c.data_type().clone(), true));
                columns.push(Arc::clone(c));
            }
            None if f.is_nullable() => {
                fields.push(Field::new(f.name(), f.data_type().clone(), true));
                columns.push(arrow::array::new_null_array(
                    f.data_type(),
                    batch.num_rows(),
                ));
            }
            None => {}
        }
    }
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        columns,
        &options,
    )?)
}

/// An unsigned column (schema version 1) as the signed type version 2 uses: widened where it fits
/// (`u16`, `u32` into `i32`/`i64`), reinterpreted bit for bit where it does not (`u64` into `i64`).
fn reinterpret_unsigned(c: &ArrayRef, to: &DataType) -> Result<ArrayRef, SchemaError> {
    use arrow::array::{UInt16Array, UInt32Array, UInt64Array};
    let any = c.as_any();
    let out: Option<ArrayRef> = match to {
        DataType::Int64 => any
            .downcast_ref::<UInt64Array>()
            .map(|a| {
                Arc::new(a.unary_opt::<_, arrow::datatypes::Int64Type>(|v| Some(v as i64)))
                    as ArrayRef
            })
            .or_else(|| {
                any.downcast_ref::<UInt32Array>().map(|a| {
                    Arc::new(a.unary_opt::<_, arrow::datatypes::Int64Type>(|v| Some(i64::from(v))))
                        as ArrayRef
                })
            }),
        DataType::Int32 => any
            .downcast_ref::<UInt32Array>()
            .map(|a| {
                Arc::new(a.unary_opt::<_, arrow::datatypes::Int32Type>(|v| Some(v as i32)))
                    as ArrayRef
            })
            .or_else(|| {
                any.downcast_ref::<UInt16Array>().map(|a| {
                    Arc::new(a.unary_opt::<_, arrow::datatypes::Int32Type>(|v| Some(i32::from(v))))
                        as ArrayRef
                })
            }),
        _ => None,
    };
    out.ok_or_else(|| SchemaError::WrongType {
        column: "(version 1 column)",
        found: c.data_type().clone(),
        expected: "an unsigned integer of version 1",
    })
}

/// Typed access to the columns of a record batch, with errors that name the column and row.
struct Columns<'a>(&'a RecordBatch);

impl<'a> Columns<'a> {
    fn get<T: Array + 'static>(
        &self,
        name: &'static str,
        expected: &'static str,
    ) -> Result<&'a T, SchemaError> {
        let col = self
            .0
            .column_by_name(name)
            .ok_or(SchemaError::MissingColumn(name))?;
        col.as_any()
            .downcast_ref::<T>()
            .ok_or_else(|| SchemaError::WrongType {
                column: name,
                found: col.data_type().clone(),
                expected,
            })
    }
    fn i64(&self, name: &'static str) -> Result<&'a Int64Array, SchemaError> {
        self.get(name, "Int64")
    }
    fn i32(&self, name: &'static str) -> Result<&'a Int32Array, SchemaError> {
        self.get(name, "Int32")
    }
    fn str(&self, name: &'static str) -> Result<&'a StringArray, SchemaError> {
        self.get(name, "Utf8")
    }
    fn ts(&self, name: &'static str) -> Result<&'a TimestampMicrosecondArray, SchemaError> {
        self.get(name, "Timestamp(Microsecond)")
    }
}

fn bad(row: usize, column: &'static str, reason: impl Into<String>) -> SchemaError {
    SchemaError::BadValue {
        row,
        column,
        reason: reason.into(),
    }
}

fn opt<T: arrow::array::ArrowPrimitiveType>(
    a: &arrow::array::PrimitiveArray<T>,
    i: usize,
) -> Option<T::Native> {
    a.is_valid(i).then(|| a.value(i))
}

fn parse_addr(a: &StringArray, row: usize, column: &'static str) -> Result<IpAddr, SchemaError> {
    a.value(row).parse().map_err(|_| {
        bad(
            row,
            column,
            format!("`{}` is not an IP address", a.value(row)),
        )
    })
}

fn port(a: &Int32Array, row: usize, column: &'static str) -> Result<u16, SchemaError> {
    u16::try_from(a.value(row)).map_err(|_| {
        bad(
            row,
            column,
            format!("port {} is out of range", a.value(row)),
        )
    })
}

fn parse_state(a: &StringArray, row: usize, column: &'static str) -> Result<TcpState, SchemaError> {
    if a.is_null(row) {
        return Err(bad(row, column, "missing TCP state"));
    }
    TcpState::from_name(a.value(row))
        .ok_or_else(|| bad(row, column, format!("unknown TCP state `{}`", a.value(row))))
}

/// The row's cgroup, from its path (what the path says is read anew, not from the other columns).
fn read_cgroup(paths: &StringArray, row: usize, cgroups: &mut Paths) -> Option<Cgroup> {
    paths.is_valid(row).then(|| cgroups.get(paths.value(row)))
}

/// The columns naming a row's pod (all five, or none).
struct PodColumns<'a>([&'a StringArray; 5]);

impl<'a> PodColumns<'a> {
    fn of(c: &Columns<'a>) -> Result<Self, SchemaError> {
        Ok(PodColumns([
            c.str("pod_name")?,
            c.str("pod_namespace")?,
            c.str("workload_kind")?,
            c.str("workload_name")?,
            c.str("k8s_node")?,
        ]))
    }

    /// The row's pod: `None` where its name is null.
    fn read(&self, row: usize, pods: &mut Pods) -> Option<Pod> {
        let [name, namespace, kind, workload, node] = self.0;
        fn v(a: &StringArray, row: usize) -> &str {
            if a.is_valid(row) {
                a.value(row)
            } else {
                ""
            }
        }
        name.is_valid(row).then(|| {
            pods.get(
                v(name, row),
                v(namespace, row),
                v(kind, row),
                v(workload, row),
                v(node, row),
            )
        })
    }
}

/// The row's role; null where it was not recorded (a file of schema version 2 or older).
fn read_role(roles: &StringArray, row: usize) -> Result<Option<Role>, SchemaError> {
    if roles.is_null(row) {
        return Ok(None);
    }
    Role::from_name(roles.value(row))
        .map(Some)
        .ok_or_else(|| bad(row, "role", format!("unknown role `{}`", roles.value(row))))
}

/// Decodes a record batch of [`events_schema`] back into `(node, event)` pairs (replay, wire codec).
pub fn batch_to_events(batch: &RecordBatch) -> Result<Vec<(Arc<str>, Event)>, SchemaError> {
    let batch = &conform(batch, &events_schema())?;
    let c = Columns(batch);
    let (ts, node, seq, kind) = (c.ts("ts")?, c.str("node")?, c.i64("seq")?, c.str("kind")?);
    let (pid, comm, cgroup, sock) = (
        c.i32("pid")?,
        c.str("comm")?,
        c.i64("cgroup_id")?,
        c.i64("sock_id")?,
    );
    let (laddr, lport, raddr, rport) = (
        c.str("local_addr")?,
        c.i32("local_port")?,
        c.str("remote_addr")?,
        c.i32("remote_port")?,
    );
    let (old_state, new_state) = (c.str("old_state")?, c.str("new_state")?);
    let (bytes, srtt, cwnd) = (c.i64("bytes")?, c.i32("srtt_us")?, c.i32("snd_cwnd")?);
    let (roles, paths) = (c.str("role")?, c.str("cgroup_path")?);
    let mut cgroups = Paths::default();
    let (pod_columns, mut pods) = (PodColumns::of(&c)?, Pods::default());
    let mut out = Vec::with_capacity(batch.num_rows());
    let mut last_node: Option<Arc<str>> = None;
    for i in 0..batch.num_rows() {
        let node = match &last_node {
            Some(n) if **n == *node.value(i) => Arc::clone(n),
            _ => {
                let n: Arc<str> = node.value(i).into();
                last_node = Some(Arc::clone(&n));
                n
            }
        };
        let need_bytes = || {
            opt(bytes, i)
                .map(|v| v as u64)
                .ok_or_else(|| bad(i, "bytes", "missing byte count"))
        };
        let kind = match kind.value(i) {
            "state_change" => EventKind::StateChange {
                old: parse_state(old_state, i, "old_state")?,
                new: parse_state(new_state, i, "new_state")?,
            },
            "retransmit" => EventKind::Retransmit {
                state: parse_state(new_state, i, "new_state")?,
            },
            "rtt" => EventKind::RttSample {
                srtt_us: opt(srtt, i)
                    .map(|v| v as u32)
                    .ok_or_else(|| bad(i, "srtt_us", "missing RTT"))?,
                snd_cwnd: opt(cwnd, i).map_or(0, |v| v as u32),
            },
            "bytes_sent" => EventKind::BytesSent {
                bytes: need_bytes()?,
            },
            "bytes_received" => EventKind::BytesReceived {
                bytes: need_bytes()?,
            },
            other => return Err(bad(i, "kind", format!("unknown event kind `{other}`"))),
        };
        out.push((
            node,
            Event {
                seq: seq.value(i) as u64,
                ts_us: ts.value(i),
                sock_id: sock.value(i) as u64,
                cgroup_id: cgroup.value(i) as u64,
                cgroup: read_cgroup(paths, i, &mut cgroups),
                pod: pod_columns.read(i, &mut pods),
                role: read_role(roles, i)?,
                pid: pid.value(i) as u32,
                comm: Comm::from_bytes(comm.value(i).as_bytes()),
                local_addr: parse_addr(laddr, i, "local_addr")?,
                local_port: port(lport, i, "local_port")?,
                remote_addr: parse_addr(raddr, i, "remote_addr")?,
                remote_port: port(rport, i, "remote_port")?,
                kind,
            },
        ));
    }
    Ok(out)
}

/// Decodes a record batch of [`flows_schema`] back into flow records.
pub fn batch_to_flows(batch: &RecordBatch) -> Result<Vec<FlowRecord>, SchemaError> {
    let batch = &conform(batch, &flows_schema())?;
    let c = Columns(batch);
    let (ws, we, node, pid, comm) = (
        c.ts("window_start")?,
        c.ts("window_end")?,
        c.str("node")?,
        c.i32("pid")?,
        c.str("comm")?,
    );
    let (cgroup, laddr, lport, raddr, rport) = (
        c.i64("cgroup_id")?,
        c.str("local_addr")?,
        c.i32("local_port")?,
        c.str("remote_addr")?,
        c.i32("remote_port")?,
    );
    let (sent, recv, retx, samples) = (
        c.i64("bytes_sent")?,
        c.i64("bytes_received")?,
        c.i64("retransmits")?,
        c.i64("rtt_samples")?,
    );
    let (rmin, rp50, rp99, rmax) = (
        c.i32("rtt_min_us")?,
        c.i32("rtt_p50_us")?,
        c.i32("rtt_p99_us")?,
        c.i32("rtt_max_us")?,
    );
    let (opened, closed, resets, events) = (
        c.i64("connections_opened")?,
        c.i64("connections_closed")?,
        c.i64("resets")?,
        c.i64("events")?,
    );
    let (roles, paths) = (c.str("role")?, c.str("cgroup_path")?);
    let mut cgroups = Paths::default();
    let (pod_columns, mut pods) = (PodColumns::of(&c)?, Pods::default());
    (0..batch.num_rows())
        .map(|i| {
            Ok(FlowRecord {
                window_start_us: ws.value(i),
                window_end_us: we.value(i),
                key: FlowKey {
                    node: node.value(i).into(),
                    pid: pid.value(i) as u32,
                    comm: Comm::from_bytes(comm.value(i).as_bytes()),
                    cgroup_id: cgroup.value(i) as u64,
                    cgroup: read_cgroup(paths, i, &mut cgroups),
                    pod: pod_columns.read(i, &mut pods),
                    role: read_role(roles, i)?,
                    local_addr: parse_addr(laddr, i, "local_addr")?,
                    local_port: port(lport, i, "local_port")?,
                    remote_addr: parse_addr(raddr, i, "remote_addr")?,
                    remote_port: port(rport, i, "remote_port")?,
                },
                bytes_sent: sent.value(i) as u64,
                bytes_received: recv.value(i) as u64,
                retransmits: retx.value(i) as u64,
                rtt_samples: samples.value(i) as u64,
                rtt_min_us: opt(rmin, i).map(|v| v as u32),
                rtt_p50_us: opt(rp50, i).map(|v| v as u32),
                rtt_p99_us: opt(rp99, i).map(|v| v as u32),
                rtt_max_us: opt(rmax, i).map(|v| v as u32),
                connections_opened: opened.value(i) as u64,
                connections_closed: closed.value(i) as u64,
                resets: resets.value(i) as u64,
                events: events.value(i) as u64,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{WindowConfig, Windows};
    use crate::capture::synthetic::{Synthetic, SyntheticConfig};
    use bytes::Bytes;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ArrowWriter;

    fn sample() -> (Arc<str>, Vec<Event>, Vec<FlowRecord>) {
        let mut src = Synthetic::new(
            "node-a".into(),
            SyntheticConfig {
                seed: 11,
                total: 20_000,
                start_us: 1_767_225_600_000_000,
                events_per_sim_sec: 2_000,
            },
        );
        let batch = src.next_batch(20_000).unwrap();
        let mut w = Windows::new(WindowConfig {
            window_us: 5_000_000,
            allowed_lateness_us: 0,
            horizon_us: 0,
        });
        w.add(&batch.node, &batch.events, batch.position.clone(), |_| true);
        let mut flows = Vec::new();
        w.emit_all(&mut flows);
        (batch.node, batch.events, flows)
    }

    fn parquet_round_trip(batch: &RecordBatch) -> RecordBatch {
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), None).unwrap();
        w.write(batch).unwrap();
        w.close().unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(buf))
            .unwrap()
            .with_batch_size(usize::MAX)
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        arrow::compute::concat_batches(&batch.schema(), &batches).unwrap()
    }

    #[test]
    fn events_survive_arrow_and_parquet() {
        let (node, events, _) = sample();
        let batch = events_to_batch(&node, &events).unwrap();
        let back = batch_to_events(&parquet_round_trip(&batch)).unwrap();
        assert_eq!(back.len(), events.len());
        assert!(back.iter().all(|(n, _)| **n == *node));
        let back: Vec<Event> = back.into_iter().map(|(_, e)| e).collect();
        assert_eq!(back, events);
    }

    /// The sink builds columns on its encoder threads: the batch is the serial one, column for column.
    #[test]
    fn events_built_in_parallel_equal_the_serial_batch() {
        let (node, events, _) = sample();
        let serial = events_to_batch(&node, &events).unwrap();
        let parallel = events_to_batch_on(Encoder::new(4), &node, &events).unwrap();
        assert_eq!(serial, parallel);
        assert_eq!(serial.num_columns(), events_schema().fields().len());
    }

    #[test]
    fn flows_survive_arrow_and_parquet() {
        let (_, _, flows) = sample();
        assert!(
            flows.iter().any(|f| f.rtt_samples == 0) && flows.iter().any(|f| f.rtt_samples > 0)
        );
        let batch = flows_to_batch(&flows).unwrap();
        assert_eq!(batch_to_flows(&parquet_round_trip(&batch)).unwrap(), flows);
    }

    /// The datasets' columns are a public contract (docs/data-model.md): changing them is deliberate.
    #[test]
    fn schema_snapshot() {
        let describe = |s: SchemaRef| -> Vec<String> {
            s.fields()
                .iter()
                .map(|f| {
                    format!(
                        "{}:{}{}",
                        f.name(),
                        f.data_type(),
                        if f.is_nullable() { "?" } else { "" }
                    )
                })
                .collect()
        };
        assert_eq!(
            describe(events_schema()).join(" "),
            "ts:Timestamp(µs, \"UTC\") node:Utf8 seq:Int64 kind:Utf8 pid:Int32 comm:Utf8 \
             cgroup_id:Int64 sock_id:Int64 family:Utf8 local_addr:Utf8 local_port:Int32 \
             remote_addr:Utf8 remote_port:Int32 old_state:Utf8? new_state:Utf8? bytes:Int64? \
             srtt_us:Int32? snd_cwnd:Int32? role:Utf8? cgroup_path:Utf8? container_id:Utf8? \
             pod_uid:Utf8? systemd_unit:Utf8? pod_name:Utf8? pod_namespace:Utf8? \
             workload_kind:Utf8? workload_name:Utf8? k8s_node:Utf8?"
        );
        assert_eq!(
            describe(flows_schema()).join(" "),
            "window_start:Timestamp(µs, \"UTC\") window_end:Timestamp(µs, \"UTC\") node:Utf8 \
             pid:Int32 comm:Utf8 cgroup_id:Int64 family:Utf8 local_addr:Utf8 local_port:Int32 \
             remote_addr:Utf8 remote_port:Int32 bytes_sent:Int64 bytes_received:Int64 \
             retransmits:Int64 rtt_samples:Int64 rtt_min_us:Int32? rtt_p50_us:Int32? \
             rtt_p99_us:Int32? rtt_max_us:Int32? connections_opened:Int64 \
             connections_closed:Int64 resets:Int64 events:Int64 role:Utf8? cgroup_path:Utf8? \
             container_id:Utf8? pod_uid:Utf8? systemd_unit:Utf8? pod_name:Utf8? \
             pod_namespace:Utf8? workload_kind:Utf8? workload_name:Utf8? k8s_node:Utf8?"
        );
    }

    /// A batch as schema version 1 wrote it: the same values in unsigned columns.
    fn as_version_1(batch: &RecordBatch) -> RecordBatch {
        use arrow::array::{UInt16Array, UInt32Array, UInt64Array};
        let ports = ["local_port", "remote_port"];
        let mut fields = Vec::new();
        let mut cols: Vec<ArrayRef> = Vec::new();
        for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
            let (t, col): (DataType, ArrayRef) = match c.data_type() {
                DataType::Int64 => {
                    let a = c.as_any().downcast_ref::<Int64Array>().unwrap();
                    (
                        DataType::UInt64,
                        Arc::new(
                            a.iter()
                                .map(|v| v.map(|v| v as u64))
                                .collect::<UInt64Array>(),
                        ),
                    )
                }
                DataType::Int32 if ports.contains(&f.name().as_str()) => {
                    let a = c.as_any().downcast_ref::<Int32Array>().unwrap();
                    (
                        DataType::UInt16,
                        Arc::new(
                            a.iter()
                                .map(|v| v.map(|v| v as u16))
                                .collect::<UInt16Array>(),
                        ),
                    )
                }
                DataType::Int32 => {
                    let a = c.as_any().downcast_ref::<Int32Array>().unwrap();
                    (
                        DataType::UInt32,
                        Arc::new(
                            a.iter()
                                .map(|v| v.map(|v| v as u32))
                                .collect::<UInt32Array>(),
                        ),
                    )
                }
                other => (other.clone(), Arc::clone(c)),
            };
            fields.push(Field::new(f.name(), t, f.is_nullable()));
            cols.push(col);
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    }

    /// Files of schema version 1 (unsigned columns) read back as the same events and flows.
    #[test]
    fn version_1_files_read_back_the_same() {
        let (node, events, flows) = sample();
        let v1 = as_version_1(&events_to_batch(&node, &events).unwrap());
        assert!(v1.schema().field_with_name("seq").unwrap().data_type() == &DataType::UInt64);
        let back: Vec<Event> = batch_to_events(&parquet_round_trip(&v1))
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert_eq!(back, events);
        let v1 = as_version_1(&flows_to_batch(&flows).unwrap());
        assert_eq!(batch_to_flows(&parquet_round_trip(&v1)).unwrap(), flows);
    }

    #[test]
    fn addresses_are_written_as_their_standard_text() {
        let mut b = StringBuilder::new();
        let mut buf = String::new();
        let addrs: Vec<IpAddr> = [
            "0.0.0.0",
            "10.0.0.5",
            "127.0.0.1",
            "192.168.100.255",
            "255.9.99.100",
            "::1",
            "fd00::5",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        for a in &addrs {
            append_addr(&mut b, &mut buf, *a);
        }
        let got = b.finish();
        for (i, a) in addrs.iter().enumerate() {
            assert_eq!(got.value(i), a.to_string());
        }
    }

    #[test]
    fn malformed_batches_are_rejected_with_column_and_row() {
        let (node, events, _) = sample();
        let batch = events_to_batch(&node, &events[..3]).unwrap();
        let no_seq = batch.project(&[0, 1, 3]).unwrap();
        assert_eq!(
            batch_to_events(&no_seq).unwrap_err().to_string(),
            "column `seq` is missing"
        );
        // A local_addr that is not an address.
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        cols[9] = Arc::new(StringArray::from(vec!["10.0.0.5", "not-an-ip", "10.0.0.5"]));
        let bad = RecordBatch::try_new(events_schema(), cols).unwrap();
        let err = batch_to_events(&bad).unwrap_err().to_string();
        assert_eq!(
            err,
            "row 1: column `local_addr`: `not-an-ip` is not an IP address"
        );
    }

    /// Evolution rule: a file without a nullable column (an older version's file, read by a newer
    /// build) reads with that column null; a column this build does not know is ignored.
    #[test]
    fn older_and_wider_layouts_are_read_by_name() {
        let (_, _, flows) = sample();
        let batch = flows_to_batch(&flows).unwrap();
        let schema = batch.schema();
        // Without rtt_max_us, columns reordered, and an extra column at the front.
        let mut fields = vec![Arc::new(Field::new("future_col", DataType::Utf8, true))];
        let mut cols: Vec<ArrayRef> = vec![arrow::array::new_null_array(
            &DataType::Utf8,
            batch.num_rows(),
        )];
        for (i, f) in schema.fields().iter().enumerate().rev() {
            if f.name() != "rtt_max_us" {
                fields.push(Arc::clone(f));
                cols.push(Arc::clone(batch.column(i)));
            }
        }
        let old = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
        let back = batch_to_flows(&parquet_round_trip(&old)).unwrap();
        let expected: Vec<FlowRecord> = flows
            .iter()
            .map(|f| FlowRecord {
                rtt_max_us: None,
                ..f.clone()
            })
            .collect();
        assert_eq!(back, expected);
        // A required column is never filled in: its absence stays an error naming it.
        let no_bytes = batch
            .project(
                &(0..batch.num_columns())
                    .filter(|&i| schema.field(i).name() != "bytes_sent")
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        assert_eq!(
            batch_to_flows(&no_bytes).unwrap_err().to_string(),
            "column `bytes_sent` is missing"
        );
    }
}
