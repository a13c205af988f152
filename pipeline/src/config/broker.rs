//! The broker's settings: its URL, stream limits, and credentials the way NATS users give them — in
//! the URL (`nats://user:password@host`, `nats://token@host`), as user + password, a token, a `.creds`
//! file (JWT + NKey), or an NKey seed file. Secret values come from files or environment variables, not
//! flags (a command line is visible to every user of the host), and are held as [`Secret`].

use std::path::PathBuf;
use std::time::Duration;

use super::keys::{self, Key};
use super::values::{duration_within, parse_size, redact_url};
use super::{invalid, required, Broker, ConfigError};
use crate::edge::broker::{BrokerAuth, BrokerSettings, MAX_PARTITIONS};
use crate::secrets::Secret;

/// Environment variables that hold broker secrets themselves (no flag: see the module doc).
pub const PASSWORD_ENV: &str = "TCPLAKE_BROKER_PASSWORD";
pub const TOKEN_ENV: &str = "TCPLAKE_BROKER_TOKEN";

/// The largest a broker message can get for batches of `batch_size` events: the wire format's fixed
/// part plus the widest event (a name of the longest length JetStream subjects allow is not counted:
/// node names are at most 64 bytes). Used to check stream limits against the batch size.
pub fn max_message_bytes(batch_size: usize) -> u64 {
    const HEADER_AND_NODE: u64 = 12 + 2 + 64 + 32;
    const EVENT: u64 = 128;
    HEADER_AND_NODE + EVENT * batch_size as u64
}

pub(super) fn settings(
    file: &Broker,
    batch_size: usize,
) -> Result<Option<BrokerSettings>, ConfigError> {
    let Some(raw) = file.url.clone() else {
        return Ok(None);
    };
    let (url, url_auth) = split_url(&raw)?;
    let size = required(&file.max_bytes, &keys::BROKER_MAX_BYTES)?;
    let max_bytes = parse_size(&size).map_err(|e| invalid(&keys::BROKER_MAX_BYTES, &size, e))?;
    // JetStream refuses a message larger than the stream: the smallest useful stream holds a few of
    // the largest messages this batch size can make.
    let floor = (8 << 20).max(4 * max_message_bytes(batch_size));
    if max_bytes < floor {
        return Err(invalid(
            &keys::BROKER_MAX_BYTES,
            &size,
            format!(
                "must be at least {} MiB for batches of {batch_size} events (a few of the largest \
                 messages must fit in the stream)",
                floor.div_ceil(1 << 20)
            ),
        ));
    }
    let dur = |key: &'static Key, v: &Option<String>, min: u64, max: u64| {
        let text = required(v, key)?;
        duration_within(&text, Duration::from_secs(min), Duration::from_secs(max))
            .map_err(|e| invalid(key, &text, e))
    };
    const DAY: u64 = 86_400;
    Ok(Some(BrokerSettings {
        url,
        auth: auth(file, url_auth)?,
        connect_for: dur(&keys::BROKER_CONNECT_TIMEOUT, &file.connect_timeout, 1, DAY)?,
        max_age: dur(&keys::BROKER_MAX_AGE, &file.max_age, 60, 3650 * DAY)?,
        max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
        compress: required(&file.compress, &keys::BROKER_COMPRESS)?,
        ack_wait: file
            .ack_wait
            .as_ref()
            .map(|t| {
                duration_within(t, Duration::from_secs(1), Duration::from_secs(2 * DAY))
                    .map_err(|e| invalid(&keys::BROKER_ACK_WAIT, t, e))
            })
            .transpose()?,
        partitions: file
            .partitions
            .map(|p| match p {
                1..=MAX_PARTITIONS => Ok(p),
                _ => Err(invalid(
                    &keys::BROKER_PARTITIONS,
                    p.to_string(),
                    format!("must be 1 to {MAX_PARTITIONS}"),
                )),
            })
            .transpose()?,
    }))
}

