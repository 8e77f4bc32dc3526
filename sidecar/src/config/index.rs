//! The key index: every key of a config in one compact, immutable table, and the streaming
//! parse that fills it without holding the document's key list as owned values.
//!
//! Layout (about 28 bytes per key plus its name, against ~480 for the `HashMap` of owned
//! entries it replaces): entries of 28 bytes sorted by key id; a directory of `u32` start
//! offsets, one per bucket of the id's top bits (8 to 16 keys per bucket, so the directory
//! is a quarter of a byte per key and stays in cache); all names in one shared byte buffer;
//! limit sets in a small `Vec`, where index 0 is the policy defaults and each distinct
//! override set is compiled once however many keys use it. A lookup reads one directory slot,
//! guesses the entry's place in its bucket from the id's next bits and steps to it.
//!
//! Only the first [`HASH_LEN`] = 16 bytes of each key hash are kept. Matching a presented key
//! to an entry then needs a 128-bit second preimage of SHA-256 / HMAC-SHA256 (2^128 work per
//! target, 2^108 against a million targets), the strength truncated HMAC-SHA256 is specified
//! at. Two entries of one document can only clash in those bytes if they clash in the first
//! 8, the key id, and those are already skipped and reported (`id_collision`).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use keylimit_dataplane::{self as dp, KeyEntry};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::limiter::{LimitSet, POLICY_SCOPE_ID};

/// Bytes of each key hash kept in the index (see the module docs for why 16 are enough).
pub const HASH_LEN: usize = 16;

/// The first 8 bytes of the key's hash: the id its limiter state is stored under.
pub fn key_id(hash: &[u8; 32]) -> u64 {
    id_of(&hash[..8])
}

fn id_of(b: &[u8]) -> u64 {
    let mut id = [0u8; 8];
    id.copy_from_slice(&b[..8]);
    u64::from_le_bytes(id)
}

/// One key, 28 bytes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    hash: [u8; HASH_LEN],
    name_off: u32,
    /// 0: never expires; otherwise Unix seconds clamped to `1..=u32::MAX`. Both ends of the
    /// clamp keep every decision between 1970 and 2106 the same as the full value.
    expires: u32,
    /// Into [`KeyIndex::sets`]; 0 is the policy defaults.
    limits: u16,
    name_len: u8,
    /// [`DISABLED`], [`PREVIOUS`] and [`REMAPPED`] bits.
    flags: u8,
}

/// The key is disabled.
const DISABLED: u8 = 1;
/// The entry is a rotated-out key in its overlap, served as its ApiKey.
const PREVIOUS: u8 = 2;
/// The entry's limiter state lives under another id ([`KeyIndex::rotated`]): the previous key
/// of a rotation counts as its key, and a rotated key keeps the counters of the key it
/// replaced.
const REMAPPED: u8 = 4;

impl Entry {
    fn id(&self) -> u64 {
        id_of(&self.hash)
    }

    fn is_previous(&self) -> bool {
        self.flags & PREVIOUS != 0
    }
}

/// One key as the request path needs it: a view into the index.
#[derive(Debug, Clone, Copy)]
pub struct KeyPolicy<'a> {
    pub id: u64,
    pub disabled: bool,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
    pub limits: &'a LimitSet,
    names: &'a Bytes,
    name: (u32, u8),
}

impl<'a> KeyPolicy<'a> {
    /// The ApiKey's name.
    pub fn name(&self) -> &'a str {
        // Names are copied in from `str`s whole, so this never fails.
        std::str::from_utf8(self.name_bytes()).unwrap_or_default()
    }

    fn name_bytes(&self) -> &'a [u8] {
        let (off, len) = (self.name.0 as usize, usize::from(self.name.1));
        self.names.get(off..off + len).unwrap_or_default()
    }

    /// The name as a header value (a slice of the shared name buffer, no copy); `None` if the
    /// name cannot be one.
    pub fn identity(&self) -> Option<HeaderValue> {
        let (off, len) = (self.name.0 as usize, usize::from(self.name.1));
        if off + len > self.names.len() {
            return None;
        }
        HeaderValue::from_maybe_shared(self.names.slice(off..off + len)).ok()
    }
}

/// Immutable map from key hash to key policy. Only keys in here ever get limiter state, so
/// spraying random keys costs a hash and a failed lookup, never memory.
///
/// Two entries with one id would share limiter state, so the later one (in document order) is
/// skipped and reported, like a duplicate or malformed entry: one bad entry never costs the
/// other keys their config. (Choosing a key whose id equals a given victim's means a 64-bit
/// second preimage of sha256; a collision between two keys one author controls only hurts
/// that author.)
pub struct KeyIndex {
    /// Sorted by id.
    entries: Box<[Entry]>,
    /// `dir[b]..dir[b + 1]`: the entries whose id's top `bits` bits are `b`.
    dir: Box<[u32]>,
    bits: u32,
    names: Bytes,
    sets: Vec<Arc<LimitSet>>,
    skipped: Vec<SkippedKey>,
    /// Entries whose limiter state lives under another id, with that id, sorted by entry id.
    /// Kept apart from `entries` so that the lookup of every other key never looks at a
    /// remap: checking a flag on every lookup cost 3.5 ns per decision (criterion A/B).
    rotated: Box<[(Entry, u64)]>,
    /// (state id, the current key's own id), sorted: `by_id` for remapped keys.
    owners: IdPairs,
    previous_keys: usize,
}

