//! Replays every input the fuzzers saved in fuzz/regressions/<target>/: each must return normally.

use std::path::Path;

use mmreg_image::fuzz::{self, replay};

fn regressions(target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target)
}

#[test]
fn fuzz_regressions_return_normally() {
    let total = replay(
        &regressions("decode_and_preprocess"),
        fuzz::decode_and_preprocess,
    ) + replay(
        &regressions("preprocessor_config"),
        fuzz::config_then_preprocess,
    ) + replay(&regressions("best_resolution"), fuzz::best_resolution)
        + replay(
            &regressions("qwen2_vl_decode_and_preprocess"),
            fuzz::qwen2_vl_decode_and_preprocess,
        )
        + replay(&regressions("qwen2_vl_sizes"), fuzz::qwen2_vl_sizes);
    assert!(total > 0, "no regression inputs found");
}
