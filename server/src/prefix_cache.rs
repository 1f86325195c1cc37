//! Which prompts the server keeps the KV cache of after their prefill (and
//! finished sessions' prompts with their answers), so that a later session
//! of the same tenant whose prompt starts the same way (a chat template's
//! system turn, a shared document, the next turn of a chat, a generation
//! resumed after a hand-off or a restart) copies those positions instead
//! of computing them again: vLLM's automatic prefix caching, kept per prompt
//! rather than per block. The copy gives the bits the session's own
//! prefill would have (every kernel computes a position the same way
//! whatever the pass; `model/tests/kv_cache.rs` checks it), so output
//! stays lossless.
//!
//! This is the bookkeeping only: which prompts are held, under a capacity
//! in positions, least recently used out first. The engine holds the
//! caches by entry id.

/// Fewest positions worth reusing (one key block): below it, a shared
/// BOS or chat-template opening saves less than the copy and the lookup.
pub const MIN_REUSE: usize = 16;

/// An entry id: the engine's key for the cache it holds.
pub type EntryId = u64;

#[derive(Debug)]
pub struct PrefixIndex {
    /// Positions all entries together may hold.
    capacity: usize,
    held: usize,
    entries: Vec<Entry>,
    next_id: EntryId,
    /// Counts lookups and insertions: the recency order.
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    id: EntryId,
    /// Only sessions of this tenant reuse it: another tenant could
    /// otherwise learn from its time to first token whether a prompt it
    /// guesses was sent.
    tenant: String,
    tokens: Vec<u32>,
    last_used: u64,
}

/// Positions of a held prompt a new session can copy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reuse {
    pub entry: EntryId,
    pub positions: usize,
}

/// A prompt taken in: its entry, and the entries it replaced (the engine
/// drops their caches).
#[derive(Debug, PartialEq)]
pub struct Inserted {
    pub entry: EntryId,
    pub evicted: Vec<EntryId>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixIndex {
    /// An index holding at most `capacity` positions (0: none, reuse off).
    pub fn new(capacity: usize) -> Self {
        PrefixIndex { capacity, held: 0, entries: Vec::new(), next_id: 0, clock: 0 }
    }

    pub fn held_positions(&self) -> usize {
        self.held
    }

    /// The longest start of `prompt` an entry of `tenant` holds, cut to
    /// `limit` positions, when that is at least [`MIN_REUSE`]; that entry
    /// counts as just used.
    pub fn lookup(&mut self, tenant: &str, prompt: &[u32], limit: usize) -> Option<Reuse> {
        let (at, shared) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.tenant == tenant)
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(_, shared)| shared)?;
        if shared < MIN_REUSE {
            return None;
        }
        self.clock += 1;
        let entry = &mut self.entries[at];
        entry.last_used = self.clock;
        Some(Reuse { entry: entry.id, positions: shared })
    }

    /// Takes in `prompt`, whose cache a session of `tenant` just finished
    /// computing, unless it is shorter than [`MIN_REUSE`], longer than the
    /// capacity, or an entry already starts with it (that entry then counts
    /// as just used). Entries it starts with are replaced by it, and the
    /// least recently used make room.
    pub fn insert(&mut self, tenant: &str, prompt: &[u32]) -> Option<Inserted> {
        if prompt.len() < MIN_REUSE || prompt.len() > self.capacity {
            return None;
        }
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.tenant == tenant && e.tokens.starts_with(prompt)) {
            e.last_used = self.clock;
            return None;
        }
        let mut evicted = Vec::new();
        let mut keep = |e: &Entry, held: &mut usize| {
            let subsumed = e.tenant == tenant && prompt.starts_with(&e.tokens);
            if subsumed {
                evicted.push(e.id);
                *held -= e.tokens.len();
            }
            !subsumed
        };
        let mut held = self.held;
        self.entries.retain(|e| keep(e, &mut held));
        while held + prompt.len() > self.capacity {
            let oldest = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used).expect("held positions belong to entries");
            let e = self.entries.swap_remove(oldest);
            held -= e.tokens.len();
            evicted.push(e.id);
        }
        let entry = self.next_id;
        self.next_id += 1;
        self.entries.push(Entry { id: entry, tenant: tenant.to_string(), tokens: prompt.to_vec(), last_used: self.clock });
        self.held = held + prompt.len();
        Some(Inserted { entry, evicted })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(shared: usize, then: &[u32]) -> Vec<u32> {
        (1000..1000 + shared as u32).chain(then.iter().copied()).collect()
    }

    #[test]
    fn a_prompt_reuses_the_longest_held_start_of_its_own_tenant() {
        let mut index = PrefixIndex::new(1000);
        let a = index.insert("t", &prompt(20, &[1, 2, 3])).unwrap();
        let b = index.insert("t", &prompt(30, &[7])).unwrap();
        assert_eq!((a.evicted.len(), b.evicted.len()), (0, 0));
        // Shares 20 with a, 22 with b (the first 20 and two more of b's).
        let asking = prompt(22, &[5, 5]);
        assert_eq!(index.lookup("t", &asking, usize::MAX), Some(Reuse { entry: b.entry, positions: 22 }));
        // Cut to the limit (the engine keeps one token to compute).
        assert_eq!(index.lookup("t", &asking, 21), Some(Reuse { entry: b.entry, positions: 21 }));
        assert_eq!(index.lookup("t", &asking, MIN_REUSE - 1), None);
        assert_eq!(index.lookup("other tenant", &asking, usize::MAX), None);
        assert_eq!(index.lookup("t", &[9; 40], usize::MAX), None);
        assert_eq!(index.held_positions(), 23 + 31);
    }

    #[test]
    fn short_covered_and_oversized_prompts_are_not_taken_in() {
        let mut index = PrefixIndex::new(100);
        assert_eq!(index.insert("t", &prompt(MIN_REUSE - 1, &[])), None);
        assert_eq!(index.insert("t", &prompt(101, &[])), None);
        let long = index.insert("t", &prompt(40, &[])).unwrap();
        // A start of a held prompt adds nothing.
        assert_eq!(index.insert("t", &prompt(30, &[])), None);
        // Its extension replaces it.
        let longer = index.insert("t", &prompt(50, &[])).unwrap();
        assert_eq!(longer.evicted, vec![long.entry]);
        assert_eq!(index.held_positions(), 50);
        // Nothing is held with capacity 0.
        assert_eq!(PrefixIndex::new(0).insert("t", &prompt(20, &[])), None);
    }

    #[test]
    fn the_least_recently_used_make_room() {
        let mut index = PrefixIndex::new(100);
        let a = index.insert("t", &prompt(20, &[1; 20])).unwrap().entry;
        let b = index.insert("t", &prompt(20, &[2; 20])).unwrap().entry;
        // a used since b came in: b is the oldest.
        assert!(index.lookup("t", &prompt(20, &[1; 20]), usize::MAX).is_some());
        let c = index.insert("t", &prompt(20, &[3; 20])).unwrap();
        assert_eq!(c.evicted, vec![b]);
        // Another tenant's prompt takes room from everyone's.
        let d = index.insert("u", &prompt(60, &[])).unwrap();
        assert_eq!(d.evicted, vec![a]);
        assert_eq!(index.held_positions(), 100);
    }
}