impl std::fmt::Debug for KeyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyIndex")
            .field("keys", &self.len())
            .field("limit_sets", &self.sets.len())
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyTable::default().into_index(Arc::new(LimitSet::default()), &dp::Limits::default())
    }
}

/// A key entry left out of the index, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedKey {
    pub name: String,
    pub reason: &'static str,
}

impl KeyIndex {
    pub fn build(keys: &[KeyEntry], defaults: &Arc<LimitSet>, base: &dp::Limits) -> Self {
        KeyTable::from_entries(keys).into_index(defaults.clone(), base)
    }

    fn bucket(&self, id: u64) -> usize {
        // Two shifts, so 0 bits (one bucket) does not shift by 64.
        ((id >> 1) >> (63 - self.bits)) as usize
    }

    fn find(&self, id: u64) -> Option<&Entry> {
        let b = self.bucket(id);
        let (lo, hi) = (*self.dir.get(b)? as usize, *self.dir.get(b + 1)? as usize);
        let bucket = self.entries.get(lo..hi)?;
        // Ids are uniform, so the id's next 32 bits below the bucket's say where in the
        // bucket it sits; the scan from there is a step or two, usually in one cache line.
        let frac = ((id << self.bits) >> 32) as usize;
        let guess = (frac * bucket.len()) >> 32;
        let (before, from) = bucket.split_at(guess.min(bucket.len()));
        match from.first() {
            Some(e) if e.id() <= id => from
                .iter()
                .take_while(|e| e.id() <= id)
                .find(|e| e.id() == id),
            _ => before
                .iter()
                .rev()
                .take_while(|e| e.id() >= id)
                .find(|e| e.id() == id),
        }
    }

    fn find_rotated(&self, id: u64) -> Option<&(Entry, u64)> {
        let i = self
            .rotated
            .binary_search_by_key(&id, |(e, _)| e.id())
            .ok()?;
        self.rotated.get(i)
    }

    /// The lookup of a key in a rotation: only reached when the main table has no entry.
    #[cold]
    fn lookup_rotated(&self, id: u64, hash: &[u8; 32]) -> Option<KeyPolicy<'_>> {
        self.find_rotated(id)
            .filter(|(e, _)| e.hash[..] == hash[..HASH_LEN])
            .map(|(e, state)| self.view(e, *state))
    }

    /// The request path's view of `e`, whose limiter state lives under `id`.
    fn view<'a>(&'a self, e: &Entry, id: u64) -> KeyPolicy<'a> {
        KeyPolicy {
            id,
            disabled: e.flags & DISABLED != 0,
            expires_at: (e.expires != 0).then_some(i64::from(e.expires)),
            limits: self
                .sets
                .get(usize::from(e.limits))
                .or_else(|| self.sets.first())
                .map_or(&EMPTY, |s| &**s),
            names: &self.names,
            name: (e.name_off, e.name_len),
        }
    }

    pub fn lookup(&self, hash: &[u8; 32]) -> Option<KeyPolicy<'_>> {
        let id = key_id(hash);
        match self.find(id) {
            Some(e) => (e.hash[..] == hash[..HASH_LEN]).then(|| self.view(e, id)),
            None if self.rotated.is_empty() => None,
            None => self.lookup_rotated(id, hash),
        }
    }

    /// The key whose limiter state is stored under `id` (a current key, never a previous one).
    pub fn by_id(&self, id: u64) -> Option<KeyPolicy<'_>> {
        if let Ok(i) = self.owners.binary_search_by_key(&id, |&(state, _)| state) {
            let own = self.owners.get(i)?.1;
            return self
                .find_rotated(own)
                .map(|(e, state)| self.view(e, *state));
        }
        self.find(id)
            .filter(|e| e.flags & PREVIOUS == 0)
            .map(|e| self.view(e, id))
    }

    /// Previous keys of rotations in their overlap.
    pub fn previous_keys(&self) -> usize {
        self.previous_keys
    }

    /// Keys in the index (a rotation's previous key is not another key).
    pub fn len(&self) -> usize {
        self.entries.len() + self.rotated.len() - self.previous_keys
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries of the document that are not in the index.
    pub fn skipped(&self) -> &[SkippedKey] {
        &self.skipped
    }

    /// Distinct limit sets the keys use: the defaults plus one per distinct override.
    pub fn limit_sets(&self) -> usize {
        self.sets.len()
    }

    /// Heap bytes of the index: entries, directory and names (limit sets and skipped entries
    /// are small and not counted).
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.entries)
            + std::mem::size_of_val(&*self.rotated)
            + std::mem::size_of_val(&*self.dir)
            + self.names.len()
    }
}

static EMPTY: LimitSet = LimitSet {
    rates: Vec::new(),
    quotas: Vec::new(),
    concurrency: None,
    counts_tokens: false,
};

/// Keys as parsed, before the policy's limits are known: filled entry by entry from the
/// document and its shards, then turned into a [`KeyIndex`].
#[derive(Debug, Default)]
pub struct KeyTable {
    entries: Vec<Entry>,
    names: Vec<u8>,
    /// Distinct overrides, keyed by their JSON form; an entry's `limits` is 1 + the position.
    overrides: Vec<dp::Limits>,
    override_ids: HashMap<String, u16>,
    skipped: Vec<SkippedKey>,
    /// Previous-key entries pushed.
    previous_keys: usize,
    /// (a key's `name_off`, the id its counters live under) for keys that name a counter.
    counters: Vec<(u32, u64)>,
}

