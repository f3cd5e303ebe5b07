//! A preallocated, contiguous KV cache for a batch of sequences decoded in lockstep.

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Keys and values of every layer, `[batch, kv_heads, capacity, head_dim]`, filled up to `len`.
///
/// Preallocated so that a decode step writes in place instead of concatenating (no reallocation per
/// token, and fixed addresses for CUDA graphs later).
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: i64,
    capacity: i64,
}

impl KvCache {
    pub fn new(
        layers: usize,
        batch: i64,
        kv_heads: i64,
        head_dim: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let shape = [batch, kv_heads, capacity, head_dim];
        let mut keys = Vec::with_capacity(layers);
        let mut values = Vec::with_capacity(layers);
        for _ in 0..layers {
            keys.push(Tensor::f_zeros(shape, (kind, device))?);
            values.push(Tensor::f_zeros(shape, (kind, device))?);
        }
        Ok(Self { keys, values, len: 0, capacity })
    }

    /// Tokens already cached (the position of the next token).
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Checks that `new_tokens` more fit, before a forward pass writes them.
    pub fn reserve(&self, new_tokens: i64) -> Result<()> {
        if self.len + new_tokens > self.capacity {
            return Err(Error::PromptTooLong { len: (self.len + new_tokens) as usize, max: self.capacity as usize });
        }
        Ok(())
    }

    /// Writes a layer's new keys and values `[batch, kv_heads, new, head_dim]` after the cached ones and
    /// returns views of everything cached for that layer, the new entries included.
    pub fn append(&mut self, layer: usize, key: &Tensor, value: &Tensor) -> Result<(Tensor, Tensor)> {
        let new = key.size()[2];
        self.reserve(new)?;
        let end = self.len + new;
        self.keys[layer].narrow(2, self.len, new).f_copy_(key)?;
        self.values[layer].narrow(2, self.len, new).f_copy_(value)?;
        Ok((self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)))
    }

    /// Marks `new` tokens as cached once every layer has appended them.
    pub fn advance(&mut self, new: i64) {
        self.len += new;
    }
}
