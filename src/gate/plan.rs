//! Reads a planned guest query and decides what the gate will compute for it: the table, the
//! public group keys, and the noisy measurements (row count, non-null counts, clamped
//! fixed-point sums). Anything it cannot bound is refused with a message saying what would
//! make it acceptable. Then builds the exact-aggregate plan that DataFusion will run.

use arrow::datatypes::DataType;
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::functions_aggregate::expr_fn::{array_agg, count, count_distinct, sum};
use datafusion::logical_expr::{
    Aggregate, Expr, ExprSchemable, Join, JoinType, LogicalPlan, LogicalPlanBuilder, Operator,
    cast, lit,
};
use unseen_guest::contract::{ColumnKind, QueryRequest};

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};

use super::bound::{GroupBound, UnitBound};
use super::{GateError, JobGrant};
use crate::catalog::{KeyValue, OpenAttribute};
use crate::sandbox::functions::{UdfMode, WasmUdf};

/// Most groups one release may have (the product of the public key sets).
const MAX_GROUPS: usize = 100_000;

#[derive(Debug, Clone)]
pub struct GroupSpec {
    pub column: String,
    /// The catalogue's public keys, or `None`: keys come from the data through DP partition
    /// selection.
    pub keys: Option<Vec<KeyValue>>,
    expr: Expr,
}

/// One noisy vector over all groups.
#[derive(Debug, Clone)]
pub enum MeasureSpec {
    /// Rows per group. Always measure 0: it drives the minimum group size and means.
    Rows,
    /// Non-null values of an expression per group (`COUNT(col)`).
    NonNull { expr: Expr, label: String },
    /// Distinct non-null values of an expression per group (`COUNT(DISTINCT col)`): one row
    /// changes one group's count by at most one, as for `COUNT`.
    Distinct { expr: Expr, label: String },
    /// Σ trunc((clamp(x, lo, hi) − shift) · fixed_point) per group, as an integer; with
    /// `squared`, Σ trunc((clamp(x, lo, hi) − shift)² · fixed_point) (for variances, with
    /// `shift` the midpoint).
    ClampedSum {
        expr: Expr,
        column: String,
        lo: f64,
        hi: f64,
        shift: f64,
        fixed_point: f64,
        squared: bool,
    },
    /// The `q` quantile of clamp(x, lo, hi) per group: the group's values are gathered
    /// (`ARRAY_AGG`) and the gate releases one by OpenDP's private quantile (`quantile.rs`).
    Quantile {
        expr: Expr,
        column: String,
        lo: f64,
        hi: f64,
        q: f64,
    },
}

impl MeasureSpec {
    pub fn label(&self) -> String {
        match self {
            MeasureSpec::Rows => "count".into(),
            MeasureSpec::NonNull { label, .. } => format!("count({label})"),
            MeasureSpec::Distinct { label, .. } => format!("count(distinct {label})"),
            MeasureSpec::ClampedSum {
                column,
                lo,
                hi,
                shift,
                squared,
                ..
            } => {
                let what = match (*squared, *shift != 0.0) {
                    (true, _) => "squares",
                    (false, true) => "mean",
                    (false, false) => "sum",
                };
                format!("{what}({column} in [{lo}, {hi}])")
            }
            MeasureSpec::Quantile {
                column, lo, hi, q, ..
            } => format!("quantile({q}, {column} in [{lo}, {hi}])"),
        }
    }

    pub fn fixed_point(&self) -> f64 {
        match self {
            MeasureSpec::ClampedSum { fixed_point, .. } => *fixed_point,
            _ => 1.0,
        }
    }

    pub fn shift(&self) -> f64 {
        match self {
            MeasureSpec::ClampedSum { shift, .. } => *shift,
            _ => 0.0,
        }
    }

    pub fn bounds(&self) -> (f64, f64) {
        match self {
            MeasureSpec::ClampedSum { lo, hi, .. } | MeasureSpec::Quantile { lo, hi, .. } => {
                (*lo, *hi)
            }
            _ => (f64::NEG_INFINITY, f64::INFINITY),
        }
    }

    /// The integer range every summed value lies in. The per-row value is
    /// `trunc((clamp(x) − shift) · fixed_point)` in f64 (squared before scaling for sums of
    /// squares), and subtraction, squaring a magnitude, multiplication by a positive constant
    /// and truncation are all monotone, so the same operations on the bounds (done here in the
    /// same IEEE arithmetic) bound every value.
    pub fn fixed_point_bounds(&self) -> (i64, i64) {
        match self {
            MeasureSpec::ClampedSum {
                lo,
                hi,
                shift,
                fixed_point,
                squared: false,
                ..
            } => (
                ((lo - shift) * fixed_point).trunc() as i64,
                ((hi - shift) * fixed_point).trunc() as i64,
            ),
            MeasureSpec::ClampedSum {
                lo,
                hi,
                shift,
                fixed_point,
                squared: true,
                ..
            } => {
                let d = (lo - shift).abs().max((hi - shift).abs());
                (0, ((d * d) * fixed_point).trunc() as i64)
            }
            _ => (0, 1),
        }
    }

    /// The expression the measure reads, if any.
    fn argument(&self) -> Option<&Expr> {
        match self {
            MeasureSpec::Rows => None,
            MeasureSpec::NonNull { expr, .. }
            | MeasureSpec::Distinct { expr, .. }
            | MeasureSpec::ClampedSum { expr, .. }
            | MeasureSpec::Quantile { expr, .. } => Some(expr),
        }
    }

    /// A clamped sum's per-row value: clamp, shift, (square,) scale and truncate in one
    /// kernel. Truncation toward zero biases by under one fixed-point unit per row (≤ 2⁻²⁰ of
    /// the bound's magnitude), far below the noise, and is cheaper than rounding.
    fn convert(&self) -> Option<(Expr, super::fixed_point::Convert)> {
        let MeasureSpec::ClampedSum {
            expr,
            lo,
            hi,
            shift,
            fixed_point,
            squared,
            ..
        } = self
        else {
            return None;
        };
        Some((
            cast(expr.clone(), DataType::Float64),
            super::fixed_point::Convert::new(*lo, *hi, *shift, *fixed_point, *squared),
        ))
    }

