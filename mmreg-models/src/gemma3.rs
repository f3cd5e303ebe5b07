//! Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP vision tower at 896 px, a projector that
//! average-pools its 64 × 64 patches to 16 × 16, normalises and projects them, and the Gemma 3 decoder
//! (QK-norm, sandwich norms, five sliding-window layers to one global). Each image is 256 tokens,
//! framed by `<start_of_image>` / `<end_of_image>` and attending to each other both ways; with
//! pan-and-scan, a long image's crops follow it, each framed alike.

use mmreg_core::defaults::{interleaved_placeholders, placeholder_span};
use mmreg_core::{
    register_input_mapper, register_input_processor, register_model, Error, ImageInput, ImageSize,
    LanguageModel, LoadModel, LoadOptions, Modality, ModalityInputs, ModelContext, MultiModalModel,
    ProcessedInputs, ProcessorInputs, Prompt, Result, SupportsVision, Weights,
};
use mmreg_image::{Gemma3ImageProcessor, PreprocessorConfig};
use mmreg_nn::gemma::{Gemma, GemmaConfigJson, GemmaRmsNorm};
use mmreg_nn::siglip::{SiglipVisionConfig, SiglipVisionTower};
use mmreg_nn::Loader;
use serde::Deserialize;
use tch::{Kind, Tensor};

/// config.json of a Gemma 3 checkpoint; missing keys take `Gemma3Config`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Gemma3Config {
    pub mm_tokens_per_image: i64,
    pub boi_token_index: u32,
    pub eoi_token_index: u32,
    #[serde(alias = "image_token_id")]
    pub image_token_index: u32,
    pub vision_config: SiglipVisionConfig,
    pub text_config: GemmaConfigJson,
}

impl Default for Gemma3Config {
    fn default() -> Self {
        Self {
            mm_tokens_per_image: 256,
            boi_token_index: 255_999,
            eoi_token_index: 256_000,
            image_token_index: 262_144,
            vision_config: SiglipVisionConfig {
                hidden_size: 1152,
                intermediate_size: 4304,
                num_hidden_layers: 27,
                num_attention_heads: 16,
                image_size: 896,
                patch_size: 14,
                ..SiglipVisionConfig::default()
            },
            text_config: GemmaConfigJson {
                model_type: Some("gemma3_text".into()),
                ..GemmaConfigJson::default()
            },
        }
    }
}

impl Gemma3Config {
    /// `(patches per side, pooled tokens per side)`, once they divide.
    fn pooling(&self) -> Result<(i64, i64)> {
        let patches = self.vision_config.patches_per_side()?;
        let side = (self.mm_tokens_per_image as f64).sqrt() as i64;
        if side <= 0 || side * side != self.mm_tokens_per_image || patches % side != 0 {
            return Err(Error::config(
                "config.json",
                format!(
                    "mm_tokens_per_image {} must be the square of a divisor of the {patches} patches per side",
                    self.mm_tokens_per_image
                ),
            ));
        }
        Ok((patches, side))
    }
}

fn image_processor(ctx: &ModelContext) -> Result<Gemma3ImageProcessor> {
    Gemma3ImageProcessor::new(&*ctx.processor_config::<PreprocessorConfig>()?)
        .map_err(|e| Error::config("preprocessor_config.json", e))
}

/// Images as the tower takes them: each image then its pan-and-scan crops, `[Σ (1 + crops), 3, H, W]`,
/// and each image's crop count.
#[derive(Debug, ModalityInputs)]
pub struct Gemma3ImageInputs {
    pub pixel_values: Tensor,
    #[inputs(host)]
    pub num_crops: Tensor,
}

/// Gemma 3's image processor on each image.
pub fn map_images(ctx: &ModelContext, images: &[ImageInput]) -> Result<Gemma3ImageInputs> {
    let processor = image_processor(ctx)?;
    let mut data = Vec::new();
    let mut crops = Vec::with_capacity(images.len());
    let mut shape = [0, 3, 0, 0];
    let mut rows = 0;
    for image in images {
        let pixels = processor
            .preprocess(&image.image)
            .map_err(|e| Error::bad_input(&*image.name, e))?;
        shape = pixels.shape;
        rows += pixels.shape[0];
        crops.push(pixels.shape[0] as i64 - 1);
        data.extend_from_slice(&pixels.data);
    }
    let [_, c, h, w] = shape.map(|d| d as i64);
    Ok(Gemma3ImageInputs {
        pixel_values: Tensor::from_slice(&data).reshape([rows as i64, c, h, w]),
        num_crops: Tensor::from_slice(&crops),
    })
}

/// `multi_modal_projector`: average pooling to `mm_tokens_per_image`, RMSNorm, projection.
struct Gemma3MultiModalProjector {
    mm_input_projection_weight: Tensor,
    mm_soft_emb_norm: GemmaRmsNorm,
    patches_per_side: i64,
    kernel: i64,
}

