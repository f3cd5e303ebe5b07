//! Linear layers, and several projections of one input stacked into one matrix multiply.

use mmreg_core::Result;
use tch::Tensor;

use crate::Loader;

/// `x · weightᵀ + bias`, HF's `nn.Linear`.
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

    /// A layer over tensors already loaded (a tied LM head reads the token embeddings).
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
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

/// A token embedding table (`embed_tokens`): ids of any shape → that shape plus `[hidden]`.
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    pub fn load(loader: &Loader, vocab_size: i64, hidden_size: i64) -> Result<Self> {
        Ok(Self {
            weight: loader.get("weight", &[vocab_size, hidden_size])?,
        })
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }

    /// The table, `[vocab, hidden]` (a tied LM head reads it).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}
