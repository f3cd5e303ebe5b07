//! `Idefics3ImageProcessor` and `SmolVLMImageProcessor` (PIL backend), and the prompt text their
//! processors put in place of each `<image>`.
//!
//! transformers 5.17's `SmolVLMImageProcessorPil` is generated from `Idefics3ImageProcessorPil`
//! and differs only in its name: same class defaults, same code. One type, [`Idefics3ImageProcessor`]
//! (alias [`SmolVlmImageProcessor`]), ports both. For one image, HF's `_preprocess` does, every
//! resize being Pillow's 8-bit resampler (`resample`, LANCZOS by default) from `u8` to `u8`:
//!
//! 1. `do_resize`: the longest edge to `size.longest_edge`, the other edge scaled and rounded up to
//!    an even number, then both kept within 4096 (upscaling small images too); or exactly
//!    `size.height × size.width`.
//! 2. `do_image_splitting`: resize both edges up to multiples of `max_image_size.longest_edge`
//!    (`resize_for_vision_encoder`). If the result is bigger than one tile, cut it into
//!    `rows × cols` tiles, row by row, and append the whole image resized to one tile (the global
//!    image), last. Otherwise it is the only frame and `rows = cols = 0`. Without splitting, the
//!    image is resized to one tile and `rows = cols = 0`.
//! 3. rescale and normalize each frame (`f32`, numpy's rounding; mean and std default to 0.5).
//! 4. `do_pad`: pad every frame with zeros to the batch's largest and return a
//!    `pixel_attention_mask` (1 on pixels, 0 on padding). Frames are always one tile, so for one
//!    image the mask is all ones.

use std::path::Path;

use image::DynamicImage;

use crate::clip::rgb_input;
use crate::config::{
    invalid, normalize_of, positive, resample_of, rescale_of, PerChannel, PreprocessorConfig,
    SizeSpec,
};
use crate::error::{ImageError, Result};
use crate::kernels;
use crate::resize::{resize_region_with, PassOrder, Resample};
use crate::view::{RgbBuf, RgbView};
use crate::PixelValues;

/// HF's `MAX_IMAGE_SIZE`: the resized image's longest edge never exceeds this ("4k resolution").
pub const IDEFICS3_MAX_IMAGE_SIZE: usize = 4096;
/// Class default `size = {"longest_edge": 4 * 364}`.
const DEFAULT_LONGEST_EDGE: usize = 4 * 364;
/// Class default `max_image_size = {"longest_edge": 364}`.
const DEFAULT_TILE: usize = 364;

/// Bit-exact port of transformers' `Idefics3ImageProcessorPil` and `SmolVLMImageProcessorPil`.
#[derive(Clone, Debug)]
pub struct Idefics3ImageProcessor {
    convert_rgb: bool,
    /// The first resize (`do_resize`), if on.
    resize: Option<FirstResize>,
    resample: Resample,
    split: bool,
    /// `max_image_size["longest_edge"]`: side of a tile and of the global image.
    tile: usize,
    rescale: Option<f64>,
    normalize: Option<([f32; 3], [f32; 3])>,
    pad: bool,
    order: PassOrder,
}

/// SmolVLM's image processor: the same code and class defaults as Idefics3's in transformers 5.17.
pub type SmolVlmImageProcessor = Idefics3ImageProcessor;

/// The first resize, as `Idefics3ImageProcessorPil.resize` reads `size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FirstResize {
    /// `{"longest_edge": n}` (also with `shortest_edge`, which is then ignored).
    LongestEdge(usize),
    /// `{"height": h, "width": w}` (or an int / `[h, w]`, which HF turns into one).
    Exact(usize, usize),
}

/// The sizes one image goes through, and its tile grid (all `(height, width)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idefics3Grid {
    /// After the first resize (`do_resize`); the input's size when that is off.
    pub resized: (usize, usize),
    /// After `resize_for_vision_encoder` (multiples of the tile), when splitting.
    pub split_size: Option<(usize, usize)>,
    /// Tile rows: 0 when the image is not split (HF's `rows` entry).
    pub rows: usize,
    /// Tile columns: 0 when the image is not split (HF's `cols` entry).
    pub cols: usize,
    /// Side of a tile and of the global image (`max_image_size.longest_edge`).
    pub tile: usize,
}

