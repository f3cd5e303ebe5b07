//! One request through the registry, end to end: input processor → input mapper → the model's
//! multimodal path → merge at the placeholders → prefill → decode.

use tch::{Device, Tensor};

pub use mmreg_core::prepare::{prepare, PreparedInputs};
use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    Error, Modality, MultiModalModel, PagedKvCache, ProcessedInputs, PromptPositions, Result, Step,
    TensorMap,
};

use crate::blocks::{
    attention_batch, set_bidirectional, set_positions, BlockAllocator, SeqPositions,
};
use crate::sampling::{Sampler, SamplingParams};

/// Token embeddings `[len, hidden]` with every item's features written over its placeholders.
pub fn embed_prompt(
    entry: &ModelEntry,
    model: &dyn MultiModalModel,
    prepared: PreparedInputs,
) -> Result<Tensor> {
    let mut embeds = embed_prompts(entry, model, vec![prepared], usize::MAX)?;
    Ok(embeds.pop().expect("one prompt in, one out"))
}

/// [`embed_prompt`] for several prompts (a step's prefills) at once. Each modality's items of consecutive
/// prompts go through the model's multimodal path together, at most `max_items` at a time (what startup
/// profiling measured), where the model's input type can join them (`ModalityInputs::concat`);
/// otherwise prompt by prompt. The results are the same either way.
pub fn embed_prompts(
    entry: &ModelEntry,
    model: &dyn MultiModalModel,
    prompts: Vec<PreparedInputs>,
    max_items: usize,
) -> Result<Vec<Tensor>> {
    let device = model.device();
    let mut embeds = prompts
        .iter()
        .map(|p| model.embed_tokens(&p.processed.input_ids().to_device(device)))
        .collect::<Result<Vec<_>>>()?;
    let mut mapped: Vec<Vec<(Modality, TensorMap)>> = Vec::with_capacity(prompts.len());
    let mut processed = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        mapped.push(prompt.mapped);
        processed.push(prompt.processed);
    }
    for modality in entry.modalities() {
        // (prompt, its inputs, its number of items) for the prompts with items of this modality.
        let mut pending: Vec<(usize, TensorMap, usize)> = Vec::new();
        for (i, maps) in mapped.iter_mut().enumerate() {
            if let Some(at) = maps.iter().position(|(m, _)| *m == modality) {
                let (_, inputs) = maps.swap_remove(at);
                pending.push((i, inputs, processed[i].multimodal.items(modality).len()));
            }
        }
        for group in groups(&pending, max_items) {
            let members: Vec<(usize, TensorMap, usize)> = pending.drain(..group).collect();
            let counts: Vec<usize> = members.iter().map(|m| m.2).collect();
            let prompts_of_group: Vec<usize> = members.iter().map(|m| m.0).collect();
            let inputs: Vec<TensorMap> = members.into_iter().map(|m| m.1).collect();
            let joined = if inputs.len() > 1 {
                entry.concat(
                    modality,
                    inputs.iter().map(TensorMap::shallow_clone).collect(),
                )?
            } else {
                None
            };
            let per_prompt: Vec<Vec<Tensor>> = match joined {
                Some(all) => {
                    let mut features = entry.embed(model, modality, all)?.into_iter();
                    let expected: usize = counts.iter().sum();
                    if features.len() != expected {
                        return Err(feature_count_error(
                            entry,
                            modality,
                            features.len(),
                            expected,
                        ));
                    }
                    counts
                        .iter()
                        .map(|&n| features.by_ref().take(n).collect())
                        .collect()
                }
                None => inputs
                    .into_iter()
                    .map(|one| entry.embed(model, modality, one))
                    .collect::<Result<_>>()?,
            };
            for (i, features) in prompts_of_group.into_iter().zip(per_prompt) {
                write_features(entry, modality, &processed[i], &mut embeds[i], &features)?;
            }
        }
    }
    Ok(embeds)
}

