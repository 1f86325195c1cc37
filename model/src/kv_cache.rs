//! Per-sequence key/value cache with rollback and byte accounting.

use crate::kernels::KEY_BLOCK;
use half::{f16, slice::HalfFloatSliceExt};

/// Keys and values of one sequence for every layer of the model it runs on,
/// in half precision (see `kernels::attention`), one pair of arrays per
/// (layer, kv head) so attention streams each head's memory contiguously.
/// Values: `[position][head_dim]`. Keys: in blocks of [`KEY_BLOCK`]
/// positions, transposed (`[block][head_dim][16]`), which is what the
/// attention kernel reads sixteen positions at a time. Rolling back rejected
/// drafts truncates both; positions past the length in the last key block
/// are stale and never read.
#[derive(Clone, Debug)]
pub struct KvCache {
    n_kv_heads: usize,
    head_dim: usize,
    /// Index `layer · n_kv_heads + head`.
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
}

impl KvCache {
    /// An empty cache for `n_layers` layers of `n_kv_heads` heads of
    /// `head_dim` values per position.
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        let heads = n_layers * n_kv_heads;
        KvCache { n_kv_heads, head_dim, keys: vec![Vec::new(); heads], values: vec![Vec::new(); heads] }
    }

    /// Positions held (the same in every layer between forward passes).
    pub fn len(&self) -> usize {
        self.values.last().map_or(0, |v| v.len() / self.head_dim)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn n_layers(&self) -> usize {
        self.keys.len() / self.n_kv_heads
    }

    /// Drops every position at or after `len` (rollback of rejected drafts).
    /// A `len` past the end is a no-op.
    pub fn truncate(&mut self, len: usize) {
        let blocks = len.div_ceil(KEY_BLOCK);
        for (keys, values) in self.keys.iter_mut().zip(self.values.iter_mut()) {
            keys.truncate(blocks * KEY_BLOCK * self.head_dim);
            values.truncate(len * self.head_dim);
        }
    }

    /// Makes room for `positions` more positions without reallocating: a
    /// forward pass that appends within it copies nothing (growing the
    /// per-head arrays inside a pass copies the whole cache, about a
    /// millisecond for a few hundred positions here).
    pub fn reserve(&mut self, positions: usize) {
        let len = self.len() + positions;
        let key_slots = len.div_ceil(KEY_BLOCK) * KEY_BLOCK * self.head_dim;
        for (keys, values) in self.keys.iter_mut().zip(self.values.iter_mut()) {
            keys.reserve(key_slots.saturating_sub(keys.len()));
            values.reserve(len * self.head_dim - values.len());
        }
    }

    /// Copies the first `len` positions of `other` (a cache of the same
    /// shape) into this empty one, into the room [`Self::reserve`] made:
    /// a prompt's prefix computed for one sequence, reused by another
    /// (the server's prefix cache). Positions are computed the same way
    /// whatever the pass they ran in (see `kernels`), so the copy is what
    /// the sequence's own prefill would have written.
    pub fn extend_from_prefix(&mut self, other: &KvCache, len: usize) {
        assert!(self.is_empty() && len <= other.len(), "extend_from_prefix: an empty cache and at most the source's positions");
        assert!(
            (self.n_kv_heads, self.head_dim, self.keys.len()) == (other.n_kv_heads, other.head_dim, other.keys.len()),
            "extend_from_prefix: caches of different shapes"
        );
        let key_slots = len.div_ceil(KEY_BLOCK) * KEY_BLOCK * self.head_dim;
        for i in 0..self.keys.len() {
            self.keys[i].extend_from_slice(&other.keys[i][..key_slots]);
            self.values[i].extend_from_slice(&other.values[i][..len * self.head_dim]);
        }
    }

    /// Bytes of keys and values held now.
    pub fn bytes(&self) -> usize {
        self.len() * self.bytes_per_position()
    }

    /// Bytes one more position costs (what a memory budget charges; the
    /// up to fifteen key slots a partial block holds beyond it are not).
    pub fn bytes_per_position(&self) -> usize {
        2 * self.keys.len() * self.head_dim * std::mem::size_of::<f16>()
    }

    /// Appends the keys and values of new positions to `layer`: rows of
    /// `kv_dim` (every head's `head_dim` values side by side).
    pub(crate) fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        let (hd, kv_dim) = (self.head_dim, self.kv_dim());
        let n = keys.len() / kv_dim;
        // One vectorized conversion (F16C where present; round to nearest
        // even either way), then the scatter by head.
        let mut half = vec![f16::ZERO; 2 * keys.len()];
        let (hk, hv) = half.split_at_mut(keys.len());
        hk.convert_from_f32_slice(keys);
        hv.convert_from_f32_slice(values);
        for g in 0..self.n_kv_heads {
            let i = layer * self.n_kv_heads + g;
            let start = self.values[i].len() / hd;
            let blocked = &mut self.keys[i];
            blocked.resize((start + n).div_ceil(KEY_BLOCK) * KEY_BLOCK * hd, f16::ZERO);
            for (j, key) in (start..).zip(hk.chunks_exact(kv_dim)) {
                let block = &mut blocked[j / KEY_BLOCK * KEY_BLOCK * hd..][..KEY_BLOCK * hd];
                for (e, &v) in key[g * hd..(g + 1) * hd].iter().enumerate() {
                    block[e * KEY_BLOCK + j % KEY_BLOCK] = v;
                }
            }
            for v in hv.chunks_exact(kv_dim) {
                self.values[i].extend_from_slice(&v[g * hd..(g + 1) * hd]);
            }
        }
    }

    /// Keys (transposed blocks) and values (row-major) of kv head `head` of
    /// `layer`.
    pub(crate) fn head(&self, layer: usize, head: usize) -> (&[f16], &[f16]) {
        let i = layer * self.n_kv_heads + head;
        (&self.keys[i], &self.values[i])
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_rolls_back_and_bytes_follow() {
        let mut cache = KvCache::new(2, 2, 2);
        let keys: Vec<f32> = (0..12).map(|i| i as f32).collect();
        for layer in 0..2 {
            cache.append(layer, &keys, &[2.0; 12]);
        }
        // Element e of head 1 of position j sits at 16e + j in its first
        // block; its value at 2j + e.
        assert_eq!(cache.head(0, 1).0[16 + 2].to_f32(), keys[2 * 4 + 2 + 1]);
        assert_eq!(cache.head(0, 1).1[2 * 2 + 1].to_f32(), 2.0);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.bytes_per_position(), 2 * 2 * 4 * 2);
        assert_eq!(cache.bytes(), 3 * 32);
        cache.truncate(1);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), 32);
        assert_eq!((cache.head(1, 0).0.len(), cache.head(1, 0).1.len()), (KEY_BLOCK * 2, 2));
        for layer in 0..2 {
            cache.append(layer, &[7.0; 4], &[7.0; 4]);
        }
        assert_eq!(cache.head(1, 0).0[1].to_f32(), 7.0, "a re-appended position overwrites the stale slot");
        cache.truncate(10);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn reserved_positions_are_appended_without_moving_the_arrays() {
        let mut cache = KvCache::new(2, 2, 2);
        cache.reserve(40);
        let arrays = |c: &KvCache| -> Vec<_> { (0..4).map(|i| c.head(i / 2, i % 2)).map(|(k, v)| (k.as_ptr(), v.as_ptr())).collect() };
        let before = arrays(&cache);
        for _ in 0..40 {
            for layer in 0..2 {
                cache.append(layer, &[1.0; 4], &[2.0; 4]);
            }
        }
        let after = arrays(&cache);
        assert_eq!(before, after);
        assert_eq!(cache.len(), 40);
        // Rolling back keeps the room.
        cache.truncate(3);
        cache.reserve(37);
        assert_eq!(cache.head(1, 1).1.as_ptr(), after[3].1);
    }
}
