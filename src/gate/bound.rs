//! Contribution bounding: before any aggregate, keep at most *k* rows of each privacy unit,
//! a uniformly random *k*-subset of that unit's rows (not "the first k", which would let the
//! file's order decide). After this step one person's presence changes at most *k* rows, which
//! is the `d_in` the gate hands to OpenDP's stability maps.
//!
//! Two passes inside DataFusion, with no sort:
//! 1. `SELECT unit, COUNT(*) … GROUP BY unit` over the scan and the filters on it gives each
//!    person's row count *n*.
//! 2. The same scan and filters, then `WHERE unseen_keep(unit)`: a filter that keeps every row
//!    of a person with *n* ≤ *k*, and otherwise walks that person's rows keeping the *t*-th
//!    with probability (*k* − kept so far) / (*n* − *t*) — sequential selection sampling, which
//!    yields each *k*-subset with equal probability whatever order the rows arrive in. The
//!    filter never keeps a *k*+1-th row of anyone, whatever it was told in pass 1, so the bound
//!    holds even if the two passes saw different rows; only uniformity depends on them agreeing.
//!
//! The step sits directly above the table scan and the filters on it (so `WHERE` clauses spend
//! no person's allowance on rows they drop), below any projection, so no guest expression can
//! rename another column into the unit's place.
//!
//! Cost (10M rows, ~950k persons, 2 cores): a sort-based `ROW_NUMBER() OVER (PARTITION BY unit
//! ORDER BY random)` took 8.6 s; these two passes take ~3 s, most of it random access into the
//! per-person table (pass 1's hash aggregate ~0.7 s, pass 2's lookups ~1.6 s). The plain
//! aggregate without any bound takes 0.17 s.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray};
use arrow::datatypes::{DataType, Int64Type};
use datafusion::common::{Column, Result, internal_err};
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, LogicalPlanBuilder, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility, lit,
};
use rand::{Rng, SeedableRng};
use ring::rand::{SecureRandom, SystemRandom};

use super::GateError;

/// Which column identifies a person, and how many of their rows a query may use.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitBound {
    pub column: String,
    pub max_rows: u64,
}

/// A person, as the two passes see them: an integer id as itself, a string id by a 64-bit
/// hash keyed per query. Two persons whose hashes collided would share one allowance of *k*
/// rows — fewer rows used, never more per person.
type UnitKey = i64;

/// Per query: each person's row count from pass 1, then pass 2's progress through their rows.
pub struct Selection {
    max_rows: u32,
    hasher: std::collections::hash_map::RandomState,
    state: Mutex<SelectionState>,
}

struct SelectionState {
    /// person → (rows, seen, kept)
    persons: HashMap<UnitKey, (u32, u32, u32), MixHasher>,
    rng: rand::rngs::StdRng,
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
            .finish_non_exhaustive()
    }
}

impl Selection {
    pub(super) fn new(max_rows: u32) -> Result<Self, GateError> {
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| GateError::refused("internal", "no secure randomness available"))?;
        Ok(Selection {
            max_rows,
            hasher: Default::default(),
            state: Mutex::new(SelectionState {
                persons: HashMap::default(),
                rng: rand::rngs::StdRng::from_seed(seed),
            }),
        })
    }

    /// The key of each row's person (`None` for a null id: such rows are never kept).
    fn keys(&self, unit: &ArrayRef) -> Result<Vec<Option<UnitKey>>> {
        Ok(match unit.data_type() {
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
                let ids = arrow::compute::cast(unit, &DataType::Int64)?;
                ids.as_primitive::<Int64Type>().iter().collect()
            }
            DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => {
                let ids = arrow::compute::cast(unit, &DataType::Int64)?;
                ids.as_primitive::<Int64Type>().iter().collect()
            }
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => {
                let ids = arrow::compute::cast(unit, &DataType::Utf8)?;
                ids.as_string::<i32>()
                    .iter()
                    .map(|s| {
                        s.map(|s| {
                            let mut h = self.hasher.build_hasher();
                            s.hash(&mut h);
                            h.finish() as i64
                        })
                    })
                    .collect()
            }
            other => return internal_err!("a person id of type {other} cannot be bounded"),
        })
    }

    /// Records pass 1's counts (`unit`, `rows`) from one batch.
    pub(super) fn add_counts(&self, unit: &ArrayRef, rows: &ArrayRef) -> Result<()> {
        let keys = self.keys(unit)?;
        let rows = arrow::compute::cast(rows, &DataType::Int64)?;
        let rows = rows.as_primitive::<Int64Type>();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.persons.reserve(keys.len());
        for (key, n) in keys.into_iter().zip(rows.iter()) {
            if let (Some(key), Some(n)) = (key, n) {
                // Two string ids with one hash: their rows count together.
                let rows = &mut state.persons.entry(key).or_default().0;
                *rows = rows.saturating_add(u32::try_from(n.max(0)).unwrap_or(u32::MAX));
            }
        }
        Ok(())
    }

    /// Pass 2: keep or drop each row of one batch. Rows where `wanted` is not true (the
    /// query's own filters) are dropped without touching anyone's allowance.
    pub(super) fn keep(&self, unit: &ArrayRef, wanted: &BooleanArray) -> Result<BooleanArray> {
        let keys = self.keys(unit)?;
        let k = self.max_rows;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let SelectionState { persons, rng } = &mut *state;
        Ok(keys
            .into_iter()
            .zip(wanted.iter())
            .map(|(key, wanted)| {
                if wanted != Some(true) {
                    return Some(false);
                }
                let Some((n, seen, kept)) = key.and_then(|key| persons.get_mut(&key)) else {
                    return Some(false);
                };
                let t = *seen;
                *seen += 1;
                let keep =
                    *kept < k && (*n <= k || t >= *n || rng.random_range(0..*n - t) < k - *kept);
                *kept += keep as u32;
                Some(keep)
            })
            .collect())
    }
}

