//! Model code that panics does not take the engine down: a panic in a registered function on a worker
//! thread fails that request alone, a panic in the model during a step fails that step's requests, and
//! the engine goes on serving.

mod support;

use mmreg_core::{
    register_input_mapper, register_input_processor, register_model, ImageInput, ModelContext,
    ProcessedInputs, ProcessorInputs, Prompt, Result,
};
use mmreg_engine::{Engine, EngineOptions, ImageSource, Request, SamplingParams};
use tch::Tensor;
use toy_vlm::ToyImageInputs;

/// The toy model with two planted bugs: its input processor panics on token 99, and its mapper gives
/// 13-pixel-wide images a malformed tensor that makes the model's matmul panic inside the step.
#[register_model("ToyPanickyForCausalLM")]
#[register_input_mapper(image = buggy_mapper)]
#[register_input_processor(buggy_processor)]
struct ToyPanicky(toy_vlm::ToyVlm);

toy_newtype!(ToyPanicky);

fn buggy_processor(ctx: &ModelContext, inputs: ProcessorInputs) -> Result<ProcessedInputs> {
    if matches!(&inputs.prompt, Prompt::TokenIds(ids) if ids.contains(&99)) {
        panic!("planted bug in the input processor");
    }
    support::toy_entry().process(ctx, inputs)
}

fn buggy_mapper(ctx: &ModelContext, images: &[ImageInput]) -> Result<ToyImageInputs> {
    let mut inputs = toy_vlm::map_images(ctx, images)?;
    if images.iter().any(|image| image.size().width == 13) {
        // Four values per cell where the model expects three.
        inputs.cells = Tensor::zeros([5, 4], (tch::Kind::Float, tch::Device::Cpu));
    }
    Ok(inputs)
}

fn checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    support::write_checkpoint(dir.path(), 3).expect("checkpoint");
    let config = std::fs::read_to_string(dir.path().join("config.json")).expect("config");
    let config = config.replace("ToyVlmForCausalLM", "ToyPanickyForCausalLM");
    std::fs::write(dir.path().join("config.json"), config).expect("config");
    dir
}

fn request(tokens: &[u32], image_width: Option<u32>) -> Request {
    Request {
        videos: Vec::new(),
        prompt: Prompt::TokenIds(tokens.to_vec()),
        images: image_width
            .map(|w| {
                let image = image::RgbImage::from_pixel(w, 9, image::Rgb([200, 40, 90]));
                ImageSource::Decoded(ImageInput::new("planted", image.into()))
            })
            .into_iter()
            .collect(),
        params: SamplingParams { max_tokens: 4, ..SamplingParams::default() },
    }
}

#[test]
fn panics_in_model_code_fail_their_requests_and_the_engine_carries_on() {
    let dir = checkpoint();
    // Startup runs the dummy data through both planted functions without tripping them.
    let engine = Engine::new(dir.path(), EngineOptions::default()).expect("engine");
    let good = request(&[15, 3, 4], Some(20));
    let expected = engine.submit(good.clone()).wait().expect("completes");

    // A panic in the input processor (worker thread) fails that request; the one beside it completes.
    let results = engine.generate(vec![request(&[3, 99], None), good.clone()]);
    let error = results[0].as_ref().expect_err("the processor panicked");
    assert!(
        error.to_string().contains("preprocessing panicked: planted bug in the input processor"),
        "{error}"
    );
    assert_eq!(results[1].as_ref().expect("completes"), &expected);

    // A panic inside the model during a step (scheduler thread) fails that step's request.
    let error = engine.submit(request(&[15, 3], Some(13))).wait().expect_err("the model panicked");
    assert!(error.to_string().contains("the step panicked"), "{error}");

    // The engine still serves, with the same output as before.
    assert_eq!(engine.submit(good).wait().expect("completes"), expected);
}
