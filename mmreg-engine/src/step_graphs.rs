//! Steps in fixed shapes, replayed as CUDA graphs.
//!
//! A 7B decoder step launches about a thousand kernels. When each is short (a decode step, or the prefill
//! of one short prompt) launching them one by one from the host takes longer than the GPU needs to run
//! them. Rounded up to a bucket, such a step has fixed shapes, so its kernels can be captured once per
//! bucket and replayed with one launch:
//! - a step in which every sequence decodes one token: batch size and context length are rounded up;
//!   padding rows write to a scratch cache slot that no sequence owns and attend to it alone;
//! - a step that prefills one sequence alone: its token count is rounded up; the padding tokens come after
//!   the real ones, which causal attention keeps them from touching, and write to the scratch slot.
//!
//! A model with a sliding-window pool ([`mmreg_core::PagedKvCache::with_sliding_pool`]) gets its slots
//! there too, the padding pointing at that pool's null block.
//!
//! A step's integer inputs travel in one i64 buffer whose address the graph keeps. On the CPU the same
//! fixed-shape steps run without capture, which is what the tests compare against one-at-a-time
//! generation.

use tch::{Device, Tensor};

use mmreg_core::step::{AttentionBatch, DecodeGather, SequenceSlice, SlidingSlots};
use mmreg_core::{MultiModalModel, PagedKvCache, PromptPositions, Result, Step};

use crate::blocks::slots;
use crate::graphs::{GraphCache, GraphOutput};
use crate::kernels;

/// Context lengths of decode steps are rounded up to a multiple of this.
const CONTEXT_STEP: usize = 128;
/// Contexts longer than this decode without graphs (each bucket's gathered keys and values take memory).
const MAX_GRAPH_CONTEXT: usize = 4096;
/// Prompt lengths of single prefills are rounded up to a multiple of this.
const PREFILL_STEP: usize = 32;
/// Longer prompts prefill without graphs: their kernels are long enough to hide launching, and each
/// bucket's activations would take memory.
const MAX_GRAPH_PREFILL: usize = 2048;

/// One decoding sequence of a step: its last token, its cache blocks and its length with that token.
pub(crate) struct DecodeRow<'a> {
    pub token: u32,
    pub blocks: &'a [u32],
    /// Its table in the sliding-window pool (empty without one).
    pub sliding_blocks: &'a [u32],
    pub len: usize,
    /// What the sequence's positions add past its prompt (`PromptPositions::delta`; 0 for most models).
    pub position_delta: i64,
}

/// A decode step in its bucket, with its inputs packed on the host.
pub(crate) struct PlannedDecode {
    batch: usize,
    context: usize,
    rows: usize,
    packed: Tensor,
}

impl PlannedDecode {
    /// A copy for another rank (the inputs are host memory).
    pub(crate) fn shallow_clone(&self) -> Self {
        Self {
            packed: self.packed.shallow_clone(),
            ..*self
        }
    }
}

/// What a fixed-shape step returns, written anew by each replay.
pub(crate) struct StepLogits {
    /// `[rows, vocab]`.
    pub logits: Tensor,
    /// Each row's argmax of `logits` (`[rows]` i64), inside a decode step's graph, so that the host
    /// queues nothing between one replay and the next but the tokens' copies (`None` for a prefill).
    pub argmax: Option<Tensor>,
}

