//! The tiny Qwen2-VL checkpoint rewritten the ways checkpoints come: transformers 5.x's tensor names
//! (`model.visual.*`, `model.language_model.*`; the fixture has the hub's `visual.*`, `model.*`), two
//! shards with `model.safetensors.index.json`, f32 and f16 files. Each loads and gives what the
//! original gives on the golden's `one_image` case (HF's 20 greedy tokens; the same prefill logits,
//! within f16's rounding for the f16 file). A tensor missing, extra, misshaped or present under both
//! layouts is a clear error.

mod support;

use std::path::Path;

use mmreg_core::prepare::{prepare, PreparedInputs};
use mmreg_core::{
    ImageInput, LoadOptions, ModelContext, MultiModalData, MultiModalModel, ProcessorInputs,
    Prompt, Registry, Weights,
};
use mmreg_engine::generate::{embed_prompt, generate, prefill_logits_at};
use mmreg_engine::SamplingParams;
use mmreg_models as _;
use support::fixture;
use tch::{Kind, Tensor};

type Tensors = Vec<(String, Tensor)>;

fn original() -> Tensors {
    Tensor::read_safetensors(fixture("qwen2-vl-tiny/model.safetensors")).expect("weights")
}

fn golden(key: &str) -> Tensor {
    Tensor::read_safetensors(fixture("qwen2-vl-tiny/golden.safetensors"))
        .expect("golden")
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("golden has no {key}"))
        .1
}

/// A checkpoint directory with the tiny checkpoint's configs (no tokenizer: the prompts are ids) and
/// `files`, with an index when there are several.
fn checkpoint(files: Vec<(String, Tensors)>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for file in [
        "config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture("qwen2-vl-tiny").join(file), dir.path().join(file)).expect("copy");
    }
    if files.len() > 1 {
        let mut weight_map = serde_json::Map::new();
        for (file, tensors) in &files {
            for (name, _) in tensors {
                weight_map.insert(name.clone(), file.as_str().into());
            }
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .expect("index");
    }
    for (file, tensors) in files {
        Tensor::write_safetensors(&tensors, dir.path().join(file)).expect("write");
    }
    dir
}

fn single(tensors: Tensors) -> tempfile::TempDir {
    checkpoint(vec![("model.safetensors".into(), tensors)])
}

/// transformers 5.x's names for the hub layout's.
fn v5_name(name: &str) -> String {
    match name.strip_prefix("model.") {
        Some(rest) => format!("model.language_model.{rest}"),
        None => format!("model.{name}"),
    }
}

fn load(dir: &Path) -> mmreg_core::Result<(ModelContext, Box<dyn MultiModalModel>)> {
    let ctx = ModelContext::from_dir(dir)?;
    let entry = Registry::global().for_context(&ctx)?;
    let options = LoadOptions {
        device: tch::Device::Cpu,
        dtype: Kind::Float,
        tensor_parallel: None,
        shard_vision_tower: false,
    };
    let model = entry.load(&ctx, &Weights::from_dir(dir)?, &options)?;
    Ok((ctx, model))
}

fn load_error(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("{} loads", dir.display()),
        Err(error) => error.to_string(),
    }
}

/// Prefill logits at every position and 20 greedy tokens on the golden's `one_image` case.
fn outputs(dir: &Path) -> (Tensor, Vec<i64>) {
    let _guard = tch::no_grad_guard();
    let (ctx, model) = load(dir).expect("loads");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let prompt: Vec<u32> = Vec::<i64>::try_from(golden("one_image.prompt_ids").flatten(0, -1))
        .expect("ids")
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let prepared = || -> PreparedInputs {
        let image =
            ImageInput::open(fixture("qwen2-vl-tiny/images/a_w300_h200.png")).expect("image A");
        let inputs = ProcessorInputs {
            prompt: Prompt::TokenIds(prompt.clone()),
            multimodal: MultiModalData::with_images(vec![image]),
        };
        prepare(entry, &ctx, inputs, usize::MAX).expect("prepares")
    };
    let inputs = prepared();
    let positions = inputs.processed.positions.clone();
    let embeds = embed_prompt(entry, model.as_ref(), inputs).expect("embeds");
    let logits = prefill_logits_at(model.as_ref(), &embeds, positions.as_ref()).expect("prefill");
    let params = SamplingParams {
        max_tokens: 20,
        ..SamplingParams::default()
    };
    let tokens = generate(entry, model.as_ref(), prepared(), &params)
        .expect("generates")
        .token_ids
        .into_iter()
        .map(i64::from)
        .collect();
    (logits, tokens)
}

/// The original checkpoint (its bf16 file, with the configs only) gives HF's tokens: the reference
/// of every rewritten one.
fn reference() -> (Tensor, Vec<i64>) {
    let (logits, tokens) = outputs(single(original()).path());
    let hf = Vec::<i64>::try_from(golden("one_image.generated").flatten(0, -1)).expect("ids");
    assert_eq!(tokens, hf, "the original checkpoint's greedy tokens");
    (logits, tokens)
}

