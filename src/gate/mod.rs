//! The egress gate: the only code that turns data into something a module may see.
//!
//! For each query a module asks: check the SQL's shape against the scenario (one table, an
//! aggregate on top, group keys that are public in the catalogue, `COUNT`/`SUM`/`AVG` over
//! clamped columns, filters that cannot fail on data); price it with OpenDP's stability and
//! privacy maps; debit the ledger durably; only then compute exact aggregates with DataFusion,
//! add OpenDP noise, suppress groups under the minimum size, and build the [`Release`].
//!
//! Privacy unit: the row. Datasets whose unit is a person column are refused until contribution
//! bounding is built.
//!
//! Open attributes: `closed` datasets answer nothing; `conditional` ones answer only as above;
//! `unconditional` (openly publishable) ones answer the same query shapes exactly, without
//! noise or minimum group size, at ε = 0 — still recorded in the ledger as a use.

mod fixed_point;
mod plan;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type};
use opendp::core::{Measurement, Transformation};
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_laplace;
use opendp::measures::MaxDivergence;
use opendp::metrics::{AbsoluteDistance, L1Distance, SymmetricDistance};
use unseen_guest::contract::{
    ColumnKind, QueryError, QueryRequest, Release, ReleasedColumn, Value,
};

use crate::catalog::{DatasetPolicy, KeyValue, OpenAttribute};
use crate::config::Limits;
use crate::engine::{EngineError, JobSession, TableSpec};
use crate::ledger::{Ledger, LedgerError, Reservation};
use crate::scenario::{Scenario, Status};
use crate::store::{Store, StoreError};

pub use plan::{MeasureSpec, OutputSpec, QueryShape};

/// Why a query released nothing. Every message is written here and names only things the
/// analyst already knows (their SQL, the catalogue, the scenario).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("{message}")]
    Refused { code: &'static str, message: String },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the privacy library refused the mechanism: {0}")]
    Mechanism(String),
}

impl GateError {
    pub(crate) fn refused(code: &'static str, message: impl Into<String>) -> Self {
        GateError::Refused {
            code,
            message: message.into(),
        }
    }

    /// The value a module receives.
    pub fn to_query_error(&self) -> QueryError {
        let (code, message) = match self {
            GateError::Refused { code, message } => (*code, message.clone()),
            GateError::Ledger(LedgerError::NoGrant(dataset)) => (
                "scenario_not_approved",
                format!(
                    "no approval grants this scenario the dataset {dataset:?}; nothing was released or spent"
                ),
            ),
            GateError::Ledger(LedgerError::Overspend { level, asked, left }) => (
                "budget_exceeded",
                format!(
                    "this query needs ε {asked:.6} but only {left:.6} is left at the {level} level; nothing was released or spent"
                ),
            ),
            GateError::Ledger(_) | GateError::Store(_) => (
                "internal",
                "the ledger could not record the debit; nothing was released".into(),
            ),
            GateError::Mechanism(_) => (
                "mechanism_refused",
                "the noise mechanism could not be built for these bounds and ε".into(),
            ),
        };
        QueryError {
            code: code.into(),
            message,
        }
    }
}

impl From<EngineError> for GateError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Refused(m) => GateError::refused("sql_refused", m),
            EngineError::Invalid(m) => GateError::refused("sql_invalid", m),
            EngineError::Execution => GateError::refused(
                "query_failed",
                "the query failed while running; its budget stays spent",
            ),
            EngineError::Setup(_) => {
                GateError::refused("internal", "the job's tables could not be opened")
            }
        }
    }
}

impl From<opendp::error::Error> for GateError {
    fn from(e: opendp::error::Error) -> Self {
        GateError::Mechanism(e.to_string())
    }
}

/// A release and the two ledger entries behind it.
#[derive(Debug, Clone)]
pub struct Released {
    pub release: Release,
    /// The `reserve` entry that charged it.
    pub reservation: u64,
    /// The `commit` entry written before it left the gate.
    pub commit: u64,
}

/// What one job may touch: its scenario, the datasets it names, and a session over them.
pub struct JobGrant {
    pub job_id: String,
    pub developer_id: String,
    pub scenario: Scenario,
    pub(crate) datasets: HashMap<String, DatasetPolicy>,
    session: JobSession,
}

#[derive(Clone)]
pub struct Gate {
    store: Store,
    ledger: Arc<Ledger>,
    data_dir: PathBuf,
    limits: Limits,
    tables: crate::engine::TableCache,
}

/// One noisy measurement's calibration, all from OpenDP.
struct Calibrated {
    measurement:
        Measurement<VectorDomain<AtomDomain<i64>>, L1Distance<i64>, MaxDivergence, Vec<i64>>,
    /// Laplace scale in fixed-point units.
    scale: f64,
    epsilon: f64,
}

