//! Aggregation by public keys without a hash table per query.
//!
//! With public keys the groups are known before the data is read: the catalogue's key lists,
//! combined in catalogue order. So instead of `GROUP BY`, the gate's plan computes each row's
//! slot in that order ([`KeyPositions`], a scalar function of the group columns) and folds
//! every measure into one vector of slots ([`DenseSlots`], an aggregate with no grouping).
//! DataFusion still runs the plan: scans, filters, contribution bounding, partitions, the
//! memory pool. What goes is the hash table per query: DataFusion's `GROUP BY` hashes and
//! probes every row (for a text key, most of a small job's CPU), where a slot is an index.
//!
//! The slots hold what the grouped plan would give the gate: rows per group, non-null values
//! per group, and fixed-point sums (wrapping, as DataFusion's integer `SUM`), zero for a group
//! with no rows. A row whose key is null or not public has no slot and is left out, as the
//! grouped path drops those groups. A value matches a key when its text (Arrow's cast to
//! `Utf8`) is the key's text, as in the grouped path.
//!
//! Finding a row's slot takes a lookup per row. For a table from the server's cache, the
//! positions of a column against a key list are kept with the table
//! ([`crate::engine::PositionMemo`]), so later jobs skip the lookups too.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, OnceLock};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBufferBuilder, Int64Array, ListArray, StringViewArray,
    UInt32Array, make_view,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Int64Type, UInt32Type};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature,
    Volatility,
};

use super::fixed_point::Convert;
use crate::engine::PositionMemo;

/// Each row's slot among the public keys of its group columns, in catalogue order
/// (`((p₀·n₁) + p₁)·n₂ + p₂ …`, as `QueryShape::key_product` lists the groups); null if some
/// column's value is null or not one of that column's keys.
#[derive(Debug)]
pub(crate) struct KeyPositions {
    /// Each group column's key texts, without duplicates.
    keys: Vec<Vec<String>>,
    /// The session's cached tables' memos.
    memos: Vec<Arc<PositionMemo>>,
    /// Each column's text lookup, built by the first batch that needs it.
    lookups: Vec<OnceLock<Option<DirectKeys>>>,
    signature: Signature,
}

impl KeyPositions {
    pub(crate) fn new(keys: Vec<Vec<String>>, memos: Vec<Arc<PositionMemo>>) -> Self {
        KeyPositions {
            lookups: keys.iter().map(|_| OnceLock::new()).collect(),
            keys,
            memos,
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }

    /// The positions of the `c`-th column's values in its key list, from a memo when the
    /// column is a cached table's own array.
    fn column(&self, c: usize, array: &ArrayRef) -> Result<Arc<UInt32Array>> {
        let (keys, lookup) = (&self.keys[c], &self.lookups[c]);
        for memo in &self.memos {
            if let Some(id) = memo.id_of(array.as_ref()) {
                if let Some(kept) = memo.get(id, keys) {
                    return Ok(kept);
                }
                let computed = Arc::new(positions(array, keys, lookup)?);
                memo.put(id, keys, computed.clone());
                return Ok(computed);
            }
        }
        Ok(Arc::new(positions(array, keys, lookup)?))
    }
}

impl PartialEq for KeyPositions {
    fn eq(&self, other: &Self) -> bool {
        self.keys == other.keys
            && self.memos.len() == other.memos.len()
            && self
                .memos
                .iter()
                .zip(&other.memos)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl Eq for KeyPositions {}

impl Hash for KeyPositions {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.keys.hash(state);
        for m in &self.memos {
            Arc::as_ptr(m).hash(state);
        }
    }
}

impl ScalarUDFImpl for KeyPositions {
    fn name(&self) -> &str {
        "unseen_key_position"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::UInt32)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if args.args.len() != self.keys.len() || self.keys.is_empty() {
            return internal_err!("unseen_key_position takes one argument per group column");
        }
        let rows = args.number_rows;
        let mut columns = Vec::with_capacity(self.keys.len());
        for (c, value) in args.args.iter().enumerate() {
            columns.push(self.column(c, &value.to_array(rows)?)?);
        }
        if columns.len() == 1 {
            return Ok(ColumnarValue::Array(columns.pop().expect("one column")));
        }
        // Combine, first column outermost; null where any column is.
        let mut slot = vec![0u32; rows];
        let mut nulls: Option<NullBuffer> = None;
        for (c, keys) in columns.iter().zip(&self.keys) {
            let n = keys.len() as u32;
            for (s, p) in slot.iter_mut().zip(c.values()) {
                *s = *s * n + *p;
            }
            nulls = NullBuffer::union(nulls.as_ref(), c.nulls());
        }
        Ok(ColumnarValue::Array(Arc::new(UInt32Array::new(
            slot.into(),
            nulls,
        ))))
    }
}

/// A slot where the row is kept, null where it is not: `unseen_slot_where(slot, keep)` folds
/// pass 2's decision into the slot, so that a person-bounded dense plan drops rows without a
/// filter copying every column it keeps (and the slots of a cached table's own key column
/// come from its memo, which a filtered copy would miss).
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct SlotWhere {
    signature: Signature,
}

impl SlotWhere {
    pub(crate) fn new() -> Self {
        SlotWhere {
            signature: Signature::exact(
                vec![DataType::UInt32, DataType::Boolean],
                // Its argument is volatile; the function itself is not.
                Volatility::Immutable,
            ),
        }
    }
}

impl ScalarUDFImpl for SlotWhere {
    fn name(&self) -> &str {
        "unseen_slot_where"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::UInt32)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [slot, keep] = args.args.as_slice() else {
            return internal_err!("unseen_slot_where takes a slot and a decision");
        };
        let (slot, keep) = (
            slot.to_array(args.number_rows)?,
            keep.to_array(args.number_rows)?,
        );
        let (Some(slot), Some(keep)) =
            (slot.as_primitive_opt::<UInt32Type>(), keep.as_boolean_opt())
        else {
            return internal_err!("unseen_slot_where takes a UInt32 slot and a Boolean decision");
        };
        if slot.len() != keep.len() {
            return internal_err!("unseen_slot_where: arguments of unequal length");
        }
        // Kept: the decision is true (a null decision keeps nothing) and the slot is valid.
        let mut kept = keep.values().clone();
        if let Some(n) = keep.nulls() {
            kept = &kept & n.inner();
        }
        if let Some(n) = slot.nulls() {
            kept = &kept & n.inner();
        }
        Ok(ColumnarValue::Array(Arc::new(UInt32Array::new(
            slot.values().clone(),
            Some(NullBuffer::new(kept)),
        ))))
    }
}

