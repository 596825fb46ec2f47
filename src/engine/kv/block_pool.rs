//! The physical block pool: block ids `0..num_blocks`, reference counts, and the free list in
//! eviction order (least recently freed first). Freed blocks keep their prefix-cache entry until
//! they are handed out again, so a later request can revive them; handing one out evicts it.
//! The free list is intrusive and doubly linked, so reviving a block from its middle is O(1).

use std::collections::HashMap;

pub type BlockId = u32;

const NONE: u32 = u32::MAX;

/// A full block's identity in the prefix cache: the chained hash of its tokens and everything
/// before them, plus the tokens themselves (compared on lookup, so a hash collision can never
/// hand out the wrong K/V).
#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheEntry {
    hash: u64,
    tokens: Vec<u32>,
}

#[derive(Debug)]
pub struct BlockPool {
    ref_cnt: Vec<u32>,
    entry: Vec<Option<CacheEntry>>,
    cached: HashMap<u64, BlockId>,
    // Free list: prev/next links per block, NONE-terminated.
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    num_free: usize,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        let n = num_blocks.min(NONE as usize - 1);
        let mut p = Self {
            ref_cnt: vec![0; n],
            entry: vec![None; n],
            cached: HashMap::new(),
            prev: vec![NONE; n],
            next: vec![NONE; n],
            head: NONE,
            tail: NONE,
            num_free: 0,
        };
        for b in 0..n as u32 {
            p.push_back(b);
        }
        p
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    /// Blocks not referenced by any sequence (some may still hold cached prefixes).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Blocks holding a prefix-cache entry.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.ref_cnt[b as usize]
    }

    /// Take `n` blocks from the head of the free list (evicting any cache entry they hold), or
    /// none at all if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.head;
            self.unlink(b);
            if let Some(e) = self.entry[b as usize].take() {
                self.cached.remove(&e.hash);
            }
            self.ref_cnt[b as usize] = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Drop one reference to each block; blocks nobody references join the back of the free
    /// list, keeping their cache entry. A block that is already free is a caller's bug: ignored
    /// in release builds, a panic in debug builds.
    pub fn free(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for b in blocks {
            let Some(rc) = self.ref_cnt.get_mut(b as usize) else {
                continue;
            };
            if *rc == 0 {
                debug_assert!(false, "double free of block {b}");
                continue;
            }
            *rc -= 1;
            if *rc == 0 {
                self.push_back(b);
            }
        }
    }

    /// The cached block holding exactly `tokens` under `hash`, if any.
    pub fn lookup(&self, hash: u64, tokens: &[u32]) -> Option<BlockId> {
        let &b = self.cached.get(&hash)?;
        let e = self.entry[b as usize].as_ref()?;
        (e.tokens == tokens).then_some(b)
    }

    /// Take a reference to a (cached) block, reviving it from the free list if unreferenced.
    pub fn touch(&mut self, b: BlockId) {
        if self.ref_cnt[b as usize] == 0 {
            self.unlink(b);
        }
        self.ref_cnt[b as usize] += 1;
    }

    /// Record that block `b` now holds the full block `tokens` with chained hash `hash`. The
    /// first block registered under a hash stays the cached one.
    pub fn register(&mut self, b: BlockId, hash: u64, tokens: &[u32]) {
        if self.entry[b as usize].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.entry[b as usize] = Some(CacheEntry {
            hash,
            tokens: tokens.to_vec(),
        });
        self.cached.insert(hash, b);
    }

    fn push_back(&mut self, b: BlockId) {
        let i = b as usize;
        self.prev[i] = self.tail;
        self.next[i] = NONE;
        if self.tail == NONE {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.num_free += 1;
    }

    fn unlink(&mut self, b: BlockId) {
        let i = b as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NONE {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NONE {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NONE;
        self.next[i] = NONE;
        self.num_free -= 1;
    }

    /// Check the pool against `refs` (each block's number of holders, from the block tables):
    /// ref counts match; the free list holds exactly the unreferenced blocks, once each, and
    /// `num_free` counts them (so free + referenced = every block); the cache index and the
    /// blocks' entries agree.
    #[cfg(test)]
    pub(crate) fn check(&self, refs: &HashMap<BlockId, u32>) -> Result<(), String> {
        for b in 0..self.num_blocks() as BlockId {
            let want = refs.get(&b).copied().unwrap_or(0);
            if self.ref_cnt[b as usize] != want {
                return Err(format!(
                    "block {b}: ref count {} but {want} holders",
                    self.ref_cnt[b as usize]
                ));
            }
        }
        let free = self.free_order();
        let unique: std::collections::HashSet<_> = free.iter().collect();
        let unreferenced = self.ref_cnt.iter().filter(|&&r| r == 0).count();
        if unique.len() != free.len() || free.len() != self.num_free || free.len() != unreferenced {
            return Err(format!(
                "free list {free:?} (num_free {}), {unreferenced} unreferenced blocks",
                self.num_free
            ));
        }
        if let Some(b) = free.iter().find(|&&b| self.ref_cnt[b as usize] != 0) {
            return Err(format!("block {b} is free and referenced"));
        }
        for (&hash, &b) in &self.cached {
            if self.entry[b as usize].as_ref().map(|e| e.hash) != Some(hash) {
                return Err(format!(
                    "cache index {hash:x} -> block {b} has another entry"
                ));
            }
        }
        let entries = self.entry.iter().flatten().count();
        if entries != self.cached.len() {
            return Err(format!("{entries} entries, {} indexed", self.cached.len()));
        }
        Ok(())
    }

    #[cfg(test)]
    fn free_order(&self) -> Vec<BlockId> {
        let mut out = Vec::new();
        let mut b = self.head;
        while b != NONE {
            out.push(b);
            b = self.next[b as usize];
        }
        out
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
        p.free([1, 0]);
        assert_eq!(p.num_free(), 4);
        assert_eq!(p.allocate(4), Some(vec![2, 3, 1, 0]));
        assert_eq!(p.allocate(1), None);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "double free of block 1")]
    fn a_double_free_panics_in_debug_builds() {
        let mut p = BlockPool::new(2);
        p.allocate(2);
        p.free([1, 0, 1]);
    }

    #[test]
    fn ref_counts_revival_and_eviction_on_reuse() {
        let mut p = BlockPool::new(3);
        let b = p.allocate(2).unwrap();
        p.register(b[0], 11, &[1, 2]);
        p.touch(b[0]); // a second sequence shares it
        assert_eq!(p.ref_count(0), 2);
        p.free([0, 1]);
        assert_eq!((p.ref_count(0), p.num_free()), (1, 2));
        p.free([0]);
        assert_eq!(p.free_order(), vec![2, 1, 0]);
        // Revive block 0 from the back of the free list: O(1) unlink from the middle or end.
        assert_eq!(p.lookup(11, &[1, 2]), Some(0));
        assert_eq!(
            p.lookup(11, &[1, 3]),
            None,
            "tokens are compared, not just the hash"
        );
        p.touch(0);
        assert_eq!(p.free_order(), vec![2, 1]);
        p.free([0]);
        // Allocating everything reaches block 0 last and evicts its entry.
        assert_eq!(p.allocate(3), Some(vec![2, 1, 0]));
        assert_eq!(p.lookup(11, &[1, 2]), None);
        assert_eq!(p.num_cached(), 0);
    }
}
