//! Contribution bounding: before any aggregate, keep at most *k* rows of each privacy unit,
//! a uniformly random *k*-subset of that unit's rows (not "the first k", which would let the
//! file's order decide). After this step one person's presence changes at most *k* rows, which
//! is the `d_in` the gate hands to OpenDP's stability maps.
//!
//! Two passes over the scan and the filters on it (or a join and the filters on it), with no
//! sort:
//! 1. The person column streams through the gate's own table, which counts each person's
//!    rows *n*, each of DataFusion's partitions into a table of its own, added up at the end.
//!    Integer ids whose range (from the Parquet file's statistics, else one vectorised
//!    `MIN`/`MAX`) is at most four times the rows are counted in a flat array indexed by
//!    id − min; any other ids (and string ids, hashed with a per-query key) in a hash table.
//!    The tables' bytes are drawn from the job's memory pool like any operator's.
//! 2. The same rows, then `WHERE unseen_keep(unit, <the query's filters>)`: a filter that keeps
//!    every row of a person with *n* ≤ *k*, and otherwise walks that person's rows keeping the
//!    *t*-th with probability (*k* − kept so far) / (*n* − *t*) — sequential selection
//!    sampling, which yields each *k*-subset with equal probability whatever order the rows
//!    arrive in. The filter never keeps a *k*+1-th row of anyone, whatever it was told in pass
//!    1, so the bound holds even if the two passes saw different rows; only uniformity depends
//!    on them agreeing.
//!
//! The step sits directly above the table scan and the filters on it (so `WHERE` clauses spend
//! no person's allowance on rows they drop), below any projection, so no guest expression can
//! rename another column into the unit's place. Above a join it is a projected column and a
//! filter on it (a filter alone would be pushed into both sides).
//!
//! Cost (10M rows, ~950k persons, 2 cores): a sort-based `ROW_NUMBER() OVER (PARTITION BY unit
//! ORDER BY random)` took 8.6 s; the two passes with a DataFusion `GROUP BY` for pass 1 and
//! a locked hash map for pass 2 took ~3–4.6 s; flat tables with one lock ~0.3 s; partitions
//! counted apart, pass 2's table in locked stripes of four-byte words, prefetched, ~0.12 s
//! over the 0.06 s of the same aggregate with no bound; as here, with both tables one byte a
//! person where the counts allow (0.95 MB at 950k persons, within a core's cache), 1.3× the
//! aggregate with no bound (README). What remains is one random read-modify-write per row into
//! the per-person table in each pass.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray};
use arrow::datatypes::{DataType, Int64Type};
use datafusion::common::{Column, Result, ScalarValue, internal_err};
use datafusion::functions_aggregate::expr_fn::{count, max, min};
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, LogicalPlanBuilder, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility, lit,
};
use rand::{Rng, SeedableRng};
use ring::rand::{SecureRandom, SystemRandom};

use super::GateError;
use crate::engine::JobSession;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};

/// Which column identifies a person, and how many of their rows a query may use.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitBound {
    /// The privacy unit's name, for the ledger (`person_id`; `a=b` for a join of two names).
    pub column: String,
    /// The column of the bounded rows (`source`'s output) that names each row's person.
    pub key: Column,
    pub max_rows: u64,
    /// At most this many groups per person, where the price depends on it (partition
    /// selection): the groups are told apart by these columns of the scan.
    pub groups: Option<GroupBound>,
}

/// A bound on the groups one person's rows may fall in.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupBound {
    pub max_groups: u64,
    /// The scan's columns the group keys are made of (a group is a function of them, so at
    /// most g distinct combinations means at most g groups).
    pub columns: Vec<String>,
}

/// Pass 1's record of each person's groups under a bound of *g*: the *g* smallest keyed
/// hashes of the group columns among the person's rows, each with its row count. With a
/// random key per query the *g* smallest are a uniformly random *g*-subset of the person's
/// groups; pass 2 keeps rows of those groups only. (Two groups of one person whose 64-bit
/// hashes collide would count as one: probability ~2⁻⁶⁴ per pair.)
struct Groups {
    max_groups: usize,
    /// `max_groups` entries per slot: (hash, rows); 0 rows is an empty entry.
    entries: Vec<(u64, u32)>,
}

impl Groups {
    fn of(&self, slot: usize) -> &[(u64, u32)] {
        &self.entries[slot * self.max_groups..(slot + 1) * self.max_groups]
    }

    /// Counts a row of group `hash` for the person at `slot`.
    fn add(&mut self, slot: usize, hash: u64) {
        self.add_rows(slot, hash, 1);
    }

    /// Counts `rows` rows of group `hash` for the person at `slot` at once (merging another
    /// partition's record). The g smallest hashes of a union are among the g smallest of each
    /// part they occur in, each part's with its exact count, so merging parts one by one gives
    /// the record of the whole.
    fn add_rows(&mut self, slot: usize, hash: u64, rows: u32) {
        let g = self.max_groups;
        let entries = &mut self.entries[slot * g..(slot + 1) * g];
        if let Some(e) = entries.iter_mut().find(|e| e.1 > 0 && e.0 == hash) {
            e.1 = e.1.saturating_add(rows);
        } else if let Some(e) = entries.iter_mut().find(|e| e.1 == 0) {
            *e = (hash, rows);
        } else if let Some(e) = entries.iter_mut().max_by_key(|e| e.0)
            && hash < e.0
        {
            // A group with a smaller hash displaces the largest; the displaced one can never
            // come back (its hash stays above g others).
            *e = (hash, rows);
        }
    }

    /// Whether `hash` is one of the person's chosen groups.
    fn chosen(&self, slot: usize, hash: u64) -> bool {
        self.of(slot).iter().any(|e| e.1 > 0 && e.0 == hash)
    }
}

/// A person, as the two passes see them: an integer id as itself, a string id by a 64-bit
/// hash keyed per query. Two persons whose hashes collided would share one allowance of *k*
/// rows — fewer rows used, never more per person.
type UnitKey = i64;

/// The most slots a dense person table may have (at most 9 bytes each, pass 1 and pass 2 side
/// by side for a moment: 288 MiB).
const DENSE_MAX_SLOTS: u64 = 1 << 25;

/// Slots per stripe of pass 2's table (2¹⁵ words, 256 KiB): the unit of locking.
const STRIPE_SLOTS: usize = 1 << 15;

/// How many rows ahead the per-person loops fetch their row's table entry.
const PREFETCH_ROWS: usize = 16;

/// Asks the processor to start loading `entry`'s cache line: a hint, with no effect on what
/// the program computes (a prefetch never faults, whatever the address).
#[inline(always)]
fn prefetch<T>(entry: Option<&T>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(entry) = entry {
        // SAFETY: `_mm_prefetch` reads nothing the program can observe and cannot fault; the
        // pointer comes from a live reference besides.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                (entry as *const T).cast(),
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = entry;
}

/// Where a person's counters live.
enum Index {
    /// Integer ids spanning a range not much wider than the rows: slot = id − min, no hashing.
    Dense { min: i64, slots: usize },
    /// Anything else: a table from key to slot, built in pass 1 and only read in pass 2.
    Hashed(HashMap<UnitKey, u32, MixHasher>),
}

impl Index {
    fn slot(&self, key: UnitKey) -> Option<usize> {
        match self {
            Index::Dense { min, slots } => {
                let slot = usize::try_from(key.checked_sub(*min)?).ok()?;
                (slot < *slots).then_some(slot)
            }
            Index::Hashed(map) => map.get(&key).map(|s| *s as usize),
        }
    }
}

/// Pass 1's row counts, one byte a slot: a wrap past 255 is noted on the side (each note is 256
/// rows), so the table is a quarter of four-byte counts — at a million persons, within a
/// core's 2 MiB cache, where each row's increment is one random access. Notes are at most
/// one per 256 rows counted.
#[derive(Default)]
struct Tally {
    low: Vec<u8>,
    wraps: Vec<u32>,
}

impl Tally {
    fn zeros(slots: usize) -> Self {
        Tally {
            low: vec![0; slots],
            wraps: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.low.len()
    }

    /// The table's bytes as allocated.
    fn bytes(&self) -> usize {
        self.low.capacity() + self.wraps.capacity() * 4
    }

    /// A new slot, at zero (hashed tables).
    fn push(&mut self) {
        self.low.push(0);
    }

    #[inline(always)]
    fn add(&mut self, slot: usize) {
        let low = &mut self.low[slot];
        *low = low.wrapping_add(1);
        if *low == 0 {
            self.wraps.push(slot as u32);
        }
    }

    /// Counts `rows` more rows at `slot`.
    fn add_rows(&mut self, slot: usize, rows: u32) {
        let sum = u32::from(self.low[slot]) + (rows & 0xFF);
        self.low[slot] = sum as u8;
        let wraps = (rows >> 8) + (sum >> 8);
        self.wraps
            .extend(std::iter::repeat_n(slot as u32, wraps as usize));
    }

    /// Adds `other`, slot for slot (tables of one size).
    fn merge(&mut self, other: &Tally) {
        for (slot, (mine, theirs)) in self.low.iter_mut().zip(&other.low).enumerate() {
            let (sum, wrapped) = mine.overflowing_add(*theirs);
            *mine = sum;
            if wrapped {
                self.wraps.push(slot as u32);
            }
        }
        self.wraps.extend_from_slice(&other.wraps);
    }

    /// Each slot's count, read back.
    fn counts(&self) -> Counts<'_> {
        let mut extra: HashMap<u32, u32> = HashMap::new();
        for slot in &self.wraps {
            let e = extra.entry(*slot).or_default();
            *e = e.saturating_add(256);
        }
        Counts {
            low: &self.low,
            extra,
        }
    }
}

/// A [`Tally`]'s counts with its wraps added back.
struct Counts<'a> {
    low: &'a [u8],
    extra: HashMap<u32, u32>,
}

