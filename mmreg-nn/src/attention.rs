//! Attention over the paged KV cache, the one layer that knows how a step's keys and values are stored
//! and read: it writes them to the cache (fused with rotary embeddings where the kernel runs), reads each
//! sequence's context through its slots, and picks between the paged decode kernel and libtorch's
//! attention. Model files call [`Attention::forward`], [`Attention::forward_rotary`] or
//! [`Attention::forward_rotary_of`] with the step they were given and nothing else.

use mmreg_core::step::{AttentionBatch, DecodeGather, LayerSlots, SequenceSlice};
use mmreg_core::{PagedKvCache, Result, Step};
use mmreg_engine::kernels;
use tch::{Kind, Tensor};

use crate::rotary::RotaryAt;
use crate::Linear;

/// libtorch's cuDNN attention (its pick on Hopper) builds an execution plan the first time it meets a
/// shape, 40–50 ms on an H200 (run 92), and keeps it by shape. A fresh prompt, or a chunk after its
/// context, attends over its length rounded up to a multiple of this, so that a server meets at most
/// 64 lengths up to 8192 tokens, not every prompt's own. The rows past a sequence's end are the next
/// sequences' or zeros that the rotated projection keeps after the step's (`RopeStore::slack_rows`),
/// and causal attention keeps the sequence's queries from their keys; the padded rows' own outputs are
/// dropped. 128 is cuDNN's tile of queries and keys, so the padding adds no tile. A run of equal
/// prompts attended as one batch keeps its length (padding it would leave its output strided, to be
/// copied): its shapes are a benchmark's few.
const ATTENTION_LEN_STEP: i64 = 128;

/// `len` rounded up to a multiple of [`ATTENTION_LEN_STEP`].
fn padded_len(len: i64) -> i64 {
    (len + ATTENTION_LEN_STEP - 1) / ATTENTION_LEN_STEP * ATTENTION_LEN_STEP
}

/// Causal self-attention of one decoder layer over the paged KV cache, with grouped-query heads when
/// `kv_heads < heads`.
#[derive(Debug, Clone, Copy)]
pub struct Attention {
    /// The decoder layer, which picks its pools in the cache.
    layer: usize,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    scale: f64,
    /// Keys older than this many positions are out of sight (a sliding-window layer).
    window: Option<i64>,
}

impl Attention {
    /// Layer `layer` of the decoder, scaled by `head_dim^-0.5`.
    pub fn new(layer: usize, heads: i64, kv_heads: i64, head_dim: i64) -> Self {
        Self {
            layer,
            heads,
            kv_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
            window: None,
        }
    }

    /// A sliding-window layer (Mistral's, Gemma 2 and 3's local layers): a query at position `i` sees the
    /// keys at positions `j ≤ i` with `i − j < window`, as HF's sliding-window mask; inside a
    /// bidirectional run of the prompt it also sees the run's later keys (HF's Gemma 3 masks: the window
    /// applied over causal-or-run).
    pub fn with_sliding_window(self, window: usize) -> Self {
        Self {
            window: Some(window.max(1) as i64),
            ..self
        }
    }

    /// Another softmax scale (Gemma's `query_pre_attn_scalar`, say).
    pub fn with_scale(self, scale: f64) -> Self {
        Self { scale, ..self }
    }

