//! A request as the scheduler takes it: the processed prompt, and each multimodal item mapped on its own
//! and hashed, so that the scheduler can encode only the items its encoder cache lacks and slice their
//! features into whichever chunk of the prompt their placeholders fall in.

use mmreg_core::prepare::process;
use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    Error, Modality, ModelContext, MultiModalData, MultiModalItem, ProcessedInputs,
    ProcessorInputs, Result, TensorMap,
};

use crate::block_pool::Hash;
use crate::encoder_cache::item_hash;

/// One multimodal item of a prompt.
#[derive(Debug)]
pub(crate) struct ItemInputs {
    pub modality: Modality,
    /// The item's index within its modality.
    pub item: usize,
    pub hash: Hash,
    /// The input mapper's tensors for this item alone (on the CPU).
    pub inputs: TensorMap,
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
        });
    }
    Ok(PreparedRequest { processed, items })
}