/// One key entry's fields as [`KeyTable::push`] takes them, from an owned or borrowed entry.
struct KeyFields<'k> {
    name: &'k str,
    sha256: &'k str,
    disabled: bool,
    expires_at: Option<i64>,
    overrides: Option<&'k dp::Limits>,
    previous: Option<&'k dp::PreviousKey>,
    counter: Option<&'k str>,
}

/// A key entry borrowed from the document's bytes where it can be.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyEntryRef<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    sha256: Cow<'a, str>,
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    expires_at: Option<i64>,
    #[serde(default)]
    overrides: Option<dp::Limits>,
    #[serde(default)]
    previous: Option<dp::PreviousKey>,
    #[serde(default, borrow)]
    counter: Option<Cow<'a, str>>,
}

impl KeyTable {
    pub fn with_capacity(keys: usize) -> Self {
        KeyTable {
            entries: Vec::with_capacity(keys),
            names: Vec::with_capacity(keys.saturating_mul(12)),
            ..KeyTable::default()
        }
    }

    pub fn from_entries(keys: &[KeyEntry]) -> Self {
        let mut t = KeyTable::with_capacity(keys.len());
        for k in keys {
            t.push(KeyFields {
                name: &k.name,
                sha256: &k.sha256,
                disabled: k.disabled,
                expires_at: k.expires_at,
                overrides: k.overrides.as_ref(),
                previous: k.previous.as_ref(),
                counter: k.counter.as_deref(),
            });
        }
        t
    }

