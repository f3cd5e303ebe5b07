#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mmreg_image::fuzz::qwen2_vl_sizes(data));
