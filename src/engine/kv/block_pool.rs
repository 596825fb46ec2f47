//! The physical block pool: block ids `0..num_blocks` and a FIFO free list. Blocks are handed
//! out from the front and returned to the back, so the list stays in eviction order (the
//! least recently freed block is reused first).

use std::collections::VecDeque;

pub type BlockId = u32;

#[derive(Debug)]
pub struct BlockPool {
    num_blocks: usize,
    free: VecDeque<BlockId>,
    in_use: Vec<bool>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        let num_blocks = num_blocks.min(BlockId::MAX as usize);
        Self {
            num_blocks,
            free: (0..num_blocks as BlockId).collect(),
            in_use: vec![false; num_blocks],
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Take `n` blocks, or none at all if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        let blocks: Vec<BlockId> = self.free.drain(..n).collect();
        for &b in &blocks {
            self.in_use[b as usize] = true;
        }
        Some(blocks)
    }

    /// Return blocks to the back of the free list. A block that is already free is ignored,
    /// so a double free cannot hand one block to two sequences.
    pub fn free(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for b in blocks {
            if let Some(used) = self.in_use.get_mut(b as usize) {
                if std::mem::replace(used, false) {
                    self.free.push_back(b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_free_list() {
        let mut p = BlockPool::new(4);
        assert_eq!(p.allocate(2), Some(vec![0, 1]));
        assert_eq!(p.allocate(3), None);
        p.free([1, 0, 1]);
        assert_eq!(p.num_free(), 4);
        assert_eq!(p.allocate(4), Some(vec![2, 3, 1, 0]));
        assert_eq!(p.allocate(1), None);
    }
}
