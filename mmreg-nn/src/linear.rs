//! Linear layers, and several projections of one input stacked into one matrix multiply.

use std::sync::Arc;

use mmreg_core::parallel::shard;
use mmreg_core::{Collectives, Result};
use mmreg_engine::kernels;
use tch::Tensor;

use crate::parallel::embed_parallel;
use crate::{Activation, Loader};

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
        kernels::linear(x, &self.weight, self.bias.as_ref())
    }

    /// `act(gate) * up` for this stacked `[gate; up]` projection of `x`: [`Activation::gated`] after
    /// [`Self::forward`]. With SiLU, a decode step of one sequence takes one kernel for both.
    pub fn forward_gated(&self, x: &Tensor, act: Activation) -> Tensor {
        match act {
            Activation::Silu => kernels::linear_silu_mul(x, &self.weight, self.bias.as_ref()),
            _ => act.gated(&self.forward(x)),
        }
    }

    /// `[out_features, in_features]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// A token embedding table (`embed_tokens`): ids of any shape → that shape plus `[hidden]`. Loaded as a
/// rank of a tensor-parallel group, it holds its run of the vocabulary (see [`crate::parallel`]).
pub struct Embedding {
    weight: Tensor,
    /// The first id of this rank's run, and the whole vocabulary.
    start: i64,
    vocab: i64,
    per_rank: i64,
    group: Option<Arc<dyn Collectives>>,
}

impl Embedding {
    pub fn load(loader: &Loader, vocab_size: i64, hidden_size: i64) -> Result<Self> {
        let (rank, size) = loader.rank_and_size();
        let (start, len) = shard(vocab_size, rank, size);
        Ok(Self {
            weight: loader.get_slice("weight", &[vocab_size, hidden_size], 0, start, len)?,
            start,
            vocab: vocab_size,
            per_rank: shard(vocab_size, 0, size).1,
            group: loader.tensor_parallel().cloned(),
        })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.group {
            None => Ok(Tensor::f_embedding(&self.weight, ids, -1, false, false)?),
            Some(group) => embed_parallel(&self.weight, ids, self.start, group),
        }
    }

    /// This rank's rows of the table, `[vocab or its run, hidden]` (a tied LM head reads them).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(crate) fn vocab(&self) -> i64 {
        self.vocab
    }

    pub(crate) fn per_rank(&self) -> i64 {
        self.per_rank
    }

    pub(crate) fn group(&self) -> Option<&Arc<dyn Collectives>> {
        self.group.as_ref()
    }
}
