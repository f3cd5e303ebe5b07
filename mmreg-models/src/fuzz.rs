//! Entry points shared by the fuzz targets (`fuzz/`) and the regression test that replays the cases they
//! found (`tests/fuzz_regressions.rs`): the LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, PaliGemma and Gemma 3
//! input processors,
//! and config.json through everything that reads it. Each must return normally for any input: errors are
//! fine, panics and huge allocations are not, and a broken invariant is a panic.

use std::path::Path;

use image::DynamicImage;
use mmreg_core::fuzz::scratch_file;
use mmreg_core::prepare::{prepare, PreparedInputs};
use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    DummyRequest, Error, ImageInput, LoadOptions, Modality, ModalityCounts, ModelContext,
    MultiModalData, ProcessedInputs, ProcessorInputs, Prompt, Registry, VideoInput, Weights,
};
use tokenizers::Tokenizer;

use crate::{LlavaConfig, Qwen2VlConfig};

/// The tiny checkpoints in `fixtures/`: LLaVA-1.5, then LLaVA-NeXT.
const CHECKPOINTS: [&str; 2] = ["llava-tiny-hf", "llava-next-tiny-hf"];
/// The tiny Qwen checkpoints (with their Qwen tokenizer): Qwen2-VL, then Qwen2.5-VL.
const QWEN_CHECKPOINTS: [&str; 2] = ["qwen2-vl-tiny", "qwen2_5-vl-tiny"];
/// The length limit of a fuzzed Qwen prompt: low enough that expanded items reach it.
const MAX_QWEN_LEN: usize = 512;
/// The parity harness's Gemma-family checkpoints (gzipped real tokenizers): PaliGemma, then Gemma 3.
const GEMMA_CHECKPOINTS: [&str; 2] = ["paligemma-tiny", "gemma3-tiny"];
/// The length limit of a fuzzed Gemma-family prompt.
const MAX_GEMMA_LEN: usize = 2048;