impl Counts<'_> {
    fn get(&self, slot: usize) -> u32 {
        let extra = match self.extra.is_empty() {
            true => 0,
            false => self.extra.get(&(slot as u32)).copied().unwrap_or(0),
        };
        u32::from(self.low[slot]).saturating_add(extra)
    }

    fn most(&self) -> u32 {
        let low = self.low.iter().copied().max().map_or(0, u32::from);
        self.extra
            .keys()
            .map(|slot| self.get(*slot as usize))
            .fold(low, u32::max)
    }
}

/// Pass 1: each person's rows after the query's filters.
pub(super) struct Counter {
    max_rows: u32,
    hasher: std::collections::hash_map::RandomState,
    index: Index,
    rows: Tally,
    /// Under a group bound, each person's chosen groups (then `rows` is unused until finish).
    groups: Option<Groups>,
    /// The tables' bytes, drawn from the job's memory pool (none in unit tests).
    memory: Option<MemoryReservation>,
}

impl Counter {
    /// `range` is (smallest id, largest id, rows) over pass 1's rows, for integer ids; a
    /// narrow range gets the dense table.
    pub(super) fn new(max_rows: u32, range: Option<(i64, i64, u64)>) -> Self {
        let dense = range.and_then(|(lo, hi, rows)| {
            let span = u64::try_from(i128::from(hi) - i128::from(lo) + 1).ok()?;
            (span <= DENSE_MAX_SLOTS && span <= rows.saturating_mul(4).saturating_add(1024))
                .then_some((lo, span as usize))
        });
        let (index, rows) = match dense {
            Some((min, slots)) => (Index::Dense { min, slots }, Tally::zeros(slots)),
            None => (Index::Hashed(HashMap::default()), Tally::default()),
        };
        Counter {
            max_rows,
            hasher: Default::default(),
            index,
            rows,
            groups: None,
            memory: None,
        }
    }

    /// An empty counter like this one (same table kind and keys), its memory drawn from the
    /// same pool: one per partition of pass 1, merged at the end.
    fn fork(&self) -> Result<Self> {
        let mut fork = Counter {
            max_rows: self.max_rows,
            hasher: self.hasher.clone(),
            index: match &self.index {
                Index::Dense { min, slots } => Index::Dense {
                    min: *min,
                    slots: *slots,
                },
                Index::Hashed(_) => Index::Hashed(HashMap::default()),
            },
            rows: Tally::default(),
            groups: None,
            memory: None,
        };
        if let Some(memory) = &self.memory {
            fork.memory = Some(memory.new_empty());
        }
        if let Index::Dense { slots, .. } = fork.index {
            fork.account(slots)?;
            fork.rows = Tally::zeros(slots);
        }
        match &self.groups {
            Some(g) => fork.with_groups(g.max_groups),
            None => Ok(fork),
        }
    }

    /// Adds another partition's counts to these.
    fn merge(&mut self, other: Counter) -> Result<()> {
        match &other.index {
            Index::Dense { .. } => {
                self.rows.merge(&other.rows);
                if let (Some(mine), Some(theirs)) = (self.groups.as_mut(), &other.groups) {
                    for slot in 0..other.rows.len() {
                        for &(hash, rows) in theirs.of(slot).iter().filter(|e| e.1 > 0) {
                            mine.add_rows(slot, hash, rows);
                        }
                    }
                }
            }
            Index::Hashed(theirs) => {
                let counts = other.rows.counts();
                for (key, &their_slot) in theirs {
                    let slot = self.slot_for(*key);
                    let their_slot = their_slot as usize;
                    match (self.groups.as_mut(), &other.groups) {
                        (Some(mine), Some(g)) => {
                            for &(hash, rows) in g.of(their_slot).iter().filter(|e| e.1 > 0) {
                                mine.add_rows(slot, hash, rows);
                            }
                        }
                        _ => self.rows.add_rows(slot, counts.get(their_slot)),
                    }
                }
            }
        }
        self.account(0)
    }

    /// The slot of `key`, a new one for a person not seen before (hashed tables).
    /// `usize::MAX` for an id outside a dense table.
    fn slot_for(&mut self, key: UnitKey) -> usize {
        let Index::Hashed(map) = &mut self.index else {
            return self.index.slot(key).unwrap_or(usize::MAX);
        };
        let next = self.rows.len() as u32;
        let slot = *map.entry(key).or_insert(next) as usize;
        if slot == self.rows.len() {
            self.rows.push();
            if let Some(g) = self.groups.as_mut() {
                g.entries.extend(std::iter::repeat_n((0, 0), g.max_groups));
            }
        }
        slot
    }

    /// Bounds each person to `max_groups` groups as well (rows then come with group hashes).
    /// A dense table's entries are drawn from the pool before they are allocated; a hashed
    /// table's grow with its persons and are counted after each batch, like the map.
    pub(super) fn with_groups(mut self, max_groups: usize) -> Result<Self> {
        let max_groups = max_groups.max(1);
        let slots = self.rows.len();
        let bytes = slots
            .checked_mul(max_groups)
            .and_then(|n| n.checked_mul(16))
            .ok_or_else(|| {
                datafusion::error::DataFusionError::ResourcesExhausted("groups".into())
            })?;
        self.account(bytes)?;
        self.groups = Some(Groups {
            max_groups,
            entries: vec![(0, 0); slots * max_groups],
        });
        Ok(self)
    }

    /// Each row's group hash, from the group columns (keyed like string ids, per query).
    pub(super) fn group_hashes(&self, columns: &[ArrayRef]) -> Result<Vec<u64>> {
        group_hashes(&self.hasher, columns)
    }

    /// Draws the tables' memory from `pool` from now on, like any operator of the query.
    fn account_in(&mut self, pool: &Arc<dyn MemoryPool>) -> Result<()> {
        self.memory = Some(MemoryConsumer::new("unseen contribution bound").register(pool));
        self.account(0)
    }

    /// Resizes the reservation to the tables as they are (plus `extra` bytes about to be
    /// allocated); fails the query when the pool has no room.
    fn account(&mut self, extra: usize) -> Result<()> {
        let map = match &self.index {
            Index::Dense { .. } => 0,
            // A key, a slot and a control byte per bucket.
            Index::Hashed(map) => map.capacity() * 13,
        };
        let groups = self
            .groups
            .as_ref()
            .map_or(0, |g| g.entries.capacity() * 16);
        let bytes = map + self.rows.bytes() + groups + extra;
        match &mut self.memory {
            Some(memory) => memory.try_resize(bytes),
            None => Ok(()),
        }
    }

