//! Parity with Hugging Face transformers on tiny random LLaVA checkpoints and goldens made by
//! `scripts/make_llava_fixtures.py` (HF eager attention, float32, CPU).

use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    ImageInput, LoadOptions, Modality, ModelContext, MultiModalData, MultiModalModel,
    ProcessorInputs, Prompt, Registry, Step, TensorMap, Weights,
};
use mmreg_engine::generate::{generate, prepare, PreparedInputs};
use mmreg_engine::SamplingParams;
use mmreg_models as _;

mod support;
use support::fixture;

mod common;
use common::Golden;
use tch::Kind;

struct Checkpoint {
    ctx: ModelContext,
    entry: &'static ModelEntry,
    model: Box<dyn MultiModalModel>,
    golden: Golden,
}

fn checkpoint(name: &str) -> Checkpoint {
    let dir = fixture(name);
    let ctx = ModelContext::from_dir(&dir).expect("context");
    let entry = Registry::global()
        .for_context(&ctx)
        .expect("LLaVA is registered");
    let weights = Weights::from_dir(&dir).expect("weights");
    let model = entry
        .load(&ctx, &weights, &LoadOptions::default())
        .expect("loads");
    Checkpoint {
        ctx,
        entry,
        model,
        golden: Golden::load(&dir),
    }
}

fn image(name: &str) -> ImageInput {
    ImageInput::open(fixture("llava-tiny-real/images").join(name)).expect("image")
}

/// Prefill logits at the golden's positions, and greedy generation, against HF.
fn assert_matches_hf(c: &Checkpoint, case: &str, inputs: impl Fn() -> PreparedInputs) {
    common::assert_matches_hf(c.entry, c.model.as_ref(), &c.golden, case, inputs);
}

fn real_inputs(c: &Checkpoint, prompt: &str, images: &[&str]) -> PreparedInputs {
    let images = images.iter().map(|name| image(name)).collect();
    let inputs = ProcessorInputs {
        prompt: Prompt::Text(prompt.into()),
        multimodal: MultiModalData::with_images(images),
    };
    prepare(c.entry, &c.ctx, inputs, 4096).expect("prepared")
}

const ONE_IMAGE: &str = "USER: <image>\nWhat is shown in this image? ASSISTANT:";
const TWO_IMAGES: &str = "USER: <image>\n<image>\nWhat differs between these images? ASSISTANT:";

#[test]
fn tiny_real_one_image_matches_hf() {
    let c = checkpoint("llava-tiny-real");
    assert_matches_hf(&c, "one_image", || {
        real_inputs(&c, ONE_IMAGE, &["a_300x200.png"])
    });
}

/// The decoder with the fused kernels (residual add + RMSNorm, SiLU × up, rope), run by the CPU emulator
/// of their CUDA source: the same logits and tokens as HF.
#[test]
fn tiny_real_one_image_matches_hf_with_the_fused_kernels_emulated() {
    let c = checkpoint("llava-tiny-real");
    mmreg_engine::kernels::set_enabled(true);
    mmreg_engine::kernels::emulate_on_this_thread(true);
    assert!(mmreg_engine::kernels::fused_available(tch::Device::Cpu));
    let families = ["rms_norm", "add_rms_norm", "silu_mul", "rope"];
    let before = families.map(|f| mmreg_engine::kernels::launches(f).expect("a kernel family"));
    assert_matches_hf(&c, "one_image", || {
        real_inputs(&c, ONE_IMAGE, &["a_300x200.png"])
    });
    mmreg_engine::kernels::emulate_on_this_thread(false);
    // The kernels really ran: a parity pass with them silently off would prove nothing.
    for (family, before) in families.iter().zip(before) {
        let after = mmreg_engine::kernels::launches(family).expect("a kernel family");
        assert!(after > before, "the fused {family} kernel never ran");
    }
}

