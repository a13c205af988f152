//! Entry points for the fuzz targets (`fuzz/`, run with cargo-fuzz) and for the test that replays
//! their corpus and regressions on every CI run (`tests/it/fuzz_regressions.rs`). Each takes arbitrary
//! bytes, must never panic, and checks what must hold for any input it accepts.

use std::path::Path;

use crate::config::{Cli, ConfigFile, Settings};
use crate::edge::wire;

/// The wire codec: anything decodes to a batch or a clear error, and an accepted batch survives a
/// round trip through the encoder (raw and compressed) unchanged.
pub fn wire(data: &[u8]) {
    if let Ok(b) = wire::decode_events(data) {
        for compress in [false, true] {
            let again = wire::decode_events(&wire::encode_events(&b, compress))
                .expect("an encoded batch decodes");
            assert_eq!(again.node, b.node);
            assert_eq!(again.events, b.events);
            assert_eq!(again.clock_us, b.clock_us);
            assert_eq!(again.sent_at_us, b.sent_at_us);
        }
    }
    if let Ok(b) = wire::decode_flows(data) {
        for compress in [false, true] {
            let again = wire::decode_flows(&wire::encode_flows(&b, compress))
                .expect("an encoded batch decodes");
            assert_eq!(again, b);
        }
    }
}

/// The configuration: a TOML file and command-line flags (NUL-separated after the file's text and a
/// NUL) either resolve to settings or fail with an error; never a panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (file_text, flags) = text.split_once('\0').unwrap_or((text, ""));
    let Ok(file) = ConfigFile::parse(Path::new("fuzz.toml"), file_text) else {
        return;
    };
    let args = std::iter::once("tcplake").chain(flags.split('\0').filter(|a| !a.is_empty()));
    let Ok(cli) = Cli::try_parse_args(args) else {
        return;
    };
    // Only the pieces that do not touch the filesystem: a --config flag would read a file.
    if cli.config.is_none() {
        let _ = Settings::resolve_with(&cli, Some(file));
    }
}
