//! UTC calendar arithmetic for partition paths, without a date-time dependency; the wall clock.

/// Wall-clock time now, µs since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// `(year, month, day, hour)` of a timestamp in µs since the epoch, UTC.
pub fn utc_date_hour(ts_us: i64) -> (i32, u32, u32, u32) {
    let secs = ts_us.div_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let hour = (secs.rem_euclid(86_400) / 3_600) as u32;
    let (y, m, d) = civil_from_days(days);
    (y, m, d, hour)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    ((y + i64::from(m <= 2)) as i32, m, d)
}

/// RFC 3339 text of a timestamp in µs (for logs and summaries).
pub fn rfc3339(ts_us: i64) -> String {
    let (y, mo, d, h) = utc_date_hour(ts_us);
    let secs = ts_us.div_euclid(1_000_000).rem_euclid(3_600);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{:02}:{:02}Z",
        secs / 60,
        secs % 60
    )
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