    fn aggregate_expr(&self, index: usize) -> Result<Expr, GateError> {
        let name = format!("__m{index}");
        Ok(match self {
            MeasureSpec::Rows => count(lit(1i64)).alias(name),
            MeasureSpec::NonNull { expr, .. } => count(expr.clone()).alias(name),
            MeasureSpec::Distinct { expr, .. } => count_distinct(expr.clone()).alias(name),
            MeasureSpec::ClampedSum { .. } => {
                let (x, convert) = self.convert().ok_or_else(plan_error_text)?;
                let udf = datafusion::logical_expr::ScalarUDF::new_from_impl(
                    super::fixed_point::FixedPoint::new(convert),
                );
                sum(udf.call(vec![x])).alias(name)
            }
            // Nulls are gathered too and dropped by the gate; clamping happens there.
            MeasureSpec::Quantile { expr, .. } => {
                array_agg(cast(expr.clone(), DataType::Float64)).alias(name)
            }
        })
    }
}

/// The public keys of a group expression that is a CASE with only literal outcomes (integers
/// or text; no ELSE adds no key: a null key is dropped), in the order written — directly, or
/// as the column a projection under the aggregate defines so.
fn literal_outcomes(e: &Expr, input: &LogicalPlan) -> Option<Vec<KeyValue>> {
    let e = match e {
        Expr::Column(c) => defining_expr(input, c)?,
        other => other.clone(),
    };
    let Expr::Case(case) = unalias(&e) else {
        return None;
    };
    let outcomes = case
        .when_then_expr
        .iter()
        .map(|(_, then)| then.as_ref())
        .chain(case.else_expr.as_deref());
    let mut keys: Vec<KeyValue> = Vec::new();
    for outcome in outcomes {
        let Expr::Literal(v, _) = unalias(outcome) else {
            return None;
        };
        let key = match v {
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)) => KeyValue::Text(s.clone()),
            v if v.data_type().is_integer() => match v.cast_to(&DataType::Int64).ok()? {
                ScalarValue::Int64(Some(i)) => KeyValue::Int(i),
                _ => return None,
            },
            _ => return None,
        };
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    (!keys.is_empty()).then_some(keys)
}

/// The expression a projection in `plan` (through filters and aliases of subqueries) gives
/// column `c`.
fn defining_expr(plan: &LogicalPlan, c: &Column) -> Option<Expr> {
    match plan {
        LogicalPlan::Projection(p) => {
            let i = p.schema.index_of_column(c).ok()?;
            let e = unalias(&p.expr[i]);
            match e {
                Expr::Column(inner) => defining_expr(&p.input, inner),
                other => Some(other.clone()),
            }
        }
        LogicalPlan::Filter(f) => defining_expr(&f.input, c),
        LogicalPlan::SubqueryAlias(s) => {
            let i = s.schema.index_of_column(c).ok()?;
            let (_, field) = s.input.schema().qualified_field(i);
            let (qualifier, _) = s.input.schema().qualified_field(i);
            defining_expr(&s.input, &Column::new(qualifier.cloned(), field.name()))
        }
        _ => None,
    }
}

/// A literal fraction in [0, 1] (a quantile's q).
fn literal_fraction(e: &Expr) -> Option<f64> {
    let Expr::Literal(v, _) = unalias(e) else {
        return None;
    };
    let q = v.cast_to(&DataType::Float64).ok()?;
    match q {
        datafusion::common::ScalarValue::Float64(Some(q)) if (0.0..=1.0).contains(&q) => Some(q),
        _ => None,
    }
}

/// A power of two that keeps |value| · scale ≤ 2³⁰, so that 2³² rows cannot overflow an i64 sum.
fn fixed_point_for(max_abs: f64) -> f64 {
    if max_abs == 0.0 {
        return 1.0;
    }
    let k = (30.0 - max_abs.log2()).floor().clamp(-30.0, 40.0);
    2f64.powi(k as i32)
}

#[derive(Debug, Clone)]
pub enum OutputSpec {
    Key {
        name: String,
        group: usize,
    },
    Measure {
        name: String,
        measure: usize,
        kind: ColumnKind,
    },
    /// A variance or standard deviation from three noisy measurements: the row count
    /// (measure 0), the midpoint-shifted sum `sum` and the sum of squares `squares`.
    Spread {
        name: String,
        sum: usize,
        squares: usize,
        kind: ColumnKind,
    },
}

/// What the gate computes for one query.
#[derive(Debug, Clone)]
pub struct QueryShape {
    /// The datasets' tables the query reads (more than one for a join), each once.
    pub tables: Vec<String>,
    /// For a person-level dataset: the unit column and the rows each person may contribute.
    pub unit: Option<UnitBound>,
    pub groups: Vec<GroupSpec>,
    pub measures: Vec<MeasureSpec>,
    pub outputs: Vec<OutputSpec>,
    /// How guest code ran over rows for this query (`query`: it did not), for the ledger.
    pub mode: &'static str,
    input: LogicalPlan,
}

impl QueryShape {
    /// GROUP BY the keys, one aggregate per measurement, over the query's own input.
    ///
    /// For a person-level dataset, `selection` is the per-person row selection built from
    /// [`QueryShape::unit_source`]; the plan keeps only the rows it picks.
    pub fn aggregate_plan(
        &self,
        selection: Option<&std::sync::Arc<super::bound::Selection>>,
    ) -> Result<LogicalPlan, GateError> {
        let aggs = self
            .measures
            .iter()
            .enumerate()
            .map(|(i, m)| m.aggregate_expr(i))
            .collect::<Result<Vec<_>, _>>()?;
        LogicalPlanBuilder::from(self.aggregate_input(selection)?)
            .aggregate(self.groups.iter().map(|g| g.expr.clone()), aggs)
            .and_then(|b| b.build())
            .map_err(plan_error)
    }

