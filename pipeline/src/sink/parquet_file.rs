//! One Parquet file being written, its columns encoded in parallel.
//!
//! Encoding (dictionaries, statistics, zstd) is most of the sink's CPU, and `ArrowWriter` does it one
//! column after another on the calling thread: on two cores the event log was one serial stage. This
//! writer keeps parquet's own per-column encoders (`ArrowColumnWriter`, the parallel-encoding API
//! parquet documents) and spreads each batch's columns over the sink's [`Encoder`]. Row groups are
//! cut at exactly the configured row count, and the bytes are the ones `ArrowWriter` writes with the
//! same properties (same encoders, same Arrow schema in the footer): readers see no difference.
//!
//! String columns the batches hold as dictionaries (see [`super::dictionary_stats`]) get their
//! column-chunk statistics from the dictionary instead of from every row. For those the rows are the
//! same as `ArrowWriter`'s from strings but the bytes are not: they have no column index, and a
//! column chunk whose dictionary outgrows the dictionary page limit (thousands of distinct ~190-byte
//! cgroup paths in one row group) falls back to plain encoding at another row.
//!
//! With one core available (`taskset`, a CPU quota of one), or in a process capturing live traffic
//! (which must not take a second core from the workload it watches), it encodes on the calling thread.

use std::fs::File;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use parquet::arrow::arrow_writer::{
    compute_leaves, ArrowColumnWriter, ArrowLeafColumn, ArrowRowGroupWriterFactory,
};
use parquet::arrow::ArrowWriter;
use parquet::errors::{ParquetError, Result};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;

use super::dictionary_stats::DictionaryStats;
use super::encoder::Encoder;

/// A Parquet file open for writing.
pub struct ParquetFile {
    writer: SerializedFileWriter<File>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    /// The open row group's column encoders (one per leaf column), and its rows so far.
    columns: Vec<ArrowColumnWriter>,
    group_rows: usize,
    groups: usize,
    max_group_rows: usize,
    encoder: Encoder,
    dictionaries: DictionaryStats,
}

impl ParquetFile {
    /// A file of `schema`, written from batches of `batch_schema` (the same columns; strings may come
    /// as dictionaries), encoding each batch's columns on `encoder`.
    pub fn try_new(
        file: File,
        schema: SchemaRef,
        batch_schema: &Schema,
        props: WriterProperties,
        encoder: Encoder,
    ) -> Result<Self> {
        let (dictionaries, props) = DictionaryStats::plan(&schema, batch_schema, props)?;
        let max_group_rows = props
            .max_row_group_row_count()
            .unwrap_or(1024 * 1024)
            .max(1);
        // ArrowWriter sets the file up exactly as it would (Arrow schema in the footer, properties),
        // then hands over its low-level writer.
        let (writer, factory) =
            ArrowWriter::try_new(file, schema.clone(), Some(props))?.into_serialized_writer()?;
        let columns = factory.create_column_writers(0)?;
        Ok(ParquetFile {
            writer,
            factory,
            schema,
            columns,
            group_rows: 0,
            groups: 0,
            max_group_rows,
            encoder,
            dictionaries,
        })
    }

