//! Decode steps in fixed shapes, replayed as CUDA graphs.
//!
//! A step in which every sequence decodes one token launches the same kernels each time, several hundred
//! of them for a 7B model; launched one by one from the host they take longer than the GPU needs to run
//! them. Rounded up to a bucket of batch size and context length, such a step has fixed shapes, so its
//! kernels can be captured once per bucket and replayed with one launch. All of a step's inputs travel in
//! one i64 buffer whose address the graph keeps; padding rows write to a scratch cache slot that no
//! sequence owns and attend to it alone.
//!
//! On the CPU the same fixed-shape steps run without capture, which is what the tests compare against
//! one-at-a-time generation.

use tch::{Device, Kind, Tensor};

use crate::graphs::GraphCache;
use crate::kv_cache::{slots, AttentionBatch, PagedKvCache};
use crate::{MultiModalModel, Result};

/// Context lengths are rounded up to a multiple of this.
pub(super) const CONTEXT_STEP: usize = 256;
/// Contexts longer than this decode without graphs (each bucket's gathered keys and values take memory).
pub(super) const MAX_GRAPH_CONTEXT: usize = 4096;

/// One decoding sequence of a step: its last token, its cache blocks and its length with that token.
pub(super) struct DecodeRow<'a> {
    pub token: u32,
    pub blocks: &'a [u32],
    pub len: usize,
}

pub(super) struct FixedShapeDecode {
    block_size: usize,
    /// A cache slot that belongs to no sequence, for the padding rows.
    scratch_slot: i64,
    max_batch: usize,
    graphs: GraphCache<(usize, usize)>,
}

impl FixedShapeDecode {
    pub(super) fn new(
        device: Device,
        block_size: usize,
        scratch_slot: i64,
        max_batch: usize,
    ) -> Self {
        Self {
            block_size,
            scratch_slot,
            max_batch,
            graphs: GraphCache::new(device),
        }
    }

    /// The bucket `(batch, context)` a step falls in, or `None` if it is too large for one.
    fn bucket(&self, batch: usize, longest: usize) -> Option<(usize, usize)> {
        let batch = match batch {
            0 => return None,
            1 | 2 | 4 | 8 => batch,
            3 => 4,
            5..=7 => 8,
            _ => batch.next_multiple_of(8),
        };
        let context = longest.next_multiple_of(CONTEXT_STEP);
        (batch <= self.max_batch.next_multiple_of(8) && context <= MAX_GRAPH_CONTEXT)
            .then_some((batch, context))
    }

    /// Logits `[rows, vocab]` of a step of single-token decodes, or `None` if the step fits no bucket (the
    /// caller then runs it the ordinary way). The logits are valid until the next call.
    pub(super) fn run(
        &mut self,
        model: &dyn MultiModalModel,
        cache: &mut PagedKvCache,
        rows: &[DecodeRow],
    ) -> Result<Option<Tensor>> {
        let longest = rows.iter().map(|r| r.len).max().unwrap_or(0);
        let Some(bucket) = self.bucket(rows.len(), longest) else {
            return Ok(None);
        };
        let packed = Tensor::from_slice(&self.pack(rows, bucket.0, bucket.1));
        let logits = self.graphs.run(bucket, &[&packed], |inputs| {
            fixed_shape_step(model, &mut *cache, &inputs[0], bucket)
        })?;
        Ok(Some(logits.narrow(0, 0, rows.len() as i64)))
    }

    /// The step's inputs in the layout [`fixed_shape_step`] reads: tokens, positions, new slots and
    /// lengths (`batch` each), then every row's context slots (`batch × context`).
    fn pack(&self, rows: &[DecodeRow], batch: usize, context: usize) -> Vec<i64> {
        let mut out = vec![0i64; 4 * batch + batch * context];
        let (head, gather) = out.split_at_mut(4 * batch);
        head[2 * batch..3 * batch].fill(self.scratch_slot);
        head[3 * batch..].fill(1);
        gather.fill(self.scratch_slot);
        for (i, row) in rows.iter().enumerate() {
            let all = slots(row.blocks, self.block_size, 0..row.len);
            head[i] = row.token as i64;
            head[batch + i] = row.len as i64 - 1;
            head[2 * batch + i] = all[row.len - 1];
            head[3 * batch + i] = row.len as i64;
            gather[i * context..i * context + row.len].copy_from_slice(&all);
        }
        out
    }
}

/// One decode step over fixed shapes, reading everything from `inputs` (see [`FixedShapeDecode::pack`])
/// so that a captured graph sees new values on replay: `[batch, vocab]` logits.
fn fixed_shape_step(
    model: &dyn MultiModalModel,
    cache: &mut PagedKvCache,
    inputs: &Tensor,
    (batch, context): (usize, usize),
) -> Result<Tensor> {
    let (b, c) = (batch as i64, context as i64);
    let part = |i: i64, n: i64| inputs.narrow(0, i * b, n);
    let lens = part(3, b);
    let valid = Tensor::f_arange(c, (Kind::Int64, inputs.device()))?
        .unsqueeze(0)
        .f_lt_tensor(&lens.unsqueeze(1))?
        .view([b, 1, 1, c]);
    let batch = AttentionBatch {
        positions: part(1, b),
        new_slots: part(2, b),
        sequences: Vec::new(),
        logits_indices: None,
        decode_gather: Some((part(4, b * c), valid)),
    };
    let embeds = model.embed_tokens(&part(0, b))?;
    model.forward(&embeds, &batch, cache)
}
