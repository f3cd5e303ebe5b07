//! KV-cache blocks: which of the pool's blocks each sequence owns, and the step layout built from them.

use mmreg_core::step::{AttentionBatch, DecodeGather, SequenceSlice, SlidingSlots};
use mmreg_core::{Error, PromptPositions, Result};
use tch::{Device, Tensor};

use crate::cuda;

/// `values` on `device`, queued without the host waiting for the stream ([`cuda::upload`]).
fn upload<T: tch::kind::Element>(values: &[T], device: Device) -> Result<Tensor> {
    cuda::upload(&Tensor::from_slice(values), device)
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
    // The leading single-token decodes (the scheduler puts a step's decodes first) attend together
    // through `decode_gather` when there are several; the other sequences one by one.
    let decodes = sequences
        .iter()
        .take_while(|&&(_, context, len)| len == 1 && context > 0)
        .count();
    let decodes = if decodes > 1 { decodes } else { 0 };
    let longest = sequences[..decodes]
        .iter()
        .map(|&(_, context, len)| context + len)
        .max()
        .unwrap_or(0);
    let (mut padded, mut lengths) = (Vec::new(), Vec::new());
    for (i, &(blocks, context, len)) in sequences.iter().enumerate() {
        let gathered = i < decodes;
        if blocks.len() * block_size < context + len {
            return Err(Error::Engine(format!(
                "a sequence of {} tokens has only {} cache blocks",
                context + len,
                blocks.len()
            )));
        }
        let all = slots(blocks, block_size, 0..context + len);
        if gathered {
            padded.extend(
                all.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, longest - all.len())),
            );
            lengths.push(all.len() as i64);
        }
        positions.extend((context..context + len).map(|p| p as i64));
        new_slots.extend_from_slice(&all[context..]);
        // The gathered decodes attend through `decode_gather`; only the others need their own slots.
        let slots = if gathered {
            Tensor::new()
        } else {
            upload(&all, device)?
        };
        slices.push(SequenceSlice {
            start,
            len: len as i64,
            context: context as i64,
            slots,
            bidirectional: None,
        });
        start += len as i64;
        logits_rows.push(start - 1);
    }
    Ok(AttentionBatch {
        positions: upload(&positions, device)?,
        new_slots: upload(&new_slots, device)?,
        sequences: slices,
        logits_indices: last_token_logits
            .then(|| upload(&logits_rows, device))
            .transpose()?,
        decode_gather: (decodes > 0)
            .then(|| -> Result<DecodeGather> {
                Ok(DecodeGather::new(
                    upload(&padded, device)?,
                    upload(&lengths, device)?,
                    longest as i64,
                    None,
                ))
            })
            .transpose()?,
        sliding: None,
    })
}

/// Gives a step its slots in the sliding-window layers' pool: `tables[i]` is the batch's sequence `i`'s
/// table there (an entry per block of its tokens, the null block's where its window no longer sees).
/// The gathered decodes take only the slots of their last `window` positions (padded at `pad`), so that
/// the sliding layers read no more than their window.
pub fn set_sliding_slots(
    batch: &mut AttentionBatch,
    tables: &[&[u32]],
    block_size: usize,
    window: usize,
    pad: i64,
    device: Device,
) -> Result<()> {
    let gathered = batch
        .decode_gather
        .as_ref()
        .map_or(0, |g| g.lengths.size()[0] as usize);
    let total = |seq: &SequenceSlice| (seq.context + seq.len) as usize;
    let width = batch.sequences[..gathered]
        .iter()
        .map(|s| total(s).min(window))
        .max()
        .unwrap_or(0);
    let (mut new_slots, mut per_sequence) = (Vec::new(), Vec::new());
    let (mut padded, mut lengths) = (Vec::new(), Vec::new());
    for (i, (seq, table)) in batch.sequences.iter().zip(tables).enumerate() {
        let len = total(seq);
        if table.len() * block_size < len {
            return Err(Error::Engine(format!(
                "a sequence of {len} tokens has only {} sliding-window cache blocks",
                table.len()
            )));
        }
        new_slots.extend(slots(table, block_size, seq.context as usize..len));
        per_sequence.push(if i < gathered {
            let seen = slots(table, block_size, len - len.min(window)..len);
            lengths.push(seen.len() as i64);
            let pad = std::iter::repeat_n(pad, width - seen.len());
            padded.extend(seen.into_iter().chain(pad));
            Tensor::new()
        } else {
            upload(&slots(table, block_size, 0..len), device)?
        });
    }
    let gather = (gathered > 0)
        .then(|| -> Result<DecodeGather> {
            Ok(DecodeGather::new(
                upload(&padded, device)?,
                upload(&lengths, device)?,
                width as i64,
                None,
            ))
        })
        .transpose()?;
    batch.sliding = Some(SlidingSlots {
        new_slots: upload(&new_slots, device)?,
        slots: per_sequence,
        gather,
    });
    Ok(())
}