impl Gemma3MultiModalProjector {
    fn forward(&self, vision_outputs: &Tensor) -> Tensor {
        let (n, _, hidden) = vision_outputs.size3().expect("[images, patches, hidden]");
        let p = self.patches_per_side;
        let grid = vision_outputs
            .transpose(1, 2)
            .reshape([n, hidden, p, p])
            .contiguous();
        let pooled = grid
            .avg_pool2d(
                [self.kernel, self.kernel],
                [self.kernel, self.kernel],
                [0, 0],
                false,
                true,
                None::<i64>,
            )
            .flatten(2, -1)
            .transpose(1, 2);
        let normed = self.mm_soft_emb_norm.forward(&pooled);
        normed
            .matmul(&self.mm_input_projection_weight)
            .to_kind(vision_outputs.kind())
    }
}

#[register_model("Gemma3ForConditionalGeneration")]
#[register_input_mapper(image = map_images)]
#[register_input_processor(input_processor)]
pub struct Gemma3 {
    vision_tower: SiglipVisionTower,
    multi_modal_projector: Gemma3MultiModalProjector,
    language_model: Gemma,
}

impl LoadModel for Gemma3 {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        let config = ctx.config::<Gemma3Config>()?;
        let weights = weights.renamed(crate::llava::canonical_weight_name)?;
        let loader = Loader::new(&weights, options);
        let text = config.text_config.resolve()?;
        let vision = &config.vision_config;
        let (patches_per_side, side) = config.pooling()?;
        let projector = loader.pp("multi_modal_projector");
        let model = Self {
            vision_tower: SiglipVisionTower::load(&loader.pp("vision_tower"), vision)?,
            multi_modal_projector: Gemma3MultiModalProjector {
                mm_input_projection_weight: projector.get(
                    "mm_input_projection_weight",
                    &[vision.hidden_size, text.hidden_size],
                )?,
                mm_soft_emb_norm: GemmaRmsNorm::load(
                    &projector.pp("mm_soft_emb_norm"),
                    vision.hidden_size,
                    vision.layer_norm_eps,
                )?,
                patches_per_side,
                kernel: patches_per_side / side,
            },
            language_model: Gemma::load(&loader.pp("language_model"), &loader.pp("lm_head"), text)?,
        };
        weights.check_all_used()?;
        Ok(model)
    }
}

impl SupportsVision for Gemma3 {
    type ImageInputs = Gemma3ImageInputs;

    /// 256 tokens; with pan-and-scan crops, the span from the image's first soft token to its last
    /// crop's (whose 256 each are the embedded ones).
    fn num_image_tokens(ctx: &ModelContext, size: ImageSize) -> Result<usize> {
        let crops = image_processor(ctx)?
            .crops(size.width as usize, size.height as usize)
            .len();
        let config = ctx.config::<Gemma3Config>()?;
        if crops == 0 {
            return Ok(config.mm_tokens_per_image as usize);
        }
        placeholder_span(
            ctx,
            &Prompts::new(ctx, &config)?.image(crops),
            config.image_token_index,
        )
    }

    /// The marker a prompt writes for an image: `<start_of_image>`, which the input processor expands.
    fn image_token_id(ctx: &ModelContext) -> Result<u32> {
        Ok(ctx.config::<Gemma3Config>()?.boi_token_index)
    }

    /// The most crops pan-and-scan makes: a strip `max_num_crops` minimum crops long (just the tower's
    /// square without pan-and-scan).
    fn largest_image(ctx: &ModelContext) -> Result<ImageSize> {
        let config = ctx.processor_config::<PreprocessorConfig>()?;
        if !config.do_pan_and_scan.unwrap_or(false) {
            let side = ctx.config::<Gemma3Config>()?.vision_config.image_size as u32;
            return Ok(ImageSize {
                width: side,
                height: side,
            });
        }
        let min = config.pan_and_scan_min_crop_size.unwrap_or(256).max(1) as u32;
        let most = config.pan_and_scan_max_num_crops.unwrap_or(4).max(1) as u32;
        Ok(ImageSize {
            width: min * most,
            height: min,
        })
    }

    /// Each image's and crop's 256 rows, one tensor per image.
    fn embed_images(&self, inputs: Gemma3ImageInputs) -> Result<Vec<Tensor>> {
        let features = self
            .multi_modal_projector
            .forward(&self.vision_tower.forward(&inputs.pixel_values)?);
        let crops = Vec::<i64>::try_from(inputs.num_crops.to_kind(Kind::Int64))?;
        let sizes: Vec<i64> = crops.iter().map(|c| c + 1).collect();
        if sizes.iter().sum::<i64>() != features.size()[0] {
            return Err(Error::Model(format!(
                "Gemma 3: {} pixel-value images for crop counts {crops:?}",
                features.size()[0]
            )));
        }
        Ok(features
            .split_with_sizes(&sizes, 0)
            .into_iter()
            .map(|f| f.flatten(0, 1))
            .collect())
    }
}

impl MultiModalModel for Gemma3 {
    fn language_model(&self) -> &dyn LanguageModel {
        &self.language_model
    }
}

/// The text `Gemma3Processor` writes for an image.
struct Prompts {
    boi: String,
    /// `\n\n<start_of_image>` + the soft tokens + `<end_of_image>\n\n`.
    sequence: String,
}

