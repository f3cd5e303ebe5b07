//! A request's inputs made ready for the model: the input processor, then the input mapper of each
//! modality present. What `mmreg preprocess` writes and what the engine's prefill consumes.

use crate::registry::ModelEntry;
use crate::{Error, Modality, ModelContext, ProcessedInputs, ProcessorInputs, Result, TensorMap};

/// A processed request and its mapped forward inputs, ready for the model: what `mmreg preprocess`
/// writes and what prefill consumes.
#[derive(Debug)]
pub struct PreparedInputs {
    pub processed: ProcessedInputs,
    /// Per modality, the mapper's tensors (on the CPU).
    pub mapped: Vec<(Modality, TensorMap)>,
}

impl PreparedInputs {
    /// A copy sharing the tensors' storage (for recomputing a preempted sequence).
    pub fn shallow_clone(&self) -> Self {
        let mapped = self
            .mapped
            .iter()
            .map(|(m, t)| (*m, t.shallow_clone()))
            .collect();
        Self {
            processed: self.processed.clone(),
            mapped,
        }
    }
}

/// Runs the input processor and the input mappers.
pub fn prepare(
    entry: &ModelEntry,
    ctx: &ModelContext,
    inputs: ProcessorInputs,
    max_len: usize,
) -> Result<PreparedInputs> {
    let processed = process(entry, ctx, inputs, max_len)?;
    let mut mapped = Vec::new();
    for modality in entry.modalities() {
        if !processed.multimodal.items(modality).is_empty() {
            mapped.push((modality, entry.map(ctx, modality, &processed.multimodal)?));
        }
    }
    Ok(PreparedInputs { processed, mapped })
}

/// Runs the input processor and checks the prompt it made: not empty, at most `max_len` tokens.
pub fn process(
    entry: &ModelEntry,
    ctx: &ModelContext,
    inputs: ProcessorInputs,
    max_len: usize,
) -> Result<ProcessedInputs> {
    let processed = entry.process(ctx, inputs)?;
    if processed.token_ids.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if processed.token_ids.len() > max_len {
        return Err(Error::PromptTooLong {
            len: processed.token_ids.len(),
            max: max_len,
        });
    }
    Ok(processed)
}
