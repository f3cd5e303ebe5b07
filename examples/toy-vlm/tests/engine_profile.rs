//! Startup profiling runs the model's registered dummy data: a model that registers leaner dummy data
//! gets a different profile, and both serve requests through the engine.

use mmreg_core::{
    register_dummy_data, register_input_mapper, register_input_processor, register_max_tokens,
    register_model, AttentionBatch, DummyRequest, Engine, EngineOptions, ImageSize, KvCacheSpec,
    LoadModel, LoadOptions, ModelContext, MultiModalModel, PagedKvCache, ProcessorInputs, Prompt,
    Request, Result, SamplingParams, SupportsVision, Weights,
};
use tch::{Device, Kind, Tensor};
use toy_vlm::{ToyImageInputs, ToyVlm};

/// The toy model under another architecture name, whose dummy data is half as long and has no images.
#[register_model("ToyLeanForCausalLM")]
#[register_input_mapper(image = toy_vlm::map_images)]
#[register_max_tokens(image = toy_vlm::max_image_tokens)]
#[register_dummy_data(lean_dummy_data)]
#[register_input_processor(toy_vlm::input_processor)]
struct ToyLean(ToyVlm);

fn lean_dummy_data(ctx: &ModelContext, request: &DummyRequest) -> Result<ProcessorInputs> {
    let half = DummyRequest {
        seq_len: request.seq_len / 2,
        counts: Default::default(),
    };
    toy_vlm::dummy_data(ctx, &half)
}

impl LoadModel for ToyLean {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        ToyVlm::load(ctx, weights, options).map(ToyLean)
    }
}

impl SupportsVision for ToyLean {
    type ImageInputs = ToyImageInputs;
    fn num_image_tokens(ctx: &ModelContext, size: ImageSize) -> Result<usize> {
        ToyVlm::num_image_tokens(ctx, size)
    }
    fn embed_images(&self, inputs: ToyImageInputs) -> Result<Vec<Tensor>> {
        self.0.embed_images(inputs)
    }
}

impl MultiModalModel for ToyLean {
    fn embed_tokens(&self, token_ids: &Tensor) -> Result<Tensor> {
        self.0.embed_tokens(token_ids)
    }
    fn forward(
        &self,
        inputs_embeds: &Tensor,
        batch: &AttentionBatch,
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        self.0.forward(inputs_embeds, batch, cache)
    }
    fn kv_cache_spec(&self) -> KvCacheSpec {
        self.0.kv_cache_spec()
    }
    fn device(&self) -> Device {
        self.0.device()
    }
    fn dtype(&self) -> Kind {
        self.0.dtype()
    }
    fn max_model_len(&self) -> usize {
        self.0.max_model_len()
    }
}

fn checkpoint(architecture: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    toy_vlm::write_checkpoint(dir.path(), 3).expect("checkpoint");
    let config = std::fs::read_to_string(dir.path().join("config.json")).expect("config");
    let config = config.replace("ToyVlmForCausalLM", architecture);
    std::fs::write(dir.path().join("config.json"), config).expect("config");
    dir
}

#[test]
fn the_registered_dummy_data_shapes_the_profile() {
    let options = EngineOptions {
        max_num_batched_tokens: 200,
        max_images_per_prompt: 3,
        ..EngineOptions::default()
    };
    let (toy_dir, lean_dir) = (
        checkpoint("ToyVlmForCausalLM"),
        checkpoint("ToyLeanForCausalLM"),
    );
    let toy = Engine::new(toy_dir.path(), options.clone()).expect("toy engine");
    let lean = Engine::new(lean_dir.path(), options).expect("lean engine");
    assert_eq!(toy.profile().dummy_prompt_tokens, 200);
    assert_eq!(
        toy.profile().dummy_items.get(mmreg_core::Modality::Image),
        3
    );
    assert_eq!(lean.profile().dummy_prompt_tokens, 100);
    assert_eq!(
        lean.profile().dummy_items.get(mmreg_core::Modality::Image),
        0
    );
    // Both serve the same request the same way.
    let request = Request {
        prompt: Prompt::TokenIds(vec![3, 4, 5]),
        images: vec![],
        params: SamplingParams::default(),
    };
    let a = toy.submit(request.clone()).wait().expect("toy completes");
    let b = lean.submit(request).wait().expect("lean completes");
    assert_eq!(a.token_ids, b.token_ids);
}
