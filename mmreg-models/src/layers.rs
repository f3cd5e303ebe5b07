//! Building blocks shared by the architectures, loaded by checkpoint name.

use mmreg_core::{kernels, Error, LoadOptions, Result, Weights};
use tch::{Kind, Tensor};

/// Reads tensors under a name prefix, so module code names weights like the checkpoint does
/// (`vb.pp("layers").pp(3)` in candle's words).
#[derive(Clone)]
pub struct Loader<'a> {
    pub weights: &'a Weights,
    pub options: &'a LoadOptions,
    prefix: String,
}

impl<'a> Loader<'a> {
    pub fn new(weights: &'a Weights, options: &'a LoadOptions) -> Self {
        Self {
            weights,
            options,
            prefix: String::new(),
        }
    }

    /// The full name of `name` under this prefix.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A loader for the sub-module `name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Loader<'a> {
        Loader {
            prefix: self.name(&name.to_string()),
            ..*self
        }
    }

    /// A tensor in the model's dtype, on its device, with a shape check.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.get_kind(name, shape, self.options.dtype)
    }

    pub fn get_kind(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        self.weights
            .get(&self.name(name), shape, kind, self.options.device)
    }

    /// Marks every tensor under this prefix as deliberately unread (e.g. CLIP's `post_layernorm`).
    pub fn skip_all(&self) {
        self.weights.skip_prefix(&self.prefix);
    }
}

pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(loader: &Loader, in_features: i64, out_features: i64, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: loader.get("weight", &[out_features, in_features])?,
            bias: if bias {
                Some(loader.get("bias", &[out_features])?)
            } else {
                None
            },
        })
    }

    /// Several projections of the same input stacked into one (`q_proj`, `k_proj`, `v_proj` → one matrix):
    /// one matrix multiply instead of several, with the outputs side by side in `parts` order.
    pub fn load_stacked(parts: &[(&Loader, i64)], in_features: i64, bias: bool) -> Result<Self> {
        let loaded = parts
            .iter()
            .map(|&(loader, out)| Linear::load(loader, in_features, out, bias))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = loaded.iter().map(|l| &l.weight).collect();
        let biases: Option<Vec<&Tensor>> = loaded.iter().map(|l| l.bias.as_ref()).collect();
        Ok(Self {
            weight: Tensor::f_cat(&weights, 0)?,
            bias: biases.map(|b| Tensor::f_cat(&b, 0)).transpose()?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

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

    /// One fused kernel on CUDA (`mmreg_core::kernels`), libtorch's ops elsewhere.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        kernels::rms_norm(x, &self.weight, self.eps)
    }

    /// The residual add before the norm, fused with it: `(x + delta, norm(x + delta))`.
    pub fn forward_add(&self, x: &Tensor, delta: &Tensor) -> (Tensor, Tensor) {
        kernels::add_rms_norm(x, delta, &self.weight, self.eps)
    }
}

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
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Relu => x.relu(),
        }
    }
}
