//! Two registrations of the same architecture, and of the same hook, are reported with both locations.

mod support;

use mmreg_core::{
    register_dummy_data, register_model, DummyRequest, ModelContext, ProcessorInputs, Registry,
    Result,
};
use toy_vlm::ToyVlm;

/// Claims the toy's architecture a second time, and registers its dummy data twice.
#[register_model("ToyVlmForCausalLM")]
#[register_dummy_data(no_dummy_data)]
#[register_dummy_data(no_dummy_data)]
struct Impostor(ToyVlm);

fn no_dummy_data(_: &ModelContext, _: &DummyRequest) -> Result<ProcessorInputs> {
    Err(mmreg_core::Error::Registry("the impostor has no dummy data".into()))
}

// Only `LoadModel` is needed to register a model; the toy's newtype macro brings it.
toy_newtype!(Impostor);

#[test]
fn duplicates_are_reported_with_both_locations() {
    let registry = Registry::global();
    let problems = registry.problems();
    let this_file = file!();

    let clash = problems
        .iter()
        .find(|p| p.message.contains("architecture `ToyVlmForCausalLM` is also registered by"))
        .unwrap_or_else(|| panic!("no architecture clash in {problems:#?}"));
    let files: Vec<&str> = clash.locations.iter().map(|l| l.file).collect();
    assert_eq!(clash.locations.len(), 2, "{clash}");
    assert!(files.iter().any(|f| f.ends_with("toy-vlm/src/lib.rs")), "{clash}");
    assert!(files.contains(&this_file), "{clash}");

    let twice = problems
        .iter()
        .find(|p| p.message == "dummy data is registered twice")
        .unwrap_or_else(|| panic!("no duplicate dummy data in {problems:#?}"));
    let lines: Vec<u32> = twice.locations.iter().map(|l| l.line).collect();
    // The lines of this file's two `register_dummy_data` attributes on `Impostor`.
    let expected: Vec<u32> = include_str!("duplicates.rs")
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("#[register_dummy_data(no_dummy_data)]"))
        .map(|(i, _)| i as u32 + 1)
        .collect();
    assert_eq!(lines, expected, "{twice}");

    let error = registry.validate().expect_err("invalid").to_string();
    assert!(error.contains("ToyVlmForCausalLM") && error.contains(this_file), "{error}");
}