    /// Attends the step's queries `[tokens, heads, head_dim]` to the cached and new keys and values
    /// (`[tokens, kv_heads, head_dim]`) of their own sequence, causally, after storing the new ones in
    /// the cache. Returns `[tokens, heads, head_dim]`.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, step: &mut Step) -> Result<Tensor> {
        let batch = step.batch();
        let cache = step.cache();
        let slots = batch.layer_slots(cache.in_sliding_pool(self.layer))?;
        cache.write(self.layer, k, v, slots.new_slots())?;
        attend_stored(
            q,
            k,
            v,
            self.layer,
            batch,
            slots,
            cache,
            self.scale,
            self.window,
        )
    }

    /// [`Self::forward`] for a stacked projection `[tokens, heads + 2 kv_heads, head_dim]` (queries, keys,
    /// values) whose queries and keys take rotary embeddings first (half-split, as HF's Llama). Where the
    /// fused kernel runs, the rotation and the cache write are one pass.
    pub fn forward_rotary(
        &self,
        qkv: &Tensor,
        rotary: &RotaryAt,
        step: &mut Step,
    ) -> Result<Tensor> {
        match self.rope_store(rotary, step, |store| kernels::rope_and_store(qkv, store))? {
            Some(roped) => self.attend_roped(&roped, true, step),
            None => {
                let roped =
                    kernels::rope(qkv, &rotary.cos, &rotary.sin, self.heads + self.kv_heads);
                self.attend_roped(&roped, false, step)
            }
        }
    }

    /// [`Self::forward_rotary`] of `qkv_proj` (the stacked q/k/v projection) of `x` `[tokens, hidden]`.
    /// Where the fused kernels run, a step of one token projects, rotates and stores in one kernel (and
    /// one of a few tokens, where the few-rows product is on: not `MMREG_FUSED_LINEAR=one`).
    pub fn forward_rotary_of(
        &self,
        qkv_proj: &Linear,
        x: &Tensor,
        rotary: &RotaryAt,
        step: &mut Step,
    ) -> Result<Tensor> {
        let (weight, bias) = (qkv_proj.weight(), qkv_proj.bias());
        match self.rope_store(rotary, step, |store| {
            kernels::linear_rope_and_store(x, weight, bias, store)
        })? {
            Some(roped) => self.attend_roped(&roped, true, step),
            None => {
                let shape = [x.size()[0], self.heads + 2 * self.kv_heads, self.head_dim];
                self.forward_rotary(&qkv_proj.forward(x).view(shape), rotary, step)
            }
        }
    }

    /// `f` of where this layer's new keys and values go in the step's cache, and their rotation.
    fn rope_store<R>(
        &self,
        rotary: &RotaryAt,
        step: &mut Step,
        f: impl FnOnce(kernels::RopeStore) -> R,
    ) -> Result<R> {
        let batch = step.batch();
        let cache = step.cache();
        let slots = batch.layer_slots(cache.in_sliding_pool(self.layer))?;
        // Room to read the last prompt's keys over its padded length (none in a step of decodes).
        let prompts = batch.sequences.iter().any(|s| s.len > 1);
        let (keys, values) = cache.layer_mut(self.layer);
        Ok(f(kernels::RopeStore {
            cos: &rotary.cos,
            sin: &rotary.sin,
            kv_heads: self.kv_heads,
            key_cache: keys,
            value_cache: values,
            slots: slots.new_slots(),
            slack_rows: if prompts { ATTENTION_LEN_STEP - 1 } else { 0 },
        }))
    }

    /// Attention over the rotated projection `[tokens, heads + 2 kv_heads, head_dim]`, after storing its
    /// keys and values (unless `in_cache`: already stored, and the rows of zeros that may follow them
    /// are the kernel's slack).
    fn attend_roped(&self, qkv: &Tensor, in_cache: bool, step: &mut Step) -> Result<Tensor> {
        let (h, kv) = (self.heads, self.kv_heads);
        let (q, k, v) = (
            qkv.narrow(1, 0, h),
            qkv.narrow(1, h, kv),
            qkv.narrow(1, h + kv, kv),
        );
        let batch = step.batch();
        let cache = step.cache();
        let slots = batch.layer_slots(cache.in_sliding_pool(self.layer))?;
        if !in_cache {
            cache.write(self.layer, &k, &v, slots.new_slots())?;
        }
        attend_stored(
            &q,
            &k,
            &v,
            self.layer,
            batch,
            slots,
            cache,
            self.scale,
            self.window,
        )
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
    }
}

/// Attention of `q` `[b, heads, s_q, d]` over `k` and `v` `[b, kv_heads, s_kv, d]` without a mask
/// (causal aligned to the top left where `causal`): `[b, heads, s_q, d]`, laid out `[b, s_q, heads, d]`
/// in memory on CUDA. cuDNN's kernel called directly where it runs and is switched on
/// ([`mmreg_engine::cudnn`]: no memset before it), else libtorch's attention, the reference.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<Tensor> {
    if let Some(out) = mmreg_engine::cudnn::attention(q, k, v, causal, scale) {
        return Ok(out);
    }
    let gqa = q.size()[1] != k.size()[1];
    Ok(Tensor::f_scaled_dot_product_attention(
        q,
        k,
        v,
        None::<Tensor>,
        0.0,
        causal,
        scale,
        gqa,
    )?)
}

