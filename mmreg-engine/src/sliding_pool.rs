//! The KV-cache blocks of a model's sliding-window layers (Gemma 3's local layers), in a pool of their
//! own. A query at position `i` of such a layer sees keys from `i − window + 1` on, so once a sequence's
//! next query is at `next`, its blocks wholly before `next + 1 − window` hold nothing any later step
//! reads: they go back to the pool (keeping their hash, for prefix caching) and the sequence's table
//! points there at a null block that no sequence owns. A sequence holds at most
//! `⌈(window − 1) / block_size⌉ + 1` blocks here between steps, whatever its length; the global layers
//! keep every block in the main pool.
//!
//! A sequence's table here has an entry per block of its tokens, like its main block list, so that the
//! step's slots in both pools are laid out alike and the attention masks are the same.

use crate::block_pool::{BlockPool, Hash};

#[derive(Debug)]
pub(crate) struct SlidingPool {
    pool: BlockPool,
    window: usize,
    /// A block of the pool's cache that no sequence owns: the entry of a block out of sight, and the
    /// scratch space of the fixed-shape steps' padding rows.
    null: u32,
}

impl SlidingPool {
    /// A pool over `blocks` blocks of the sliding layers' cache, the last of them the null block.
    pub(crate) fn new(blocks: usize, block_size: usize, window: usize, caching: bool) -> Self {
        let usable = blocks.saturating_sub(1);
        Self {
            pool: BlockPool::new(usable, block_size, caching),
            window: window.max(1),
            null: usable as u32,
        }
    }

    pub(crate) fn window(&self) -> usize {
        self.window
    }

    /// The first slot of the null block.
    pub(crate) fn null_slot(&self) -> i64 {
        self.null as i64 * self.pool.block_size() as i64
    }

    pub(crate) fn total_blocks(&self) -> usize {
        self.pool.total_blocks()
    }

