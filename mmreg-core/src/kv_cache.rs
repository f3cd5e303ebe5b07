//! The paged KV cache: one pool of fixed-size blocks shared by every sequence, and the per-step batch
//! description (which tokens belong to which sequence, where their keys and values go).

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

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

    /// A sequence's keys and values `[len, kv_heads, head_dim]` from its slots `[len]`.
    pub fn gather(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.keys[layer].f_index_select(0, slots)?,
            self.values[layer].f_index_select(0, slots)?,
        ))
    }
}

/// Free blocks of the pool.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    block_size: usize,
    total: usize,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            free: (0..num_blocks as u32).rev().collect(),
            block_size,
            total: num_blocks,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows a sequence's block list to hold `tokens` tokens; false (and no change) if the pool is short.
    pub fn grow(&mut self, blocks: &mut Vec<u32>, tokens: usize) -> bool {
        let needed = self.blocks_for(tokens).saturating_sub(blocks.len());
        if needed > self.free.len() {
            return false;
        }
        blocks.extend(self.free.drain(self.free.len() - needed..));
        true
    }

    pub fn release(&mut self, blocks: &mut Vec<u32>) {
        self.free.append(blocks);
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
    /// For a step of several single-token decodes: every sequence's slots, padded to one width, so that
    /// attention runs once for the whole step.
    pub decode_gather: Option<DecodeGather>,
}

/// The cache slots of a step of single-token decodes (see [`AttentionBatch::decode_gather`]).
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

/// Cache slots of tokens `0..len` of a sequence that owns `blocks`.
pub fn slots(blocks: &[u32], block_size: usize, range: std::ops::Range<usize>) -> Vec<i64> {
    range
        .map(|i| blocks[i / block_size] as i64 * block_size as i64 + (i % block_size) as i64)
        .collect()
}

/// Builds the batch description for sequences `(blocks, context, new tokens)` packed in order.
pub fn attention_batch(
    sequences: &[(&[u32], usize, usize)],
    block_size: usize,
    last_token_logits: bool,
    device: Device,
) -> Result<AttentionBatch> {
    let mut positions = Vec::new();
    let mut new_slots = Vec::new();
    let mut slices = Vec::with_capacity(sequences.len());
    let mut logits_rows = Vec::with_capacity(sequences.len());
    let mut start = 0i64;
    let all_decodes = sequences.len() > 1
        && sequences
            .iter()
            .all(|&(_, context, len)| len == 1 && context > 0);
    let longest = sequences
        .iter()
        .map(|&(_, context, len)| context + len)
        .max()
        .unwrap_or(0);
    let (mut padded, mut lengths) = (Vec::new(), Vec::new());
    for &(blocks, context, len) in sequences {
        if blocks.len() * block_size < context + len {
            return Err(Error::Registry(format!(
                "a sequence of {} tokens has only {} cache blocks",
                context + len,
                blocks.len()
            )));
        }
        let all = slots(blocks, block_size, 0..context + len);
        if all_decodes {
            padded.extend(
                all.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, longest - all.len())),
            );
            lengths.push(all.len() as i64);
        }
        positions.extend((context..context + len).map(|p| p as i64));
        new_slots.extend_from_slice(&all[context..]);
        // A step of decodes attends through `decode_gather`; only other steps need per-sequence slots.
        let slots = if all_decodes {
            Tensor::new()
        } else {
            Tensor::from_slice(&all).to_device(device)
        };
        slices.push(SequenceSlice {
            start,
            len: len as i64,
            context: context as i64,
            slots,
        });
        start += len as i64;
        logits_rows.push(start - 1);
    }
    Ok(AttentionBatch {
        positions: Tensor::from_slice(&positions).to_device(device),
        new_slots: Tensor::from_slice(&new_slots).to_device(device),
        sequences: slices,
        logits_indices: last_token_logits
            .then(|| Tensor::from_slice(&logits_rows).to_device(device)),
        decode_gather: all_decodes
            .then(|| -> Result<DecodeGather> {
                let lengths = Tensor::from_slice(&lengths).to_device(device);
                Ok(DecodeGather {
                    slots: Tensor::from_slice(&padded).to_device(device),
                    mask: real_slots(&lengths, longest as i64)?,
                    lengths,
                })
            })
            .transpose()?,
    })
}
