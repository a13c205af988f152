//! A value shared by reference among every row that carries it (a [`super::Cgroup`], a
//! [`super::Pod`]): flows are keyed by it, so it is compared, hashed and ordered by its key alone,
//! with the key's hash computed once and the same allocation equal without reading the key.

use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

/// What a shared value is compared, hashed and ordered by.
pub trait Keyed {
    type Key: ?Sized + Eq + Ord + Hash;
    fn key(&self) -> &Self::Key;
}

/// One allocation of `T` and its key's hash, shared by every row that carries it.
pub struct Shared<T>(Arc<(T, u64)>);

impl<T: Keyed> Shared<T> {
    pub fn new(value: T) -> Self {
        let mut h = rustc_hash::FxHasher::default();
        value.key().hash(&mut h);
        let hash = h.finish();
        Shared(Arc::new((value, hash)))
    }

    /// The same allocation (rows read back share one per distinct value).
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The allocation's address: equal for two handles exactly when [`Self::ptr_eq`].
    pub fn addr(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0 .0
    }
}

impl<T: Keyed> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        self.ptr_eq(other) || self.key() == other.key()
    }
}

impl<T: Keyed> Eq for Shared<T> {}

impl<T: Keyed> Hash for Shared<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Equal keys have equal hashes: consistent with `Eq`.
        state.write_u64(self.0 .1);
    }
}

impl<T: Keyed> PartialOrd for Shared<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<T: Keyed> Ord for Shared<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if self.ptr_eq(other) {
            return std::cmp::Ordering::Equal;
        }
        self.key().cmp(other.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value keyed by its first field only.
    struct ByName(&'static str, u32);

    impl Keyed for ByName {
        type Key = str;
        fn key(&self) -> &str {
            self.0
        }
    }

    #[test]
    fn equal_keys_are_equal_hash_alike_and_order_by_key_whatever_the_allocation() {
        let hash = |v: &Shared<ByName>| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            v.hash(&mut h);
            h.finish()
        };
        let a = Shared::new(ByName("a", 1));
        let a2 = Shared::new(ByName("a", 2));
        let b = Shared::new(ByName("b", 1));
        assert!(a == a2 && !a.ptr_eq(&a2));
        assert_eq!(hash(&a), hash(&a2));
        assert!(a != b && a < b);
        let same = a.clone();
        assert!(same.ptr_eq(&a) && same == a && same.cmp(&a).is_eq());
        assert_eq!((a.1, a2.1), (1, 2));
    }
}
