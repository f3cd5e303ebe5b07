//! Tensor-parallel layers (Megatron-LM's split, as vLLM's): a model loaded with
//! [`mmreg_core::LoadOptions::tensor_parallel`] is one rank of a group, and these layers read only that
//! rank's slice of each weight and call the group's collectives. Without a group they are the plain
//! layers. A decoder built from them (`llama`) runs sharded without its model file knowing.
//!
//! - Column-parallel ([`Linear::load_rows`], [`Linear::load_stacked_rows`]): a rank computes its rows of
//!   the output (its attention heads, its intermediate columns); no communication.
//! - [`RowParallelLinear`]: a rank multiplies its slice of the input by its columns of the weight; the
//!   partial outputs are summed over the group (all-reduce), then the bias is added once.
//! - Vocab-parallel: [`Embedding`] looks up the ids in its rank's run of the vocabulary (zero elsewhere)
//!   and sums over the group; [`LmHead`] computes its run's logits and gathers every rank's.

use std::sync::Arc;

use mmreg_core::parallel::shard;
use mmreg_core::{Collectives, Error, Result};
use mmreg_engine::kernels;
use tch::Tensor;

use crate::{Embedding, Linear, Loader};

impl Loader<'_> {
    /// The tensor-parallel group the model being loaded is one rank of, if any.
    pub fn tensor_parallel(&self) -> Option<&Arc<dyn Collectives>> {
        self.options.tensor_parallel.as_ref()
    }

    /// `(rank, size)` of the group; `(0, 1)` without one.
    pub fn rank_and_size(&self) -> (usize, usize) {
        self.tensor_parallel()
            .map_or((0, 1), |g| (g.rank(), g.size()))
    }

    /// `len` rows along `dim` from `start` of the tensor `name` of full shape `shape`, in the model's
    /// dtype on its device (only the slice is read from the checkpoint).
    pub fn get_slice(
        &self,
        name: &str,
        shape: &[i64],
        dim: usize,
        start: i64,
        len: i64,
    ) -> Result<Tensor> {
        self.weights.get_slice(
            &self.name(name),
            shape,
            dim,
            start,
            len,
            self.options.dtype,
            self.options.device,
        )
    }
}

/// `y = Σ_ranks x_r · W_rᵀ + b`: the input's last dimension is split over the group (each rank holds
/// its slice of `x`, the output of a column-parallel layer, and the matching columns of `weight`), and
/// the partial products are summed. `o_proj` and `down_proj` of a sharded decoder.
pub struct RowParallelLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    group: Option<Arc<dyn Collectives>>,
}

