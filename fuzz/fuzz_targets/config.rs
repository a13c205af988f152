//! The config file and flag parser on arbitrary text (see `pipeline::fuzz::config`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pipeline::fuzz::config(data));