impl Idefics3Grid {
    /// Frames in `pixel_values`: the tiles and the global image, or the single image.
    pub fn frames(&self) -> usize {
        self.rows * self.cols + 1
    }

    /// `<image>` tokens the processor's prompt holds for this image: `image_seq_len` per frame.
    pub fn image_tokens(&self, image_seq_len: usize) -> usize {
        self.frames() * image_seq_len
    }
}

/// A 0/1 mask over the pixels of each frame (HF's `pixel_attention_mask`, `int64` there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PixelMask {
    /// `n * H * W` values, row-major: true on image pixels, false on padding.
    pub data: Vec<bool>,
    /// `[n, H, W]`.
    pub shape: [usize; 3],
}

/// One image, preprocessed.
#[derive(Clone, Debug, PartialEq)]
pub struct Idefics3Pixels {
    /// `[frames, 3, tile, tile]`: the tiles row by row, then the global image; or the one image.
    /// (HF returns `[1, frames, 3, tile, tile]` for one sample with `do_pad`.)
    pub pixel_values: PixelValues,
    /// `[frames, tile, tile]`, all true, when `do_pad` (HF returns it only then).
    pub pixel_attention_mask: Option<PixelMask>,
    /// The sizes and the grid the processor's prompt is built from.
    pub grid: Idefics3Grid,
}

impl Idefics3ImageProcessor {
    /// Builds the processor from a parsed config; absent keys take the HF class defaults
    /// (identical for Idefics3 and SmolVLM): LANCZOS, `size.longest_edge` 1456, tiles of 364,
    /// splitting and padding on, mean and std 0.5.
    pub fn new(config: &PreprocessorConfig) -> Result<Self> {
        let resize = if config.do_resize.unwrap_or(true) {
            Some(match &config.size {
                None => FirstResize::LongestEdge(DEFAULT_LONGEST_EDGE),
                Some(spec) => first_resize(spec)?,
            })
        } else {
            None
        };
        // HF reads `max_image_size["longest_edge"]` whether or not it splits.
        let tile = match &config.max_image_size {
            None => DEFAULT_TILE,
            Some(SizeSpec::Dict(dict)) => match dict.get("longest_edge") {
                Some(Some(n)) => positive("max_image_size.longest_edge", *n)?,
                _ => {
                    return Err(invalid(
                        "max_image_size must be {\"longest_edge\": n}".to_string(),
                    ))
                }
            },
            Some(other) => {
                return Err(invalid(format!(
                    "max_image_size must be {{\"longest_edge\": n}}, got {other:?}"
                )))
            }
        };
        let half = Some(PerChannel::Scalar(0.5));
        let with_defaults = PreprocessorConfig {
            image_mean: config.image_mean.clone().or(half.clone()),
            image_std: config.image_std.clone().or(half),
            ..config.clone()
        };
        Ok(Self {
            convert_rgb: config.do_convert_rgb.unwrap_or(true),
            resize,
            resample: resample_of(config, Resample::Lanczos)?,
            split: config.do_image_splitting.unwrap_or(true),
            tile,
            rescale: rescale_of(config)?,
            normalize: normalize_of(&with_defaults)?,
            pad: config.do_pad.unwrap_or(true),
            order: PassOrder::default(),
        })
    }