    /// The same measurements as [`QueryShape::aggregate_plan`] without `GROUP BY`, when every
    /// group column has public keys: each row's slot among the key combinations, in
    /// [`QueryShape::key_product`]'s order, and one vector of slots per measure (`dense.rs`).
    /// `None` when some column's keys are not public, empty or repeated, or a measure is a
    /// distinct count or a quantile (those keep the grouped plan).
    pub fn dense_plan(
        &self,
        selection: Option<&std::sync::Arc<super::bound::Selection>>,
        memos: &[std::sync::Arc<crate::engine::PositionMemo>],
    ) -> Result<Option<LogicalPlan>, GateError> {
        use super::dense::{DenseSlots, Fold, KeyPositions, SlotWhere};
        use datafusion::logical_expr::{AggregateUDF, ScalarUDF};
        let mut keys = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let Some(k) = g.keys.as_ref().filter(|k| !k.is_empty()) else {
                return Ok(None);
            };
            let texts: Vec<String> = k.iter().map(super::key_text).collect();
            let distinct: std::collections::HashSet<&String> = texts.iter().collect();
            if distinct.len() != texts.len() {
                return Ok(None);
            }
            keys.push(texts);
        }
        if keys.is_empty() {
            return Ok(None);
        }
        // Slots are numbered in 32 bits; the analysis already holds the product to MAX_GROUPS.
        let slots = keys.iter().try_fold(1usize, |n, k| n.checked_mul(k.len()));
        let Some(slots) = slots.filter(|n| *n <= MAX_GROUPS) else {
            return Ok(None);
        };
        let mut slot = ScalarUDF::new_from_impl(KeyPositions::new(keys, memos.to_vec()))
            .call(self.groups.iter().map(|g| g.expr.clone()).collect());
        // Person-level rows of one table's scan, grouped and measured by its plain columns:
        // pass 2's decision becomes a column beside the scan's and turns dropped rows' slots
        // null, instead of a filter copying the kept rows. Only for plain columns, which read
        // the same on every row: an expression could fail on a row the query's filters drop.
        let plain_columns = self
            .groups
            .iter()
            .map(|g| &g.expr)
            .chain(self.measures.iter().filter_map(MeasureSpec::argument))
            .all(|e| matches!(e, Expr::Column(_)));
        let input = match (&self.unit, selection) {
            (Some(unit), Some(selection))
                if plain_columns && super::bound::scan_with_filters(&self.input) =>
            {
                let (scan, keep) = super::bound::keep_expr(&self.input, unit, selection)?;
                slot = ScalarUDF::new_from_impl(SlotWhere::new()).call(vec![
                    slot,
                    Expr::Column(datafusion::common::Column::new_unqualified(
                        super::bound::KEEP_COLUMN,
                    )),
                ]);
                super::bound::with_keep_column(scan, keep)?
            }
            _ => self.aggregate_input(selection)?,
        };
        // One aggregate folds every measure: the slot column is read once.
        let (mut folds, mut args) = (Vec::with_capacity(self.measures.len()), vec![slot]);
        for m in &self.measures {
            match m {
                MeasureSpec::Rows => folds.push(Fold::Rows),
                MeasureSpec::NonNull { expr, .. } => {
                    folds.push(Fold::NonNull);
                    args.push(expr.clone());
                }
                MeasureSpec::ClampedSum { .. } => {
                    let (x, convert) = m.convert().ok_or_else(plan_error_text)?;
                    folds.push(Fold::Clamped(convert));
                    args.push(x);
                }
                MeasureSpec::Distinct { .. } | MeasureSpec::Quantile { .. } => return Ok(None),
            }
        }
        let aggs = vec![
            AggregateUDF::new_from_impl(DenseSlots::new(folds, slots))
                .call(args)
                .alias("__m"),
        ];
        LogicalPlanBuilder::from(input)
            .aggregate(Vec::<Expr>::new(), aggs)
            .and_then(|b| b.build())
            .map(Some)
            .map_err(plan_error)
    }

    /// The rows the measurements aggregate: the query's input, and for person-level data only
    /// the rows the per-person `selection` keeps.
    fn aggregate_input(
        &self,
        selection: Option<&std::sync::Arc<super::bound::Selection>>,
    ) -> Result<LogicalPlan, GateError> {
        match (&self.unit, selection) {
            (Some(unit), Some(selection)) => {
                super::bound::bound_contributions(&self.input, unit, selection)
            }
            (None, None) => Ok(self.input.clone()),
            _ => Err(plan_error_text()),
        }
    }

    /// Pass 1's input for contribution bounding (see `bound.rs`): the scan and the query's
    /// filters on it.
    pub fn unit_source(&self) -> Result<&LogicalPlan, GateError> {
        super::bound::source(&self.input).ok_or_else(plan_error_text)
    }

    /// How many rows one privacy unit can add or remove after bounding: the `d_in`, in
    /// OpenDP's symmetric distance, of every measurement.
    pub fn rows_per_unit(&self) -> u64 {
        self.unit.as_ref().map_or(1, |u| u.max_rows)
    }

    /// How many groups one privacy unit's rows can fall in after bounding (partition
    /// selection's l0 distance).
    pub fn groups_per_unit(&self) -> u64 {
        match &self.unit {
            Some(UnitBound {
                groups: Some(g), ..
            }) => g.max_groups,
            _ => self.rows_per_unit(),
        }
    }

    /// Whether some group column has no public key set: then the released groups are chosen
    /// by DP partition selection, for all columns together.
    pub fn private_keys(&self) -> bool {
        self.groups.iter().any(|g| g.keys.is_none())
    }

    /// Every combination of public keys, in catalogue order (empty if some keys are private).
    pub fn key_product(&self) -> Vec<Vec<KeyValue>> {
        if self.private_keys() {
            return Vec::new();
        }
        let mut out: Vec<Vec<KeyValue>> = vec![vec![]];
        for g in &self.groups {
            out = out
                .into_iter()
                .flat_map(|prefix| {
                    g.keys.iter().flatten().map(move |k| {
                        let mut p = prefix.clone();
                        p.push(k.clone());
                        p
                    })
                })
                .collect();
        }
        out
    }
}

fn plan_error(_: datafusion::error::DataFusionError) -> GateError {
    plan_error_text()
}

fn plan_error_text() -> GateError {
    GateError::refused(
        "internal",
        "the gate could not build the aggregate for this query",
    )
}

fn refuse(code: &'static str, message: impl Into<String>) -> GateError {
    GateError::refused(code, message)
}

const SHAPE_HINT: &str = "write SELECT <public keys>, COUNT(*) | COUNT(col) | SUM(col) | AVG(col) | VAR(col) | STDDEV(col) FROM <table> [WHERE …] GROUP BY <public keys>, and post-process the released table in your module";

const HAVING_HINT: &str =
    "HAVING filters on exact aggregates; filter the released table in your module instead";