    /// Encodes `batch`, cutting row groups at the configured row count.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let take = (self.max_group_rows - self.group_rows).min(batch.num_rows() - offset);
            self.encode(&batch.slice(offset, take))?;
            self.group_rows += take;
            offset += take;
            if self.group_rows >= self.max_group_rows {
                self.flush_group()?;
            }
        }
        Ok(())
    }

    /// Encodes one slice into the open row group, columns spread over the threads.
    fn encode(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut leaves: Vec<ArrowLeafColumn> = Vec::with_capacity(self.columns.len());
        for (field, array) in self.schema.fields().iter().zip(batch.columns()) {
            leaves.extend(compute_leaves(field, array)?);
        }
        if leaves.len() != self.columns.len() {
            return Err(ParquetError::General(format!(
                "{} leaf columns for {} column writers",
                leaves.len(),
                self.columns.len()
            )));
        }
        self.dictionaries.observe(batch)?;
        self.encoder.zip_mut(
            batch.num_rows(),
            &mut self.columns,
            &leaves,
            |writer, leaf| writer.write(leaf),
        )
    }

    /// Closes the open row group into the file and starts the next.
    fn flush_group(&mut self) -> Result<()> {
        if self.group_rows == 0 {
            return Ok(());
        }
        self.groups += 1;
        let next = self.factory.create_column_writers(self.groups)?;
        let columns = std::mem::replace(&mut self.columns, next);
        let mut chunks = columns
            .into_iter()
            .map(ArrowColumnWriter::close)
            .collect::<Result<Vec<_>>>()?;
        self.dictionaries.seal(&mut chunks)?;
        let mut group = self.writer.next_row_group()?;
        for chunk in chunks {
            chunk.append_to_row_group(&mut group)?;
        }
        group.close()?;
        self.group_rows = 0;
        Ok(())
    }

    /// Bytes in the file so far plus the open row group's estimated encoded size.
    pub fn size(&self) -> u64 {
        let open: usize = self
            .columns
            .iter()
            .map(|c| c.get_estimated_total_bytes())
            .sum();
        (self.writer.bytes_written() + open) as u64
    }

    /// Writes the last row group and the footer; returns the file.
    pub fn finish(mut self) -> Result<File> {
        self.flush_group()?;
        self.writer.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn batch(schema: &SchemaRef, from: i64, n: i64) -> RecordBatch {
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(from..from + n));
        let names: ArrayRef = Arc::new(StringArray::from_iter_values(
            (from..from + n).map(|i| format!("name-{}", i % 7)),
        ));
        let mut columns = vec![ids, names];
        for c in 2..schema.fields().len() {
            columns.push(Arc::new(Int64Array::from_iter_values(
                (from..from + n).map(|i| i * c as i64),
            )));
        }
        RecordBatch::try_new(schema.clone(), columns).unwrap()
    }

    /// `batches` written to `path` by parquet's own `ArrowWriter`: the reference.
    fn arrow_writer_file(
        path: &std::path::Path,
        schema: &SchemaRef,
        props: &WriterProperties,
        batches: impl IntoIterator<Item = RecordBatch>,
    ) {
        let file = File::create(path).unwrap();
        let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props.clone())).unwrap();
        for b in batches {
            w.write(&b).unwrap();
        }
        w.close().unwrap();
    }

    /// Same rows, row groups and bytes as `ArrowWriter` with the same properties, on any thread count.
    #[test]
    fn writes_what_arrow_writer_writes_with_columns_in_parallel() {
        let mut fields = vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, false),
        ];
        fields.extend((2..8).map(|i| Field::new(format!("c{i}"), DataType::Int64, false)));
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        let props = crate::lake::format::writer_properties("test", 5_000);
        let dir = tempfile::tempdir().unwrap();
        let batches: Vec<RecordBatch> = [(0, 3_000), (3_000, 4_096), (7_096, 10), (7_106, 9_000)]
            .iter()
            .map(|(from, n)| batch(&schema, *from, *n))
            .collect();

        let reference = dir.path().join("reference.parquet");
        arrow_writer_file(&reference, &schema, &props, batches.iter().cloned());

        for threads in [1, 2, 3] {
            let path = dir.path().join(format!("parallel-{threads}.parquet"));
            let mut f = ParquetFile::try_new(
                File::create(&path).unwrap(),
                schema.clone(),
                &schema,
                props.clone(),
                Encoder::new(threads),
            )
            .unwrap();
            for b in &batches {
                f.write(b).unwrap();
            }
            assert!(f.size() > 0);
            f.finish().unwrap().sync_all().unwrap();
            assert_eq!(
                std::fs::read(&path).unwrap(),
                std::fs::read(&reference).unwrap(),
                "{threads} threads: the same bytes as ArrowWriter"
            );
            let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap())
                .unwrap()
                .build()
                .unwrap();
            let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
            assert_eq!(rows, 16_106);
        }
    }

    /// Events as the sink writes them (identity columns as dictionaries, their chunk statistics from
    /// the dictionary) read back as the rows `ArrowWriter` writes from strings, and every column chunk
    /// carries `ArrowWriter`'s statistics: min and max truncated the same way (cgroup paths are longer
    /// than the 64 bytes kept), null counts, value bytes and level histograms, a row group with no
    /// owners at all. (Only the column index of those columns is not written.)
    #[test]
    fn dictionary_columns_get_the_statistics_arrow_writer_computes_row_by_row() {
        use crate::capture::synthetic::{Synthetic, SyntheticConfig};
        use crate::event::schema::{
            events_file_batch_schema, events_schema, events_to_batch, events_to_file_batch_on,
        };
        use crate::event::Cgroup;

        let mut src = Synthetic::new(
            "node-a".into(),
            SyntheticConfig {
                seed: 5,
                total: 30_000,
                start_us: 1_767_225_600_000_000,
                events_per_sim_sec: 2_000,
            },
        );
        let batch = src.next_batch(30_000).unwrap();
        let mut events = batch.events;
        // The first row group has no owner at all; some rows later have none, and some have an owner
        // whose path is not ASCII, so truncation must keep whole characters.
        for e in &mut events[..7_000] {
            e.cgroup = None;
            e.pod = None;
        }
        for e in &mut events[10_000..12_000] {
            e.cgroup = None;
        }
        let odd = Cgroup::new(&format!("/system.slice/{}é€.service", "ü".repeat(40)));
        for e in events[20_000..20_500].iter_mut() {
            e.cgroup = Some(odd.clone());
        }
        assert!(events.iter().any(|e| e.pod.is_some()), "some rows in pods");

        let schema = events_schema();
        let props = crate::lake::format::writer_properties("events", 7_000);
        let dir = tempfile::tempdir().unwrap();
        let reference = dir.path().join("reference.parquet");
        let plain = events
            .chunks(4_096)
            .map(|chunk| events_to_batch(&batch.node, chunk).unwrap());
        arrow_writer_file(&reference, &schema, &props, plain);
        let read = |path: &std::path::Path| {
            let b = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
            let meta = b.metadata().clone();
            let rows: Vec<RecordBatch> = b.build().unwrap().map(Result::unwrap).collect();
            (
                meta,
                arrow::compute::concat_batches(&schema, &rows).unwrap(),
            )
        };
        let (want_meta, want_rows) = read(&reference);

        for threads in [1, 2] {
            let path = dir.path().join(format!("sink-{threads}.parquet"));
            let mut f = ParquetFile::try_new(
                File::create(&path).unwrap(),
                schema.clone(),
                &events_file_batch_schema(),
                props.clone(),
                Encoder::new(threads),
            )
            .unwrap();
            for chunk in events.chunks(4_096) {
                let b = events_to_file_batch_on(Encoder::new(threads), &batch.node, chunk).unwrap();
                f.write(&b).unwrap();
            }
            f.finish().unwrap().sync_all().unwrap();
            let (meta, rows) = read(&path);
            assert_eq!(rows, want_rows, "{threads} threads: the same rows");
            assert_eq!(meta.num_row_groups(), want_meta.num_row_groups());
            let mut truncated = 0;
            for (g, (got, want)) in meta
                .row_groups()
                .iter()
                .zip(want_meta.row_groups())
                .enumerate()
            {
                for (c, (got, want)) in got.columns().iter().zip(want.columns()).enumerate() {
                    let name = schema.field(c).name();
                    assert_eq!(
                        got.statistics(),
                        want.statistics(),
                        "row group {g}, column {name}"
                    );
                    assert_eq!(got.num_values(), want.num_values(), "{g} {name}");
                    assert_eq!(
                        got.encodings().collect::<Vec<_>>(),
                        want.encodings().collect::<Vec<_>>(),
                        "{g} {name}"
                    );
                    assert_eq!(
                        got.unencoded_byte_array_data_bytes(),
                        want.unencoded_byte_array_data_bytes(),
                        "{g} {name}"
                    );
                    assert_eq!(
                        got.definition_level_histogram(),
                        want.definition_level_histogram(),
                        "{g} {name}"
                    );
                    assert_eq!(
                        got.repetition_level_histogram(),
                        want.repetition_level_histogram(),
                        "{g} {name}"
                    );
                    if got.statistics().is_some_and(|s| !s.max_is_exact()) {
                        truncated += 1;
                    }
                }
            }
            assert!(truncated > 0, "some statistics were truncated");
            let first = &meta.row_groups()[0];
            let path_col = schema.index_of("cgroup_path").unwrap();
            let stats = first.column(path_col).statistics().unwrap();
            assert_eq!(stats.null_count_opt(), Some(7_000), "a row group of nulls");
            assert!(stats.min_bytes_opt().is_none());
        }
    }
}
