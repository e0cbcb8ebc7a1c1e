//! The egress gate: the only code that turns data into something a module may see.
//!
//! For each query a module asks: check the SQL's shape against the scenario (one table or an
//! inner join of tables on their privacy units, an aggregate on top, group keys that are public
//! in the catalogue, `COUNT`/`SUM`/`AVG` over clamped columns, filters that cannot fail on
//! data); price it with OpenDP's stability and
//! privacy maps; debit the ledger durably; only then compute exact aggregates with DataFusion,
//! add OpenDP noise, suppress groups under the minimum size, and build the [`Release`].
//!
//! Privacy unit: the row, or a person column named in the catalogue. For a person unit the gate
//! first keeps at most *k* random rows of each person (`bound.rs`), and every stability map is
//! asked for a change of *k* rows.
//!
//! Open attributes: `closed` datasets answer nothing; `conditional` ones answer only as above;
//! `unconditional` (openly publishable) ones answer the same query shapes exactly, without
//! noise or minimum group size, at ε = 0 — still recorded in the ledger as a use.

mod blocks;
mod bound;
mod dense;
mod fixed_point;
mod noise;
mod plan;
mod quantile;

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use unseen_guest::contract::{
    ColumnKind, QueryError, QueryRequest, Release, ReleasedColumn, Value,
};

use crate::catalog::{DatasetPolicy, KeyValue, OpenAttribute};
use crate::config::Limits;
use crate::engine::{EngineError, JobSession, Resources, TableSpec};
use crate::ledger::{Entry, Ledger, LedgerError, Reservation};
use crate::sandbox::functions::GuestFunctions;
use crate::scenario::{Scenario, Status};
use crate::store::{Cached, Store, StoreError};