/// Sizes of consecutive groups of `pending` prompts with at most `max_items` items each (a prompt with
/// more goes alone).
fn groups<T>(pending: &[(usize, T, usize)], max_items: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    let (mut len, mut items) = (0, 0);
    for &(_, _, n) in pending {
        if len > 0 && items + n > max_items {
            sizes.push(len);
            (len, items) = (0, 0);
        }
        len += 1;
        items += n;
    }
    if len > 0 {
        sizes.push(len);
    }
    sizes
}

fn feature_count_error(
    entry: &ModelEntry,
    modality: Modality,
    returned: usize,
    items: usize,
) -> Error {
    Error::Model(format!(
        "{}: the {modality} path returned {returned} feature tensor(s) for {items} item(s)",
        entry.id.path
    ))
}

/// Writes one prompt's features of `modality` over its placeholders, checking their number and rows.
fn write_features(
    entry: &ModelEntry,
    modality: Modality,
    processed: &ProcessedInputs,
    embeds: &mut Tensor,
    features: &[Tensor],
) -> Result<()> {
    let mut ranges: Vec<_> = processed
        .placeholders
        .iter()
        .filter(|r| r.modality == modality)
        .collect();
    ranges.sort_by_key(|r| r.item);
    if features.len() != ranges.len() {
        return Err(feature_count_error(
            entry,
            modality,
            features.len(),
            ranges.len(),
        ));
    }
    for (range, feature) in ranges.iter().zip(features) {
        let rows = feature.size().first().copied().unwrap_or(0) as usize;
        if rows != range.embedded() {
            return Err(Error::TokenCountMismatch {
                model: entry.id.path.into(),
                modality,
                item: range.item,
                what: "the model's embedding",
                actual: rows,
                expected: range.embedded(),
            });
        }
        let feature = feature.to_kind(embeds.kind());
        match &range.is_embed {
            None => {
                embeds
                    .narrow(0, range.offset as i64, range.length as i64)
                    .f_copy_(&feature)?;
            }
            // Only the embedded tokens take rows; the text tokens between them keep their embeddings.
            Some(mask) => {
                let rows: Vec<i64> = mask
                    .iter()
                    .enumerate()
                    .filter(|(_, &e)| e)
                    .map(|(i, _)| (range.offset + i) as i64)
                    .collect();
                let rows = Tensor::from_slice(&rows).to_device(embeds.device());
                let _ = embeds.f_index_copy_(0, &rows, &feature)?;
            }
        }
    }
    Ok(())
}

/// What a finished generation returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids (the prompt excluded).
    pub token_ids: Vec<u32>,
    /// Prompt length after placeholder expansion.
    pub prompt_len: usize,
    /// With `top_logprobs = k`: the k most likely token ids at each generated position.
    pub top_tokens: Vec<Vec<u32>>,
}

/// Block size of the private caches of [`generate`] and [`prefill_logits`].
const BLOCK_SIZE: usize = 16;

/// A cache with room for one sequence of `tokens` tokens, and its blocks.
fn private_cache(model: &dyn MultiModalModel, tokens: usize) -> Result<(PagedKvCache, Vec<u32>)> {
    let mut allocator = BlockAllocator::new(tokens.div_ceil(BLOCK_SIZE), BLOCK_SIZE);
    let cache = PagedKvCache::new(
        model.kv_cache_spec(),
        allocator.total_blocks(),
        BLOCK_SIZE,
        model.device(),
    )?;
    let mut blocks = Vec::new();
    allocator.grow(&mut blocks, tokens);
    Ok((cache, blocks))
}

/// Logits of every prompt position `[len, vocab]` (for parity checks against a reference).
pub fn prefill_logits(model: &dyn MultiModalModel, embeds: &Tensor) -> Result<Tensor> {
    prefill_logits_at(model, embeds, None)
}

/// [`prefill_logits`] of a prompt whose model computed its positions ([`ProcessedInputs::positions`]).
pub fn prefill_logits_at(
    model: &dyn MultiModalModel,
    embeds: &Tensor,
    positions: Option<&PromptPositions>,
) -> Result<Tensor> {
    prefill_logits_with(model, embeds, positions, &[])
}

