//! The broker wire codec on arbitrary bytes (see `pipeline::fuzz::wire`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pipeline::fuzz::wire(data));
