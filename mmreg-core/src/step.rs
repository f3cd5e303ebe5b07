//! What one engine step hands a model's forward: the step's tokens packed along one axis, where each
//! sequence's tokens are, and the paged KV cache they attend to. Model files pass the [`Step`] on to the
//! attention layers of `mmreg-nn` and read nothing in it but positions; the layers own how keys and
//! values are written and read, the engine owns how the step was scheduled.

use std::cell::OnceCell;

use tch::{Device, Kind, Tensor};

use crate::Result;

/// What a model's KV cache holds per token.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCacheSpec {
    pub layers: usize,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub kind: Kind,
    /// The layers that attend within a sliding window (Gemma 3's local layers): the engine keeps only
    /// their keys and values still in sight, in a pool of their own. `None`: every layer is global.
    pub sliding: Option<SlidingLayers>,
}

/// Layers of a decoder that attend within one sliding window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlidingLayers {
    /// A query at position `i` sees keys at `i − window + 1 ..= i` (and, inside a bidirectional run,
    /// the run's later keys).
    pub window: usize,
    /// Their indices, in `0..layers`.
    pub layers: Vec<usize>,
}

impl KvCacheSpec {
    /// Every layer global.
    pub fn new(layers: usize, kv_heads: i64, head_dim: i64, kind: Kind) -> Self {
        Self {
            layers,
            kv_heads,
            head_dim,
            kind,
            sliding: None,
        }
    }

    /// The same spec with `layers` attending within `window` (none if `layers` is empty).
    pub fn with_sliding_window(self, window: usize, layers: Vec<usize>) -> Self {
        Self {
            sliding: (!layers.is_empty()).then_some(SlidingLayers { window, layers }),
            ..self
        }
    }

    /// Bytes of keys and values per cached token, all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layers * self.bytes_per_layer_token()
    }

    /// Bytes of keys and values of one layer per cached token.
    pub fn bytes_per_layer_token(&self) -> usize {
        2 * (self.kv_heads * self.head_dim) as usize * self.kind.elt_size_in_bytes()
    }

    /// How many layers attend within a sliding window.
    pub fn sliding_layers(&self) -> usize {
        self.sliding.as_ref().map_or(0, |s| s.layers.len())
    }

    /// Whether layer `layer` attends within a sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding
            .as_ref()
            .is_some_and(|s| s.layers.contains(&layer))
    }
}

/// Keys and values of every layer in blocks of `block_size` tokens: `[num_blocks * block_size, kv_heads,
/// head_dim]` per layer, addressed by slot (`block * block_size + offset`).
///
/// Built with [`PagedKvCache::with_sliding_pool`], the sliding-window layers have a pool of their own,
/// `[sliding_blocks * block_size, ..]`, addressed by the step's [`SlidingSlots`]: there a sequence holds
/// only the blocks still in sight of its window.
#[derive(Debug)]
pub struct PagedKvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    /// Blocks of the sliding layers' own pool, where they have one.
    sliding_blocks: Option<usize>,
    /// Per layer: whether it reads and writes the sliding pool.
    in_sliding_pool: Vec<bool>,
}

impl PagedKvCache {
    /// One pool of `num_blocks` for every layer, sliding-window ones included (all addressed by the
    /// step's main slots).
    pub fn new(
        spec: KvCacheSpec,
        num_blocks: usize,
        block_size: usize,
        device: Device,
    ) -> Result<Self> {
        Self::build(spec, num_blocks, None, block_size, device)
    }

    /// `num_blocks` for the global layers, and a pool of `sliding_blocks` for the spec's sliding-window
    /// layers.
    pub fn with_sliding_pool(
        spec: KvCacheSpec,
        num_blocks: usize,
        sliding_blocks: usize,
        block_size: usize,
        device: Device,
    ) -> Result<Self> {
        Self::build(spec, num_blocks, Some(sliding_blocks), block_size, device)
    }

