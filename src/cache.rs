//! LRU block cache for reads that fall through the top layer to its parents.
//!
//! Parents are immutable (opened read-only with a shared lock, never given a writer), so
//! the merged view of `layers[1..]` never changes while mounted and can be cached by
//! virtual block. A read-only chain whose parent another process was writing at open has
//! no cache (`disk.rs`). The cache costs memory only as it fills.
//! The cache is sharded so parallel readers rarely contend on one lock.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;

const SHARDS: usize = 16;

pub struct BlockCache {
    block: u64,
    shards: Vec<Mutex<LruCache<u64, Arc<Vec<u8>>>>>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl BlockCache {
    /// A cache of `capacity_bytes` in blocks of `block` bytes (a power of two, >= 4096).
    /// Returns None when the capacity is zero (caching off).
    pub fn new(capacity_bytes: u64, block: u64) -> Option<Self> {
        let blocks = (capacity_bytes / block) as usize;
        if blocks == 0 {
            return None;
        }
        let per_shard = NonZeroUsize::new(blocks.div_ceil(SHARDS)).unwrap_or(NonZeroUsize::MIN);
        Some(BlockCache {
            block,
            // `sparse`: the table grows as blocks are cached; `new` would allocate it for
            // the whole capacity at once (gigabytes for a large --cache-size).
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::sparse(per_shard)))
                .collect(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    pub fn block_size(&self) -> u64 {
        self.block
    }

    fn shard(&self, index: u64) -> &Mutex<LruCache<u64, Arc<Vec<u8>>>> {
        // Consecutive blocks go to different shards so a sequential reader spreads out.
        &self.shards[(index as usize) % SHARDS]
    }

    pub fn get(&self, index: u64) -> Option<Arc<Vec<u8>>> {
        let got = self
            .shard(index)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&index)
            .cloned();
        if got.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        got
    }

    /// Whether `index` is cached, without touching its recency; a block found absent
    /// counts as a miss (the caller reads it).
    pub fn probe_miss(&self, index: u64) -> bool {
        let present = self
            .shard(index)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&index);
        if !present {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        !present
    }

    pub fn insert(&self, index: u64, data: Arc<Vec<u8>>) {
        self.shard(index)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(index, data);
    }
}