/// Causal attention of a chunk's `len` queries (`[len, heads, d]`) that follow `context` cached
/// positions, over their keys and values (`[1, kv_heads, keys, d]`, the sequence's `context + len`
/// first, then any finite rows, which the chunk's queries never see): `[len, heads, d]`. It is the
/// attention of the whole sequence with the cached positions' queries (and those of the rows after)
/// left zero, whose rows for the chunk are the chunk's. It is square, so libtorch's causal kernels take
/// it without a mask (their causal mask is aligned to the top left, the chunk's to the bottom right);
/// with `context <= len` it costs no more than the chunk's rows under a mask, which those kernels would
/// not skip. The padded queries are laid out token by token, as the step's are, so that where the
/// kernel lays its output out as its queries (cuDNN's does) the chunk's rows are one contiguous run.
fn chunk_after_context(
    query: &Tensor,
    k: &Tensor,
    v: &Tensor,
    context: i64,
    scale: f64,
) -> Result<Tensor> {
    let [len, heads, d] = query.size()[..] else {
        unreachable!("queries are [len, heads, d]")
    };
    let keys = k.size()[2];
    let padded = Tensor::f_zeros([keys, heads, d], (query.kind(), query.device()))?;
    padded.f_narrow(0, context, len)?.f_copy_(query)?;
    // [keys, heads, d] → [1, heads, keys, d] (a view)
    let q = padded.f_transpose(0, 1)?.f_unsqueeze(0)?;
    let out = attend(&q, k, v, true, scale)?;
    Ok(out
        .f_squeeze_dim(0)?
        .f_transpose(0, 1)?
        .f_narrow(0, context, len)?)
}

/// `slots` (`[n]`) followed by its first slot until there are `len` (a gather over a padded length
/// reads finite keys past the sequence's end).
fn pad_slots(slots: &Tensor, len: i64) -> Result<Tensor> {
    let n = slots.size()[0];
    if n == 0 || n >= len {
        return Ok(slots.shallow_clone());
    }
    let first = slots.f_narrow(0, 0, 1)?.f_expand([len - n], false)?;
    Ok(Tensor::f_cat(&[slots, &first], 0)?)
}

/// Attention of a sequence's `len` new tokens (`query`: `[len, heads, d]`) over its keys and values
/// (`[1, kv_heads, keys, d]`) under `mask` (`[len, keys]`, true where a token sees a key): `[1, heads,
/// len, d]`. Grouped-query heads go in as their key head's queries (`[1, kv_heads, group × len, d]`, the
/// mask repeated per group): libtorch's kernels that take a mask do not take groups, and would otherwise
/// fall back to the unfused path.
fn masked_attention(
    query: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let [len, heads, d] = query.size()[..] else {
        unreachable!("queries are [len, heads, d]")
    };
    let kv_heads = k.size()[1];
    let group = heads / kv_heads;
    let q = query
        .view([len, kv_heads, group, d])
        .permute([1, 2, 0, 3])
        .reshape([1, kv_heads, group * len, d]);
    let out = Tensor::f_scaled_dot_product_attention(
        &q,
        k,
        v,
        Some(mask.repeat([group, 1])),
        0.0,
        false,
        scale,
        false,
    )?;
    // [1, kv_heads, group × len, d] is [1, heads, len, d] in memory (heads are kv-major).
    Ok(out.reshape([1, heads, len, d]))
}

/// Which of a sequence's `context + len` keys each of its `len` new tokens sees, `[len, context + len]`:
/// the keys up to its own position and every key of a bidirectional run it belongs to, less, in a
/// sliding-window layer, the keys `window` or more positions before it.
fn prompt_mask(seq: &SequenceSlice, window: Option<i64>, device: tch::Device) -> Result<Tensor> {
    let total = seq.context + seq.len;
    let mut mask = Tensor::f_ones([seq.len, total], (Kind::Bool, device))?.f_tril(seq.context)?;
    if let Some(open) = &seq.bidirectional {
        mask = mask.f_logical_or(open)?;
    }
    if let Some(w) = window {
        // Row i is position context + i: keys from context + i − (w − 1) on. The window hides the far
        // past inside a bidirectional run too (HF: AND(window, OR(causal, run))).
        mask = mask.f_triu(seq.context - w + 1)?;
    }
    Ok(mask)
}