/// A step of two single-token decodes (the engine's batched decode: one attention call over the paged
/// cache) gives the same logits with the fused kernels, paged decode attention included, run by the CPU
/// emulator, as with libtorch's ops (which gather the cached keys and values first).
#[test]
fn a_step_of_decodes_with_the_fused_kernels_emulated_matches_libtorch() {
    use mmreg_core::PagedKvCache;
    use mmreg_engine::attention_batch;
    use mmreg_engine::generate::embed_prompt;
    use mmreg_engine::kernels;

    let _guard = tch::no_grad_guard();
    let c = checkpoint("llava-tiny-real");
    let model = c.model.as_ref();
    const BLOCK: usize = 16;
    let mut cache =
        PagedKvCache::new(model.kv_cache_spec(), 128, BLOCK, tch::Device::Cpu).expect("cache");
    // Two prompts of different lengths, prefilled into disjoint blocks.
    let prompts = [
        real_inputs(&c, ONE_IMAGE, &["a_300x200.png"]),
        real_inputs(&c, TWO_IMAGES, &["a_300x200.png", "b_480x640.png"]),
    ];
    let mut sequences = Vec::new();
    let mut next_block = 0u32;
    let mut last_tokens = Vec::new();
    for prepared in prompts {
        let embeds = embed_prompt(c.entry, model, prepared).expect("embeds");
        let len = embeds.size()[0] as usize;
        let blocks: Vec<u32> =
            (next_block..next_block + (len + 1).div_ceil(BLOCK) as u32).collect();
        next_block += blocks.len() as u32;
        let batch =
            attention_batch(&[(&blocks, 0, len)], BLOCK, true, tch::Device::Cpu).expect("batch");
        let logits = model
            .forward(&embeds, &mut Step::new(&batch, &mut cache))
            .expect("prefill");
        last_tokens.push(logits.argmax(-1, false).int64_value(&[0]));
        sequences.push((blocks, len));
    }
    let layout: Vec<(&[u32], usize, usize)> = sequences
        .iter()
        .map(|(blocks, len)| (blocks.as_slice(), *len, 1))
        .collect();
    let mut decode = |emulated: bool| {
        kernels::set_enabled(true);
        kernels::emulate_on_this_thread(emulated);
        let batch = attention_batch(&layout, BLOCK, true, tch::Device::Cpu).expect("batch");
        let gather = batch
            .decode_gather
            .as_ref()
            .expect("a step of decodes attends in one call");
        // The kernel runs for this model's heads (emulated), or not at all (libtorch's path).
        let (keys, values) = cache.layer(0);
        let query = tch::Tensor::zeros([2, 4, 8], (Kind::Float, tch::Device::Cpu));
        let ran = kernels::paged_decode_attention(
            &query,
            keys,
            values,
            &gather.slots,
            &gather.lengths,
            1.0,
        );
        assert_eq!(ran.is_some(), emulated);
        let embeds = model
            .embed_tokens(&tch::Tensor::from_slice(&last_tokens))
            .expect("embeds");
        let launched = || kernels::launches("paged_decode_attention").expect("a kernel family");
        let before = launched();
        let logits = model
            .forward(&embeds, &mut Step::new(&batch, &mut cache))
            .expect("decode");
        if emulated {
            assert!(
                launched() > before,
                "the model's decode step did not use the kernel"
            );
        }
        kernels::emulate_on_this_thread(false);
        logits
    };
    let (libtorch, fused) = (decode(false), decode(true));
    let error =
        (&fused - &libtorch).abs().max().double_value(&[]) / libtorch.abs().max().double_value(&[]);
    assert!(error <= 1e-5, "decode logits relative error {error:e}");
}

#[test]
fn tiny_real_two_images_matches_hf() {
    let c = checkpoint("llava-tiny-real");
    assert_matches_hf(&c, "two_images", || {
        real_inputs(&c, TWO_IMAGES, &["a_300x200.png", "b_480x640.png"])
    });
}