    /// Builds the processor from a `preprocessor_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(&PreprocessorConfig::from_file(path)?)
    }

    /// Reproduces a different Pillow release's resize pass order (default: Pillow 13).
    pub fn with_pass_order(mut self, order: PassOrder) -> Self {
        self.order = order;
        self
    }

    /// Side of a tile and of the global image (`max_image_size.longest_edge`).
    pub fn tile_size(&self) -> usize {
        self.tile
    }

    /// The sizes and the grid of an image of `(height, width)`, without touching pixels: what
    /// HF's `_preprocess` returns as `rows` / `cols` (with `return_row_col_info`, which its
    /// processors set). Differs from HF's `get_number_of_image_patches` when `do_resize` is off,
    /// `size` is `{height, width}`, or the longest edge is not a multiple of the tile: that helper
    /// recomputes the sizes its own way, the processor does not use it for the prompt.
    pub fn grid(&self, height: usize, width: usize) -> Result<Idefics3Grid> {
        if height == 0 || width == 0 {
            return Err(ImageError::EmptyImage { width, height });
        }
        let resized = match self.resize {
            None => (height, width),
            Some(FirstResize::Exact(h, w)) => (h, w),
            Some(FirstResize::LongestEdge(n)) => {
                let (h, w) = rescale_to_max_len(height, width, n);
                scale_below_upper_bound(h, w, IDEFICS3_MAX_IMAGE_SIZE)
            }
        };
        let mut grid = Idefics3Grid {
            resized,
            split_size: None,
            rows: 0,
            cols: 0,
            tile: self.tile,
        };
        if self.split {
            let (h, w) = vision_encoder_size(resized.0, resized.1, self.tile);
            if h == 0 || w == 0 {
                return Err(ImageError::EmptyImage {
                    width: w,
                    height: h,
                });
            }
            grid.split_size = Some((h, w));
            if h > self.tile || w > self.tile {
                // `(height - max_height) // max_height + 1`: the sizes are multiples of the tile.
                grid.rows = (h - self.tile) / self.tile + 1;
                grid.cols = (w - self.tile) / self.tile + 1;
            }
        }
        Ok(grid)
    }

    /// Preprocesses one image.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<Idefics3Pixels> {
        let rgb = rgb_input(image, self.convert_rgb)?;
        let src = RgbView::from_image(&rgb)?;
        let grid = self.grid(src.height, src.width)?;
        let m = self.tile;
        let resized = self.resize_to(src, grid.resized);
        let mut data = Vec::with_capacity(grid.frames() * 3 * m * m);
        match grid.split_size {
            Some(size) => {
                let split = self.resize_to(resized.view(), size);
                let view = split.view();
                if grid.rows > 0 {
                    // `split_images`: tiles row by row, then the global image.
                    for r in 0..grid.rows {
                        for c in 0..grid.cols {
                            self.append_normalized(view.crop(c * m, r * m, m, m), &mut data);
                        }
                    }
                    let global = self.resize_to(view, (m, m));
                    self.append_normalized(global.view(), &mut data);
                } else {
                    // Not larger than one tile, so exactly one tile.
                    self.append_normalized(view, &mut data);
                }
            }
            None => {
                let single = self.resize_to(resized.view(), (m, m));
                self.append_normalized(single.view(), &mut data);
            }
        }
        let n = grid.frames();
        let pixel_attention_mask = self.pad.then(|| PixelMask {
            data: vec![true; n * m * m],
            shape: [n, m, m],
        });
        Ok(Idefics3Pixels {
            pixel_values: PixelValues {
                data,
                shape: [n, 3, m, m],
            },
            pixel_attention_mask,
            grid,
        })
    }

    /// PIL's `resize` of the whole image to `(height, width)` (a copy when the size is unchanged).
    fn resize_to(&self, src: RgbView<'_>, (height, width): (usize, usize)) -> RgbBuf {
        resize_region_with(
            self.resample,
            src,
            width,
            height,
            0..width,
            0..height,
            self.order,
        )
    }

    /// Rescales and normalizes one frame (HF's `rescale` then `normalize`), appending it as CHW.
    fn append_normalized(&self, frame: RgbView<'_>, out: &mut Vec<f32>) {
        let mut scratch = Vec::new();
        for c in 0..3 {
            let norm = self.normalize.map(|(mean, std)| (mean[c], std[c]));
            for y in 0..frame.height {
                kernels::normalize(frame.channel(y, c, &mut scratch), out, self.rescale, norm);
            }
        }
    }
}

