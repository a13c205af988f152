//! Data file names. A name says whose rows a file holds and which stretch of the stream, so readers
//! need no side records: `<producer>-<first>-<last>-<tag>.parquet`, where first/last are event `seq`s
//! (events) or window starts in microseconds (flows), zero-padded so names sort in stream order, and the
//! tag makes the name unique (`n<commit number>` for a producer's commit, `c<id>` for compaction).
//! Producer names may contain `-`: names are parsed from the right.

/// What a data file's name says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileName {
    pub producer: String,
    pub first: i64,
    pub last: i64,
    pub tag: String,
}

/// Formats a file name (without directory).
pub fn format(producer: &str, first: i64, last: i64, tag: &str) -> String {
    format!("{producer}-{}-{}-{tag}.parquet", pad(first), pad(last))
}

/// Non-negative values as 20 digits (sorting as text sorts by value); negative window starts (before
/// 1970) keep a leading `m`.
fn pad(v: i64) -> String {
    if v < 0 {
        format!("m{:019}", v.unsigned_abs())
    } else {
        format!("{v:020}")
    }
}

fn unpad(s: &str) -> Option<i64> {
    match s.strip_prefix('m') {
        Some(rest) => rest.parse::<i64>().ok().map(|v| -v),
        None => s.parse().ok(),
    }
}

/// Parses a name made by [`format`]; `None` for any other file.
pub fn parse(name: &str) -> Option<FileName> {
    let stem = name.strip_suffix(".parquet")?;
    let mut parts = stem.rsplitn(4, '-');
    let tag = parts.next()?;
    let last = unpad(parts.next()?)?;
    let first = unpad(parts.next()?)?;
    let producer = parts.next()?;
    if producer.is_empty() || tag.is_empty() {
        return None;
    }
    Some(FileName {
        producer: producer.to_string(),
        first,
        last,
        tag: tag.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_in_stream_order() {
        for (p, a, b, t) in [
            ("node-1", 0, 4095, "n1"),
            (
                "web-1-agg-0",
                1_767_225_600_000_000,
                1_767_225_610_000_000,
                "n17",
            ),
            ("agg-3", -10_000_000, -1, "c00ab"),
        ] {
            let n = format(p, a, b, t);
            assert_eq!(
                parse(&n),
                Some(FileName {
                    producer: p.into(),
                    first: a,
                    last: b,
                    tag: t.into()
                }),
                "{n}"
            );
        }
        assert!(format("n", 9, 10, "n1") < format("n", 10, 11, "n2"));
        assert_eq!(parse("part-0001.parquet"), None);
        assert_eq!(parse("x.json"), None);
    }
}
