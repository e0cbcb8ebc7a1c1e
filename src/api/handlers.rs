//! The handlers behind [`super::endpoints`]. Each checks role and ownership itself; the
//! audit layer records what came of it.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json_, json};

use super::{ApiError, AppState, Caller, note, note_target, parse_json, query, to_json};
use crate::jobs::{JobStatus, SubmitJob};
use crate::principal::{NewPrincipal, Role};

pub(super) async fn health() -> Json<Json_> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

pub(super) async fn create_principal(
    State(s): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator, "register principals")?;
    let new: NewPrincipal = parse_json(body)?;
    let (principal, token) = crate::principal::create(&s.store, &new)?;
    note_target(&principal.id);
    note("role", principal.role.as_str());
    note("name", principal.name.clone());
    Ok((
        StatusCode::CREATED,
        Json(json!({ "principal": principal, "token": token.0 })),
    )
        .into_response())
}

pub(super) async fn revoke_principal(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator, "revoke principals")?;
    if !crate::principal::revoke(&s.store, &id)? {
        return Err(ApiError::not_found("principal"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn suspend_principal(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator, "suspend principals")?;
    if id == caller.0.id {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "cannot_suspend_self",
            "an operator cannot suspend themself",
        ));
    }
    if !crate::principal::set_suspended(&s.store, &id, true)? {
        return Err(ApiError::not_found("principal"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn reinstate_principal(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator, "reinstate principals")?;
    if !crate::principal::set_suspended(&s.store, &id, false)? {
        return Err(ApiError::not_found("principal"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A new token for a principal (operators for anyone; everyone for themself).
pub(super) async fn rotate_token(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    if caller.0.role != Role::Operator && caller.0.id != id {
        return Err(ApiError::forbidden("rotate another principal's token"));
    }
    let token =
        crate::principal::rotate(&s.store, &id)?.ok_or_else(|| ApiError::not_found("principal"))?;
    Ok(Json(json!({ "token": token.0 })))
}

pub(super) async fn list_datasets(
    State(s): State<AppState>,
    _caller: Caller,
) -> Result<Json<Json_>, ApiError> {
    Ok(Json(json!({ "datasets": crate::catalog::list(&s.store)? })))
}

pub(super) async fn get_dataset(
    State(s): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let d = crate::catalog::get(&s.store, &id)?.ok_or_else(|| ApiError::not_found("dataset"))?;
    Ok(Json(serde_json::to_value(d).map_err(ApiError::internal)?))
}

pub(super) async fn upload_module(
    State(s): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Developer, "upload modules")?;
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "module_too_large",
                format!(
                    "modules are limited to {} bytes",
                    s.config.limits.max_module_bytes
                ),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "the request body could not be read",
            )
        }
    })?;
    let sandbox = s.sandbox.clone();
    let body = bytes.clone();
    // Compiling is CPU work (about 2 s per MB): off the async threads.
    let validated = tokio::task::spawn_blocking(move || sandbox.validate(&body))
        .await
        .map_err(ApiError::internal)?;
    let validated = match validated {
        Ok(v) => v,
        Err(e) => {
            return Err(e.into());
        }
    };
    let path = s
        .data_dir
        .join("modules")
        .join(format!("{}.wasm", validated.hash));
    if !path.exists() {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(ApiError::internal)?;
    }
    s.store
        .conn()
        .execute(
            "INSERT OR IGNORE INTO modules (hash, owner_id, size, entries, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![
                validated.hash,
                caller.0.id,
                bytes.len() as i64,
                serde_json::to_string(&validated.entries).map_err(ApiError::internal)?,
                crate::now_rfc3339()
            ],
        )
        .map_err(ApiError::internal)?;
    note_target(&validated.hash);
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": validated.hash, "entries": validated.entries, "size": bytes.len() })),
    )
        .into_response())
}