    fn build(
        spec: KvCacheSpec,
        num_blocks: usize,
        sliding_blocks: Option<usize>,
        block_size: usize,
        device: Device,
    ) -> Result<Self> {
        let mut keys = Vec::with_capacity(spec.layers);
        let mut values = Vec::with_capacity(spec.layers);
        let mut in_sliding_pool = Vec::with_capacity(spec.layers);
        for layer in 0..spec.layers {
            let sliding = sliding_blocks.is_some() && spec.is_sliding(layer);
            let blocks = match sliding_blocks {
                Some(blocks) if sliding => blocks,
                _ => num_blocks,
            };
            let shape = [(blocks * block_size) as i64, spec.kv_heads, spec.head_dim];
            keys.push(Tensor::f_zeros(shape, (spec.kind, device))?);
            values.push(Tensor::f_zeros(shape, (spec.kind, device))?);
            in_sliding_pool.push(sliding);
        }
        Ok(Self {
            keys,
            values,
            block_size,
            num_blocks,
            sliding_blocks: sliding_blocks.filter(|_| in_sliding_pool.contains(&true)),
            in_sliding_pool,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks of the sliding-window layers' own pool, if they have one.
    pub fn sliding_blocks(&self) -> Option<usize> {
        self.sliding_blocks
    }

    /// Whether layer `layer` stores its keys and values in the sliding-window pool (addressed by
    /// [`AttentionBatch::sliding`]).
    pub fn in_sliding_pool(&self, layer: usize) -> bool {
        self.in_sliding_pool.get(layer).copied().unwrap_or(false)
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
    /// The slots of the sliding-window layers' own pool, where the cache has one
    /// ([`PagedKvCache::with_sliding_pool`]); those layers read and write there instead.
    pub sliding: Option<SlidingSlots>,
}

/// A step's cache slots in the sliding-window pool, laid out as the main ones: each token's slot in
/// that pool where the main slots address the global one. Positions a window no longer sees point at a
/// block that holds nothing of the sequence; the window's mask hides them.
#[derive(Debug)]
pub struct SlidingSlots {
    /// As [`AttentionBatch::new_slots`].
    pub new_slots: Tensor,
    /// As each [`SequenceSlice::slots`], in sequence order.
    pub slots: Vec<Tensor>,
    /// The gathered decodes' keys in this pool: only the slots of each sequence's window (its last
    /// `window` positions), padded to the longest, with their own mask and lengths. A layer reading them
    /// needs no window mask.
    pub gather: Option<DecodeGather>,
}

impl AttentionBatch {
    /// The same batch with its tensors on `device` (shallow copies where they are there already): what
    /// another rank of a tensor-parallel group runs the step with.
    pub fn to_device(&self, device: Device) -> AttentionBatch {
        let to = |t: &Tensor| {
            if t.defined() {
                t.to_device(device)
            } else {
                Tensor::new()
            }
        };
        AttentionBatch {
            positions: to(&self.positions),
            new_slots: to(&self.new_slots),
            sequences: self
                .sequences
                .iter()
                .map(|s| SequenceSlice {
                    start: s.start,
                    len: s.len,
                    context: s.context,
                    slots: to(&s.slots),
                    bidirectional: s.bidirectional.as_ref().map(to),
                })
                .collect(),
            logits_indices: self.logits_indices.as_ref().map(to),
            decode_gather: self.decode_gather.as_ref().map(|g| g.to_device(to)),
            sliding: self.sliding.as_ref().map(|p| SlidingSlots {
                new_slots: to(&p.new_slots),
                slots: p.slots.iter().map(to).collect(),
                gather: p.gather.as_ref().map(|g| g.to_device(to)),
            }),
        }
    }
}

/// The slots a layer addresses the cache with: the step's main ones, or the sliding pool's.
#[derive(Debug, Clone, Copy)]
pub struct LayerSlots<'a> {
    batch: &'a AttentionBatch,
    pool: Option<&'a SlidingSlots>,
}

impl AttentionBatch {
    /// The slots through which a layer in the sliding pool (`sliding`) or the main one addresses the
    /// cache; an error if the step carries no slots for the sliding pool.
    pub fn layer_slots(&self, sliding: bool) -> Result<LayerSlots<'_>> {
        let pool = match (sliding, &self.sliding) {
            (false, _) => None,
            (true, Some(pool)) => Some(pool),
            (true, None) => {
                return Err(crate::Error::Engine(
                    "the cache has a sliding-window pool but the step carries no slots for it"
                        .into(),
                ))
            }
        };
        Ok(LayerSlots { batch: self, pool })
    }
}

impl<'a> LayerSlots<'a> {
    /// Where the step's new keys and values go, `[tokens]`.
    pub fn new_slots(&self) -> &'a Tensor {
        self.pool.map_or(&self.batch.new_slots, |p| &p.new_slots)
    }

    /// All of sequence `i`'s slots (empty for the gathered decodes).
    pub fn sequence(&self, i: usize) -> &'a Tensor {
        self.pool
            .map_or(&self.batch.sequences[i].slots, |p| &p.slots[i])
    }