    /// Keys parsed so far (a rotation's previous key is not another key).
    pub fn len(&self) -> usize {
        self.entries.len() - self.previous_keys
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn skip(&mut self, name: &str, reason: &'static str) {
        self.skipped.push(SkippedKey {
            name: name.to_string(),
            reason,
        });
    }

    fn push(&mut self, key: KeyFields<'_>) {
        let KeyFields {
            name,
            sha256,
            disabled,
            expires_at,
            overrides,
            previous,
            counter,
        } = key;
        let mut hash = [0u8; 32];
        // Decoding once here keeps hex off the request path; a wrong length fails it too.
        let mut counter_hash = [0u8; 32];
        let valid = hex::decode_to_slice(sha256, &mut hash).is_ok()
            && counter.is_none_or(|c| hex::decode_to_slice(c, &mut counter_hash).is_ok())
            && overrides.is_none_or(|o| {
                dp::validate_key(&KeyEntry {
                    name: name.to_string(),
                    sha256: sha256.to_string(),
                    disabled,
                    expires_at,
                    overrides: Some(o.clone()),
                    previous: None,
                    counter: None,
                })
                .is_ok()
            });
        // ApiKey names are DNS names of at most 253 bytes: a longer one is not a real key.
        let (Ok(name_len), true, Ok(name_off)) = (
            u8::try_from(name.len()),
            valid,
            u32::try_from(self.names.len()),
        ) else {
            return self.skip(name, "invalid");
        };
        if key_id(&hash) == POLICY_SCOPE_ID {
            return self.skip(name, "reserved_id");
        }
        let limits = match overrides {
            None => 0,
            Some(o) => {
                let json = serde_json::to_string(o).unwrap_or_default();
                match self.override_ids.get(&json) {
                    Some(&i) => i,
                    None => {
                        let Ok(i) = u16::try_from(self.overrides.len() + 1) else {
                            return self.skip(name, "too_many_override_sets");
                        };
                        self.overrides.push(o.clone());
                        self.override_ids.insert(json, i);
                        i
                    }
                }
            }
        };
        let mut prefix = [0u8; HASH_LEN];
        prefix.copy_from_slice(&hash[..HASH_LEN]);
        self.names.extend_from_slice(name.as_bytes());
        let entry = Entry {
            hash: prefix,
            name_off,
            expires: clamp_expiry(expires_at),
            limits,
            name_len,
            flags: if disabled { DISABLED } else { 0 },
        };
        self.entries.push(entry);
        if counter.is_some() {
            self.counters.push((name_off, key_id(&counter_hash)));
        }
        let Some(p) = previous else { return };
        // The previous key: same name, limits and flags, its own hash, and refused after the
        // earlier of the overlap's end and the key's own expiry.
        let mut hash = [0u8; 32];
        if hex::decode_to_slice(&p.sha256, &mut hash).is_err() {
            return self.skip(name, "invalid_previous");
        }
        if key_id(&hash) == POLICY_SCOPE_ID {
            return self.skip(name, "reserved_id");
        }
        let mut prefix = [0u8; HASH_LEN];
        prefix.copy_from_slice(&hash[..HASH_LEN]);
        let until = expires_at.map_or(p.valid_until, |e| e.min(p.valid_until));
        self.previous_keys += 1;
        self.entries.push(Entry {
            hash: prefix,
            expires: clamp_expiry(Some(until)),
            flags: entry.flags | PREVIOUS,
            ..entry
        });
    }

    /// The index, with override sets compiled against the policy's `base` limits.
    pub fn into_index(self, defaults: Arc<LimitSet>, base: &dp::Limits) -> KeyIndex {
        let KeyTable {
            mut entries,
            mut names,
            overrides,
            override_ids: _,
            mut skipped,
            previous_keys,
            counters,
        } = self;
        let mut sets = Vec::with_capacity(overrides.len() + 1);
        sets.push(defaults);
        sets.extend(
            overrides
                .iter()
                .map(|o| Arc::new(LimitSet::compile(&base.with_overrides(o), "key"))),
        );
        // In place, no second copy; ties (one id twice) keep current keys before previous
        // ones, then document order, which `name_off` follows: the first entry of a clash
        // stays and the later ones are skipped.
        entries.sort_unstable_by_key(|e| (e.id(), e.is_previous(), e.name_off));
        let name_of = |names: &[u8], e: &Entry| {
            let (off, len) = (e.name_off as usize, usize::from(e.name_len));
            String::from_utf8_lossy(names.get(off..off + len).unwrap_or_default()).into_owned()
        };
        entries.dedup_by(|later, first| {
            if later.id() != first.id() {
                return false;
            }
            skipped.push(SkippedKey {
                name: name_of(&names, later),
                reason: if later.hash == first.hash {
                    "duplicate"
                } else {
                    "id_collision"
                },
            });
            true
        });
        let (remap, owners, previous_keys) =
            remap_rotated(&mut entries, &counters, previous_keys, &mut skipped, |e| {
                name_of(&names, e)
            });
        // Remapped entries move to their own table (still in id order).
        let mut rotated = Vec::with_capacity(remap.len());
        if !remap.is_empty() {
            entries.retain(|e| {
                let state = remap
                    .binary_search_by_key(&e.id(), |&(own, _)| own)
                    .ok()
                    .and_then(|i| remap.get(i));
                match state {
                    Some(&(_, state)) if e.flags & REMAPPED != 0 => {
                        rotated.push((*e, state));
                        false
                    }
                    _ => true,
                }
            });
        }
        entries.shrink_to_fit();
        names.shrink_to_fit();
        // About 8 to 16 entries per bucket: the directory (a quarter of a byte per key) stays
        // in cache, and a lookup lands near its entry by interpolation (see `find`).
        let bits = (usize::BITS - entries.len().leading_zeros()).saturating_sub(4);
        let bits = bits.min(31);
        let buckets = 1usize << bits;
        let mut dir = vec![0u32; buckets + 1];
        let bucket = |id: u64| ((id >> 1) >> (63 - bits)) as usize;
        for e in entries.iter() {
            dir[bucket(e.id()) + 1] += 1;
        }
        for b in 0..buckets {
            dir[b + 1] += dir[b];
        }
        KeyIndex {
            entries: entries.into_boxed_slice(),
            dir: dir.into_boxed_slice(),
            bits,
            names: Bytes::from(names),
            sets,
            skipped,
            rotated: rotated.into_boxed_slice(),
            owners,
            previous_keys,
        }
    }
}

/// Sorted `(id, id)` pairs: a remap (own id -> state id) or [`KeyIndex::owners`].
type IdPairs = Box<[(u64, u64)]>;

/// Where the limiter state of rotated keys lives, after the clash check (`entries` sorted by
/// id, one entry per id). A previous key counts as its key, so it stays only while that key
/// does: a key skipped for a clash would otherwise leave it counting as whoever holds the id.
/// A key's counter id (`counter` in the document: the hash of the key it replaced) is used
/// unless another key owns that id; its previous key counts there too. Returns the remap
/// (own id -> state id), its inverse for the current keys, and the previous keys kept.
/// Costs nothing for documents without rotations.
fn remap_rotated(
    entries: &mut Vec<Entry>,
    counters: &[(u32, u64)],
    previous_keys: usize,
    skipped: &mut Vec<SkippedKey>,
    name_of: impl Fn(&Entry) -> String,
) -> (IdPairs, IdPairs, usize) {
    if previous_keys == 0 && counters.is_empty() {
        return Default::default();
    }
    let rotated: HashSet<u32> = entries
        .iter()
        .filter(|e| e.is_previous())
        .map(|e| e.name_off)
        .chain(counters.iter().map(|&(off, _)| off))
        .collect();
    let current: HashMap<u32, u64> = entries
        .iter()
        .filter(|e| !e.is_previous() && rotated.contains(&e.name_off))
        .map(|e| (e.name_off, e.id()))
        .collect();
    entries.retain(|e| {
        let keep = !e.is_previous() || current.contains_key(&e.name_off);
        if !keep {
            skipped.push(SkippedKey {
                name: name_of(e),
                reason: "previous_without_key",
            });
        }
        keep
    });
    let owner_of = |id: u64| {
        entries
            .binary_search_by_key(&id, Entry::id)
            .ok()
            .and_then(|i| entries.get(i))
            .map(|e| e.name_off)
    };
    // A counter is one ApiKey's: two keys naming the same one would share a budget.
    let mut claims: HashMap<u64, usize> = HashMap::new();
    for &(off, counter) in counters {
        if current.contains_key(&off) {
            *claims.entry(counter).or_default() += 1;
        }
    }
    let mut state: HashMap<u32, u64> = current.clone();
    for &(off, counter) in counters {
        if !current.contains_key(&off) || counter == POLICY_SCOPE_ID {
            continue;
        }
        let shared = claims.get(&counter).is_some_and(|&n| n > 1);
        match owner_of(counter) {
            Some(o) if o != off || shared => skipped.push(SkippedKey {
                name: entries
                    .iter()
                    .find(|e| e.name_off == off)
                    .map(&name_of)
                    .unwrap_or_default(),
                reason: "counter_collision",
            }),
            None if shared => skipped.push(SkippedKey {
                name: entries
                    .iter()
                    .find(|e| e.name_off == off)
                    .map(&name_of)
                    .unwrap_or_default(),
                reason: "counter_collision",
            }),
            _ => {
                state.insert(off, counter);
            }
        }
    }
    let (mut remap, mut owners, mut kept) = (vec![], vec![], 0);
    for e in entries.iter_mut() {
        e.flags &= !REMAPPED;
        kept += usize::from(e.is_previous());
        let Some(&to) = state.get(&e.name_off) else {
            continue;
        };
        if to != e.id() {
            e.flags |= REMAPPED;
            remap.push((e.id(), to));
            if !e.is_previous() {
                owners.push((to, e.id()));
            }
        }
    }
    remap.sort_unstable();
    owners.sort_unstable();
    (remap.into(), owners.into(), kept)
}

/// Unix seconds as an [`Entry`] keeps them: 0 for never, else clamped to `1..=u32::MAX`.
fn clamp_expiry(t: Option<i64>) -> u32 {
    t.map_or(0, |t| u32::try_from(t.max(1)).unwrap_or(u32::MAX))
}

/// Deserialises a JSON array of key entries straight into a [`KeyTable`].
struct KeysInto<'t>(&'t mut KeyTable);

