//! Scenarios (应用场景): a developer's application to compute on named datasets and columns,
//! with named modules, for a stated purpose, with a privacy budget — and the operator's
//! decision. Approval reserves the budget from each dataset's total, atomically.
//!
//! Lifecycle: `submitted` → `approved` (an operator may tighten every limit) or `rejected`
//! (with a reason) → `suspended` (by an operator, with a reason), `expired` (its validity
//! window ended) or `exhausted` (its budget is spent on every dataset). The last two are
//! noticed when the scenario is next read and recorded in the audit log as the system's.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::ledger::{Event, Ledger, LedgerError};
use crate::store::{Cached, Store, StoreError};

/// What a developer applies for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Application {
    pub purpose: String,
    /// Dataset id → the columns the scenario may use.
    pub columns: BTreeMap<String, Vec<String>>,
    /// SHA-256 ids of the modules allowed to run under this scenario.
    pub modules: Vec<String>,
    /// Total ε asked for (per dataset).
    pub epsilon: f64,
    /// The most ε one job may spend.
    pub per_job_epsilon: f64,
    /// Never below the datasets' own minimum.
    #[serde(default)]
    pub min_group_size: u64,
    /// Every job's report waits for an operator to release it (产品发布前审核).
    #[serde(default)]
    pub requires_review: bool,
    /// Start of the validity window (RFC 3339); default: from approval.
    #[serde(default)]
    pub valid_from: Option<String>,
    /// End of the validity window (RFC 3339); default: open-ended unless the operator sets one.
    #[serde(default)]
    pub valid_until: Option<String>,
    /// For person-level datasets: use at most this many rows of each person, lower than the
    /// catalogue's bound (less noise per query, more rows dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows_per_unit: Option<u64>,
    /// For person-level datasets: at most this many groups per person where that lowers the
    /// price (partition selection), lower than the catalogue's bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_groups_per_unit: Option<u64>,
    /// Total δ asked for (per dataset), spent by releases whose group keys are not public
    /// (DP partition selection) and by releases under ρ (zCDP, converted to (ε, δ)). 0: pure
    /// ε-DP releases only.
    #[serde(default)]
    pub delta: f64,
    /// Modules an operator has read and marked reviewed at approval: their UDFs may run in the
    /// faster per-batch mode (one instance per batch of rows, so state can cross rows). Set
    /// only by the operator; an application that names any is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reviewed_modules: Vec<String>,
    /// Jobs in this scenario finish no sooner than this many seconds after they start, so how
    /// long guest code ran over the data does not show in when the result appears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_to_seconds: Option<u64>,
}

/// The most δ a scenario may ask for on one dataset: beyond it "(ε, δ)-DP" stops meaning much
/// for datasets of thousands of people.
pub const MAX_DELTA: f64 = 1e-4;

/// The longest deadline a job may be padded to (a day).
pub const MAX_PAD_SECONDS: u64 = 86_400;

