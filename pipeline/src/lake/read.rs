//! Reading committed Parquet files back (replay, restart, compaction), with the schema version check.
//!
//! Schema evolution rules (docs/data-model.md): versions only add nullable columns or, as version 2 did,
//! change a column to the lake-standard type of the same values; a reader accepts every file of its own
//! version or older (a column the file lacks reads as null, an older type is converted) and refuses a
//! newer one with an error that says so, because it cannot know what the new columns mean.

use bytes::Bytes;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::metadata::KeyValue;

use crate::event::schema::{SCHEMA_VERSION, SCHEMA_VERSION_KEY};
use crate::storage::{Store, StoreError};

/// Why a committed file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("committed file `{key}` is missing from the store")]
    Missing { key: String },
    #[error("reading committed file `{key}`")]
    Decode {
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "`{key}` has schema version {found}; this tcplake reads versions up to {SCHEMA_VERSION}: \
         upgrade tcplake to read it"
    )]
    Newer { key: String, found: u32 },
    #[error("`{key}` is not a tcplake file: {reason}")]
    Foreign { key: String, reason: String },
}

/// The schema version a file's metadata declares, if it is one this build reads.
pub fn check_version(key: &str, kv: Option<&Vec<KeyValue>>) -> Result<u32, ReadError> {
    let foreign = |reason: String| ReadError::Foreign {
        key: key.to_string(),
        reason,
    };
    let value = kv
        .into_iter()
        .flatten()
        .find(|k| k.key == SCHEMA_VERSION_KEY)
        .and_then(|k| k.value.as_deref())
        .ok_or_else(|| foreign(format!("no `{SCHEMA_VERSION_KEY}` in its metadata")))?;
    let found: u32 = value
        .parse()
        .map_err(|_| foreign(format!("schema version `{value}` is not a number")))?;
    if found > SCHEMA_VERSION {
        return Err(ReadError::Newer {
            key: key.to_string(),
            found,
        });
    }
    Ok(found)
}

/// Opens committed Parquet bytes for reading in batches of `batch` rows, after the version check.
pub fn open_bytes(
    key: &str,
    bytes: Vec<u8>,
    batch: usize,
) -> Result<ParquetRecordBatchReader, ReadError> {
    let decode = |e: parquet::errors::ParquetError| ReadError::Decode {
        key: key.to_string(),
        source: e.into(),
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes)).map_err(decode)?;
    check_version(key, builder.metadata().file_metadata().key_value_metadata())?;
    builder
        .with_batch_size(batch.max(1))
        .build()
        .map_err(decode)
}

/// Fetches the committed file `key` and opens it (see [`open_bytes`]).
pub async fn open(
    store: &Store,
    key: &str,
    batch: usize,
) -> Result<ParquetRecordBatchReader, ReadError> {
    let bytes = store.get(key).await?.ok_or_else(|| ReadError::Missing {
        key: key.to_string(),
    })?;
    open_bytes(key, bytes, batch)
}

/// Decoding one batch of an opened file failed.
pub fn batch_error(key: &str, e: arrow::error::ArrowError) -> ReadError {
    ReadError::Decode {
        key: key.to_string(),
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(v: &str) -> Vec<KeyValue> {
        vec![KeyValue::new(SCHEMA_VERSION_KEY.to_string(), v.to_string())]
    }

    #[test]
    fn versions_up_to_ours_are_read_and_others_refused_by_name() {
        for v in 1..=3 {
            assert_eq!(check_version("k", Some(&kv(&v.to_string()))).unwrap(), v);
        }
        let newer = check_version("a.parquet", Some(&kv("4"))).unwrap_err();
        assert!(
            matches!(newer, ReadError::Newer { found: 4, .. }),
            "{newer}"
        );
        assert!(newer
            .to_string()
            .starts_with("`a.parquet` has schema version 4"));
        for bad in [check_version("k", None), check_version("k", Some(&kv("x")))] {
            assert!(matches!(bad, Err(ReadError::Foreign { .. })));
        }
    }
}