/// A fixture's context, its `tokenizer.json.gz` unpacked first where needed.
fn gzipped_context(dir: &Path) -> ModelContext {
    use std::io::Read;
    let plain = dir.join("tokenizer.json");
    if !plain.exists() {
        let mut json = Vec::new();
        let packed = std::fs::File::open(dir.join("tokenizer.json.gz")).expect("tokenizer.json.gz");
        flate2::read::GzDecoder::new(packed)
            .read_to_end(&mut json)
            .expect("gzip");
        let tokenizer = Tokenizer::from_bytes(&json).expect("the fixture tokenizer loads");
        return ModelContext::from_dir(dir)
            .expect("the fixture's context")
            .with_tokenizer(tokenizer);
    }
    ModelContext::from_dir(dir).expect("the fixture's context")
}

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
    qwen: Vec<(&'static ModelEntry, ModelContext)>,
    gemma: Vec<(&'static ModelEntry, ModelContext)>,
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
        let qwen = QWEN_CHECKPOINTS
            .iter()
            .map(|name| {
                let ctx =
                    ModelContext::from_dir(fixtures.join(name)).expect("the fixture's context");
                let entry = Registry::global()
                    .for_context(&ctx)
                    .expect("the fixture's architecture is registered");
                (entry, ctx)
            })
            .collect();
        let gemma = GEMMA_CHECKPOINTS
            .iter()
            .map(|name| {
                let ctx = gzipped_context(&fixtures.join(name));
                let entry = Registry::global()
                    .for_context(&ctx)
                    .expect("the fixture's architecture is registered");
                (entry, ctx)
            })
            .collect();
        Self {
            models,
            vocab: tokenizer.get_vocab_size(true) as u32,
            qwen,
            gemma,
        }
    }

    /// A prompt and images from arbitrary bytes through the model's registered input processor and
    /// mapper (`generate::prepare`). Byte 0 picks the model (bit 0) and a text or token-id prompt (bit 1),
    /// byte 1 the number of images, then 4 bytes per image (width, height: u16 LE), then the prompt
    /// (UTF-8, lossily, or u16 LE token ids). With bit 2 of byte 0, a Qwen checkpoint takes the bytes
    /// instead ([`Self::run_qwen`]); with bit 3, a Gemma-family one ([`Self::run_gemma`]).
    ///
    /// Checked: an error is one of the typed errors a request may get and agrees with the inputs; a
    /// success has one placeholder range per image, as long as the model counts for it, made of image
    /// tokens only, and the prompt's other tokens in their order.
    pub fn run(&self, bytes: &[u8]) {
        let [flags, images, rest @ ..] = bytes else {
            return;
        };
        if flags & 8 != 0 {
            return self.run_gemma(*flags, *images, rest);
        }
        if flags & 4 != 0 {
            return self.run_qwen(*flags, *images, rest);
        }
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

impl InputProcessorFuzz {
    /// Images, videos and a prompt with placeholder tokens from arbitrary bytes through a tiny Qwen
    /// checkpoint's input processor and mappers. `flags` bit 0 picks Qwen2-VL or Qwen2.5-VL, bit 1 a text
    /// or a token-id prompt; `counts` gives the number of images (low nibble, mod 5) and videos (high
    /// nibble, mod 3). Then 2 bytes per image (width, height), 4 per video (frames mod 9, width, height,
    /// and a byte whose bit 0 widens the last frame by a pixel and whose other bits give the fps: none,
    /// n/4, or 0 for 127), then the prompt: UTF-8, lossily, or u16 LE values that are, mod 8,
    /// `<|image_pad|>`, `<|video_pad|>`, `<|vision_start|>`, `<|vision_end|>` or (else) another token.
    ///
    /// Checked: bad items (empty, over the aspect ratio, frames of two sizes, no frames, fps 0 where
    /// Qwen2.5-VL reads it) are refused as bad input and nothing else is; otherwise the outcome is the one
    /// the numbers call for (a placeholder mismatch, an empty or over-long prompt), and a success has one
    /// placeholder range per item as long as the model counts, made of its pad token only, the prompt's
    /// other tokens in order, mapped grids that give the same counts, and M-RoPE positions whose three
    /// rows agree on every text token.
    pub fn run_qwen(&self, flags: u8, counts: u8, bytes: &[u8]) {
        let (entry, ctx) = &self.qwen[usize::from(flags & 1)];
        let config = ctx
            .config::<Qwen2VlConfig>()
            .expect("the fixture config parses");
        let tokenizer = ctx.tokenizer().expect("the fixture has a tokenizer");
        let pads = [config.image_token_id, config.video_token_id];
        let vision_end = tokenizer
            .token_to_id("<|vision_end|>")
            .expect("the Qwen tokenizer has <|vision_end|>");
        let given = [usize::from(counts & 15) % 5, usize::from(counts >> 4) % 3];
        let Some((sizes, rest)) = bytes.split_at_checked(2 * given[0]) else {
            return;
        };
        let Some((videos, prompt)) = rest.split_at_checked(4 * given[1]) else {
            return;
        };
        let blank = |w: u8, h: u8| DynamicImage::new_rgb8(w.into(), h.into());
        let images = sizes
            .chunks_exact(2)
            .enumerate()
            .map(|(i, s)| ImageInput::new(format!("image {i}"), blank(s[0], s[1])))
            .collect();
        let mut zero_fps = false;
        let videos = videos
            .chunks_exact(4)
            .enumerate()
            .map(|(i, v)| {
                let mut frames = vec![blank(v[1], v[2]); usize::from(v[0] % 9)];
                if let (Some(last), 1) = (frames.last_mut(), v[3] & 1) {
                    *last = DynamicImage::new_rgb8(u32::from(v[1]) + 1, v[2].into());
                }
                let video = VideoInput::new(format!("video {i}"), frames);
                match v[3] >> 1 {
                    0 => video,
                    127 => {
                        zero_fps = true;
                        video.with_fps(0.0)
                    }
                    n => video.with_fps(f64::from(n) / 4.0),
                }
            })
            .collect();
        let prompt = if flags & 2 == 0 {
            Prompt::Text(String::from_utf8_lossy(prompt).into_owned())
        } else {
            let vocab = tokenizer.get_vocab_size(true) as u32;
            let special = [pads[0], pads[1], config.vision_start_token_id, vision_end];
            Prompt::TokenIds(
                prompt
                    .chunks_exact(2)
                    .map(|c| {
                        let v = u16::from_le_bytes([c[0], c[1]]);
                        special
                            .get(usize::from(v % 8))
                            .copied()
                            .unwrap_or(u32::from(v >> 3) * 19 % vocab)
                    })
                    .collect(),
            )
        };
        let ids = match &prompt {
            Prompt::TokenIds(ids) => Some(ids.clone()),
            Prompt::Text(text) => tokenizer
                .encode(text.as_str(), true)
                .ok()
                .map(|encoding| encoding.get_ids().to_vec()),
        };
        let data = MultiModalData { images, videos };
        // The model's own count per item, independent of the input processor.
        let counts = [Modality::Image, Modality::Video].map(|m| entry.item_tokens(ctx, m, &data));
        let inputs = ProcessorInputs {
            prompt,
            multimodal: data,
        };
        let result = prepare(entry, ctx, inputs, MAX_QWEN_LEN);
        let bad_items = counts.iter().any(Result::is_err) || (zero_fps && flags & 1 == 1);
        let (Some(ids), [Ok(images), Ok(videos)], false) = (ids, counts, bad_items) else {
            match result {
                Err(Error::BadInput { .. }) => return,
                Err(error) => panic!("a bad item or prompt, yet: {error}"),
                Ok(_) => panic!("a bad item or a prompt that does not tokenize was accepted"),
            }
        };
        let counts = [images, videos];
        let found = pads.map(|pad| ids.iter().filter(|&&id| id == pad).count());
        let len = ids.len() - found.iter().sum::<usize>() + counts.iter().flatten().sum::<usize>();
        match result {
            Err(Error::PlaceholderMismatch {
                modality,
                placeholders,
                items,
                ..
            }) => {
                let m = usize::from(modality == Modality::Video);
                assert_eq!((placeholders, items), (found[m], given[m]));
                assert_ne!(placeholders, items, "a mismatch of equal numbers");
                assert!(m == 0 || found[0] == given[0], "images are matched first");
            }
            _ if found != given => panic!("{found:?} placeholders for {given:?} items: {result:?}"),
            Err(Error::EmptyPrompt) => assert!(ids.is_empty()),
            Err(Error::PromptTooLong { len: l, max }) => {
                assert_eq!((l, max), (len, MAX_QWEN_LEN));
                assert!(len > max, "{len} tokens are refused under the limit {max}");
            }
            Ok(prepared) => {
                assert!(
                    !ids.is_empty() && len <= MAX_QWEN_LEN,
                    "{len} tokens accepted"
                );
                check_qwen_expansion(&ids, pads, &counts, &prepared);
            }
            Err(error) => panic!("unexpected error: {error}"),
        }
    }
}

/// The invariants of a successful Qwen expansion of `ids` whose items of each modality take `counts`.
fn check_qwen_expansion(
    ids: &[u32],
    pads: [u32; 2],
    counts: &[Vec<usize>; 2],
    prepared: &PreparedInputs,
) {
    let processed = &prepared.processed;
    let tokens = &processed.token_ids;
    let modalities = [Modality::Image, Modality::Video];
    let mut ranges = processed.placeholders.clone();
    ranges.sort_by_key(|r| r.offset);
    // One range per pad of the prompt, in its order, each item in turn.
    let order: Vec<usize> = ids
        .iter()
        .filter_map(|id| pads.iter().position(|p| p == id))
        .collect();
    assert_eq!(ranges.len(), order.len());
    let (mut next, mut end) = ([0, 0], 0);
    for (range, &m) in ranges.iter().zip(&order) {
        assert_eq!((range.modality, range.item), (modalities[m], next[m]));
        assert_eq!(range.length, counts[m][next[m]], "{range:?}");
        assert!(range.offset >= end, "placeholder ranges overlap");
        end = range.offset + range.length;
        assert!(tokens[range.offset..end].iter().all(|&t| t == pads[m]));
        next[m] += 1;
    }
    let text = |t: &&u32| !pads.contains(t);
    assert!(
        tokens.iter().filter(text).eq(ids.iter().filter(text)),
        "the text around the items changed"
    );
    assert_eq!(
        tokens.len() - tokens.iter().filter(text).count(),
        counts.iter().flatten().sum::<usize>()
    );
    let positions = processed.positions.as_ref().expect("M-RoPE positions");
    assert_eq!((positions.sections, positions.len()), (3, tokens.len()));
    let max = positions.ids.iter().copied().max().unwrap_or(-1);
    assert_eq!(positions.delta, max + 1 - tokens.len() as i64);
    for (i, _) in tokens.iter().enumerate().filter(|(_, t)| text(t)) {
        let at = |s| positions.at(s, i);
        assert!(
            at(0) == at(1) && at(1) == at(2),
            "text token {i} at {:?}",
            [at(0), at(1), at(2)]
        );
    }
    for (m, (pixels, grid)) in [
        ("pixel_values", "image_grid_thw"),
        ("pixel_values_videos", "video_grid_thw"),
    ]
    .into_iter()
    .enumerate()
    {
        let mapped = prepared
            .mapped
            .iter()
            .find(|(modality, _)| *modality == modalities[m]);
        let Some((_, tensors)) = mapped else {
            assert!(
                counts[m].is_empty(),
                "{} items were not mapped",
                modalities[m]
            );
            continue;
        };
        let get = |name: &str| tensors.iter().find(|(n, _)| *n == name).expect(name).1;
        let grids = Vec::<i64>::try_from(get(grid).flatten(0, -1)).expect("i64 grids");
        let patches: Vec<i64> = grids.chunks(3).map(|g| g.iter().product()).collect();
        let tokens: Vec<usize> = patches.iter().map(|&p| p as usize / 4).collect();
        assert_eq!(tokens, counts[m], "the mapped {grid} counts differently");
        assert_eq!(get(pixels).size()[0], patches.iter().sum::<i64>());
    }
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

impl InputProcessorFuzz {
    /// Images and a prompt from arbitrary bytes through PaliGemma's or Gemma 3's input processor and
    /// mapper (`flags` bit 0 picks the model, bit 1 a text or a token-id prompt, bit 4 turns Gemma 3's
    /// pan-and-scan on); `count` mod 5 images of 2 bytes each (width, height), then the prompt: UTF-8,
    /// lossily, or u16 LE values that are, mod 4, the model's image marker, its image token, BOS, or
    /// (else) another token.
    ///
    /// Checked: an error is a typed one a request may get (a count of markers that differs from the
    /// images, an image-less PaliGemma prompt, a prompt over the limit, bad input); a success has one
    /// placeholder range per image whose embedded positions hold the image token only and number what
    /// the tower gives (256 per image, and per crop), and bidirectional runs inside the prompt: the whole
    /// prompt for PaliGemma, each image's runs of soft tokens for Gemma 3.
    pub fn run_gemma(&self, flags: u8, count: u8, bytes: &[u8]) {
        let (entry, ctx) = &self.gemma[usize::from(flags & 1)];
        let gemma3 = flags & 1 == 1;
        let count = usize::from(count % 5);
        let Some((sizes, prompt)) = bytes.split_at_checked(2 * count) else {
            return;
        };
        let images: Vec<ImageInput> = sizes
            .chunks_exact(2)
            .enumerate()
            .map(|(i, s)| {
                // Sizes up to 255 × 8 pixels, wide or tall: enough to start pan-and-scan.
                let (w, h) = (u32::from(s[0]) * 8, u32::from(s[1]) * 8);
                ImageInput::new(format!("image {i}"), DynamicImage::new_rgb8(w, h))
            })
            .collect();
        let (marker, image_token) = if gemma3 {
            let c = ctx.config::<crate::Gemma3Config>().expect("config");
            (c.boi_token_index, c.image_token_index)
        } else {
            let c = ctx.config::<crate::PaliGemmaConfig>().expect("config");
            (c.image_token_index, c.image_token_index)
        };
        let prompt = if flags & 2 == 0 {
            Prompt::Text(String::from_utf8_lossy(prompt).into_owned())
        } else {
            Prompt::TokenIds(
                prompt
                    .chunks_exact(2)
                    .map(|v| match u16::from_le_bytes([v[0], v[1]]) {
                        v if v % 4 == 0 => marker,
                        v if v % 4 == 1 => image_token,
                        v if v % 4 == 2 => 2,
                        v => u32::from(v) + 3,
                    })
                    .collect(),
            )
        };
        let ctx = if gemma3 && flags & 16 != 0 {
            let mut processor = ctx.processor_config_json().clone();
            processor["do_pan_and_scan"] = true.into();
            &ModelContext::from_json(ctx.config_json().clone(), processor)
                .with_tokenizer(ctx.tokenizer().expect("tokenizer").clone())
        } else {
            ctx
        };
        let empty_image = images
            .iter()
            .any(|i| i.image.width() == 0 || i.image.height() == 0);
        let data = MultiModalData::with_images(images);
        let rows: Result<Vec<usize>, Error> = if gemma3 {
            let processor = mmreg_image::Gemma3ImageProcessor::new(
                &ctx.processor_config::<mmreg_image::PreprocessorConfig>()
                    .expect("processor config"),
            )
            .expect("processor");
            Ok(data
                .images
                .iter()
                .map(|i| {
                    let s = i.size();
                    256 * (1 + processor.crops(s.width as usize, s.height as usize).len())
                })
                .collect())
        } else {
            Ok(vec![256; data.images.len()])
        };
        let items = data.images.len();
        let inputs = ProcessorInputs {
            prompt,
            multimodal: data,
        };
        match prepare(entry, ctx, inputs, MAX_GEMMA_LEN) {
            Ok(prepared) => {
                let p = &prepared.processed;
                let rows = rows.expect("counted");
                assert_eq!(p.placeholders.len(), items);
                for (range, &want) in p.placeholders.iter().zip(&rows) {
                    let tokens = &p.token_ids[range.offset..range.offset + range.length];
                    let embedded: Vec<u32> = match &range.is_embed {
                        Some(mask) => tokens
                            .iter()
                            .zip(mask.iter())
                            .filter(|(_, &e)| e)
                            .map(|(&t, _)| t)
                            .collect(),
                        None => tokens.to_vec(),
                    };
                    assert_eq!(embedded.len(), want, "image {}'s rows", range.item);
                    assert!(
                        embedded.iter().all(|&t| t == image_token),
                        "a placeholder that is not the image token"
                    );
                }
                let len = p.token_ids.len();
                assert!(p
                    .bidirectional
                    .iter()
                    .all(|r| r.start < r.end && r.end <= len));
                if gemma3 {
                    assert!(p
                        .bidirectional
                        .iter()
                        .all(|r| p.token_ids[r.clone()].iter().all(|&t| t == image_token)));
                } else {
                    let whole = 0..len;
                    assert_eq!(p.bidirectional, vec![whole]);
                }
            }
            Err(Error::PlaceholderMismatch {
                placeholders,
                items: given,
                ..
            }) => {
                assert_eq!(given, items);
                assert_ne!(placeholders, given, "a mismatch of equal numbers");
            }
            Err(Error::PromptTooLong { len, max }) => assert!(len > max),
            Err(Error::EmptyPrompt) => {}
            Err(Error::BadInput { .. }) => {}
            Err(error) if empty_image => drop(error),
            Err(error) => panic!("unexpected error: {error}"),
        }
    }
}
