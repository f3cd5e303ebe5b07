//! Bad requests to PaliGemma, Gemma 3 and Idefics3 get what transformers gives them: a clear error where its
//! processor refuses (no image for PaliGemma, a count of image markers that differs from the images),
//! and the same prompt where it accepts (ids already expanded, as HF's processor returns them).

mod support;

use mmreg_core::prepare::prepare;
use mmreg_core::{
    Error, ImageInput, ModelContext, MultiModalData, ProcessorInputs, Prompt, Registry,
};
use mmreg_models as _;
use support::fixture;

fn context(name: &str) -> ModelContext {
    let dir = fixture(name);
    mmreg_parity::unpack_tokenizer(&dir).expect("tokenizer");
    ModelContext::from_dir(&dir).expect("context")
}

fn image(name: &str) -> ImageInput {
    ImageInput::open(fixture("images").join(name)).expect("image")
}

fn inputs(prompt: Prompt, images: Vec<ImageInput>) -> ProcessorInputs {
    ProcessorInputs {
        prompt,
        multimodal: MultiModalData {
            images,
            videos: Vec::new(),
        },
    }
}

fn process(
    ctx: &ModelContext,
    prompt: Prompt,
    images: Vec<ImageInput>,
) -> mmreg_core::Result<Vec<u32>> {
    let entry = Registry::global().for_context(ctx).expect("registered");
    prepare(entry, ctx, inputs(prompt, images), usize::MAX).map(|p| p.processed.token_ids)
}

#[test]
fn paligemma_without_an_image_is_refused() {
    let ctx = context("paligemma-tiny");
    let error = process(&ctx, Prompt::Text("caption en".into()), Vec::new()).unwrap_err();
    assert!(matches!(error, Error::BadInput { .. }), "{error}");
    assert!(error.to_string().contains("at least one image"), "{error}");
}

#[test]
fn paligemma_with_fewer_image_markers_than_images_names_both_counts() {
    let ctx = context("paligemma-tiny");
    let two = vec![image("chelsea.png"), image("coffee.png")];
    let error = process(&ctx, Prompt::Text("<image>caption en".into()), two).unwrap_err();
    match error {
        Error::PlaceholderMismatch {
            placeholders,
            items,
            ..
        } => assert_eq!((placeholders, items), (1, 2)),
        other => panic!("{other}"),
    }
}

#[test]
fn paligemma_takes_ids_expanded_or_not_alike() {
    let ctx = context("paligemma-tiny");
    let text = process(
        &ctx,
        Prompt::Text("<image>caption en".into()),
        vec![image("chelsea.png")],
    )
    .expect("text");
    // HF's expanded ids back in, and the same ids with one marker per image.
    let again = process(
        &ctx,
        Prompt::TokenIds(text.clone()),
        vec![image("chelsea.png")],
    )
    .expect("expanded ids");
    assert_eq!(again, text);
    let image_token = text[0];
    let collapsed: Vec<u32> = std::iter::once(image_token)
        .chain(text.iter().copied().filter(|&t| t != image_token))
        .collect();
    let expanded = process(
        &ctx,
        Prompt::TokenIds(collapsed),
        vec![image("chelsea.png")],
    )
    .expect("one marker");
    assert_eq!(expanded, text);
}

#[test]
fn gemma3_marker_count_must_match_the_images() {
    let ctx = context("gemma3-tiny");
    let error = process(
        &ctx,
        Prompt::Text("<start_of_image><start_of_image>Compare.".into()),
        vec![image("chelsea.png")],
    )
    .unwrap_err();
    match error {
        Error::PlaceholderMismatch {
            placeholders,
            items,
            ..
        } => assert_eq!((placeholders, items), (2, 1)),
        other => panic!("{other}"),
    }
    // An image and no marker, as HF refuses it.
    let error = process(
        &ctx,
        Prompt::Text("Describe.".into()),
        vec![image("chelsea.png")],
    )
    .unwrap_err();
    assert!(
        matches!(error, Error::PlaceholderMismatch { .. }),
        "{error}"
    );
}

#[test]
fn gemma3_takes_its_expanded_ids_back() {
    let ctx = context("gemma3-tiny");
    let prompt = "<bos><start_of_turn>user\n<start_of_image>Describe.<end_of_turn>\n";
    let text = process(
        &ctx,
        Prompt::Text(prompt.into()),
        vec![image("chelsea.png")],
    )
    .expect("text");
    let again = process(
        &ctx,
        Prompt::TokenIds(text.clone()),
        vec![image("chelsea.png")],
    )
    .expect("ids");
    assert_eq!(again, text);
    // Text that starts with <bos> gets no second one; text without gets the tokenizer's.
    assert_eq!(text.iter().filter(|&&t| t == 2).count(), 1);
    let plain = process(
        &ctx,
        Prompt::Text("<start_of_image>Describe.".into()),
        vec![image("chelsea.png")],
    )
    .expect("plain");
    assert_eq!(plain[0], 2);
}

#[test]
fn an_unreadable_image_is_a_clear_error() {
    let error = ImageInput::decode("broken.png", b"\x89PNG\r\n\x1a\nnot really").unwrap_err();
    assert!(error.to_string().contains("broken.png"), "{error}");
}

#[test]
fn idefics3_marker_count_must_match_the_images() {
    let ctx = context("idefics3-tiny");
    let error = process(
        &ctx,
        Prompt::Text("User:<image><image>Compare.<end_of_utterance>\nAssistant:".into()),
        vec![image("chelsea.png")],
    )
    .unwrap_err();
    match error {
        Error::PlaceholderMismatch {
            placeholders,
            items,
            ..
        } => assert_eq!((placeholders, items), (2, 1)),
        other => panic!("{other}"),
    }
    // HF's expanded ids come back unchanged; a broken run of <image> tokens is bad input.
    let text = process(
        &ctx,
        Prompt::Text("User:<image>Describe.<end_of_utterance>\nAssistant:".into()),
        vec![image("chelsea.png")],
    )
    .expect("text");
    let again = process(
        &ctx,
        Prompt::TokenIds(text.clone()),
        vec![image("chelsea.png")],
    )
    .expect("ids");
    assert_eq!(again, text);
    let image_token = 32000;
    let first = text
        .iter()
        .position(|&t| t == image_token)
        .expect("an image token");
    let mut broken = text.clone();
    broken.remove(first);
    let error = process(&ctx, Prompt::TokenIds(broken), vec![image("chelsea.png")]).unwrap_err();
    assert!(matches!(error, Error::BadInput { .. }), "{error}");
}