pub(super) async fn list_modules(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Developer, "list modules")?;
    let conn = s.store.conn();
    let mut stmt = conn
        .prepare("SELECT hash, size, entries, created_at FROM modules WHERE owner_id = ?1 ORDER BY created_at")
        .map_err(ApiError::internal)?;
    let modules = stmt
        .query_map([&caller.0.id], |r| {
            let entries: String = r.get(2)?;
            Ok(json!({
                "id": r.get::<_, String>(0)?,
                "size": r.get::<_, i64>(1)?,
                "entries": serde_json::from_str::<Json_>(&entries).unwrap_or(Json_::Null),
                "created_at": r.get::<_, String>(3)?,
            }))
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(ApiError::internal)?;
    Ok(Json(json!({ "modules": modules })))
}

pub(super) async fn apply_scenario(
    State(s): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Developer, "apply for scenarios")?;
    let app = parse_json(body)?;
    let scenario = crate::scenario::apply(&s.store, &caller.0.id, app)?;
    note_target(&scenario.id);
    Ok((StatusCode::CREATED, Json(scenario)).into_response())
}

fn visible_scenario(
    s: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<crate::scenario::Scenario, ApiError> {
    crate::scenario::get(&s.store, id)?
        .filter(|sc| caller.0.role != Role::Developer || sc.developer_id == caller.0.id)
        .ok_or_else(|| ApiError::not_found("scenario"))
}

pub(super) async fn list_scenarios(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Json_>, ApiError> {
    let own = (caller.0.role == Role::Developer).then_some(caller.0.id.as_str());
    Ok(Json(
        json!({ "scenarios": crate::scenario::list(&s.store, own)? }),
    ))
}

pub(super) async fn get_scenario(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    Ok(Json(
        serde_json::to_value(visible_scenario(&s, &caller, &id)?).map_err(ApiError::internal)?,
    ))
}

pub(super) async fn approve_scenario(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Operator, "approve scenarios")?;
    let approval: crate::scenario::Approval = match &body {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => Default::default(),
        _ => parse_json(body)?,
    };
    for (key, value) in [
        ("epsilon", approval.epsilon.map(|v| v.to_string())),
        (
            "per_job_epsilon",
            approval.per_job_epsilon.map(|v| v.to_string()),
        ),
        (
            "min_group_size",
            approval.min_group_size.map(|v| v.to_string()),
        ),
        (
            "requires_review",
            approval.requires_review.map(|v| v.to_string()),
        ),
        ("valid_until", approval.valid_until.clone()),
    ] {
        if let Some(v) = value {
            note(key, v);
        }
    }
    let result = crate::scenario::approve(&s.store, &s.ledger, &id, &caller.0.id, &approval);
    Ok(Json(
        serde_json::to_value(result?).map_err(ApiError::internal)?,
    ))
}

/// A decision's reason, read by the developer and kept in the audit log.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Reason {
    /// 1 to 4000 characters.
    reason: String,
}

pub(super) async fn reject_scenario(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Operator, "reject scenarios")?;
    let Reason { reason } = parse_json(body)?;
    note("reason", reason.clone());
    let result = crate::scenario::reject(&s.store, &id, &caller.0.id, &reason);
    Ok(Json(
        serde_json::to_value(result?).map_err(ApiError::internal)?,
    ))
}

pub(super) async fn suspend_scenario(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Operator, "suspend scenarios")?;
    let Reason { reason } = parse_json(body)?;
    note("reason", reason.clone());
    let result = crate::scenario::suspend(&s.store, &s.ledger, &id, &caller.0.id, &reason);
    Ok(Json(
        serde_json::to_value(result?).map_err(ApiError::internal)?,
    ))
}