/// The leading single-token decodes of a step (`query`: `[n, heads, d]`), in one attention call over
/// their gathered contexts: the paged decode kernel where it runs, else libtorch's attention over the
/// contexts padded to the longest.
fn attend_gathered(
    query: &Tensor,
    kv_heads: i64,
    layer: usize,
    gather: &DecodeGather,
    cache: &PagedKvCache,
    scale: f64,
    window: Option<i64>,
) -> Result<Tensor> {
    let (slots, lengths) = (&gather.slots, &gather.lengths);
    let (keys, values) = cache.layer(layer);
    // A window no narrower than the gathered contexts hides nothing (Gemma 3's 1024 at shorter contexts):
    // the paged decode kernel serves the layer as it serves a global one.
    let window = window.filter(|&w| w < gather.width);
    if window.is_none() {
        if let Some(out) =
            kernels::paged_decode_attention(query, keys, values, slots, lengths, scale)
        {
            return Ok(out);
        }
    }
    // A sliding window hides each sequence's slots before `length − window` (the mask's slots are a
    // sequence's positions in order).
    let mask = gather.mask()?;
    let windowed;
    let mask = match window {
        Some(w) => {
            let first = (lengths - w).view([-1, 1, 1, 1]);
            let seen = Tensor::f_arange(gather.width, (Kind::Int64, mask.device()))?
                .view([1, 1, 1, gather.width])
                .f_ge_tensor(&first)?;
            // The mask is boolean (eager steps) or an additive bias (fixed-shape steps: 0 or −∞).
            windowed = if mask.kind() == Kind::Bool {
                mask.f_logical_and(&seen)?
            } else {
                mask.f_masked_fill(&seen.f_logical_not()?, f64::NEG_INFINITY)?
            };
            &windowed
        }
        None => mask,
    };
    // Each key/value head's group of query heads goes in as that head's queries (`[n, kv_heads, group,
    // d]`): grouped-query attention without repeating keys and values, on kernels that take a mask but
    // not groups.
    let (n, longest) = (mask.size()[0], mask.size()[3]);
    let (heads, d) = (query.size()[1], query.size()[2]);
    let (k, v) = cache.gather(layer, slots)?;
    let heads_first = |t: Tensor| t.view([n, longest, kv_heads, d]).transpose(1, 2);
    let q = query.reshape([n, kv_heads, heads / kv_heads, d]);
    let out = Tensor::f_scaled_dot_product_attention(
        &q,
        &heads_first(k),
        &heads_first(v),
        Some(mask),
        0.0,
        false,
        scale,
        false,
    )?;
    Ok(out.reshape([n, heads, d]))
}

/// How many of `sequences`, from the first on, are fresh causal prompts of the first one's length
/// packed back to back (a step's batch of equal prompts): one call attends them all, with the whole
/// batch's blocks in one grid where one call per prompt would leave most of the GPU idle at a few
/// hundred tokens. 0 or 1: attend the first alone.
fn equal_fresh_prompts(sequences: &[SequenceSlice], window: Option<i64>) -> usize {
    let Some(first) = sequences.first() else {
        return 0;
    };
    let fresh = |s: &SequenceSlice| {
        s.context == 0
            && s.len == first.len
            && s.len > 1
            && s.bidirectional.is_none()
            && window.is_none_or(|w| s.len <= w)
    };
    sequences
        .iter()
        .enumerate()
        .take_while(|&(j, s)| fresh(s) && s.start == first.start + j as i64 * first.len)
        .count()
}

/// Causal attention of `n` fresh prompts of `len` tokens each, packed from row `start` of the step's
/// queries, keys and values (`[tokens, heads, d]`), as one batch: `[n * len, heads, d]`.
fn attend_equal_prompts(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    start: i64,
    n: i64,
    len: i64,
    scale: f64,
) -> Result<Tensor> {
    // [n * len, heads, d] → [n, heads, len, d] (a view: the kernels read the strides)
    let batched = |t: &Tensor| -> Result<Tensor> {
        let (heads, d) = (t.size()[1], t.size()[2]);
        Ok(t.f_narrow(0, start, n * len)?
            .f_view([n, len, heads, d])?
            .f_transpose(1, 2)?)
    };
    let out = attend(
        &batched(query)?,
        &batched(key)?,
        &batched(value)?,
        true,
        scale,
    )?;
    let (heads, d) = (out.size()[1], out.size()[3]);
    // Laid out [n, len, heads, d] where the kernel keeps the queries' layout (cuDNN's on CUDA): no copy.
    Ok(out.f_transpose(1, 2)?.f_reshape([n * len, heads, d])?)
}