/// Checks a planned query and returns what the gate will compute.
pub fn analyse(
    plan: &LogicalPlan,
    grant: &JobGrant,
    request: &QueryRequest,
) -> Result<QueryShape, GateError> {
    let (named_outputs, agg) = peel(plan)?;
    let Aggregate {
        input,
        group_expr,
        aggr_expr,
        ..
    } = agg;

    let mut scans = Vec::new();
    check_input(input, grant, &mut scans)?;
    // A self-join reads one dataset twice: one dataset, charged once.
    let mut tables: Vec<String> = Vec::new();
    for t in scans {
        if !tables.contains(&t) {
            tables.push(t);
        }
    }
    let policies: Vec<&crate::catalog::DatasetPolicy> =
        tables.iter().map(|t| &grant.datasets[t]).collect();
    if let Some(closed) = policies
        .iter()
        .find(|p| p.open_attribute == OpenAttribute::Closed)
    {
        return Err(refuse(
            "dataset_closed",
            format!("dataset {:?} is closed (不予开放)", closed.id),
        ));
    }
    let policy = policies[0];
    let mut unit = unit_bound(&policies, grant, request, input)?;
    // A column's catalogue entry: the dataset whose scan it comes from (through subqueries and
    // joins), else the first of the query's datasets that has a column of that name.
    let catalogued = |e: &Expr| -> Option<&crate::catalog::ColumnPolicy> {
        let name = column_of(e)?;
        let traced = match unalias(e) {
            Expr::Column(c) => scan_column_of(input, c),
            _ => None,
        };
        match traced {
            Some((table, column)) => grant.datasets.get(&table)?.columns.get(&column),
            None => policies.iter().find_map(|p| p.columns.get(&name)),
        }
    };

    let mut groups = Vec::new();
    for g in group_expr {
        // A CASE whose every outcome is a literal (bins of a numeric column, say) has those
        // literals as its public keys, whether grouped on directly or through a subquery.
        if let Some(keys) = literal_outcomes(unalias(g), input) {
            check_expr(unalias(g), input.schema())?;
            groups.push(GroupSpec {
                column: g.schema_name().to_string(),
                keys: Some(keys),
                expr: g.clone(),
            });
            continue;
        }
        let Expr::Column(c) = unalias(g) else {
            return Err(refuse(
                "key_not_public",
                format!(
                    "GROUP BY {g} is not a column; group by columns with public keys, or by a CASE whose every outcome is a literal (its keys)"
                ),
            ));
        };
        let keys = catalogued(unalias(g)).and_then(|p| p.public_keys.clone());
        if keys.is_none() && request.delta.is_none() {
            return Err(refuse(
                "key_not_public",
                format!(
                    "{:?} has no public key set in the catalogue, so which of its groups exist is private: give \"delta\" (e.g. 1e-6) to have the gate choose them by DP partition selection (groups with few units are left out), or group by a column with public keys",
                    c.name
                ),
            ));
        }
        groups.push(GroupSpec {
            column: c.name.clone(),
            keys,
            expr: g.clone(),
        });
    }
    let n_groups: usize = groups
        .iter()
        .map(|g| g.keys.as_ref().map_or(1, Vec::len))
        .try_fold(1usize, |acc, n| acc.checked_mul(n))
        .unwrap_or(usize::MAX);
    if n_groups > MAX_GROUPS {
        return Err(refuse(
            "too_many_groups",
            format!(
                "the public keys give {n_groups} groups; at most {MAX_GROUPS} may be released at once"
            ),
        ));
    }

    let joined = super::bound::source(input).is_some_and(super::bound::joined);
    let group_bound = if !joined {
        group_bound(policy, grant, request, unit.as_ref(), &groups, input)?
    } else if request.max_groups_per_unit.is_some() {
        return Err(refuse(
            "invalid_group_bound",
            "max_groups_per_unit applies to one dataset's own columns; a join pays for k groups per person: drop it",
        ));
    } else {
        None
    };
    if let Some(unit) = unit.as_mut() {
        unit.groups = group_bound;
    }

    let schema = input.schema();
    let mut measures = vec![MeasureSpec::Rows];
    let mut add = |m: MeasureSpec| -> usize {
        let label = m.label();
        if let Some(i) = measures.iter().position(|x| x.label() == label) {
            i
        } else {
            measures.push(m);
            measures.len() - 1
        }
    };
    // A column's clamping bounds: the query's, else the catalogue's; none is a refusal that
    // says how to give them.
    let bounds_of = |column: &String, x: &Expr, e: &Expr| -> Result<[f64; 2], GateError> {
        request
            .bounds
            .get(column)
            .copied()
            .or_else(|| catalogued(x).and_then(|c| c.bounds))
            .ok_or_else(|| {
                refuse(
                    "unbounded_column",
                    format!(
                        "{e} is unbounded: one person could move it arbitrarily far. Give bounds for {column:?} in the query (e.g. \"bounds\": {{\"{column}\": [0, 100]}}); values outside are clamped"
                    ),
                )
            })
    };
    let mut agg_outputs = Vec::new();
    for e in aggr_expr {
        let Expr::AggregateFunction(af) = unalias(e) else {
            return Err(refuse(
                "unsupported_query",
                format!("{e} is not an aggregate the gate can bound"),
            ));
        };
        let p = &af.params;
        let name = af.func.name().to_ascii_lowercase();
        // The approximate spellings get the same private quantile (exact ranks, DP noise).
        let name = match name.as_str() {
            "approx_median" => "median".to_string(),
            "approx_percentile_cont" => "percentile_cont".to_string(),
            _ => name,
        };
        // `PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY x)` plans as an ordering on x.
        let ordered_set = name == "percentile_cont" && p.order_by.len() == 1;
        if (p.distinct && name != "count")
            || p.filter.is_some()
            || (!p.order_by.is_empty() && !ordered_set)
        {
            return Err(refuse(
                "unsupported_aggregate",
                format!(
                    "{e}: DISTINCT (except in COUNT), FILTER and ORDER BY inside aggregates are not supported"
                ),
            ));
        }
        let arg = p.args.first();
        // The numeric column a SUM, AVG, VAR, STDDEV or quantile takes, with its bounds.
        let bounded_column = |x: &Expr| -> Result<(String, [f64; 2]), GateError> {
            check_expr(x, schema)?;
            let column = column_of(x).ok_or_else(|| {
                refuse(
                    "unsupported_aggregate",
                    format!("{e}: SUM, AVG, VAR, STDDEV, MEDIAN and PERCENTILE_CONT take a column; compute other expressions from released values"),
                )
            })?;
            if !x.get_type(schema).map(|t| t.is_numeric()).unwrap_or(false) {
                return Err(refuse(
                    "unsupported_aggregate",
                    format!("{e}: {column:?} is not numeric"),
                ));
            }
            let bounds = bounds_of(&column, x, e)?;
            Ok((column, bounds))
        };
        // DataFusion 55's SQL planner still gives `COUNT(*)` a wildcard argument (deprecated
        // for plans built by hand), so it is matched here as a row count.
        #[allow(deprecated)]
        let out = match (name.as_str(), arg) {
            ("count", None) | ("count", Some(Expr::Literal(..) | Expr::Wildcard { .. })) => {
                (0, ColumnKind::Count, None)
            }
            ("count", Some(x)) if p.distinct => {
                check_expr(x, schema)?;
                (
                    add(MeasureSpec::Distinct {
                        expr: x.clone(),
                        label: x.to_string(),
                    }),
                    ColumnKind::Count,
                    None,
                )
            }
            ("count", Some(x)) => {
                check_expr(x, schema)?;
                (
                    add(MeasureSpec::NonNull {
                        expr: x.clone(),
                        label: x.to_string(),
                    }),
                    ColumnKind::Count,
                    None,
                )
            }
            ("median" | "percentile_cont", Some(first)) => {
                let (x, q) = match (name.as_str(), p.args.as_slice()) {
                    ("median", [x]) => (x, Some(0.5)),
                    (_, [q]) if ordered_set => (&p.order_by[0].expr, literal_fraction(q)),
                    // APPROX_PERCENTILE_CONT's optional third argument (t-digest centroids)
                    // means nothing to the private quantile.
                    (_, [x, q] | [x, q, _]) => (x, literal_fraction(q)),
                    _ => (first, None),
                };
                let Some(q) = q else {
                    return Err(refuse(
                        "unsupported_aggregate",
                        format!(
                            "{e}: the quantile must be a number between 0 and 1 written in the query (e.g. PERCENTILE_CONT(fare, 0.9))"
                        ),
                    ));
                };
                let (column, [lo, hi]) = bounded_column(x)?;
                (
                    add(MeasureSpec::Quantile {
                        expr: x.clone(),
                        column,
                        lo,
                        hi,
                        q,
                    }),
                    ColumnKind::Quantile,
                    None,
                )
            }
            ("sum" | "avg" | "var" | "var_pop" | "stddev" | "stddev_pop", Some(x)) => {
                let (column, [lo, hi]) = bounded_column(x)?;
                let (shift, kind) = match name.as_str() {
                    "sum" => (0.0, ColumnKind::Sum),
                    "avg" => ((lo + hi) / 2.0, ColumnKind::Mean),
                    "var" | "var_pop" => ((lo + hi) / 2.0, ColumnKind::Variance),
                    _ => ((lo + hi) / 2.0, ColumnKind::StdDev),
                };
                let reach = (lo - shift).abs().max((hi - shift).abs());
                let sum = add(MeasureSpec::ClampedSum {
                    expr: x.clone(),
                    column: column.clone(),
                    lo,
                    hi,
                    shift,
                    fixed_point: fixed_point_for(reach),
                    squared: false,
                });
                let squares =
                    matches!(kind, ColumnKind::Variance | ColumnKind::StdDev).then(|| {
                        add(MeasureSpec::ClampedSum {
                            expr: x.clone(),
                            column,
                            lo,
                            hi,
                            shift,
                            fixed_point: fixed_point_for(reach * reach),
                            squared: true,
                        })
                    });
                (sum, kind, squares)
            }
            _ => {
                return Err(refuse(
                    "unsupported_aggregate",
                    format!(
                        "{e}: only COUNT, COUNT(DISTINCT), SUM, AVG, VAR, STDDEV, MEDIAN and PERCENTILE_CONT can be released here"
                    ),
                ));
            }
        };
        agg_outputs.push(out);
    }

    let outputs = named_outputs
        .into_iter()
        .map(|(name, i)| {
            if i < group_expr.len() {
                OutputSpec::Key { name, group: i }
            } else {
                match agg_outputs[i - group_expr.len()] {
                    (sum, kind, Some(squares)) => OutputSpec::Spread {
                        name,
                        sum,
                        squares,
                        kind,
                    },
                    (measure, kind, None) => OutputSpec::Measure {
                        name,
                        measure,
                        kind,
                    },
                }
            }
        })
        .collect();

    let mode = guest_udf_mode(plan).map_or("query", |m| m.as_str());
    Ok(QueryShape {
        tables,
        unit,
        groups,
        measures,
        outputs,
        mode,
        input: input.as_ref().clone(),
    })
}