pub(super) async fn submit_job(
    State(s): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Developer, "submit jobs")?;
    let req: SubmitJob = parse_json(body)?;
    if req.dry_run {
        let dry = s.runner.dry_run(&caller.0.id, req).await?;
        return Ok((StatusCode::OK, Json(dry)).into_response());
    }
    // On a blocking thread: the job's row is committed (and fsynced) before it is accepted.
    let (runner, developer) = (s.runner.clone(), caller.0.id.clone());
    let job = tokio::task::spawn_blocking(move || runner.submit(&developer, req))
        .await
        .map_err(ApiError::internal)??;
    note_target(&job.id);
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// A job the caller may read: developers their own; operators any (they review reports).
fn visible_job(
    s: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<(crate::jobs::Job, Option<crate::jobs::Report>), ApiError> {
    match caller.0.role {
        Role::Developer | Role::Operator => {}
        Role::Auditor => return Err(ApiError::forbidden("read jobs")),
    }
    crate::jobs::get(&s.store, id)?
        .filter(|(j, _)| caller.0.role == Role::Operator || j.developer_id == caller.0.id)
        .ok_or_else(|| ApiError::not_found("job"))
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct JobsQuery {
    status: Option<String>,
}

/// Jobs, newest first: a developer's own, or (operators) everyone's, e.g. `?status=awaiting_review`.
pub(super) async fn list_jobs(
    State(s): State<AppState>,
    caller: Caller,
    q: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    let own = match caller.0.role {
        Role::Developer => Some(caller.0.id.as_str()),
        Role::Operator => None,
        Role::Auditor => return Err(ApiError::forbidden("list jobs")),
    };
    let q = query(q)?;
    Ok(Json(
        json!({ "jobs": crate::jobs::list(&s.store, own, q.status.as_deref())? }),
    ))
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct WaitQuery {
    /// Long poll: answer as soon as the job has finished, or after this many seconds (at most
    /// 30), whichever is first.
    wait: Option<u64>,
}

pub(super) async fn get_job(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    let q = query(q)?;
    visible_job(&s, &caller, &id)?;
    if let Some(seconds) = q.wait.filter(|w| *w > 0) {
        let timeout = std::time::Duration::from_secs(seconds.min(30));
        s.runner.wait_finished(&id, timeout).await?;
    }
    let (job, _) = visible_job(&s, &caller, &id)?;
    Ok(Json(serde_json::to_value(job).map_err(ApiError::internal)?))
}

pub(super) async fn get_result(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    visible_job(&s, &caller, &id)?;
    // A report is shown only once its job's outcome is durable (invariant 2's "never shown").
    if !s.runner.settled(&id).await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_durable",
            "the job's outcome is not yet on disk; try again",
        ));
    }
    let (job, report) = visible_job(&s, &caller, &id)?;
    let reviewer = caller.0.role == Role::Operator;
    match (job.status, report) {
        (JobStatus::Succeeded, Some(report)) => Ok(Json(
            serde_json::to_value(report).map_err(ApiError::internal)?,
        )),
        (JobStatus::AwaitingReview | JobStatus::Withheld, Some(report)) if reviewer => Ok(Json(
            serde_json::to_value(report).map_err(ApiError::internal)?,
        )),
        (JobStatus::AwaitingReview, _) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "awaiting_review",
            "the scenario requires an operator to review each report before release; poll GET /v1/jobs/{id}",
        )),
        (JobStatus::Withheld, _) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "withheld",
            format!(
                "an operator withheld this report: {}",
                job.error.map(|e| e.message).unwrap_or_default()
            ),
        )),
        (JobStatus::Cancelled, _) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_cancelled",
            "the job was cancelled; it has no report",
        )),
        (JobStatus::Failed, _) => {
            let e = job.error.unwrap_or(crate::jobs::JobError {
                code: "failed".into(),
                message: String::new(),
            });
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "job_failed",
                format!("the job failed ({}): {}", e.code, e.message),
            ))
        }
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_not_finished",
            "the job has not finished; poll GET /v1/jobs/{id}",
        )),
    }
}

pub(super) async fn release_job(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Operator, "release reports")?;
    review(&s, &caller, &id, None)
}

/// Releases (no reason) or withholds (with one) a report held for review.
fn review(
    s: &AppState,
    caller: &Caller,
    id: &str,
    withheld_for: Option<&str>,
) -> Result<Json<Json_>, ApiError> {
    visible_job(s, caller, id)?;
    if !crate::jobs::decide_review(&s.store, id, withheld_for.is_none(), withheld_for)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_awaiting_review",
            "the job is not awaiting review",
        ));
    }
    let (job, _) = visible_job(s, caller, id)?;
    to_json(job)
}