/// Limits an operator may tighten when approving.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    #[serde(default)]
    pub epsilon: Option<f64>,
    #[serde(default)]
    pub per_job_epsilon: Option<f64>,
    #[serde(default)]
    pub min_group_size: Option<u64>,
    /// The operator may require review before release (but not waive one applied for).
    #[serde(default)]
    pub requires_review: Option<bool>,
    /// The operator may end the validity window earlier than applied for.
    #[serde(default)]
    pub valid_until: Option<String>,
    /// The operator may lower the δ applied for (to 0: pure ε-DP only).
    #[serde(default)]
    pub delta: Option<f64>,
    /// Modules of the application the operator has reviewed: their UDFs run per batch.
    #[serde(default)]
    pub reviewed_modules: Option<Vec<String>>,
    /// The operator may pad jobs to a deadline (or lengthen the one applied for).
    #[serde(default)]
    pub pad_to_seconds: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Submitted,
    Approved,
    Rejected,
    /// Stopped by an operator: no job may start or reserve budget; what was spent stays spent.
    Suspended,
    /// Its validity window ended.
    Expired,
    /// Its budget is spent on every dataset it names.
    Exhausted,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Submitted => "submitted",
            Status::Approved => "approved",
            Status::Rejected => "rejected",
            Status::Suspended => "suspended",
            Status::Expired => "expired",
            Status::Exhausted => "exhausted",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "approved" => Status::Approved,
            "rejected" => Status::Rejected,
            "suspended" => Status::Suspended,
            "expired" => Status::Expired,
            "exhausted" => Status::Exhausted,
            _ => Status::Submitted,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub id: String,
    pub developer_id: String,
    pub status: Status,
    pub application: Application,
    /// Set on approval: the limits in force.
    pub epsilon_cap: Option<f64>,
    pub per_job_epsilon: Option<f64>,
    pub min_group_size: Option<u64>,
    pub decided_by: Option<String>,
    pub decided_at: Option<String>,
    /// Why it was rejected or suspended.
    pub reason: Option<String>,
    /// In force once approved: reports wait for an operator's release.
    pub requires_review: bool,
    pub created_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{0}")]
    Invalid(String),
    #[error("no scenario with that id")]
    NotFound,
    #[error("the scenario is {0:?}, not submitted")]
    NotPending(Status),
    #[error("the scenario is {0:?}, not approved")]
    NotApproved(Status),
    #[error(
        "approving would reserve more than dataset {dataset}'s total budget ({left} left to reserve)"
    )]
    OverReserved { dataset: String, left: f64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl From<rusqlite::Error> for ScenarioError {
    fn from(e: rusqlite::Error) -> Self {
        ScenarioError::Store(e.into())
    }
}

/// Parses an RFC 3339 time (`2027-01-01T00:00:00Z`).
pub fn timestamp(name: &str, text: &str) -> Result<time::OffsetDateTime, ScenarioError> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).map_err(
        |_| {
            ScenarioError::Invalid(format!(
                "{name} must be an RFC 3339 time such as 2027-01-01T00:00:00Z, not {text:?}"
            ))
        },
    )
}

fn positive(name: &str, v: f64) -> Result<(), ScenarioError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(ScenarioError::Invalid(format!(
            "{name} must be a positive number"
        )))
    }
}

