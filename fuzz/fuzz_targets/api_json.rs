//! Fuzz target `api_json`: see the input layout in `src/api_json.rs` and README.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lienthong_fuzz::api_json::fuzz_api_json(data));