use noise::{Budget, Calibrated, Threshold, calibrate, calibrate_threshold};
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
            GateError::Ledger(LedgerError::DeltaOverspend { level, asked, left }) => (
                "budget_exceeded",
                format!(
                    "this query needs δ {asked:e} but only {left:e} is left at the {level} level; nothing was released or spent"
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

/// A release and the ledger entries behind it.
#[derive(Debug, Clone)]
pub struct Released {
    pub release: Release,
    /// Per dataset charged (one, or each of a join's): the `reserve` entry that charged it and
    /// the `commit` entry written before the release left the gate. The first reservation is
    /// the release's `ledger_entry`.
    pub entries: Vec<(u64, u64)>,
}

/// What one job may touch: its scenario, the datasets it names, and a session over them.
pub struct JobGrant {
    pub job_id: String,
    pub developer_id: String,
    pub scenario: Scenario,
    pub(crate) datasets: HashMap<String, DatasetPolicy>,
    session: JobSession,
    /// The job module's UDFs (registered in `session`) and block functions.
    pub(crate) guest: Option<Arc<GuestFunctions>>,
}

/// The spill directory's name under the data directory.
const SPILL_DIR: &str = "spill";

#[derive(Clone)]
pub struct Gate {
    store: Store,
    ledger: Arc<Ledger>,
    data_dir: PathBuf,
    limits: Limits,
    tables: crate::engine::TableCache,
    /// Where jobs spill, with the disk managers of finished jobs (`None`: they do not).
    spill: Option<crate::engine::Spill>,
    /// Answer a repeated query with its earlier release (see [`Gate::cached`]).
    reuse: bool,
}

impl Gate {
    pub fn new(store: Store, ledger: Arc<Ledger>, data_dir: PathBuf, limits: Limits) -> Self {
        // Where queries spill sorts and aggregations that outgrow their memory: inside the data
        // directory, so inside the domain. Spill files of an earlier process are of jobs long
        // over: start empty. A directory that cannot be made leaves spilling to fail, and with
        // it only the queries that spill.
        let spill = data_dir.join(SPILL_DIR);
        let _ = std::fs::remove_dir_all(&spill);
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&spill);
        Gate {
            spill: (limits.spill_bytes > 0)
                .then(|| crate::engine::Spill::new(spill, limits.spill_bytes)),
            tables: crate::engine::TableCache::new(limits.table_cache_bytes),
            reuse: limits.reuse_releases,
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
        guest: Option<Arc<GuestFunctions>>,
    ) -> Result<JobGrant, GateError> {
        self.open(
            job_id,
            developer_id,
            scenario,
            in_memory,
            Some(&self.tables),
            guest,
        )
        .await
    }

    /// A job's view for dry runs: the tables' schemas from the files' footers, no rows decoded
    /// (and none put in the shared table cache).
    pub async fn open_for_estimates(
        &self,
        job_id: &str,
        developer_id: &str,
        scenario: &Scenario,
        guest: Option<Arc<GuestFunctions>>,
    ) -> Result<JobGrant, GateError> {
        self.open(job_id, developer_id, scenario, false, None, guest)
            .await
    }

    async fn open(
        &self,
        job_id: &str,
        developer_id: &str,
        scenario: &Scenario,
        in_memory: bool,
        cache: Option<&crate::engine::TableCache>,
        guest: Option<Arc<GuestFunctions>>,
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
            // The gate needs the person column to bound contributions, whether or not the
            // scenario lets the guest name it (filtering on it would be harmless).
            let mut columns = columns.clone();
            if policy.privacy_unit != "row" && !columns.contains(&policy.privacy_unit) {
                columns.push(policy.privacy_unit.clone());
            }
            specs.push(TableSpec {
                table: policy.table.clone(),
                path: policy.data_path(&self.data_dir),
                columns,
                in_memory,
            });
            datasets.insert(policy.table.clone(), policy);
        }
        let bounds_persons = datasets.values().any(|p| p.privacy_unit != "row");
        let resources = Resources {
            memory_bytes: self.limits.query_memory_bytes,
            spill: self.spill.clone(),
            batch_rows: if bounds_persons {
                crate::engine::PERSON_BATCH_ROWS
            } else {
                crate::engine::BATCH_ROWS
            },
        };
        let session = JobSession::new(&specs, &resources, cache).await?;
        if let Some(guest) = &guest {
            for udf in guest.scalar_udfs() {
                session.register_udf(udf);
            }
        }
        Ok(JobGrant {
            job_id: job_id.into(),
            developer_id: developer_id.into(),
            scenario: scenario.clone(),
            datasets,
            session,
            guest,
        })
    }

    /// Answers one query with a DP release, or refuses it having released and spent nothing
    /// (except `query_failed`, where the debit was already durable and stays).
    ///
    /// The debit is durable before any data is read. The entries that close it are committed
    /// without `fsync` ([`Ledger::commit_released`]): the caller must commit with `fsync`
    /// before anything derived from the release leaves the domain, as a job's outcome does.
    ///
    /// # Privacy
    /// ε-DP with the dataset's privacy unit, for ε = the sum of the measurements' losses
    /// from OpenDP's privacy maps at `d_in` = the rows one unit can change (1, or the bound *k*
    /// that the plan enforces per person before aggregating), provided (a) each row falls in
    /// exactly one group, which holds
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
        let Prepared {
            work,
            charges,
            mechanism,
            mode,
            epsilon,
            ..
        } = self.prepare(grant, request).await?;
        // Asked and paid for before in this scenario, over the same version of the data: the
        // same release again, for nothing (re-showing a release is post-processing).
        let cache_key = if self.reuse {
            let key = self.cache_key(grant, &charges, request)?;
            if let Some(reused) = self.cached(&grant.scenario.id, &key)? {
                return Ok(reused);
            }
            Some(key)
        } else {
            None
        };
        let scenario = &grant.scenario;
        // One debit per dataset read (a join's are written together, or none is).
        let reservations = self.ledger.reserve_all(
            &charges
                .iter()
                .map(|c| Reservation {
                    job_id: &grant.job_id,
                    scenario_id: &scenario.id,
                    dataset_id: &c.dataset_id,
                    developer_id: &grant.developer_id,
                    epsilon: c.epsilon,
                    delta: c.delta,
                    mechanism: mechanism.clone(),
                    mode,
                })
                .collect::<Vec<_>>(),
        )?;
        let first = reservations
            .first()
            .map(|r| r.body.seq)
            .ok_or_else(|| GateError::refused("internal", "the query charged no dataset"))?;

        // The reservations are durable: now, and only now, the data is read.
        let produced = match &work {
            Work::Aggregate { shape, pricing } => self.produce(grant, shape, pricing, first).await,
            Work::Blocks(blocks) => blocks.produce(grant, epsilon, first).await,
        };
        match produced {
            Ok(release) => {
                let pairs = |commits: &[Entry]| -> Vec<(u64, u64)> {
                    reservations
                        .iter()
                        .zip(commits)
                        .map(|(r, c)| (r.body.seq, c.body.seq))
                        .collect()
                };
                // Kept for reuse in the commits' own transaction: durable, or lost, with them.
                let kept = cache_key
                    .as_ref()
                    .map(|key| (key, serde_json::to_string(&release)));
                // Durable, with the job's outcome, before anything of the release leaves the
                // domain (see `commit_released`).
                let commits = self.ledger.commit_released(&reservations, |tx, commits| {
                    if let Some((key, text)) = &kept {
                        remember(tx, &scenario.id, key, text, &pairs(commits));
                    }
                })?;
                Ok(Released {
                    entries: pairs(&commits),
                    release,
                })
            }
            Err(e) => {
                if let Err(le) =
                    self.ledger
                        .commit_all(&reservations, false, "the query failed while running")
                {
                    tracing::error!("could not close reservation {first}: {le}");
                }
                Err(e)
            }
        }
    }

    /// What makes two queries "the same": every option of the request (not `dry_run`) and each
    /// data file's length and modification time, hashed.
    fn cache_key(
        &self,
        grant: &JobGrant,
        charges: &[Charge],
        request: &QueryRequest,
    ) -> Result<String, GateError> {
        let mut versions = Vec::new();
        for charge in charges {
            let policy = grant
                .datasets
                .values()
                .find(|p| p.id == charge.dataset_id)
                .ok_or_else(|| GateError::refused("internal", "the dataset left the job"))?;
            let meta = std::fs::metadata(policy.data_path(&self.data_dir)).ok();
            versions.push(meta.map(|m| {
                let modified = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                format!("{}:{modified}", m.len())
            }));
        }
        let request = QueryRequest {
            dry_run: false,
            ..request.clone()
        };
        // One dataset keeps the key it always had, so releases kept before joins still match.
        let datasets: Vec<&str> = charges.iter().map(|c| c.dataset_id.as_str()).collect();
        let (dataset, version) = match (datasets.as_slice(), versions.as_slice()) {
            ([one], [v]) => (serde_json::json!(one), serde_json::json!(v)),
            _ => (serde_json::json!(datasets), serde_json::json!(versions)),
        };
        let text = serde_json::json!({
            "request": request,
            "dataset": dataset,
            "version": version,
            // A UDF or block function of another module is other code.
            "module": grant.guest.as_ref().map(|g| (&g.hash, g.mode.as_str())),
        })
        .to_string();
        Ok(hex::encode(
            ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref(),
        ))
    }

    fn cached(&self, scenario_id: &str, key: &str) -> Result<Option<Released>, GateError> {
        use rusqlite::OptionalExtension;
        let row: Option<(String, i64, i64, Option<String>)> = self
            .store
            .read()
            .query_row_cached(
                "SELECT c.release, c.reservation, c.commit_seq, j.entries FROM release_cache c
                 LEFT JOIN release_cache_joint j ON j.scenario_id = c.scenario_id AND j.request_key = c.request_key
                 WHERE c.scenario_id = ?1 AND c.request_key = ?2",
                rusqlite::params![scenario_id, key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(StoreError::from)?;
        Ok(row.and_then(|(text, reservation, commit, joint)| {
            let release: Release = serde_json::from_str(&text).ok()?;
            let mut entries = vec![(reservation as u64, commit as u64)];
            if let Some(joint) = joint {
                entries.extend(serde_json::from_str::<Vec<(u64, u64)>>(&joint).ok()?);
            }
            Some(Released {
                release: Release {
                    reused: true,
                    ..release
                },
                entries,
            })
        }))
    }

    /// Answers what `request` would cost and how noisy each column would be, from the SQL, the
    /// catalogue and OpenDP's maps alone: no data is read and nothing is spent. Refuses exactly
    /// what [`Gate::release`] would refuse before reading data.
    pub async fn estimate(
        &self,
        grant: &JobGrant,
        request: &QueryRequest,
    ) -> Result<Release, GateError> {
        let Prepared {
            work,
            epsilon,
            delta,
            ..
        } = self.prepare(grant, request).await?;
        Ok(Release {
            columns: match &work {
                Work::Aggregate { shape, pricing } => describe_columns(shape, pricing),
                Work::Blocks(blocks) => blocks.columns(),
            },
            rows: Vec::new(),
            epsilon,
            ledger_entry: 0,
            suppressed_groups: 0,
            delta,
            rho: match &work {
                Work::Aggregate { pricing, .. } => pricing.rho,
                Work::Blocks(_) => None,
            },
            dry_run: true,
            reused: false,
        })
    }

    /// Checks and prices a query: everything before the ledger and the data.
    async fn prepare(
        &self,
        grant: &JobGrant,
        request: &QueryRequest,
    ) -> Result<Prepared, GateError> {
        if request.sql.len() > self.limits.max_sql_bytes {
            return Err(GateError::refused(
                "sql_too_long",
                format!("SQL is limited to {} bytes", self.limits.max_sql_bytes),
            ));
        }
        let budget = budget(request)?;
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
        if let Some(sa) = &request.sample_aggregate {
            return blocks::prepare(grant, &plan, request, sa, &self.limits);
        }
        let shape = plan::analyse(&plan, grant, request)?;
        let policies: Vec<&DatasetPolicy> =
            shape.tables.iter().map(|t| &grant.datasets[t]).collect();
        // The open attributes as they are now: an operator may have changed one mid-job. Only
        // unconditional data is answered exactly; joined with conditional data it is charged
        // nothing, but the release is noised for the other's sake.
        let mut unconditional = Vec::with_capacity(policies.len());
        for policy in &policies {
            unconditional.push(
                match crate::catalog::policy(&self.store, &policy.id)?.map(|p| p.open_attribute) {
                    Some(OpenAttribute::Unconditional) => true,
                    Some(OpenAttribute::Conditional) => false,
                    Some(OpenAttribute::Closed) | None => return Err(closed(&policy.id)),
                },
            );
        }
        let exact = unconditional.iter().all(|u| *u);
        let min_group = grant
            .scenario
            .min_group_size
            .unwrap_or(0)
            .max(policies.iter().map(|p| p.min_group_size).max().unwrap_or(0));

        // Price every measurement before touching data.
        let per_measure = budget.with_amount(budget.amount() / shape.measures.len() as f64);
        let private = shape.private_keys() && !exact;
        let threshold = if private {
            let delta = request.delta.ok_or_else(|| {
                GateError::refused(
                    "key_not_public",
                    "the groups' keys are not public: give \"delta\" (e.g. 1e-6) to choose them by DP partition selection",
                )
            })?;
            let delta = valid_delta(delta)?;
            // Under ρ the threshold takes half of δ; converting ρ to ε takes the rest.
            let threshold_delta = match budget {
                Budget::Pure { .. } => delta,
                Budget::Concentrated { .. } => delta / 2.0,
            };
            Some(calibrate_threshold(
                per_measure,
                threshold_delta,
                shape.rows_per_unit(),
                shape.groups_per_unit(),
                min_group,
            )?)
        } else {
            None
        };
        let (calibrated, quantiles) = if exact {
            (Vec::new(), Vec::new())
        } else {
            let mut calibrated = Vec::new();
            let mut quantiles = Vec::new();
            for (i, m) in shape.measures.iter().enumerate() {
                match m {
                    // With private keys the row count is released by the threshold mechanism.
                    _ if i == 0 && private => {
                        calibrated.push(None);
                        quantiles.push(None);
                    }
                    MeasureSpec::Quantile { lo, hi, q, .. } => {
                        calibrated.push(None);
                        quantiles.push(Some(quantile::calibrate(
                            *lo,
                            *hi,
                            *q,
                            per_measure,
                            shape.rows_per_unit(),
                        )?));
                    }
                    _ => {
                        calibrated.push(Some(calibrate(m, per_measure, shape.rows_per_unit())?));
                        quantiles.push(None);
                    }
                }
            }
            (calibrated, quantiles)
        };
        // What the measurements spend in the budget's measure: ε, or ρ (both add up).
        let loss: f64 = calibrated.iter().flatten().map(|c| c.loss).sum::<f64>()
            + quantiles.iter().flatten().map(|q| q.loss).sum::<f64>()
            + threshold.as_ref().map_or(0.0, |t| t.loss);
        // As the ledger will record them (δ a short decimal, never below the mechanism's).
        let (epsilon, delta, rho) = match budget {
            _ if exact => (0.0, 0.0, None),
            Budget::Pure { .. } => (
                loss,
                threshold
                    .as_ref()
                    .map_or(0.0, |t| crate::ledger::short_decimal_at_least(t.delta)),
                None,
            ),
            Budget::Concentrated { delta, .. } => (
                noise::epsilon_of_rho(loss, threshold.as_ref().map_or(0.0, |t| t.delta), delta)?,
                crate::ledger::short_decimal_at_least(delta),
                Some(loss),
            ),
        };

        let mechanism = format!(
            "{}:{}{}",
            match budget {
                _ if exact => "exact",
                Budget::Pure { .. } if private => "laplace-threshold",
                Budget::Pure { .. } => "laplace",
                Budget::Concentrated { .. } if private => "gaussian-threshold",
                Budget::Concentrated { .. } => "gaussian",
            },
            shape
                .measures
                .iter()
                .map(MeasureSpec::label)
                .collect::<Vec<_>>()
                .join(","),
            shape.unit.as_ref().map_or(String::new(), |u| format!(
                ";≤{} rows{} per {}",
                u.max_rows,
                u.groups
                    .as_ref()
                    .map_or(String::new(), |g| format!(" in ≤{} groups", g.max_groups)),
                u.column
            )) + &threshold.as_ref().map_or(String::new(), |t| format!(
                ";keys by noisy count ≥ {}",
                t.threshold
            )) + &rho.map_or(String::new(), |r| format!(";ρ={r} as (ε, δ)"))
                + &if policies.len() > 1 {
                    format!(
                        ";join of {}",
                        policies
                            .iter()
                            .map(|p| p.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    String::new()
                }
        );
        let charges = policies
            .iter()
            .zip(&unconditional)
            .map(|(p, free)| Charge {
                dataset_id: p.id.clone(),
                epsilon: if *free { 0.0 } else { epsilon },
                delta: if *free { 0.0 } else { delta },
            })
            .collect();
        Ok(Prepared {
            charges,
            mechanism,
            mode: shape.mode,
            epsilon,
            delta,
            work: Work::Aggregate {
                pricing: Pricing {
                    exact,
                    budget,
                    calibrated,
                    quantiles,
                    threshold,
                    epsilon,
                    delta,
                    rho,
                    min_group,
                },
                shape,
            },
        })
    }

    /// Computes the exact aggregate, adds noise and builds the release. Runs only after the
    /// reservation is durable.
    async fn produce(
        &self,
        grant: &JobGrant,
        shape: &QueryShape,
        pricing: &Pricing,
        reservation: u64,
    ) -> Result<Release, GateError> {
        // Person-level data: pass 1 counts each person's rows, pass 2 (inside the aggregate
        // plan) keeps a random k of them.
        let selection = match &shape.unit {
            Some(unit) => Some(bound::select(&grant.session, shape.unit_source()?, unit).await?),
            None => None,
        };
        // Public keys: one slot per key combination instead of a `GROUP BY` (`dense.rs`).
        let public = !shape.private_keys();
        let dense = match public {
            true => shape.dense_plan(selection.as_ref(), grant.session.position_memos())?,
            false => None,
        };
        let is_dense = dense.is_some();
        let plan = match dense {
            Some(plan) => plan,
            None => shape.aggregate_plan(selection.as_ref())?,
        };
        let exact = grant.session.execute(plan).await?;
        let failed = || {
            GateError::refused(
                "query_failed",
                "the query failed while running; its budget stays spent",
            )
        };

        // The groups to release, each with its exact measures. Public keys: every combination,
        // in catalogue order, empty groups included, and nothing else. Private keys: the groups
        // the data has, which partition selection below thins out.
        let mut keys: Vec<Vec<Value>> = shape
            .key_product()
            .iter()
            .map(|k| k.iter().map(key_value).collect())
            .collect();
        let mut index: HashMap<Vec<String>, usize> = shape
            .key_product()
            .iter()
            .enumerate()
            .map(|(i, k)| (k.iter().map(key_text).collect(), i))
            .collect();
        let mut exact_values = vec![vec![0i64; keys.len()]; shape.measures.len()];
        let is_quantile: Vec<bool> = shape
            .measures
            .iter()
            .map(|m| matches!(m, MeasureSpec::Quantile { .. }))
            .collect();
        // Each quantile measure's values per group (empty for the other measures).
        let mut exact_lists: Vec<Vec<Vec<f64>>> = is_quantile
            .iter()
            .map(|q| {
                if *q {
                    vec![Vec::new(); keys.len()]
                } else {
                    Vec::new()
                }
            })
            .collect();
        if is_dense {
            exact_values = dense::read(&exact.0, keys.len())
                .filter(|m| m.len() == shape.measures.len())
                .ok_or_else(failed)?;
        } else {
            for batch in &exact.0 {
                let key_text_columns = (0..shape.groups.len())
                    .map(|g| arrow::compute::cast(batch.column(g), &DataType::Utf8))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| failed())?;
                let measure_columns = (0..shape.measures.len())
                    .map(|m| {
                        let column = batch.column(shape.groups.len() + m);
                        if is_quantile[m] {
                            Ok(column.clone())
                        } else {
                            arrow::compute::cast(column, &DataType::Int64)
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| failed())?;
                'rows: for row in 0..batch.num_rows() {
                    let mut key = Vec::with_capacity(key_text_columns.len());
                    for c in &key_text_columns {
                        if c.is_null(row) {
                            continue 'rows; // a null key is not a key: dropped
                        }
                        key.push(c.as_string::<i32>().value(row).to_string());
                    }
                    let slot = match index.get(&key) {
                        Some(&slot) => slot,
                        // Groups outside the public key set are dropped, never released.
                        None if public => continue,
                        None => {
                            let typed = (0..shape.groups.len())
                                .map(|g| typed_key(batch.column(g), &key[g]))
                                .collect();
                            keys.push(typed);
                            for m in &mut exact_values {
                                m.push(0);
                            }
                            for (m, lists) in exact_lists.iter_mut().enumerate() {
                                if is_quantile[m] {
                                    lists.push(Vec::new());
                                }
                            }
                            index.insert(key, keys.len() - 1);
                            keys.len() - 1
                        }
                    };
                    for (m, col) in measure_columns.iter().enumerate() {
                        if is_quantile[m] {
                            let list = col.as_list_opt::<i32>().ok_or_else(failed)?;
                            if !list.is_null(row) {
                                let values = list.value(row);
                                let values = values
                                    .as_primitive_opt::<Float64Type>()
                                    .ok_or_else(failed)?;
                                exact_lists[m][slot].extend(values.iter().flatten());
                            }
                            continue;
                        }
                        let col = col.as_primitive::<Int64Type>();
                        exact_values[m][slot] = if col.is_null(row) { 0 } else { col.value(row) };
                    }
                }
            }
        }
        drop(exact);

        // Which group slot each released row is, in release order.
        let released_slots: Vec<usize>;
        let (keys, noisy): (Vec<Vec<Value>>, Vec<Vec<i64>>) = if pricing.exact {
            // Unconditional data: released as computed.
            released_slots = (0..keys.len()).collect();
            (keys, exact_values)
        } else if let Some(threshold) = &pricing.threshold {
            // Partition selection: noisy unit counts, and only the groups whose noisy count
            // clears the threshold (which is at least the minimum group size).
            let by_text: Vec<String> = index_order(index, keys.len());
            let counts: HashMap<String, i64> = by_text
                .iter()
                .cloned()
                .zip(exact_values[0].iter().copied())
                .collect();
            let mut chosen = threshold.draw(counts)?;
            // Each group's noisy count if it was chosen (one lookup a group), in key order.
            let mut picked: Vec<(usize, i64)> = (0..keys.len())
                .filter_map(|g| chosen.remove(&by_text[g]).map(|n| (g, n)))
                .collect();
            picked.sort_unstable_by(|a, b| by_text[a.0].cmp(&by_text[b.0]));
            let slots: Vec<usize> = picked.iter().map(|(g, _)| *g).collect();
            let mut noisy = vec![picked.iter().map(|(_, n)| *n).collect()];
            for (m, c) in pricing.calibrated.iter().enumerate().skip(1) {
                if is_quantile[m] {
                    noisy.push(vec![0; slots.len()]); // released from `quantiles` below
                    continue;
                }
                let c = c.as_ref().ok_or_else(failed)?;
                let values: Vec<i64> = slots.iter().map(|g| exact_values[m][*g]).collect();
                noisy.push(c.draw(&values)?);
            }
            let keys = slots.iter().map(|g| keys[*g].clone()).collect();
            released_slots = slots;
            (keys, noisy)
        } else {
            released_slots = (0..keys.len()).collect();
            let noisy = pricing
                .calibrated
                .iter()
                .zip(exact_values)
                .enumerate()
                .map(|(m, (c, v))| {
                    if is_quantile[m] {
                        return Ok(vec![0; v.len()]); // released from `quantiles` below
                    }
                    c.as_ref().ok_or_else(failed).and_then(|c| c.draw(&v))
                })
                .collect::<Result<_, GateError>>()?;
            (keys, noisy)
        };
        // Quantiles per released group: OpenDP's private quantile over the group's values, or
        // the exact one for unconditional data.
        let quantiles: Vec<Vec<Option<f64>>> = shape
            .measures
            .iter()
            .enumerate()
            .map(|(m, spec)| {
                let MeasureSpec::Quantile { lo, hi, q, .. } = spec else {
                    return Ok(Vec::new());
                };
                released_slots
                    .iter()
                    .map(|g| {
                        let values = &exact_lists[m][*g];
                        if pricing.exact {
                            return Ok(quantile::exact(values, *lo, *hi, *q));
                        }
                        let mechanism = pricing
                            .quantiles
                            .get(m)
                            .and_then(Option::as_ref)
                            .ok_or_else(failed)?;
                        mechanism.draw(values).map(Some)
                    })
                    .collect::<Result<Vec<_>, GateError>>()
            })
            .collect::<Result<_, GateError>>()?;
        drop(exact_lists);

        let min_group = if pricing.exact || pricing.threshold.is_some() {
            0.0
        } else {
            pricing.min_group as f64
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
                        OutputSpec::Key { group, .. } => key[*group].clone(),
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
                                ColumnKind::Quantile => {
                                    quantiles[*measure][g].map_or(Value::Null, Value::Float)
                                }
                                _ => Value::Float(v),
                            }
                        }
                        OutputSpec::Spread {
                            sum, squares, kind, ..
                        } => {
                            // Var = E[d²] − E[d]² for d = x − midpoint, from the noisy count,
                            // sum and sum of squares; clamped to what bounded data allows.
                            let n = (counts[g] as f64).max(1.0);
                            let s = &shape.measures[*sum];
                            let q = &shape.measures[*squares];
                            let mean = noisy[*sum][g] as f64 / s.fixed_point() / n;
                            let mean_square = noisy[*squares][g] as f64 / q.fixed_point() / n;
                            let (lo, hi) = s.bounds();
                            let most = ((hi - lo) / 2.0).powi(2);
                            let variance = (mean_square - mean * mean).clamp(0.0, most);
                            Value::Float(if *kind == ColumnKind::StdDev {
                                variance.sqrt()
                            } else {
                                variance
                            })
                        }
                    })
                    .collect()
            })
            .collect();

        let columns = describe_columns(shape, pricing);

        Ok(Release {
            columns,
            rows,
            epsilon: pricing.epsilon,
            ledger_entry: reservation,
            suppressed_groups: suppressed,
            delta: pricing.delta,
            rho: pricing.rho,
            dry_run: false,
            reused: false,
        })
    }
}

