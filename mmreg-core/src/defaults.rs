//! What a model gets without `#[register_max_tokens]`, `#[register_dummy_data]` or
//! `#[register_input_processor]`: each derived from its modality trait (the placeholder token, the
//! costliest item, the per-item token count), so the common case registers only the model and its
//! input mappers.

use crate::inputs::{
    DummyRequest, MultiModalData, PlaceholderRange, ProcessedInputs, ProcessorInputs, Prompt,
};
use crate::model::{ModalityKind, SupportsModality};
use crate::registry::ModelEntry;
use crate::{Error, Modality, ModelContext, Result};

/// A modality's defaults, instantiated for the model by `#[register_input_mapper]`.
#[derive(Debug, Clone, Copy)]
pub struct ModalityDefaults {
    pub placeholder_token: fn(&ModelContext) -> Result<u32>,
    /// Placeholder tokens of the costliest item.
    pub max_tokens: fn(&ModelContext) -> Result<usize>,
    /// `n` copies of the costliest item.
    pub dummy_items: fn(&ModelContext, usize) -> Result<MultiModalData>,
}

impl ModalityDefaults {
    pub const fn of<M: SupportsModality<K>, K: ModalityKind>() -> Self {
        Self {
            placeholder_token: M::placeholder_token,
            max_tokens: costliest_tokens::<M, K>,
            dummy_items: costliest_items::<M, K>,
        }
    }
}

fn costliest_tokens<M: SupportsModality<K>, K: ModalityKind>(ctx: &ModelContext) -> Result<usize> {
    M::num_tokens(ctx, &M::costliest_item(ctx)?)
}

fn costliest_items<M: SupportsModality<K>, K: ModalityKind>(
    ctx: &ModelContext,
    n: usize,
) -> Result<MultiModalData> {
    Ok(K::into_data(vec![M::costliest_item(ctx)?; n]))
}

/// Token ids of a prompt: text is tokenized with the tokenizer's special tokens (BOS), as HF's
/// processors do; ids pass through.
pub fn prompt_ids(ctx: &ModelContext, prompt: Prompt) -> Result<Vec<u32>> {
    match prompt {
        Prompt::TokenIds(ids) => Ok(ids),
        Prompt::Text(text) => Ok(ctx
            .tokenizer()?
            .encode(text, true)
            .map_err(|e| Error::bad_input("prompt", e))?
            .get_ids()
            .to_vec()),
    }
}

/// How many tokens a placeholder range spans when a processor writes an item as `text` with its
/// embedded positions at `token` and plain text between them (Gemma 3's crops, Idefics3's tiles): from
/// the first `token` of `text`'s tokens to the last. What such a model's token count returns.
pub fn placeholder_span(ctx: &ModelContext, text: &str, token: u32) -> Result<usize> {
    let encoded = ctx
        .tokenizer()?
        .encode(text, false)
        .map_err(|e| Error::bad_input("prompt", e))?;
    let ids = encoded.get_ids();
    match (
        ids.iter().position(|&t| t == token),
        ids.iter().rposition(|&t| t == token),
    ) {
        (Some(first), Some(last)) => Ok(last - first + 1),
        _ => Err(Error::Model(format!(
            "the placeholder text holds no token {token}"
        ))),
    }
}

