//! Replays every input the safetensors fuzzer saved in fuzz/regressions/safetensors_header/, and the
//! fixtures' real checkpoints: each must return normally.

use std::path::Path;

use mmreg_core::fuzz::safetensors_file;
use mmreg_image::fuzz::replay;

#[test]
fn safetensors_regressions_return_normally() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let saved = replay(
        &root.join("fuzz/regressions/safetensors_header"),
        safetensors_file,
    );
    assert!(saved > 0, "no regression inputs found");
    for fixture in ["llava-tiny-hf", "llava-next-tiny-hf"] {
        let path = root
            .join("fixtures")
            .join(fixture)
            .join("model.safetensors");
        safetensors_file(&std::fs::read(&path).expect("the fixture is readable"));
    }
}
