//! The KV block manager: the only owner of KV-cache blocks (ids, free list, per-sequence block
//! tables). Pure Rust — it never sees a tensor; the tensors live in `models::KvCache`, indexed by
//! the block ids handed out here.
//!
//! The scheduler talks to it through three calls: [`KvManager::allocate_slots`] (grow a
//! sequence's block table to cover n tokens, all or nothing), [`KvManager::free`], and
//! [`KvManager::block_table`].

mod block_pool;

pub use block_pool::{BlockId, BlockPool};

use std::collections::HashMap;

/// Sequence ids as the engine assigns them.
pub type SeqId = u64;

/// Per-sequence block tables over one [`BlockPool`].
#[derive(Debug)]
pub struct KvManager {
    pool: BlockPool,
    block_size: usize,
    tables: HashMap<SeqId, Vec<BlockId>>,
}

/// Not enough free blocks to grow a sequence; nothing was allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

impl KvManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            tables: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Blocks needed to hold `num_tokens` token positions.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Make `seq`'s block table cover `num_tokens` positions, allocating the missing blocks.
    /// All or nothing: on failure the table is unchanged.
    pub fn allocate_slots(&mut self, seq: SeqId, num_tokens: usize) -> Result<(), OutOfBlocks> {
        let have = self.tables.get(&seq).map_or(0, Vec::len);
        let want = self.blocks_for(num_tokens);
        if want <= have {
            return Ok(());
        }
        let needed = want - have;
        let new_blocks = self.pool.allocate(needed).ok_or(OutOfBlocks {
            needed,
            free: self.pool.num_free(),
        })?;
        self.tables.entry(seq).or_default().extend(new_blocks);
        Ok(())
    }

    /// Return all of `seq`'s blocks to the pool. Freeing an unknown sequence is a no-op.
    pub fn free(&mut self, seq: SeqId) {
        if let Some(table) = self.tables.remove(&seq) {
            // Tail blocks first, so the head of a sequence (the part most likely to be shared as
            // a prefix later) is the last to be reused.
            self.pool.free(table.into_iter().rev());
        }
    }

    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.tables.get(&seq).map_or(&[], Vec::as_slice)
    }

    /// The physical slot of token position `pos` of `seq` (which must be allocated).
    pub fn slot(&self, seq: SeqId, pos: usize) -> Option<usize> {
        let table = self.tables.get(&seq)?;
        let block = *table.get(pos / self.block_size)?;
        Some(block as usize * self.block_size + pos % self.block_size)
    }

    pub fn num_sequences(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_exact_blocks_and_slots() {
        let mut kv = KvManager::new(8, 4);
        kv.allocate_slots(1, 5).unwrap();
        assert_eq!(kv.block_table(1), &[0, 1]);
        kv.allocate_slots(2, 3).unwrap();
        assert_eq!(kv.block_table(2), &[2]);
        // Growing within the last block allocates nothing.
        kv.allocate_slots(1, 8).unwrap();
        assert_eq!(kv.block_table(1), &[0, 1]);
        // Crossing into a new block appends the next free one.
        kv.allocate_slots(1, 9).unwrap();
        assert_eq!(kv.block_table(1), &[0, 1, 3]);
        assert_eq!(kv.slot(1, 0), Some(0));
        assert_eq!(kv.slot(1, 5), Some(5));
        assert_eq!(kv.slot(1, 8), Some(12));
        assert_eq!(kv.slot(2, 2), Some(10));
        assert_eq!(kv.slot(2, 4), None);
        assert_eq!(kv.num_free_blocks(), 4);
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut kv = KvManager::new(3, 4);
        kv.allocate_slots(1, 8).unwrap();
        let err = kv.allocate_slots(2, 9).unwrap_err();
        assert_eq!(err, OutOfBlocks { needed: 3, free: 1 });
        assert_eq!(kv.block_table(2), &[] as &[BlockId]);
        assert_eq!(kv.num_free_blocks(), 1);
    }

    #[test]
    fn free_returns_blocks_tail_first() {
        let mut kv = KvManager::new(6, 2);
        kv.allocate_slots(1, 6).unwrap(); // 0 1 2
        kv.allocate_slots(2, 2).unwrap(); // 3
        kv.free(1);
        assert_eq!(kv.num_free_blocks(), 5);
        // Free list is now [4, 5, 2, 1, 0]: never-used blocks first, then seq 1's tail first.
        kv.allocate_slots(3, 8).unwrap();
        assert_eq!(kv.block_table(3), &[4, 5, 2, 1]);
        kv.free(2);
        kv.free(3);
        kv.free(3); // double free is a no-op
        assert_eq!(kv.num_free_blocks(), 6);
        assert_eq!(kv.num_sequences(), 0);
    }
}
