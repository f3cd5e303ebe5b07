//! The scheduler's KV-cache blocks, with automatic prefix caching.
//!
//! Every full block of a sequence gets a content hash: BLAKE3 over its parent block's hash, its token ids
//! and the content hashes of the multimodal items whose placeholders fall in it. Two blocks with the
//! same hash hold the same keys and values, so a new sequence whose first blocks' hashes are known takes
//! those blocks (their reference count goes up) instead of computing them. Because the items' hashes are
//! part of each block's hash, and every hash includes its parent's, two prompts with the same text and
//! different images share no block from the first image placeholder on.
//!
//! A block whose last reference goes keeps its keys, values and hash in the free list, oldest first, and
//! is reused by a later prefix hit until it is taken for new tokens (evicted).

use std::collections::{BTreeMap, HashMap};

/// A BLAKE3 content hash.
pub type Hash = [u8; 32];

/// The hash of one full block of tokens: its parent's hash (`None` for a sequence's first block), its
/// token ids, and the content hashes of the items whose placeholders overlap it, in prompt order.
pub fn block_hash(parent: Option<&Hash>, tokens: &[u32], items: &[&Hash]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    match parent {
        Some(parent) => hasher.update(&[1]).update(parent),
        None => hasher.update(&[0]),
    };
    hasher.update(&(tokens.len() as u64).to_le_bytes());
    for token in tokens {
        hasher.update(&token.to_le_bytes());
    }
    for item in items {
        hasher.update(*item);
    }
    *hasher.finalize().as_bytes()
}