impl<'de> DeserializeSeed<'de> for KeysInto<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for KeysInto<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of key entries")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(k) = seq.next_element::<KeyEntryRef<'de>>()? {
            self.0.push(KeyFields {
                name: &k.name,
                sha256: &k.sha256,
                disabled: k.disabled,
                expires_at: k.expires_at,
                overrides: k.overrides.as_ref(),
                previous: k.previous.as_ref(),
                counter: k.counter.as_deref(),
            });
        }
        Ok(())
    }
}

/// A [`dp::KeyShard`] whose keys go into a [`KeyTable`]; yields its `apiVersion`.
struct ShardInto<'t>(&'t mut KeyTable);

impl<'de> DeserializeSeed<'de> for ShardInto<'_> {
    type Value = String;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ShardInto<'_> {
    type Value = String;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key shard")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        let (mut api_version, mut keys) = (None, false);
        while let Some(field) = map.next_key::<Cow<'de, str>>()? {
            match &*field {
                "apiVersion" if api_version.is_none() => api_version = Some(map.next_value()?),
                "keys" if !keys => {
                    keys = true;
                    map.next_value_seed(KeysInto(&mut *self.0))?;
                }
                "apiVersion" | "keys" => {
                    return Err(de::Error::custom(format!("duplicate field `{field}`")))
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !keys {
            return Err(de::Error::missing_field("keys"));
        }
        api_version.ok_or_else(|| de::Error::missing_field("apiVersion"))
    }
}

/// A [`dp::PolicyDocument`] whose inline keys go into a [`KeyTable`] (its `keys` stays empty).
struct DocInto<'t>(&'t mut KeyTable);

impl<'de> DeserializeSeed<'de> for DocInto<'_> {
    type Value = dp::PolicyDocument;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocInto<'_> {
    type Value = dp::PolicyDocument;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a policy document")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut api_version, mut policy, mut shards, mut keys) = (None, None, None, false);
        while let Some(field) = map.next_key::<Cow<'de, str>>()? {
            let dup = match &*field {
                "apiVersion" => api_version.replace(map.next_value()?).is_some(),
                "policy" => policy.replace(map.next_value()?).is_some(),
                "shards" => shards.replace(map.next_value()?).is_some(),
                "keys" => {
                    map.next_value_seed(KeysInto(&mut *self.0))?;
                    std::mem::replace(&mut keys, true)
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    false
                }
            };
            if dup {
                return Err(de::Error::custom(format!("duplicate field `{field}`")));
            }
        }
        Ok(dp::PolicyDocument {
            api_version: api_version.ok_or_else(|| de::Error::missing_field("apiVersion"))?,
            policy: policy.ok_or_else(|| de::Error::missing_field("policy"))?,
            keys: Vec::new(),
            shards: shards.unwrap_or_default(),
        })
    }
}

/// `policy.json` parsed with its inline keys in `keys`, checked as
/// [`dp::PolicyDocument::parse`] checks it.
pub fn parse_document(bytes: &[u8], keys: &mut KeyTable) -> Result<dp::PolicyDocument, dp::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let doc = DocInto(keys).deserialize(&mut de)?;
    de.end()?;
    doc.check_api_version()?;
    doc.validate()?;
    Ok(doc)
}