    pub(crate) fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }

    /// The first block a query at `next` or later still sees.
    fn first_in_sight(&self, next: usize) -> usize {
        (next + 1).saturating_sub(self.window) / self.pool.block_size()
    }

    /// The most blocks a sequence of `tokens` tokens holds here during a step of at most `chunk` new
    /// tokens.
    pub(crate) fn most_held(&self, tokens: usize, chunk: usize) -> usize {
        let block = self.pool.block_size();
        let sight = (self.window - 1).div_ceil(block) + 1 + chunk.div_ceil(block) + 1;
        self.pool.blocks_for(tokens).min(sight)
    }

    /// Frees the blocks of `table` out of sight of a sequence whose next query is at `next`.
    pub(crate) fn drop_out_of_sight(&mut self, table: &mut [u32], next: usize) {
        let first = self.first_in_sight(next).min(table.len());
        let mut freed: Vec<u32> = table[..first]
            .iter_mut()
            .filter(|b| **b != self.null)
            .map(|b| std::mem::replace(b, self.null))
            .collect();
        self.pool.release(&mut freed);
    }

    /// Frees what a sequence whose next query is at `next` no longer sees, then grows its table to
    /// hold `tokens` tokens (null entries for blocks already out of sight); false (and no new block)
    /// if the pool is short.
    pub(crate) fn grow(&mut self, table: &mut Vec<u32>, next: usize, tokens: usize) -> bool {
        self.drop_out_of_sight(table, next);
        let target = self.pool.blocks_for(tokens);
        let first = self.first_in_sight(next).min(target);
        while table.len() < first {
            table.push(self.null);
        }
        let mut fresh = Vec::new();
        let needed = target.saturating_sub(table.len());
        if !self.pool.grow(&mut fresh, needed * self.pool.block_size()) {
            return false;
        }
        table.extend(fresh);
        true
    }

    /// Drops a sequence's hold on its blocks here.
    pub(crate) fn release(&mut self, table: &mut Vec<u32>) {
        let mut held: Vec<u32> = table.drain(..).filter(|&b| b != self.null).collect();
        self.pool.release(&mut held);
    }

    /// Records that a full block holds the tokens whose hash is `hash` (no-op for the null block).
    pub(crate) fn register(&mut self, block: u32, hash: Hash) {
        if block != self.null {
            self.pool.register(block, hash);
        }
    }

    /// The table for a sequence whose first `hits` full blocks (of hashes `hashes`) are cached in the
    /// main pool, if this pool also has every block of them that the next query (at
    /// `hits × block_size`) sees; those blocks are then held.
    pub(crate) fn take_prefix(&mut self, hashes: &[Hash], hits: usize) -> Option<Vec<u32>> {
        let first = self.first_in_sight(hits * self.pool.block_size()).min(hits);
        let wanted = &hashes[first..hits];
        if !wanted.iter().all(|h| self.pool.has(h)) {
            return None;
        }
        let taken = self.pool.take_prefix(wanted);
        debug_assert_eq!(taken.len(), wanted.len());
        let mut table = vec![self.null; first];
        table.extend(taken);
        Some(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Window 8, blocks of 4: a query at `next` sees from `next − 7`.
    fn pool(blocks: usize) -> SlidingPool {
        SlidingPool::new(blocks, 4, 8, true)
    }

    #[test]
    fn blocks_out_of_sight_go_back_to_the_pool_and_the_table_keeps_its_length() {
        // Three usable blocks: without freeing, the fourth block could not be had.
        let mut p = pool(4);
        let null = p.null;
        let mut table = Vec::new();
        // A 12-token prompt at once: 3 blocks, nothing out of sight yet.
        assert!(p.grow(&mut table, 0, 12));
        assert_eq!(table.len(), 3);
        assert_eq!(p.free_blocks(), 0);
        // Decoding at position 12 sees 5..=12: block 0 (0..4) is out of sight and serves block 3.
        assert!(p.grow(&mut table, 12, 13));
        assert_eq!(table[0], null);
        assert_eq!(table.len(), 4);
        assert_eq!(p.free_blocks(), 0);
        // At 16, block 1 (4..8) goes too (9..=16 in sight).
        assert!(p.grow(&mut table, 16, 17));
        assert_eq!(&table[..2], &[null, null]);
        assert_eq!(table.len(), 5);
        assert_eq!(p.free_blocks(), 0);
        p.release(&mut table);
        assert_eq!(p.free_blocks(), 3);
    }

    #[test]
    fn a_long_sequence_holds_only_its_window() {
        // 4 usable blocks are enough for any length with a window of 8 in blocks of 4.
        let mut p = pool(5);
        let mut table = Vec::new();
        for next in 0..200 {
            assert!(p.grow(&mut table, next, next + 1), "at {next}");
            let held = table.iter().filter(|&&b| b != p.null).count();
            assert!(held <= 3, "{held} blocks held at {next}");
        }
        assert_eq!(table.len(), 50);
    }

    #[test]
    fn a_short_pool_refuses_without_taking_blocks() {
        let mut p = pool(3);
        let mut table = Vec::new();
        assert!(!p.grow(&mut table, 0, 12));
        assert!(table.is_empty());
        assert_eq!(p.free_blocks(), 2);
    }

    #[test]
    fn a_prefix_hit_needs_the_blocks_in_sight_of_its_next_query() {
        let h = |n: u8| [n; 32];
        let mut p = pool(9);
        let mut table = Vec::new();
        assert!(p.grow(&mut table, 0, 16));
        for (b, &block) in table.iter().enumerate() {
            p.register(block, h(b as u8));
        }
        p.release(&mut table);
        // A hit of 4 blocks: the query at 16 sees 9.., so blocks 2 and 3 are needed, 0 and 1 are not.
        let hashes: Vec<Hash> = (0..4).map(h).collect();
        let got = p.take_prefix(&hashes, 4).expect("cached");
        assert_eq!(&got[..2], &[p.null, p.null]);
        assert!(got[2..].iter().all(|&b| b != p.null));
        // A pool that never computed them has nothing to give; no hit needs nothing.
        assert!(pool(9).take_prefix(&hashes, 4).is_none());
        assert_eq!(p.take_prefix(&hashes, 0), Some(Vec::new()));
    }
}