impl GraphOutput for StepLogits {
    fn shallow_clone(&self) -> Self {
        Self {
            logits: self.logits.shallow_clone(),
            argmax: self.argmax.as_ref().map(Tensor::shallow_clone),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Bucket {
    Decode { batch: usize, context: usize },
    Prefill { tokens: usize },
}

pub(crate) struct FixedShapeSteps {
    block_size: usize,
    /// A cache slot that belongs to no sequence, for the padding rows.
    scratch_slot: i64,
    /// The same in the sliding-window pool, where the cache has one, and the window.
    sliding: Option<(i64, usize)>,
    max_batch: usize,
    /// Rows of positions the model reads (`LanguageModel::position_sections`).
    sections: usize,
    /// Decode and prefill graphs share one memory pool: steps run one at a time.
    graphs: GraphCache<Bucket, StepLogits>,
}

impl FixedShapeSteps {
    pub(crate) fn new(
        device: Device,
        block_size: usize,
        scratch_slot: i64,
        sliding: Option<(i64, usize)>,
        max_batch: usize,
        sections: usize,
    ) -> Self {
        Self {
            block_size,
            scratch_slot,
            sliding,
            max_batch,
            sections: sections.max(1),
            graphs: GraphCache::new(device),
        }
    }

    /// Logits `[rows, vocab]` of a step of single-token decodes and their argmax, or `None` if the step
    /// fits no bucket (the caller then runs it the ordinary way). Valid until the next step.
    pub(crate) fn decode(
        &mut self,
        model: &dyn MultiModalModel,
        cache: &mut PagedKvCache,
        rows: &[DecodeRow],
    ) -> Result<Option<StepLogits>> {
        let Some(planned) = self.plan_decode(rows) else {
            return Ok(None);
        };
        self.replay_decode(model, cache, &planned, None).map(Some)
    }

    /// The bucket and packed inputs of a step of single-token decodes, or `None` if it fits no bucket:
    /// what every rank of a tensor-parallel engine replays ([`Self::replay_decode`]).
    pub(crate) fn plan_decode(&self, rows: &[DecodeRow]) -> Option<PlannedDecode> {
        let longest = rows.iter().map(|r| r.len).max().unwrap_or(0);
        let batch = match rows.len() {
            0 => return None,
            n @ (1 | 2 | 4 | 8) => n,
            3 => 4,
            5..=7 => 8,
            n => n.next_multiple_of(8),
        };
        let context = longest.next_multiple_of(CONTEXT_STEP);
        if batch > self.max_batch.next_multiple_of(8) || context > MAX_GRAPH_CONTEXT {
            return None;
        }
        Some(PlannedDecode {
            batch,
            context,
            rows: rows.len(),
            packed: Tensor::from_slice(&self.pack_decode(rows, batch, context)),
        })
    }

    /// Runs (or replays) a planned decode step: `[rows, vocab]` logits and their argmax, valid until the
    /// next step. `tokens` (`[rows]` on the model's device), where given, are the rows' input tokens in
    /// place of the planned ones: the argmax of the step before, which the host has not read yet. Nothing
    /// here makes the host wait for the device.
    pub(crate) fn replay_decode(
        &mut self,
        model: &dyn MultiModalModel,
        cache: &mut PagedKvCache,
        planned: &PlannedDecode,
        tokens: Option<&Tensor>,
    ) -> Result<StepLogits> {
        let rows = planned.rows as i64;
        // The planned inputs go up from the host; tokens on the device are written over their first
        // rows there. Off CUDA that write lands in the host tensor itself, which other ranks share: a copy.
        let packed = match (tokens, model.device()) {
            (Some(_), Device::Cpu) => planned.packed.copy(),
            _ => planned.packed.shallow_clone(),
        };
        let patch = |inputs: &mut [Tensor]| -> Result<()> {
            if let Some(tokens) = tokens {
                inputs[0].narrow(0, 0, rows).f_copy_(tokens)?;
            }
            Ok(())
        };
        let (batch, context) = (planned.batch, planned.context);
        let shape = DecodeShape {
            batch,
            context,
            sections: self.sections,
            sliding: self.sliding_width(context),
        };
        let out = self.graphs.run_patched(
            Bucket::Decode { batch, context },
            &[&packed],
            patch,
            |inputs| {
                let logits = decode_step(model, &mut *cache, &inputs[0], shape)?;
                let argmax = Some(kernels::argmax(&logits));
                Ok(StepLogits { logits, argmax })
            },
        )?;
        Ok(StepLogits {
            logits: out.logits.narrow(0, 0, rows),
            argmax: out.argmax.map(|a| a.narrow(0, 0, rows)),
        })
    }

    /// The logits `[1, vocab]` of the last token of one sequence prefilled alone from `embeds`
    /// (`[tokens, hidden]`, its prompt's model-computed `positions` if any), or `None` if the prompt fits
    /// no bucket. Valid until the next step.
    pub(crate) fn prefill(
        &mut self,
        model: &dyn MultiModalModel,
        cache: &mut PagedKvCache,
        embeds: &Tensor,
        blocks: &[u32],
        sliding_blocks: &[u32],
        positions: Option<&PromptPositions>,
    ) -> Result<Option<Tensor>> {
        let len = embeds.size()[0] as usize;
        let tokens = len.next_multiple_of(PREFILL_STEP);
        if len == 0 || tokens > MAX_GRAPH_PREFILL {
            return Ok(None);
        }
        // Positions (a row per section), then cache slots (padding at the scratch slot), then the row to
        // take logits of, then the slots in the sliding-window pool if any.
        let mut packed: Vec<i64> = (0..self.sections)
            .flat_map(|s| (0..tokens).map(move |i| positions.map_or(i as i64, |p| p.at(s, i))))
            .collect();
        packed.extend(slots(blocks, self.block_size, 0..len));
        packed.extend(std::iter::repeat_n(self.scratch_slot, tokens - len));
        packed.push(len as i64 - 1);
        if let Some((scratch, _)) = self.sliding {
            packed.extend(slots(sliding_blocks, self.block_size, 0..len));
            packed.extend(std::iter::repeat_n(scratch, tokens - len));
        }
        let packed = Tensor::from_slice(&packed);
        let padded = embeds.f_constant_pad_nd([0, 0, 0, (tokens - len) as i64])?;
        let (sections, sliding) = (self.sections, self.sliding.is_some());
        let logits =
            self.graphs
                .run(Bucket::Prefill { tokens }, &[&padded, &packed], |inputs| {
                    let logits = prefill_step(
                        model,
                        &mut *cache,
                        &inputs[0],
                        &inputs[1],
                        sections,
                        sliding,
                    )?;
                    Ok(StepLogits {
                        logits,
                        argmax: None,
                    })
                })?;
        Ok(Some(logits.logits))
    }

    /// How many slots a decode step of `context` gathers per row from the sliding-window pool: its
    /// window (rounded up like contexts), at most the context; `None` without that pool.
    fn sliding_width(&self, context: usize) -> Option<usize> {
        self.sliding
            .map(|(_, window)| window.next_multiple_of(CONTEXT_STEP).min(context))
    }

    /// A decode step's inputs in the layout [`decode_step`] reads: tokens, positions, new slots and
    /// lengths (`batch` each), then every row's context slots (`batch × context`); then, with a
    /// sliding-window pool, the new slots and lengths there (`batch` each) and the slots of each row's
    /// window (`batch × width`).
    fn pack_decode(&self, rows: &[DecodeRow], batch: usize, context: usize) -> Vec<i64> {
        let main = 4 * batch + batch * context;
        let mut out = vec![0i64; main];
        if let (Some((scratch, window)), Some(width)) = (self.sliding, self.sliding_width(context))
        {
            out.resize(main + 2 * batch + batch * width, scratch);
            let (head, gather) = out[main..].split_at_mut(2 * batch);
            head[batch..].fill(1);
            for (i, row) in rows.iter().enumerate() {
                let seen = slots(
                    row.sliding_blocks,
                    self.block_size,
                    row.len - row.len.min(window)..row.len,
                );
                head[i] = seen[seen.len() - 1];
                head[batch + i] = seen.len() as i64;
                gather[i * width..i * width + seen.len()].copy_from_slice(&seen);
            }
        }
        let (head, gather) = out[..main].split_at_mut(4 * batch);
        head[2 * batch..3 * batch].fill(self.scratch_slot);
        head[3 * batch..].fill(1);
        gather.fill(self.scratch_slot);
        for (i, row) in rows.iter().enumerate() {
            let all = slots(row.blocks, self.block_size, 0..row.len);
            head[i] = row.token as i64;
            head[batch + i] = row.len as i64 - 1 + row.position_delta;
            head[2 * batch + i] = all[row.len - 1];
            head[3 * batch + i] = row.len as i64;
            gather[i * context..i * context + row.len].copy_from_slice(&all);
        }
        out
    }
}

/// The shape of a fixed decode step.
#[derive(Debug, Clone, Copy)]
struct DecodeShape {
    batch: usize,
    context: usize,
    sections: usize,
    /// With a sliding-window pool, the slots gathered per row there.
    sliding: Option<usize>,
}

/// One decode step over fixed shapes, reading everything from `inputs` (see
/// [`FixedShapeSteps::pack_decode`]) so that a captured graph sees new values on replay: `[batch, vocab]`
/// logits.
fn decode_step(
    model: &dyn MultiModalModel,
    cache: &mut PagedKvCache,
    inputs: &Tensor,
    shape: DecodeShape,
) -> Result<Tensor> {
    let DecodeShape {
        batch,
        context,
        sections,
        sliding,
    } = shape;
    let (b, c) = (batch as i64, context as i64);
    let part = |i: i64, n: i64| inputs.narrow(0, i * b, n);
    // Where a layer needs a mask (not the paged decode kernel), an attention bias in the model dtype,
    // made once for every layer: 0 on each row's real slots, -inf on its padding.
    let bias = Some(model.dtype());
    // A decoded token sits at the same position in every section (past the prompt, `i + delta`).
    let positions = match sections {
        1 => part(1, b),
        s => part(1, b).unsqueeze(0).expand([s as i64, b], false),
    };
    let sliding = sliding
        .map(|width| -> Result<SlidingSlots> {
            let (at, w) = (4 * b + b * c, width as i64);
            Ok(SlidingSlots {
                new_slots: inputs.narrow(0, at, b),
                slots: Vec::new(),
                gather: Some(DecodeGather::new(
                    inputs.narrow(0, at + 2 * b, b * w),
                    inputs.narrow(0, at + b, b),
                    w,
                    bias,
                )),
            })
        })
        .transpose()?;
    let batch = AttentionBatch {
        positions,
        new_slots: part(2, b),
        sequences: Vec::new(),
        logits_indices: None,
        decode_gather: Some(DecodeGather::new(part(4, b * c), part(3, b), c, bias)),
        sliding,
    };
    let embeds = model.embed_tokens(&part(0, b))?;
    model.forward(&embeds, &mut Step::new(&batch, cache))
}

/// One sequence's prefill over `embeds` (`[tokens, hidden]`, padded), reading positions, slots and the
/// logits row from `packed` (see [`FixedShapeSteps::prefill`]): `[1, vocab]` logits.
fn prefill_step(
    model: &dyn MultiModalModel,
    cache: &mut PagedKvCache,
    embeds: &Tensor,
    packed: &Tensor,
    sections: usize,
    sliding: bool,
) -> Result<Tensor> {
    let t = embeds.size()[0];
    let s = sections as i64;
    let positions = match sections {
        1 => packed.narrow(0, 0, t),
        _ => packed.narrow(0, 0, s * t).view([s, t]),
    };
    let batch = AttentionBatch {
        positions,
        new_slots: packed.narrow(0, s * t, t),
        sequences: vec![SequenceSlice {
            start: 0,
            len: t,
            context: 0,
            slots: Tensor::new(),
            bidirectional: None,
        }],
        logits_indices: Some(packed.narrow(0, (s + 1) * t, 1)),
        decode_gather: None,
        sliding: sliding.then(|| SlidingSlots {
            new_slots: packed.narrow(0, (s + 1) * t + 1, t),
            slots: vec![Tensor::new()],
            gather: None,
        }),
    };
    model.forward(embeds, &mut Step::new(&batch, cache))
}