/// Pass 1's plan: each person's row count over `source` (the scan and its filters).
pub(super) fn count_plan(source: &LogicalPlan, unit: &UnitBound) -> Result<LogicalPlan, GateError> {
    LogicalPlanBuilder::from(source.clone())
        .aggregate(vec![unit_column(source, unit)?], vec![count(lit(1i64))])
        .and_then(|b| b.build())
        .map_err(|_| internal())
}

/// Builds a selection for one query and feeds it pass 1's output.
pub(super) fn selection(
    unit: &UnitBound,
    counts: &[arrow::record_batch::RecordBatch],
) -> Result<Arc<Selection>, GateError> {
    let max_rows = u32::try_from(unit.max_rows).map_err(|_| internal())?;
    let selection = Selection::new(max_rows)?;
    for b in counts {
        selection
            .add_counts(b.column(0), b.column(1))
            .map_err(|_| internal())?;
    }
    Ok(Arc::new(selection))
}

/// The one scan of `plan` with the filters directly on it: pass 1's input.
pub(super) fn source(plan: &LogicalPlan) -> Option<&LogicalPlan> {
    if scan_with_filters(plan) {
        return Some(plan);
    }
    plan.inputs().into_iter().find_map(source)
}

/// `plan` with its scan (and the filters directly on it) followed by pass 2's filter.
pub(super) fn bound_contributions(
    plan: &LogicalPlan,
    unit: &UnitBound,
    selection: &Arc<Selection>,
) -> Result<LogicalPlan, GateError> {
    if scan_with_filters(plan) {
        // The query's own filters become keep's second argument rather than filters below it:
        // DataFusion merges adjacent filters into one AND, whose sides see every row, so keep
        // must itself skip the rows the query drops (as pass 1 did) to sample the right ones.
        let (scan, predicates) = split_filters(plan);
        let predicate = predicates
            .into_iter()
            .reduce(Expr::and)
            .unwrap_or_else(|| lit(true));
        let keep = ScalarUDF::new_from_impl(Keep {
            selection: selection.clone(),
            signature: Signature::any(2, Volatility::Volatile),
        })
        .call(vec![unit_column(plan, unit)?, predicate]);
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

/// The scan under a chain of filters, and the filters' predicates.
fn split_filters(plan: &LogicalPlan) -> (&LogicalPlan, Vec<Expr>) {
    match plan {
        LogicalPlan::Filter(f) => {
            let (scan, mut predicates) = split_filters(&f.input);
            predicates.push(f.predicate.clone());
            (scan, predicates)
        }
        other => (other, Vec::new()),
    }
}

fn scan_with_filters(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::TableScan(_) => true,
        LogicalPlan::Filter(f) => scan_with_filters(&f.input),
        _ => false,
    }
}

/// The scan's own unit column: a scan cannot rename, so this is the catalogue's column.
fn unit_column(plan: &LogicalPlan, unit: &UnitBound) -> Result<Expr, GateError> {
    let (qualifier, field) = plan
        .schema()
        .qualified_field_with_unqualified_name(&unit.column)
        .map_err(|_| internal())?;
    Ok(Expr::Column(Column::new(qualifier.cloned(), field.name())))
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
        let [unit, wanted] = args.args.as_slice() else {
            return internal_err!("unseen_keep takes the person column and the query's filter");
        };
        let unit = unit.to_array(args.number_rows)?;
        let wanted = wanted.to_array(args.number_rows)?;
        let Some(wanted) = wanted.as_boolean_opt() else {
            return internal_err!("unseen_keep's filter is not boolean");
        };
        Ok(ColumnarValue::Array(Arc::new(
            self.selection.keep(&unit, wanted)?,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

    /// Rows 0..n of one person, k kept: exactly k every time, and every row equally likely.
    #[test]
    fn selection_sampling_keeps_exactly_k_rows_each_equally_often() {
        let (n, k, trials) = (12usize, 4u32, 6000);
        let mut hits = vec![0u32; n];
        for _ in 0..trials {
            let s = Selection::new(k).unwrap();
            let unit: ArrayRef = Arc::new(Int64Array::from(vec![7i64]));
            let rows: ArrayRef = Arc::new(Int64Array::from(vec![n as i64]));
            s.add_counts(&unit, &rows).unwrap();
            // Two batches, as DataFusion would send them.
            let first: ArrayRef = Arc::new(Int64Array::from(vec![7i64; 5]));
            let rest: ArrayRef = Arc::new(Int64Array::from(vec![7i64; n - 5]));
            let kept: Vec<bool> = [first, rest]
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
            assert!((*h as f64 - 2000.0).abs() < 220.0, "row {i}: {h} {hits:?}");
        }
    }

    #[test]
    fn rows_beyond_what_pass_one_saw_and_unknown_persons_are_dropped() {
        let s = Selection::new(3).unwrap();
        let unit: ArrayRef = Arc::new(Int64Array::from(vec![1i64, 2]));
        let rows: ArrayRef = Arc::new(Int64Array::from(vec![2i64, 5]));
        s.add_counts(&unit, &rows).unwrap();
        // Person 1 was counted with 2 rows but shows 6; person 2 shows 9 of 5; person 3 none.
        let batch: ArrayRef = Arc::new(Int64Array::from(
            [[1i64; 6].as_slice(), &[2; 9], &[3; 4]].concat(),
        ));
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
        assert_eq!(count(15..19), 0, "person 3 was never counted");
    }
}