/// Files an application after checking it against the catalogue.
pub fn apply(
    store: &Store,
    developer_id: &str,
    app: Application,
) -> Result<Scenario, ScenarioError> {
    if app.purpose.trim().is_empty() || app.purpose.len() > 4000 {
        return Err(ScenarioError::Invalid(
            "purpose must be 1 to 4000 characters".into(),
        ));
    }
    positive("epsilon", app.epsilon)?;
    positive("per_job_epsilon", app.per_job_epsilon)?;
    if app.per_job_epsilon > app.epsilon {
        return Err(ScenarioError::Invalid(
            "per_job_epsilon cannot exceed epsilon".into(),
        ));
    }
    if app.columns.is_empty() || app.columns.len() > 16 {
        return Err(ScenarioError::Invalid(
            "name 1 to 16 datasets in `columns`".into(),
        ));
    }
    if app.modules.is_empty()
        || app.modules.len() > 64
        || app
            .modules
            .iter()
            .any(|m| m.len() != 64 || !m.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ScenarioError::Invalid(
            "`modules` must list 1 to 64 module ids (SHA-256, hex)".into(),
        ));
    }
    let from = app
        .valid_from
        .as_deref()
        .map(|t| timestamp("valid_from", t))
        .transpose()?;
    let until = app
        .valid_until
        .as_deref()
        .map(|t| timestamp("valid_until", t))
        .transpose()?;
    if let Some(until) = until
        && (until <= time::OffsetDateTime::now_utc() || from.is_some_and(|f| f >= until))
    {
        return Err(ScenarioError::Invalid(
            "valid_until must be in the future and after valid_from".into(),
        ));
    }
    if !(app.delta.is_finite() && (0.0..=MAX_DELTA).contains(&app.delta)) {
        return Err(ScenarioError::Invalid(format!(
            "delta must be between 0 and {MAX_DELTA:e}"
        )));
    }
    if !app.reviewed_modules.is_empty() {
        return Err(ScenarioError::Invalid(
            "reviewed_modules is set by the operator at approval, not applied for".into(),
        ));
    }
    if app
        .pad_to_seconds
        .is_some_and(|p| p == 0 || p > MAX_PAD_SECONDS)
    {
        return Err(ScenarioError::Invalid(format!(
            "pad_to_seconds must be 1 to {MAX_PAD_SECONDS}"
        )));
    }
    if app.max_rows_per_unit == Some(0) {
        return Err(ScenarioError::Invalid(
            "max_rows_per_unit must be at least 1".into(),
        ));
    }
    if app
        .max_groups_per_unit
        .is_some_and(|g| !(1..=crate::catalog::MAX_GROUPS_PER_UNIT).contains(&g))
    {
        return Err(ScenarioError::Invalid(format!(
            "max_groups_per_unit must be 1 to {}",
            crate::catalog::MAX_GROUPS_PER_UNIT
        )));
    }
    let mut min_group = app.min_group_size;
    for (dataset, cols) in &app.columns {
        let policy = crate::catalog::policy(store, dataset)?.ok_or_else(|| {
            ScenarioError::Invalid(format!("no dataset {dataset:?} in the catalogue"))
        })?;
        if policy.open_attribute == crate::catalog::OpenAttribute::Closed {
            return Err(ScenarioError::Invalid(format!(
                "dataset {dataset:?} is closed (不予开放)"
            )));
        }
        if cols.is_empty() {
            return Err(ScenarioError::Invalid(format!(
                "name the columns of {dataset:?} you need"
            )));
        }
        if let Some(c) = cols.iter().find(|c| !policy.columns.contains_key(*c)) {
            return Err(ScenarioError::Invalid(format!(
                "dataset {dataset:?} has no column {c:?}"
            )));
        }
        min_group = min_group.max(policy.min_group_size);
    }
    let app = Application {
        min_group_size: min_group,
        ..app
    };
    let id = crate::new_id("scn");
    let created_at = crate::now_rfc3339();
    let text = serde_json::to_string(&app).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.conn().execute_cached(
        "INSERT INTO scenarios (id, developer_id, status, application, created_at) VALUES (?1, ?2, 'submitted', ?3, ?4)",
        params![id, developer_id, text, created_at],
    )?;
    Ok(Scenario {
        id,
        developer_id: developer_id.to_string(),
        status: Status::Submitted,
        application: app,
        epsilon_cap: None,
        per_job_epsilon: None,
        min_group_size: None,
        decided_by: None,
        decided_at: None,
        reason: None,
        requires_review: false,
        created_at,
    })
}

const COLUMNS: &str = "id, developer_id, status, application, epsilon_cap, per_job_epsilon, min_group_size, decided_by, decided_at, created_at, reason, requires_review";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Scenario, String)> {
    let status: String = r.get(2)?;
    let app_text: String = r.get(3)?;
    Ok((
        Scenario {
            id: r.get(0)?,
            developer_id: r.get(1)?,
            status: Status::parse(&status),
            application: Application {
                purpose: String::new(),
                columns: BTreeMap::new(),
                modules: vec![],
                epsilon: 0.0,
                per_job_epsilon: 0.0,
                min_group_size: 0,
                requires_review: false,
                valid_from: None,
                valid_until: None,
                max_rows_per_unit: None,
                max_groups_per_unit: None,
                delta: 0.0,
                reviewed_modules: Vec::new(),
                pad_to_seconds: None,
            },
            epsilon_cap: r.get(4)?,
            per_job_epsilon: r.get(5)?,
            min_group_size: r.get::<_, Option<i64>>(6)?.map(|v| v.max(0) as u64),
            decided_by: r.get(7)?,
            decided_at: r.get(8)?,
            created_at: r.get(9)?,
            reason: r.get(10)?,
            requires_review: r.get(11)?,
        },
        app_text,
    ))
}

fn finish((mut s, text): (Scenario, String)) -> Result<Scenario, StoreError> {
    s.application = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(s)
}