/// The released columns and the noise each carries (the same for a release and its estimate).
fn describe_columns(shape: &QueryShape, pricing: &Pricing) -> Vec<ReleasedColumn> {
    shape
        .outputs
        .iter()
        .map(|o| match o {
            OutputSpec::Key { name, .. } => ReleasedColumn {
                name: name.clone(),
                kind: ColumnKind::Key,
                noise_scale: None,
                ci95_half_width: None,
            },
            OutputSpec::Spread {
                name,
                squares,
                kind,
                ..
            } => {
                // The noise on the sum of squared deviations, in squared units (divide by the
                // group's count for its share in the variance).
                let scale = match pricing.calibrated.get(*squares) {
                    Some(Some(c)) => c.scale / shape.measures[*squares].fixed_point(),
                    _ => 0.0,
                };
                ReleasedColumn {
                    name: name.clone(),
                    kind: *kind,
                    noise_scale: Some(scale),
                    ci95_half_width: Some(noise::ci95(pricing.budget, scale)),
                }
            }
            OutputSpec::Measure {
                name,
                measure,
                kind: ColumnKind::Quantile,
            } => ReleasedColumn {
                name: name.clone(),
                kind: ColumnKind::Quantile,
                // In ranks (rows of the group), not in the column's units: how far from
                // splitting the group at q the released value may be.
                noise_scale: pricing
                    .quantiles
                    .get(*measure)
                    .and_then(|q| q.as_ref().map(|q| q.scale))
                    .or(Some(0.0)),
                ci95_half_width: None,
            },
            OutputSpec::Measure {
                name,
                measure,
                kind,
            } => {
                let scale = match (pricing.calibrated.get(*measure), &pricing.threshold) {
                    (Some(Some(c)), _) => c.scale / shape.measures[*measure].fixed_point(),
                    // The threshold mechanism's noise, of the budget's kind too.
                    (Some(None), Some(t)) => t.scale,
                    _ => 0.0,
                };
                ReleasedColumn {
                    name: name.clone(),
                    kind: *kind,
                    noise_scale: Some(scale),
                    ci95_half_width: Some(noise::ci95(pricing.budget, scale)),
                }
            }
        })
        .collect()
}

