//! One Parquet file being written, its columns encoded in parallel.
//!
//! Encoding (dictionaries, statistics, zstd) is most of the sink's CPU, and `ArrowWriter` does it one
//! column after another on the calling thread: on two cores the event log was one serial stage. This
//! writer keeps parquet's own per-column encoders (`ArrowColumnWriter`, the parallel-encoding API
//! parquet documents) and spreads each batch's columns over the sink's [`Encoder`]. Row groups are
//! cut at exactly the configured row count, and the bytes are the ones `ArrowWriter` writes with the
//! same properties (same encoders, same Arrow schema in the footer): readers see no difference.
//!
//! With one core available (`taskset`, a CPU quota of one), or in a process capturing live traffic
//! (which must not take a second core from the workload it watches), it encodes on the calling thread.

use std::fs::File;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::arrow_writer::{
    compute_leaves, ArrowColumnWriter, ArrowLeafColumn, ArrowRowGroupWriterFactory,
};
use parquet::arrow::ArrowWriter;
use parquet::errors::{ParquetError, Result};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;

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
}

impl ParquetFile {
    /// A file encoding each batch's columns on `encoder`.
    pub fn try_new(
        file: File,
        schema: SchemaRef,
        props: WriterProperties,
        encoder: Encoder,
    ) -> Result<Self> {
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
        let mut group = self.writer.next_row_group()?;
        for writer in columns {
            writer.close()?.append_to_row_group(&mut group)?;
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
        let mut w = ArrowWriter::try_new(
            File::create(&reference).unwrap(),
            schema.clone(),
            Some(props.clone()),
        )
        .unwrap();
        for b in &batches {
            w.write(b).unwrap();
        }
        w.close().unwrap();

        for threads in [1, 2, 3] {
            let path = dir.path().join(format!("parallel-{threads}.parquet"));
            let mut f = ParquetFile::try_new(
                File::create(&path).unwrap(),
                schema.clone(),
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
}