pub fn get(store: &Store, id: &str) -> Result<Option<Scenario>, StoreError> {
    let row = store
        .read()
        .query_row_cached(
            &format!("SELECT {COLUMNS} FROM scenarios WHERE id = ?1"),
            params![id],
            from_row,
        )
        .optional()?;
    row.map(finish)
        .transpose()?
        .map(|s| refresh(store, s))
        .transpose()
}

/// Moves an approved scenario whose window has ended to `expired`, or whose budget is spent
/// on every dataset to `exhausted`, recording the transition as the system's.
fn refresh(store: &Store, mut s: Scenario) -> Result<Scenario, StoreError> {
    if s.status != Status::Approved {
        return Ok(s);
    }
    let now = time::OffsetDateTime::now_utc();
    let ended = s
        .application
        .valid_until
        .as_deref()
        .and_then(|t| timestamp("valid_until", t).ok())
        .is_some_and(|until| until <= now);
    let (next, reason) = if ended {
        (
            Status::Expired,
            format!(
                "the validity window ended at {}",
                s.application.valid_until.as_deref().unwrap_or_default()
            ),
        )
    } else {
        let conn = store.read();
        let cap = s.epsilon_cap.unwrap_or(0.0);
        let mut spent_everywhere = true;
        for dataset in s.application.columns.keys() {
            let spent = crate::ledger::spent_in(&conn, "scenario", &s.id, dataset)?;
            spent_everywhere &= cap - spent <= 1e-9;
        }
        if !spent_everywhere {
            return Ok(s);
        }
        (
            Status::Exhausted,
            format!("its budget of ε {cap} is spent on every dataset"),
        )
    };
    let changed = store.conn().execute_cached(
        "UPDATE scenarios SET status = ?2, reason = ?3, decided_by = NULL, decided_at = ?4 WHERE id = ?1 AND status = 'approved'",
        params![s.id, next.as_str(), reason, crate::now_rfc3339()],
    )?;
    if changed == 1 {
        crate::audit::append_logged(
            store,
            crate::audit::NewRecord::system(
                if next == Status::Expired {
                    "scenario_expired"
                } else {
                    "scenario_exhausted"
                },
                &s.id,
                "ok",
            )
            .with("reason", reason.clone()),
        );
    }
    s.status = next;
    s.reason = Some(reason);
    s.decided_by = None;
    Ok(s)
}

/// Whether an approved scenario's window has begun.
pub fn started(s: &Scenario) -> bool {
    s.application
        .valid_from
        .as_deref()
        .and_then(|t| timestamp("valid_from", t).ok())
        .is_none_or(|from| from <= time::OffsetDateTime::now_utc())
}

/// All scenarios, or one developer's.
pub fn list(store: &Store, developer_id: Option<&str>) -> Result<Vec<Scenario>, StoreError> {
    let rows: Vec<(Scenario, String)> = {
        let conn = store.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM scenarios WHERE ?1 IS NULL OR developer_id = ?1 ORDER BY created_at, id"
        ))?;
        stmt.query_map(params![developer_id], from_row)?
            .collect::<Result<_, _>>()?
    };
    rows.into_iter()
        .map(|r| refresh(store, finish(r)?))
        .collect()
}

/// ε reserved by approved scenarios on a dataset.
pub fn reserved_for_dataset(store: &Store, dataset_id: &str) -> Result<f64, StoreError> {
    reserved_in(&store.conn(), dataset_id)
}

fn reserved_in(conn: &rusqlite::Connection, dataset_id: &str) -> Result<f64, StoreError> {
    Ok(conn.query_row_cached(
        "SELECT COALESCE(SUM(s.epsilon_cap), 0) FROM scenarios s, json_each(s.application, '$.columns') d
         WHERE s.status IN ('approved', 'suspended', 'expired', 'exhausted') AND d.key = ?1",
        params![dataset_id],
        |r| r.get(0),
    )?)
}