impl Gate {
    pub fn new(store: Store, ledger: Arc<Ledger>, data_dir: PathBuf, limits: Limits) -> Self {
        Gate {
            tables: crate::engine::TableCache::new(limits.table_cache_bytes),
            store,
            ledger,
            data_dir,
            limits,
        }
    }

    /// Opens a job's view of the data: only the scenario's datasets, only its columns.
    /// `in_memory` loads the tables into memory first (see [`TableSpec::in_memory`]).
    pub async fn open_job(
        &self,
        job_id: &str,
        developer_id: &str,
        scenario: &Scenario,
        in_memory: bool,
    ) -> Result<JobGrant, GateError> {
        if scenario.status != Status::Approved || !crate::scenario::started(scenario) {
            return Err(GateError::refused(
                "scenario_not_approved",
                format!(
                    "the scenario is {}{}",
                    scenario.status_str(),
                    if scenario.status == Status::Approved {
                        " but its validity window has not begun"
                    } else {
                        ", not approved"
                    }
                ),
            ));
        }
        let mut datasets = HashMap::new();
        let mut specs = Vec::new();
        for (dataset_id, columns) in &scenario.application.columns {
            let policy = crate::catalog::policy(&self.store, dataset_id)?.ok_or_else(|| {
                GateError::refused(
                    "unknown_dataset",
                    format!("dataset {dataset_id:?} is no longer in the catalogue"),
                )
            })?;
            if policy.open_attribute == OpenAttribute::Closed {
                return Err(closed(dataset_id));
            }
            specs.push(TableSpec {
                table: policy.table.clone(),
                path: policy.data_path(&self.data_dir),
                columns: columns.clone(),
                in_memory,
            });
            datasets.insert(policy.table.clone(), policy);
        }
        let session =
            JobSession::new(&specs, self.limits.query_memory_bytes, Some(&self.tables)).await?;
        Ok(JobGrant {
            job_id: job_id.into(),
            developer_id: developer_id.into(),
            scenario: scenario.clone(),
            datasets,
            session,
        })
    }

    /// Answers one query with a DP release, or refuses it having released and spent nothing
    /// (except `query_failed`, where the debit was already durable and stays).
    ///
    /// # Privacy
    /// ε-DP with the row as the privacy unit, for ε = the sum of the measurements' losses
    /// from OpenDP's privacy maps, provided (a) each row falls in exactly one group, which holds
    /// because groups are `GROUP BY` keys; (b) every summed value is clamped and rounded to a
    /// fixed-point integer inside the bounds given to OpenDP's `make_sum`, which the plan built
    /// here does; (c) integer sums cannot overflow: fixed-point scales keep |value| · 2³² < 2⁶²
    /// and tables hold at most 2³² rows; (d) the released key set is the catalogue's public key
    /// set, independent of the data. Thresholding on noisy counts is post-processing.
    pub async fn release(
        &self,
        grant: &JobGrant,
        request: &QueryRequest,
    ) -> Result<Released, GateError> {
        if request.sql.len() > self.limits.max_sql_bytes {
            return Err(GateError::refused(
                "sql_too_long",
                format!("SQL is limited to {} bytes", self.limits.max_sql_bytes),
            ));
        }
        if !(request.epsilon.is_finite() && request.epsilon > 0.0) {
            return Err(GateError::refused(
                "invalid_epsilon",
                "epsilon must be a positive number",
            ));
        }
        for (column, [lo, hi]) in &request.bounds {
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                return Err(GateError::refused(
                    "invalid_bounds",
                    format!("bounds for {column:?} need finite lower <= upper"),
                ));
            }
        }
        // A scenario suspended while the job runs answers no further query (the ledger's
        // freezing grant enforces the same atomically; this gives the clearer refusal).
        let current = crate::scenario::get(&self.store, &grant.scenario.id)?;
        if !current
            .as_ref()
            .is_some_and(|s| s.status == Status::Approved && crate::scenario::started(s))
        {
            return Err(GateError::refused(
                "scenario_not_approved",
                "the scenario is no longer approved; nothing was released or spent",
            ));
        }
        let plan = grant.session.plan(&request.sql).await?;
        let shape = plan::analyse(&plan, grant, request)?;
        let policy = &grant.datasets[&shape.table];
        // The open attribute as it is now: an operator may have changed it mid-job.
        let exact = match crate::catalog::policy(&self.store, &policy.id)?.map(|p| p.open_attribute)
        {
            Some(OpenAttribute::Unconditional) => true,
            Some(OpenAttribute::Conditional) => false,
            Some(OpenAttribute::Closed) | None => return Err(closed(&policy.id)),
        };

