#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| oxcow::fuzz_targets::luks_header(data));