/// Approves a submitted scenario, possibly with tighter limits, reserving its ε from every
/// dataset it names. Check and reservation happen in one write transaction.
pub fn approve(
    store: &Store,
    ledger: &Ledger,
    id: &str,
    operator_id: &str,
    approval: &Approval,
) -> Result<Scenario, ScenarioError> {
    let scenario = get(store, id)?.ok_or(ScenarioError::NotFound)?;
    if scenario.status != Status::Submitted {
        return Err(ScenarioError::NotPending(scenario.status));
    }
    let app = &scenario.application;
    let tighter = |name: &str, asked: f64, given: Option<f64>| -> Result<f64, ScenarioError> {
        match given {
            None => Ok(asked),
            Some(v) => {
                positive(name, v)?;
                if v > asked {
                    Err(ScenarioError::Invalid(format!(
                        "{name} may only be tightened: {v} is more than the {asked} applied for"
                    )))
                } else {
                    Ok(v)
                }
            }
        }
    };
    let epsilon = tighter("epsilon", app.epsilon, approval.epsilon)?;
    let per_job = tighter(
        "per_job_epsilon",
        app.per_job_epsilon,
        approval.per_job_epsilon,
    )?
    .min(epsilon);
    let min_group = approval.min_group_size.unwrap_or(0).max(app.min_group_size);
    let delta = match approval.delta {
        Some(d) if !(d.is_finite() && d >= 0.0 && d <= app.delta) => {
            return Err(ScenarioError::Invalid(format!(
                "delta may only be tightened: {d} is not between 0 and the {} applied for",
                app.delta
            )));
        }
        Some(d) => d,
        None => app.delta,
    };
    if app.requires_review && approval.requires_review == Some(false) {
        return Err(ScenarioError::Invalid(
            "review before release was applied for and may only be tightened, not waived".into(),
        ));
    }
    let requires_review = app.requires_review || approval.requires_review.unwrap_or(false);
    let mut app = app.clone();
    app.delta = delta;
    if let Some(reviewed) = &approval.reviewed_modules {
        if let Some(m) = reviewed.iter().find(|m| !app.modules.contains(m)) {
            return Err(ScenarioError::Invalid(format!(
                "reviewed module {:?} is not one of the application's modules",
                m.chars().take(64).collect::<String>()
            )));
        }
        app.reviewed_modules = reviewed.clone();
    }
    if let Some(pad) = approval.pad_to_seconds {
        if pad == 0 || pad > MAX_PAD_SECONDS || app.pad_to_seconds.is_some_and(|a| pad < a) {
            return Err(ScenarioError::Invalid(format!(
                "pad_to_seconds may only be lengthened, up to {MAX_PAD_SECONDS}"
            )));
        }
        app.pad_to_seconds = Some(pad);
    }
    if let Some(until) = &approval.valid_until {
        let given = timestamp("valid_until", until)?;
        let asked = app
            .valid_until
            .as_deref()
            .map(|t| timestamp("valid_until", t))
            .transpose()?;
        if asked.is_some_and(|a| given > a) || given <= time::OffsetDateTime::now_utc() {
            return Err(ScenarioError::Invalid(
                "valid_until may only be tightened, to a time in the future".into(),
            ));
        }
        app.valid_until = Some(until.clone());
    }
    let app_text = serde_json::to_string(&app).map_err(|e| StoreError::Corrupt(e.to_string()))?;

    // One transaction: the over-reservation check, the status change and the ledger grants
    // that later debits are checked (and replayed offline) against.
    ledger.transact(|tx| {
        let mut grants = Vec::new();
        for dataset in app.columns.keys() {
            let policy = crate::catalog::policy_in(tx, dataset)?;
            if policy.open_attribute == crate::catalog::OpenAttribute::Closed {
                return Err(ScenarioError::Invalid(format!("dataset {dataset:?} is closed (不予开放)")));
            }
            let left = policy.total_epsilon - reserved_in(tx, dataset)?;
            if epsilon > left + 1e-12 {
                return Err(ScenarioError::OverReserved { dataset: dataset.clone(), left: left.max(0.0) });
            }
            grants.push(Event::Grant {
                scenario_id: id.to_string(),
                dataset_id: dataset.clone(),
                developer_id: scenario.developer_id.clone(),
                epsilon,
                per_job_epsilon: per_job,
                dataset_total: policy.total_epsilon,
                developer_epsilon: policy.developer_epsilon.unwrap_or(policy.total_epsilon),
                delta: delta.min(policy.total_delta),
                dataset_delta: policy.total_delta,
            });
        }
        let changed = tx.execute_cached(
            "UPDATE scenarios SET status = 'approved', epsilon_cap = ?2, per_job_epsilon = ?3, min_group_size = ?4,
             decided_by = ?5, decided_at = ?6, requires_review = ?7, application = ?8 WHERE id = ?1 AND status = 'submitted'",
            params![id, epsilon, per_job, min_group as i64, operator_id, crate::now_rfc3339(), requires_review, app_text],
        )?;
        if changed != 1 {
            return Err(ScenarioError::NotPending(Status::Approved));
        }
        Ok(((), grants))
    })?;
    Ok(get(store, id)?.ok_or(ScenarioError::NotFound)?)
}

