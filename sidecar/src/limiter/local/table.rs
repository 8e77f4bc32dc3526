//! One shard's limiter slots: a flat open-addressing table with the slots inline.
//!
//! A slot is 32 bytes (`key id, limit id, until, count`), stored in one array with linear
//! probing, so a lookup usually touches one cache line, where a `HashMap` reads a control
//! byte group and then the entry. The table grows by a quarter when it is 80% full (any
//! capacity, not only powers of two: the bucket is the high half of a 128-bit product), so it
//! stays between 64% and 80% full: 40 to 50 bytes per slot.

/// Which limit of which key. A limit id of 0 marks an empty place; real limit ids are never 0
/// (`limiter::fingerprint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(super) struct SlotId {
    pub key: u64,
    pub limit: u64,
}

/// `until`: the slot is equivalent to a fresh one once `until <= now` (GCRA: the theoretical
/// arrival time; quota: the window end; concurrency: MAX while anything is in flight).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Slot {
    pub until: u64,
    pub count: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Place {
    id: SlotId,
    slot: Slot,
}

#[derive(Debug, Default)]
pub(super) struct SlotTable {
    places: Box<[Place]>,
    len: usize,
}

/// Largest share of places in use before the table grows, as a fraction.
const LOAD_NUM: usize = 4;
const LOAD_DEN: usize = 5;
const MIN_CAPACITY: usize = 16;

fn home(id: SlotId, capacity: usize) -> usize {
    // Key ids are sha256 bytes and limit ids fingerprints, both uniform; one multiply mixes
    // them, and the product's high half picks a place in `0..capacity`.
    let h = (id.key ^ id.limit.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(h) * capacity as u128) >> 64) as usize
}

impl SlotTable {
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.places.len()
    }

    /// Heap bytes of the places.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.places)
    }

    /// The place holding `id`, or the empty place where it would go.
    fn probe(&self, id: SlotId) -> Option<usize> {
        let cap = self.places.len();
        if cap == 0 {
            return None;
        }
        let mut i = home(id, cap);
        // The table is never full (grows at 80%), so an empty place ends every probe.
        loop {
            let p = &self.places[i];
            if p.id == id || p.id.limit == 0 {
                return Some(i);
            }
            i += 1;
            if i == cap {
                i = 0;
            }
        }
    }

    pub fn get(&self, key: u64, limit: u64) -> Option<Slot> {
        let id = SlotId { key, limit };
        self.probe(id)
            .map(|i| &self.places[i])
            .filter(|p| p.id.limit != 0)
            .map(|p| p.slot)
    }

    pub fn get_mut(&mut self, key: u64, limit: u64) -> Option<&mut Slot> {
        let id = SlotId { key, limit };
        let i = self.probe(id)?;
        let p = &mut self.places[i];
        (p.id.limit != 0).then_some(&mut p.slot)
    }

    /// The slot for `(key, limit)`, inserted fresh if absent.
    pub fn entry(&mut self, key: u64, limit: u64) -> &mut Slot {
        let id = SlotId { key, limit };
        debug_assert!(limit != 0, "limit id 0 marks an empty place");
        if let Some(i) = self.probe(id).filter(|&i| self.places[i].id.limit != 0) {
            return &mut self.places[i].slot;
        }
        if (self.len + 1) * LOAD_DEN > self.places.len() * LOAD_NUM {
            let cap = self.places.len();
            self.resize((cap + cap / 4).max(MIN_CAPACITY));
        }
        let i = self.probe(id).unwrap_or_default();
        self.len += 1;
        let p = &mut self.places[i];
        *p = Place {
            id,
            slot: Slot::default(),
        };
        &mut p.slot
    }

    fn resize(&mut self, capacity: usize) {
        let old = std::mem::replace(
            &mut self.places,
            vec![Place::default(); capacity].into_boxed_slice(),
        );
        for p in old.iter().filter(|p| p.id.limit != 0) {
            if let Some(i) = self.probe(p.id) {
                self.places[i] = *p;
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (SlotId, Slot)> + '_ {
        self.places
            .iter()
            .filter(|p| p.id.limit != 0)
            .map(|p| (p.id, p.slot))
    }

    /// Keeps the slots `keep` accepts; when it dropped any, the rest are placed again, in a
    /// table sized for them once it is under a quarter full (so memory goes back after a burst
    /// of keys), else in one of the same size.
    pub fn retain(&mut self, mut keep: impl FnMut(SlotId, Slot) -> bool) -> usize {
        let before = self.len;
        let kept: Vec<Place> = self
            .places
            .iter()
            .filter(|p| p.id.limit != 0 && keep(p.id, p.slot))
            .copied()
            .collect();
        if kept.len() == before {
            return 0;
        }
        let cap = self.places.len();
        let capacity = if kept.is_empty() {
            0
        } else if cap > 64 && cap > 4 * kept.len() {
            (kept.len() * LOAD_DEN / LOAD_NUM + 1).max(MIN_CAPACITY)
        } else {
            cap
        };
        self.places = vec![Place::default(); capacity].into_boxed_slice();
        self.len = kept.len();
        for p in kept {
            if let Some(i) = self.probe(p.id) {
                self.places[i] = p;
            }
        }
        before - self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The table against a `HashMap` through inserts, updates, lookups of absent ids and
    /// evictions, over many growths: the same answers every time.
    #[test]
    fn behaves_like_a_map_through_growth_and_eviction() {
        let mut t = SlotTable::default();
        let mut m: HashMap<SlotId, Slot> = HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20u64 {
            for _ in 0..2_000 {
                let r = next();
                // Few keys and limits, so ids repeat and probes cross each other.
                let id = SlotId {
                    key: r % 3_000,
                    limit: 1 + (r >> 32) % 3,
                };
                let s = t.entry(id.key, id.limit);
                s.count += 1;
                s.until = round;
                let e = m.entry(id).or_default();
                e.count += 1;
                e.until = round;
            }
            assert_eq!(t.len(), m.len());
            assert!(t.len() * 5 <= t.capacity() * 4, "over 80% full");
            for key in 0..3_100u64 {
                for limit in 1..5u64 {
                    let got = t.get(key, limit).map(|s| (s.count, s.until));
                    let want = m.get(&SlotId { key, limit }).map(|s| (s.count, s.until));
                    assert_eq!(got, want, "key {key} limit {limit}");
                }
            }
            let dropped = t.retain(|id, s| (id.key + s.until) % 4 != 0);
            let before = m.len();
            m.retain(|id, s| (id.key + s.until) % 4 != 0);
            assert_eq!(dropped, before - m.len());
            let mut all: Vec<_> = t
                .iter()
                .map(|(id, s)| (id.key, id.limit, s.count))
                .collect();
            let mut want: Vec<_> = m
                .iter()
                .map(|(id, s)| (id.key, id.limit, s.count))
                .collect();
            all.sort_unstable();
            want.sort_unstable();
            assert_eq!(all, want);
        }
        // Emptied, the table gives its memory back.
        t.retain(|_, _| false);
        assert_eq!((t.len(), t.capacity()), (0, 0));
        assert!(t.get(1, 1).is_none());
    }
}
