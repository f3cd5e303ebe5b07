//! Activations by their HF config names.

use mmreg_core::{Error, Result};
use mmreg_engine::kernels;
use tch::Tensor;

/// HF's `ACT2FN` for the activations LLaVA checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU, HF's `gelu`.
    Gelu,
    /// Tanh approximation: `gelu_new`, `gelu_pytorch_tanh`.
    GeluTanh,
    /// CLIP's `x * sigmoid(1.702 x)`.
    QuickGelu,
    Relu,
}

impl Activation {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "relu" => Activation::Relu,
            other => {
                return Err(Error::config(
                    "config.json",
                    format!("unsupported activation `{other}`"),
                ))
            }
        })
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Silu => x.silu(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::QuickGelu => kernels::quick_gelu(x),
            Activation::Relu => x.relu(),
        }
    }

    /// `act(gate) * up` for a stacked `[.., 2 * n]` projection (`gate` the first half): SwiGLU with
    /// `silu` (one kernel where the fused kernels run), GeGLU with `gelu`.
    pub fn gated(self, gate_up: &Tensor) -> Tensor {
        if self == Activation::Silu {
            return kernels::silu_mul(gate_up);
        }
        let n = gate_up.size().last().copied().unwrap_or(0) / 2;
        self.forward(&gate_up.narrow(-1, 0, n)) * gate_up.narrow(-1, n, n)
    }
}
