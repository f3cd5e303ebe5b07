#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mmreg_image::fuzz::best_resolution(data));
