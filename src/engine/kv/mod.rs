//! The KV block manager: the only owner of KV-cache blocks (ids, ref counts, free list,
//! per-sequence block tables, and the prefix cache). Pure Rust — it never sees a tensor; the
//! tensors live in `models::KvCache`, indexed by the block ids handed out here.
//!
//! The scheduler talks to it through a few calls: [`KvManager::get_computed_blocks`] (find,
//! without side effects, the cached blocks of a new sequence's longest cached prefix),
//! [`KvManager::allocate_slots_with`] / [`KvManager::allocate_slots`] (take those hits and grow a
//! block table to cover n tokens, all or nothing), [`KvManager::cache_full_blocks`] (publish
//! blocks that became full), and [`KvManager::free`].
//!
//! Prefix caching: a full block is identified by a chained hash of its token ids, its
//! predecessors' and the model's; blocks freed by finished sequences keep that identity in the
//! free list (in LRU order) until the pool hands them out again.

mod block_pool;

pub use block_pool::{BlockId, BlockPool};

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Sequence ids as the engine assigns them.
pub type SeqId = u64;

#[derive(Debug, Default)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Chained hashes of the leading full blocks already published to the cache.
    hashes: Vec<u64>,
}

/// Per-sequence block tables over one [`BlockPool`].
#[derive(Debug)]
pub struct KvManager {
    pool: BlockPool,
    block_size: usize,
    tables: HashMap<SeqId, SeqBlocks>,
    prefix_caching: bool,
    /// The root of every hash chain (identifies the model).
    seed: u64,
    /// Prompt tokens looked up in / found in the prefix cache.
    queries: u64,
    hits: u64,
}

/// A prefix-cache hit for a new sequence: its leading full blocks, found in the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComputedBlocks {
    blocks: Vec<BlockId>,
    hashes: Vec<u64>,
    /// Tokens those blocks hold (the sequence's new `num_computed_tokens`).
    pub num_tokens: usize,
    /// Tokens looked up (0 with prefix caching off), for the hit-rate counters.
    num_queried_tokens: usize,
}

/// Not enough free blocks to grow a sequence; nothing was allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

