//! Startup: run the registered dummy data for the worst step, measure the activation peak, size the KV cache.

use tch::Kind;

use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    DummyRequest, Error, KvCacheSpec, ModalityCounts, ModelContext, MultiModalModel, PagedKvCache,
    Result, Step,
};

use crate::blocks::{attention_batch, set_positions, SeqPositions};
use crate::cuda;
use crate::engine::{EngineOptions, EngineProfile};
use crate::generate::{embed_prompt, prepare};

/// Runs the registered dummy data for the worst case, measures the activation peak, and sizes the cache:
/// `fraction × free − weights − peak activations` on CUDA (free: before the weights were loaded), and
/// [`cpu_cache_bytes`] on the CPU; neither more than `max_num_seqs` sequences of `max_model_len` tokens
/// can use.
pub(crate) fn profile_and_allocate(
    entry: &ModelEntry,
    ctx: &ModelContext,
    model: &dyn MultiModalModel,
    options: &EngineOptions,
    max_model_len: usize,
    device_index: Option<usize>,
    free_before_load: Option<u64>,
) -> Result<(PagedKvCache, EngineProfile)> {
    let weights_bytes = device_index
        .and_then(cuda::memory_stats)
        .map(|s| s.allocated);
    let dummy = dummy_forward(entry, ctx, model, options, max_model_len)?;
    let DummyStep {
        dummy_prompt_tokens,
        dummy_items,
        largest_item_tokens,
    } = dummy;
    let peak = device_index
        .and_then(cuda::memory_stats)
        .map(|s| s.peak_allocated);
    let total = device_index
        .and_then(cuda::mem_get_info)
        .map(|(_, total)| total);
    let peak_activation_bytes = peak.zip(weights_bytes).map(|(p, w)| p.saturating_sub(w));
    if let Some(i) = device_index {
        cuda::empty_cache();
        cuda::reset_peak_stats(i);
    }
    let spec = model.kv_cache_spec();
    let sizes = CacheSizes::new(&spec, options, max_model_len);
    // More than every sequence slot filled to max_model_len is memory no step can use.
    let useful = sizes.bytes(sizes.useful_blocks);
    let kv_cache_bytes = match (
        free_before_load.or(total),
        weights_bytes,
        peak_activation_bytes,
    ) {
        (Some(free), Some(weights), Some(activations)) => {
            let budget = (free as f64 * options.gpu_memory_utilization) as u64;
            // The encoder cache fills up as images come: its bytes are set aside too.
            let encoder_cache = options.encoder_cache_bytes as u64;
            let left = budget
                .checked_sub(weights + activations + encoder_cache)
                .ok_or_else(|| {
                    Error::Engine(format!(
                        "no memory is left for the KV cache: {} usable ({} of {} free) < weights {} + activations {} + encoder cache {}; raise gpu_memory_utilization, free the device, or lower max_num_batched_tokens or the encoder cache",
                        human(budget), options.gpu_memory_utilization, human(free), human(weights), human(activations), human(encoder_cache)
                    ))
                })?;
            tracing::info!(
                free = %human(free),
                gpu_memory_utilization = options.gpu_memory_utilization,
                weights = %human(weights),
                activations = %human(activations),
                encoder_cache = %human(encoder_cache),
                left = %human(left),
                "KV cache budget on the GPU"
            );
            left.min(useful)
        }
        _ if options.cpu_kv_cache_bytes > 0 => options.cpu_kv_cache_bytes as u64,
        _ => cpu_cache_bytes(useful, sizes.bytes(sizes.one_sequence), available_memory()),
    };
    let (kv_blocks, sliding_blocks) = sizes.split(kv_cache_bytes);
    let kv_cache_bytes = sizes.bytes_of(kv_blocks, sliding_blocks);
    let capacity = kv_blocks * options.block_size;
    if capacity < max_model_len {
        return Err(Error::Engine(format!(
            "the KV cache holds {capacity} tokens ({kv_blocks} blocks of {}, {}) but one sequence may need max_model_len = {max_model_len}; lower max_model_len or give the cache more memory",
            options.block_size,
            human(kv_cache_bytes)
        )));
    }
    tracing::info!(
        kv_cache = %human(kv_cache_bytes),
        blocks = kv_blocks,
        sliding_blocks,
        tokens = capacity,
        max_model_len,
        max_num_seqs = options.max_num_seqs,
        "KV cache sized"
    );
    let cache = allocate(
        spec,
        kv_blocks,
        sliding_blocks,
        options.block_size,
        model.device(),
    )?;
    let profile = EngineProfile {
        weights_bytes,
        peak_activation_bytes,
        total_device_bytes: total,
        free_device_bytes: free_before_load,
        dummy_prompt_tokens,
        dummy_items,
        largest_item_tokens,
        kv_cache_bytes,
        kv_blocks,
        sliding_blocks,
        block_size: options.block_size,
        max_model_len,
    };
    Ok((cache, profile))
}