/// Reads the document's shards through `read` one at a time, checks each digest and version,
/// and adds their keys to `keys`: never more than one shard's bytes at once.
pub fn resolve_shards<F>(
    doc: &dp::PolicyDocument,
    keys: &mut KeyTable,
    mut read: F,
) -> Result<(), dp::Error>
where
    F: FnMut(&str) -> Option<Vec<u8>>,
{
    let total: usize = doc.shards.iter().map(|s| s.keys).sum();
    // The counts come from the document: trust them for a reservation only up to a bound.
    keys.entries.reserve(total.min(1 << 24));
    keys.names
        .reserve(doc.shards.first().map_or(0, |s| s.keys.min(1 << 16) * 16));
    for (i, s) in doc.shards.iter().enumerate() {
        if i == 1 && !keys.entries.is_empty() {
            // Names are as long as the first shard's were on average (plus a little): one
            // reservation instead of doubling, which would hold the old and new buffers at once.
            let per_key = keys.names.len().div_ceil(keys.entries.len()) + 1;
            let rest = total.min(1 << 24).saturating_sub(keys.entries.len());
            keys.names.reserve(rest.saturating_mul(per_key));
        }
        let bytes = read(&s.file).ok_or_else(|| dp::Error::MissingShard {
            file: s.file.clone(),
        })?;
        if dp::digest(&bytes) != s.sha256 {
            return Err(dp::Error::ShardDigest {
                file: s.file.clone(),
            });
        }
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let api_version = ShardInto(keys).deserialize(&mut de)?;
        de.end()?;
        if api_version != doc.api_version {
            return Err(dp::Error::ApiVersion {
                found: api_version,
                expected: doc.expected_api_version(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, hash: [u8; 32]) -> KeyEntry {
        KeyEntry {
            name: name.into(),
            sha256: hex::encode(hash),
            disabled: false,
            expires_at: None,
            overrides: None,
            previous: None,
            counter: None,
        }
    }

    fn hash(first: u8, rest: u8) -> [u8; 32] {
        let mut h = [rest; 32];
        h[0] = first;
        h
    }

    /// Another hash with `h`'s id (its first 8 bytes) and smaller bytes after them.
    fn same_id(h: [u8; 32]) -> [u8; 32] {
        let mut other = h;
        other[8..].fill(0x10);
        other
    }

    fn index(keys: &[KeyEntry]) -> KeyIndex {
        KeyIndex::build(keys, &Arc::new(LimitSet::default()), &dp::Limits::default())
    }

    fn with_previous(mut e: KeyEntry, previous: [u8; 32], valid_until: i64) -> KeyEntry {
        e.previous = Some(dp::PreviousKey {
            sha256: hex::encode(previous),
            valid_until,
        });
        e
    }

    #[test]
    fn a_previous_key_counts_as_its_current_key_until_its_overlap_ends() {
        let (cur, prev, other) = (hash(7, 1), hash(9, 2), hash(3, 3));
        let mut a = with_previous(entry("a", cur), prev, 2_000);
        a.expires_at = Some(5_000);
        let mut b = with_previous(entry("b", other), hash(11, 4), 9_000);
        b.expires_at = Some(1_500);
        let idx = index(&[a, b]);
        assert_eq!((idx.len(), idx.previous_keys()), (2, 2));
        let (c, p) = (idx.lookup(&cur).unwrap(), idx.lookup(&prev).unwrap());
        assert_eq!((p.id, p.name()), (c.id, "a"), "one set of counters");
        assert_eq!(c.id, key_id(&cur));
        assert!(std::ptr::eq(p.limits, c.limits));
        assert_eq!((c.expires_at, p.expires_at), (Some(5_000), Some(2_000)));
        // The key's own expiry comes first: the previous key ends with it.
        let pb = idx.lookup(&hash(11, 4)).unwrap();
        assert_eq!((pb.name(), pb.expires_at), ("b", Some(1_500)));
        // Limiter state is stored under the current key's id only.
        assert_eq!(idx.by_id(key_id(&cur)).map(|k| k.name()), Some("a"));
        assert!(idx.by_id(key_id(&prev)).is_none());
        assert!(idx.skipped().is_empty());
    }

    #[test]
    fn a_rotated_key_keeps_the_counters_of_the_key_it_replaced() {
        let (first, second, third) = (hash(7, 1), hash(9, 2), hash(12, 3));
        let counter = Some(hex::encode(first));
        // In the overlap of the first rotation: both keys count under the first key's id.
        let mut a = with_previous(entry("a", second), first, 9_000);
        a.counter = counter.clone();
        let idx = index(&[a, entry("b", hash(3, 3))]);
        let ids = [first, second].map(|h| idx.lookup(&h).unwrap().id);
        assert_eq!(ids, [key_id(&first); 2]);
        assert_eq!(idx.by_id(key_id(&first)).map(|k| k.name()), Some("a"));
        assert!(idx.by_id(key_id(&second)).is_none());
        // After the overlap, and through a second rotation: still the first key's id.
        let mut a = entry("a", second);
        a.counter = counter.clone();
        let idx = index(&[a]);
        assert_eq!(idx.lookup(&second).unwrap().id, key_id(&first));
        assert!(idx.lookup(&first).is_none());
        assert_eq!(idx.by_id(key_id(&first)).map(|k| k.name()), Some("a"));
        let mut a = with_previous(entry("a", third), second, 9_000);
        a.counter = counter;
        let idx = index(&[a]);
        let ids = [second, third].map(|h| idx.lookup(&h).unwrap().id);
        assert_eq!(ids, [key_id(&first); 2]);
        assert_eq!((idx.len(), idx.previous_keys()), (1, 1));
    }

    #[test]
    fn a_counter_that_another_key_owns_is_not_taken() {
        let (a_key, b_key) = (hash(7, 1), hash(9, 2));
        let mut a = entry("a", a_key);
        a.counter = Some(hex::encode(b_key));
        let idx = index(&[a, entry("b", b_key)]);
        assert_eq!(idx.lookup(&a_key).unwrap().id, key_id(&a_key));
        assert_eq!(idx.by_id(key_id(&b_key)).map(|k| k.name()), Some("b"));
        assert_eq!(idx.skipped()[0].reason, "counter_collision");
    }

    #[test]
    fn two_keys_naming_one_counter_keep_their_own() {
        let (a_key, b_key, counter) = (hash(7, 1), hash(9, 2), hash(4, 4));
        let mut a = entry("a", a_key);
        a.counter = Some(hex::encode(counter));
        let mut b = entry("b", b_key);
        b.counter = Some(hex::encode(counter));
        let idx = index(&[a, b]);
        assert_eq!(idx.lookup(&a_key).unwrap().id, key_id(&a_key));
        assert_eq!(idx.lookup(&b_key).unwrap().id, key_id(&b_key));
        assert!(idx.by_id(key_id(&counter)).is_none());
        let mut reasons: Vec<_> = idx
            .skipped()
            .iter()
            .map(|s| (s.name.as_str(), s.reason))
            .collect();
        reasons.sort_unstable();
        assert_eq!(
            reasons,
            [("a", "counter_collision"), ("b", "counter_collision")]
        );
    }

    #[test]
    fn a_previous_key_never_takes_another_keys_id() {
        // `b`'s previous key has `a`'s id: `a` keeps it, and `b`'s previous key is skipped.
        let a = hash(5, 0x90);
        let clash = same_id(a);
        let idx = index(&[
            with_previous(entry("b", hash(6, 6)), clash, 9_000),
            entry("a", a),
        ]);
        assert_eq!((idx.len(), idx.previous_keys()), (2, 0));
        assert_eq!(idx.lookup(&a).map(|k| k.name()), Some("a"));
        assert!(idx.lookup(&clash).is_none());
        assert_eq!(idx.skipped()[0].name, "b");
    }

    #[test]
    fn a_previous_key_goes_when_its_current_key_is_skipped() {
        // `b` repeats `a`'s key and is skipped; its previous key must not count as `a`.
        let a = hash(5, 0x90);
        let prev = hash(8, 8);
        let idx = index(&[entry("a", a), with_previous(entry("b", a), prev, 9_000)]);
        assert_eq!((idx.len(), idx.previous_keys()), (1, 0));
        assert!(idx.lookup(&prev).is_none());
        let mut reasons: Vec<_> = idx.skipped().iter().map(|s| s.reason).collect();
        reasons.sort_unstable();
        assert_eq!(reasons, ["duplicate", "previous_without_key"]);
    }

    #[test]
    fn a_previous_key_survives_the_streaming_parse() {
        let keys = vec![with_previous(entry("a", hash(7, 1)), hash(9, 2), 2_000)];
        let json = format!(
            r#"{{"apiVersion":"{}","policy":{{"name":"p","namespace":"ns"}},"keys":{}}}"#,
            dp::API_VERSION,
            serde_json::to_string(&keys).unwrap()
        );
        let mut table = KeyTable::default();
        parse_document(json.as_bytes(), &mut table).unwrap();
        let idx = table.into_index(Arc::new(LimitSet::default()), &dp::Limits::default());
        assert_eq!(
            idx.lookup(&hash(9, 2)).map(|k| k.id),
            Some(key_id(&hash(7, 1)))
        );
    }

    #[test]
    fn a_clash_keeps_the_first_entry_in_document_order_and_reports_the_rest() {
        // `b` sorts before `a` (bytes 8.. are smaller) but comes later in the document: `a`
        // stays, `b` is the id collision; `c` repeats `a` exactly.
        let a = hash(5, 0x90);
        let b = same_id(a);
        let idx = index(&[
            entry("a", a),
            entry("b", b),
            entry("c", a),
            entry("zero", [0; 32]),
            entry("bad", [1; 32]),
        ]);
        assert_eq!(idx.len(), 2);
        assert_eq!(idx.lookup(&a).map(|k| k.name()), Some("a"));
        assert_eq!(idx.lookup(&[1; 32]).map(|k| k.name()), Some("bad"));
        // Same id as `a`, different hash: not `a`.
        assert!(idx.lookup(&b).is_none());
        let mut skipped: Vec<_> = idx
            .skipped()
            .iter()
            .map(|s| (s.name.as_str(), s.reason))
            .collect();
        skipped.sort_unstable();
        assert_eq!(
            skipped,
            [
                ("b", "id_collision"),
                ("c", "duplicate"),
                ("zero", "reserved_id")
            ]
        );
    }

    #[test]
    fn only_the_first_16_bytes_are_compared_and_all_of_them_are() {
        let a = hash(9, 0x33);
        let idx = index(&[entry("a", a)]);
        let mut tail = a;
        tail[HASH_LEN..].fill(0x44);
        assert!(
            idx.lookup(&tail).is_some(),
            "bytes past the prefix are not kept"
        );
        for i in 8..HASH_LEN {
            let mut h = a;
            h[i] ^= 1;
            assert!(idx.lookup(&h).is_none(), "byte {i} of the prefix ignored");
        }
    }

    #[test]
    fn expiry_survives_the_compact_form_where_it_can_decide() {
        let mut keys: Vec<KeyEntry> =
            [None, Some(-5), Some(0), Some(1_900_000_000), Some(i64::MAX)]
                .into_iter()
                .enumerate()
                .map(|(i, t)| KeyEntry {
                    expires_at: t,
                    disabled: i == 2,
                    ..entry(&format!("k{i}"), hash(i as u8 + 1, 7))
                })
                .collect();
        keys.push(entry(&"x".repeat(256), hash(99, 7)));
        let idx = index(&keys);
        let got: Vec<_> = (0..5)
            .map(|i| {
                let k = idx.lookup(&hash(i as u8 + 1, 7)).unwrap();
                (k.expires_at, k.disabled)
            })
            .collect();
        assert_eq!(
            got,
            [
                (None, false),
                (Some(1), false),
                (Some(1), true),
                (Some(1_900_000_000), false),
                (Some(i64::from(u32::MAX)), false)
            ]
        );
        // A name no ApiKey can have is refused rather than cut.
        assert_eq!(idx.skipped()[0].reason, "invalid");
    }

    #[test]
    fn keys_with_equal_overrides_share_one_limit_set() {
        let o = |c| dp::Limits {
            concurrency: Some(c),
            ..dp::Limits::default()
        };
        let keys: Vec<KeyEntry> = (0..100u8)
            .map(|i| KeyEntry {
                overrides: (i % 3 != 0).then(|| o(1 + u32::from(i % 3))),
                ..entry(&format!("k{i}"), hash(i + 1, 3))
            })
            .collect();
        let idx = index(&keys);
        assert_eq!(idx.limit_sets(), 3, "defaults + two distinct overrides");
        let a = idx.lookup(&hash(2, 3)).unwrap().limits;
        let b = idx.lookup(&hash(5, 3)).unwrap().limits;
        assert!(std::ptr::eq(a, b));
        assert_eq!(a.concurrency.as_ref().map(|c| c.max), Some(2));
        assert!(idx
            .lookup(&hash(1, 3))
            .unwrap()
            .limits
            .concurrency
            .is_none());
    }

    #[test]
    fn the_identity_header_is_the_name_when_it_can_be_one() {
        let idx = index(&[entry("gold", hash(1, 1)), entry("bad\u{7f}", hash(2, 2))]);
        let gold = idx.lookup(&hash(1, 1)).unwrap();
        assert_eq!(gold.identity().unwrap(), "gold");
        assert!(idx.lookup(&hash(2, 2)).unwrap().identity().is_none());
        assert_eq!(idx.by_id(gold.id).map(|k| k.name()), Some("gold"));
    }

    #[test]
    fn every_key_of_a_large_index_is_found_and_no_other() {
        let keys: Vec<KeyEntry> = (0..50_000u32)
            .map(|i| entry(&format!("k{i}"), Sha256Like::of(i)))
            .collect();
        let idx = index(&keys);
        assert_eq!(idx.len(), 50_000);
        for i in 0..50_000u32 {
            assert_eq!(
                idx.lookup(&Sha256Like::of(i)).map(|k| k.name().to_string()),
                Some(format!("k{i}"))
            );
        }
        assert!((50_000..60_000u32).all(|i| idx.lookup(&Sha256Like::of(i)).is_none()));
        assert!(
            idx.heap_bytes() <= 50_000 * 40,
            "{} bytes",
            idx.heap_bytes()
        );
    }

    struct Sha256Like;
    impl Sha256Like {
        fn of(i: u32) -> [u8; 32] {
            use sha2::Digest;
            sha2::Sha256::digest(i.to_le_bytes()).into()
        }
    }

    /// The streaming parse accepts and refuses what `PolicyDocument::parse` does, and finds
    /// the same keys.
    #[test]
    fn the_streaming_parse_agrees_with_the_document_parse() {
        let keys = vec![entry("a", hash(1, 1)), entry("b", hash(2, 2))];
        let json = |v: &str, extra: &str| {
            format!(
                r#"{{"apiVersion":"{v}","policy":{{"name":"p","namespace":"ns"}},"keys":{}{extra}}}"#,
                serde_json::to_string(&keys).unwrap()
            )
        };
        let cases = [
            json(dp::API_VERSION, ""),
            json(dp::API_VERSION, r#","unknown":[1,{"x":2}]"#),
            json("v0", ""),
            json(dp::API_VERSION, r#","keys":[]"#),
            json(dp::API_VERSION, "") + "x",
            r#"{"apiVersion":"dataplane.keylimit.dev/v1"}"#.to_string(),
            r#"{"policy":{"name":"p","namespace":"ns"},"keys":[{"name":"a"}],"apiVersion":"dataplane.keylimit.dev/v1"}"#.to_string(),
        ];
        for case in cases {
            let mut table = KeyTable::default();
            let streamed = parse_document(case.as_bytes(), &mut table);
            let whole = dp::PolicyDocument::parse(case.as_bytes());
            match (&streamed, &whole) {
                (Ok(s), Ok(w)) => {
                    assert_eq!(s.policy, w.policy, "{case}");
                    assert_eq!(table.len(), w.keys.len(), "{case}");
                }
                (Err(s), Err(w)) => assert_eq!(
                    std::mem::discriminant(s),
                    std::mem::discriminant(w),
                    "{case}: {s} vs {w}"
                ),
                _ => panic!("{case}: streamed {streamed:?}, whole {whole:?}"),
            }
        }
    }
}
