//! `mmreg check`: runs a model's registered dummy data through its input processor and input mappers
//! and verifies that every count agrees, before any request runs.

use crate::inputs::{DummyRequest, ModalityCounts};
use crate::model::MultiModalModel;
use crate::registry::{Hook, ModelEntry};
use crate::{Error, Modality, ModelContext, Result};

/// What the check saw, per modality.
#[derive(Debug, Clone, PartialEq)]
pub struct ModalityReport {
    pub modality: Modality,
    pub max_tokens: usize,
    /// Placeholder tokens of each dummy item.
    pub dummy_item_tokens: Vec<usize>,
    /// Parameter names and shapes the mapper produced.
    pub mapped: Vec<(String, Vec<i64>)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckReport {
    pub seq_len: usize,
    pub prompt_tokens: usize,
    pub modalities: Vec<ModalityReport>,
}

/// Checks the registrations of one model against each other with one item per modality; with a loaded
/// model, also that its multimodal path returns as many rows as there are placeholders.
pub fn check_model(
    entry: &ModelEntry,
    ctx: &ModelContext,
    seq_len: usize,
    model: Option<&dyn MultiModalModel>,
) -> Result<CheckReport> {
    let modalities = entry.modalities();
    let counts = ModalityCounts::each(&modalities, 1);
    let dummy = entry.dummy_data(
        ctx,
        &DummyRequest {
            seq_len,
            counts: counts.clone(),
        },
    )?;
    let given = dummy.multimodal.counts();
    if given != counts {
        return Err(fail(
            entry,
            format!(
                "dummy data has items {:?} but {:?} were asked for",
                given.0, counts.0
            ),
        ));
    }
    // `process` verifies each placeholder range against the model's token-count function.
    let processed = entry.process(ctx, dummy)?;
    if processed.token_ids.len() > seq_len {
        return Err(fail(
            entry,
            format!(
                "dummy data is {} tokens after processing, over the {seq_len} asked for",
                processed.token_ids.len()
            ),
        ));
    }
    let mut reports = Vec::new();
    for &modality in &modalities {
        let max_tokens = entry.max_tokens(ctx, modality)?;
        let item_tokens = entry.item_tokens(ctx, modality, &processed.multimodal)?;
        if let Some(&over) = item_tokens.iter().find(|&&n| n > max_tokens) {
            return Err(fail(entry, format!("a dummy {modality} item takes {over} tokens, over the registered max {max_tokens}")));
        }
        let mapped = entry.map(ctx, modality, &processed.multimodal)?;
        let params = match entry
            .modalities
            .get(&modality)
            .and_then(|e| e.mapper)
            .map(|r| &r.hook)
        {
            Some(Hook::InputMapper { params, .. }) => *params,
            _ => &[],
        };
        for param in params {
            if !mapped.names().any(|n| n == *param) {
                return Err(fail(
                    entry,
                    format!(
                        "{modality}: the input mapper did not produce forward parameter `{param}`"
                    ),
                ));
            }
        }
        if let Some(extra) = mapped.names().find(|n| !params.contains(n)) {
            return Err(fail(
                entry,
                format!(
                    "{modality}: the input mapper produced `{extra}`, which forward does not take"
                ),
            ));
        }
        let shapes = mapped
            .iter()
            .map(|(name, t)| (name.to_owned(), t.size()))
            .collect();
        if let Some(model) = model {
            let rows: Vec<usize> = entry
                .embed(model, modality, mapped)?
                .iter()
                .map(|t| t.size().first().copied().unwrap_or(0) as usize)
                .collect();
            // One row per embedded placeholder token (all of them, unless a mask interleaves text).
            let mut ranges: Vec<_> = processed
                .placeholders
                .iter()
                .filter(|r| r.modality == modality)
                .collect();
            ranges.sort_by_key(|r| r.item);
            let embedded: Vec<usize> = ranges.iter().map(|r| r.embedded()).collect();
            if rows != embedded {
                return Err(fail(entry, format!("{modality}: the model's embedding has {rows:?} rows for {embedded:?} placeholders")));
            }
        }
        reports.push(ModalityReport {
            modality,
            max_tokens,
            dummy_item_tokens: item_tokens,
            mapped: shapes,
        });
    }
    Ok(CheckReport {
        seq_len,
        prompt_tokens: processed.token_ids.len(),
        modalities: reports,
    })
}

fn fail(entry: &ModelEntry, message: String) -> Error {
    Error::Registry(format!("{}: {message}", entry.id.path))
}