fn required_reason(reason: &str) -> Result<&str, ScenarioError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 4000 {
        return Err(ScenarioError::Invalid(
            "a reason of 1 to 4000 characters is required".into(),
        ));
    }
    Ok(reason)
}

/// Rejects a submitted scenario, with the reason the developer will read.
pub fn reject(
    store: &Store,
    id: &str,
    operator_id: &str,
    reason: &str,
) -> Result<Scenario, ScenarioError> {
    let reason = required_reason(reason)?;
    let scenario = get(store, id)?.ok_or(ScenarioError::NotFound)?;
    let changed = store.conn().execute_cached(
        "UPDATE scenarios SET status = 'rejected', decided_by = ?2, decided_at = ?3, reason = ?4 WHERE id = ?1 AND status = 'submitted'",
        params![id, operator_id, crate::now_rfc3339(), reason],
    )?;
    if changed != 1 {
        return Err(ScenarioError::NotPending(scenario.status));
    }
    Ok(get(store, id)?.ok_or(ScenarioError::NotFound)?)
}

/// Suspends an approved scenario. In the same transaction the ledger gets a grant per dataset
/// that freezes the allocation at what is already spent, with a per-job cap of zero, so no job
/// — queued, or running between two queries — can reserve more, whatever it saw before.
pub fn suspend(
    store: &Store,
    ledger: &Ledger,
    id: &str,
    operator_id: &str,
    reason: &str,
) -> Result<Scenario, ScenarioError> {
    let reason = required_reason(reason)?;
    ledger.transact(|tx| {
        let status: Option<String> = tx
            .query_row_cached("SELECT status FROM scenarios WHERE id = ?1", params![id], |r| r.get(0))
            .optional()?;
        let status = Status::parse(&status.ok_or(ScenarioError::NotFound)?);
        if status != Status::Approved {
            return Err(ScenarioError::NotApproved(status));
        }
        let scenario_row: (String, String) =
            tx.query_row_cached("SELECT developer_id, application FROM scenarios WHERE id = ?1", params![id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let app: Application = serde_json::from_str(&scenario_row.1).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut grants = Vec::new();
        for dataset in app.columns.keys() {
            let policy = crate::catalog::policy_in(tx, dataset)?;
            let spent = crate::ledger::spent_in(tx, "scenario", id, dataset)?;
            let spent_delta = crate::ledger::spent_in(tx, "scenario_delta", id, dataset)?;
            grants.push(Event::Grant {
                scenario_id: id.to_string(),
                dataset_id: dataset.clone(),
                developer_id: scenario_row.0.clone(),
                epsilon: spent,
                per_job_epsilon: 0.0,
                dataset_total: policy.total_epsilon,
                developer_epsilon: policy.developer_epsilon.unwrap_or(policy.total_epsilon),
                delta: spent_delta,
                dataset_delta: policy.total_delta,
            });
        }
        tx.execute_cached(
            "UPDATE scenarios SET status = 'suspended', decided_by = ?2, decided_at = ?3, reason = ?4 WHERE id = ?1",
            params![id, operator_id, crate::now_rfc3339(), reason],
        )?;
        Ok(((), grants))
    })?;
    Ok(get(store, id)?.ok_or(ScenarioError::NotFound)?)
}

impl Scenario {
    pub fn status_str(&self) -> &'static str {
        self.status.as_str()
    }
}