    /// Counts one batch of pass 1's person column (null ids count for no one).
    pub(super) fn add(&mut self, unit: &ArrayRef) -> Result<()> {
        // The common case in a loop of its own: integer ids without nulls, a dense table. Each
        // row is one increment at a random place in the table; fetching the place a few rows
        // ahead lets the processor wait for several of those cache misses at once.
        if let (Index::Dense { min, slots }, None, Some(ids)) = (
            &self.index,
            &self.groups,
            unit.as_primitive_opt::<Int64Type>()
                .filter(|a| a.null_count() == 0),
        ) {
            let (min, slots, ids) = (*min, *slots as u64, ids.values());
            let rows = &mut self.rows;
            for (i, &id) in ids.iter().enumerate() {
                if let Some(&ahead) = ids.get(i + PREFETCH_ROWS) {
                    prefetch(rows.low.get(ahead.wrapping_sub(min) as usize));
                }
                let slot = id.wrapping_sub(min) as u64;
                if slot < slots {
                    rows.add(slot as usize);
                }
            }
            return Ok(());
        }
        self.add_rows(unit, None)
    }

    /// As [`Counter::add`], under a group bound: each row's group hash beside its person.
    pub(super) fn add_grouped(&mut self, unit: &ArrayRef, hashes: &[u64]) -> Result<()> {
        self.add_rows(unit, Some(hashes))
    }

    fn add_rows(&mut self, unit: &ArrayRef, hashes: Option<&[u64]>) -> Result<()> {
        let hasher = self.hasher.clone();
        for_each_key(unit, &hasher, |row, key| {
            let Some(key) = key else { return };
            // A dense table was sized from the same rows; an id outside it (the two scans
            // disagreeing) is a person whose rows pass 2 will drop.
            let slot = self.slot_for(key);
            if slot == usize::MAX {
                return;
            }
            match (self.groups.as_mut(), hashes) {
                (Some(g), Some(h)) => g.add(slot, h[row]),
                _ => self.rows.add(slot),
            }
        })
    }

    /// Freezes the counts for pass 2.
    pub(super) fn finish(mut self) -> Result<Selection, GateError> {
        // Pass 2's table is up to 8 bytes a slot, and for a moment it lives beside pass 1's.
        self.account(self.rows.len() * 8)
            .map_err(|_| query_failed())?;
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| GateError::refused("internal", "no secure randomness available"))?;
        // Under a group bound a person's rows are those of their chosen groups.
        let slots = self.rows.len();
        let grouped: Option<Vec<u32>> = self.groups.as_ref().map(|g| {
            (0..slots)
                .map(|slot| {
                    g.of(slot)
                        .iter()
                        .fold(0u32, |sum, e| sum.saturating_add(e.1))
                })
                .collect()
        });
        let tally = self.rows.counts();
        let count = |slot: usize| {
            grouped
                .as_ref()
                .map_or_else(|| tally.get(slot), |g| g[slot])
        };
        let most = match &grouped {
            Some(g) => g.iter().copied().max().unwrap_or(0),
            None => tally.most(),
        };
        let k = self.max_rows;
        // A person never counted gets an allowance already spent, so none of their rows is kept.
        fn stripes<W: Word>(
            slots: usize,
            k: u32,
            count: &impl Fn(usize) -> u32,
        ) -> Vec<Mutex<Vec<W>>> {
            let codec = Codec::new(k);
            (0..slots)
                .step_by(STRIPE_SLOTS)
                .map(|from| {
                    let to = (from + STRIPE_SLOTS).min(slots);
                    Mutex::new(
                        (from..to)
                            .map(|slot| W::start(count(slot), codec))
                            .collect(),
                    )
                })
                .collect()
        }
        let progress = if (u64::from(most) + 1) * (u64::from(k) + 1) <= 256 {
            Stripes::Byte(stripes(slots, k, &count))
        } else if k <= TINY_MAX && most <= TINY_MAX {
            Stripes::Tiny(stripes(slots, k, &count))
        } else if k <= NARROW_MAX_ROWS && most < NARROW_MAX_COUNT {
            Stripes::Narrow(stripes(slots, k, &count))
        } else {
            Stripes::Wide(stripes(slots, k, &count))
        };
        drop(tally);
        let word = progress.word_bytes();
        // Pass 1's counts go; the reservation keeps what pass 2 holds (shrinking cannot fail).
        self.rows = Tally::default();
        self.account(slots * word).map_err(|_| query_failed())?;
        Ok(Selection {
            max_rows: self.max_rows,
            hasher: self.hasher,
            index: self.index,
            groups: self.groups,
            progress,
            rules: Rules::new(self.max_rows),
            seeds: Mutex::new(rand::rngs::StdRng::from_seed(seed)),
            _memory: self.memory,
        })
    }
}

/// Pass 2, per query: each person's row count from pass 1 and progress through their rows.
pub struct Selection {
    max_rows: u32,
    hasher: std::collections::hash_map::RandomState,
    index: Index,
    /// Under a group bound, each person's chosen groups: rows of other groups are dropped.
    groups: Option<Groups>,
    /// Pass 2's state per slot, one [`Word`] so a row costs one memory access, in stripes of
    /// [`STRIPE_SLOTS`] slots, each behind its own lock, so that DataFusion's partitions
    /// update different stripes at once.
    progress: Stripes,
    rules: Rules,
    /// Seeds one generator per batch (a ChaCha stream seeded from ring).
    seeds: Mutex<rand::rngs::StdRng>,
    /// Held (and counted in the job's pool) until the query is done.
    _memory: Option<MemoryReservation>,
}

/// Pass 2's table, of narrow words where the bound and the counts allow.
enum Stripes {
    Byte(Vec<Mutex<Vec<u8>>>),
    Tiny(Vec<Mutex<Vec<u16>>>),
    Narrow(Vec<Mutex<Vec<u32>>>),
    Wide(Vec<Mutex<Vec<u64>>>),
}

impl Stripes {
    fn word_bytes(&self) -> usize {
        match self {
            Stripes::Byte(_) => 1,
            Stripes::Tiny(_) => 2,
            Stripes::Narrow(_) => 4,
            Stripes::Wide(_) => 8,
        }
    }

    fn len(&self) -> usize {
        match self {
            Stripes::Byte(s) => s.len(),
            Stripes::Tiny(s) => s.len(),
            Stripes::Narrow(s) => s.len(),
            Stripes::Wide(s) => s.len(),
        }
    }
}

/// Tiny words hold rows kept and rows not yet seen in 8 bits each.
const TINY_MAX: u32 = 0xFF;

/// Narrow words hold rows kept in 8 bits and rows not yet seen in 24.
const NARROW_MAX_ROWS: u32 = 0xFF;
const NARROW_MAX_COUNT: u32 = 1 << 24;

/// What a word's packing depends on: the bound *k*, and for one-byte words the divisor *k* + 1
/// as a multiplier (`code / (k + 1)` = `code * magic >> 16` for every code below 256, since
/// `magic` = ⌈2¹⁶ / (k + 1)⌉ errs by less than k + 1 ≤ 256 and 255 · 255 < 2¹⁶).
#[derive(Clone, Copy)]
struct Codec {
    k: u32,
    magic: u32,
}

impl Codec {
    fn new(k: u32) -> Self {
        let d = k.saturating_add(1).min(256);
        Codec {
            k,
            magic: (1u32 << 16).div_ceil(d),
        }
    }
}

/// One person's pass-2 state in one word: the rows not yet seen (pass 1's count to start
/// with) and the rows kept. The table is read at random, once a row; the narrower the word,
/// the more of the table stays in a core's cache (measured: four bytes a person instead of
/// eight, a fifth less time in pass 2 at 950k persons).
trait Word: Copy + Send + 'static {
    /// The state of a person pass 1 counted `rows` of; for 0 (never counted), an allowance
    /// already spent.
    fn start(rows: u32, c: Codec) -> Self;
    /// (rows not yet seen, rows kept).
    fn unpack(self, c: Codec) -> (u32, u32);
    fn pack(left: u32, taken: u32, c: Codec) -> Self;

    /// One row of the person in this state: the state after it, and whether it is kept.
    /// Sequential selection sampling: with `left` of the person's rows still to come, this one
    /// is kept with probability (k − kept) / left. Past pass 1's count (`left` = 0) rows are
    /// kept until k; never a (k+1)-th row. Every row draws, and the decision is arithmetic
    /// rather than branches: the outcome is random, so a branch on it would be mispredicted
    /// half the time.
    #[inline(always)]
    fn visit(self, rules: &Rules, rng: &mut rand::rngs::StdRng) -> (Self, bool) {
        let (c, k) = (rules.codec, rules.codec.k);
        let (left, taken) = self.unpack(c);
        let need = k.saturating_sub(taken);
        let draw = rng.random_range(0..left.max(1));
        let keep = (taken < k) & ((left <= need) | (draw < need));
        (
            Self::pack(left.saturating_sub(1), taken + keep as u32, c),
            keep,
        )
    }
}