/// The maximal runs of `token` in `ids`.
pub fn token_runs(ids: &[u32], token: u32) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        if id != token {
            continue;
        }
        match runs.last_mut() {
            Some(run) if run.end == i => run.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// The placeholder ranges of images that a processor writes as several runs of `token` with text
/// between them (Gemma 3's crops, Idefics3's tiles): image `i` takes the next `runs_per_item[i]` runs,
/// each `run_len` tokens; its range spans its first run to its last and embeds rows at `token` only.
/// Also returns the runs. A prompt whose runs do not split that way is bad input, naming `marker`, the
/// one token a prompt writes per image.
pub fn interleaved_placeholders(
    ids: &[u32],
    token: u32,
    run_len: usize,
    runs_per_item: &[usize],
    marker: &str,
) -> Result<(Vec<PlaceholderRange>, Vec<std::ops::Range<usize>>)> {
    let runs = token_runs(ids, token);
    let wanted: usize = runs_per_item.iter().sum();
    if runs.len() != wanted || runs.iter().any(|r| r.len() != run_len) {
        let lengths: Vec<usize> = runs.iter().map(|r| r.len()).collect();
        return Err(Error::bad_input(
            "prompt",
            format!(
                "the prompt has runs of {lengths:?} image tokens where its images take {wanted} runs of {run_len}: write each image as {marker} only"
            ),
        ));
    }
    let mut placeholders = Vec::with_capacity(runs_per_item.len());
    let mut next = runs.iter();
    for (item, &count) in runs_per_item.iter().enumerate() {
        let mine: Vec<&std::ops::Range<usize>> = next.by_ref().take(count).collect();
        let (Some(first), Some(last)) = (mine.first(), mine.last()) else {
            continue;
        };
        let (start, end) = (first.start, last.end);
        placeholders.push(PlaceholderRange {
            modality: crate::Modality::Image,
            item,
            offset: start,
            length: end - start,
            is_embed: (count > 1).then(|| (start..end).map(|i| ids[i] == token).collect()),
        });
    }
    Ok((placeholders, runs))
}

/// The default input processor: every placeholder token of a modality is replaced by the run of
/// placeholders of the next item of that modality (`count` of them), in prompt order.
pub fn expand_placeholders(
    ctx: &ModelContext,
    ids: &[u32],
    markers: &[(Modality, u32)],
    data: &MultiModalData,
    count: impl Fn(Modality, usize) -> Result<usize>,
) -> Result<(Vec<u32>, Vec<PlaceholderRange>)> {
    for &(modality, token) in markers {
        let found = ids.iter().filter(|&&t| t == token).count();
        if found != data.len(modality) {
            let marker = ctx
                .tokenizer()
                .ok()
                .and_then(|t| t.id_to_token(token))
                .unwrap_or_else(|| format!("token {token}"));
            return Err(Error::PlaceholderMismatch {
                modality,
                marker,
                placeholders: found,
                items: data.len(modality),
            });
        }
    }
    let mut token_ids = Vec::with_capacity(ids.len());
    let mut placeholders = Vec::new();
    let mut next_item = vec![0usize; markers.len()];
    for &id in ids {
        let Some(m) = markers.iter().position(|&(_, token)| token == id) else {
            token_ids.push(id);
            continue;
        };
        let (modality, item) = (markers[m].0, next_item[m]);
        next_item[m] += 1;
        let length = count(modality, item)?;
        placeholders.push(PlaceholderRange {
            modality,
            item,
            offset: token_ids.len(),
            length,
            is_embed: None,
        });
        token_ids.extend(std::iter::repeat_n(id, length));
    }
    Ok((token_ids, placeholders))
}

impl ModelEntry {
    fn defaults(&self, modality: Modality) -> Result<ModalityDefaults> {
        match self.mapper(modality)? {
            crate::registry::Hook::InputMapper { defaults, .. } => Ok(*defaults),
            _ => unreachable!("mapper slots hold input mappers"),
        }
    }

    fn markers(&self, ctx: &ModelContext) -> Result<Vec<(Modality, u32)>> {
        self.modalities()
            .into_iter()
            .map(|m| Ok((m, (self.defaults(m)?.placeholder_token)(ctx)?)))
            .collect()
    }

    pub(crate) fn default_max_tokens(
        &self,
        ctx: &ModelContext,
        modality: Modality,
    ) -> Result<usize> {
        (self.defaults(modality)?.max_tokens)(ctx)
    }

    /// Each requested item the costliest, its placeholder token in the prompt, then filler text up to
    /// `seq_len` tokens after expansion. Items that would not fit in `seq_len` are left out (a step never
    /// holds more), the first modalities first served.
    pub(crate) fn default_dummy_data(
        &self,
        ctx: &ModelContext,
        request: &DummyRequest,
    ) -> Result<ProcessorInputs> {
        let markers = self.markers(ctx)?;
        let (mut ids, mut data, mut expanded) = (Vec::new(), MultiModalData::default(), 0);
        for &(modality, token) in &markers {
            let per_item = self.max_tokens(ctx, modality)?;
            let fit = request.seq_len.saturating_sub(expanded) / per_item.max(1);
            let n = request.counts.get(modality).min(fit);
            if n == 0 {
                continue;
            }
            ids.extend(std::iter::repeat_n(token, n));
            data.append((self.defaults(modality)?.dummy_items)(ctx, n)?);
            expanded += n * per_item;
        }
        // Filler must not read as another placeholder (id 0 is the image token of HF's tiny configs).
        let filler = (0..)
            .find(|id| markers.iter().all(|&(_, token)| token != *id))
            .unwrap_or(0);
        let fill = request.seq_len.saturating_sub(expanded);
        ids.extend(std::iter::repeat_n(filler, fill));
        let mut inputs = ProcessorInputs {
            prompt: Prompt::TokenIds(ids),
            multimodal: data,
        };
        // A processor may frame each item with text of its own (Gemma 3's `<start_of_image>` … `\n\n`,
        // Idefics3's tile tags): as much filler comes off as the framing adds.
        let processed = self.process(ctx, inputs.clone())?.token_ids.len();
        if let (Some(over), Prompt::TokenIds(ids)) = (
            processed.checked_sub(request.seq_len).filter(|&o| o > 0),
            &mut inputs.prompt,
        ) {
            ids.truncate(ids.len() - over.min(fill));
        }
        Ok(inputs)
    }

    pub(crate) fn default_process(
        &self,
        ctx: &ModelContext,
        inputs: ProcessorInputs,
    ) -> Result<ProcessedInputs> {
        let ids = prompt_ids(ctx, inputs.prompt)?;
        let data = &inputs.multimodal;
        let markers = self.markers(ctx)?;
        let counts = markers
            .iter()
            .map(|&(modality, _)| Ok((modality, self.item_tokens(ctx, modality, data)?)))
            .collect::<Result<Vec<_>>>()?;
        let (token_ids, placeholders) =
            expand_placeholders(ctx, &ids, &markers, data, |modality, item| {
                let (_, counts) = counts
                    .iter()
                    .find(|(m, _)| *m == modality)
                    .expect("a marker");
                counts.get(item).copied().ok_or_else(|| {
                    Error::Model(format!("no token count for {modality} item {item}"))
                })
            })?;
        Ok(ProcessedInputs {
            token_ids,
            placeholders,
            multimodal: inputs.multimodal,
            positions: None,
            bidirectional: Vec::new(),
        })
    }
}