/// A KV cache of `kv_blocks` (and a sliding-window pool of `sliding_blocks`, if not 0).
pub(crate) fn allocate(
    spec: KvCacheSpec,
    kv_blocks: usize,
    sliding_blocks: usize,
    block_size: usize,
    device: tch::Device,
) -> Result<PagedKvCache> {
    match sliding_blocks {
        0 => PagedKvCache::new(spec, kv_blocks, block_size, device),
        n => PagedKvCache::with_sliding_pool(spec, kv_blocks, n, block_size, device),
    }
}

/// What the worst step of the dummy data was.
pub(crate) struct DummyStep {
    dummy_prompt_tokens: usize,
    dummy_items: ModalityCounts,
    largest_item_tokens: usize,
}

/// Runs the registered dummy data's worst step through `model` (every rank of a tensor-parallel engine
/// runs it at once: the model's collectives are inside).
pub(crate) fn dummy_forward(
    entry: &ModelEntry,
    ctx: &ModelContext,
    model: &dyn MultiModalModel,
    options: &EngineOptions,
    max_model_len: usize,
) -> Result<DummyStep> {
    let limits = &options.limit_mm_per_prompt;
    let counts = ModalityCounts(
        entry
            .modalities()
            .into_iter()
            .map(|m| (m, limits.get(m).count))
            .collect(),
    );
    // The worst step: the first `max_num_batched_tokens` tokens of the longest prompt, after every item
    // of it (as many of the costliest as the limits allow) went through its modality's path.
    let seq_len = max_model_len.saturating_sub(1).max(1);
    let mut dummy = entry.dummy_data(
        ctx,
        &DummyRequest {
            seq_len,
            counts: counts.clone(),
        },
    )?;
    limits.cap_dummy(&mut dummy.multimodal);
    let prepared = prepare(entry, ctx, dummy, usize::MAX)?;
    let dummy_prompt_tokens = prepared.processed.token_ids.len();
    let dummy_items = prepared.processed.multimodal.counts();
    let largest_item_tokens = prepared
        .processed
        .placeholders
        .iter()
        .map(|r| r.embedded())
        .max()
        .unwrap_or(0);
    {
        let _guard = tch::no_grad_guard();
        let positions = prepared.processed.positions.clone();
        let embeds = embed_prompt(entry, model, prepared)?;
        let step_tokens = dummy_prompt_tokens.min(options.max_num_batched_tokens.max(1));
        let embeds = embeds.narrow(0, 0, step_tokens as i64);
        let spec = model.kv_cache_spec();
        let mut cache = PagedKvCache::new(
            spec,
            step_tokens.div_ceil(options.block_size),
            options.block_size,
            model.device(),
        )?;
        let blocks: Vec<u32> = (0..cache.num_blocks() as u32).collect();
        let mut batch = attention_batch(
            &[(&blocks, 0, step_tokens)],
            options.block_size,
            true,
            model.device(),
        )?;
        let seq = SeqPositions {
            context: 0,
            new: step_tokens,
            prompt: positions.as_ref(),
        };
        set_positions(
            &mut batch,
            model.position_sections(),
            &[seq],
            model.device(),
        )?;
        model
            .forward(&embeds, &mut Step::new(&batch, &mut cache))?
            .f_sum(Kind::Float)?
            .double_value(&[]);
    }
    Ok(DummyStep {
        dummy_prompt_tokens,
        dummy_items,
        largest_item_tokens,
    })
}

