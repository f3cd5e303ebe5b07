//! Startup: run the registered dummy data for the worst step, measure the activation peak, size the KV cache.

use tch::Kind;

use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    DummyRequest, Error, ModalityCounts, ModelContext, MultiModalModel, PagedKvCache, Result, Step,
};

use crate::blocks::{attention_batch, set_positions, SeqPositions};
use crate::cuda;
use crate::engine::{EngineOptions, EngineProfile};
use crate::generate::{embed_prompt, prepare};

/// Runs the registered dummy data for the worst case, measures the activation peak, and sizes the cache:
/// `fraction × total − weights − peak activations` on CUDA, `cpu_kv_cache_bytes` on the CPU.
pub(crate) fn profile_and_allocate(
    entry: &ModelEntry,
    ctx: &ModelContext,
    model: &dyn MultiModalModel,
    options: &EngineOptions,
    max_model_len: usize,
    device_index: Option<usize>,
) -> Result<(PagedKvCache, EngineProfile)> {
    let weights_bytes = device_index
        .and_then(cuda::memory_stats)
        .map(|s| s.allocated);
    let counts = ModalityCounts::each(&entry.modalities(), options.max_images_per_prompt);
    // The worst single step: the longest prompt it may hold, with the costliest items.
    let seq_len = options.max_num_batched_tokens.min(max_model_len);
    let dummy = entry.dummy_data(
        ctx,
        &DummyRequest {
            seq_len,
            counts: counts.clone(),
        },
    )?;
    let prepared = prepare(entry, ctx, dummy, usize::MAX)?;
    let dummy_prompt_tokens = prepared.processed.token_ids.len();
    let dummy_items = prepared.processed.multimodal.counts();
    {
        let _guard = tch::no_grad_guard();
        let positions = prepared.processed.positions.clone();
        let embeds = embed_prompt(entry, model, prepared)?;
        let spec = model.kv_cache_spec();
        let mut cache = PagedKvCache::new(
            spec,
            dummy_prompt_tokens.div_ceil(options.block_size),
            options.block_size,
            model.device(),
        )?;
        let blocks: Vec<u32> = (0..cache.num_blocks() as u32).collect();
        let mut batch = attention_batch(
            &[(&blocks, 0, dummy_prompt_tokens)],
            options.block_size,
            true,
            model.device(),
        )?;
        let seq = SeqPositions {
            context: 0,
            new: dummy_prompt_tokens,
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
    let kv_cache_bytes = match (total, weights_bytes, peak_activation_bytes) {
        (Some(total), Some(weights), Some(activations)) => {
            let budget = (total as f64 * options.gpu_memory_utilization) as u64;
            budget.checked_sub(weights + activations).ok_or_else(|| {
                Error::Engine(format!(
                    "no memory is left for the KV cache: {} usable ({} of {}) < weights {} + activations {}; raise gpu_memory_utilization or lower max_num_batched_tokens",
                    human(budget), options.gpu_memory_utilization, human(total), human(weights), human(activations)
                ))
            })?
        }
        _ => options.cpu_kv_cache_bytes as u64,
    };
    let spec = model.kv_cache_spec();
    let kv_blocks =
        (kv_cache_bytes / (spec.bytes_per_token() * options.block_size) as u64) as usize;
    let capacity = kv_blocks * options.block_size;
    if capacity < max_model_len {
        return Err(Error::Engine(format!(
            "the KV cache holds {capacity} tokens ({kv_blocks} blocks of {}, {}) but one sequence may need max_model_len = {max_model_len}; lower max_model_len or give the cache more memory",
            options.block_size,
            human(kv_cache_bytes)
        )));
    }
    let cache = PagedKvCache::new(spec, kv_blocks, options.block_size, model.device())?;
    let profile = EngineProfile {
        weights_bytes,
        peak_activation_bytes,
        total_device_bytes: total,
        dummy_prompt_tokens,
        dummy_items,
        kv_cache_bytes,
        kv_blocks,
        block_size: options.block_size,
        max_model_len,
    };
    Ok((cache, profile))
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{b} bytes"),
    }
}
