//! Attention over the paged KV cache for a packed batch of sequences: the part every decoder shares.

use tch::{Kind, Tensor};

use crate::kernels;
use crate::kv_cache::{AttentionBatch, DecodeGather, PagedKvCache};
use crate::Result;

/// Writes the step's new keys and values to the cache, then attends each sequence's queries to its own
/// cached and new tokens, causally. `query` is `[tokens, heads, head_dim]`, `key` and `value`
/// `[tokens, kv_heads, head_dim]` (grouped-query attention when `kv_heads < heads`); returns
/// `[tokens, heads, head_dim]`.
pub fn paged_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    layer: usize,
    batch: &AttentionBatch,
    cache: &mut PagedKvCache,
    scale: f64,
) -> Result<Tensor> {
    cache.write(layer, key, value, &batch.new_slots)?;
    attend_stored(query, key, value, layer, batch, cache, scale)
}

/// [`paged_attention`] when the step's keys and values are already in the cache at
/// `batch.new_slots` (written by [`kernels::rope_and_store`], say).
pub fn attend_stored(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    layer: usize,
    batch: &AttentionBatch,
    cache: &PagedKvCache,
    scale: f64,
) -> Result<Tensor> {
    if let Some(DecodeGather {
        slots,
        mask,
        lengths,
    }) = &batch.decode_gather
    {
        let (keys, values) = cache.layer(layer);
        if let Some(out) =
            kernels::paged_decode_attention(query, keys, values, slots, lengths, scale)
        {
            return Ok(out);
        }
        // One attention call for all single-token decodes, over their contexts padded to the longest.
        // Each key/value head's group of query heads goes in as that head's queries (`[n, kv_heads,
        // group, d]`): grouped-query attention without repeating keys and values, on kernels that take a
        // mask but not groups.
        let (n, longest) = (mask.size()[0], mask.size()[3]);
        let (heads, kv_heads, d) = (query.size()[1], key.size()[1], query.size()[2]);
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
        return Ok(out.reshape([n, heads, d]));
    }
    let gqa = query.size()[1] != key.size()[1];
    let mut outputs = Vec::with_capacity(batch.sequences.len());
    for seq in &batch.sequences {
        // [n, heads, d] → [1, heads, n, d]
        let heads_first = |t: Tensor| t.transpose(0, 1).unsqueeze(0);
        let q = heads_first(query.narrow(0, seq.start, seq.len));
        let (k, v) = if seq.context == 0 {
            (
                key.narrow(0, seq.start, seq.len),
                value.narrow(0, seq.start, seq.len),
            )
        } else {
            cache.gather(layer, &seq.slots)?
        };
        let (k, v) = (heads_first(k), heads_first(v));
        let out = if seq.context == 0 || seq.len == 1 {
            // A fresh prompt is plainly causal; one new token sees everything cached.
            Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                seq.context == 0 && seq.len > 1,
                scale,
                gqa,
            )?
        } else {
            // Several new tokens after cached ones: causal mask aligned to the bottom right.
            let total = seq.context + seq.len;
            let mask =
                Tensor::ones([seq.len, total], (Kind::Bool, query.device())).tril(seq.context);
            Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, scale, gqa)?
        };
        outputs.push(out.squeeze_dim(0).transpose(0, 1));
    }
    Ok(Tensor::cat(&outputs, 0))
}