/// Attends to keys and values already stored in the cache at `slots.new_slots()`.
#[allow(clippy::too_many_arguments)]
fn attend_stored(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    layer: usize,
    batch: &AttentionBatch,
    slots: LayerSlots,
    cache: &PagedKvCache,
    scale: f64,
    window: Option<i64>,
) -> Result<Tensor> {
    let mut outputs = Vec::with_capacity(batch.sequences.len());
    let mut gathered = 0;
    if let Some(main) = &batch.decode_gather {
        gathered = main.lengths.size()[0] as usize;
        let decodes = query.narrow(0, 0, gathered as i64);
        let gather = slots.gather().ok_or_else(|| {
            mmreg_core::Error::Engine("a decode step without gathered slots".into())
        })?;
        // The sliding pool's gather holds only each sequence's window: nothing left to hide.
        let window = window.filter(|_| !slots.windowed());
        let out = attend_gathered(&decodes, key.size()[1], layer, gather, cache, scale, window)?;
        // Fixed-shape decode steps describe no sequences beyond the gather.
        if gathered >= batch.sequences.len() {
            return Ok(out);
        }
        outputs.push(out);
    }
    let mut i = gathered;
    while i < batch.sequences.len() {
        let seq = &batch.sequences[i];
        let prompts = equal_fresh_prompts(&batch.sequences[i..], window);
        if prompts > 1 {
            let (start, n, len) = (seq.start, prompts as i64, seq.len);
            outputs.push(attend_equal_prompts(
                query, key, value, start, n, len, scale,
            )?);
            i += prompts;
            continue;
        }
        // [n, heads, d] → [1, heads, n, d], and back
        let heads_first = |t: Tensor| t.transpose(0, 1).unsqueeze(0);
        let tokens_first = |t: Tensor| t.squeeze_dim(0).transpose(0, 1);
        let rows = query.narrow(0, seq.start, seq.len);
        let windowed = window.is_some_and(|w| seq.context + seq.len > w);
        let causal = seq.bidirectional.is_none() && !windowed;
        let fresh = causal && seq.context == 0 && seq.len > 1;
        let chunk = causal && seq.context > 0 && seq.len > 1 && seq.context <= seq.len;
        // Keys over a padded length where those past the sequence's end can be read (see
        // ATTENTION_LEN_STEP): a fresh prompt's from the rows after it, a chunk's through padded slots.
        let total = seq.context + seq.len;
        let keys = match padded_len(total) {
            p if chunk || (fresh && seq.start + p <= query.size()[0]) => p,
            _ => total,
        };
        let (k, v) = if seq.context == 0 {
            (
                key.narrow(0, seq.start, keys),
                value.narrow(0, seq.start, keys),
            )
        } else {
            cache.gather(layer, &pad_slots(slots.sequence(i), keys)?)?
        };
        let (k, v) = (heads_first(k), heads_first(v));
        let out = if fresh {
            // A fresh prompt is plainly causal.
            let q = heads_first(query.narrow(0, seq.start, keys));
            tokens_first(attend(&q, &k, &v, true, scale)?).narrow(0, 0, seq.len)
        } else if causal && seq.len == 1 {
            // One new token sees everything cached.
            tokens_first(attend(&heads_first(rows), &k, &v, false, scale)?)
        } else if chunk {
            chunk_after_context(&rows, &k, &v, seq.context, scale)?
        } else {
            // Several new tokens after more cached ones (a short chunk of a long prompt, or a prompt
            // after a long cached prefix), or a prompt with bidirectional runs or a sliding window.
            let mask = prompt_mask(seq, window, query.device())?;
            tokens_first(masked_attention(&rows, &k, &v, &mask, scale)?)
        };
        outputs.push(out);
        i += 1;
    }
    join_rows(outputs)
}