/// Each value's position in `keys` (null: a null value, or none of the keys), matched by
/// text. Integer columns are matched as integers (a key matches when its text is the value's
/// decimal text); everything else as Arrow's cast to text, through string views.
fn positions(
    array: &ArrayRef,
    keys: &[String],
    lookup: &OnceLock<Option<DirectKeys>>,
) -> Result<UInt32Array> {
    if array.data_type().is_integer() && array.data_type() != &DataType::UInt64 {
        let ints = arrow::compute::cast(array, &DataType::Int64)?;
        return Ok(integer_positions(ints.as_primitive::<Int64Type>(), keys));
    }
    let views = match array.data_type() {
        DataType::Utf8View => array.clone(),
        _ => {
            let text = arrow::compute::cast(array, &DataType::Utf8)?;
            arrow::compute::cast(&text, &DataType::Utf8View)?
        }
    };
    let views = views.as_string_view();
    Ok(match lookup.get_or_init(|| DirectKeys::new(keys)) {
        Some(direct) => direct.positions(views),
        None => hashed_view_positions(views, keys),
    })
}

fn integer_positions(values: &Int64Array, keys: &[String]) -> UInt32Array {
    // Keys that are integers in canonical decimal text; any other key matches no integer.
    let ints: Vec<Option<i64>> = keys
        .iter()
        .map(|k| k.parse::<i64>().ok().filter(|i| i.to_string() == *k))
        .collect();
    let first = ints.first().copied().flatten();
    let consecutive = first.is_some_and(|a| {
        ints.iter()
            .enumerate()
            .all(|(j, k)| *k == a.checked_add(j as i64))
    });
    let out: Vec<Option<u32>> = if let (true, Some(a)) = (consecutive, first) {
        let n = keys.len() as i128;
        values
            .iter()
            .map(|v| {
                let d = i128::from(v?) - i128::from(a);
                (0..n).contains(&d).then_some(d as u32)
            })
            .collect()
    } else {
        let mut map: HashMap<i64, u32, Mix> = HashMap::default();
        for (j, k) in ints.iter().enumerate() {
            if let Some(k) = k {
                map.entry(*k).or_insert(j as u32);
            }
        }
        values.iter().map(|v| map.get(&v?).copied()).collect()
    };
    UInt32Array::from(out)
}

/// The low bits of a string view that hold a string of up to 12 bytes: its length and bytes.
/// (Arrow pads the rest with zeros; masking makes the match independent of that.)
fn inline_word(view: u128) -> Option<u128> {
    let len = view as u32;
    (len <= 12).then(|| view & (u128::MAX >> (96 - 8 * len)))
}

/// Keys found in one probe, for a key list whose short keys (those a string view holds
/// inline) fall into distinct buckets of a small table under some multiplier: a row's view,
/// masked to its length and bytes, names one bucket, and either that bucket holds exactly
/// this word or the value is no short key. Longer values go through a hash map.
#[derive(Debug)]
struct DirectKeys {
    shift: u32,
    multiplier: u64,
    /// Per bucket, a short key's inline word, or `u128::MAX` (no view's word: its length
    /// field would be 2³² − 1) for an empty bucket.
    words: Vec<u128>,
    positions: Vec<u32>,
    long: HashMap<Vec<u8>, u32, Mix>,
}

/// The most buckets tried (2¹² of 20 bytes: 80 KiB, cache-resident).
const DIRECT_MAX_BITS: u32 = 12;

/// The most short keys tried: with *k* keys in *m* buckets, a multiplier spreads them without
/// a collision with probability about e^(−k²/2m), so beyond ~100 keys 2¹² buckets seldom do.
const DIRECT_MAX_KEYS: usize = 128;