    /// The gathered decodes' padded slots, mask and lengths.
    pub fn gather(&self) -> Option<&'a DecodeGather> {
        match self.pool {
            Some(pool) => pool.gather.as_ref(),
            None => self.batch.decode_gather.as_ref(),
        }
    }

    /// Whether these are the sliding pool's slots, whose gathered decodes hold only their windows.
    pub fn windowed(&self) -> bool {
        self.pool.is_some()
    }
}

/// The cache slots of a step's leading single-token decodes (see [`AttentionBatch::decode_gather`]).
#[derive(Debug)]
pub struct DecodeGather {
    /// Every sequence's slots padded to the same width: `[sequences * width]` (int64).
    pub slots: Tensor,
    /// How many of each sequence's slots are real (the first ones), `[sequences]` (int64).
    pub lengths: Tensor,
    /// The padded width: how many slots each sequence has in `slots`.
    pub width: i64,
    /// The form of [`Self::mask`]: boolean (`None`), or an additive bias in this dtype (0 or -inf).
    pub bias: Option<Kind>,
    mask: OnceCell<Tensor>,
}

impl DecodeGather {
    /// The gather of `lengths.size()[0]` sequences' `slots`, `width` each; `bias` as [`Self::bias`].
    pub fn new(slots: Tensor, lengths: Tensor, width: i64, bias: Option<Kind>) -> DecodeGather {
        DecodeGather {
            slots,
            lengths,
            width,
            bias,
            mask: OnceCell::new(),
        }
    }

    /// Which slots are real, `[sequences, 1, 1, width]`: [`real_slots`], or the additive bias made from
    /// it. Made on first use (once for every layer), so that a step whose layers all take the paged
    /// decode kernel, which reads `lengths`, makes none.
    pub fn mask(&self) -> Result<&Tensor> {
        if let Some(mask) = self.mask.get() {
            return Ok(mask);
        }
        let real = real_slots(&self.lengths, self.width)?;
        let mask = match self.bias {
            None => real,
            Some(kind) => {
                let rows = self.lengths.size()[0];
                Tensor::f_full(
                    [rows, 1, 1, self.width],
                    f64::NEG_INFINITY,
                    (kind, self.lengths.device()),
                )?
                .f_masked_fill(&real, 0.0)?
            }
        };
        Ok(self.mask.get_or_init(|| mask))
    }

    /// The same gather with its tensors on another device (see [`AttentionBatch::to_device`]).
    fn to_device(&self, to: impl Fn(&Tensor) -> Tensor) -> DecodeGather {
        DecodeGather::new(to(&self.slots), to(&self.lengths), self.width, self.bias)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gathers_mask_is_made_on_first_use_in_its_form() {
        let lengths = Tensor::from_slice(&[2i64, 3]);
        let gather = DecodeGather::new(
            Tensor::zeros([8], (Kind::Int64, Device::Cpu)),
            lengths.shallow_clone(),
            4,
            None,
        );
        let mask = gather.mask().unwrap();
        assert_eq!(mask.size(), [2, 1, 1, 4]);
        let real: Vec<bool> = Vec::try_from(mask.flatten(0, -1)).unwrap();
        assert_eq!(real, [true, true, false, false, true, true, true, false]);
        // Made once: the second call hands back the same tensor.
        assert_eq!(gather.mask().unwrap().data_ptr(), mask.data_ptr());

        let gather = DecodeGather::new(
            Tensor::zeros([8], (Kind::Int64, Device::Cpu)),
            lengths,
            4,
            Some(Kind::BFloat16),
        );
        let bias = gather.mask().unwrap();
        assert_eq!(bias.kind(), Kind::BFloat16);
        let values: Vec<f32> = Vec::try_from(bias.to_kind(Kind::Float).flatten(0, -1)).unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(values, [0.0, 0.0, inf, inf, 0.0, 0.0, 0.0, inf]);
    }
}
