#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use mmreg_models::fuzz::InputProcessorFuzz;

static FUZZ: LazyLock<InputProcessorFuzz> = LazyLock::new(|| {
    InputProcessorFuzz::new(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures"))
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| FUZZ.run(data));