impl DirectKeys {
    fn new(keys: &[String]) -> Option<Self> {
        let mut short: HashMap<u128, u32, Mix> = HashMap::default();
        let mut long: HashMap<Vec<u8>, u32, Mix> = HashMap::default();
        for (j, k) in keys.iter().enumerate() {
            match inline_word(make_view(k.as_bytes(), 0, 0)) {
                Some(w) => short.entry(w).or_insert(j as u32),
                None => long.entry(k.as_bytes().to_vec()).or_insert(j as u32),
            };
        }
        if short.len() > DIRECT_MAX_KEYS {
            return None;
        }
        let mut short: Vec<(u128, u32)> = short.into_iter().collect();
        short.sort_unstable_by_key(|e| e.1);
        // From k² buckets (no collision with probability ~e^(−½)), a few fixed odd
        // multipliers per size.
        let least = (short.len().max(2).pow(2))
            .next_power_of_two()
            .trailing_zeros();
        let mut candidate = 0x9e37_79b9_7f4a_7c15u64;
        for bits in least.min(DIRECT_MAX_BITS)..=DIRECT_MAX_BITS {
            for _ in 0..16 {
                candidate = candidate
                    .wrapping_mul(0xff51_afd7_ed55_8ccd)
                    .rotate_left(17)
                    | 1;
                let mut direct = DirectKeys {
                    shift: 64 - bits,
                    multiplier: candidate,
                    words: vec![u128::MAX; 1 << bits],
                    positions: vec![0; 1 << bits],
                    long: HashMap::default(),
                };
                let distinct = short.iter().all(|&(w, j)| {
                    let b = direct.bucket(w);
                    let free = direct.words[b] == u128::MAX;
                    direct.words[b] = w;
                    direct.positions[b] = j;
                    free
                });
                if distinct {
                    direct.long = long;
                    return Some(direct);
                }
            }
        }
        None
    }

    #[inline(always)]
    fn bucket(&self, word: u128) -> usize {
        let folded = (word as u64) ^ ((word >> 64) as u64).rotate_left(29);
        (folded.wrapping_mul(self.multiplier) >> self.shift) as usize
    }

    fn positions(&self, array: &StringViewArray) -> UInt32Array {
        let views = array.views();
        let n = views.len();
        let mut values = vec![0u32; n];
        let mut found = vec![0u64; n.div_ceil(64)];
        for (c, (chunk, out)) in views.chunks(64).zip(values.chunks_mut(64)).enumerate() {
            let mut bits = 0u64;
            for (j, (view, value)) in chunk.iter().zip(out.iter_mut()).enumerate() {
                let len = *view as u32;
                let (position, hit) = if len <= 12 {
                    let word = view & (u128::MAX >> (96 - 8 * len));
                    let b = self.bucket(word);
                    (self.positions[b], self.words[b] == word)
                } else if self.long.is_empty() {
                    (0, false)
                } else {
                    match self.long.get(array.value(c * 64 + j).as_bytes()) {
                        Some(p) => (*p, true),
                        None => (0, false),
                    }
                };
                *value = if hit { position } else { 0 };
                bits |= u64::from(hit) << j;
            }
            found[c] = bits;
        }
        let mut valid = arrow::buffer::BooleanBuffer::new(found.into(), 0, n);
        // A null row's view may hold anything: its own validity decides.
        if let Some(nulls) = array.nulls() {
            valid = &valid & nulls.inner();
        }
        UInt32Array::new(values.into(), Some(NullBuffer::new(valid)))
    }
}

/// Text positions through hash maps, for key lists [`DirectKeys`] cannot take.
fn hashed_view_positions(array: &StringViewArray, keys: &[String]) -> UInt32Array {
    let mut short: HashMap<u128, u32, Mix> = HashMap::default();
    let mut long: HashMap<&[u8], u32, Mix> = HashMap::default();
    for (j, k) in keys.iter().enumerate() {
        let word = inline_word(make_view(k.as_bytes(), 0, 0));
        match word {
            Some(w) => short.entry(w).or_insert(j as u32),
            None => long.entry(k.as_bytes()).or_insert(j as u32),
        };
    }
    let n = array.len();
    let mut values = Vec::with_capacity(n);
    let mut valid = BooleanBufferBuilder::new(n);
    for (i, view) in array.views().iter().enumerate() {
        let found = if array.is_null(i) {
            None
        } else {
            match inline_word(*view) {
                Some(w) => short.get(&w).copied(),
                None if long.is_empty() => None,
                None => long.get(array.value(i).as_bytes()).copied(),
            }
        };
        values.push(found.unwrap_or(0));
        valid.append(found.is_some());
    }
    UInt32Array::new(values.into(), Some(NullBuffer::new(valid.finish())))
}

/// A fast hasher for the key lookups: the keys come from the catalogue, not from callers.
#[derive(Default)]
struct MixHasher(u64);

type Mix = BuildHasherDefault<MixHasher>;

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^ (h >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x)
            .wrapping_mul(0xff51_afd7_ed55_8ccd)
            .rotate_left(31);
    }

    fn write_u128(&mut self, x: u128) {
        self.write_u64(x as u64);
        self.write_u64((x >> 64) as u64);
    }

    fn write_i64(&mut self, x: i64) {
        self.write_u64(x as u64);
    }

    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
}

/// What a measure folds into its slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Fold {
    /// Rows (arguments: the slot).
    Rows,
    /// Rows whose value is not null (the slot, the value).
    NonNull,
    /// The sum of a `Float64` value's fixed-point integer (`fixed_point.rs`), wrapping (the
    /// slot, the value): the conversion and the sum in one pass, with no column between them.
    Clamped(Convert),
}

impl Fold {
    fn takes_value(self) -> bool {
        !matches!(self, Fold::Rows)
    }
}

/// An aggregate (no `GROUP BY`) that folds rows into `slots` slots by their slot number, for
/// each of its folds, and returns the slots as one `List<Int64>`: the first fold's slots, then
/// the next fold's. Its arguments are the slot, then the value of each fold that takes one.
///
/// One aggregate for all of a query's measures reads the slot column once, and keeps a slot's
/// cells for every fold side by side, so a row's updates land in one cache line.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct DenseSlots {
    folds: Vec<Fold>,
    slots: usize,
    signature: Signature,
}

impl DenseSlots {
    pub(crate) fn new(folds: Vec<Fold>, slots: usize) -> Self {
        DenseSlots {
            folds,
            slots,
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

fn slots_type() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true)))
}

