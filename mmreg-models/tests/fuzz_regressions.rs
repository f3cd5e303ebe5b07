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

/// Cases found whose fix belongs in clip.rs (a division by `vision_config.num_attention_heads` 0, and a
/// loop over `vision_config.num_hidden_layers` that a huge count makes endless): `--ignored` shows them.
/// Once fixed, they move to fuzz/regressions/checkpoint_config/ and this test goes.
#[test]
#[ignore = "the fixes belong in clip.rs; the hang case does not return until then"]
fn pending_checkpoint_config_cases_return_normally() {
    let fuzz = ConfigFuzz::new(&root().join("fixtures"));
    let pending = replay(&root().join("fuzz/pending/checkpoint_config"), |bytes| {
        fuzz.run(bytes)
    });
    assert!(pending > 0, "no pending inputs found");
}