/// The pool's blocks: reference counts, the hashes of full blocks, and the free ones in eviction order.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    total: usize,
    /// Whether full blocks are hashed and reused (`--no-prefix-caching` turns it off).
    caching: bool,
    refs: Vec<u32>,
    hash: Vec<Option<Hash>>,
    by_hash: HashMap<Hash, u32>,
    /// Blocks no sequence holds, by the time they were freed: the oldest is taken (evicted) first.
    free: BTreeMap<u64, u32>,
    freed_at: Vec<u64>,
    clock: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        let mut pool = Self {
            block_size,
            total: num_blocks,
            caching,
            refs: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            by_hash: HashMap::new(),
            free: BTreeMap::new(),
            freed_at: vec![0; num_blocks],
            clock: 0,
        };
        for block in 0..num_blocks as u32 {
            pool.push_free(block);
        }
        pool
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }

    /// Blocks no sequence holds (some may still hold a cached prefix).
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn push_free(&mut self, block: u32) {
        self.clock += 1;
        self.freed_at[block as usize] = self.clock;
        self.free.insert(self.clock, block);
    }

    /// Grows a sequence's block list to hold `tokens` tokens, evicting the least recently freed cached
    /// blocks as needed; false (and no change) if the pool is short.
    pub fn grow(&mut self, blocks: &mut Vec<u32>, tokens: usize) -> bool {
        let needed = self.blocks_for(tokens).saturating_sub(blocks.len());
        if needed > self.free.len() {
            return false;
        }
        for _ in 0..needed {
            let (_, block) = self.free.pop_first().expect("counted above");
            if let Some(hash) = self.hash[block as usize].take() {
                self.by_hash.remove(&hash);
            }
            self.refs[block as usize] = 1;
            blocks.push(block);
        }
        true
    }

    /// Drops a sequence's hold on its blocks. Its last blocks are freed first, so they are evicted
    /// before its first ones (a prefix is worth more than a tail).
    pub fn release(&mut self, blocks: &mut Vec<u32>) {
        for block in blocks.drain(..).rev() {
            let refs = &mut self.refs[block as usize];
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.push_free(block);
            }
        }
    }

    /// The blocks holding the longest run of `hashes` (a sequence's first full blocks, in order) that the
    /// pool has, each now also held by the caller.
    pub fn take_prefix(&mut self, hashes: &[Hash]) -> Vec<u32> {
        if !self.caching {
            return Vec::new();
        }
        let mut blocks = Vec::new();
        for hash in hashes {
            let Some(&block) = self.by_hash.get(hash) else {
                break;
            };
            if self.refs[block as usize] == 0 {
                self.free.remove(&self.freed_at[block as usize]);
            }
            self.refs[block as usize] += 1;
            blocks.push(block);
        }
        blocks
    }

    /// Records that `block` is full and holds the tokens whose hash is `hash`, so later sequences can
    /// reuse it. A block whose contents another block already holds stays unhashed.
    pub fn register(&mut self, block: u32, hash: Hash) {
        if !self.caching || self.hash[block as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(entry) = self.by_hash.entry(hash) {
            entry.insert(block);
            self.hash[block as usize] = Some(hash);
        }
    }

    /// Whether a block holding the tokens whose hash is `hash` is cached (held or free).
    pub fn has(&self, hash: &Hash) -> bool {
        self.caching && self.by_hash.contains_key(hash)
    }

    /// Blocks that hold a cached prefix.
    pub fn cached_blocks(&self) -> usize {
        self.by_hash.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> Hash {
        [n; 32]
    }

    #[test]
    fn a_released_block_is_found_by_its_hash_until_it_is_evicted() {
        let mut pool = BlockPool::new(3, 4, true);
        let mut a = Vec::new();
        assert!(pool.grow(&mut a, 8));
        pool.register(a[0], h(1));
        pool.register(a[1], h(2));
        let first = a.clone();
        pool.release(&mut a);
        assert_eq!(pool.free_blocks(), 3);
        // Found again, in order, and held.
        let mut b = pool.take_prefix(&[h(1), h(2), h(3)]);
        assert_eq!(b, first);
        assert_eq!(pool.free_blocks(), 1);
        // A second holder shares them; both must let go before they are free.
        let mut c = pool.take_prefix(&[h(1)]);
        assert_eq!(c, vec![first[0]]);
        pool.release(&mut b);
        assert_eq!(pool.free_blocks(), 2);
        pool.release(&mut c);
        assert_eq!(pool.free_blocks(), 3);
        // Taking every block for new tokens evicts the cached ones.
        let mut d = Vec::new();
        assert!(pool.grow(&mut d, 12));
        assert_eq!(pool.cached_blocks(), 0);
        pool.release(&mut d);
        assert!(pool.take_prefix(&[h(1)]).is_empty());
    }

    #[test]
    fn the_tail_of_a_released_sequence_is_evicted_before_its_head() {
        let mut pool = BlockPool::new(3, 1, true);
        let mut a = Vec::new();
        assert!(pool.grow(&mut a, 2));
        pool.register(a[0], h(1));
        pool.register(a[1], h(2));
        pool.release(&mut a);
        // One block never used, then the tail, then the head.
        let mut b = Vec::new();
        assert!(pool.grow(&mut b, 2));
        assert_eq!(pool.take_prefix(&[h(1)]).len(), 1);
        assert!(pool.take_prefix(&[h(2)]).is_empty());
    }

    #[test]
    fn without_caching_nothing_is_found() {
        let mut pool = BlockPool::new(2, 4, false);
        let mut a = Vec::new();
        assert!(pool.grow(&mut a, 4));
        pool.register(a[0], h(1));
        pool.release(&mut a);
        assert!(pool.take_prefix(&[h(1)]).is_empty());
        assert!(!pool.grow(&mut a, 12));
        assert!(a.is_empty());
    }

    #[test]
    fn block_hashes_depend_on_parent_tokens_and_items() {
        let base = block_hash(None, &[1, 2], &[]);
        assert_ne!(base, block_hash(Some(&h(0)), &[1, 2], &[]));
        assert_ne!(base, block_hash(None, &[1, 3], &[]));
        assert_ne!(base, block_hash(None, &[1, 2], &[&h(9)]));
        assert_eq!(base, block_hash(None, &[1, 2], &[]));
    }
}