/// A query's δ, if it is one the gate accepts.
fn valid_delta(delta: f64) -> Result<f64, GateError> {
    if delta.is_finite() && delta > 0.0 && delta <= crate::scenario::MAX_DELTA {
        Ok(delta)
    } else {
        Err(GateError::refused(
            "invalid_delta",
            format!(
                "delta must be above 0 and at most {:e}",
                crate::scenario::MAX_DELTA
            ),
        ))
    }
}

/// The request's budget: ε, or ρ with the δ to convert it at.
fn budget(request: &QueryRequest) -> Result<Budget, GateError> {
    let invalid = |code: &'static str, message: String| Err(GateError::refused(code, message));
    match request.rho {
        None if request.epsilon.is_finite() && request.epsilon > 0.0 => Ok(Budget::Pure {
            epsilon: request.epsilon,
        }),
        None => invalid(
            "invalid_epsilon",
            "epsilon must be a positive number (or give \"rho\" for zero-concentrated DP)".into(),
        ),
        Some(_) if request.epsilon != 0.0 => invalid(
            "invalid_budget",
            "give either \"epsilon\" (pure DP, Laplace noise) or \"rho\" (zCDP, Gaussian noise), not both".into(),
        ),
        Some(rho) if !(rho.is_finite() && rho > 0.0) => {
            invalid("invalid_rho", "rho must be a positive number".into())
        }
        Some(rho) => match request.delta {
            Some(delta) => Ok(Budget::Concentrated {
                rho,
                delta: valid_delta(delta)?,
            }),
            None => invalid(
                "invalid_delta",
                "rho needs \"delta\" (e.g. 1e-6): the ledger debits the (ε, δ) that ρ converts to".into(),
            ),
        },
    }
}