/// The contribution bound for person-level data: the catalogue's, lowered by the scenario and
/// the query (which may not raise it), with the column that names each row's person in the
/// rows it applies to (`bound::source`: one scan and its filters, or a join and the filters on
/// it). A join's bound is the largest of its datasets': a person's rows in a dataset of one
/// row per person meet as many rows of the other as that one allows.
fn unit_bound(
    policies: &[&crate::catalog::DatasetPolicy],
    grant: &JobGrant,
    request: &QueryRequest,
    input: &LogicalPlan,
) -> Result<Option<UnitBound>, GateError> {
    let source = super::bound::source(input).ok_or_else(plan_error_text)?;
    let join = super::bound::joined(source);
    if let Some(rows) = policies.iter().find(|p| p.privacy_unit == "row") {
        if join {
            return Err(refuse(
                "unsupported_join",
                format!(
                    "dataset {:?} protects each row, not a person; joins are bounded per person, so every joined dataset needs a privacy unit (and the join equates them)",
                    rows.id
                ),
            ));
        }
        if request.max_rows_per_unit.is_some() {
            return Err(refuse(
                "invalid_row_bound",
                format!(
                    "dataset {:?} protects each row, so there is no per-person row bound to set; drop max_rows_per_unit",
                    rows.id
                ),
            ));
        }
        return Ok(None);
    }
    let mut k = 0;
    for policy in policies {
        let mut own = policy.max_rows_per_unit.ok_or_else(|| {
            refuse(
                "internal",
                "the catalogue entry has no per-person row bound",
            )
        })?;
        if let Some(s) = grant.scenario.application.max_rows_per_unit {
            own = own.min(s.max(1));
        }
        k = k.max(own);
    }
    let mut units: Vec<&str> = Vec::new();
    for p in policies {
        if !units.contains(&p.privacy_unit.as_str()) {
            units.push(&p.privacy_unit);
        }
    }
    let column = units.join("=");
    if let Some(q) = request.max_rows_per_unit {
        if q == 0 || q > k {
            return Err(refuse(
                "invalid_row_bound",
                format!(
                    "max_rows_per_unit {q}: must be 1 to {k}, the bound the catalogue and the scenario allow for {column:?}"
                ),
            ));
        }
        k = q;
    }
    let key = if join {
        join_key(input, source, grant)?
    } else {
        let (qualifier, field) = source
            .schema()
            .qualified_field_with_unqualified_name(&policies[0].privacy_unit)
            .map_err(|_| plan_error_text())?;
        Column::new(qualifier.cloned(), field.name())
    };
    Ok(Some(UnitBound {
        column,
        key,
        max_rows: k,
        groups: None,
    }))
}

