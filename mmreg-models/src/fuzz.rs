//! Entry points shared by the fuzz targets (`fuzz/`) and the regression test that replays the cases they
//! found (`tests/fuzz_regressions.rs`): the LLaVA and LLaVA-NeXT input processors, and config.json through
//! everything that reads it. Each must return normally for any input: errors are fine, panics and huge
//! allocations are not, and a broken invariant is a panic.

use std::path::Path;

use image::DynamicImage;
use mmreg_core::fuzz::scratch_file;
use mmreg_core::prepare::prepare;
use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    DummyRequest, Error, ImageInput, LoadOptions, Modality, ModalityCounts, ModelContext,
    MultiModalData, ProcessedInputs, ProcessorInputs, Prompt, Registry, Weights,
};
use tokenizers::Tokenizer;

use crate::LlavaConfig;

/// The tiny checkpoints in `fixtures/`: LLaVA-1.5, then LLaVA-NeXT.
const CHECKPOINTS: [&str; 2] = ["llava-tiny-hf", "llava-next-tiny-hf"];

/// Keeps each run fast: an image has at most this many pixels (far below `MAX_IMAGE_PIXELS`), whatever
/// its aspect ratio.
const MAX_FUZZ_PIXELS: u32 = 1 << 16;
const MAX_FUZZ_IMAGES: usize = 8;

fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tiny checkpoints' contexts with the fixture tokenizer, built once per process.
pub struct InputProcessorFuzz {
    models: Vec<(&'static ModelEntry, ModelContext)>,
    vocab: u32,
}

impl InputProcessorFuzz {
    /// `fixtures` is the repository's `fixtures/` directory.
    pub fn new(fixtures: &Path) -> Self {
        let tokenizer = Tokenizer::from_file(fixtures.join("tokenizer/tokenizer.json"))
            .expect("the fixture tokenizer loads");
        let image_token = tokenizer
            .token_to_id("<image>")
            .expect("the fixture tokenizer has <image>");
        let models = CHECKPOINTS
            .iter()
            .map(|name| {
                let dir = fixtures.join(name);
                let mut config = read_json(&dir.join("config.json"));
                // The tiny configs mark images with id 0 (their goldens use token ids); a text prompt
                // needs the tokenizer's `<image>`.
                config["image_token_index"] = image_token.into();
                let processor = read_json(&dir.join("preprocessor_config.json"));
                let ctx =
                    ModelContext::from_json(config, processor).with_tokenizer(tokenizer.clone());
                let entry = Registry::global()
                    .for_context(&ctx)
                    .expect("the fixture's architecture is registered");
                (entry, ctx)
            })
            .collect();
        Self {
            models,
            vocab: tokenizer.get_vocab_size(true) as u32,
        }
    }