/// A step's attention outputs, each `[rows, heads, d]` in the step's order, as one `[tokens, heads,
/// d]`. A lone one goes as it is: where the kernel lays it out as `[len, heads, d]` (cuDNN's attention
/// on CUDA does) the caller's reshape copies nothing. Several are each copied into their rows, a plain
/// device-to-device copy for each contiguous one (a cat of them had taken a strided copy kernel for the
/// whole step at about half the card's copy rate).
fn join_rows(mut pieces: Vec<Tensor>) -> Result<Tensor> {
    if pieces.len() == 1 {
        return Ok(pieces.remove(0));
    }
    let first = &pieces[0];
    let (kind, device) = (first.kind(), first.device());
    let mut size = first.size();
    size[0] = pieces.iter().map(|p| p.size()[0]).sum();
    let joined = Tensor::f_empty(size, (kind, device))?;
    let mut row = 0;
    for piece in &pieces {
        let rows = piece.size()[0];
        joined.f_narrow(0, row, rows)?.f_copy_(piece)?;
        row += rows;
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn prompt(start: i64, len: i64, context: i64) -> SequenceSlice {
        SequenceSlice {
            start,
            len,
            context,
            slots: Tensor::new(),
            bidirectional: None,
        }
    }

    /// A step's run of equal fresh prompts ends at the first sequence that is not one, or not packed
    /// right after the one before; a window shorter than the prompts, or a bidirectional run, stops it.
    #[test]
    fn equal_fresh_prompts_are_the_leading_run_of_one_length() {
        let step = [
            prompt(0, 5, 0),
            prompt(5, 5, 0),
            prompt(10, 5, 0),
            prompt(15, 4, 0),
        ];
        assert_eq!(equal_fresh_prompts(&step, None), 3);
        assert_eq!(equal_fresh_prompts(&step[3..], None), 1);
        assert_eq!(equal_fresh_prompts(&step, Some(5)), 3);
        assert_eq!(equal_fresh_prompts(&step, Some(4)), 0);
        assert_eq!(equal_fresh_prompts(&[], None), 0);
        // A chunk after its context, then prompts: nothing to batch at the chunk.
        let chunked = [prompt(0, 5, 3), prompt(5, 5, 0), prompt(10, 5, 0)];
        assert_eq!(equal_fresh_prompts(&chunked, None), 0);
        assert_eq!(equal_fresh_prompts(&chunked[1..], None), 2);
        // Single-token rows are decodes, and a gap in the packing ends the run.
        assert_eq!(
            equal_fresh_prompts(&[prompt(0, 1, 0), prompt(1, 1, 0)], None),
            0
        );
        assert_eq!(
            equal_fresh_prompts(&[prompt(0, 5, 0), prompt(6, 5, 0)], None),
            1
        );
        let mut open = prompt(5, 5, 0);
        open.bidirectional = Some(Tensor::ones([5, 5], (Kind::Bool, Device::Cpu)));
        assert_eq!(equal_fresh_prompts(&[prompt(0, 5, 0), open], None), 1);
    }

    /// Equal prompts attended as one batch give each prompt's own causal attention, for plain and
    /// grouped heads, with the queries a strided view of a stacked projection as the decoder's are.
    #[test]
    fn equal_prompts_in_one_batch_attend_as_each_alone() {
        tch::manual_seed(5);
        let (d, len, n) = (16, 6, 3);
        for (heads, kv_heads) in [(4, 4), (8, 2)] {
            let opts = (Kind::Float, Device::Cpu);
            // Two rows before the prompts (a decode ahead of them), as in a mixed step.
            let rows = 2 + n * len;
            let qkv = Tensor::randn([rows, heads + 2 * kv_heads, d], opts);
            let q = qkv.narrow(1, 0, heads);
            let k = qkv.narrow(1, heads, kv_heads);
            let v = qkv.narrow(1, heads + kv_heads, kv_heads);
            let gqa = heads != kv_heads;
            let out = attend_equal_prompts(&q, &k, &v, 2, n, len, 0.25).expect("batched");
            assert_eq!(out.size(), [n * len, heads, d]);
            for p in 0..n {
                let first = |t: &Tensor| t.narrow(0, 2 + p * len, len).transpose(0, 1).unsqueeze(0);
                let alone = Tensor::scaled_dot_product_attention(
                    &first(&q),
                    &first(&k),
                    &first(&v),
                    None::<Tensor>,
                    0.0,
                    true,
                    0.25,
                    gqa,
                )
                .squeeze_dim(0)
                .transpose(0, 1);
                let error = (out.narrow(0, p * len, len) - alone)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(
                    error < 1e-6,
                    "heads {heads}/{kv_heads}, prompt {p}: {error}"
                );
            }
            // Causal: the first token of the second prompt sees only itself (its value row).
            let own = v
                .get(2 + len)
                .repeat_interleave_self_int(heads / kv_heads, 0, None);
            let error = (out.get(len) - own).abs().max().double_value(&[]);
            assert!(error < 1e-6, "heads {heads}/{kv_heads}: {error}");
        }
    }

    /// Slots padded to a length repeat the first; a list already as long stays as it is.
    #[test]
    fn slots_are_padded_with_the_first() {
        let slots = Tensor::from_slice(&[7i64, 3, 9]);
        let padded = pad_slots(&slots, 6).expect("padded");
        assert_eq!(Vec::<i64>::try_from(&padded).unwrap(), [7, 3, 9, 7, 7, 7]);
        let same = pad_slots(&slots, 3).expect("same");
        assert_eq!(Vec::<i64>::try_from(&same).unwrap(), [7, 3, 9]);
        assert_eq!(padded_len(1), 128);
        assert_eq!(padded_len(128), 128);
        assert_eq!(padded_len(2358), 2432);
    }

    /// Joined pieces are the pieces in order, row for row, whatever their layout; a lone piece is
    /// returned as it is (no copy).
    #[test]
    fn joined_rows_are_the_pieces_in_order() {
        let opts = (Kind::Float, Device::Cpu);
        let plain = Tensor::randn([3, 4, 8], opts);
        // [4, 5, 8] laid out head by head, as a kernel writing [1, heads, len, d] would
        let strided = Tensor::randn([5, 4, 8], opts)
            .transpose(0, 1)
            .contiguous()
            .transpose(0, 1);
        let last = Tensor::randn([1, 4, 8], opts);
        let pieces = vec![
            plain.shallow_clone(),
            strided.shallow_clone(),
            last.shallow_clone(),
        ];
        let joined = join_rows(pieces).expect("joined");
        assert_eq!(joined.size(), [9, 4, 8]);
        let expected = Tensor::cat(&[&plain, &strided, &last], 0);
        assert_eq!((joined - expected).abs().max().double_value(&[]), 0.0);
        let alone = join_rows(vec![strided.shallow_clone()]).expect("alone");
        assert_eq!(alone.data_ptr(), strided.data_ptr());
    }

    /// A chunk after cached positions: causal attention over the zero-padded whole sequence equals
    /// attention under the chunk's bottom-right-aligned causal mask, for plain and grouped heads, with
    /// fewer, as many and more cached positions than the chunk's.
    #[test]
    fn a_chunk_after_its_context_attends_as_under_the_causal_mask() {
        tch::manual_seed(3);
        let d = 16;
        for (heads, kv_heads) in [(4, 4), (8, 2)] {
            for (context, len) in [(1, 7), (5, 5), (9, 4)] {
                let opts = (Kind::Float, Device::Cpu);
                let query = Tensor::randn([len, heads, d], opts);
                let k = Tensor::randn([1, kv_heads, context + len, d], opts);
                let v = Tensor::randn([1, kv_heads, context + len, d], opts);
                let scale = 0.25;
                let mask =
                    Tensor::ones([len, context + len], (Kind::Bool, Device::Cpu)).tril(context);
                let expected = masked_attention(&query, &k, &v, &mask, scale).expect("masked");
                let out = chunk_after_context(&query, &k, &v, context, scale).expect("causal");
                assert_eq!(out.size(), [len, heads, d]);
                let expected = expected.squeeze_dim(0).transpose(0, 1);
                let error = (out - &expected).abs().max().double_value(&[]);
                assert!(
                    error < 1e-5,
                    "heads {heads}/{kv_heads}, {context} + {len}: {error}"
                );
                // Keys and values padded past the sequence's end (a padded length): the chunk's
                // queries do not see them.
                let extra = Tensor::randn([1, kv_heads, 6, d], opts) * 100.0;
                let (kp, vp) = (Tensor::cat(&[&k, &extra], 2), Tensor::cat(&[&v, &extra], 2));
                let padded = chunk_after_context(&query, &kp, &vp, context, scale).expect("padded");
                let error = (padded - &expected).abs().max().double_value(&[]);
                assert!(error < 1e-5, "padded, {context} + {len}: {error}");
                // The mask matters: the chunk's first token must not see the chunk's last key.
                let unmasked = Tensor::ones_like(&mask);
                let open = masked_attention(&query, &k, &v, &unmasked, scale).expect("open");
                let open = open.squeeze_dim(0).transpose(0, 1);
                assert!((open - expected).abs().max().double_value(&[]) > 1e-3);
            }
        }
    }
}
