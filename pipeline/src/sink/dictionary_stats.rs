//! Column-chunk statistics of the string columns the sink hands the Parquet writer as dictionaries.
//!
//! Parquet's writer finds a string column's min and max by comparing every row's value with both
//! (a pod's cgroup path is ~190 bytes, and most rows hold one equal to the min or max, so each compare
//! runs to the end): about a tenth of the sink's CPU on events of pods. The sink builds the columns
//! whose values come from a shared cgroup or pod as dictionaries
//! ([`crate::event::schema::events_file_batch_schema`]), so their min and max are those of the few
//! values the keys use. For those columns the writer's own statistics are turned off, and this puts
//! what it would have recorded for the column chunk in their metadata: min, max and null count
//! (truncated as the writer truncates them, `statistics_truncate_length`), the values' unencoded
//! bytes and the definition-level histogram, which a unit test holds against `ArrowWriter`'s. What
//! those columns lose is the column index (per-page min and max): engines that skip pages by it
//! (Spark, Trino, DataFusion) skip none in them; row groups are still skipped by the chunk statistics.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, Schema};
use parquet::arrow::arrow_writer::ArrowColumnChunk;
use parquet::data_type::ByteArray;
use parquet::errors::{ParquetError, Result};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::statistics::{Statistics, ValueStatistics};
use parquet::schema::types::ColumnPath;

/// The dictionary columns of one file and what its open row group holds in them.
#[derive(Debug)]
pub struct DictionaryStats {
    columns: Vec<Column>,
    truncate: Option<usize>,
}

#[derive(Debug)]
struct Column {
    /// Index in the (flat) schema: the leaf column.
    leaf: usize,
    /// Whether rows may be null (the column has definition levels).
    nullable: bool,
    min: Option<String>,
    max: Option<String>,
    nulls: u64,
    rows: u64,
    /// The non-null rows' value bytes.
    bytes: i64,
}

impl DictionaryStats {
    /// The columns a file of `file` receives from batches of `batches` as dictionaries of strings
    /// where the file holds strings, and `props` with the writer's statistics off for them. Only flat
    /// schemas (a field is a leaf) are looked at; any other file keeps the writer's statistics.
    pub fn plan(
        file: &Schema,
        batches: &Schema,
        props: WriterProperties,
    ) -> Result<(Self, WriterProperties)> {
        if file.fields().len() != batches.fields().len() {
            return Err(ParquetError::General(format!(
                "batches of {} columns for a file of {}",
                batches.fields().len(),
                file.fields().len()
            )));
        }
        let flat = file.fields().iter().all(|f| !f.data_type().is_nested());
        let mut columns = Vec::new();
        let mut builder = None;
        for (leaf, (f, b)) in file.fields().iter().zip(batches.fields()).enumerate() {
            let dictionary = matches!(
                (f.data_type(), b.data_type()),
                (DataType::Utf8, DataType::Dictionary(k, v))
                    if **k == DataType::Int32 && **v == DataType::Utf8
            );
            if !flat || !dictionary {
                continue;
            }
            columns.push(Column {
                leaf,
                nullable: f.is_nullable(),
                min: None,
                max: None,
                nulls: 0,
                rows: 0,
                bytes: 0,
            });
            builder = Some(
                builder
                    .unwrap_or_else(|| props.clone().into_builder())
                    .set_column_statistics_enabled(
                        ColumnPath::from(f.name().as_str()),
                        EnabledStatistics::None,
                    ),
            );
        }
        let truncate = props.statistics_truncate_length();
        let props = builder.map_or(props, |b| b.build());
        Ok((DictionaryStats { columns, truncate }, props))
    }

    /// Folds `batch`'s rows into the open row group's statistics: per column, one pass over the keys
    /// and one compare per dictionary value they use.
    pub fn observe(&mut self, batch: &RecordBatch) -> Result<()> {
        for c in &mut self.columns {
            let array = batch.column(c.leaf);
            let Some(dict) = array.as_dictionary_opt::<Int32Type>() else {
                return Err(ParquetError::General(format!(
                    "column {} is {}, not a dictionary of strings",
                    c.leaf,
                    array.data_type()
                )));
            };
            let Some(values) = dict.values().as_string_opt::<i32>() else {
                return Err(ParquetError::General(format!(
                    "column {}'s dictionary holds {}, not strings",
                    c.leaf,
                    dict.values().data_type()
                )));
            };
            // Rows per dictionary value: the values used, and their bytes.
            let mut rows = vec![0u64; values.len()];
            for key in dict.keys().iter() {
                match key {
                    Some(k) => rows[k as usize] += 1,
                    None => c.nulls += 1,
                }
            }
            c.rows += dict.len() as u64;
            for (i, &n) in rows.iter().enumerate().filter(|(_, n)| **n > 0) {
                // A null value in the dictionary makes its rows null.
                if values.is_null(i) {
                    c.nulls += n;
                    continue;
                }
                let v = values.value(i);
                c.bytes += n as i64 * v.len() as i64;
                if c.min.as_deref().is_none_or(|m| v < m) {
                    c.min = Some(v.to_string());
                }
                if c.max.as_deref().is_none_or(|m| v > m) {
                    c.max = Some(v.to_string());
                }
            }
        }
        Ok(())
    }