/// `size` as `Idefics3ImageProcessorPil.resize` reads it after `get_size_dict`: `longest_edge`
/// first, then `height` and `width`; an int `n` becomes `n × n`, a list `[h, w]`.
fn first_resize(spec: &SizeSpec) -> Result<FirstResize> {
    match spec {
        SizeSpec::Int(n) => {
            let n = positive("size", *n)?;
            Ok(FirstResize::Exact(n, n))
        }
        SizeSpec::List(v) if v.len() == 2 => Ok(FirstResize::Exact(
            positive("size", v[0])?,
            positive("size", v[1])?,
        )),
        SizeSpec::Dict(dict) => {
            let keys: Vec<&str> = dict
                .iter()
                .filter_map(|(k, v)| v.map(|_| k.as_str()))
                .collect();
            let get = |k: &str| dict.get(k).copied().flatten();
            match keys.as_slice() {
                ["longest_edge"] | ["longest_edge", "shortest_edge"] => Ok(
                    FirstResize::LongestEdge(positive("size.longest_edge", get("longest_edge").unwrap_or(0))?),
                ),
                ["height", "width"] => Ok(FirstResize::Exact(
                    positive("size.height", get("height").unwrap_or(0))?,
                    positive("size.width", get("width").unwrap_or(0))?,
                )),
                _ => Err(invalid(format!(
                    "size must be {{\"longest_edge\": n}} or {{\"height\": h, \"width\": w}}, got keys {keys:?}"
                ))),
            }
        }
        other => Err(invalid(format!(
            "size must be {{\"longest_edge\": n}} or {{\"height\": h, \"width\": w}}, got {other:?}"
        ))),
    }
}

/// HF's `_resize_output_size_rescale_to_max_len(height, width, min_len=1, max_len)`: the longest
/// edge becomes `max_len`, the other `int()` of the scaled size, bumped to even, at least 1.
fn rescale_to_max_len(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect_ratio = width as f64 / height as f64;
    let (height, width) = if width >= height {
        let h = (max_len as f64 / aspect_ratio) as usize;
        (h + h % 2, max_len)
    } else {
        let w = (max_len as f64 * aspect_ratio) as usize;
        (max_len, w + w % 2)
    };
    (height.max(1), width.max(1))
}

/// HF's `_resize_output_size_scale_below_upper_bound(height, width, max_len)`: shrinks an image
/// whose longest edge exceeds `max_len` (the other edge truncated, at least 1).
fn scale_below_upper_bound(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect_ratio = width as f64 / height as f64;
    let (height, width) = if width >= height && width > max_len {
        ((max_len as f64 / aspect_ratio) as usize, max_len)
    } else if height > width && height > max_len {
        (max_len, (max_len as f64 * aspect_ratio) as usize)
    } else {
        (height, width)
    };
    (height.max(1), width.max(1))
}

/// The size HF's `resize_for_vision_encoder` resizes to: the longer edge (width on ties) rounded
/// up to a multiple of `tile`, the other edge scaled from it (`int()`), then rounded up likewise.
fn vision_encoder_size(height: usize, width: usize, tile: usize) -> (usize, usize) {
    let aspect_ratio = width as f64 / height as f64;
    // `math.ceil(n / tile)` on a float quotient equals the integer ceiling for any realistic size.
    if width >= height {
        let w = width.div_ceil(tile) * tile;
        let h = (w as f64 / aspect_ratio) as usize;
        (h.div_ceil(tile) * tile, w)
    } else {
        let h = height.div_ceil(tile) * tile;
        let w = (h as f64 * aspect_ratio) as usize;
        (h, w.div_ceil(tile) * tile)
    }
}