/// Gives each sequence of a step the keys its prompt's bidirectional runs (`spans[i]` for the batch's
/// sequence `i`) open to this step's tokens: row `p − context` sees every key of a run holding `p`.
pub fn set_bidirectional(
    batch: &mut AttentionBatch,
    spans: &[&[std::ops::Range<usize>]],
    device: Device,
) -> Result<()> {
    for (seq, spans) in batch.sequences.iter_mut().zip(spans) {
        let (from, to) = (seq.context as usize, (seq.context + seq.len) as usize);
        let runs: Vec<_> = spans
            .iter()
            .filter(|r| r.start < to && from < r.end && r.len() > 1)
            .collect();
        if runs.is_empty() {
            continue;
        }
        let mut open = vec![false; seq.len as usize * to];
        for run in runs {
            for p in run.start.max(from)..run.end.min(to) {
                let row = (p - from) * to;
                open[row + run.start..row + run.end.min(to)].fill(true);
            }
        }
        let open = Tensor::from_slice(&open).view([seq.len, to as i64]);
        seq.bidirectional = Some(cuda::upload(&open, device)?);
    }
    Ok(())
}

/// One sequence's part of a step, for its positions: tokens `context..context + new` of a sequence whose
/// prompt has model-computed positions (`prompt`) or none (`0..`).
#[derive(Debug, Clone, Copy)]
pub struct SeqPositions<'a> {
    pub context: usize,
    pub new: usize,
    pub prompt: Option<&'a PromptPositions>,
}

/// The positions of a step's tokens, packed in sequence order: `[tokens]` for a model that reads one
/// position per token, `[sections, tokens]` otherwise (each section `0..` where the prompt has none).
pub fn step_positions(sections: usize, seqs: &[SeqPositions], device: Device) -> Result<Tensor> {
    let tokens: usize = seqs.iter().map(|s| s.new).sum();
    let mut out = vec![0i64; sections.max(1) * tokens];
    for section in 0..sections.max(1) {
        let row = &mut out[section * tokens..(section + 1) * tokens];
        let mut at = 0;
        for seq in seqs {
            for (k, i) in (seq.context..seq.context + seq.new).enumerate() {
                row[at + k] = match seq.prompt {
                    Some(prompt) if prompt.sections == sections => prompt.at(section, i),
                    Some(prompt) => {
                        return Err(Error::Model(format!(
                        "a prompt has positions in {} section(s) but the model reads {sections}",
                        prompt.sections
                    )))
                    }
                    None => i as i64,
                };
            }
            at += seq.new;
        }
    }
    let positions = Tensor::from_slice(&out);
    let positions = if sections > 1 {
        positions.view([sections as i64, tokens as i64])
    } else {
        positions
    };
    cuda::upload(&positions, device)
}

/// Replaces a step's default positions (`context..` per sequence) where the model reads several rows
/// or a sequence's prompt has positions of its own; a no-op otherwise.
pub fn set_positions(
    batch: &mut AttentionBatch,
    sections: usize,
    seqs: &[SeqPositions],
    device: Device,
) -> Result<()> {
    if sections > 1 || seqs.iter().any(|s| s.prompt.is_some()) {
        batch.positions = step_positions(sections, seqs, device)?;
    }
    Ok(())
}
