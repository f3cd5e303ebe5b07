//! Replays every input the input-processor and config fuzzers saved in fuzz/regressions/<target>/: each
//! must return normally.

use std::path::{Path, PathBuf};

use mmreg_image::fuzz::replay;
use mmreg_models::fuzz::{ConfigFuzz, InputProcessorFuzz};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn input_processor_regressions_return_normally() {
    let fuzz = InputProcessorFuzz::new(&root().join("fixtures"));
    let saved = replay(&root().join("fuzz/regressions/input_processor"), |bytes| {
        fuzz.run(bytes)
    });
    assert!(saved > 0, "no regression inputs found");
}

#[test]
fn checkpoint_config_regressions_return_normally() {
    let fuzz = ConfigFuzz::new(&root().join("fixtures"));
    let saved = replay(
        &root().join("fuzz/regressions/checkpoint_config"),
        |bytes| fuzz.run(bytes),
    );
    assert!(saved > 0, "no regression inputs found");
}