    /// A prompt and images from arbitrary bytes through the model's registered input processor and
    /// mapper (`generate::prepare`). Byte 0 picks the model (bit 0) and a text or token-id prompt (bit 1),
    /// byte 1 the number of images, then 4 bytes per image (width, height: u16 LE), then the prompt
    /// (UTF-8, lossily, or u16 LE token ids).
    ///
    /// Checked: an error is one of the typed errors a request may get and agrees with the inputs; a
    /// success has one placeholder range per image, as long as the model counts for it, made of image
    /// tokens only, and the prompt's other tokens in their order.
    pub fn run(&self, bytes: &[u8]) {
        let [flags, images, rest @ ..] = bytes else {
            return;
        };
        let (entry, ctx) = &self.models[usize::from(flags & 1)];
        let count = usize::from(*images) % (MAX_FUZZ_IMAGES + 1);
        let Some((sizes, prompt)) = rest.split_at_checked(4 * count) else {
            return;
        };
        let images: Vec<ImageInput> = sizes
            .chunks_exact(4)
            .enumerate()
            .map(|(i, size)| {
                let width = u32::from(u16::from_le_bytes([size[0], size[1]]));
                let height = u32::from(u16::from_le_bytes([size[2], size[3]]));
                let height = height.min(MAX_FUZZ_PIXELS / width.max(1));
                ImageInput::new(format!("image {i}"), DynamicImage::new_rgb8(width, height))
            })
            .collect();
        let prompt = if flags & 2 == 0 {
            Prompt::Text(String::from_utf8_lossy(prompt).into_owned())
        } else {
            Prompt::TokenIds(
                prompt
                    .chunks_exact(2)
                    .map(|id| u32::from(u16::from_le_bytes([id[0], id[1]])) % self.vocab)
                    .collect(),
            )
        };

        let config = ctx
            .config::<LlavaConfig>()
            .expect("the fixture config parses");
        let image_token = config.image_token_index;
        let max_len = config
            .text()
            .expect("the fixture config resolves")
            .max_position_embeddings
            - 1;
        let ids = match &prompt {
            Prompt::TokenIds(ids) => Some(ids.clone()),
            Prompt::Text(text) => ctx
                .tokenizer()
                .expect("the context has a tokenizer")
                .encode(text.as_str(), true)
                .ok()
                .map(|encoding| encoding.get_ids().to_vec()),
        };
        let markers = ids
            .iter()
            .flatten()
            .filter(|&&id| id == image_token)
            .count();
        let empty_image = images
            .iter()
            .any(|i| i.image.width() == 0 || i.image.height() == 0);
        let data = MultiModalData::with_images(images);
        // The model's own count per image, independent of the input processor.
        let counts = entry.item_tokens(ctx, Modality::Image, &data);
        let items = data.images.len();
        let inputs = ProcessorInputs {
            prompt,
            multimodal: data,
        };
        match (prepare(entry, ctx, inputs, max_len), ids, counts) {
            (Ok(prepared), Some(ids), Ok(counts)) => {
                assert_eq!(prepared.mapped.len(), usize::from(items > 0));
                check_expansion(&ids, image_token, &counts, &prepared.processed);
            }
            (Ok(_), ids, counts) => panic!(
                "processed, yet the prompt does not tokenize ({}) or the model cannot count the images ({:?})",
                ids.is_some(),
                counts.err()
            ),
            (Err(Error::PlaceholderMismatch { placeholders, items: given, .. }), Some(_), _) => {
                assert_eq!((placeholders, given), (markers, items));
                assert_ne!(markers, items, "a mismatch of equal numbers");
            }
            (Err(Error::PromptTooLong { len, max }), Some(ids), Ok(counts)) => {
                assert_eq!(len, ids.len() - markers + counts.iter().sum::<usize>());
                assert!(len > max, "{len} tokens are refused under the limit {max}");
            }
            (Err(Error::EmptyPrompt), Some(ids), _) => assert!(ids.is_empty() && items == 0),
            // An image the model cannot count or the mapper cannot process; a prompt that does not tokenize.
            (Err(Error::BadInput { .. }), ids, counts)
                if empty_image || ids.is_none() || counts.is_err() => {}
            (Err(error), _, _) => panic!("unexpected error: {error}"),
        }
    }
}

/// The invariants of a successful placeholder expansion of `ids` for images of `counts` tokens.
fn check_expansion(ids: &[u32], image_token: u32, counts: &[usize], processed: &ProcessedInputs) {
    let tokens = &processed.token_ids;
    assert_eq!(processed.placeholders.len(), counts.len());
    let mut end = 0;
    for (item, (range, &count)) in processed.placeholders.iter().zip(counts).enumerate() {
        assert_eq!((range.modality, range.item), (Modality::Image, item));
        assert_eq!(range.length, count, "image {item}'s placeholder length");
        assert!(
            range.offset >= end,
            "placeholder ranges overlap or are out of order"
        );
        end = range.offset + range.length;
        assert!(
            tokens[range.offset..end].iter().all(|&t| t == image_token),
            "image {item}'s range holds other tokens"
        );
    }
    let placeholder_ids = tokens.iter().filter(|&&t| t == image_token).count();
    assert_eq!(placeholder_ids, counts.iter().sum::<usize>());
    assert!(
        tokens
            .iter()
            .filter(|&&t| t != image_token)
            .eq(ids.iter().filter(|&&t| t != image_token)),
        "the text around the images changed"
    );
}

/// The tiny checkpoints' weights, which every registered model loads under a fuzzed config.json.
pub struct ConfigFuzz {
    models: Vec<(&'static ModelEntry, Weights)>,
}

impl ConfigFuzz {
    /// `fixtures` is the repository's `fixtures/` directory.
    pub fn new(fixtures: &Path) -> Self {
        let models = CHECKPOINTS
            .iter()
            .map(|name| {
                let dir = fixtures.join(name);
                let ctx = ModelContext::from_dir(&dir).expect("the fixture's context");
                let entry = Registry::global()
                    .for_context(&ctx)
                    .expect("the fixture's architecture is registered");
                (
                    entry,
                    Weights::from_dir(&dir).expect("the fixture's weights"),
                )
            })
            .collect();
        Self { models }
    }

    /// Arbitrary bytes as config.json, read by `ModelContext::from_dir`, then, for every registered model
    /// whatever `architectures` says: max tokens, dummy data through the input processor, and loading
    /// the fixture's weights.
    ///
    /// Checked: dummy data that a config gives is processed without error, and no dummy image takes
    /// more tokens than the model's registered maximum.
    pub fn run(&self, bytes: &[u8]) {
        let (dir, _) = scratch_file("config.json", bytes);
        let Ok(ctx) = ModelContext::from_dir(dir.path()) else {
            return;
        };
        let _ = Registry::global().for_context(&ctx);
        let request = DummyRequest {
            seq_len: 64,
            counts: ModalityCounts::each(&[Modality::Image], 1),
        };
        for (entry, weights) in &self.models {
            let max_tokens = entry.max_tokens(&ctx, Modality::Image);
            if let Ok(dummy) = entry.dummy_data(&ctx, &request) {
                let processed = entry.process(&ctx, dummy).unwrap_or_else(|e| {
                    panic!("{}: the dummy data is refused: {e}", entry.id.name)
                });
                let max_tokens =
                    max_tokens.expect("a model that gives dummy data counts its maximum");
                for length in processed.placeholder_lengths(Modality::Image) {
                    assert!(
                        length <= max_tokens,
                        "a dummy image takes {length} > {max_tokens} tokens"
                    );
                }
            }
            let _ = entry.load(&ctx, weights, &LoadOptions::default());
        }
    }
}
