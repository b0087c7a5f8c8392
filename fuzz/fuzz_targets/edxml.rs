//! Fuzz target `edxml`: see the input layout in `src/edxml.rs` and README.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lienthong_fuzz::edxml::fuzz_edxml(data));