pub(super) async fn withhold_job(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Operator, "withhold reports")?;
    let Reason { reason } = parse_json(body)?;
    let reason = reason.trim();
    note("reason", reason);
    if reason.is_empty() || reason.len() > 4000 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "a reason of 1 to 4000 characters is required",
        ));
    }
    review(&s, &caller, &id, Some(reason))
}

pub(super) async fn budget(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Json_>, ApiError> {
    let own = (caller.0.role == Role::Developer).then_some(caller.0.id.as_str());
    let mut scenarios = Vec::new();
    for sc in crate::scenario::list(&s.store, own)? {
        let mut per_dataset = Vec::new();
        let (mut spent_total, mut left) = (0.0, f64::INFINITY);
        for dataset in sc.application.columns.keys() {
            let spent = s.ledger.spent("scenario", &sc.id, dataset)?;
            spent_total += spent;
            if let Some(cap) = sc.epsilon_cap {
                left = f64::min(left, (cap - spent).max(0.0));
            }
            per_dataset.push(json!({ "dataset_id": dataset, "epsilon_cap": sc.epsilon_cap, "epsilon_spent": spent }));
        }
        scenarios.push(json!({
            "scenario_id": sc.id,
            "status": sc.status,
            "epsilon_cap": sc.epsilon_cap,
            "epsilon_spent": spent_total,
            "epsilon_left": sc.epsilon_cap.map(|_| left),
            "datasets": per_dataset,
        }));
    }
    let mut body = json!({ "scenarios": scenarios });
    if caller.0.role != Role::Developer {
        let datasets: Vec<Json_> = crate::catalog::list(&s.store)?
            .into_iter()
            .map(|d| {
                json!({
                    "dataset_id": d.policy.id,
                    "total_epsilon": d.policy.total_epsilon,
                    "epsilon_reserved": d.epsilon_reserved,
                    "epsilon_spent": d.epsilon_spent,
                    "epsilon_unreserved": d.epsilon_unreserved,
                })
            })
            .collect();
        body["datasets"] = json!(datasets);
    }
    Ok(Json(body))
}

/// Makes what was just read from the ledger durable before it is shown: readers see a commit
/// before its sync (released queries' commits are not waited for at all, see
/// `Ledger::commit_released`), and an entry or proof once shown must never change after a
/// crash. (Recorded checkpoints need no call: their own commit waits for its sync, after the
/// tree they sign is read.)
///
/// On a blocking thread: the sync may wait for other writers and for its fsync.
async fn durable(s: &AppState) -> Result<(), ApiError> {
    let store = s.store.clone();
    tokio::task::spawn_blocking(move || store.sync())
        .await
        .map_err(ApiError::internal)?
        .map_err(crate::store::StoreError::from)?;
    Ok(())
}

/// Entries, filtered by kind, dataset, scenario, developer, job and time, paged by `after`.
pub(super) async fn ledger_entries(
    State(s): State<AppState>,
    caller: Caller,
    q: Result<Query<crate::ledger::Filter>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Auditor, "read the ledger")?;
    let mut filter = query(q)?;
    filter.limit = Some(filter.limit.unwrap_or(1000).min(10_000));
    let entries = s.ledger.entries(&filter)?;
    durable(&s).await?;
    Ok(Json(
        json!({ "entries": entries, "public_key": s.ledger.public_key_hex() }),
    ))
}

/// Every entry as JSON lines, closed by a signed checkpoint (which is also recorded).
pub(super) async fn ledger_export(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(Role::Auditor, "export the ledger")?;
    let checkpoint = s.ledger.checkpoint(true).map_err(ApiError::internal)?;
    let mut entries = s.ledger.all_entries()?;
    entries.truncate(checkpoint.tree_size as usize);
    let mut out = Vec::new();
    crate::ledger::export(&entries, Some(&checkpoint), &mut out).map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], out).into_response())
}

