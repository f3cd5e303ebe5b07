//! A borrowed rectangle of an interleaved 8-bit RGB buffer.

use image::RgbImage;

use crate::error::{ImageError, Result};

/// Interleaved RGB rows inside a larger buffer; lets crops and patches be processed without copies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RgbView<'a> {
    data: &'a [u8],
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Distance between row starts, in bytes.
    stride: usize,
}

impl<'a> RgbView<'a> {
    /// Views a tightly packed buffer of `width * height` pixels.
    pub fn packed(data: &'a [u8], width: usize, height: usize) -> Self {
        debug_assert!(data.len() >= width * height * 3);
        RgbView {
            data,
            width,
            height,
            stride: width * 3,
        }
    }

    /// Views a whole image, rejecting images without pixels.
    pub fn from_image(image: &'a RgbImage) -> Result<Self> {
        let (width, height) = (image.width() as usize, image.height() as usize);
        if width == 0 || height == 0 {
            return Err(ImageError::EmptyImage { width, height });
        }
        Ok(Self::packed(image.as_raw(), width, height))
    }

    /// Row `y` as `width * 3` bytes.
    #[inline]
    pub fn row(&self, y: usize) -> &'a [u8] {
        let start = y * self.stride;
        &self.data[start..start + self.width * 3]
    }

    /// The `width x height` rectangle whose top-left pixel is `(x, y)`; must lie inside.
    pub fn crop(&self, x: usize, y: usize, width: usize, height: usize) -> Self {
        debug_assert!(x + width <= self.width && y + height <= self.height);
        let start = y * self.stride + x * 3;
        // Keep the slice exactly long enough for the last row so `row` stays in bounds.
        let len = if height == 0 {
            0
        } else {
            (height - 1) * self.stride + width * 3
        };
        RgbView {
            data: &self.data[start..start + len],
            width,
            height,
            stride: self.stride,
        }
    }

    /// Copies the rows into a packed buffer of exactly `width * height * 3` bytes.
    pub fn copy_to(&self, out: &mut [u8]) {
        let row_len = self.width * 3;
        for (y, dst) in out.chunks_exact_mut(row_len).take(self.height).enumerate() {
            dst.copy_from_slice(self.row(y));
        }
    }
}