/// What pass 2 decides by: the bound's codec, and for one-byte words every state's
/// transition, computed once per query by [`Word::visit`]'s arithmetic.
struct Rules {
    codec: Codec,
    steps: Box<[Step; 256]>,
}

/// One one-byte state's row: draw below `left`; kept if the draw is below `keep_below`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Step {
    left: u32,
    keep_below: u32,
    kept: u8,
    dropped: u8,
}

impl Rules {
    fn new(k: u32) -> Self {
        let codec = Codec::new(k);
        let mut steps = Box::new(
            [Step {
                left: 1,
                keep_below: 0,
                kept: 0,
                dropped: 0,
            }; 256],
        );
        // One-byte words serve only bounds with (largest count + 1) · (k + 1) ≤ 256; for
        // others the table is never read (and k + 1 might not even fit a u32).
        let byte_words = k < 256;
        for (code, step) in steps.iter_mut().enumerate().filter(|_| byte_words) {
            let (left, taken) = (code as u8).unpack(codec);
            let need = k.saturating_sub(taken);
            *step = Step {
                left: left.max(1),
                // The draw is below `left` ≤ 255, so u32::MAX keeps always and 0 never.
                keep_below: if taken >= k {
                    0
                } else if left <= need {
                    u32::MAX
                } else {
                    need
                },
                kept: <u8 as Word>::pack(left.saturating_sub(1), (taken + 1).min(k), codec),
                dropped: <u8 as Word>::pack(left.saturating_sub(1), taken, codec),
            };
        }
        Rules { codec, steps }
    }
}

impl Word for u64 {
    fn start(rows: u32, _: Codec) -> Self {
        if rows == 0 {
            u64::from(u32::MAX)
        } else {
            u64::from(rows) << 32
        }
    }
    fn unpack(self, _: Codec) -> (u32, u32) {
        ((self >> 32) as u32, self as u32)
    }
    fn pack(left: u32, taken: u32, _: Codec) -> Self {
        (u64::from(left) << 32) | u64::from(taken)
    }
}

/// Only for k ≤ 255 and counts below 2²⁴: then the spent allowance 255 is at least k, and a
/// person's kept rows (at most k) fit their 8 bits.
impl Word for u32 {
    fn start(rows: u32, _: Codec) -> Self {
        if rows == 0 {
            NARROW_MAX_ROWS
        } else {
            rows << 8
        }
    }
    fn unpack(self, _: Codec) -> (u32, u32) {
        (self >> 8, self & 0xFF)
    }
    fn pack(left: u32, taken: u32, _: Codec) -> Self {
        (left << 8) | taken
    }
}

/// Only for k ≤ 255 and counts up to 255: then the spent allowance 255 is at least k, and a
/// person's kept rows (at most k) and rows to come each fit their 8 bits.
impl Word for u16 {
    fn start(rows: u32, _: Codec) -> Self {
        if rows == 0 {
            TINY_MAX as u16
        } else {
            (rows as u16) << 8
        }
    }
    fn unpack(self, _: Codec) -> (u32, u32) {
        (u32::from(self >> 8), u32::from(self & 0xFF))
    }
    fn pack(left: u32, taken: u32, _: Codec) -> Self {
        ((left as u16) << 8) | taken as u16
    }
}

/// Only where (largest count + 1) · (k + 1) ≤ 256: the state is the one number
/// left · (k + 1) + (k − taken). A person never counted is 0: no rows to come, none left to
/// keep. At k = 10 and persons of up to 20 rows (the shared workloads), a million persons
/// take 1 MiB.
impl Word for u8 {
    fn start(rows: u32, c: Codec) -> Self {
        if rows == 0 {
            0
        } else {
            (rows * (c.k + 1) + c.k) as u8
        }
    }
    fn unpack(self, c: Codec) -> (u32, u32) {
        let code = u32::from(self);
        let left = (code * c.magic) >> 16;
        (left, c.k - (code - left * (c.k + 1)))
    }
    fn pack(left: u32, taken: u32, c: Codec) -> Self {
        (left * (c.k + 1) + (c.k - taken)) as u8
    }
    /// The same decision as the arithmetic, looked up (a 3 KiB table, in L1). `unseen bench
    /// --query Q2` at 10M, three rounds alternating the builds: gate from memory 0.135–0.136 s
    /// against 0.145–0.148 s unpacking each state.
    #[inline(always)]
    fn visit(self, rules: &Rules, rng: &mut rand::rngs::StdRng) -> (Self, bool) {
        let step = rules.steps[usize::from(self)];
        let keep = rng.random_range(0..step.left) < step.keep_below;
        (if keep { step.kept } else { step.dropped }, keep)
    }
}

/// Runs selection sampling over one batch's rows (`ordered`, by stripe from `starts`) in
/// `stripes`. A stripe's lock is held for its rows of one batch: plain loads and stores, whose
/// cache misses the processor overlaps (atomic read-modify-writes would serialise them), the
/// more so as each row's entry is fetched a few rows ahead. Stripes another partition holds are
/// left for a second round; each batch starts at a random stripe so that two partitions seldom
/// meet.
fn visit_stripes<W: Word>(
    stripes: &[Mutex<Vec<W>>],
    ordered: &[(u32, u32)],
    starts: &[usize],
    rules: &Rules,
    rng: &mut rand::rngs::StdRng,
    kept: &mut arrow::array::BooleanBufferBuilder,
) {
    let mut visit = |stripe: usize, progress: &mut [W], rng: &mut rand::rngs::StdRng| {
        let rows = &ordered[starts[stripe]..starts[stripe + 1]];
        for (i, &(row, slot)) in rows.iter().enumerate() {
            if let Some(&(_, ahead)) = rows.get(i + PREFETCH_ROWS) {
                prefetch(progress.get(ahead as usize));
            }
            let state = &mut progress[slot as usize];
            let (next, keep) = state.visit(rules, rng);
            *state = next;
            kept.set_bit(row as usize, keep);
        }
    };
    let first = rng.random_range(0..stripes.len().max(1));
    let mut busy = Vec::new();
    for stripe in (first..stripes.len()).chain(0..first) {
        if starts[stripe] == starts[stripe + 1] {
            continue;
        }
        match stripes[stripe].try_lock() {
            Ok(mut progress) => visit(stripe, &mut progress, rng),
            Err(std::sync::TryLockError::Poisoned(p)) => visit(stripe, &mut p.into_inner(), rng),
            Err(std::sync::TryLockError::WouldBlock) => busy.push(stripe),
        }
    }
    for stripe in busy {
        let mut progress = stripes[stripe].lock().unwrap_or_else(|p| p.into_inner());
        visit(stripe, &mut progress, rng);
    }
}

/// A table hasher for 64-bit person keys: one multiply and a fold (SipHash's cost dominated
/// the filter). Not keyed: persons' ids come from the domain's data, not from the analyst, and
/// string ids arrive already hashed with a per-query random key.
#[derive(Clone, Copy, Default)]
pub(super) struct MixHasher;

impl BuildHasher for MixHasher {
    type Hasher = Mix;
    fn build_hasher(&self) -> Mix {
        Mix(0)
    }
}

pub(super) struct Mix(u64);