impl AggregateUDFImpl for DenseSlots {
    fn name(&self) -> &str {
        folds_name(&self.folds)
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(slots_type())
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(SlotsAccumulator::new(
            self.folds.clone(),
            self.slots,
        )))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[slots]", args.name),
            slots_type(),
            true,
        ))])
    }
}

/// The folds' cells, slot by slot: slot `s`'s cell for fold `f` is `cells[s·folds + f]`.
#[derive(Debug)]
struct SlotsAccumulator {
    folds: Vec<Fold>,
    slots: usize,
    cells: Vec<i64>,
}

/// The aggregate's name (in plans and in its errors).
fn folds_name(folds: &[Fold]) -> &'static str {
    match folds {
        [Fold::Rows] => "unseen_slot_rows",
        [Fold::NonNull] => "unseen_slot_values",
        [Fold::Clamped(_)] => "unseen_slot_sums",
        _ => "unseen_slot_folds",
    }
}

fn out_of_range() -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::Internal("a slot outside the key set".into())
}

#[inline(always)]
fn add(cells: &mut [i64], at: usize, x: i64) -> Result<()> {
    let cell = cells.get_mut(at).ok_or_else(out_of_range)?;
    *cell = cell.wrapping_add(x);
    Ok(())
}

/// One fold over a batch into the cells at `stride`·slot + `offset` (inlined, so a stride of
/// one compiles to plain indexing).
#[inline(always)]
fn fold_one(
    fold: Fold,
    slot: &UInt32Array,
    value: Option<&ArrayRef>,
    cells: &mut [i64],
    stride: usize,
    offset: usize,
) -> Result<()> {
    let at = |s: u32| s as usize * stride + offset;
    match (fold, value) {
        (Fold::Rows, None) => match slot.nulls().filter(|n| n.null_count() > 0) {
            None => {
                for s in slot.values() {
                    add(cells, at(*s), 1)?;
                }
            }
            // Only the valid slots' rows, by the bitmap's set bits.
            Some(valid) => {
                let values = slot.values();
                for i in valid.inner().set_indices() {
                    add(cells, at(values[i]), 1)?;
                }
            }
        },
        (Fold::NonNull, Some(x)) => {
            for (i, s) in slot.iter().enumerate() {
                if let Some(s) = s
                    && x.is_valid(i)
                {
                    add(cells, at(s), 1)?;
                }
            }
        }
        (Fold::Clamped(convert), Some(x)) => {
            let Some(x) = x.as_primitive_opt::<Float64Type>() else {
                return internal_err!("{}: sums Float64 values", folds_name(&[fold]));
            };
            if slot.null_count() == 0 && x.null_count() == 0 {
                for (s, v) in slot.values().iter().zip(x.values()) {
                    add(cells, at(*s), convert.apply(*v))?;
                }
            } else if let (Some(valid), 0) = (slot.nulls(), x.null_count()) {
                let (s, v) = (slot.values(), x.values());
                for i in valid.inner().set_indices() {
                    add(cells, at(s[i]), convert.apply(v[i]))?;
                }
            } else {
                for (s, v) in slot.iter().zip(x.iter()) {
                    if let (Some(s), Some(v)) = (s, v) {
                        add(cells, at(s), convert.apply(v))?;
                    }
                }
            }
        }
        _ => return internal_err!("{}: wrong arguments for its fold", folds_name(&[fold])),
    }
    Ok(())
}

/// One row into a slot's pair of cells: one more row at `at[0]`, `x` added at `at[1]`.
#[inline(always)]
fn count_and_add(cells: &mut [i64], slot: u32, at: [usize; 2], x: i64) -> Result<()> {
    let first = slot as usize * 2;
    let pair: &mut [i64; 2] = cells
        .get_mut(first..first + 2)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(out_of_range)?;
    pair[at[0] & 1] = pair[at[0] & 1].wrapping_add(1);
    pair[at[1] & 1] = pair[at[1] & 1].wrapping_add(x);
    Ok(())
}

impl SlotsAccumulator {
    fn new(folds: Vec<Fold>, slots: usize) -> Self {
        let cells = vec![0; folds.len() * slots];
        SlotsAccumulator {
            folds,
            slots,
            cells,
        }
    }

    /// Each fold's slots, fold after fold.
    fn by_fold(&self) -> Vec<i64> {
        let n = self.folds.len();
        (0..n)
            .flat_map(|f| (0..self.slots).map(move |s| self.cells[s * n + f]))
            .collect()
    }

    /// A count of every row (at `rows_at` of a slot's two cells) and a clamped sum (at the
    /// other), over the rows with a slot, in one pass; false (nothing folded) if `x` has nulls.
    fn rows_and_sum(
        &mut self,
        slot: &UInt32Array,
        x: &ArrayRef,
        rows_at: usize,
        convert: Convert,
    ) -> Result<bool> {
        let Some(x) = x.as_primitive_opt::<Float64Type>() else {
            return Ok(false);
        };
        if x.null_count() != 0 {
            return Ok(false);
        }
        let at = [rows_at, rows_at ^ 1];
        let (slots, values, cells) = (slot.values(), x.values(), &mut self.cells[..]);
        match slot.nulls().filter(|n| n.null_count() > 0) {
            None => {
                for (s, v) in slots.iter().zip(values.iter()) {
                    count_and_add(cells, *s, at, convert.apply(*v))?;
                }
            }
            // Only the rows with a slot (those contribution bounding keeps), by its bitmap.
            Some(valid) => {
                for i in valid.inner().set_indices() {
                    count_and_add(cells, slots[i], at, convert.apply(values[i]))?;
                }
            }
        }
        Ok(true)
    }
}

