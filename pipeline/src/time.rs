//! UTC calendar work for partition paths and messages (chrono), and the wall clock.

use chrono::{DateTime, Datelike, Timelike, Utc};

/// Wall-clock time now, µs since the Unix epoch.
pub fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

/// The UTC instant of `ts_us` (µs since the epoch); beyond chrono's range (±262 000 years, which
/// only a corrupt timestamp reaches) the nearest end of it.
fn utc(ts_us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(ts_us).unwrap_or(if ts_us < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

/// `(year, month, day, hour)` of a timestamp in µs since the epoch, UTC.
pub fn utc_date_hour(ts_us: i64) -> (i32, u32, u32, u32) {
    let t = utc(ts_us);
    (t.year(), t.month(), t.day(), t.hour())
}

/// RFC 3339 text of a timestamp in µs, to the second (for logs and summaries).
pub fn rfc3339(ts_us: i64) -> String {
    utc(ts_us).format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A Hive partition: one UTC hour.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition {
    pub year: i32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
}

impl Partition {
    pub fn of(ts_us: i64) -> Self {
        let (year, month, day, hour) = utc_date_hour(ts_us);
        Partition {
            year,
            month,
            day,
            hour,
        }
    }

    /// `YYYY-MM-DD`, the `date` partition value.
    pub fn date(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// `date=YYYY-MM-DD/hour=HH`
    pub fn path(&self) -> String {
        format!(
            "date={:04}-{:02}-{:02}/hour={:02}",
            self.year, self.month, self.day, self.hour
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(utc_date_hour(0), (1970, 1, 1, 0));
        // 2026-01-01T00:00:00Z
        assert_eq!(utc_date_hour(1_767_225_600_000_000), (2026, 1, 1, 0));
        // 2024-02-29T23:59:59.999999Z (leap day)
        assert_eq!(utc_date_hour(1_709_251_199_999_999), (2024, 2, 29, 23));
        assert_eq!(utc_date_hour(-1), (1969, 12, 31, 23));
        // A corrupt timestamp still names a partition (the nearest representable one).
        assert_eq!(utc_date_hour(i64::MAX).1, 12);
        assert_eq!(utc_date_hour(i64::MIN).1, 1);
        assert_eq!(
            rfc3339(1_767_225_600_000_000 + 3_723_000_000),
            "2026-01-01T01:02:03Z"
        );
    }

    #[test]
    fn agrees_with_the_system_clock_formatting() {
        // humantime formats SystemTime as RFC 3339: cross-check a spread of instants.
        for secs in (0..4_000_000_000i64).step_by(97_654_321) {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64);
            let expected = humantime::format_rfc3339_seconds(t).to_string();
            assert_eq!(rfc3339(secs * 1_000_000), expected);
        }
    }
}