    /// Puts the open row group's statistics into its closed column chunks (one per leaf, in order),
    /// and starts the next row group's.
    pub fn seal(&mut self, chunks: &mut [ArrowColumnChunk]) -> Result<()> {
        for c in &mut self.columns {
            let stats = chunk_statistics(c.min.take(), c.max.take(), c.nulls, self.truncate);
            // A flat nullable column's definition levels: 0 for a null row, 1 for a value (a required
            // column has none).
            let levels = c
                .nullable
                .then(|| vec![c.nulls as i64, (c.rows - c.nulls) as i64].into());
            let bytes = c.bytes;
            (c.nulls, c.rows, c.bytes) = (0, 0, 0);
            let chunk = chunks.get_mut(c.leaf).ok_or_else(|| {
                ParquetError::General(format!("no column chunk {} to put statistics in", c.leaf))
            })?;
            let close = chunk.close_mut();
            close.metadata = close
                .metadata
                .clone()
                .into_builder()
                .set_statistics(stats)
                .set_unencoded_byte_array_data_bytes(Some(bytes))
                .set_definition_level_histogram(levels)
                .build()?;
        }
        Ok(())
    }
}

/// What parquet's column writer records for a string column chunk with these min, max and nulls.
fn chunk_statistics(
    min: Option<String>,
    max: Option<String>,
    nulls: u64,
    truncate: Option<usize>,
) -> Statistics {
    // A bound longer than `truncate` is cut (and, for the max, incremented) when it can be, and then
    // no longer exact.
    let bound = |value: Option<String>, cut: fn(&str, usize) -> Option<Vec<u8>>| match value {
        Some(v) => match truncate.filter(|l| v.len() > *l).and_then(|l| cut(&v, l)) {
            Some(t) => (Some(t), false),
            None => (Some(v.into_bytes()), true),
        },
        None => (None, false),
    };
    let (min, min_exact) = bound(min, truncate_utf8);
    let (max, max_exact) = bound(max, truncate_and_increment_utf8);
    let has = min.is_some();
    let stats = ValueStatistics::new(
        min.map(ByteArray::from),
        max.map(ByteArray::from),
        None,
        Some(nulls),
        false,
    );
    // Without values the writer leaves the exactness flags as `new` sets them.
    Statistics::ByteArray(if has {
        stats
            .with_min_is_exact(min_exact)
            .with_max_is_exact(max_exact)
    } else {
        stats
    })
}

// The three functions below are parquet's own (`column::writer`, private there), so the bounds are
// the bytes its writer would record.

/// The longest prefix of `data` of at most `length` bytes that ends on a character boundary.
fn truncate_utf8(data: &str, length: usize) -> Option<Vec<u8>> {
    let split = (1..=length).rfind(|x| data.is_char_boundary(*x))?;
    Some(data.as_bytes()[..split].to_vec())
}

/// An upper bound of `data` of at most `length` bytes: a prefix with its last character incremented.
fn truncate_and_increment_utf8(data: &str, length: usize) -> Option<Vec<u8>> {
    let lower_bound = length.saturating_sub(3);
    let split = (lower_bound..=length).rfind(|x| data.is_char_boundary(*x))?;
    increment_utf8(data.get(..split)?)
}

fn increment_utf8(data: &str) -> Option<Vec<u8>> {
    for (idx, original_char) in data.char_indices().rev() {
        let original_len = original_char.len_utf8();
        if let Some(next_char) = char::from_u32(original_char as u32 + 1) {
            if next_char.len_utf8() == original_len {
                let mut result = data.as_bytes()[..idx + original_len].to_vec();
                next_char.encode_utf8(&mut result[idx..]);
                return Some(result);
            }
        }
    }
    None
}
