//! The guide's code is real: every Rust block of docs/adding-a-multimodal-model.md appears verbatim in
//! a source file that compiles and is tested.

#[test]
fn guide_code_blocks_are_taken_from_compiled_sources() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let read = |path: &str| std::fs::read_to_string(format!("{root}/{path}")).expect(path);
    let guide = read("docs/adding-a-multimodal-model.md");
    let sources = [
        read("mmreg-models/src/llava.rs"),
        read("examples/toy-vlm/src/lib.rs"),
        read("mmreg-models/src/qwen2_vl.rs"),
    ];
    let blocks: Vec<&str> =
        guide.split("```rust\n").skip(1).map(|b| b.split("```").next().unwrap_or("")).collect();
    assert!(blocks.len() >= 10, "found {} rust blocks", blocks.len());
    for block in blocks {
        assert!(
            sources.iter().any(|s| s.contains(block)),
            "this guide block is not in the sources:\n{block}"
        );
    }
}