/// ε spent per scenario, dataset and developer against the caps granted, replayed from the ledger.
pub(super) async fn ledger_totals(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Auditor, "read ledger totals")?;
    let entries = s.ledger.all_entries()?;
    let summary = crate::ledger::replay(&entries).map_err(ApiError::internal)?;
    durable(&s).await?;
    Ok(Json(
        serde_json::to_value(summary).map_err(ApiError::internal)?,
    ))
}

pub(super) async fn ledger_checkpoint(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Auditor, "read ledger checkpoints")?;
    Ok(Json(
        serde_json::to_value(s.ledger.checkpoint(true).map_err(ApiError::internal)?)
            .map_err(ApiError::internal)?,
    ))
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ProofQuery {
    tree_size: Option<u64>,
}

/// The inclusion proof of one entry, under a given tree size or the current signed checkpoint.
pub(super) async fn ledger_proof(
    State(s): State<AppState>,
    caller: Caller,
    Path(seq): Path<String>,
    q: Result<Query<ProofQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    if caller.0.role == Role::Operator {
        return Err(ApiError::forbidden("read ledger proofs"));
    }
    let seq: u64 = seq
        .parse()
        .map_err(|_| ApiError::not_found("ledger entry"))?;
    let q = query(q)?;
    let checkpoint = match q.tree_size {
        Some(_) => None,
        None => Some(s.ledger.checkpoint(false).map_err(ApiError::internal)?),
    };
    let size = q
        .tree_size
        .or(checkpoint.as_ref().map(|c| c.tree_size))
        .unwrap_or(0);
    let entry = s.ledger.entries(&crate::ledger::Filter {
        after: Some(seq.saturating_sub(1)),
        limit: Some(1),
        ..Default::default()
    })?;
    // Developers may prove only their own entries.
    let visible = entry.first().is_some_and(|e| {
        e.body.seq == seq
            && (caller.0.role == Role::Auditor
                || match &e.body.event {
                    crate::ledger::Event::Reserve { developer_id, .. }
                    | crate::ledger::Event::Grant { developer_id, .. } => {
                        *developer_id == caller.0.id
                    }
                    crate::ledger::Event::Commit { job_id, .. } => {
                        crate::jobs::get(&s.store, job_id)
                            .ok()
                            .flatten()
                            .is_some_and(|(j, _)| j.developer_id == caller.0.id)
                    }
                })
    });
    if !visible {
        return Err(ApiError::not_found("ledger entry"));
    }
    let proof = s.ledger.inclusion_proof(seq, size).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_tree_size",
            e.to_string(),
        )
    })?;
    durable(&s).await?;
    Ok(Json(json!({ "proof": proof, "checkpoint": checkpoint })))
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ConsistencyQuery {
    from: u64,
    to: Option<u64>,
}

/// Proof that the tree of size `to` (default: now) extends the tree of size `from`.
pub(super) async fn ledger_consistency(
    State(s): State<AppState>,
    caller: Caller,
    q: Result<Query<ConsistencyQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Auditor, "read ledger proofs")?;
    let q = query(q)?;
    let checkpoint = s.ledger.checkpoint(false).map_err(ApiError::internal)?;
    let to = q.to.unwrap_or(checkpoint.tree_size);
    let proof = s.ledger.consistency_proof(q.from, to).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_tree_size",
            e.to_string(),
        )
    })?;
    durable(&s).await?;
    Ok(Json(
        json!({ "proof": proof, "checkpoint": (to == checkpoint.tree_size).then_some(checkpoint) }),
    ))
}

pub(super) async fn ledger_public_key(State(s): State<AppState>, _caller: Caller) -> Json<Json_> {
    Json(json!({ "algorithm": "ed25519", "public_key": s.ledger.public_key_hex() }))
}

/// Audit records in order, filtered and paged by `after`.
pub(super) async fn audit_log(
    State(s): State<AppState>,
    caller: Caller,
    q: Result<Query<crate::audit::Filter>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Auditor, "read the audit log")?;
    let filter = query(q)?;
    Ok(Json(
        json!({ "records": crate::audit::list(&s.store, &filter)? }),
    ))
}

