//! Per-sequence key/value cache with rollback and byte accounting.

use crate::kernels::KEY_BLOCK;

/// Keys and values of one sequence for every layer of the model it runs on.
/// Values per layer: `[position][kv_heads × head_dim]`. Keys per layer: in
/// blocks of [`KEY_BLOCK`] positions, transposed (`[block][kv_dim][16]`),
/// which is what the attention kernel reads sixteen positions at a time
/// (see `kernels::attention`). Rolling back rejected drafts truncates both;
/// positions past the length in the last key block are stale and never read.
#[derive(Clone, Debug)]
pub struct KvCache {
    kv_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    /// An empty cache for `n_layers` layers of `kv_dim` (= kv heads × head
    /// dim) values per position.
    pub fn new(n_layers: usize, kv_dim: usize) -> Self {
        KvCache { kv_dim, keys: vec![Vec::new(); n_layers], values: vec![Vec::new(); n_layers] }
    }

    /// Positions held (the same in every layer between forward passes).
    pub fn len(&self) -> usize {
        self.values.last().map_or(0, |v| v.len() / self.kv_dim)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn n_layers(&self) -> usize {
        self.keys.len()
    }

    /// Drops every position at or after `len` (rollback of rejected drafts).
    /// A `len` past the end is a no-op.
    pub fn truncate(&mut self, len: usize) {
        let blocks = len.div_ceil(KEY_BLOCK);
        for (keys, values) in self.keys.iter_mut().zip(self.values.iter_mut()) {
            keys.truncate(blocks * KEY_BLOCK * self.kv_dim);
            values.truncate(len * self.kv_dim);
        }
    }

    /// Bytes of keys and values held now.
    pub fn bytes(&self) -> usize {
        self.len() * self.bytes_per_position()
    }

    /// Bytes one more position costs (what a memory budget charges; the
    /// up to fifteen key slots a partial block holds beyond it are not).
    pub fn bytes_per_position(&self) -> usize {
        2 * self.n_layers() * self.kv_dim * std::mem::size_of::<f32>()
    }

    pub(crate) fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        let d = self.kv_dim;
        let start = self.values[layer].len() / d;
        let blocked = &mut self.keys[layer];
        blocked.resize((start + keys.len() / d).div_ceil(KEY_BLOCK) * KEY_BLOCK * d, 0.0);
        for (j, key) in (start..).zip(keys.chunks_exact(d)) {
            let block = &mut blocked[j / KEY_BLOCK * KEY_BLOCK * d..][..KEY_BLOCK * d];
            for (e, &v) in key.iter().enumerate() {
                block[e * KEY_BLOCK + j % KEY_BLOCK] = v;
            }
        }
        self.values[layer].extend_from_slice(values);
    }

    /// Keys (transposed blocks) and values (row-major) of `layer`.
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_rolls_back_and_bytes_follow() {
        let mut cache = KvCache::new(2, 4);
        let keys: Vec<f32> = (0..12).map(|i| i as f32).collect();
        for layer in 0..2 {
            cache.append(layer, &keys, &[2.0; 12]);
        }
        // Element e of position j sits at 16e + j in the first block.
        assert_eq!(cache.layer(0).0[16 * 3 + 2], keys[2 * 4 + 3]);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.bytes_per_position(), 2 * 2 * 4 * 4);
        assert_eq!(cache.bytes(), 3 * 64);
        cache.truncate(1);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), 64);
        assert_eq!((cache.layer(1).0.len(), cache.layer(1).1.len()), (KEY_BLOCK * 4, 4));
        for layer in 0..2 {
            cache.append(layer, &[7.0; 4], &[7.0; 4]);
        }
        assert_eq!(cache.layer(1).0[16 + 1], 7.0, "a re-appended position overwrites the stale slot");
        cache.truncate(10);
        assert_eq!(cache.len(), 2);
    }
}