impl Accumulator for SlotsAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let name = folds_name(&self.folds);
        let Some(slot) = values
            .first()
            .and_then(|a| a.as_primitive_opt::<UInt32Type>())
        else {
            return internal_err!("{name}: the first argument is a UInt32 slot");
        };
        let wanted = self.folds.iter().filter(|f| f.takes_value()).count();
        if values.len() != 1 + wanted {
            return internal_err!("{name}: {wanted} values beside the slot");
        }
        if values[1..].iter().any(|v| v.len() != slot.len()) {
            return internal_err!("{name}: arguments of unequal length");
        }
        let n = self.folds.len();
        // A count (COUNT(*), or COUNT(x) where x has no nulls) beside a clamped sum (AVG is
        // both), where the summed value has no nulls: one pass for both.
        let fused = match (self.folds.as_slice(), &values[1..]) {
            ([Fold::Rows, Fold::Clamped(c)], [x]) => Some((0, x, *c)),
            ([Fold::Clamped(c), Fold::Rows], [x]) => Some((1, x, *c)),
            ([Fold::NonNull, Fold::Clamped(c)], [n, x]) if n.null_count() == 0 => Some((0, x, *c)),
            ([Fold::Clamped(c), Fold::NonNull], [x, n]) if n.null_count() == 0 => Some((1, x, *c)),
            _ => None,
        };
        if let Some((count_at, x, convert)) = fused
            && self.rows_and_sum(slot, x, count_at, convert)?
        {
            return Ok(());
        }
        let mut next_value = values[1..].iter();
        for f in 0..n {
            let fold = self.folds[f];
            let value = if fold.takes_value() {
                next_value.next()
            } else {
                None
            };
            // A literal stride of one, so the single-fold loop indexes its slots directly.
            if n == 1 {
                fold_one(fold, slot, value, &mut self.cells, 1, 0)?;
            } else {
                fold_one(fold, slot, value, &mut self.cells, n, f)?;
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let values = Int64Array::from(self.by_fold());
        Ok(ScalarValue::List(Arc::new(ListArray::new(
            Arc::new(Field::new_list_field(DataType::Int64, true)),
            OffsetBuffer::from_lengths([values.len()]),
            Arc::new(values),
            None,
        ))))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self)
            + self.cells.capacity() * std::mem::size_of::<i64>()
            + self.folds.capacity() * std::mem::size_of::<Fold>()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let name = folds_name(&self.folds);
        let Some(lists) = states.first().and_then(|a| a.as_list_opt::<i32>()) else {
            return internal_err!("{name}: merges lists");
        };
        let n = self.folds.len();
        for i in 0..lists.len() {
            if lists.is_null(i) {
                continue;
            }
            let part = lists.value(i);
            let Some(part) = part.as_primitive_opt::<Int64Type>() else {
                return internal_err!("{name}: merges Int64 slots");
            };
            if part.len() != self.cells.len() {
                return Err(out_of_range());
            }
            // The state lists fold after fold; the cells are slot by slot.
            for (j, v) in part.iter().enumerate() {
                let (f, s) = (j / self.slots, j % self.slots);
                let cell = &mut self.cells[s * n + f];
                *cell = cell.wrapping_add(v.unwrap_or(0));
            }
        }
        Ok(())
    }
}

