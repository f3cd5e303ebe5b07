//! A request as the scheduler takes it: the processed prompt, and each multimodal item mapped on its own
//! and hashed, so that the scheduler can encode only the items its encoder cache lacks and slice their
//! features into whichever chunk of the prompt their placeholders fall in.

use mmreg_core::prepare::process;
use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    Error, Modality, ModelContext, MultiModalData, MultiModalItem, ProcessedInputs,
    ProcessorInputs, Result, TensorMap,
};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tch::Device;

use crate::block_pool::Hash;
use crate::cuda;
use crate::encoder_cache::item_hash;

/// One multimodal item of a prompt.
#[derive(Debug)]
pub(crate) struct ItemInputs {
    pub modality: Modality,
    /// The item's index within its modality.
    pub item: usize,
    pub hash: Hash,
    /// The input mapper's tensors for this item alone (on the CPU; in pinned memory, those bound for the
    /// device, where [`pin_items`] had room).
    pub inputs: TensorMap,
    /// The item's share of the pinned memory, given back when the item is dropped (held, never read).
    #[allow(dead_code)]
    pub pinned: Option<PinnedShare>,
    /// Where its placeholder run starts and ends in the prompt.
    pub start: usize,
    pub end: usize,
    /// The prompt positions that take the item's feature rows, in row order.
    pub rows: Vec<usize>,
}

impl ItemInputs {
    pub fn overlaps(&self, start: usize, end: usize) -> bool {
        self.start < end && start < self.end
    }
}

/// A processed prompt and its items, in prompt order.
#[derive(Debug)]
pub(crate) struct PreparedRequest {
    pub processed: ProcessedInputs,
    pub items: Vec<ItemInputs>,
}

impl PreparedRequest {
    pub fn prompt_len(&self) -> usize {
        self.processed.token_ids.len()
    }

    /// The hashes of the items whose placeholders overlap positions `start..end`, in prompt order.
    pub fn item_hashes(&self, start: usize, end: usize) -> impl Iterator<Item = &Hash> {
        self.items
            .iter()
            .filter(move |item| item.overlaps(start, end))
            .map(|item| &item.hash)
    }
}

/// One item as a prompt's only data, for its mapper.
fn alone(data: &MultiModalData, modality: Modality, item: usize) -> MultiModalData {
    let mut one = MultiModalData::default();
    match modality {
        Modality::Image => one.images.push(data.images[item].clone()),
        Modality::Video => one.videos.push(data.videos[item].clone()),
    }
    one
}

/// Runs the input processor, then each item's mapper on that item alone, and hashes each item
/// (`settings`: [`crate::encoder_cache::processor_settings`]).
pub(crate) fn prepare_request(
    entry: &ModelEntry,
    ctx: &ModelContext,
    settings: &Hash,
    inputs: ProcessorInputs,
    max_len: usize,
) -> Result<PreparedRequest> {
    let processed = process(entry, ctx, inputs, max_len)?;
    let data = &processed.multimodal;
    let mut ranges: Vec<_> = processed.placeholders.iter().collect();
    ranges.sort_by_key(|r| r.offset);
    let mut items = Vec::with_capacity(ranges.len());
    for range in ranges {
        let item: MultiModalItem = data
            .items(range.modality)
            .get(range.item)
            .copied()
            .ok_or_else(|| {
                Error::Model(format!(
                    "a placeholder names {} #{} of {}",
                    range.modality,
                    range.item,
                    data.len(range.modality)
                ))
            })?;
        let rows = match &range.is_embed {
            None => (range.offset..range.offset + range.length).collect(),
            Some(mask) => mask
                .iter()
                .enumerate()
                .filter(|(_, &e)| e)
                .map(|(i, _)| range.offset + i)
                .collect(),
        };
        items.push(ItemInputs {
            modality: range.modality,
            item: range.item,
            hash: item_hash(settings, item),
            inputs: entry.map(
                ctx,
                range.modality,
                &alone(data, range.modality, range.item),
            )?,
            start: range.offset,
            end: range.offset + range.length,
            rows,
            pinned: None,
        });
    }
    Ok(PreparedRequest { processed, items })
}

/// How much host memory the items of the requests in the engine may hold pinned at once.
#[derive(Debug)]
pub(crate) struct PinnedBudget {
    used: AtomicUsize,
    limit: usize,
}

/// Bytes of an item's tensors held in pinned memory, counted against a [`PinnedBudget`] until dropped.
#[derive(Debug)]
pub(crate) struct PinnedShare {
    budget: Arc<PinnedBudget>,
    bytes: usize,
}

impl Drop for PinnedShare {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl PinnedBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// A share of `bytes`, if that many are left.
    pub fn take(self: &Arc<Self>, bytes: usize) -> Option<PinnedShare> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .ok()?;
        Some(PinnedShare {
            budget: self.clone(),
            bytes,
        })
    }

    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
}

/// Puts the tensors of each item that go to CUDA `device` (all but the modality's host parameters) in
/// pinned memory, while `budget` has room: the scheduler's upload of them is then one asynchronous copy,
/// where copying them into pinned memory first would hold up the step (LLaVA-NeXT's 6.8 MB of pixels an
/// image). Items beyond the budget, and every item off CUDA, stay as they are.
pub(crate) fn pin_items(
    items: &mut [ItemInputs],
    entry: &ModelEntry,
    device: Device,
    budget: &Arc<PinnedBudget>,
) -> Result<()> {
    if !device.is_cuda() {
        return Ok(());
    }
    for item in items {
        let host = entry.host_params(item.modality)?;
        let bound: Vec<&str> = item.inputs.names().filter(|n| !host.contains(n)).collect();
        let bytes = bound
            .iter()
            .map(|&n| {
                let t = &item.inputs.0[n];
                t.numel() * t.kind().elt_size_in_bytes()
            })
            .sum();
        let Some(share) = budget.take(bytes) else {
            return Ok(());
        };
        let pinned: Option<Vec<(String, tch::Tensor)>> = bound
            .iter()
            .map(|&n| Some((n.to_owned(), cuda::pinned(&item.inputs.0[n], device)?)))
            .collect();
        // Pinning fails off a GPU build, or when the host is short of page-locked memory.
        let Some(pinned) = pinned else {
            return Ok(());
        };
        for (name, tensor) in pinned {
            item.inputs.insert(name, tensor);
        }
        item.pinned = Some(share);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_budget_gives_shares_while_it_has_room_and_takes_them_back_when_dropped() {
        let budget = PinnedBudget::new(100);
        let first = budget.take(60).expect("room");
        assert!(budget.take(41).is_none(), "101 of 100");
        let second = budget.take(40).expect("room for 40");
        assert_eq!(budget.used(), 100);
        drop(first);
        assert_eq!(budget.used(), 40);
        assert!(budget.take(60).is_some_and(|third| third.bytes == 60));
        drop(second);
        assert_eq!(budget.used(), 0);
        assert!(budget.take(usize::MAX).is_none(), "no overflow");
    }
}
