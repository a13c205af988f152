//! Secrets (passwords, tokens, NKey seeds, S3 keys) never reach a log line, a summary or an error.
//!
//! Two layers. Values that hold a secret are typed [`Secret`]: `Debug` and `Display` print `***`, so
//! a secret cannot be formatted by accident. And every secret the process learns is [`register`]ed:
//! the log writer ([`Stderr`]) replaces any occurrence with `***` before a line is written — this also
//! covers what dependencies log at debug and trace level (a client library printing its connection
//! options, a signing step printing a session token), which tcplake does not control.

use std::borrow::Cow;
use std::io::Write;
use std::sync::RwLock;

static REGISTRY: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Secrets shorter than this are not scrubbed from logs by value (they would blank out ordinary
/// words); they are still only ever held as [`Secret`].
const MIN_SCRUBBED_LEN: usize = 4;

/// Remembers `value` (and its percent-encoded form, as it appears in URLs) so no log line shows it.
pub fn register(value: &str) {
    if value.len() < MIN_SCRUBBED_LEN {
        return;
    }
    let mut forms = vec![value.to_string()];
    let encoded = percent_encode(value);
    if encoded != value {
        forms.push(encoded);
    }
    let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    for f in forms {
        if !reg.contains(&f) {
            reg.push(f);
        }
    }
    // Longest first: a secret containing another is replaced whole.
    reg.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Registers the secrets the standard AWS environment variables hold.
pub fn register_aws_environment() {
    for var in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"] {
        if let Ok(v) = std::env::var(var) {
            register(&v);
        }
    }
}

/// `text` with every registered secret replaced by `***`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let reg = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    if !reg.iter().any(|s| text.contains(s.as_str())) {
        return Cow::Borrowed(text);
    }
    let mut out = text.to_string();
    for s in reg.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    Cow::Owned(out)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A secret value: formatting it prints `***`; [`Secret::expose`] is the one way to the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps and registers a secret.
    pub fn new(value: impl Into<String>) -> Self {
        let value = value.into();
        register(&value);
        Secret(value)
    }

    /// The value, for the one call that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The log destination: stderr, with registered secrets scrubbed from every line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

/// One log line being written: held until complete, then scrubbed and written at once.
pub struct LineWriter {
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        let _ = std::io::stderr().write_all(scrub(&text).as_bytes());
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            buf: Vec::with_capacity(256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_are_scrubbed_also_percent_encoded_and_never_formatted() {
        let s = Secret::new("pa:ss@w0rd-unit-test");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        let line = "connect nats://u:pa%3Ass%40w0rd-unit-test@h pass=pa:ss@w0rd-unit-test";
        let out = scrub(line);
        assert!(!out.contains("w0rd-unit-test"), "{out}");
        assert_eq!(out, "connect nats://u:***@h pass=***");
        assert_eq!(scrub("nothing here"), Cow::Borrowed("nothing here"));
    }
}