#[test]
fn pixel_values_are_bit_identical_to_hf() {
    let c = checkpoint("llava-tiny-real");
    let prepared = real_inputs(&c, TWO_IMAGES, &["a_300x200.png", "b_480x640.png"]);
    let (modality, mapped) = &prepared.mapped[0];
    assert_eq!(*modality, Modality::Image);
    let ours = mapped
        .iter()
        .find(|(name, _)| *name == "pixel_values")
        .expect("pixel_values")
        .1;
    let hf = c.golden.get("two_images.pixel_values");
    assert_eq!(ours.size(), hf.size());
    assert!(
        ours.equal(hf),
        "pixel_values differ: max abs diff {}",
        (ours - hf).abs().max().double_value(&[])
    );
}

#[test]
fn tokenization_with_the_llama2_tokenizer_matches_hf() {
    let c = checkpoint("llava-tiny-real");
    let ids = c
        .ctx
        .tokenizer()
        .expect("tokenizer")
        .encode(ONE_IMAGE, true)
        .expect("encodes");
    let ids: Vec<i64> = ids.get_ids().iter().map(|&t| t as i64).collect();
    assert_eq!(ids, c.golden.ids("one_image.prompt_ids"));
    assert_eq!(ids.iter().filter(|&&t| t == 32000).count(), 1);
}

/// HF's own tiny tester config (image token 0, gelu MLP, layer -1, MHA, transformers-5 weight names),
/// fed HF's random pixel values directly.
fn hf_tester_inputs(c: &Checkpoint, case: &str) -> PreparedInputs {
    let expanded = c.golden.ids(&format!("{case}.input_ids"));
    // Collapse each run of image tokens (id 0) back to one marker.
    let mut ids: Vec<u32> = Vec::new();
    for (i, &id) in expanded.iter().enumerate() {
        if id != 0 || i == 0 || expanded[i - 1] != 0 {
            ids.push(id as u32);
        }
    }
    let pixel_values = c.golden.get(&format!("{case}.pixel_values"));
    let n = pixel_values.size()[0] as usize;
    let blank = ImageInput::new("pixel values", image::DynamicImage::new_rgb8(8, 8));
    let inputs = ProcessorInputs {
        prompt: Prompt::TokenIds(ids),
        multimodal: MultiModalData::with_images(vec![blank; n]),
    };
    let processed = c.entry.process(&c.ctx, inputs).expect("processed");
    let mut mapped = TensorMap::default();
    mapped.insert("pixel_values", pixel_values.shallow_clone());
    PreparedInputs {
        processed,
        mapped: vec![(Modality::Image, mapped)],
    }
}

#[test]
fn hf_tester_config_matches_hf() {
    let c = checkpoint("llava-tiny-hf");
    for case in ["one_image", "two_images"] {
        assert_matches_hf(&c, case, || hf_tester_inputs(&c, case));
    }
}

#[test]
fn bf16_load_runs_and_agrees_on_the_first_token() {
    let dir = fixture("llava-tiny-real");
    let ctx = ModelContext::from_dir(&dir).expect("context");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let weights = Weights::from_dir(&dir).expect("weights");
    let options = LoadOptions {
        dtype: Kind::BFloat16,
        ..LoadOptions::default()
    };
    let model = entry.load(&ctx, &weights, &options).expect("loads in bf16");
    assert_eq!(model.dtype(), Kind::BFloat16);
    let c = checkpoint("llava-tiny-real");
    let params = SamplingParams {
        max_tokens: 1,
        ..SamplingParams::default()
    };
    let first = generate(
        entry,
        model.as_ref(),
        real_inputs(&c, ONE_IMAGE, &["a_300x200.png"]),
        &params,
    )
    .expect("runs");
    assert_eq!(
        first.token_ids[0] as i64,
        c.golden.ids("one_image.generated")[0]
    );
}
