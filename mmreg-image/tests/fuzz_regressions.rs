//! Replays every input the fuzzers saved in fuzz/regressions/<target>/ (plus the fixtures' images):
//! each must return normally.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let bytes = std::fs::read(entry.path()).expect("readable");
        run(&bytes);
        count += 1;
    }
    count
}

#[test]
fn fuzz_regressions_return_normally() {
    let total = replay(
        "decode_and_preprocess",
        mmreg_image::fuzz::decode_and_preprocess,
    ) + replay(
        "preprocessor_config",
        mmreg_image::fuzz::config_then_preprocess,
    ) + replay("best_resolution", mmreg_image::fuzz::best_resolution);
    assert!(total > 0, "no regression inputs found");
}
