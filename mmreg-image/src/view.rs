//! Borrowed and owned 8-bit RGB rasters in the two layouts the kernels use.
//!
//! Decoded images are interleaved (`RGBRGB...`). The horizontal pass writes *planar* rows
//! (all R of a row, then all G, then all B) because that is what the vertical pass and the
//! normalisation into CHW output consume fastest; keeping both layouts avoids conversions.

use image::RgbImage;

use crate::error::{ImageError, Result};

/// How the three channels of a pixel are arranged within a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `RGBRGB...`: channel `c` of pixel `x` at byte `3 * x + c` of the row.
    Interleaved,
    /// Channel `c` of pixel `x` at byte `c * channel_stride + x` from the row start.
    Planar { channel_stride: usize },
}

/// A rectangle of an 8-bit RGB raster inside a larger buffer (crops and patches need no copies).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RgbView<'a> {
    data: &'a [u8],
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Distance between row starts, in bytes.
    row_stride: usize,
    pub layout: Layout,
}

impl<'a> RgbView<'a> {
    /// Views a whole image, rejecting images without pixels.
    pub fn from_image(image: &'a RgbImage) -> Result<Self> {
        let (width, height) = (image.width() as usize, image.height() as usize);
        if width == 0 || height == 0 {
            return Err(ImageError::EmptyImage { width, height });
        }
        Ok(Self::interleaved(image.as_raw(), width, height))
    }

    /// Views a tightly packed interleaved buffer.
    pub fn interleaved(data: &'a [u8], width: usize, height: usize) -> Self {
        RgbView {
            data,
            width,
            height,
            row_stride: width * 3,
            layout: Layout::Interleaved,
        }
    }

    /// Views three whole `width x height` planes stored one after the other.
    pub fn image_planar(data: &'a [u8], width: usize, height: usize) -> Self {
        let layout = Layout::Planar {
            channel_stride: width * height,
        };
        RgbView {
            data,
            width,
            height,
            row_stride: width,
            layout,
        }
    }

    /// Bytes from one pixel to the next within a channel.
    fn pixel_stride(&self) -> usize {
        match self.layout {
            Layout::Interleaved => 3,
            Layout::Planar { .. } => 1,
        }
    }

    /// Number of contiguous byte runs per row (1 interleaved run, or one per channel).
    pub fn run_count(&self) -> usize {
        match self.layout {
            Layout::Interleaved => 1,
            Layout::Planar { .. } => 3,
        }
    }

    /// Byte run `i` of row `y`: the whole interleaved row, or channel `i` of a planar row.
    #[inline]
    pub fn run(&self, y: usize, i: usize) -> &'a [u8] {
        let (offset, len) = match self.layout {
            Layout::Interleaved => (0, self.width * 3),
            Layout::Planar { channel_stride } => (i * channel_stride, self.width),
        };
        let start = y * self.row_stride + offset;
        &self.data[start..start + len]
    }

    /// Where `(x, c)` lands when the row's runs are laid out `run_stride` entries apart.
    #[inline]
    pub fn run_index(&self, x: usize, c: usize, run_stride: usize) -> usize {
        match self.layout {
            Layout::Interleaved => 3 * x + c,
            Layout::Planar { .. } => c * run_stride + x,
        }
    }

    /// The `width x height` rectangle whose top-left pixel is `(x, y)`; must lie inside.
    pub fn crop(&self, x: usize, y: usize, width: usize, height: usize) -> Self {
        debug_assert!(
            x + width <= self.width && y + height <= self.height && width > 0 && height > 0
        );
        let start = y * self.row_stride + x * self.pixel_stride();
        let last_run_end = match self.layout {
            Layout::Interleaved => width * 3,
            Layout::Planar { channel_stride } => 2 * channel_stride + width,
        };
        let len = (height - 1) * self.row_stride + last_run_end;
        RgbView {
            data: &self.data[start..start + len],
            width,
            height,
            ..*self
        }
    }

    /// Channel `c` of row `y` as `width` contiguous bytes, deinterleaving into `scratch` if needed.
    #[inline]
    pub fn channel<'s>(&self, y: usize, c: usize, scratch: &'s mut Vec<u8>) -> &'s [u8]
    where
        'a: 's,
    {
        match self.layout {
            Layout::Planar { .. } => self.run(y, c),
            Layout::Interleaved => {
                scratch.clear();
                scratch.extend(self.run(y, 0).iter().skip(c).step_by(3));
                scratch
            }
        }
    }
}

/// An owned, tightly packed raster (planar buffers are row-planar: each row holds R, G, B runs).
#[derive(Clone, Debug)]
pub(crate) struct RgbBuf {
    pub data: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub planar: bool,
}

impl RgbBuf {
    pub fn new(width: usize, height: usize, planar: bool) -> Self {
        RgbBuf {
            data: vec![0; width * height * 3],
            width,
            height,
            planar,
        }
    }

    pub fn view(&self) -> RgbView<'_> {
        let layout = if self.planar {
            Layout::Planar {
                channel_stride: self.width,
            }
        } else {
            Layout::Interleaved
        };
        RgbView {
            data: &self.data,
            width: self.width,
            height: self.height,
            row_stride: self.width * 3,
            layout,
        }
    }

    /// Copies a view into a new packed buffer of the same layout.
    pub fn copy_of(view: RgbView<'_>) -> Self {
        let mut out = RgbBuf::new(view.width, view.height, view.run_count() == 3);
        let run_len = view.width * 3 / view.run_count();
        for (y, row) in out.data.chunks_exact_mut(view.width * 3).enumerate() {
            for (i, dst) in row.chunks_exact_mut(run_len).enumerate() {
                dst.copy_from_slice(view.run(y, i));
            }
        }
        out
    }

    /// Copies a view into a new interleaved buffer.
    pub fn interleaved_from(view: RgbView<'_>) -> Self {
        let mut out = RgbBuf::new(view.width, view.height, false);
        let mut scratch = Vec::new();
        for (y, row) in out.data.chunks_exact_mut(view.width * 3).enumerate() {
            for c in 0..3 {
                for (dst, &v) in
                    row.iter_mut()
                        .skip(c)
                        .step_by(3)
                        .zip(view.channel(y, c, &mut scratch))
                {
                    *dst = v;
                }
            }
        }
        out
    }
}