impl Prompts {
    fn new(ctx: &ModelContext, config: &Gemma3Config) -> Result<Self> {
        let tokenizer = ctx.tokenizer()?;
        let name = |id: u32| {
            tokenizer.id_to_token(id).ok_or_else(|| {
                Error::config(
                    "tokenizer.json",
                    format!("token {id} is not in the tokenizer"),
                )
            })
        };
        let (boi, eoi, soft) = (
            name(config.boi_token_index)?,
            name(config.eoi_token_index)?,
            name(config.image_token_index)?,
        );
        let sequence = format!(
            "\n\n{boi}{}{eoi}\n\n",
            soft.repeat(config.mm_tokens_per_image as usize)
        );
        Ok(Self { boi, sequence })
    }

    /// An image and its `crops` crops.
    fn image(&self, crops: usize) -> String {
        if crops == 0 {
            return self.sequence.clone();
        }
        format!(
            "Here is the original image {} and here are some crops to help you see better {}",
            self.sequence,
            vec![self.sequence.as_str(); crops].join(" ")
        )
    }
}

/// Gemma 3's prompt, as `Gemma3Processor` builds it: each `<start_of_image>` becomes
/// `\n\n<start_of_image>` + 256 `<image_soft_token>` + `<end_of_image>\n\n` (with pan-and-scan crops:
/// "Here is the original image …, and here are some crops to help you see better …"). The runs of soft
/// tokens take the image's rows and attend to each other both ways. Text gets the tokenizer's `<bos>`
/// unless it starts with one (a chat template's does). In a prompt of ids, a marker that
/// soft tokens already follow is kept as it is (ids as HF's processor returns them).
pub fn input_processor(ctx: &ModelContext, inputs: ProcessorInputs) -> Result<ProcessedInputs> {
    let config = ctx.config::<Gemma3Config>()?;
    let images = &inputs.multimodal.images;
    let processor = image_processor(ctx)?;
    let crops: Vec<usize> = images
        .iter()
        .map(|i| {
            let size = i.size();
            processor
                .crops(size.width as usize, size.height as usize)
                .len()
        })
        .collect();
    let tokenizer = ctx.tokenizer()?;
    let prompts = Prompts::new(ctx, &config)?;
    let boi = &prompts.boi;
    let ids = match inputs.prompt {
        Prompt::Text(text) => {
            let parts: Vec<&str> = text.split(boi.as_str()).collect();
            check_count(parts.len() - 1, images.len(), boi)?;
            let mut expanded = parts[0].to_owned();
            for (part, crops) in parts[1..].iter().zip(&crops) {
                expanded.push_str(&prompts.image(*crops));
                expanded.push_str(part);
            }
            // A chat template's text starts with `<bos>` already: no second one (as
            // `apply_chat_template(tokenize=True)` and vLLM's chat path tokenize it).
            let bos = config.text_config.bos_token_id.unwrap_or(2);
            let has_bos = tokenizer
                .id_to_token(bos)
                .is_some_and(|b| expanded.starts_with(&b));
            tokenizer
                .encode(expanded, !has_bos)
                .map_err(|e| Error::bad_input("prompt", e))?
                .get_ids()
                .to_vec()
        }
        Prompt::TokenIds(ids) => {
            let markers = ids.iter().filter(|&&t| t == config.boi_token_index).count();
            let images_markers = markers - crops.iter().sum::<usize>().min(markers);
            if markers != images.len() && images_markers != images.len() {
                check_count(markers, images.len(), boi)?;
            }
            let mut expanded = Vec::with_capacity(ids.len());
            let mut next = crops.iter();
            for (i, &id) in ids.iter().enumerate() {
                // A marker followed by soft tokens was expanded already (as HF's processor returns ids).
                let already = ids.get(i + 1) == Some(&config.image_token_index);
                if id != config.boi_token_index || already {
                    expanded.push(id);
                    continue;
                }
                let Some(&crops) = next.next() else {
                    return Err(mismatch(markers, images.len(), boi));
                };
                let encoded = tokenizer
                    .encode(prompts.image(crops), false)
                    .map_err(|e| Error::bad_input("prompt", e))?;
                expanded.extend_from_slice(encoded.get_ids());
            }
            expanded
        }
    };
    // Each image's runs of soft tokens: 1 + crops of them, each one bidirectional run.
    let per_image: Vec<usize> = crops.iter().map(|c| 1 + c).collect();
    let (placeholders, runs) = interleaved_placeholders(
        &ids,
        config.image_token_index,
        config.mm_tokens_per_image as usize,
        &per_image,
        boi,
    )?;
    Ok(ProcessedInputs {
        token_ids: ids,
        placeholders,
        multimodal: inputs.multimodal,
        positions: None,
        bidirectional: runs,
    })
}

fn check_count(markers: usize, images: usize, boi: &str) -> Result<()> {
    if markers == images {
        return Ok(());
    }
    Err(mismatch(markers, images, boi))
}

fn mismatch(markers: usize, images: usize, boi: &str) -> Error {
    Error::PlaceholderMismatch {
        modality: Modality::Image,
        marker: boi.to_owned(),
        placeholders: markers,
        items: images,
    }
}