impl RowParallelLinear {
    /// `in_features → out_features`; a rank reads its run of columns, [`shard`]'s (the same split as the
    /// column-parallel layer before it).
    pub fn load(loader: &Loader, in_features: i64, out_features: i64, bias: bool) -> Result<Self> {
        let (rank, size) = loader.rank_and_size();
        let (start, len) = shard(in_features, rank, size);
        Ok(Self {
            weight: loader.get_slice("weight", &[out_features, in_features], 1, start, len)?,
            bias: bias
                .then(|| loader.get("bias", &[out_features]))
                .transpose()?,
            group: loader.tensor_parallel().cloned(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(group) = &self.group else {
            return Ok(kernels::linear(x, &self.weight, self.bias.as_ref()));
        };
        let mut y = kernels::linear(x, &self.weight, None);
        group.all_reduce(&mut y)?;
        Ok(match &self.bias {
            Some(b) => y + b,
            None => y,
        })
    }
}

impl Linear {
    /// Rows `start..start + len` of a `[out_total, in_features]` projection (and of its bias): a rank's
    /// output features of a column-parallel layer.
    pub fn load_rows(
        loader: &Loader,
        in_features: i64,
        out_total: i64,
        (start, len): (i64, i64),
        bias: bool,
    ) -> Result<Self> {
        Ok(Self::from_weight(
            loader.get_slice("weight", &[out_total, in_features], 0, start, len)?,
            bias.then(|| loader.get_slice("bias", &[out_total], 0, start, len))
                .transpose()?,
        ))
    }

    /// [`Linear::load_stacked`] of each part's rows `(start, len)` of its `out_total`.
    pub fn load_stacked_rows(
        parts: &[(&Loader, i64, (i64, i64))],
        in_features: i64,
        bias: bool,
    ) -> Result<Self> {
        let loaded = parts
            .iter()
            .map(|&(loader, total, rows)| Linear::load_rows(loader, in_features, total, rows, bias))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = loaded.iter().map(|l| l.weight()).collect();
        let biases: Option<Vec<&Tensor>> = loaded.iter().map(|l| l.bias()).collect();
        Ok(Self::from_weight(
            Tensor::f_cat(&weights, 0)?,
            biases.map(|b| Tensor::f_cat(&b, 0)).transpose()?,
        ))
    }

    /// A column-parallel layer split evenly: a rank's `out / size` output features.
    pub fn load_column(
        loader: &Loader,
        in_features: i64,
        out_features: i64,
        bias: bool,
    ) -> Result<Self> {
        let (rank, size) = loader.rank_and_size();
        if out_features % size as i64 != 0 {
            return Err(Error::Weights(format!(
                "{}: {out_features} output features do not split over {size} tensor-parallel ranks",
                loader.name("weight")
            )));
        }
        Self::load_rows(
            loader,
            in_features,
            out_features,
            shard(out_features, rank, size),
            bias,
        )
    }
}

/// The LM head, vocab-parallel under tensor parallelism: each rank computes the logits of its run of
/// `⌈vocab / size⌉` tokens, and every rank gets all of them.
pub struct LmHead {
    /// This rank's rows, `[len, hidden]`.
    weight: Tensor,
    /// Rows per rank (the last rank may hold fewer), and the whole vocabulary.
    per_rank: i64,
    vocab: i64,
    group: Option<Arc<dyn Collectives>>,
}

impl LmHead {
    /// `lm_head.weight` `[vocab, hidden]`, this rank's rows.
    pub fn load(loader: &Loader, hidden: i64, vocab: i64) -> Result<Self> {
        let (rank, size) = loader.rank_and_size();
        let (start, len) = shard(vocab, rank, size);
        Ok(Self {
            weight: loader.get_slice("weight", &[vocab, hidden], 0, start, len)?,
            per_rank: shard(vocab, 0, size).1,
            vocab,
            group: loader.tensor_parallel().cloned(),
        })
    }

    /// A head tied to the token embeddings (the same rows of the same table).
    pub fn tied(embedding: &Embedding) -> Self {
        Self {
            weight: embedding.weight().shallow_clone(),
            per_rank: embedding.per_rank(),
            vocab: embedding.vocab(),
            group: embedding.group().cloned(),
        }
    }

    /// Logits `[rows, vocab]` of hidden states `[rows, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let local = kernels::linear(x, &self.weight, None);
        let Some(group) = &self.group else {
            return Ok(local);
        };
        // Rows of the vocabulary first, so the gather concatenates along dim 0; the last rank's short
        // run is padded (and the padding dropped after).
        let short = self.per_rank - local.size()[1];
        let local = local
            .f_constant_pad_nd([0, short])?
            .f_transpose(0, 1)?
            .f_contiguous()?;
        let all = group.all_gather(&local)?;
        Ok(all
            .f_narrow(0, 0, self.vocab)?
            .f_transpose(0, 1)?
            .f_contiguous()?)
    }
}

/// The token embeddings' vocab-parallel lookup: ids in this rank's run `[start, start + len)` read its
/// rows, the others zero, summed over the group.
pub(crate) fn embed_parallel(
    weight: &Tensor,
    ids: &Tensor,
    start: i64,
    group: &Arc<dyn Collectives>,
) -> Result<Tensor> {
    let len = weight.size()[0];
    let local = ids.f_sub_scalar(start)?;
    let inside = local.f_ge(0)?.f_logical_and(&local.f_lt(len)?)?;
    let local = local.f_masked_fill(&inside.f_logical_not()?, 0)?;
    let mut rows = Tensor::f_embedding(weight, &local, -1, false, false)?
        .f_mul(&inside.f_unsqueeze(-1)?.f_to_kind(weight.kind())?)?;
    group.all_reduce(&mut rows)?;
    Ok(rows)
}

/// Checks that a decoder's heads split over the group: query heads evenly, key/value heads evenly or
/// replicated (fewer kv heads than ranks, each shared by `size / kv_heads` ranks, as vLLM does).
/// Returns this rank's `(query heads start, count)` and `(kv heads start, count)`.
pub fn split_heads(
    heads: i64,
    kv_heads: i64,
    rank: usize,
    size: usize,
) -> Result<((i64, i64), (i64, i64))> {
    let n = size as i64;
    if heads % n != 0 {
        return Err(Error::config(
            "config.json",
            format!("{heads} attention heads do not split over {size} tensor-parallel ranks"),
        ));
    }
    let kv = if kv_heads % n == 0 {
        shard(kv_heads, rank, size)
    } else if n % kv_heads == 0 {
        (rank as i64 * kv_heads / n, 1)
    } else {
        return Err(Error::config(
            "config.json",
            format!(
                "{kv_heads} key/value heads neither split over {size} tensor-parallel ranks nor divide them"
            ),
        ));
    };
    Ok((shard(heads, rank, size), kv))
}
