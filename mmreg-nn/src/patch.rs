//! ViT patch embeddings: a convolution whose stride is its kernel, computed as one matrix product.

use mmreg_core::{Error, Result};
use tch::Tensor;

/// HF's `nn.Conv2d(channels, hidden, kernel_size=p, stride=p)` over `pixels` `[n, channels, H, W]`,
/// flattened to `[n, patches, hidden]` with the patches in row-major order (what
/// `conv(x).flatten(2).transpose(1, 2)` gives; rows and columns past the last whole patch are dropped,
/// as the convolution drops them). On CUDA it is one matrix product ([`as_product`]), where cuDNN ran
/// its convolution between two layout conversions (about 100 µs of an H200's time for one 336-pixel
/// tile, 175 µs for five: docs/bench-runs/2026-12-05-run62-prefill-traces.log). Elsewhere it is the
/// convolution itself, whose sums the f32 parity checks against transformers compare at 1e-5 (Gemma 3's
/// pan-and-scan case sits at 9.4e-6 with the convolution and 1.0e-5 with the product).
pub fn patch_embedding(
    pixels: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    patch: i64,
) -> Result<Tensor> {
    let (size, kernel) = (pixels.size(), weight.size());
    let (&[n, channels, height, width], &[hidden, in_channels, kh, kw]) = (&size[..], &kernel[..])
    else {
        return Err(misfit(&size, &kernel, patch));
    };
    if in_channels != channels || kh != patch || kw != patch || height < patch || width < patch {
        return Err(misfit(&size, &kernel, patch));
    }
    if !pixels.device().is_cuda() {
        let patches = pixels.f_conv2d(weight, bias, patch, 0, 1, 1)?;
        return Ok(patches.f_flatten(2, -1)?.f_transpose(1, 2)?);
    }
    as_product(pixels, weight, bias, patch, [n, channels, hidden])
}

/// [`patch_embedding`] as a matrix product: each patch's pixels, channel-major as the kernel's weight
/// `[hidden, channels, p, p]` holds them, times the weight (the convolution's sums in another order).
fn as_product(
    pixels: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    patch: i64,
    [n, channels, hidden]: [i64; 3],
) -> Result<Tensor> {
    let (height, width) = (pixels.size()[2], pixels.size()[3]);
    let (rows, cols) = (height / patch, width / patch);
    let patches = pixels
        .f_narrow(2, 0, rows * patch)?
        .f_narrow(3, 0, cols * patch)?
        .f_reshape([n, channels, rows, patch, cols, patch])?
        .f_permute([0, 2, 4, 1, 3, 5])?
        .f_reshape([n * rows * cols, channels * patch * patch])?;
    let flat = weight.f_reshape([hidden, channels * patch * patch])?;
    Ok(patches
        .f_linear(&flat, bias)?
        .f_view([n, rows * cols, hidden])?)
}

fn misfit(pixels: &[i64], kernel: &[i64], patch: i64) -> Error {
    Error::Model(format!(
        "patch embedding: pixels {pixels:?} do not fit a kernel {kernel:?} of stride {patch}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The product equals libtorch's strided convolution, flattened as HF flattens it (as does what the
    /// CPU runs): with and without a bias, square and oblong images, and sizes that leave a partial patch
    /// at the edge.
    #[test]
    fn equals_the_strided_convolution() {
        tch::manual_seed(11);
        let opts = (Kind::Double, Device::Cpu);
        for (n, h, w, bias) in [(1, 28, 28, false), (2, 42, 28, true), (3, 30, 45, true)] {
            let pixels = Tensor::randn([n, 3, h, w], opts);
            let weight = Tensor::randn([8, 3, 14, 14], opts);
            let b = Tensor::randn([8], opts);
            let bias = bias.then_some(&b);
            let conv = pixels
                .conv2d(&weight, bias, 14, 0, 1, 1)
                .flatten(2, -1)
                .transpose(1, 2);
            let ours = as_product(&pixels, &weight, bias, 14, [n, 3, 8]).expect("fits");
            assert_eq!(ours.size(), conv.size());
            let error = (&ours - &conv).abs().max().double_value(&[]);
            assert!(error < 1e-10, "{n}×{h}×{w}: {error}");
            let public = patch_embedding(&pixels, &weight, bias, 14).expect("fits");
            assert!(public.allclose(&conv, 1e-10, 1e-10, false), "{n}×{h}×{w}");
        }
        let wrong = Tensor::randn([1, 4, 28, 28], opts);
        let weight = Tensor::randn([8, 3, 14, 14], opts);
        let error = patch_embedding(&wrong, &weight, None, 14)
            .unwrap_err()
            .to_string();
        assert!(error.contains("[1, 4, 28, 28]"), "{error}");
    }
}
