//! Conversion of decoded images to 8-bit RGB exactly as PIL's `Image.convert("RGB")`.
//!
//! The reference is what PIL produces for the same PNG file (transformers 5.17 calls
//! `image.convert("RGB")` on every non-RGB input). Facts established against Pillow 13:
//!
//! * `L`, `LA`: gray copied to R, G and B; alpha is dropped (no compositing onto white).
//! * `RGBA`: alpha dropped.
//! * Palette PNGs: the `image` crate expands them to RGB(A) through the palette, which is what PIL's
//!   `P -> RGB` lookup gives (transparency ignored).
//! * 16-bit gray opens in PIL as mode `I;16`, whose RGB conversion **clips** to 255 (`min(v, 255)`).
//! * 16-bit RGB, RGBA and gray+alpha open in PIL as 8-bit modes keeping the **high byte** (`v >> 8`).

use std::borrow::Cow;

use image::{DynamicImage, RgbImage};

use crate::error::{ImageError, Result};

/// Returns `image` as 8-bit RGB, borrowing when it already is.
pub fn to_rgb8(image: &DynamicImage) -> Result<Cow<'_, RgbImage>> {
    let data = match image {
        DynamicImage::ImageRgb8(rgb) => return Ok(Cow::Borrowed(rgb)),
        DynamicImage::ImageLuma8(g) => map_pixels(g.as_raw(), 1, |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(ga) => map_pixels(ga.as_raw(), 2, |p| [p[0]; 3]),
        DynamicImage::ImageRgba8(rgba) => map_pixels(rgba.as_raw(), 4, |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma16(g) => map_pixels(g.as_raw(), 1, |p| [clip_u16(p[0]); 3]),
        DynamicImage::ImageLumaA16(ga) => map_pixels(ga.as_raw(), 2, |p| [high_byte(p[0]); 3]),
        DynamicImage::ImageRgb16(rgb) => {
            map_pixels(rgb.as_raw(), 3, |p| [p[0], p[1], p[2]].map(high_byte))
        }
        DynamicImage::ImageRgba16(rgba) => {
            map_pixels(rgba.as_raw(), 4, |p| [p[0], p[1], p[2]].map(high_byte))
        }
        other => {
            return Err(ImageError::UnsupportedPixelLayout(format!(
                "{:?}",
                other.color()
            )))
        }
    };
    let (width, height) = (image.width(), image.height());
    RgbImage::from_raw(width, height, data)
        .map(Cow::Owned)
        .ok_or_else(|| {
            ImageError::UnsupportedPixelLayout(format!(
                "{:?} buffer of the wrong length",
                image.color()
            ))
        })
}

/// Maps every `channels`-sample pixel of a raw buffer to one RGB pixel.
fn map_pixels<T: Copy>(raw: &[T], channels: usize, f: impl Fn(&[T]) -> [u8; 3]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() / channels * 3);
    for px in raw.chunks_exact(channels) {
        out.extend_from_slice(&f(px));
    }
    out
}

/// PIL's `I;16 -> RGB`: values above 255 saturate.
fn clip_u16(v: u16) -> u8 {
    v.min(255) as u8
}

/// PIL's `;16B` raw modes keep the most significant byte of each sample.
fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayAlphaImage, GrayImage, ImageBuffer, Luma, LumaA, Rgb, Rgba, RgbaImage};

    fn first_pixel(img: DynamicImage) -> [u8; 3] {
        to_rgb8(&img).unwrap().get_pixel(0, 0).0
    }

    #[test]
    fn eight_bit_layouts() {
        assert_eq!(
            first_pixel(GrayImage::from_pixel(1, 1, Luma([7])).into()),
            [7, 7, 7]
        );
        assert_eq!(
            first_pixel(GrayAlphaImage::from_pixel(1, 1, LumaA([7, 0])).into()),
            [7, 7, 7]
        );
        // Fully transparent pixels keep their colour: alpha is dropped, not composited.
        assert_eq!(
            first_pixel(RgbaImage::from_pixel(1, 1, Rgba([1, 2, 3, 0])).into()),
            [1, 2, 3]
        );
        let rgb = DynamicImage::from(RgbImage::from_pixel(2, 1, Rgb([4, 5, 6])));
        assert!(matches!(to_rgb8(&rgb).unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn sixteen_bit_gray_clips() {
        for (v, expect) in [
            (0u16, 0u8),
            (255, 255),
            (256, 255),
            (1000, 255),
            (65535, 255),
        ] {
            let img = ImageBuffer::<Luma<u16>, _>::from_pixel(1, 1, Luma([v]));
            assert_eq!(
                first_pixel(DynamicImage::ImageLuma16(img)),
                [expect; 3],
                "{v}"
            );
        }
    }

    #[test]
    fn sixteen_bit_colour_keeps_high_byte() {
        let img = ImageBuffer::<Rgb<u16>, _>::from_pixel(1, 1, Rgb([300, 1000, 65535]));
        assert_eq!(first_pixel(DynamicImage::ImageRgb16(img)), [1, 3, 255]);
        let img = ImageBuffer::<Rgba<u16>, _>::from_pixel(1, 1, Rgba([32768, 255, 256, 9]));
        assert_eq!(first_pixel(DynamicImage::ImageRgba16(img)), [128, 0, 1]);
        let img = ImageBuffer::<LumaA<u16>, _>::from_pixel(1, 1, LumaA([1000, 0]));
        assert_eq!(first_pixel(DynamicImage::ImageLumaA16(img)), [3, 3, 3]);
    }

    #[test]
    fn float_images_are_rejected() {
        let img = DynamicImage::ImageRgb32F(ImageBuffer::new(1, 1));
        let err = to_rgb8(&img).unwrap_err();
        assert!(err.to_string().contains("Rgb32F"), "{err}");
    }
}