fn chain(parent: u64, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: deterministic, and the tokens are compared on lookup anyway.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl KvManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self::with_prefix_caching(num_blocks, block_size, false, "")
    }

    /// `model` keys the cache, so blocks of different models never match.
    pub fn with_prefix_caching(
        num_blocks: usize,
        block_size: usize,
        enabled: bool,
        model: &str,
    ) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        let mut h = std::collections::hash_map::DefaultHasher::new();
        model.hash(&mut h);
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            tables: HashMap::new(),
            prefix_caching: enabled,
            seed: h.finish(),
            queries: 0,
            hits: 0,
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

    pub fn num_cached_blocks(&self) -> usize {
        self.pool.num_cached()
    }

    /// `(tokens queried, tokens found)` in the prefix cache so far.
    pub fn prefix_cache_counters(&self) -> (u64, u64) {
        (self.queries, self.hits)
    }

    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.pool.ref_count(b)
    }

    /// Blocks needed to hold `num_tokens` token positions.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// The cached blocks of the longest cached prefix of a new sequence's `tokens`, looked up
    /// without side effects (nothing is referenced or counted until [`Self::allocate_slots_with`]
    /// takes them). At least one token is always left to compute, so the step that finishes the
    /// prompt has logits to sample from.
    pub fn get_computed_blocks(&self, tokens: &[u32]) -> ComputedBlocks {
        let mut hit = ComputedBlocks::default();
        if !self.prefix_caching || tokens.is_empty() {
            return hit;
        }
        hit.num_queried_tokens = tokens.len();
        let mut parent = self.seed;
        for chunk in tokens[..tokens.len() - 1].chunks_exact(self.block_size) {
            let hash = chain(parent, chunk);
            let Some(b) = self.pool.lookup(hash, chunk) else {
                break;
            };
            hit.blocks.push(b);
            hit.hashes.push(hash);
            parent = hash;
        }
        hit.num_tokens = hit.blocks.len() * self.block_size;
        hit
    }

    /// Make `seq`'s block table cover `num_tokens` positions, allocating the missing blocks.
    /// All or nothing: on failure the table is unchanged.
    pub fn allocate_slots(&mut self, seq: SeqId, num_tokens: usize) -> Result<(), OutOfBlocks> {
        self.allocate_slots_with(seq, num_tokens, ComputedBlocks::default())
    }

    /// [`Self::allocate_slots`] for a sequence that holds no blocks yet, starting from the
    /// prefix-cache hit `computed` (from [`Self::get_computed_blocks`]). All or nothing: the hit
    /// blocks are referenced and the new ones allocated only when every block fits (a hit block
    /// sitting in the free list counts against the free blocks, as taking it removes it), so a
    /// failed admission leaves nothing to undo.
    pub fn allocate_slots_with(
        &mut self,
        seq: SeqId,
        num_tokens: usize,
        computed: ComputedBlocks,
    ) -> Result<(), OutOfBlocks> {
        let have = self.tables.get(&seq).map_or(0, |t| t.blocks.len());
        let computed = if have == 0 {
            computed
        } else {
            debug_assert!(
                computed.blocks.is_empty(),
                "prefix hit for a running sequence"
            );
            ComputedBlocks::default()
        };
        let hits = computed.blocks.len();
        let needed = self.blocks_for(num_tokens).saturating_sub(have + hits);
        let revived = computed
            .blocks
            .iter()
            .filter(|&&b| self.pool.ref_count(b) == 0)
            .count();
        let free = self.pool.num_free();
        if needed + revived > free {
            return Err(OutOfBlocks {
                needed: needed + revived,
                free,
            });
        }
        self.queries += computed.num_queried_tokens as u64;
        self.hits += computed.num_tokens as u64;
        for &b in &computed.blocks {
            self.pool.touch(b);
        }
        let new_blocks = self
            .pool
            .allocate(needed)
            .ok_or(OutOfBlocks { needed, free })?;
        if hits + new_blocks.len() == 0 {
            return Ok(());
        }
        let t = self.tables.entry(seq).or_default();
        t.blocks.extend(computed.blocks);
        t.hashes.extend(computed.hashes);
        t.blocks.extend(new_blocks);
        Ok(())
    }

    /// Publish the blocks of `seq` that the first `num_computed` of its `tokens` fill.
    pub fn cache_full_blocks(&mut self, seq: SeqId, tokens: &[u32], num_computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let Some(t) = self.tables.get_mut(&seq) else {
            return;
        };
        let bs = self.block_size;
        let full = (num_computed.min(tokens.len()) / bs).min(t.blocks.len());
        for i in t.hashes.len()..full {
            let parent = if i == 0 { self.seed } else { t.hashes[i - 1] };
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let hash = chain(parent, chunk);
            self.pool.register(t.blocks[i], hash, chunk);
            t.hashes.push(hash);
        }
    }

    /// Return all of `seq`'s blocks to the pool. Freeing an unknown sequence is a no-op.
    pub fn free(&mut self, seq: SeqId) {
        if let Some(t) = self.tables.remove(&seq) {
            // Tail blocks first: they join the free list ahead of the head blocks, so the head
            // of a sequence (the part most likely to be shared as a prefix) is evicted last.
            self.pool.free(t.blocks.into_iter().rev());
        }
    }

    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.tables.get(&seq).map_or(&[], |t| t.blocks.as_slice())
    }

    /// The physical slot of token position `pos` of `seq` (which must be allocated).
    pub fn slot(&self, seq: SeqId, pos: usize) -> Option<usize> {
        let table = self.tables.get(&seq)?;
        let block = *table.blocks.get(pos / self.block_size)?;
        Some(block as usize * self.block_size + pos % self.block_size)
    }

    pub fn num_sequences(&self) -> usize {
        self.tables.len()
    }

    /// The pool's invariants against the block tables (see `BlockPool::check`), and each
    /// table's published hashes within its blocks.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let mut refs: HashMap<BlockId, u32> = HashMap::new();
        for (seq, t) in &self.tables {
            if t.hashes.len() > t.blocks.len() || t.blocks.is_empty() {
                return Err(format!(
                    "seq {seq}: {} hashes over {:?}",
                    t.hashes.len(),
                    t.blocks
                ));
            }
            for &b in &t.blocks {
                *refs.entry(b).or_default() += 1;
            }
        }
        self.pool.check(&refs)
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

    fn cached_kv(num_blocks: usize) -> KvManager {
        KvManager::with_prefix_caching(num_blocks, 4, true, "m")
    }

    /// Run a sequence's prompt through: cache lookup, allocation, publish after computing.
    fn prefill(kv: &mut KvManager, seq: SeqId, tokens: &[u32]) -> usize {
        let hit = kv.get_computed_blocks(tokens);
        let cached = hit.num_tokens;
        kv.allocate_slots_with(seq, tokens.len(), hit).unwrap();
        kv.cache_full_blocks(seq, tokens, tokens.len());
        cached
    }

    #[test]
    fn a_shared_prefix_reuses_the_exact_blocks() {
        let mut kv = cached_kv(10);
        let a: Vec<u32> = (0..10).collect(); // blocks [0..4) [4..8) + 2 tokens
        assert_eq!(prefill(&mut kv, 1, &a), 0);
        assert_eq!(kv.block_table(1), &[0, 1, 2]);
        assert_eq!(kv.num_cached_blocks(), 2, "only full blocks are cached");

        // Same first 8 tokens, different tail: both full blocks are reused, shared.
        let mut b = a[..8].to_vec();
        b.extend([77, 78, 79]);
        assert_eq!(prefill(&mut kv, 2, &b), 8);
        assert_eq!(kv.block_table(2), &[0, 1, 3]);
        assert_eq!((kv.ref_count(0), kv.ref_count(1)), (2, 2));
        assert_eq!(kv.prefix_cache_counters(), (21, 8));

        // A prompt that is exactly the cached blocks still computes its last token.
        assert_eq!(prefill(&mut kv, 3, &a[..8]), 4);
        assert_eq!(kv.block_table(3), &[0, 4]);

        // Diverging inside the first block: no hit.
        let mut c = a.clone();
        c[1] = 99;
        assert_eq!(prefill(&mut kv, 4, &c), 0);
    }

    /// vLLM v1's atomic admission: hit blocks sitting in the free list count against the free
    /// blocks, and a failed allocation references, counts and allocates nothing.
    #[test]
    fn a_hit_is_taken_only_when_the_whole_allocation_fits() {
        let mut kv = cached_kv(3);
        let a: Vec<u32> = (0..8).collect();
        prefill(&mut kv, 1, &a); // blocks 0 1, both cached
        kv.free(1); // free list: [2, 1, 0]
        let mut b = a.clone();
        b.extend(100..105); // 13 tokens: 2 hits + 2 new blocks, 3 blocks exist
        let hit = kv.get_computed_blocks(&b);
        assert_eq!(hit.num_tokens, 8);
        let err = kv.allocate_slots_with(2, b.len(), hit).unwrap_err();
        assert_eq!(err, OutOfBlocks { needed: 4, free: 3 });
        assert_eq!(kv.block_table(2), &[] as &[BlockId]);
        assert_eq!(
            (kv.ref_count(0), kv.ref_count(1), kv.num_free_blocks()),
            (0, 0, 3)
        );
        assert_eq!(
            kv.prefix_cache_counters(),
            (8, 0),
            "a failed attempt is not counted"
        );

        let c = &b[..11]; // 2 hits + 1 new block
        let hit = kv.get_computed_blocks(c);
        kv.allocate_slots_with(2, c.len(), hit).unwrap();
        assert_eq!(kv.block_table(2), &[0, 1, 2]);
        assert_eq!(kv.prefix_cache_counters(), (19, 8));
    }

    #[test]
    fn freed_blocks_stay_cached_and_are_evicted_lru() {
        let mut kv = cached_kv(4);
        let a: Vec<u32> = (0..8).collect();
        let b: Vec<u32> = (100..108).collect();
        prefill(&mut kv, 1, &a); // blocks 0 1
        prefill(&mut kv, 2, &b); // blocks 2 3
        kv.free(1); // free list: [1, 0]
        kv.free(2); // free list: [1, 0, 3, 2]
        assert_eq!(kv.num_free_blocks(), 4);
        assert_eq!(kv.num_cached_blocks(), 4);

        // A revived prefix comes back from the middle of the free list.
        let mut a2 = a.clone();
        a2.push(8);
        assert_eq!(prefill(&mut kv, 3, &a2), 8);
        assert_eq!(
            kv.block_table(3),
            &[0, 1, 3],
            "the third block evicts b's tail (LRU)"
        );
        assert_eq!(kv.num_cached_blocks(), 3);
        kv.free(3);

        // b lost its second block: only its first block still hits.
        let mut b2 = b.clone();
        b2.push(9);
        assert_eq!(prefill(&mut kv, 4, &b2), 4);
        assert_eq!(kv.block_table(4)[0], 2);
    }

    #[test]
    fn generated_tokens_fill_blocks_too_and_caching_can_be_off() {
        let mut kv = cached_kv(8);
        let mut toks: Vec<u32> = (0..3).collect();
        prefill(&mut kv, 1, &toks);
        for t in 3..9 {
            toks.push(t);
            kv.allocate_slots(1, toks.len()).unwrap();
            kv.cache_full_blocks(1, &toks, toks.len());
        }
        assert_eq!(kv.num_cached_blocks(), 2);
        kv.free(1);
        assert_eq!(prefill(&mut kv, 2, &toks), 8);

        let mut off = KvManager::new(8, 4);
        prefill(&mut off, 1, &toks);
        off.free(1);
        assert_eq!(prefill(&mut off, 2, &toks), 0);
        assert_eq!(off.num_cached_blocks(), 0);
    }
}
