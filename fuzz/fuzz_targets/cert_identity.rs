//! Fuzz target `cert_identity`: see the input layout in `src/lib.rs` and README.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lienthong_fuzz::fuzz_cert_identity(data));