impl Hasher for Mix {
    fn finish(&self) -> u64 {
        let x = (self.0 as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (x as u64) ^ ((x >> 64) as u64)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_i64(&mut self, i: i64) {
        self.0 = i as u64;
    }
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection")
            .field("max_rows", &self.max_rows)
            .field("dense", &matches!(self.index, Index::Dense { .. }))
            .finish_non_exhaustive()
    }
}

/// Each row's hash of `columns`, keyed by `hasher` (the query's own random key).
fn group_hashes(
    hasher: &std::collections::hash_map::RandomState,
    columns: &[ArrayRef],
) -> Result<Vec<u64>> {
    let rows = columns.first().map_or(0, |c| c.len());
    let mut hashes = vec![0u64; rows];
    datafusion::common::hash_utils::create_hashes_with_hasher(columns, hasher, &mut hashes)?;
    Ok(hashes)
}

/// Calls `f(row, key)` for each row of a person column (`None` for a null id).
fn for_each_key(
    unit: &ArrayRef,
    hasher: &std::collections::hash_map::RandomState,
    mut f: impl FnMut(usize, Option<UnitKey>),
) -> Result<()> {
    match unit.data_type() {
        DataType::Int64 => unit
            .as_primitive::<Int64Type>()
            .iter()
            .enumerate()
            .for_each(|(i, k)| f(i, k)),
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => {
            let ids = arrow::compute::cast(unit, &DataType::Int64)?;
            ids.as_primitive::<Int64Type>()
                .iter()
                .enumerate()
                .for_each(|(i, k)| f(i, k))
        }
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => {
            let ids = arrow::compute::cast(unit, &DataType::Utf8)?;
            for (i, s) in ids.as_string::<i32>().iter().enumerate() {
                f(
                    i,
                    s.map(|s| {
                        let mut h = hasher.build_hasher();
                        s.hash(&mut h);
                        h.finish() as i64
                    }),
                )
            }
        }
        other => return internal_err!("a person id of type {other} cannot be bounded"),
    }
    Ok(())
}

impl Selection {
    /// Pass 2: keep or drop each row of one batch. Rows where `wanted` is not true (the
    /// query's own filters) are dropped without touching anyone's allowance.
    pub(super) fn keep(&self, unit: &ArrayRef, wanted: &BooleanArray) -> Result<BooleanArray> {
        self.keep_rows(unit, wanted, None)
    }

    /// As [`Selection::keep`], under a group bound: rows outside the person's chosen groups
    /// are dropped without touching their allowance either.
    pub(super) fn keep_grouped(
        &self,
        unit: &ArrayRef,
        wanted: &BooleanArray,
        hashes: &[u64],
    ) -> Result<BooleanArray> {
        self.keep_rows(unit, wanted, Some(hashes))
    }

    /// Each row's group hash, keyed as pass 1's.
    pub(super) fn group_hashes(&self, columns: &[ArrayRef]) -> Result<Vec<u64>> {
        group_hashes(&self.hasher, columns)
    }

    fn keep_rows(
        &self,
        unit: &ArrayRef,
        wanted: &BooleanArray,
        hashes: Option<&[u64]>,
    ) -> Result<BooleanArray> {
        let mut rng = {
            let mut seeds = self.seeds.lock().unwrap_or_else(|p| p.into_inner());
            rand::rngs::StdRng::from_rng(&mut *seeds)
        };
        // Slots first, outside the locks (hash lookups run on both partitions at once).
        let mut slots: Vec<(u32, u32)> = Vec::with_capacity(unit.len());
        let everything = wanted.null_count() == 0 && wanted.true_count() == wanted.len();
        match (
            &self.index,
            &self.groups,
            unit.as_primitive_opt::<Int64Type>(),
        ) {
            // The common case in a loop of its own: integer ids without nulls in a dense table.
            (Index::Dense { min, slots: n }, None, Some(ids)) if ids.null_count() == 0 => {
                let (min, n) = (*min, *n as u64);
                for (row, &id) in ids.values().iter().enumerate() {
                    let slot = id.wrapping_sub(min) as u64;
                    if slot < n && (everything || wanted.value(row)) {
                        slots.push((row as u32, slot as u32));
                    }
                }
            }
            _ => for_each_key(unit, &self.hasher, |row, key| {
                if wanted.is_valid(row) && wanted.value(row) {
                    if let Some(slot) = key.and_then(|key| self.index.slot(key)) {
                        let in_group = match (&self.groups, hashes) {
                            (Some(g), Some(h)) => g.chosen(slot, h[row]),
                            (None, _) => true,
                            // A group bound with no groups given keeps nothing.
                            (Some(_), None) => false,
                        };
                        if in_group {
                            slots.push((row as u32, slot as u32));
                        }
                    }
                }
            })?,
        }
        let mut kept = arrow::array::BooleanBufferBuilder::new(unit.len());
        kept.append_n(unit.len(), false);
        // The batch's rows by stripe, each stripe's in the order they came (a counting sort).
        let stripes = self.progress.len();
        let mut starts = vec![0usize; stripes + 1];
        for (_, slot) in &slots {
            starts[*slot as usize / STRIPE_SLOTS + 1] += 1;
        }
        for i in 0..stripes {
            starts[i + 1] += starts[i];
        }
        let mut ordered = vec![(0u32, 0u32); slots.len()];
        let mut next = starts.clone();
        for (row, slot) in slots {
            let stripe = slot as usize / STRIPE_SLOTS;
            ordered[next[stripe]] = (row, (slot as usize % STRIPE_SLOTS) as u32);
            next[stripe] += 1;
        }
        match &self.progress {
            Stripes::Byte(s) => {
                visit_stripes(s, &ordered, &starts, &self.rules, &mut rng, &mut kept)
            }
            Stripes::Tiny(s) => {
                visit_stripes(s, &ordered, &starts, &self.rules, &mut rng, &mut kept)
            }
            Stripes::Narrow(s) => {
                visit_stripes(s, &ordered, &starts, &self.rules, &mut rng, &mut kept)
            }
            Stripes::Wide(s) => {
                visit_stripes(s, &ordered, &starts, &self.rules, &mut rng, &mut kept)
            }
        }
        Ok(BooleanArray::new(kept.finish(), None))
    }
}

/// Runs pass 1 over `source` (the scan and its filters) and returns pass 2's selection.
/// Integer ids first get their range (one vectorised aggregate), so that a narrow range is
/// counted in a flat table rather than a hash table.
pub(super) async fn select(
    session: &JobSession,
    source: &LogicalPlan,
    unit: &UnitBound,
) -> Result<Arc<Selection>, GateError> {
    let max_rows = u32::try_from(unit.max_rows).map_err(|_| internal())?;
    let column = Expr::Column(unit.key.clone());
    let integer = source
        .schema()
        .qualified_field_from_column(&unit.key)
        .map(|(_, f)| f)
        .map(|f| f.data_type().is_integer())
        .unwrap_or(false);
    // The ids' range: from the Parquet file's statistics where it has them (the rows a join
    // or filters yield are among the table's), else one vectorised pass.
    let traced = super::plan::scan_column_of(source, &unit.key);
    let range = if let Some(range) = traced
        .as_ref()
        .and_then(|(table, column)| session.integer_range(table, column))
    {
        Some(range)
    } else if integer {
        let plan = LogicalPlanBuilder::from(source.clone())
            .aggregate(
                Vec::<Expr>::new(),
                vec![
                    min(column.clone()),
                    max(column.clone()),
                    count(column.clone()),
                ],
            )
            .and_then(|b| b.build())
            .map_err(|_| internal())?;
        let out = session.execute(plan).await?;
        let scalar = |c: usize| -> Option<i64> {
            let b = out.0.iter().find(|b| b.num_rows() > 0)?;
            match ScalarValue::try_from_array(b.column(c), 0)
                .ok()?
                .cast_to(&DataType::Int64)
                .ok()?
            {
                ScalarValue::Int64(v) => v,
                _ => None,
            }
        };
        match (scalar(0), scalar(1), scalar(2)) {
            (Some(lo), Some(hi), Some(rows)) => Some((lo, hi, rows.max(0) as u64)),
            _ => None,
        }
    } else {
        None
    };
    let mut counter = Counter::new(max_rows, range);
    counter
        .account_in(&session.memory_pool())
        .map_err(|_| query_failed())?;
    let mut projection = vec![column];
    if let Some(g) = &unit.groups {
        let max_groups = usize::try_from(g.max_groups).map_err(|_| internal())?;
        counter = counter
            .with_groups(max_groups)
            .map_err(|_| query_failed())?;
        for c in &g.columns {
            projection.push(scan_column(source, c)?);
        }
    }
    let plan = LogicalPlanBuilder::from(source.clone())
        .project(projection)
        .and_then(|b| b.build())
        .map_err(|_| internal())?;
    let grouped = unit.groups.is_some();
    // Each of DataFusion's partitions counts into a counter of its own, on its own task; the
    // counts are added up at the end.
    let forks = session
        .fold_partitions(
            plan,
            || {
                counter
                    .fork()
                    .map_err(|_| crate::engine::EngineError::Execution)
            },
            move |fork: &mut Counter, batch| {
                let counted = if grouped {
                    fork.group_hashes(&batch.columns()[1..])
                        .and_then(|h| fork.add_grouped(batch.column(0), &h))
                } else {
                    fork.add(batch.column(0))
                };
                counted
                    .and_then(|()| fork.account(0))
                    .map_err(|_| crate::engine::EngineError::Execution)
            },
        )
        .await?;
    // Into the first partition's counts: the template's own table is never touched (so never
    // paged in).
    let mut forks = forks.into_iter();
    let mut counted = forks.next().unwrap_or(counter);
    for fork in forks {
        counted.merge(fork).map_err(|_| query_failed())?;
    }
    Ok(Arc::new(counted.finish()?))
}

/// Pass 1's input: the one scan of `plan` with the filters directly on it, or, for a join,
/// the topmost join with the filters directly on it.
pub(super) fn source(plan: &LogicalPlan) -> Option<&LogicalPlan> {
    if scan_with_filters(plan) || joined(plan) {
        return Some(plan);
    }
    plan.inputs().into_iter().find_map(source)
}

/// Whether `plan` is a join under a chain of filters (or none).
pub(super) fn joined(plan: &LogicalPlan) -> bool {
    matches!(split_filters(plan).0, LogicalPlan::Join(_))
}

/// Pass 2's decision for `plan`, a scan or join under the query's filters: the scan (or join)
/// without them, and `unseen_keep` over its rows, true for the rows to aggregate. The query's
/// own filters become keep's second argument rather than filters below it: DataFusion merges
/// adjacent filters into one AND, whose sides see every row, so keep must itself skip the rows
/// the query drops (as pass 1 did) to sample the right ones.
pub(super) fn keep_expr<'a>(
    plan: &'a LogicalPlan,
    unit: &UnitBound,
    selection: &Arc<Selection>,
) -> Result<(&'a LogicalPlan, Expr), GateError> {
    let (scan, predicates) = split_filters(plan);
    let predicate = predicates
        .into_iter()
        .reduce(Expr::and)
        .unwrap_or_else(|| lit(true));
    let mut args = vec![Expr::Column(unit.key.clone()), predicate];
    for c in unit.groups.iter().flat_map(|g| &g.columns) {
        args.push(scan_column(plan, c)?);
    }
    let keep = ScalarUDF::new_from_impl(Keep {
        selection: selection.clone(),
        signature: Signature::any(args.len(), Volatility::Volatile),
    })
    .call(args);
    Ok((scan, keep))
}