/// The column of a join's rows that names their person. Every join below the aggregate must
/// be an inner join whose condition equates a privacy-unit column of its left side with one of
/// its right side (each traced to its dataset's scan, unrenamed). Then every row of the join
/// belongs to one value of that column, the same in every joined dataset, and keeping at most
/// k rows per value bounds what any one person of any of the datasets can change — whether or
/// not the datasets' persons are the same people.
fn join_key(
    input: &LogicalPlan,
    source: &LogicalPlan,
    grant: &JobGrant,
) -> Result<Column, GateError> {
    let mut failure = None;
    let _ = input.apply(|node| {
        if let LogicalPlan::Join(j) = node
            && let Err(e) = join_unit_column(j, grant)
        {
            failure = Some(e);
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if let Some(e) = failure {
        return Err(e);
    }
    match super::bound::split_filters(source).0 {
        LogicalPlan::Join(j) => join_unit_column(j, grant),
        _ => Err(plan_error_text()),
    }
}

/// One join's person column (its left side's), if the join is one the gate can bound.
fn join_unit_column(j: &Join, grant: &JobGrant) -> Result<Column, GateError> {
    const HINT: &str = "join datasets on their privacy units, e.g. FROM trips t JOIN riders r ON t.person_id = r.person_id";
    if j.join_type != JoinType::Inner {
        return Err(refuse(
            "unsupported_join",
            format!(
                "only inner joins are supported: a {} join adds rows for persons missing on one side; {HINT}",
                j.join_type
            ),
        ));
    }
    let unit_of = |side: &LogicalPlan, c: &Column| -> bool {
        scan_column_of(side, c).is_some_and(|(table, column)| {
            grant
                .datasets
                .get(&table)
                .is_some_and(|p| p.privacy_unit != "row" && p.privacy_unit == column)
        })
    };
    let mut pairs: Vec<(&Expr, &Expr)> = j.on.iter().map(|(l, r)| (l, r)).collect();
    if let Some(filter) = &j.filter {
        for conjunct in datafusion::logical_expr::utils::split_conjunction(filter) {
            if let Expr::BinaryExpr(b) = conjunct
                && b.op == Operator::Eq
            {
                pairs.push((&b.left, &b.right));
                pairs.push((&b.right, &b.left));
            }
        }
    }
    pairs
        .into_iter()
        .find_map(|(l, r)| match (unalias(l), unalias(r)) {
            (Expr::Column(l), Expr::Column(r))
                if j.left.schema().has_column(l)
                    && j.right.schema().has_column(r)
                    && unit_of(&j.left, l)
                    && unit_of(&j.right, r) =>
            {
                Some(l.clone())
            }
            _ => None,
        })
        .ok_or_else(|| {
            refuse(
                "unsupported_join",
                format!(
                    "a join must equate the two sides' privacy-unit columns (as the datasets name them, not renamed), so that each joined row belongs to one person; {HINT}"
                ),
            )
        })
}

/// The dataset table and column that `c` (a column of `plan`'s output) is, unrenamed and
/// uncomputed, traced through projections, aliases, filters and joins down to its scan.
pub(super) fn scan_column_of(plan: &LogicalPlan, c: &Column) -> Option<(String, String)> {
    match plan {
        LogicalPlan::TableScan(scan) => scan
            .projected_schema
            .has_column(c)
            .then(|| (scan.table_name.table().to_string(), c.name.clone())),
        LogicalPlan::Projection(p) => {
            let i = p.schema.index_of_column(c).ok()?;
            match unalias(&p.expr[i]) {
                Expr::Column(inner) => scan_column_of(&p.input, inner),
                _ => None,
            }
        }
        LogicalPlan::Filter(f) => scan_column_of(&f.input, c),
        LogicalPlan::SubqueryAlias(s) => {
            let i = s.schema.index_of_column(c).ok()?;
            let (qualifier, field) = s.input.schema().qualified_field(i);
            scan_column_of(&s.input, &Column::new(qualifier.cloned(), field.name()))
        }
        LogicalPlan::Join(j) => {
            if j.left.schema().has_column(c) {
                scan_column_of(&j.left, c)
            } else if j.right.schema().has_column(c) {
                scan_column_of(&j.right, c)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The bound on groups per person, where it lowers the price: for a person-level dataset,
/// keys chosen by partition selection, and the catalogue's, the scenario's or the query's `g`
/// below `k` (with at most k rows a person reaches at most k groups anyway). Applied when the
/// groups are the scan's own columns, grouped on directly; a query that asks for it where it
/// cannot apply or changes nothing is refused, so no one believes it applied.
fn group_bound(
    policy: &crate::catalog::DatasetPolicy,
    grant: &JobGrant,
    request: &QueryRequest,
    unit: Option<&UnitBound>,
    groups: &[GroupSpec],
    input: &LogicalPlan,
) -> Result<Option<GroupBound>, GateError> {
    let asked = request.max_groups_per_unit;
    let refuse_asked = |why: String| -> Result<Option<GroupBound>, GateError> {
        match asked {
            Some(_) => Err(refuse("invalid_group_bound", why)),
            None => Ok(None),
        }
    };
    let Some(unit) = unit else {
        return refuse_asked(format!(
            "dataset {:?} protects each row, and a row is in one group; drop max_groups_per_unit",
            policy.id
        ));
    };
    let allowed = [
        policy.max_groups_per_unit,
        grant.scenario.application.max_groups_per_unit,
    ]
    .into_iter()
    .flatten()
    .min();
    let g = match (asked, allowed) {
        (Some(q), Some(a)) if q == 0 || q > a => {
            return Err(refuse(
                "invalid_group_bound",
                format!(
                    "max_groups_per_unit {q}: must be 1 to {a}, the bound the catalogue and the scenario allow"
                ),
            ));
        }
        (Some(q), None) if !(1..=crate::catalog::MAX_GROUPS_PER_UNIT).contains(&q) => {
            return Err(refuse(
                "invalid_group_bound",
                format!(
                    "max_groups_per_unit {q}: must be 1 to {}",
                    crate::catalog::MAX_GROUPS_PER_UNIT
                ),
            ));
        }
        (Some(q), _) => q,
        (None, Some(a)) => a,
        (None, None) => return Ok(None),
    };
    if groups.iter().all(|g| g.keys.is_some()) {
        return refuse_asked(
            "max_groups_per_unit lowers the price of choosing groups from the data; these keys are all public, so it would only drop rows: leave it out".into(),
        );
    }
    if g >= unit.max_rows {
        return refuse_asked(format!(
            "max_groups_per_unit {g} changes nothing: with at most {} rows a person reaches at most that many groups; ask for fewer",
            unit.max_rows
        ));
    }
    let columns: Option<Vec<String>> = groups
        .iter()
        .map(|g| match unalias(&g.expr) {
            Expr::Column(c) => Some(c.name.clone()),
            _ => None,
        })
        .collect();
    match columns {
        Some(columns) if super::bound::source(input).is_some_and(|s| std::ptr::eq(s, input)) => {
            Ok(Some(GroupBound {
                max_groups: g,
                columns,
            }))
        }
        _ => refuse_asked(
            "max_groups_per_unit applies when the query groups by the dataset's own columns directly (no subquery, no computed keys)".into(),
        ),
    }
}

/// The guest UDF a function call runs, if it is one.
fn guest_udf(e: &Expr) -> Option<&WasmUdf> {
    match e {
        Expr::ScalarFunction(f) => {
            let inner: &dyn std::any::Any = f.func.inner().as_ref();
            inner.downcast_ref::<WasmUdf>()
        }
        _ => None,
    }
}

/// The mode of the guest UDFs a plan calls, if it calls any (one module per job: one mode).
fn guest_udf_mode(plan: &LogicalPlan) -> Option<UdfMode> {
    let mut mode = None;
    let _ = plan.apply(|node| {
        for e in node.expressions() {
            let _ = e.apply(|x| {
                if let Some(u) = guest_udf(x) {
                    mode = Some(u.mode());
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        Ok(TreeNodeRecursion::Continue)
    });
    mode
}

fn unalias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => unalias(&a.expr),
        e => e,
    }
}

fn column_of(e: &Expr) -> Option<String> {
    match e {
        Expr::Column(c) => Some(c.name.clone()),
        Expr::Alias(a) => column_of(&a.expr),
        Expr::Cast(c) => column_of(&c.expr),
        Expr::TryCast(c) => column_of(&c.expr),
        // A guest UDF's results are bounded under its name.
        e => guest_udf(e).map(|u| datafusion::logical_expr::ScalarUDFImpl::name(u).to_string()),
    }
}

/// The aggregate at the top, and the released columns as (name, index in its output).
fn peel(plan: &LogicalPlan) -> Result<(Vec<(String, usize)>, &Aggregate), GateError> {
    match plan {
        LogicalPlan::Sort(s) => peel(&s.input),
        LogicalPlan::Projection(p) => {
            let agg = match p.input.as_ref() {
                LogicalPlan::Aggregate(agg) => agg,
                // Projection over Filter over Aggregate is how HAVING plans.
                LogicalPlan::Filter(_) => return Err(refuse("unsupported_query", HAVING_HINT)),
                _ => {
                    return Err(refuse(
                        "unsupported_query",
                        format!("the query's top must be an aggregate: {SHAPE_HINT}"),
                    ));
                }
            };
            let mut outputs = Vec::new();
            for e in &p.expr {
                let (name, column) = match e {
                    Expr::Column(c) => (c.name.clone(), c),
                    Expr::Alias(a) => match a.expr.as_ref() {
                        Expr::Column(c) => (a.name.clone(), c),
                        _ => {
                            return Err(refuse(
                                "unsupported_query",
                                format!("{e}: compute on released values in your module instead"),
                            ));
                        }
                    },
                    _ => {
                        return Err(refuse(
                            "unsupported_query",
                            format!("{e}: compute on released values in your module instead"),
                        ));
                    }
                };
                let index = agg.schema.index_of_column(column).map_err(|_| {
                    refuse(
                        "unsupported_query",
                        format!("{e} is not an output of the aggregate"),
                    )
                })?;
                outputs.push((name, index));
            }
            Ok((outputs, agg))
        }
        LogicalPlan::Aggregate(agg) => Ok((
            agg.schema
                .fields()
                .iter()
                .enumerate()
                .map(|(i, f)| (f.name().clone(), i))
                .collect(),
            agg,
        )),
        LogicalPlan::Filter(_) => Err(refuse("unsupported_query", HAVING_HINT)),
        LogicalPlan::Limit(_) => Err(refuse(
            "unsupported_query",
            "LIMIT on released groups is not supported; every public key is released",
        )),
        _ => Err(refuse(
            "unsupported_query",
            format!("the query's top must be an aggregate: {SHAPE_HINT}"),
        )),
    }
}

/// Below the aggregate: scans of the scenario's tables, filters and projections only.
pub(super) fn check_input(
    plan: &LogicalPlan,
    grant: &JobGrant,
    tables: &mut Vec<String>,
) -> Result<(), GateError> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            let name = scan.table_name.table();
            if !grant.datasets.contains_key(name)
                || !scan.filters.is_empty()
                || scan.fetch.is_some()
            {
                return Err(refuse(
                    "table_not_allowed",
                    format!("table {name:?} is not in this scenario"),
                ));
            }
            tables.push(name.to_string());
            Ok(())
        }
        LogicalPlan::Filter(f) => {
            check_expr(&f.predicate, f.input.schema())?;
            check_input(&f.input, grant, tables)
        }
        LogicalPlan::Projection(p) => {
            for e in &p.expr {
                check_expr(e, p.input.schema())?;
            }
            check_input(&p.input, grant, tables)
        }
        LogicalPlan::SubqueryAlias(s) => check_input(&s.input, grant, tables),
        // Which joins the gate can bound (inner, on the privacy units) is `join_key`'s to say;
        // here, that their conditions cannot fail either.
        LogicalPlan::Join(j) => {
            for (l, r) in &j.on {
                check_expr(l, j.left.schema())?;
                check_expr(r, j.right.schema())?;
            }
            if let Some(f) = &j.filter {
                check_expr(f, &j.schema)?;
            }
            check_input(&j.left, grant, tables)?;
            check_input(&j.right, grant, tables)
        }
        _ => Err(refuse(
            "unsupported_query",
            format!(
                "below the aggregate only WHERE filters, column selection and inner joins on the privacy unit are supported (no unions, windows, limits or nested aggregates): {SHAPE_HINT}"
            ),
        )),
    }
}

/// Expressions that cannot fail on any row: failing would tell the analyst a row exists.
fn check_expr(e: &Expr, schema: &DFSchema) -> Result<(), GateError> {
    use Operator::*;
    let not_allowed = || {
        refuse(
            "expression_not_allowed",
            format!(
                "{e}: only columns, literals, comparisons, AND/OR/NOT, IS [NOT] NULL, BETWEEN, IN (literals), CASE, widening casts, float arithmetic and the module's own UDFs may appear before aggregation"
            ),
        )
    };
    match e {
        Expr::Column(_) | Expr::Literal(..) => Ok(()),
        Expr::Alias(a) => check_expr(&a.expr, schema),
        Expr::BinaryExpr(b) => {
            // Float arithmetic cannot fail (division by zero gives ±inf or NaN, which the
            // clamp bounds); integer arithmetic can overflow or divide by zero, so it may not.
            let float = |x: &Expr| {
                x.get_type(schema)
                    .is_ok_and(|t| matches!(t, DataType::Float64 | DataType::Float32))
            };
            if matches!(b.op, Plus | Minus | Multiply | Divide) && float(&b.left) && float(&b.right)
            {
                check_expr(&b.left, schema)?;
                return check_expr(&b.right, schema);
            }
            if matches!(
                b.op,
                Eq | NotEq | Lt | LtEq | Gt | GtEq | And | Or | IsDistinctFrom | IsNotDistinctFrom
            ) {
                check_expr(&b.left, schema)?;
                check_expr(&b.right, schema)
            } else {
                Err(not_allowed())
            }
        }
        Expr::Not(x)
        | Expr::IsNull(x)
        | Expr::IsNotNull(x)
        | Expr::IsTrue(x)
        | Expr::IsFalse(x)
        | Expr::IsNotTrue(x)
        | Expr::IsNotFalse(x)
        | Expr::IsUnknown(x)
        | Expr::IsNotUnknown(x) => check_expr(x, schema),
        Expr::Between(b) => {
            check_expr(&b.expr, schema)?;
            check_expr(&b.low, schema)?;
            check_expr(&b.high, schema)
        }
        Expr::InList(l) => {
            check_expr(&l.expr, schema)?;
            if l.list.len() <= 10_000 && l.list.iter().all(|x| matches!(x, Expr::Literal(..))) {
                Ok(())
            } else {
                Err(not_allowed())
            }
        }
        Expr::TryCast(c) => check_expr(&c.expr, schema),
        // CASE picks among expressions that each cannot fail, so it cannot either.
        Expr::Case(c) => {
            if let Some(base) = &c.expr {
                check_expr(base, schema)?;
            }
            for (when, then) in &c.when_then_expr {
                check_expr(when, schema)?;
                check_expr(then, schema)?;
            }
            c.else_expr
                .as_ref()
                .map_or(Ok(()), |e| check_expr(e, schema))
        }
        // A guest UDF cannot fail on a row (a failing row gets its declared default).
        Expr::ScalarFunction(f) if guest_udf(e).is_some() => {
            f.args.iter().try_for_each(|a| check_expr(a, schema))
        }
        Expr::Cast(c) => {
            if matches!(c.expr.as_ref(), Expr::Literal(..)) {
                return Ok(());
            }
            let from = c.expr.get_type(schema).map_err(|_| not_allowed())?;
            let widening = match (&from, c.field.data_type()) {
                (f, DataType::Float64 | DataType::Float32) => f.is_numeric(),
                (
                    DataType::Int8
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::UInt8
                    | DataType::UInt16
                    | DataType::UInt32,
                    DataType::Int64,
                ) => true,
                (f, DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8) => {
                    f.is_primitive()
                        || matches!(f, DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8)
                }
                _ => false,
            };
            if widening {
                check_expr(&c.expr, schema)
            } else {
                Err(not_allowed())
            }
        }
        _ => Err(not_allowed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_scales_keep_two_to_the_32_rows_from_overflowing() {
        for max_abs in [1e-9, 0.5, 1.0, 3.0, 50.0, 100.0, 500.0, 1e6, 1e12] {
            let fp = fixed_point_for(max_abs);
            let per_row = (max_abs * fp).round();
            assert!(per_row <= 2f64.powi(30), "{max_abs}: {per_row}");
            assert!(per_row * 2f64.powi(32) < i64::MAX as f64);
            // and the grid is fine enough to matter little: at least 2^20 steps over the range
            // for every range up to 2^10.
            if max_abs <= 1024.0 && max_abs >= 1.0 {
                assert!(per_row >= 2f64.powi(19), "{max_abs}: {per_row}");
            }
        }
    }

    #[test]
    fn mean_shifts_to_the_midpoint_and_rounds_the_bounds_inward() {
        let m = MeasureSpec::ClampedSum {
            expr: lit(0.0),
            column: "fare".into(),
            lo: 0.0,
            hi: 100.0,
            shift: 50.0,
            fixed_point: fixed_point_for(50.0),
            squared: false,
        };
        let (lo, hi) = m.fixed_point_bounds();
        assert_eq!(lo, -hi);
        assert_eq!(hi as f64, 50.0 * m.fixed_point());
        assert!(m.label().starts_with("mean(fare"));
    }
}