/// Model-side `image_seq_len` (`Idefics3Model` / `SmolVLMModel`):
/// `int(((image_size // patch_size) ** 2) / (scale_factor ** 2))` — the vision tower's patches per
/// tile after the connector's pixel shuffle. 169 for Idefics3-8B (364, 14, 2), 64 for
/// SmolVLM-256M/500M (512, 16, 4), 81 for SmolVLM-Instruct (384, 14, 3). `None` on a zero.
///
/// The processors take their own `image_seq_len` from `processor_config.json` (default 169) and
/// do not check it against the model.
pub fn idefics3_image_seq_len(
    image_size: usize,
    patch_size: usize,
    scale_factor: usize,
) -> Option<usize> {
    let side = image_size.checked_div(patch_size)?;
    // Integer floor division equals Python's `int(a / b)` here: a float quotient of integers this
    // small never rounds across an integer.
    (side * side).checked_div(scale_factor * scale_factor)
}

/// The special tokens of an Idefics3 / SmolVLM image prompt.
///
/// `Idefics3Processor` hard-codes them; `SmolVLMProcessor` reads `fake_image_token`,
/// `image_token` and `global_image_token` from the tokenizer, with these same defaults. The
/// `<row_{r}_col_{c}>` tags are hard-coded in both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idefics3PromptTokens {
    /// `<fake_token_around_image>`.
    pub fake_image_token: String,
    /// `<image>`.
    pub image_token: String,
    /// `<global-img>`.
    pub global_image_token: String,
}

impl Default for Idefics3PromptTokens {
    fn default() -> Self {
        Self {
            fake_image_token: "<fake_token_around_image>".into(),
            image_token: "<image>".into(),
            global_image_token: "<global-img>".into(),
        }
    }
}

