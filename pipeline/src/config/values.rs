//! Parsers for the value types settings share: sizes, bounded durations, times, output URLs and S3
//! endpoints. Each returns a reason phrased for the user; the caller names the setting.

use std::path::PathBuf;
use std::time::Duration;

/// Parses `128MiB`, `64MB`, `1GiB`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a number with an optional unit, e.g. 128MiB".to_string())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit `{other}` (use B, KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    n.checked_mul(mult).ok_or_else(|| "too large".to_string())
}

/// A size within `min..=max` (bytes).
pub fn size_within(text: &str, min: u64, max: u64) -> Result<u64, String> {
    let v = parse_size(text)?;
    if v < min || v > max {
        return Err(format!(
            "must be between {} and {}",
            human_size(min),
            human_size(max)
        ));
    }
    Ok(v)
}

fn human_size(b: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if b >= unit && b % unit == 0 {
            return format!("{}{name}", b / unit);
        }
    }
    format!("{b}B")
}

/// A duration like `30s`, `5m`, `1h 30m`, within `min..=max`. Every duration setting is bounded: an
/// absurd value (`18446744073709551615s`) is an error here, not an overflow later.
pub fn duration_within(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < min || d > max {
        return Err(format!(
            "must be between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// Microseconds since the epoch of an RFC 3339 time (1970 or later).
pub fn rfc3339_us(t: &str) -> Result<i64, String> {
    let since_epoch = humantime::parse_rfc3339(t)
        .map_err(|e| e.to_string())?
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "must be after 1970".to_string())?;
    i64::try_from(since_epoch.as_micros()).map_err(|_| "too far in the future".to_string())
}

/// What `--out` (or `--handoff`, or a replay's log) names.
#[derive(Debug, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    /// `s3://bucket/prefix`, split.
    S3 {
        bucket: String,
        prefix: String,
    },
}

/// Parses an output location: `s3://bucket[/prefix]`, or a local directory. Anything that looks like a
/// URL but is not exactly `s3://` (`S3://b`, `s3:/b`, `gs://b`, `file:///x`) is refused instead of
/// becoming a directory named `S3:` in the working directory.
pub fn location(text: &str) -> Result<Location, String> {
    if let Some(rest) = text.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.');
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
            return Err(
                "expected s3://bucket[/prefix] with a valid bucket name (3-63 characters: a-z 0-9 . -)"
                    .into(),
            );
        }
        return Ok(Location::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        });
    }
    if let Some((scheme, _)) = text.split_once(':') {
        let looks_like_url = !scheme.is_empty()
            && scheme.len() <= 16
            && scheme
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            && text[scheme.len() + 1..].starts_with('/');
        if looks_like_url {
            return Err(if scheme.eq_ignore_ascii_case("s3") {
                "an S3 URL is written s3://bucket/prefix (lowercase `s3`, two slashes); for a \
                 directory whose name has a colon, write ./ in front"
                    .into()
            } else {
                format!(
                    "`{scheme}:` is not a supported store: use a directory or s3://bucket/prefix (for \
                     a directory whose name has a colon, write ./ in front)"
                )
            });
        }
    }
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(Location::Dir(PathBuf::from(text)))
}

/// `http(s)://HOST[:PORT][/]`: caught here, a typo is one error line instead of minutes of retries.
/// Credentials in the URL are refused (they belong in the AWS credential chain), and the error shows the
/// URL without them.
pub fn check_endpoint(ep: &str) -> Result<(), String> {
    let bad = "expected http://HOST[:PORT] or https://HOST[:PORT]";
    let rest = ep
        .strip_prefix("http://")
        .or_else(|| ep.strip_prefix("https://"))
        .ok_or(bad)?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('@') {
        return Err(
            "credentials do not belong in the endpoint URL: give them through the AWS \
             credential chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or a role)"
                .into(),
        );
    }
    let (host, port) = match authority.rsplit_once(':') {
        // Bracketed IPv6 literals contain colons of their own.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (authority, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(bad.into())
    }
}

/// A URL fit for logs and errors: credentials (`user:password@`, `token@`) become `***@`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("64MB"), Ok(64_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("5 lightyears").is_err());
        assert_eq!(
            size_within("1KiB", 1 << 20, 1 << 30).unwrap_err(),
            "must be between 1MiB and 1GiB"
        );
    }

    #[test]
    fn durations_are_bounded() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(86_400));
        assert_eq!(
            duration_within("5m", min, max).unwrap(),
            Duration::from_secs(300)
        );
        for bad in [
            "18446744073709551615s",
            "300000000000y",
            "1000y",
            "0s",
            "soon",
        ] {
            assert!(duration_within(bad, min, max).is_err(), "{bad}");
        }
    }

    #[test]
    fn locations() {
        assert_eq!(
            location("s3://my-bucket/a/b/").unwrap(),
            Location::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            location("./S3:/x").unwrap(),
            Location::Dir(PathBuf::from("./S3:/x"))
        );
        assert_eq!(
            location("data/a:b").unwrap(),
            Location::Dir(PathBuf::from("data/a:b"))
        );
        for bad in [
            "S3://bkt/p",
            "s3:/bkt/p",
            "gs://b/p",
            "file:///tmp/x",
            "s3://",
            "s3://B_ad/x",
            "s3://ab",
            "",
        ] {
            assert!(location(bad).is_err(), "{bad}");
        }
        assert!(location("S3://bkt/p").unwrap_err().contains("lowercase"));
    }

    #[test]
    fn s3_endpoints_are_checked_before_anything_runs() {
        for ok in [
            "http://127.0.0.1:9000",
            "https://s3.eu-west-1.amazonaws.com",
            "http://minio.local:9000/",
            "http://[::1]:9000",
        ] {
            check_endpoint(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "127.0.0.1:9000",
            "ht!tp://x",
            "http://bad host",
            "http://",
            "http://h:0",
            "http://h:99999",
            "ftp://h",
        ] {
            let e = check_endpoint(bad).unwrap_err();
            assert!(e.contains("expected http://HOST[:PORT]"), "{bad}: {e}");
        }
        let e = check_endpoint("http://user:pw@h:9000").unwrap_err();
        assert!(e.contains("credentials") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn credentials_never_reach_logs() {
        assert_eq!(
            redact_url("nats://u:s3cret@10.0.0.1:4222"),
            "nats://***@10.0.0.1:4222"
        );
        assert_eq!(redact_url("nats://tok@h:4222/x@y"), "nats://***@h:4222/x@y");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("weird"), "weird");
    }
}
