//! Normalisation layers: LayerNorm, and RMSNorm as HF's Llama computes it (with the residual-add
//! variant, one kernel where the fused kernels run).

use mmreg_core::Result;
use mmreg_engine::kernels;
use tch::Tensor;

use crate::Loader;

/// HF's `nn.LayerNorm` over the last dimension.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(loader: &Loader, size: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: loader.get("weight", &[size])?,
            bias: loader.get("bias", &[size])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.weight.size()[0]],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }

    /// The residual add before the norm, fused with it where the kernels run: `(x + delta,
    /// norm(x + delta))`.
    pub fn forward_add(&self, x: &Tensor, delta: &Tensor) -> (Tensor, Tensor) {
        kernels::add_layer_norm(x, delta, &self.weight, &self.bias, self.eps)
    }
}

/// Llama's RMSNorm exactly as HF computes it: in f32, cast back to the input dtype *before* the weight.
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(loader: &Loader, size: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: loader.get("weight", &[size])?,
            eps,
        })
    }

    /// One fused kernel on CUDA (`mmreg_engine::kernels`), libtorch's ops elsewhere.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        kernels::rms_norm(x, &self.weight, self.eps)
    }

    /// The residual add before the norm, fused with it: `(x + delta, norm(x + delta))`.
    pub fn forward_add(&self, x: &Tensor, delta: &Tensor) -> (Tensor, Tensor) {
        kernels::add_rms_norm(x, delta, &self.weight, self.eps)
    }
}