/// What one dataset is charged for a release.
struct Charge {
    dataset_id: String,
    epsilon: f64,
    delta: f64,
}

/// A checked, priced query.
struct Prepared {
    work: Work,
    /// One per dataset read: a join charges each (unconditional ones nothing).
    charges: Vec<Charge>,
    /// What the ledger entry says is released.
    mechanism: String,
    /// How guest code ran over rows for it (the ledger's `mode`).
    mode: &'static str,
    epsilon: f64,
    delta: f64,
}

/// What a priced query will compute once its debit is durable.
enum Work {
    Aggregate { shape: QueryShape, pricing: Pricing },
    Blocks(blocks::BlockPlan),
}

/// What a query costs and how its noise is drawn, fixed before any data is read.
struct Pricing {
    /// Unconditional data: no noise at all.
    exact: bool,
    /// Per measurement; `None` for the row count when `threshold` releases it, and for
    /// quantiles (see `quantiles`).
    calibrated: Vec<Option<Calibrated>>,
    /// Per measurement: the quantile mechanism of each quantile measure.
    quantiles: Vec<Option<quantile::QuantileMechanism>>,
    /// Partition selection, when the group keys are not public.
    threshold: Option<Threshold>,
    /// The budget's measure decides the noise (Laplace or Gaussian) and its intervals.
    budget: Budget,
    epsilon: f64,
    delta: f64,
    /// Under zCDP, what the release spends before conversion to (ε, δ).
    rho: Option<f64>,
    /// The minimum group size: the scenario's or the largest of its datasets'.
    min_group: u64,
}

