//! KV cache memory budget. A session reserves the most its cache can grow
//! to at admission, so a running session never hits an allocation failure;
//! the reservation returns to the budget when its lease is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Clone)]
pub struct KvBudget {
    inner: Arc<BudgetInner>,
}

struct BudgetInner {
    capacity: usize,
    reserved: AtomicUsize,
}

/// Bytes held for one session; freed on drop (a vanished client cannot leak them).
pub struct KvLease {
    budget: Arc<BudgetInner>,
    bytes: usize,
}

impl KvBudget {
    pub fn new(capacity_bytes: usize) -> Self {
        KvBudget { inner: Arc::new(BudgetInner { capacity: capacity_bytes, reserved: AtomicUsize::new(0) }) }
    }

    /// Reserves `bytes`, or None when they do not fit.
    pub fn try_reserve(&self, bytes: usize) -> Option<KvLease> {
        let mut current = self.inner.reserved.load(Ordering::Relaxed);
        loop {
            let next = current.checked_add(bytes).filter(|&n| n <= self.inner.capacity)?;
            match self.inner.reserved.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(KvLease { budget: self.inner.clone(), bytes }),
                Err(actual) => current = actual,
            }
        }
    }

    pub fn reserved(&self) -> usize {
        self.inner.reserved.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }
}

impl KvLease {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for KvLease {
    fn drop(&mut self) {
        self.budget.reserved.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_free_on_drop_and_refuse_overflow() {
        let budget = KvBudget::new(100);
        let a = budget.try_reserve(60).unwrap();
        assert!(budget.try_reserve(50).is_none());
        let b = budget.try_reserve(40).unwrap();
        assert_eq!(budget.reserved(), 100);
        drop(a);
        assert_eq!(budget.reserved(), 40);
        drop(b);
        assert_eq!(budget.reserved(), 0);
        assert!(budget.try_reserve(101).is_none());
    }
}