/// The slots of each measure from a dense plan's output (one row; each column a list of one
/// or more measures' slots, measure after measure).
pub(super) fn read(
    batches: &[arrow::record_batch::RecordBatch],
    slots: usize,
) -> Option<Vec<Vec<i64>>> {
    if slots == 0 || batches.iter().map(|b| b.num_rows()).sum::<usize>() != 1 {
        return None;
    }
    let batch = batches.iter().find(|b| b.num_rows() == 1)?;
    let mut out = Vec::new();
    for c in batch.columns() {
        let list = c.as_list_opt::<i32>()?;
        let values = list.value(0);
        let values = values.as_primitive_opt::<Int64Type>()?;
        if values.is_empty() || values.len() % slots != 0 {
            return None;
        }
        let all: Vec<i64> = values.iter().map(|v| v.unwrap_or(0)).collect();
        out.extend(all.chunks(slots).map(<[i64]>::to_vec));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, StringArray};

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn text_values_find_their_key_by_text_and_others_find_none() {
        let long = "a district name longer than twelve bytes";
        let values: ArrayRef = Arc::new(StringViewArray::from(vec![
            Some("D02"),
            None,
            Some("D1"),
            Some(long),
            Some("D01"),
            Some(""),
            Some("D02 "),
        ]));
        let k = keys(&["D01", "D02", long, ""]);
        let p = positions(&values, &k, &OnceLock::new()).unwrap();
        let got: Vec<Option<u32>> = p.iter().collect();
        assert_eq!(
            got,
            vec![Some(1), None, None, Some(2), Some(0), Some(3), None]
        );
        // The same through a plain Utf8 column.
        let plain: ArrayRef = Arc::new(StringArray::from(vec![Some("D01"), Some("x")]));
        let got: Vec<Option<u32>> = positions(&plain, &k, &OnceLock::new())
            .unwrap()
            .iter()
            .collect();
        assert_eq!(got, vec![Some(0), None]);
    }

    #[test]
    fn the_one_probe_lookup_finds_what_the_hash_maps_find() {
        let long = "a district name longer than twelve bytes";
        let mut k: Vec<String> = (1..=16).map(|d| format!("D{d:02}")).collect();
        k.extend([
            long.to_string(),
            String::new(),
            "D03".into(),
            "twelve bytes".into(),
        ]);
        assert!(DirectKeys::new(&k).is_some());
        // Values: every key, near misses (a byte more, less, or different), nulls, long text.
        let mut values: Vec<Option<String>> = Vec::new();
        for i in 0..5000u32 {
            values.push(match i % 9 {
                0 => None,
                1 => Some(format!("D{:02}", i % 20)),
                2 => Some(format!("D{:02} ", i % 17)),
                3 => Some(long.to_string()),
                4 => Some(format!("{long}{}", i % 3)),
                5 => Some(String::new()),
                6 => Some("twelve bytes".into()),
                7 => Some("twelve byte".into()),
                _ => Some(k[(i as usize * 7) % k.len()].clone()),
            });
        }
        let array = StringViewArray::from_iter(values.iter().map(|v| v.as_deref()));
        let reference: Vec<Option<u32>> = values
            .iter()
            .map(|v| {
                let v = v.as_ref()?;
                k.iter().position(|key| key == v).map(|p| p as u32)
            })
            .collect();
        for (offset, len) in [(0, 5000), (3, 4000), (63, 65), (64, 1)] {
            let slice = array.slice(offset, len);
            let direct: Vec<Option<u32>> = DirectKeys::new(&k)
                .unwrap()
                .positions(&slice)
                .iter()
                .collect();
            let hashed: Vec<Option<u32>> = hashed_view_positions(&slice, &k).iter().collect();
            assert_eq!(direct, reference[offset..offset + len], "offset {offset}");
            assert_eq!(hashed, direct, "offset {offset}");
        }
        // Too many short keys for one probe: the hash maps take them, with the same answers.
        let many: Vec<String> = (0..500).map(|i| format!("c{i}")).collect();
        assert!(DirectKeys::new(&many).is_none());
        let values: ArrayRef = Arc::new(StringViewArray::from(vec![Some("c499"), Some("c500")]));
        let got: Vec<Option<u32>> = positions(&values, &many, &OnceLock::new())
            .unwrap()
            .iter()
            .collect();
        assert_eq!(got, vec![Some(499), None]);
    }

    #[test]
    fn integer_values_match_canonical_decimal_keys_in_a_run_or_not() {
        let values: ArrayRef = Arc::new(Int32Array::from(vec![
            Some(0),
            Some(23),
            Some(24),
            Some(-1),
            None,
            Some(7),
        ]));
        let run: Vec<String> = (0..24).map(|h| h.to_string()).collect();
        let got: Vec<Option<u32>> = positions(&values, &run, &OnceLock::new())
            .unwrap()
            .iter()
            .collect();
        assert_eq!(got, vec![Some(0), Some(23), None, None, None, Some(7)]);
        // Not a run, and "07" is not the text of 7.
        let scattered = keys(&["23", "07", "-1", "x", "0"]);
        let got: Vec<Option<u32>> = positions(&values, &scattered, &OnceLock::new())
            .unwrap()
            .iter()
            .collect();
        assert_eq!(got, vec![Some(4), Some(0), None, Some(2), None, None]);
    }

    #[test]
    fn slot_where_keeps_the_slot_only_where_the_decision_is_true_and_the_slot_valid() {
        let slot: ArrayRef = Arc::new(UInt32Array::from(vec![
            Some(3),
            Some(1),
            None,
            Some(0),
            Some(2),
        ]));
        let keep: ArrayRef = Arc::new(arrow::array::BooleanArray::from(vec![
            Some(true),
            Some(false),
            Some(true),
            None,
            Some(true),
        ]));
        let out = SlotWhere::new()
            .invoke_with_args(ScalarFunctionArgs {
                args: vec![ColumnarValue::Array(slot), ColumnarValue::Array(keep)],
                arg_fields: vec![
                    Arc::new(Field::new("s", DataType::UInt32, true)),
                    Arc::new(Field::new("k", DataType::Boolean, true)),
                ],
                number_rows: 5,
                return_field: Arc::new(Field::new("r", DataType::UInt32, true)),
                config_options: Default::default(),
            })
            .unwrap()
            .into_array(5)
            .unwrap();
        let got: Vec<Option<u32>> = out.as_primitive::<UInt32Type>().iter().collect();
        assert_eq!(got, vec![Some(3), None, None, None, Some(2)]);
        // Folded, only the kept rows count, into their own slots.
        let mut a = SlotsAccumulator::new(vec![Fold::Rows], 4);
        a.update_batch(&[out.clone()]).unwrap();
        assert_eq!(a.cells, vec![0, 0, 1, 1]);
        let fare: ArrayRef = Arc::new(arrow::array::Float64Array::from(vec![
            10.0, 20.0, 30.0, 40.0, 50.0,
        ]));
        let mut sums = SlotsAccumulator::new(
            vec![Fold::Clamped(Convert::new(0.0, 100.0, 0.0, 1.0, false))],
            4,
        );
        sums.update_batch(&[out, fare]).unwrap();
        assert_eq!(sums.cells, vec![0, 0, 50, 10]);
    }

    #[test]
    fn slots_fold_rows_values_and_sums_and_merge_partitions() {
        let slot: ArrayRef = Arc::new(UInt32Array::from(vec![Some(0), Some(2), None, Some(2)]));
        let x: ArrayRef = Arc::new(arrow::array::Float64Array::from(vec![
            Some(5.5),
            None,
            Some(9.0),
            Some(-3.0),
        ]));
        let run = |fold: Fold, args: &[ArrayRef]| {
            let mut a = SlotsAccumulator::new(vec![fold], 3);
            a.update_batch(args).unwrap();
            // A second partition with the same rows, merged through its state.
            let mut b = SlotsAccumulator::new(vec![fold], 3);
            b.update_batch(args).unwrap();
            let state = b.state().unwrap()[0].to_array().unwrap();
            a.merge_batch(&[state]).unwrap();
            read(
                &[arrow::record_batch::RecordBatch::try_from_iter([(
                    "m",
                    a.evaluate().unwrap().to_array().unwrap(),
                )])
                .unwrap()],
                3,
            )
            .unwrap()
            .remove(0)
        };
        assert_eq!(run(Fold::Rows, &[slot.clone()]), vec![2, 0, 4]);
        assert_eq!(
            run(Fold::NonNull, &[slot.clone(), x.clone()]),
            vec![2, 0, 2]
        );
        // Clamped to [-2, 5], scaled by 2: 5.5 → 10 (twice), −3 → −4 (twice).
        let clamped = Fold::Clamped(Convert::new(-2.0, 5.0, 0.0, 2.0, false));
        assert_eq!(run(clamped, &[slot.clone(), x.clone()]), vec![20, 0, -8]);
        let mut a = SlotsAccumulator::new(vec![Fold::Rows], 2);
        assert!(a.update_batch(&[slot.clone()]).is_err(), "slot 2 of 2");
        let mut b = SlotsAccumulator::new(vec![Fold::NonNull], 3);
        assert!(
            b.update_batch(&[slot, x.slice(0, 2)]).is_err(),
            "4 slots, 2 values"
        );
    }

    /// Several folds in one aggregate give each fold's own slots, through a merge of
    /// partitions, on the one-pass path (a count beside a sum, nothing null) and the general
    /// one (nulls, three folds, the folds in either order).
    #[test]
    fn folds_together_equal_each_fold_alone() {
        let slots = 5;
        let slot_values: Vec<u32> = (0..3000u32).map(|i| (i * 7 + i / 13) % 5).collect();
        let fares: Vec<f64> = (0..3000).map(|i| (i % 97) as f64 * 1.37 - 20.0).collect();
        let full_slot: ArrayRef = Arc::new(UInt32Array::from(slot_values.clone()));
        let full_x: ArrayRef = Arc::new(arrow::array::Float64Array::from(fares.clone()));
        let gappy_slot: ArrayRef = Arc::new(UInt32Array::from_iter(
            slot_values
                .iter()
                .enumerate()
                .map(|(i, s)| (i % 11 != 3).then_some(*s)),
        ));
        let gappy_x: ArrayRef = Arc::new(arrow::array::Float64Array::from_iter(
            fares
                .iter()
                .enumerate()
                .map(|(i, v)| (i % 7 != 2).then_some(*v)),
        ));
        let clamped = Fold::Clamped(Convert::new(0.0, 100.0, 0.0, 8.0, false));
        let value_of = |fold: Fold, x: &ArrayRef| fold.takes_value().then(|| x.clone());
        // Two partitions (the rows split at 1000), merged.
        let folded = |folds: &[Fold], slot: &ArrayRef, x: &ArrayRef| -> Vec<Vec<i64>> {
            let args = |from: usize, len: usize| -> Vec<ArrayRef> {
                let mut a = vec![slot.slice(from, len)];
                a.extend(
                    folds
                        .iter()
                        .filter_map(|f| value_of(*f, &x.slice(from, len))),
                );
                a
            };
            let mut a = SlotsAccumulator::new(folds.to_vec(), slots);
            a.update_batch(&args(0, 1000)).unwrap();
            let mut b = SlotsAccumulator::new(folds.to_vec(), slots);
            b.update_batch(&args(1000, 2000)).unwrap();
            a.merge_batch(&[b.state().unwrap()[0].to_array().unwrap()])
                .unwrap();
            let out = a.evaluate().unwrap().to_array().unwrap();
            read(
                &[arrow::record_batch::RecordBatch::try_from_iter([("m", out)]).unwrap()],
                slots,
            )
            .unwrap()
        };
        for (slot, x) in [
            (&full_slot, &full_x),
            (&gappy_slot, &full_x),
            (&gappy_slot, &gappy_x),
            (&full_slot, &gappy_x),
        ] {
            for folds in [
                vec![Fold::Rows, clamped],
                vec![clamped, Fold::Rows],
                vec![Fold::NonNull, clamped],
                vec![clamped, Fold::NonNull],
                vec![Fold::Rows, Fold::NonNull, clamped],
                vec![clamped, clamped],
            ] {
                let alone: Vec<Vec<i64>> =
                    folds.iter().flat_map(|f| folded(&[*f], slot, x)).collect();
                assert_eq!(folded(&folds, slot, x), alone, "{folds:?}");
                assert!(alone.iter().all(|m| m.iter().any(|c| *c != 0)), "{folds:?}");
            }
        }
    }
}

