//! Per-sequence key/value cache with rollback and byte accounting.

/// Keys and values of one sequence for every layer of the model it runs on.
/// Layout per layer: `[position][kv_heads × head_dim]`, so appending a pass
/// is one `extend` and rolling back rejected drafts is one `truncate`.
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
        self.keys.last().map_or(0, |k| k.len() / self.kv_dim)
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
        for layer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            layer.truncate(len * self.kv_dim);
        }
    }

    /// Bytes of keys and values held now.
    pub fn bytes(&self) -> usize {
        self.len() * self.bytes_per_position()
    }

    /// Bytes one more position costs (what a memory budget charges).
    pub fn bytes_per_position(&self) -> usize {
        2 * self.n_layers() * self.kv_dim * std::mem::size_of::<f32>()
    }

    pub(crate) fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        self.keys[layer].extend_from_slice(keys);
        self.values[layer].extend_from_slice(values);
    }

    /// Keys and values of `layer` for positions `0..n`, `kv_dim` per position.
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
        for layer in 0..2 {
            cache.append(layer, &[1.0; 12], &[2.0; 12]);
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.bytes_per_position(), 2 * 2 * 4 * 4);
        assert_eq!(cache.bytes(), 3 * 64);
        cache.truncate(1);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), 64);
        assert_eq!(cache.layer(1).0.len(), 4);
        cache.truncate(10);
        assert_eq!(cache.len(), 1);
    }
}