/// `scan` with every column it has and pass 2's decision `keep` beside them, as the column
/// [`KEEP_COLUMN`]. A volatile expression in a projection stays where it is: keep runs once on
/// every row of `scan`.
pub(super) fn with_keep_column(scan: &LogicalPlan, keep: Expr) -> Result<LogicalPlan, GateError> {
    let mut columns: Vec<Expr> = scan
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    columns.push(keep.alias(KEEP_COLUMN));
    LogicalPlanBuilder::from(scan.clone())
        .project(columns)
        .and_then(|b| b.build())
        .map_err(|_| internal())
}

/// Whether `plan` is one table's scan under a chain of filters (or none).
pub(super) fn scan_with_filters(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::TableScan(_) => true,
        LogicalPlan::Filter(f) => scan_with_filters(&f.input),
        _ => false,
    }
}

/// `plan` with its scan (and the filters directly on it) followed by pass 2's filter.
pub(super) fn bound_contributions(
    plan: &LogicalPlan,
    unit: &UnitBound,
    selection: &Arc<Selection>,
) -> Result<LogicalPlan, GateError> {
    if scan_with_filters(plan) || joined(plan) {
        let (scan, keep) = keep_expr(plan, unit, selection)?;
        if joined(plan) {
            // Above a join, a filter on one side's columns would be pushed into both sides
            // (the join equates them), and keep would see each side's rows instead of the
            // join's. A filter on a projected column stays above the projection.
            let columns: Vec<Expr> = scan
                .schema()
                .columns()
                .into_iter()
                .map(Expr::Column)
                .collect();
            return LogicalPlanBuilder::from(with_keep_column(scan, keep)?)
                .filter(Expr::Column(Column::new_unqualified(KEEP_COLUMN)))
                .and_then(|b| b.project(columns))
                .and_then(|b| b.build())
                .map_err(|_| internal());
        }
        return LogicalPlanBuilder::from(scan.clone())
            .filter(keep)
            .and_then(|b| b.build())
            .map_err(|_| internal());
    }
    let inputs = plan
        .inputs()
        .into_iter()
        .map(|p| bound_contributions(p, unit, selection))
        .collect::<Result<Vec<_>, _>>()?;
    plan.with_new_exprs(plan.expressions(), inputs)
        .map_err(|_| internal())
}

/// The column pass 2's decision is projected into (see [`with_keep_column`]).
pub(super) const KEEP_COLUMN: &str = "__unseen_keep";

/// The scan (or join) under a chain of filters, and the filters' predicates.
pub(super) fn split_filters(plan: &LogicalPlan) -> (&LogicalPlan, Vec<Expr>) {
    match plan {
        LogicalPlan::Filter(f) => {
            let (scan, mut predicates) = split_filters(&f.input);
            predicates.push(f.predicate.clone());
            (scan, predicates)
        }
        other => (other, Vec::new()),
    }
}

/// The scan's column called `name`.
fn scan_column(plan: &LogicalPlan, name: &str) -> Result<Expr, GateError> {
    let (qualifier, field) = plan
        .schema()
        .qualified_field_with_unqualified_name(name)
        .map_err(|_| internal())?;
    Ok(Expr::Column(Column::new(qualifier.cloned(), field.name())))
}

/// The query's own failure (its debit stays), as for any execution error.
fn query_failed() -> GateError {
    crate::engine::EngineError::Execution.into()
}

fn internal() -> GateError {
    GateError::refused(
        "internal",
        "the gate could not bound each person's contribution for this query",
    )
}

/// Pass 2's filter. Volatile, so DataFusion never folds, reorders past it or pushes it into the
/// scan. Built only here; guest SQL cannot name it.
#[derive(Debug)]
struct Keep {
    selection: Arc<Selection>,
    signature: Signature,
}

impl PartialEq for Keep {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.selection, &other.selection)
    }
}

impl Eq for Keep {}

impl Hash for Keep {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.selection) as usize).hash(state);
    }
}