/// The dense plan against DataFusion's `GROUP BY` on the same rows, through a real session:
/// nulls, values that are no key, a key no row has, several partitions, and a second job
/// that takes its positions from the cache's memo.
#[cfg(test)]
mod against_group_by {
    use super::*;
    use crate::engine::{JobSession, Resources, TableCache, TableSpec};
    use arrow::array::{Float64Array, Int32Array, StringArray};
    use arrow::record_batch::RecordBatch;
    use datafusion::functions_aggregate::expr_fn::{count, sum};
    use datafusion::logical_expr::{AggregateUDF, Expr, LogicalPlanBuilder, ScalarUDF, col, lit};

    fn write_table(path: &std::path::Path, rows: usize) {
        let district: StringArray = (0..rows)
            .map(|i| match i % 23 {
                0 => None,
                1 => Some("elsewhere".to_string()),
                k => Some(format!("D{:02}", k % 17)),
            })
            .collect();
        let hour: Int32Array = (0..rows)
            .map(|i| match i % 31 {
                0 => None,
                1 => Some(24),
                k => Some((k * 7 % 24) as i32),
            })
            .collect();
        let fare: Float64Array = (0..rows)
            .map(|i| (i % 13 != 0).then(|| (i * 37 % 1000) as f64 / 7.0))
            .collect();
        let batch = RecordBatch::try_from_iter([
            ("district", Arc::new(district) as ArrayRef),
            ("hour", Arc::new(hour) as ArrayRef),
            ("fare", Arc::new(fare) as ArrayRef),
        ])
        .unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(4096))
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(path).unwrap(),
            batch.schema(),
            Some(props),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slots_equal_the_grouped_counts_and_sums_key_for_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        write_table(&path, 50_000);
        let spec = TableSpec {
            table: "t".into(),
            path,
            columns: vec!["district".into(), "hour".into(), "fare".into()],
            in_memory: false,
        };
        let resources = Resources {
            memory_bytes: 1 << 28,
            spill: None,
            batch_rows: crate::engine::BATCH_ROWS,
        };
        let cache = TableCache::new(256 << 20);
        // D00 … D16 appear; D17 does not; "elsewhere" and nulls are no key. Hours 0–23 are a
        // run (24 and nulls are none); the hour keys listed out of order take the map path.
        let districts: Vec<String> = (0..18).map(|k| format!("D{k:02}")).collect();
        let runs: Vec<String> = (0..24).map(|h| h.to_string()).collect();
        let mut shuffled = runs.clone();
        shuffled.reverse();
        let convert = Convert::new(0.0, 100.0, 0.0, 1024.0, false);
        let fixed = || {
            ScalarUDF::new_from_impl(crate::gate::fixed_point::FixedPoint::new(convert))
                .call(vec![col("fare")])
        };