/// Every audit record as JSON lines, closed by a head signed with the ledger's key.
pub(super) async fn audit_export(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(Role::Auditor, "export the audit log")?;
    let records = crate::audit::all(&s.store)?;
    let head = crate::audit::sign_head(&records, &s.ledger);
    let mut out = Vec::new();
    crate::audit::export(&records, &head, &mut out).map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], out).into_response())
}

/// Registers a dataset and its policy; its file must be in the data directory.
pub(super) async fn create_dataset(
    State(s): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator, "register datasets")?;
    let policy: crate::catalog::DatasetPolicy = parse_json(body)?;
    note_target(&policy.id);
    crate::catalog::create(&s.store, &s.data_dir, &policy)?;
    note(
        "open_attribute",
        format!("{:?}", policy.open_attribute).to_lowercase(),
    );
    let d =
        crate::catalog::get(&s.store, &policy.id)?.ok_or_else(|| ApiError::not_found("dataset"))?;
    Ok((StatusCode::CREATED, to_json(d)?).into_response())
}

/// Changes a dataset's public metadata, data file or open attribute (with a reason).
pub(super) async fn patch_dataset(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Operator, "change datasets")?;
    let patch: crate::catalog::DatasetPatch = parse_json(body)?;
    if let Some(reason) = &patch.reason {
        note("reason", reason.trim());
    }
    let (before, after) = crate::catalog::update(&s.store, &s.data_dir, &id, &patch)?;
    let b = serde_json::to_value(&before).map_err(ApiError::internal)?;
    let a = serde_json::to_value(&after).map_err(ApiError::internal)?;
    for (field, new) in a.as_object().into_iter().flatten() {
        if b.get(field) != Some(new) {
            let old = b.get(field).cloned().unwrap_or(Json_::Null);
            note(&format!("{field}.from"), old.to_string());
            note(&format!("{field}.to"), new.to_string());
        }
    }
    to_json(crate::catalog::get(&s.store, &id)?.ok_or_else(|| ApiError::not_found("dataset"))?)
}

pub(super) async fn file_objection(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Developer, "file objections")?;
    let new: crate::catalog::objection::NewObjection = parse_json(body)?;
    let o = crate::catalog::objection::file(&s.store, &id, &caller.0.id, &new)?;
    note("objection", o.id.clone());
    Ok((StatusCode::CREATED, to_json(o)?).into_response())
}

/// An objection the caller may read: developers their own; operators and auditors all.
fn visible_objection(
    s: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<crate::catalog::objection::Objection, ApiError> {
    crate::catalog::objection::get(&s.store, id)?
        .filter(|o| caller.0.role != Role::Developer || o.developer_id == caller.0.id)
        .ok_or_else(|| ApiError::not_found("objection"))
}

pub(super) async fn list_objections(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Json_>, ApiError> {
    let own = (caller.0.role == Role::Developer).then_some(caller.0.id.as_str());
    Ok(Json(
        json!({ "objections": crate::catalog::objection::list(&s.store, own)? }),
    ))
}

pub(super) async fn get_objection(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    to_json(visible_objection(&s, &caller, &id)?)
}

pub(super) async fn answer_objection(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Operator, "answer objections")?;
    let a: crate::catalog::objection::Answer = parse_json(body)?;
    let o = crate::catalog::objection::answer(&s.store, &id, &caller.0.id, &a)?;
    note("dataset", o.dataset_id.clone());
    to_json(o)
}

/// Cancels the caller's own queued or running job.
pub(super) async fn cancel_job(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Developer, "cancel jobs")?;
    visible_job(&s, &caller, &id)?;
    if !s.runner.cancel(&id)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            "the job has already finished",
        ));
    }
    let (job, _) = visible_job(&s, &caller, &id)?;
    to_json(job)
}

/// This document: the contract, generated from the endpoint table.
pub(super) async fn openapi(State(s): State<AppState>) -> Json<Json_> {
    Json(super::openapi_document(&super::endpoints(&s.config.limits)))
}