        // Price every measurement before touching data.
        let per_measure = request.epsilon / shape.measures.len() as f64;
        let calibrated = if exact {
            Vec::new()
        } else {
            shape
                .measures
                .iter()
                .map(|m| calibrate(m, per_measure))
                .collect::<Result<Vec<_>, _>>()?
        };
        let epsilon: f64 = calibrated.iter().map(|c| c.epsilon).sum();

        let scenario = &grant.scenario;
        let reservation = self.ledger.reserve(&Reservation {
            job_id: &grant.job_id,
            scenario_id: &scenario.id,
            dataset_id: &policy.id,
            developer_id: &grant.developer_id,
            epsilon,
            mechanism: format!(
                "{}:{}",
                if exact { "exact" } else { "laplace" },
                shape
                    .measures
                    .iter()
                    .map(MeasureSpec::label)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            mode: "query",
        })?;

        // The reservation is durable: now, and only now, the data is read.
        match self
            .produce(grant, &shape, &calibrated, epsilon, reservation.body.seq)
            .await
        {
            Ok(release) => {
                // The commit is durable before the release leaves the gate.
                let commit = self.ledger.commit(&reservation, true, "released")?;
                Ok(Released {
                    release,
                    reservation: reservation.body.seq,
                    commit: commit.body.seq,
                })
            }
            Err(e) => {
                if let Err(le) =
                    self.ledger
                        .commit(&reservation, false, "the query failed while running")
                {
                    tracing::error!("could not close reservation {}: {le}", reservation.body.seq);
                }
                Err(e)
            }
        }
    }

    /// Computes the exact aggregate, adds noise and builds the release. Runs only after the
    /// reservation is durable.
    async fn produce(
        &self,
        grant: &JobGrant,
        shape: &QueryShape,
        calibrated: &[Calibrated],
        epsilon: f64,
        reservation: u64,
    ) -> Result<Release, GateError> {
        let policy = &grant.datasets[&shape.table];
        let scenario = &grant.scenario;
        let exact = grant.session.execute(shape.aggregate_plan()?).await?;
        let keys = shape.key_product();
        let index: HashMap<Vec<String>, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.iter().map(key_text).collect(), i))
            .collect();
        let mut exact_values = vec![vec![0i64; keys.len()]; shape.measures.len()];
        for batch in &exact.0 {
            let key_columns = (0..shape.groups.len())
                .map(|g| arrow::compute::cast(batch.column(g), &DataType::Utf8))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    GateError::refused(
                        "query_failed",
                        "the query failed while running; its budget stays spent",
                    )
                })?;
            let measure_columns = (0..shape.measures.len())
                .map(|m| {
                    arrow::compute::cast(batch.column(shape.groups.len() + m), &DataType::Int64)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    GateError::refused(
                        "query_failed",
                        "the query failed while running; its budget stays spent",
                    )
                })?;
            'rows: for row in 0..batch.num_rows() {
                let mut key = Vec::with_capacity(key_columns.len());
                for c in &key_columns {
                    if c.is_null(row) {
                        continue 'rows; // a null key is not a public key: dropped
                    }
                    key.push(c.as_string::<i32>().value(row).to_string());
                }
                // Groups outside the public key set are dropped, never released.
                if let Some(&slot) = index.get(&key) {
                    for (m, col) in measure_columns.iter().enumerate() {
                        let col = col.as_primitive::<Int64Type>();
                        exact_values[m][slot] = if col.is_null(row) { 0 } else { col.value(row) };
                    }
                }
            }
        }
        drop(exact);

        // Unconditional data (no calibrations): released as computed.
        let exact = calibrated.is_empty();
        let noisy: Vec<Vec<i64>> = if exact {
            exact_values
        } else {
            calibrated
                .iter()
                .zip(exact_values)
                .map(|(c, v)| c.measurement.invoke(&v))
                .collect::<Result<_, _>>()?
        };

        let min_group = if exact {
            0.0
        } else {
            scenario
                .min_group_size
                .unwrap_or(0)
                .max(policy.min_group_size) as f64
        };
        let counts = &noisy[0]; // measure 0 is always the row count
        let mut suppressed = 0u64;
        let rows = keys
            .iter()
            .enumerate()
            .map(|(g, key)| {
                let hide = (counts[g] as f64) < min_group;
                suppressed += hide as u64;
                shape
                    .outputs
                    .iter()
                    .map(|o| match o {
                        OutputSpec::Key { group, .. } => key_value(&key[*group]),
                        _ if hide => Value::Null,
                        OutputSpec::Measure { measure, kind, .. } => {
                            let spec = &shape.measures[*measure];
                            let v = noisy[*measure][g] as f64 / spec.fixed_point();
                            match kind {
                                ColumnKind::Mean => {
                                    let n = (counts[g] as f64).max(1.0);
                                    let (lo, hi) = spec.bounds();
                                    Value::Float((spec.shift() + v / n).clamp(lo, hi))
                                }
                                ColumnKind::Count => Value::Int(noisy[*measure][g]),
                                _ => Value::Float(v),
                            }
                        }
                    })
                    .collect()
            })
            .collect();

        let columns = shape
            .outputs
            .iter()
            .map(|o| match o {
                OutputSpec::Key { name, .. } => ReleasedColumn {
                    name: name.clone(),
                    kind: ColumnKind::Key,
                    noise_scale: None,
                    ci95_half_width: None,
                },
                OutputSpec::Measure {
                    name,
                    measure,
                    kind,
                } => {
                    let scale = calibrated
                        .get(*measure)
                        .map_or(0.0, |c| c.scale / shape.measures[*measure].fixed_point());
                    ReleasedColumn {
                        name: name.clone(),
                        kind: *kind,
                        noise_scale: Some(scale),
                        // P(|Laplace(b)| > t) = exp(-t/b): 95 % at t = b·ln 20.
                        ci95_half_width: Some(scale * 20f64.ln()),
                    }
                }
            })
            .collect();

        Ok(Release {
            columns,
            rows,
            epsilon,
            ledger_entry: reservation,
            suppressed_groups: suppressed,
        })
    }
}