impl ScalarUDFImpl for Keep {
    fn name(&self) -> &str {
        "unseen_keep"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [unit, wanted, groups @ ..] = args.args.as_slice() else {
            return internal_err!("unseen_keep takes the person column and the query's filter");
        };
        let unit = unit.to_array(args.number_rows)?;
        let wanted = wanted.to_array(args.number_rows)?;
        let Some(wanted) = wanted.as_boolean_opt() else {
            return internal_err!("unseen_keep's filter is not boolean");
        };
        let kept = if groups.is_empty() {
            self.selection.keep(&unit, wanted)?
        } else {
            let columns = groups
                .iter()
                .map(|g| g.to_array(args.number_rows))
                .collect::<Result<Vec<_>>>()?;
            let hashes = self.selection.group_hashes(&columns)?;
            self.selection.keep_grouped(&unit, wanted, &hashes)?
        };
        Ok(ColumnarValue::Array(Arc::new(kept)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};

    fn ids(v: Vec<i64>) -> ArrayRef {
        Arc::new(Int64Array::from(v))
    }

    /// Both tables: hashed, and dense over ids `lo..=hi`.
    fn counters(k: u32, lo: i64, hi: i64, rows: u64) -> [Counter; 2] {
        let dense = Counter::new(k, Some((lo, hi, rows)));
        assert!(matches!(dense.index, Index::Dense { .. }));
        [Counter::new(k, None), dense]
    }

    /// Rows 0..n of one person, k kept: exactly k every time, and every row equally likely.
    #[test]
    fn selection_sampling_keeps_exactly_k_rows_each_equally_often() {
        let (n, k, trials) = (12usize, 4u32, 6000);
        // Another person's 60 rows make the states too many for one-byte words.
        for (table, other, bytes) in [(0, 0, 1), (1, 0, 1), (0, 60, 2), (1, 60, 2)] {
            let mut hits = vec![0u32; n];
            for _ in 0..trials {
                let mut counter = counters(k, 7, 8, n as u64).into_iter().nth(table).unwrap();
                counter
                    .add(&ids([vec![7; n], vec![8; other]].concat()))
                    .unwrap();
                let s = counter.finish().unwrap();
                assert_eq!(s.progress.word_bytes(), bytes);
                // Two batches, as DataFusion would send them.
                let kept: Vec<bool> = [ids(vec![7; 5]), ids(vec![7; n - 5])]
                    .iter()
                    .flat_map(|b| {
                        s.keep(b, &BooleanArray::from(vec![true; b.len()]))
                            .unwrap()
                            .iter()
                            .map(Option::unwrap)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                assert_eq!(kept.iter().filter(|k| **k).count() as u32, k);
                for (i, k) in kept.iter().enumerate() {
                    hits[i] += *k as u32;
                }
            }
            // Each row is kept with probability k/n = 1/3: 2000 of 6000, sd ≈ 36.5; 6 sd allowed.
            for (i, h) in hits.iter().enumerate() {
                assert!(
                    (*h as f64 - 2000.0).abs() < 220.0,
                    "table {table}, {bytes}-byte words, row {i}: {h} {hits:?}"
                );
            }
        }
    }

    #[test]
    fn rows_beyond_what_pass_one_saw_and_unknown_persons_are_dropped() {
        // Dense over 1..=2, so person 3 (and 0) fall outside the table.
        for mut counter in counters(3, 1, 2, 7) {
            counter.add(&ids(vec![1, 1, 2, 2, 2, 2, 2])).unwrap();
            let s = counter.finish().unwrap();
            // Person 1 was counted with 2 rows but shows 6; person 2 shows 9 of 5; 3 and 0 none.
            let batch = ids([[1i64; 6].as_slice(), &[2; 9], &[3; 4], &[0; 2]].concat());
            // Row 0 is one the query's filter dropped: it uses none of person 1's allowance.
            let mut wanted = vec![true; batch.len()];
            wanted[0] = false;
            let kept = s.keep(&batch, &BooleanArray::from(wanted)).unwrap();
            assert!(!kept.value(0));
            let count = |range: std::ops::Range<usize>| range.filter(|i| kept.value(*i)).count();
            assert_eq!(
                count(0..6),
                3,
                "person 1: all of the 2 counted, then up to k"
            );
            assert_eq!(count(6..15), 3, "person 2");
            assert_eq!(count(15..21), 0, "persons 3 and 0 were never counted");
        }
    }

    /// Two threads (as DataFusion's two partitions) on the same persons at once: still exactly
    /// k rows of each person with more than k, every row of the others.
    #[test]
    fn concurrent_partitions_never_keep_more_than_k() {
        // Enough persons for three stripes of pass 2's table.
        let (persons, k) = (70_000i64, 3u32);
        // Person p has p % 8 + 1 rows in each of two halves.
        let half: Vec<i64> = (0..persons)
            .flat_map(|p| std::iter::repeat_n(p, (p % 8 + 1) as usize))
            .collect();
        for mut counter in counters(k, 0, persons - 1, 2 * half.len() as u64) {
            counter.add(&ids(half.clone())).unwrap();
            counter.add(&ids(half.clone())).unwrap();
            let s = counter.finish().unwrap();
            let kept: Vec<Vec<bool>> = std::thread::scope(|scope| {
                let run = || {
                    // Many small batches, so the threads interleave.
                    half.chunks(7)
                        .flat_map(|c| {
                            let b = ids(c.to_vec());
                            let keep = s.keep(&b, &BooleanArray::from(vec![true; c.len()]));
                            keep.unwrap().iter().map(Option::unwrap).collect::<Vec<_>>()
                        })
                        .collect::<Vec<_>>()
                };
                let a = scope.spawn(run);
                let b = scope.spawn(run);
                vec![a.join().unwrap(), b.join().unwrap()]
            });
            let mut per_person = vec![0u32; persons as usize];
            for side in &kept {
                for (p, keep) in half.iter().zip(side) {
                    per_person[*p as usize] += *keep as u32;
                }
            }
            for (p, n) in per_person.iter().enumerate() {
                assert_eq!(*n, (2 * (p as u32 % 8 + 1)).min(k), "person {p}");
            }
        }
    }

    /// Pass 1 on several partitions: counts (and a group bound's chosen groups) made in forks
    /// and merged are those of one counter over every row, for both tables.
    #[test]
    fn partitions_counted_apart_and_merged_count_as_one() {
        let persons: Vec<i64> = (0..3000).map(|i| (i * 7919) % 400).collect();
        let cells: ArrayRef = Arc::new(StringArray::from(
            (0..3000)
                .map(|i| format!("c{}", i % 23))
                .collect::<Vec<_>>(),
        ));
        for grouped in [false, true] {
            for table in 0..2 {
                let fresh = || {
                    let c = counters(5, 0, 399, 3000).into_iter().nth(table).unwrap();
                    if grouped {
                        c.with_groups(3).unwrap()
                    } else {
                        c
                    }
                };
                let count = |c: &mut Counter, range: std::ops::Range<usize>| {
                    let unit = ids(persons[range.clone()].to_vec());
                    if grouped {
                        let h = c
                            .group_hashes(&[cells.slice(range.start, range.len())])
                            .unwrap();
                        c.add_grouped(&unit, &h).unwrap();
                    } else {
                        c.add(&unit).unwrap();
                    }
                };
                // Forks share the template's key, so their group hashes are comparable.
                let template = fresh();
                let mut whole = template.fork().unwrap();
                count(&mut whole, 0..3000);
                let (mut a, mut b) = (template.fork().unwrap(), template.fork().unwrap());
                count(&mut a, 0..1234);
                count(&mut b, 1234..3000);
                a.merge(b).unwrap();
                let totals = |c: &Counter| -> std::collections::BTreeMap<i64, (u32, Vec<u64>)> {
                    (0..400i64)
                        .filter_map(|p| {
                            let slot = c.index.slot(p)?;
                            let groups = c.groups.as_ref().map_or(Vec::new(), |g| {
                                let mut h: Vec<u64> =
                                    g.of(slot).iter().filter(|e| e.1 > 0).map(|e| e.0).collect();
                                h.sort();
                                h
                            });
                            let rows = match &c.groups {
                                Some(g) => g.of(slot).iter().map(|e| e.1).sum(),
                                None => c.rows.counts().get(slot),
                            };
                            Some((p, (rows, groups)))
                        })
                        .collect()
                };
                let (merged, one) = (totals(&a), totals(&whole));
                assert_eq!(merged.len(), 400);
                assert_eq!(merged, one, "grouped {grouped}, table {table}");
            }
        }
    }

    /// One-byte words, for every bound k ≤ 255 and every state they are chosen for: unpacking
    /// (the multiply-shift in place of a division by k + 1) gives back what was packed, and a
    /// person pass 1 counted starts with all their rows to come and none kept.
    #[test]
    fn one_byte_words_unpack_every_state_they_pack() {
        for k in 0u32..=255 {
            let c = Codec::new(k);
            let most = 256 / (k + 1) - 1;
            for left in 0..=most {
                for taken in 0..=k {
                    let word = <u8 as Word>::pack(left, taken, c);
                    assert_eq!(word.unpack(c), (left, taken), "k = {k}");
                }
                if left > 0 {
                    assert_eq!(<u8 as Word>::start(left, c).unpack(c), (left, 0), "k = {k}");
                }
            }
            assert_eq!(
                <u8 as Word>::start(0, c).unpack(c),
                (0, k),
                "k = {k}: spent"
            );
        }
    }

    /// One-byte words' looked-up transitions make, for every bound, state and draw, the
    /// decision and the next state that the arithmetic of [`Word::visit`] makes.
    #[test]
    fn one_byte_steps_decide_as_the_arithmetic() {
        // Bounds one-byte words never serve build no table, the largest included (k + 1
        // does not fit a u32: this overflowed in debug builds before the guard).
        assert!(
            Rules::new(u32::MAX)
                .steps
                .iter()
                .all(|s| s.left == 1 && s.keep_below == 0)
        );
        for k in 0u32..=255 {
            let rules = Rules::new(k);
            let c = rules.codec;
            let most = 256 / (k + 1) - 1;
            for left in 0..=most {
                for taken in 0..=k {
                    let word = <u8 as Word>::pack(left, taken, c);
                    let step = rules.steps[usize::from(word)];
                    assert_eq!(step.left, left.max(1), "k = {k}");
                    for draw in 0..left.max(1) {
                        let need = k.saturating_sub(taken);
                        let keep = (taken < k) & ((left <= need) | (draw < need));
                        let next =
                            <u8 as Word>::pack(left.saturating_sub(1), taken + keep as u32, c);
                        let looked_up = draw < step.keep_below;
                        assert_eq!(
                            looked_up, keep,
                            "k = {k}, left {left}, taken {taken}, draw {draw}"
                        );
                        let after = if looked_up { step.kept } else { step.dropped };
                        assert_eq!(
                            after, next,
                            "k = {k}, left {left}, taken {taken}, draw {draw}"
                        );
                    }
                }
            }
        }
    }

    /// Pass 1's one-byte counts wrap past 255 into notes on the side: counts of hundreds of rows,
    /// counted in forks and merged (carries from both the rows and the merge), come out exact.
    #[test]
    fn counts_past_255_survive_wrapping_and_merging() {
        for table in 0..2 {
            let template = counters(1000, 0, 3, 5000).into_iter().nth(table).unwrap();
            let (mut a, mut b) = (template.fork().unwrap(), template.fork().unwrap());
            // Person p has 200 + 100·p rows in each fork: sums of 400 to 1000, some of them
            // wrapping only when the forks are added.
            for p in 0..4i64 {
                a.add(&ids(vec![p; 200 + 100 * p as usize])).unwrap();
                b.add(&ids(vec![p; 200 + 100 * p as usize])).unwrap();
            }
            a.merge(b).unwrap();
            let counts = a.rows.counts();
            for p in 0..4i64 {
                let slot = a.index.slot(p).unwrap();
                assert_eq!(
                    counts.get(slot),
                    400 + 200 * p as u32,
                    "table {table}, person {p}"
                );
            }
            assert_eq!(counts.most(), 1000);
        }
    }

    /// Bounds above 255 (or counts of 2²⁴ and more) take eight-byte words; k = 255 with more
    /// rows than 255 still fits four, and with at most 255 two, where an uncounted person's
    /// spent allowance is exactly k.
    #[test]
    fn large_bounds_take_wide_words_and_keep_exactly_k() {
        for (k, first, second, bytes) in [
            (300u32, 1000, 100, 8),
            (255, 1000, 100, 4),
            (255, 255, 100, 2),
            (10, 200, 100, 2),
            (10, 20, 5, 1),
            (0, 255, 5, 1),
        ] {
            for mut counter in counters(k, 1, 3, 1500) {
                let batch = ids([vec![1i64; first], vec![2; second]].concat());
                counter.add(&batch).unwrap();
                let s = counter.finish().unwrap();
                assert_eq!(s.progress.word_bytes(), bytes, "k = {k}, {first} rows");
                // Person 3 was never counted.
                let batch = ids([vec![1i64; first], vec![2; second], vec![3; 400]].concat());
                let kept = s
                    .keep(&batch, &BooleanArray::from(vec![true; batch.len()]))
                    .unwrap();
                let count = |r: std::ops::Range<usize>| r.filter(|i| kept.value(*i)).count();
                let k = k as usize;
                assert_eq!(count(0..first), k.min(first), "k = {k}");
                assert_eq!(count(first..first + second), second.min(k));
                assert_eq!(count(first + second..first + second + 400), 0);
            }
        }
    }

    #[test]
    fn wide_or_huge_id_ranges_get_the_hashed_table() {
        assert!(matches!(
            Counter::new(3, Some((0, 10_000, 100))).index,
            Index::Hashed(_)
        ));
        assert!(matches!(
            Counter::new(3, Some((i64::MIN, i64::MAX, u64::MAX))).index,
            Index::Hashed(_)
        ));
        assert!(matches!(
            Counter::new(3, Some((-5, 1000, 300))).index,
            Index::Dense { .. }
        ));
    }

    /// The per-person tables draw on the job's memory pool: a table the pool has no room for
    /// fails the query instead of growing past the configured memory.
    #[test]
    fn per_person_tables_are_counted_in_the_jobs_memory_pool() {
        use datafusion::execution::memory_pool::GreedyMemoryPool;
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(64 << 10));
        // Dense over 100,000 ids: 100 KB up front.
        let mut dense = Counter::new(3, Some((0, 99_999, 100_000)));
        assert!(dense.account_in(&pool).is_err());
        // Hashed: fits for a while, then the pool runs out as persons arrive.
        let mut hashed = Counter::new(3, None);
        hashed.account_in(&pool).unwrap();
        hashed.add(&ids((0..100).collect())).unwrap();
        hashed.account(0).unwrap();
        assert!(pool.reserved() > 0);
        hashed.add(&ids((0..100_000).collect())).unwrap();
        assert!(hashed.account(0).is_err());
        // A small table fits, pass 2's included, and gives its memory back when dropped.
        drop(hashed);
        assert_eq!(pool.reserved(), 0);
        let mut small = Counter::new(3, Some((0, 999, 1000)));
        small.account_in(&pool).unwrap();
        small.add(&ids((0..1000).collect())).unwrap();
        let selection = small.finish().unwrap();
        assert_eq!(
            pool.reserved(),
            1000,
            "pass 2's one-byte words; pass 1's counts given back"
        );
        drop(selection);
        assert_eq!(pool.reserved(), 0);
        // Group entries are drawn before they are allocated: 1,000 persons × 64 groups × 16
        // bytes does not fit, and nothing is left reserved.
        let mut grouped = Counter::new(3, Some((0, 999, 1000)));
        grouped.account_in(&pool).unwrap();
        assert!(grouped.with_groups(64).is_err());
        assert_eq!(pool.reserved(), 0);
    }

    /// One person with 3 rows in each of 10 groups, g = 2, k = 4: exactly 4 rows kept, all in
    /// at most 2 groups, and every group kept equally often over trials (the g groups are a
    /// uniformly random choice). A person with g groups or fewer loses no group.
    #[test]
    fn group_bounds_keep_rows_of_at_most_g_groups_chosen_at_random() {
        let (groups, per, g, k, trials) = (10usize, 3usize, 2usize, 4u32, 2000);
        let n = groups * per;
        let person = ids(vec![7; n]);
        let cells: ArrayRef = Arc::new(StringArray::from(
            (0..n)
                .map(|i| format!("c{}", i % groups))
                .collect::<Vec<_>>(),
        ));
        let everything = BooleanArray::from(vec![true; n]);
        let mut seen = vec![0u32; groups];
        for table in 0..2 {
            for _ in 0..trials {
                let counter = counters(k, 7, 7, n as u64).into_iter().nth(table).unwrap();
                let mut counter = counter.with_groups(g).unwrap();
                let h = counter.group_hashes(&[cells.clone()]).unwrap();
                counter.add_grouped(&person, &h).unwrap();
                let s = counter.finish().unwrap();
                let h = s.group_hashes(&[cells.clone()]).unwrap();
                let kept = s.keep_grouped(&person, &everything, &h).unwrap();
                let rows: Vec<usize> = (0..n).filter(|&i| kept.value(i)).collect();
                assert_eq!(
                    rows.len(),
                    k as usize,
                    "6 rows in the chosen groups, k of them"
                );
                let mut in_groups: Vec<usize> = rows.iter().map(|i| i % groups).collect();
                in_groups.dedup();
                in_groups.sort();
                in_groups.dedup();
                assert!(in_groups.len() <= g, "{in_groups:?}");
                in_groups.iter().for_each(|c| seen[*c] += 1);
            }
        }
        let mean = f64::from(seen.iter().sum::<u32>()) / groups as f64;
        assert!(
            seen.iter()
                .all(|&c| (f64::from(c) - mean).abs() < 0.15 * mean),
            "each group equally often: {seen:?}"
        );
        // Two groups, one row each: with g = 2 both rows stay.
        let few: ArrayRef = Arc::new(StringArray::from(vec!["a", "b"]));
        let mut counter = counters(k, 7, 7, 2)
            .into_iter()
            .nth(1)
            .unwrap()
            .with_groups(g)
            .unwrap();
        let h = counter.group_hashes(&[few.clone()]).unwrap();
        counter.add_grouped(&ids(vec![7, 7]), &h).unwrap();
        let s = counter.finish().unwrap();
        let h = s.group_hashes(&[few]).unwrap();
        let kept = s
            .keep_grouped(&ids(vec![7, 7]), &BooleanArray::from(vec![true; 2]), &h)
            .unwrap();
        assert_eq!(kept.true_count(), 2);
    }
}