/// The text HF's processor puts in place of one `<image>` in the prompt: SmolVLM's
/// `get_image_prompt_string` and `Idefics3Processor.replace_image_token` (the same text).
///
/// With `rows == cols == 0` (not split): `<fake><global-img>` + `<image>` × `image_seq_len` +
/// `<fake>`. Otherwise, per tile row `r` and column `c` (1-based) `<fake><row_r_col_c>` +
/// `<image>` × `image_seq_len`, a `\n` after each row, then `\n<fake><global-img>` +
/// `<image>` × `image_seq_len` + `<fake>`.
pub fn idefics3_image_prompt(
    rows: usize,
    cols: usize,
    image_seq_len: usize,
    tokens: &Idefics3PromptTokens,
) -> String {
    let Idefics3PromptTokens {
        fake_image_token: fake,
        image_token: image,
        global_image_token: global,
    } = tokens;
    let images = image.repeat(image_seq_len);
    let global_part = format!("{fake}{global}{images}{fake}");
    if rows == 0 && cols == 0 {
        return global_part;
    }
    let mut text = String::new();
    for r in 1..=rows {
        for c in 1..=cols {
            text.push_str(&format!("{fake}<row_{r}_col_{c}>{images}"));
        }
        text.push('\n');
    }
    text.push('\n');
    text.push_str(&global_part);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;

    fn processor(json: &str) -> Result<Idefics3ImageProcessor> {
        Idefics3ImageProcessor::new(&PreprocessorConfig::from_json_str(json).unwrap())
    }

    #[test]
    fn size_rules() {
        // 1920 x 1080 (w x h): 1456 x int(1456 / 1.777..) = 819 -> 820; tiles 1456 x 1092.
        assert_eq!(rescale_to_max_len(1080, 1920, 1456), (820, 1456));
        assert_eq!(vision_encoder_size(820, 1456, 364), (1092, 1456));
        // Portrait, and the upper bound.
        assert_eq!(rescale_to_max_len(700, 300, 1456), (1456, 624));
        assert_eq!(scale_below_upper_bound(5000, 2500, 4096), (4096, 2048));
        assert_eq!(scale_below_upper_bound(10, 20, 4096), (10, 20));
        // A 1-pixel-high strip: the other edge truncates to 0 (even, so not bumped), then 1.
        assert_eq!(rescale_to_max_len(1, 4000, 1456), (1, 1456));
        assert_eq!(rescale_to_max_len(3, 4000, 1456), (2, 1456));
    }

    #[test]
    fn grid_and_frames() {
        let p = processor("{}").unwrap();
        let g = p.grid(1080, 1920).unwrap();
        assert_eq!((g.rows, g.cols, g.frames()), (3, 4, 13));
        assert_eq!(g.image_tokens(169), 13 * 169);
        let nosplit = processor(r#"{"do_image_splitting": false}"#).unwrap();
        let g = nosplit.grid(1080, 1920).unwrap();
        assert_eq!((g.rows, g.cols, g.frames(), g.split_size), (0, 0, 1, None));
        // Fits one tile: split on, but a single frame.
        let small = processor(r#"{"do_resize": false}"#).unwrap();
        let g = small.grid(200, 300).unwrap();
        assert_eq!((g.rows, g.cols, g.split_size), (0, 0, Some((364, 364))));
        assert!(p.grid(0, 3).is_err());
    }

    #[test]
    fn preprocess_shapes_and_mask() {
        let p =
            processor(r#"{"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}"#)
                .unwrap();
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(50, 30, image::Rgb([255, 0, 128])));
        let out = p.preprocess(&img).unwrap();
        // 30 x 50 -> 38 x 64 -> 64 x 64: 2 x 2 tiles and the global image.
        assert_eq!((out.grid.rows, out.grid.cols), (2, 2));
        assert_eq!(out.pixel_values.shape, [5, 3, 32, 32]);
        let mask = out.pixel_attention_mask.unwrap();
        assert_eq!(mask.shape, [5, 32, 32]);
        assert!(mask.data.iter().all(|&m| m));
        // A flat image stays flat: 255 -> 1.0, 0 -> -1.0.
        assert_eq!(out.pixel_values.data[0], 1.0);
        assert_eq!(out.pixel_values.data[32 * 32], -1.0);
        let nopad = processor(r#"{"do_pad": false, "do_image_splitting": false}"#).unwrap();
        let out = nopad.preprocess(&img).unwrap();
        assert_eq!(out.pixel_values.shape, [1, 3, 364, 364]);
        assert!(out.pixel_attention_mask.is_none());
    }

    #[test]
    fn configs_hf_refuses_are_refused() {
        let err = |json: &str| processor(json).unwrap_err().to_string();
        assert!(err(r#"{"size": {"shortest_edge": 300}}"#).contains("longest_edge"));
        assert!(err(r#"{"size": {"longest_edge": 0}}"#).contains("size.longest_edge"));
        assert!(err(r#"{"max_image_size": 364}"#).contains("max_image_size"));
        assert!(err(r#"{"max_image_size": {"height": 364}}"#).contains("max_image_size"));
        assert!(err(r#"{"resample": 4}"#).contains("BOX"));
        // Accepted spellings.
        let p = processor(r#"{"size": 500}"#).unwrap();
        assert_eq!(p.grid(20, 30).unwrap().resized, (500, 500));
        let p = processor(r#"{"size": [300, 400]}"#).unwrap();
        assert_eq!(p.grid(20, 30).unwrap().resized, (300, 400));
        let p = processor(r#"{"size": {"shortest_edge": 10, "longest_edge": 728}}"#).unwrap();
        assert_eq!(p.grid(20, 30).unwrap().resized, (486, 728));
    }

    #[test]
    fn prompt_strings() {
        let t = Idefics3PromptTokens::default();
        assert_eq!(
            idefics3_image_prompt(0, 0, 2, &t),
            "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
        );
        assert_eq!(
            idefics3_image_prompt(1, 2, 1, &t),
            "<fake_token_around_image><row_1_col_1><image><fake_token_around_image><row_1_col_2><image>\n\n\
             <fake_token_around_image><global-img><image><fake_token_around_image>"
        );
        assert_eq!(idefics3_image_seq_len(364, 14, 2), Some(169));
        assert_eq!(idefics3_image_seq_len(512, 16, 4), Some(64));
        assert_eq!(idefics3_image_seq_len(384, 14, 3), Some(81));
        assert_eq!(idefics3_image_seq_len(224, 32, 2), Some(12));
        assert_eq!(idefics3_image_seq_len(224, 0, 2), None);
    }
}