#[test]
fn transformers_5_names_load_as_the_hub_layout() {
    let (logits, tokens) = reference();
    let renamed: Tensors = original()
        .into_iter()
        .map(|(name, t)| (v5_name(&name), t))
        .collect();
    assert!(renamed
        .iter()
        .any(|(n, _)| n == "model.language_model.embed_tokens.weight"));
    assert!(renamed
        .iter()
        .any(|(n, _)| n == "model.visual.patch_embed.proj.weight"));
    let (renamed_logits, renamed_tokens) = outputs(single(renamed).path());
    assert!(renamed_logits.equal(&logits), "the logits differ");
    assert_eq!(renamed_tokens, tokens);
}

#[test]
fn two_shards_with_an_index_load_as_one_file() {
    let (logits, tokens) = reference();
    for rename in [false, true] {
        let mut tensors = original();
        if rename {
            tensors = tensors
                .into_iter()
                .map(|(name, t)| (v5_name(&name), t))
                .collect();
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let second = tensors.split_off(tensors.len() / 2);
        assert!(!tensors.is_empty() && !second.is_empty());
        let dir = checkpoint(vec![
            ("model-00001-of-00002.safetensors".into(), tensors),
            ("model-00002-of-00002.safetensors".into(), second),
        ]);
        assert!(!dir.path().join("model.safetensors").exists());
        let (sharded_logits, sharded_tokens) = outputs(dir.path());
        assert!(sharded_logits.equal(&logits), "renamed {rename}: logits");
        assert_eq!(sharded_tokens, tokens, "renamed {rename}");
    }
}

#[test]
fn f32_and_f16_files_load() {
    let (logits, tokens) = reference();
    let convert = |kind: Kind| -> Tensors {
        original()
            .into_iter()
            .map(|(name, t)| (name, t.to_kind(kind)))
            .collect()
    };
    // bf16 values are exact in f32: the same model, bit for bit.
    let (f32_logits, f32_tokens) = outputs(single(convert(Kind::Float)).path());
    assert!(f32_logits.equal(&logits), "f32 file: logits");
    assert_eq!(f32_tokens, tokens, "f32 file");
    // bf16's 8 significant bits fit in f16's 11, except for the rare weight under f16's normal range
    // (|w| < 6.1e-5), which rounds to a multiple of 6e-8.
    let (f16_logits, f16_tokens) = outputs(single(convert(Kind::Half)).path());
    let error = (&f16_logits - &logits).abs().max().double_value(&[]);
    let scale = logits.abs().max().double_value(&[]);
    assert!(error <= 1e-5 * scale, "f16 file: logits off by {error:e}");
    assert_eq!(f16_tokens, tokens, "f16 file");
}

#[test]
fn a_missing_tensor_is_named() {
    for (name, canonical) in [
        (
            "visual.blocks.1.attn.qkv.weight",
            "visual.blocks.1.attn.qkv.weight",
        ),
        (
            "model.layers.2.mlp.down_proj.weight",
            "language_model.layers.2.mlp.down_proj.weight",
        ),
    ] {
        let mut tensors = original();
        tensors.retain(|(n, _)| n != name);
        let error = load_error(single(tensors).path());
        assert!(
            error.starts_with(&format!(
                "tensor `{canonical}` is missing from the checkpoint"
            )),
            "{error}"
        );
    }
}

#[test]
fn an_unexpected_tensor_is_named() {
    for (name, v5) in [
        ("visual.merger.extra.weight", false),
        ("model.layers.0.extra.weight", true),
    ] {
        let mut tensors = original();
        if v5 {
            tensors = tensors.into_iter().map(|(n, t)| (v5_name(&n), t)).collect();
        }
        let name = if v5 { v5_name(name) } else { name.to_owned() };
        tensors.push((
            name.clone(),
            Tensor::zeros([2], (Kind::BFloat16, tch::Device::Cpu)),
        ));
        assert_eq!(
            load_error(single(tensors).path()),
            format!("the checkpoint has 1 tensor(s) the model does not use: `{name}` [2]")
        );
    }
}

#[test]
fn a_misshaped_tensor_names_both_shapes() {
    let mut tensors = original();
    let entry = tensors
        .iter_mut()
        .find(|(n, _)| n == "visual.patch_embed.proj.weight")
        .expect("present");
    entry.1 = Tensor::zeros([32, 3, 1, 14, 14], (Kind::BFloat16, tch::Device::Cpu));
    let error = load_error(single(tensors).path());
    assert!(
        error.starts_with(
            "tensor `visual.patch_embed.proj.weight` has shape [32, 3, 1, 14, 14] in "
        ) && error.ends_with("but the model expects [32, 3, 2, 14, 14]"),
        "{error}"
    );
}

/// A tensor under both layouts' names would be read twice: refused, naming both.
#[test]
fn one_tensor_under_both_layouts_is_refused() {
    let mut tensors = original();
    let norm = tensors
        .iter()
        .find(|(n, _)| n == "model.norm.weight")
        .expect("present")
        .1
        .copy();
    tensors.push(("model.language_model.norm.weight".into(), norm));
    let error = load_error(single(tensors).path());
    assert!(
        error.ends_with("both map to `language_model.norm.weight`")
            && error.contains("`model.norm.weight`")
            && error.contains("`model.language_model.norm.weight`"),
        "{error}"
    );
}