/// How the KV cache's bytes split between the global layers' blocks and the sliding-window layers'
/// own pool. The sliding pool holds what every sequence slot's window can see, plus one step's new
/// tokens and a null block (`SlidingPool`); the global layers take the rest.
#[derive(Debug, Clone, Copy)]
struct CacheSizes {
    /// Bytes of one block of one layer.
    layer_block: u64,
    global_layers: u64,
    sliding_layers: u64,
    /// Blocks the sliding pool needs at most (0 without sliding-window layers).
    sliding_need: usize,
    /// Global blocks every sequence slot filled to max_model_len would use, and one sequence.
    useful_blocks: usize,
    one_sequence: usize,
}

impl CacheSizes {
    fn new(spec: &KvCacheSpec, options: &EngineOptions, max_model_len: usize) -> Self {
        let block = options.block_size.max(1);
        let seqs = options.max_num_seqs.max(1);
        let sliding_need = spec.sliding.as_ref().map_or(0, |s| {
            // Between steps a sequence holds the blocks of `window − 1` past tokens and its next one;
            // a step adds its new tokens (at most one step's budget in all, each sequence's rounded
            // up to a block), and the pool keeps a null block.
            seqs * ((s.window.max(1) - 1).div_ceil(block) + 3)
                + options.max_num_batched_tokens.div_ceil(block)
                + 1
        });
        Self {
            layer_block: (spec.bytes_per_layer_token() * block) as u64,
            global_layers: (spec.layers - spec.sliding_layers()) as u64,
            sliding_layers: spec.sliding_layers() as u64,
            sliding_need,
            useful_blocks: seqs * max_model_len / block,
            one_sequence: max_model_len.div_ceil(block),
        }
    }

    fn bytes_of(&self, global: usize, sliding: usize) -> u64 {
        (self.global_layers * global as u64 + self.sliding_layers * sliding as u64)
            * self.layer_block
    }

    /// Bytes of `global` blocks of the global layers and the sliding pool they go with.
    fn bytes(&self, global: usize) -> u64 {
        self.bytes_of(global, self.sliding_need.min(global + 1))
    }

    /// The most global blocks `bytes` holds, with the sliding pool beside them: `(global, sliding)`.
    fn split(&self, bytes: u64) -> (usize, usize) {
        let layers = self.global_layers + self.sliding_layers;
        let shared = (bytes / (layers * self.layer_block).max(1)) as usize;
        if self.sliding_layers == 0 {
            return (shared, 0);
        }
        // No larger than what a pool shared by every layer would give the sliding layers (and one
        // null block more): a window as long as the sequences frees nothing.
        let sliding = self.sliding_need.min(shared + 1);
        let global = match self.global_layers {
            // Only bookkeeping: the global blocks of a model whose every layer slides take no memory.
            0 => self.useful_blocks.max(self.one_sequence).max(shared),
            g => {
                let left = bytes.saturating_sub(self.bytes_of(0, sliding));
                (left / (g * self.layer_block)) as usize
            }
        };
        (global, sliding)
    }
}

/// The CPU cache without a size given: what the sequence slots can use (`useful`), at most half the
/// memory still available, but at least one sequence of `max_model_len` (`one_sequence`), so that a
/// machine too small fails at startup with the numbers rather than later.
fn cpu_cache_bytes(useful: u64, one_sequence: u64, available: Option<u64>) -> u64 {
    let cap = available.map_or(useful, |a| a / 2);
    useful.min(cap).max(one_sequence)
}

/// `MemAvailable` from /proc/meminfo (Linux), in bytes.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_cache_bytes;

    #[test]
    fn the_cpu_cache_fills_the_slots_within_half_the_available_memory_and_holds_one_sequence() {
        assert_eq!(cpu_cache_bytes(100, 10, Some(1000)), 100);
        assert_eq!(cpu_cache_bytes(100, 10, Some(120)), 60);
        assert_eq!(cpu_cache_bytes(100, 10, Some(4)), 10);
        assert_eq!(cpu_cache_bytes(100, 10, None), 100);
    }
}
