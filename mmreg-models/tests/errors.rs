//! Broken checkpoints and bad requests get errors that name what is wrong.

use std::path::{Path, PathBuf};

use mmreg_core::{
    Error, ImageInput, LoadOptions, ModelContext, MultiModalData, ProcessorInputs, Prompt,
    Registry, Weights,
};
use mmreg_engine::generate::prepare;
use mmreg_models as _;
use tch::{Kind, Tensor};

fn tiny_hf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/llava-tiny-hf")
}

/// A copy of the tiny checkpoint with its tensors passed through `edit`.
fn edited_checkpoint(edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for file in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(tiny_hf().join(file), dir.path().join(file)).expect("copy");
    }
    let mut tensors = Tensor::read_safetensors(tiny_hf().join("model.safetensors")).expect("read");
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, dir.path().join("model.safetensors")).expect("write");
    dir
}

fn load_error(dir: &Path) -> String {
    let ctx = ModelContext::from_dir(dir).expect("context");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let weights = Weights::from_dir(dir).expect("weights");
    match entry.load(&ctx, &weights, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(error) => error.to_string(),
    }
}

#[test]
fn missing_tensor_is_named() {
    let name = "language_model.model.layers.1.mlp.up_proj.weight";
    let dir = edited_checkpoint(|t| t.retain(|(n, _)| n != name));
    let error = load_error(dir.path());
    assert!(
        error.starts_with(
            "tensor `language_model.layers.1.mlp.up_proj.weight` is missing from the checkpoint"
        ),
        "{error}"
    );
}

#[test]
fn misshaped_tensor_names_both_shapes() {
    let dir = edited_checkpoint(|t| {
        let entry = t
            .iter_mut()
            .find(|(n, _)| n == "multi_modal_projector.linear_2.weight")
            .expect("present");
        entry.1 = Tensor::zeros([32, 31], (Kind::Float, tch::Device::Cpu));
    });
    let error = load_error(dir.path());
    assert!(
        error.starts_with("tensor `multi_modal_projector.linear_2.weight` has shape [32, 31] in ")
            && error.ends_with("but the model expects [32, 32]"),
        "{error}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = edited_checkpoint(|t| {
        t.push((
            "language_model.model.extra.weight".into(),
            Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)),
        ))
    });
    assert_eq!(load_error(dir.path()), "the checkpoint has 1 tensor(s) the model does not use: `language_model.model.extra.weight` [2]");
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = edited_checkpoint(|_| {});
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() / 2]).expect("truncate");
    let error = Weights::from_dir(dir.path())
        .expect_err("truncated")
        .to_string();
    assert!(error.contains("not a valid safetensors file"), "{error}");
}

#[test]
fn invalid_config_names_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("config.json"), "{ not json").expect("write");
    let error = ModelContext::from_dir(dir.path())
        .expect_err("invalid")
        .to_string();
    assert!(error.contains("config.json: invalid JSON"), "{error}");
}

#[test]
fn image_count_mismatch_names_both_numbers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/llava-tiny-real");
    let ctx = ModelContext::from_dir(&dir).expect("context");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let image = ImageInput::open(dir.join("images/a_300x200.png")).expect("image");
    let inputs = ProcessorInputs {
        prompt: Prompt::Text("USER: <image>\nDescribe. ASSISTANT:".into()),
        multimodal: MultiModalData::with_images(vec![image.clone(), image]),
    };
    let error = prepare(entry, &ctx, inputs, 4096).expect_err("mismatch");
    assert!(matches!(
        error,
        Error::PlaceholderMismatch {
            placeholders: 1,
            items: 2,
            ..
        }
    ));
    assert_eq!(
        error.to_string(),
        "the prompt has 1 `<image>` placeholder(s) but 2 image item(s) were given"
    );
}

#[test]
fn overlong_prompt_is_rejected_before_the_model_runs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/llava-tiny-real");
    let ctx = ModelContext::from_dir(&dir).expect("context");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let image = ImageInput::open(dir.join("images/a_300x200.png")).expect("image");
    let inputs = ProcessorInputs {
        prompt: Prompt::Text("<image> hello".into()),
        multimodal: MultiModalData::with_images(vec![image]),
    };
    let error = prepare(entry, &ctx, inputs, 100).expect_err("too long");
    assert!(
        matches!(error, Error::PromptTooLong { max: 100, .. }),
        "{error}"
    );
}

#[test]
fn integer_weights_are_refused_with_their_dtype() {
    let dir = edited_checkpoint(|t| {
        let entry = t
            .iter_mut()
            .find(|(n, _)| n == "language_model.model.norm.weight")
            .expect("present");
        entry.1 = Tensor::ones([32], (Kind::Int64, tch::Device::Cpu));
    });
    let error = load_error(dir.path());
    assert!(
        error.starts_with("tensor `language_model.norm.weight` has dtype I64")
            && error.ends_with("expects floating-point weights"),
        "{error}"
    );
}

#[test]
fn a_text_prompt_without_a_tokenizer_is_a_clear_error() {
    let ctx = ModelContext::from_dir(tiny_hf()).expect("context");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let inputs = ProcessorInputs {
        prompt: Prompt::Text("hello".into()),
        multimodal: MultiModalData::default(),
    };
    let error = prepare(entry, &ctx, inputs, 100)
        .expect_err("no tokenizer")
        .to_string();
    assert!(
        error.ends_with("no tokenizer.json: give the prompt as token ids or add a tokenizer"),
        "{error}"
    );
}

#[test]
fn an_empty_prompt_is_refused() {
    let ctx = ModelContext::from_dir(tiny_hf()).expect("context");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let inputs = ProcessorInputs {
        prompt: Prompt::TokenIds(vec![]),
        multimodal: MultiModalData::default(),
    };
    let error = prepare(entry, &ctx, inputs, 100).expect_err("empty");
    assert!(matches!(error, Error::EmptyPrompt), "{error}");
}