/// The text key of each group slot, in slot order.
fn index_order(index: HashMap<Vec<String>, usize>, len: usize) -> Vec<String> {
    let mut out = vec![String::new(); len];
    for (mut key, slot) in index {
        out[slot] = match key.len() {
            1 => key.pop().unwrap_or_default(),
            // JSON keeps keys with separators in them apart.
            _ => serde_json::to_string(&key).unwrap_or_default(),
        };
    }
    out
}

/// A private group key as released: an integer column's value as an integer, else text.
fn typed_key(column: &arrow::array::ArrayRef, text: &str) -> Value {
    if column.data_type().is_integer() {
        text.parse()
            .map(Value::Int)
            .unwrap_or(Value::Text(text.into()))
    } else {
        Value::Text(text.into())
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

/// Keeps a release for [`Gate::cached`], inside the transaction that commits its ledger
/// entries, under a savepoint: a failure only costs a later identical query its budget, so it
/// is logged and undone, and the commits stand.
fn remember(
    tx: &rusqlite::Transaction<'_>,
    scenario_id: &str,
    key: &str,
    text: &serde_json::Result<String>,
    entries: &[(u64, u64)],
) {
    let Some(((reservation, commit), joint)) = entries.split_first() else {
        return;
    };
    let stored = || -> Result<(), String> {
        let text = text.as_ref().map_err(|e| e.to_string())?;
        tx.execute_cached(
            "INSERT OR IGNORE INTO release_cache (scenario_id, request_key, release, reservation, commit_seq, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![scenario_id, key, text, *reservation as i64, *commit as i64, crate::now_rfc3339()],
        )
        .map_err(|e| e.to_string())?;
        if !joint.is_empty() {
            let joint = serde_json::to_string(joint).map_err(|e| e.to_string())?;
            tx.execute_cached(
                "INSERT OR IGNORE INTO release_cache_joint (scenario_id, request_key, entries) VALUES (?1, ?2, ?3)",
                rusqlite::params![scenario_id, key, joint],
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    let kept = tx
        .execute_batch("SAVEPOINT remember")
        .map_err(|e| e.to_string())
        .and_then(|()| match stored() {
            Ok(()) => tx
                .execute_batch("RELEASE remember")
                .map_err(|e| e.to_string()),
            Err(e) => {
                let undone = tx.execute_batch("ROLLBACK TO remember; RELEASE remember");
                Err(match undone {
                    Ok(()) => e,
                    Err(u) => format!("{e}; undoing it: {u}"),
                })
            }
        });
    if let Err(e) = kept {
        tracing::warn!("could not keep a release for reuse: {e}");
    }
}

#[cfg(test)]
mod dp_tests;

#[cfg(test)]
mod remember_tests {
    use super::*;

    /// A kept release commits with the transaction it is written in; one that cannot be
    /// written (here, a second one under the same key, refused by a trigger) is undone alone,
    /// and what the transaction wrote before it stands.
    #[test]
    fn a_release_that_cannot_be_kept_is_undone_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut conn = store.conn();
        conn.execute_batch(
            "CREATE TABLE before_it (x INTEGER);
             CREATE TRIGGER refuse_b BEFORE INSERT ON release_cache_joint
             WHEN NEW.request_key = 'b' BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        )
        .unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute("INSERT INTO before_it VALUES (1)", []).unwrap();
        let text = Ok("{}".to_string());
        remember(&tx, "scn", "a", &text, &[(1, 2), (3, 4)]);
        // Its first row goes in, its joint row is refused: both are undone.
        remember(&tx, "scn", "b", &text, &[(5, 6), (7, 8)]);
        let unserialisable = serde_json::from_str::<String>("not json").map(|_| String::new());
        remember(&tx, "scn", "c", &unserialisable, &[(9, 10)]);
        tx.commit().unwrap();
        let keys: Vec<String> = conn
            .prepare("SELECT request_key FROM release_cache ORDER BY request_key")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(keys, ["a"]);
        let joint: i64 = conn
            .query_row("SELECT COUNT(*) FROM release_cache_joint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(joint, 1, "a's joint entries only");
        let before: i64 = conn
            .query_row("SELECT COUNT(*) FROM before_it", [], |r| r.get(0))
            .unwrap();
        assert_eq!(before, 1, "the transaction's own write stands");
    }
}