fn closed(dataset: &str) -> GateError {
    GateError::refused(
        "dataset_closed",
        format!("dataset {dataset:?} is closed (不予开放); nothing was released or spent"),
    )
}

fn key_text(k: &KeyValue) -> String {
    match k {
        KeyValue::Int(i) => i.to_string(),
        KeyValue::Text(s) => s.clone(),
    }
}

fn key_value(k: &KeyValue) -> Value {
    match k {
        KeyValue::Int(i) => Value::Int(*i),
        KeyValue::Text(s) => Value::Text(s.clone()),
    }
}

/// Sensitivity from OpenDP's stability map for the sum or count we run, then the Laplace
/// scale that spends at most `epsilon` by OpenDP's privacy map.
fn calibrate(spec: &MeasureSpec, epsilon: f64) -> Result<Calibrated, GateError> {
    let d_in: i64 = match spec {
        MeasureSpec::Rows | MeasureSpec::NonNull { .. } => {
            let t: Transformation<_, SymmetricDistance, AtomDomain<i64>, AbsoluteDistance<i64>> =
                opendp::transformations::make_count::<i64, i64>(
                    VectorDomain::new(AtomDomain::default()),
                    SymmetricDistance,
                )?;
            t.map(&1)?
        }
        MeasureSpec::ClampedSum { .. } => {
            let (lo, hi) = spec.fixed_point_bounds();
            let t = opendp::transformations::make_sum::<SymmetricDistance, i64>(
                VectorDomain::new(AtomDomain::new_closed((lo, hi))?),
                SymmetricDistance,
            )?;
            t.map(&1)?
        }
    };
    let mut scale = (d_in as f64 / epsilon).max(f64::MIN_POSITIVE);
    for _ in 0..16 {
        let m = make_laplace(
            VectorDomain::new(AtomDomain::<i64>::default()),
            L1Distance::<i64>::default(),
            scale,
            None,
        )?;
        let spent = m.map(&d_in)?;
        if spent <= epsilon {
            return Ok(Calibrated {
                measurement: m,
                scale,
                epsilon: spent,
            });
        }
        scale *= 1.0 + 1e-9;
    }
    Err(GateError::Mechanism(
        "could not fit the noise scale under the requested ε".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::lit;

    #[test]
    fn counts_get_scale_one_over_epsilon_from_opendp() {
        let c = calibrate(&MeasureSpec::Rows, 0.5).unwrap();
        assert!((c.scale - 2.0).abs() < 1e-6, "{}", c.scale);
        assert!(c.epsilon <= 0.5 && c.epsilon > 0.4999, "{}", c.epsilon);
    }

    #[test]
    fn sums_take_their_sensitivity_from_the_clamping_bounds() {
        let fp = 2f64.powi(23);
        let spec = MeasureSpec::ClampedSum {
            expr: lit(0.0),
            column: "fare".into(),
            lo: 0.0,
            hi: 100.0,
            shift: 0.0,
            fixed_point: fp,
        };
        let c = calibrate(&spec, 0.5).unwrap();
        // 100 per row, in fixed-point units, over ε = 0.5.
        assert!((c.scale / fp - 200.0).abs() < 1e-3, "{}", c.scale / fp);
        assert!(c.epsilon <= 0.5);
        // The noise is real: two draws over the same data differ (P(equal) ≈ 1/(2·scale)).
        let a = c.measurement.invoke(&vec![0i64; 8]).unwrap();
        let b = c.measurement.invoke(&vec![0i64; 8]).unwrap();
        assert_ne!(a, b);
    }
}
