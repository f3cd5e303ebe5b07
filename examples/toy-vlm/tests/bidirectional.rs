//! Attention runs the model declares bidirectional (`ProcessedInputs::bidirectional`: Gemma 3's image
//! tokens, PaliGemma's prefix): a variant of the toy whose input processor opens each image's run both
//! ways. Its prefill logits equal a dense reference computed here, and the engine (chunked prefill with a
//! budget smaller than a run, prefix caching, batching) generates what one-at-a-time generation does.

mod support;

use mmreg_core::{
    register_input_mapper, register_input_processor, register_model, ImageInput, ModelContext,
    MultiModalData, ProcessedInputs, ProcessorInputs, Prompt, Result,
};
use mmreg_engine::generate::{
    embed_prompt, generate, prefill_logits_at, prefill_logits_of, prepare,
};
use mmreg_engine::{Engine, EngineOptions, ImageSource, Request, SamplingParams};
use tch::Tensor;
use toy_vlm::ToyVlm;

#[register_model("ToyBidirectionalForCausalLM")]
#[register_input_mapper(image = toy_vlm::map_images)]
#[register_input_processor(image_runs_both_ways)]
struct ToyBidirectional(ToyVlm);

toy_newtype!(ToyBidirectional);

/// The toy's processing, with each image's placeholder run attended both ways.
fn image_runs_both_ways(ctx: &ModelContext, inputs: ProcessorInputs) -> Result<ProcessedInputs> {
    let mut processed = support::toy_entry().process(ctx, inputs)?;
    processed.bidirectional =
        processed.placeholders.iter().map(|r| r.offset..r.offset + r.length).collect();
    Ok(processed)
}

fn checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    support::write_checkpoint(dir.path(), 11).expect("checkpoint");
    let config = std::fs::read_to_string(dir.path().join("config.json")).expect("config");
    let config = config.replace("ToyVlmForCausalLM", "ToyBidirectionalForCausalLM");
    std::fs::write(dir.path().join("config.json"), config).expect("config");
    dir
}

fn picture(width: u32, height: u32, shade: u8) -> ImageInput {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([shade, (x * 9) as u8, (y * 13) as u8])
    });
    ImageInput::new(format!("{width}x{height}"), image.into())
}

/// Two images of 8 tokens each between text.
fn inputs() -> ProcessorInputs {
    ProcessorInputs {
        prompt: Prompt::TokenIds(vec![3, 15, 4, 5, 15, 6, 7]),
        multimodal: MultiModalData::with_images(vec![picture(32, 8, 40), picture(40, 10, 200)]),
    }
}

#[test]
fn prefill_logits_equal_a_dense_reference_with_the_runs_open_both_ways() {
    let _guard = tch::no_grad_guard();
    let dir = checkpoint();
    let (ctx, entry, model) = support::load(dir.path());
    let prepared = prepare(entry, &ctx, inputs(), 256).expect("prepared");
    let processed = prepared.processed.clone();
    assert_eq!(processed.bidirectional.len(), 2);
    assert!(processed.bidirectional.iter().all(|r| r.len() == 8), "{:?}", processed.bidirectional);
    let embeds = embed_prompt(entry, model.as_ref(), prepared).expect("embeds");
    let got = prefill_logits_of(model.as_ref(), &embeds, &processed).expect("logits");

    // The toy's forward written out: one head, queries = keys = values = the embeddings.
    let len = embeds.size()[0];
    let mut allowed = vec![false; (len * len) as usize];
    for q in 0..len {
        for k in 0..len {
            let same_run = processed
                .bidirectional
                .iter()
                .any(|r| r.contains(&(q as usize)) && r.contains(&(k as usize)));
            allowed[(q * len + k) as usize] = k <= q || same_run;
        }
    }
    let allowed = Tensor::from_slice(&allowed).view([len, len]);
    let want = support::dense_toy_logits(dir.path(), &embeds, &allowed);
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "max |Δ| = {diff}");

    // The runs matter: causal attention gives other logits inside them.
    let causal = prefill_logits_at(model.as_ref(), &embeds, None).expect("causal logits");
    let first_run = processed.bidirectional[0].start as i64;
    let changed = (&causal - &got).narrow(0, first_run, 7).abs().max().double_value(&[]);
    assert!(changed > 1e-3, "the runs changed nothing: {changed}");
}

#[test]
fn the_engine_keeps_each_run_in_one_chunk_and_generates_what_generate_does() {
    let dir = checkpoint();
    let (ctx, entry, model) = support::load(dir.path());
    let params = SamplingParams { max_tokens: 12, ..SamplingParams::default() };
    let want = generate(
        entry,
        model.as_ref(),
        prepare(entry, &ctx, inputs(), 256).expect("prepared"),
        &params,
    )
    .expect("generates")
    .token_ids;
    let request = || {
        let data = inputs();
        Request {
            prompt: data.prompt,
            images: data.multimodal.images.into_iter().map(ImageSource::Decoded).collect(),
            videos: Vec::new(),
            params: params.clone(),
        }
    };
    // A step budget of 5 tokens, smaller than each 8-token run: the runs go whole, the text around them
    // in chunks; the same request again is served from the prefix cache.
    for (budget, caching) in [(5, true), (5, false), (64, true)] {
        let options = EngineOptions {
            max_num_batched_tokens: budget,
            prefix_caching: caching,
            ..EngineOptions::default()
        };
        let engine = Engine::new(dir.path(), options).expect("engine");
        engine.counters().record_steps();
        let first = engine.submit(request()).wait().expect("completes");
        let steps = engine.counters().take_steps();
        assert_eq!(first.token_ids, want, "budget {budget}, caching {caching}");
        if budget == 5 {
            let chunks: Vec<usize> =
                steps.iter().map(|s| s.prefill_tokens).filter(|&n| n > 0).collect();
            assert!(chunks.contains(&8), "a run went whole: {chunks:?}");
            assert!(chunks.len() > 2, "{chunks:?}");
        }
        let again = engine.submit(request()).wait().expect("completes");
        assert_eq!(again.token_ids, want, "again: budget {budget}, caching {caching}");
        assert_eq!(again.cached_tokens > 0, caching);
    }
}
