//! Startup profiling runs the model's registered dummy data: a model that registers leaner dummy data
//! gets a different profile, and both serve requests through the engine.

mod support;

use mmreg_core::ImageInput;
use mmreg_core::{
    register_dummy_data, register_input_mapper, register_model, DummyRequest, ModelContext,
    ProcessorInputs, Prompt, Result,
};
use mmreg_engine::{Engine, EngineOptions, ImageSource, Request, SamplingParams};
use toy_vlm::ToyVlm;

/// The toy model under another architecture name, whose dummy data is half as long and has no images.
#[register_model("ToyLeanForCausalLM")]
#[register_input_mapper(image = toy_vlm::map_images)]
#[register_dummy_data(lean_dummy_data)]
struct ToyLean(ToyVlm);

fn lean_dummy_data(ctx: &ModelContext, request: &DummyRequest) -> Result<ProcessorInputs> {
    let half = DummyRequest { seq_len: request.seq_len / 2, counts: Default::default() };
    support::toy_entry().dummy_data(ctx, &half)
}

toy_newtype!(ToyLean);

fn checkpoint(architecture: &str) -> tempfile::TempDir {
    // The weights come from libtorch's global generator: one checkpoint at a time, so that tests running
    // in parallel write the same weights.
    static SEEDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = SEEDING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("temp dir");
    support::write_checkpoint(dir.path(), 3).expect("checkpoint");
    let config = std::fs::read_to_string(dir.path().join("config.json")).expect("config");
    let config = config.replace("ToyVlmForCausalLM", architecture);
    std::fs::write(dir.path().join("config.json"), config).expect("config");
    dir
}

#[test]
fn the_registered_dummy_data_shapes_the_profile() {
    let options = EngineOptions {
        max_num_batched_tokens: 200,
        limit_mm_per_prompt: mmreg_engine::MultiModalLimits::each(3),
        ..EngineOptions::default()
    };
    let (toy_dir, lean_dir) = (checkpoint("ToyVlmForCausalLM"), checkpoint("ToyLeanForCausalLM"));
    let toy = Engine::new(toy_dir.path(), options.clone()).expect("toy engine");
    let lean = Engine::new(lean_dir.path(), options).expect("lean engine");
    // The longest prompt the model allows (room for one generated token), of which profiling runs the
    // first `max_num_batched_tokens` as one step.
    let longest = toy.profile().max_model_len - 1;
    assert_eq!(toy.profile().dummy_prompt_tokens, longest);
    assert_eq!(toy.profile().dummy_items.get(mmreg_core::Modality::Image), 3);
    assert_eq!(lean.profile().dummy_prompt_tokens, longest / 2);
    assert_eq!(lean.profile().dummy_items.get(mmreg_core::Modality::Image), 0);
    // Both serve the same request the same way.
    let request = Request {
        videos: Vec::new(),
        prompt: Prompt::TokenIds(vec![3, 4, 5]),
        images: vec![],
        params: SamplingParams::default(),
    };
    let a = toy.submit(request.clone()).wait().expect("toy completes");
    let b = lean.submit(request).wait().expect("lean completes");
    assert_eq!(a.token_ids, b.token_ids);
}

#[test]
fn an_item_larger_than_the_encoder_budget_is_refused_with_both_numbers() {
    // The lean dummy data profiles no image, so the encoder budget is the step budget alone.
    let lean_dir = checkpoint("ToyLeanForCausalLM");
    let engine = |max_num_batched_tokens| {
        let options = EngineOptions { max_num_batched_tokens, ..EngineOptions::default() };
        Engine::new(lean_dir.path(), options).expect("lean engine")
    };
    let wide = || Request {
        videos: Vec::new(),
        prompt: Prompt::TokenIds(vec![3, 15, 4]),
        images: vec![ImageSource::Decoded(ImageInput::new(
            "wide",
            image::RgbImage::new(64, 8).into(),
        ))],
        params: SamplingParams::default(),
    };
    let small = engine(3);
    assert_eq!(small.profile().largest_item_tokens, 0);
    let error = small.submit(wide()).wait().expect_err("over the budget").to_string();
    assert!(error.contains("image #0 needs") && error.contains("encoder budget is 3"), "{error}");
    // A budget that holds the image: it runs (its prompt is prefilled in chunks of 8).
    let done = engine(8).submit(wide()).wait().expect("within the budget");
    assert!(done.prompt_tokens > 3);
}