/// Splits credentials out of `nats://[user[:password]@]host:port`: the URL handed to the client never
/// carries them (client libraries print their server addresses in debug logs).
fn split_url(raw: &str) -> Result<(String, Option<BrokerAuth>), ConfigError> {
    let shown = redact_url(raw);
    let bad = |reason: &str| invalid(&keys::BROKER, &shown, reason);
    let Some((scheme, rest)) = raw.split_once("://") else {
        return Err(bad("expected nats://HOST:PORT"));
    };
    if scheme != "nats" && scheme != "tls" {
        return Err(bad("expected nats://HOST:PORT (or tls://HOST:PORT)"));
    }
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (userinfo, hostport) = match rest[..authority_end].rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, &rest[..authority_end]),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (hostport, None),
    };
    if host.is_empty() || port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        return Err(bad("expected nats://HOST:PORT"));
    }
    let url = format!("{scheme}://{hostport}");
    let auth = userinfo.map(|u| match u.split_once(':') {
        Some((user, pass)) => BrokerAuth::UserPassword {
            user: percent_decode(user),
            password: Secret::new(percent_decode(pass)),
        },
        // NATS reads a lone user part as a token.
        None => BrokerAuth::Token(Secret::new(percent_decode(u))),
    });
    // The raw URL (with its encoded credentials) is scrubbed from logs too.
    if auth.is_some() {
        crate::secrets::register(raw);
    }
    Ok((url, auth))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| (*c as char).to_digit(16)),
                b.get(i + 2).and_then(|c| (*c as char).to_digit(16)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The one way of authenticating that was given (two are an error: which should win is not obvious).
fn auth(file: &Broker, from_url: Option<BrokerAuth>) -> Result<BrokerAuth, ConfigError> {
    let mut given: Vec<(&'static str, BrokerAuth)> = Vec::new();
    if let Some(a) = from_url {
        given.push(("credentials in the broker URL", a));
    }
    let user = file.user.clone();
    let password_file = file.password_file.clone();
    let password = match (std::env::var(PASSWORD_ENV).ok(), password_file) {
        (Some(_), Some(f)) => {
            return Err(invalid(
                &keys::BROKER_PASSWORD_FILE,
                f.display(),
                format!("{PASSWORD_ENV} is set too: give the password one way"),
            ))
        }
        (Some(p), None) => Some(Secret::new(p)),
        (None, Some(f)) => Some(read_secret(&keys::BROKER_PASSWORD_FILE, &f)?),
        (None, None) => None,
    };
    match (user, password) {
        (Some(user), Some(password)) => given.push((
            "a broker user and password",
            BrokerAuth::UserPassword { user, password },
        )),
        (Some(user), None) => {
            return Err(invalid(
                &keys::BROKER_USER,
                user,
                format!(
                "needs a password: {PASSWORD_ENV} or --broker-password-file (broker.password_file)"
            ),
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                &keys::BROKER_USER,
                "(none)",
                "a broker password was given without a user: --broker-user (broker.user)",
            ))
        }
        (None, None) => {}
    }
    let token_file = file.token_file.clone();
    match (std::env::var(TOKEN_ENV).ok(), token_file) {
        (Some(_), Some(f)) => {
            return Err(invalid(
                &keys::BROKER_TOKEN_FILE,
                f.display(),
                format!("{TOKEN_ENV} is set too: give the token one way"),
            ))
        }
        (Some(t), None) => given.push(("a broker token", BrokerAuth::Token(Secret::new(t)))),
        (None, Some(f)) => given.push((
            "a broker token",
            BrokerAuth::Token(read_secret(&keys::BROKER_TOKEN_FILE, &f)?),
        )),
        (None, None) => {}
    }
    if let Some(f) = file.creds_file.clone() {
        // Read now so a missing file fails --check-config; the client reads it again at connect.
        let text = read_secret(&keys::BROKER_CREDS, &f)?;
        for line in text.expose().lines() {
            let line = line.trim();
            if line.starts_with("eyJ") || line.starts_with("SU") {
                crate::secrets::register(line);
            }
        }
        given.push(("a broker credentials file", BrokerAuth::CredsFile(f)));
    }
    if let Some(f) = file.nkey_file.clone() {
        let seed = read_secret(&keys::BROKER_NKEY, &f)?;
        let seed = Secret::new(seed.expose().trim());
        if !seed.expose().starts_with("SU") {
            return Err(invalid(
                &keys::BROKER_NKEY,
                f.display(),
                "expected a user NKey seed (a line starting with SU)",
            ));
        }
        given.push(("a broker NKey seed", BrokerAuth::NKey(seed)));
    }
    match given.len() {
        0 => Ok(BrokerAuth::None),
        1 => Ok(given.pop().expect("one").1),
        _ => Err(invalid(
            &keys::BROKER,
            "credentials",
            format!(
                "given more than one way ({}): give one",
                given.iter().map(|(w, _)| *w).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// A secret read from a file (trailing newline removed).
fn read_secret(key: &'static Key, path: &PathBuf) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, path.display(), format!("cannot read it: {e}")))?;
    let value = text.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err(invalid(key, path.display(), "the file is empty"));
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url_and_are_decoded() {
        let (url, auth) = split_url("nats://alice:p%40ss%3Aword@10.0.0.1:4222").unwrap();
        assert_eq!(url, "nats://10.0.0.1:4222");
        match auth {
            Some(BrokerAuth::UserPassword { user, password }) => {
                assert_eq!(user, "alice");
                assert_eq!(password.expose(), "p@ss:word");
            }
            other => panic!("{other:?}"),
        }
        let (url, auth) = split_url("nats://s3cr3ttoken@h:4222").unwrap();
        assert_eq!(url, "nats://h:4222");
        assert!(matches!(auth, Some(BrokerAuth::Token(t)) if t.expose() == "s3cr3ttoken"));
        let (url, auth) = split_url("nats://h").unwrap();
        assert_eq!((url.as_str(), auth.is_none()), ("nats://h", true));
        for bad in [
            "http://h:4222",
            "nats://",
            "nats://h:0",
            "nats://u:pw@h:notaport",
        ] {
            let e = split_url(bad).unwrap_err().to_string();
            assert!(!e.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%zz%4"), "a b%zz%4");
    }
}
