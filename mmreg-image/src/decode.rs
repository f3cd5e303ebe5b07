//! Decoding with a size limit checked from the file's header, before any pixel is allocated.

use std::io::Cursor;

use image::{DynamicImage, ImageReader};

use crate::error::{ImageError, Result};

/// Decodes encoded image bytes (PNG, JPEG, …) of at most `max_pixels` pixels. A file whose header claims
/// more (a decompression bomb) or zero pixels is refused without decoding it.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage> {
    let reader = || ImageReader::new(Cursor::new(bytes)).with_guessed_format();
    let io = |source| ImageError::Io {
        path: "<memory>".into(),
        source,
    };
    let (width, height) = reader().map_err(io)?.into_dimensions()?;
    if width == 0 || height == 0 {
        return Err(ImageError::EmptyImage {
            width: width as usize,
            height: height as usize,
        });
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            max_pixels,
        });
    }
    Ok(reader().map_err(io)?.decode()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        image::RgbImage::new(width, height)
            .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .expect("encodes");
        bytes
    }

    #[test]
    fn decodes_within_the_limit_and_refuses_beyond_it() {
        let bytes = png(20, 10);
        assert_eq!(decode(&bytes, 200).expect("fits").width(), 20);
        let error = decode(&bytes, 199).expect_err("too large");
        assert_eq!(
            error.to_string(),
            "the image is 20x10 = 200 pixels, over the limit of 199"
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            decode(b"not an image", 1 << 20),
            Err(ImageError::Decode(_))
        ));
    }
}