/// [`prefill_logits`] of a processed prompt: its positions and its bidirectional runs
/// ([`ProcessedInputs::bidirectional`]) as the model declared them.
pub fn prefill_logits_of(
    model: &dyn MultiModalModel,
    embeds: &Tensor,
    processed: &ProcessedInputs,
) -> Result<Tensor> {
    prefill_logits_with(
        model,
        embeds,
        processed.positions.as_ref(),
        &processed.bidirectional,
    )
}

fn prefill_logits_with(
    model: &dyn MultiModalModel,
    embeds: &Tensor,
    positions: Option<&PromptPositions>,
    spans: &[std::ops::Range<usize>],
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let len = embeds.size()[0] as usize;
    let (mut cache, blocks) = private_cache(model, len)?;
    let mut batch = attention_batch(&[(&blocks, 0, len)], BLOCK_SIZE, false, model.device())?;
    set_bidirectional(&mut batch, &[spans], model.device())?;
    let seq = SeqPositions {
        context: 0,
        new: len,
        prompt: positions,
    };
    set_positions(
        &mut batch,
        model.position_sections(),
        &[seq],
        model.device(),
    )?;
    model.forward(embeds, &mut Step::new(&batch, &mut cache))
}

/// Generates for one prepared request, greedy or sampled, with its own KV cache (the engine batches
/// many requests over a shared one).
pub fn generate(
    entry: &ModelEntry,
    model: &dyn MultiModalModel,
    prepared: PreparedInputs,
    params: &SamplingParams,
) -> Result<Generation> {
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let prompt_len = prepared.processed.token_ids.len();
    let capacity = (prompt_len + params.max_tokens).min(model.max_model_len().max(prompt_len));
    let positions = prepared.processed.positions.clone();
    let spans = prepared.processed.bidirectional.clone();
    let sections = model.position_sections();
    let at = |context: usize, new: usize| SeqPositions {
        context,
        new,
        prompt: positions.as_ref(),
    };
    let embeds = embed_prompt(entry, model, prepared)?;
    let (mut cache, blocks) = private_cache(model, capacity)?;
    let mut batch = attention_batch(&[(&blocks, 0, prompt_len)], BLOCK_SIZE, true, device)?;
    set_bidirectional(&mut batch, &[&spans], device)?;
    set_positions(&mut batch, sections, &[at(0, prompt_len)], device)?;
    let mut logits = model.forward(&embeds, &mut Step::new(&batch, &mut cache))?;
    let mut sampler = Sampler::new(params);
    let mut generated: Vec<u32> = Vec::with_capacity(params.max_tokens);
    let mut top_tokens = Vec::new();
    while generated.len() < params.max_tokens {
        let last = &logits;
        if params.top_logprobs > 0 {
            top_tokens.push(top_token_ids(last, params.top_logprobs)?);
        }
        let token = sampler.sample(last)?;
        generated.push(token);
        let len = prompt_len + generated.len();
        if params.is_stop(token) || len >= capacity {
            break;
        }
        let next = model.embed_tokens(&Tensor::from_slice(&[token as i64]).to_device(device))?;
        let mut batch = attention_batch(&[(&blocks, len - 1, 1)], BLOCK_SIZE, true, device)?;
        set_positions(&mut batch, sections, &[at(len - 1, 1)], device)?;
        logits = model.forward(&next, &mut Step::new(&batch, &mut cache))?;
    }
    Ok(Generation {
        token_ids: generated,
        prompt_len,
        top_tokens,
    })
}

/// The `k` most likely token ids of a `[1, vocab]` or `[vocab]` logits row.
pub fn top_token_ids(logits: &Tensor, k: usize) -> Result<Vec<u32>> {
    let (_, top) = logits.flatten(0, -1).f_topk(k as i64, 0, true, true)?;
    Ok(Vec::<i64>::try_from(top.to_device(Device::Cpu))?
        .into_iter()
        .map(|t| t as u32)
        .collect())
}
