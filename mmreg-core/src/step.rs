//! What one engine step hands a model's forward: the step's tokens packed along one axis, where each
//! sequence's tokens are, and the paged KV cache they attend to. Model files pass the [`Step`] on to the
//! attention layers of `mmreg-nn` and read nothing in it but positions; the layers own how keys and
//! values are written and read, the engine owns how the step was scheduled.

use tch::{Device, Kind, Tensor};

use crate::Result;

/// What a model's KV cache holds per token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvCacheSpec {
    pub layers: usize,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub kind: Kind,
}

impl KvCacheSpec {
    /// Bytes of keys and values per cached token, all layers.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * (self.kv_heads * self.head_dim) as usize * self.kind.elt_size_in_bytes()
    }
}

/// Keys and values of every layer in blocks of `block_size` tokens: `[num_blocks * block_size, kv_heads,
/// head_dim]` per layer, addressed by slot (`block * block_size + offset`).
#[derive(Debug)]
pub struct PagedKvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
}

impl PagedKvCache {
    pub fn new(
        spec: KvCacheSpec,
        num_blocks: usize,
        block_size: usize,
        device: Device,
    ) -> Result<Self> {
        let shape = [
            (num_blocks * block_size) as i64,
            spec.kv_heads,
            spec.head_dim,
        ];
        let mut keys = Vec::with_capacity(spec.layers);
        let mut values = Vec::with_capacity(spec.layers);
        for _ in 0..spec.layers {
            keys.push(Tensor::f_zeros(shape, (spec.kind, device))?);
            values.push(Tensor::f_zeros(shape, (spec.kind, device))?);
        }
        Ok(Self {
            keys,
            values,
            block_size,
            num_blocks,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Stores a layer's new keys and values `[tokens, kv_heads, head_dim]` at `slots` `[tokens]`.
    pub fn write(
        &mut self,
        layer: usize,
        key: &Tensor,
        value: &Tensor,
        slots: &Tensor,
    ) -> Result<()> {
        let _ = self.keys[layer].f_index_copy_(0, slots, key)?;
        let _ = self.values[layer].f_index_copy_(0, slots, value)?;
        Ok(())
    }

    /// A layer's whole key and value pools, `[slots, kv_heads, head_dim]` each.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }

    /// A layer's pools for writing (a kernel that stores keys and values in place).
    pub fn layer_mut(&mut self, layer: usize) -> (&mut Tensor, &mut Tensor) {
        (&mut self.keys[layer], &mut self.values[layer])
    }

    pub fn layers(&self) -> usize {
        self.keys.len()
    }

    /// A sequence's keys and values `[len, kv_heads, head_dim]` from its slots `[len]`.
    pub fn gather(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.keys[layer].f_index_select(0, slots)?,
            self.values[layer].f_index_select(0, slots)?,
        ))
    }
}

/// One sequence's part of a step: `len` new tokens at `start` in the packed batch, after `context`
/// cached ones; `slots` address all `context + len` of its tokens in the cache (left empty in a step of
/// decodes, which attends through [`AttentionBatch::decode_gather`]).
#[derive(Debug)]
pub struct SequenceSlice {
    pub start: i64,
    pub len: i64,
    pub context: i64,
    pub slots: Tensor,
    /// The keys that the prompt's bidirectional runs ([`crate::ProcessedInputs::bidirectional`]) open to
    /// this step's tokens beyond the causal mask, `[len, context + len]` (bool, on the step's device):
    /// built once per step, applied by every attention layer. `None`: causal.
    pub bidirectional: Option<Tensor>,
}

/// A step's tokens, packed along one axis (`[tokens, hidden]`), with where each sequence's are.
#[derive(Debug)]
pub struct AttentionBatch {
    /// Position of every new token `[tokens]`.
    pub positions: Tensor,
    /// Cache slot of every new token `[tokens]`.
    pub new_slots: Tensor,
    pub sequences: Vec<SequenceSlice>,
    /// Rows to compute logits for (usually each sequence's last token); all rows when `None`.
    pub logits_indices: Option<Tensor>,
    /// Where a step starts with several single-token decodes: their slots, padded to one width, so that
    /// attention runs once for all of them (the first `DecodeGather::lengths.size()[0]` sequences, one
    /// token each); the sequences after them attend one by one.
    pub decode_gather: Option<DecodeGather>,
}

/// The cache slots of a step's leading single-token decodes (see [`AttentionBatch::decode_gather`]).
#[derive(Debug)]
pub struct DecodeGather {
    /// Every sequence's slots padded to the same width: `[sequences * width]` (int64).
    pub slots: Tensor,
    /// Which of them are real, `[sequences, 1, 1, width]`: [`real_slots`], or an additive bias made from
    /// it in the query dtype (0 or -inf).
    pub mask: Tensor,
    /// How many of each sequence's slots are real (the first ones), `[sequences]` (int64).
    pub lengths: Tensor,
}

/// Which of each sequence's `width` padded slots are real, given how many are (`lengths`, `[sequences]`,
/// the first ones): `[sequences, 1, 1, width]`, true on the real slots (the boolean attention mask).
pub fn real_slots(lengths: &Tensor, width: i64) -> Result<Tensor> {
    Ok(Tensor::f_arange(width, (Kind::Int64, lengths.device()))?
        .unsqueeze(0)
        .f_lt_tensor(&lengths.unsqueeze(1))?
        .view([-1, 1, 1, width]))
}

/// One step of the engine as a model's forward sees it: the batch layout and the KV cache.
#[derive(Debug)]
pub struct Step<'a> {
    batch: &'a AttentionBatch,
    cache: &'a mut PagedKvCache,
}

impl<'a> Step<'a> {
    pub fn new(batch: &'a AttentionBatch, cache: &'a mut PagedKvCache) -> Self {
        Self { batch, cache }
    }

    /// The position of every new token, `[tokens]` (int64).
    pub fn positions(&self) -> &Tensor {
        &self.batch.positions
    }

    /// The rows whose logits the engine needs (each sequence's last token in a generation step): the
    /// final hidden states `[tokens, hidden]` narrowed to those rows before the LM head.
    pub fn logits_rows(&self, hidden: Tensor) -> Result<Tensor> {
        Ok(match &self.batch.logits_indices {
            Some(rows) => hidden.f_index_select(0, rows)?,
            None => hidden,
        })
    }

    /// The batch layout, for attention layers.
    pub fn batch(&self) -> &'a AttentionBatch {
        self.batch
    }

    /// The KV cache, for attention layers.
    pub fn cache(&mut self) -> &mut PagedKvCache {
        self.cache
    }
}
