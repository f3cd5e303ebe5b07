#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mmreg_core::fuzz::safetensors_file(data));