        let mut kept_before = 0;
        for (round, hours) in [&runs, &shuffled, &runs].into_iter().enumerate() {
            let session = JobSession::new(std::slice::from_ref(&spec), &resources, Some(&cache))
                .await
                .unwrap();
            let input = session
                .plan("SELECT district, hour, fare FROM t")
                .await
                .unwrap();
            let grouped = LogicalPlanBuilder::from(input.clone())
                .aggregate(
                    vec![col("district"), col("hour")],
                    vec![count(lit(1i64)), count(col("fare")), sum(fixed())],
                )
                .unwrap()
                .build()
                .unwrap();
            let keys = vec![districts.clone(), hours.clone()];
            let slots = districts.len() * hours.len();
            let slot = ScalarUDF::new_from_impl(KeyPositions::new(
                keys.clone(),
                session.position_memos().to_vec(),
            ))
            .call(vec![col("district"), col("hour")]);
            let fold = |f: Fold, args: Vec<Expr>| {
                let mut all = vec![slot.clone()];
                all.extend(args);
                AggregateUDF::new_from_impl(DenseSlots::new(vec![f], slots)).call(all)
            };
            let dense = LogicalPlanBuilder::from(input)
                .aggregate(
                    Vec::<Expr>::new(),
                    vec![
                        fold(Fold::Rows, vec![]).alias("rows"),
                        fold(Fold::NonNull, vec![col("fare")]).alias("values"),
                        fold(Fold::Clamped(convert), vec![col("fare")]).alias("sum"),
                        // The three in one aggregate, as the gate's plan asks for them.
                        AggregateUDF::new_from_impl(DenseSlots::new(
                            vec![Fold::Rows, Fold::NonNull, Fold::Clamped(convert)],
                            slots,
                        ))
                        .call(vec![slot.clone(), col("fare"), col("fare")])
                        .alias("together"),
                    ],
                )
                .unwrap()
                .build()
                .unwrap();

            let mut expected = vec![vec![0i64; slots]; 3];
            for b in session.execute(grouped).await.unwrap().0 {
                let d = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
                let d = d.as_string::<i32>();
                let h = b.column(1).as_primitive::<arrow::datatypes::Int32Type>();
                for r in 0..b.num_rows() {
                    let (Some(pd), Some(ph)) = (
                        d.is_valid(r)
                            .then(|| districts.iter().position(|k| k == d.value(r)))
                            .flatten(),
                        h.is_valid(r)
                            .then(|| hours.iter().position(|k| *k == h.value(r).to_string()))
                            .flatten(),
                    ) else {
                        continue;
                    };
                    for (m, e) in expected.iter_mut().enumerate() {
                        let v = b.column(2 + m).as_primitive::<Int64Type>();
                        e[pd * hours.len() + ph] = if v.is_null(r) { 0 } else { v.value(r) };
                    }
                }
            }
            let got = read(&session.execute(dense).await.unwrap().0, slots).unwrap();
            assert_eq!(got.len(), 6, "three folds alone, then together");
            assert_eq!(got[..3], expected, "round {round}");
            assert_eq!(got[3..], expected, "round {round}, together");
            assert!(
                expected[0].iter().sum::<i64>() > 40_000,
                "most rows have a key"
            );
            assert!(
                expected[0][17 * hours.len()..].iter().all(|c| *c == 0),
                "D17: no rows"
            );
            let kept: usize = session.position_memos().iter().map(|m| m.bytes()).sum();
            assert!(
                kept > kept_before || round == 2,
                "round {round}: positions kept"
            );
            if round == 2 {
                assert_eq!(
                    kept, kept_before,
                    "the third job reused the first one's positions"
                );
            }
            kept_before = kept;
        }
    }
}
