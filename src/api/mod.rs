//! The HTTP API (DESIGN.md, "The HTTP contract"). Every handler authenticates, checks role and
//! ownership, and answers JSON; bad input is a 4xx with a stable code and changes nothing.

mod error;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{Value as Json_, json};

pub use error::ApiError;

use crate::config::Config;
use crate::gate::Gate;
use crate::jobs::{JobStatus, Runner, SubmitJob};
use crate::ledger::Ledger;
use crate::principal::{NewPrincipal, Principal, Role};
use crate::sandbox::Sandbox;
use crate::store::Store;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub runner: Runner,
    pub sandbox: Arc<Sandbox>,
    pub ledger: Arc<Ledger>,
    pub data_dir: PathBuf,
    pub config: Arc<Config>,
}

impl AppState {
    /// Opens the data directory (creating it), the store, the ledger key, the sandbox and the
    /// gate; seeds the catalogue from the policies directory; fails interrupted jobs.
    pub fn open(config: Config) -> anyhow::Result<Self> {
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(data_dir.join("modules"))?;
        let store = Store::open(&data_dir)?;
        let ledger = Arc::new(Ledger::open(store.clone(), &data_dir)?);
        let closed = ledger.close_interrupted()?;
        if closed > 0 {
            tracing::warn!(
                "{closed} reservation(s) left open by the last shutdown are closed as interrupted; they stay charged"
            );
        }
        if let Some(dir) = &config.policies_dir {
            crate::catalog::load_policies_dir(&store, &data_dir, dir)?;
        }
        let sandbox = Arc::new(Sandbox::new(config.limits.clone())?);
        let gate = Gate::new(
            store.clone(),
            ledger.clone(),
            data_dir.clone(),
            config.limits.clone(),
        );
        let runner = Runner::new(
            store.clone(),
            gate,
            ledger.clone(),
            sandbox.clone(),
            data_dir.join("modules"),
        );
        let interrupted = runner.fail_interrupted()?;
        if interrupted > 0 {
            tracing::warn!(
                "{interrupted} job(s) were interrupted by the last shutdown and are marked failed"
            );
        }
        Ok(AppState {
            store,
            runner,
            sandbox,
            ledger,
            data_dir,
            config: Arc::new(config),
        })
    }
}

/// The router, with every route of the v1 contract built so far.
pub fn router(state: AppState) -> Router {
    let json_limit = state.config.limits.max_request_body_bytes;
    let module_limit = state.config.limits.max_module_bytes;
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/principals", post(create_principal))
        .route("/v1/principals/{id}", delete(revoke_principal))
        .route("/v1/principals/{id}/suspend", post(suspend_principal))
        .route("/v1/principals/{id}/reinstate", post(reinstate_principal))
        .route("/v1/principals/{id}/rotate", post(rotate_token))
        .route("/v1/datasets", get(list_datasets))
        .route("/v1/datasets/{id}", get(get_dataset))
        .route(
            "/v1/modules",
            post(upload_module)
                .layer(DefaultBodyLimit::max(module_limit))
                .get(list_modules),
        )
        .route("/v1/scenarios", post(apply_scenario).get(list_scenarios))
        .route("/v1/scenarios/{id}", get(get_scenario))
        .route("/v1/scenarios/{id}/approve", post(approve_scenario))
        .route("/v1/scenarios/{id}/reject", post(reject_scenario))
        .route("/v1/scenarios/{id}/suspend", post(suspend_scenario))
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route("/v1/jobs/{id}/release", post(release_job))
        .route("/v1/jobs/{id}/withhold", post(withhold_job))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/result", get(get_result))
        .route("/v1/budget", get(budget))
        .route("/v1/ledger", get(ledger_entries))
        .route("/v1/ledger/export", get(ledger_export))
        .route("/v1/ledger/totals", get(ledger_totals))
        .route("/v1/ledger/checkpoint", get(ledger_checkpoint))
        .route("/v1/ledger/proof/{seq}", get(ledger_proof))
        .route("/v1/ledger/consistency", get(ledger_consistency))
        .route("/v1/ledger/public-key", get(ledger_public_key))
        .route("/v1/audit", get(audit_log))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "that method is not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(json_limit))
        .with_state(state)
}

/// Binds `config.listen` and serves until the returned handle is dropped or aborted.
pub async fn start(config: Config) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listen = config.listen;
    let state = AppState::open(config)?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = router(state);
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("server stopped: {e}");
        }
    });
    Ok((addr, handle))
}

/// The caller, authenticated by bearer token.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let unauthenticated = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "send a valid token as `Authorization: Bearer <token>`",
            )
        };
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(unauthenticated)?;
        let token = header.strip_prefix("Bearer ").ok_or_else(unauthenticated)?;
        crate::principal::authenticate(&state.store, token.trim())?
            .map(Caller)
            .ok_or_else(unauthenticated)
    }
}

impl Caller {
    fn require(&self, role: Role, what: &str) -> Result<(), ApiError> {
        if self.0.role == role {
            Ok(())
        } else {
            Err(ApiError::forbidden(what))
        }
    }
}

/// Parses a JSON body: malformed JSON is 400, a well-formed body of the wrong shape is 422,
/// an oversize body is 413.
fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is over the size limit",
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "the request body could not be read",
            )
        }
    })?;
    let value: Json_ = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not JSON: {e}"),
        )
    })?;
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!("the body does not fit this endpoint: {e}"),
        )
    })
}

fn audit(state: &AppState, who: &Principal, action: &str, target: Option<&str>, outcome: &str) {
    if let Err(e) = crate::audit::record(&state.store, Some(&who.id), action, target, outcome) {
        tracing::error!("audit record failed: {e}");
    }
}

async fn health() -> Json<Json_> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

async fn create_principal(
    State(s): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator, "register principals")?;
    let new: NewPrincipal = parse_json(body)?;
    let (principal, token) = crate::principal::create(&s.store, &new)?;
    audit(
        &s,
        &caller.0,
        "principal_created",
        Some(&principal.id),
        "ok",
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({ "principal": principal, "token": token.0 })),
    )
        .into_response())
}

async fn revoke_principal(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator, "revoke principals")?;
    if !crate::principal::revoke(&s.store, &id)? {
        return Err(ApiError::not_found("principal"));
    }
    audit(&s, &caller.0, "principal_revoked", Some(&id), "ok");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn suspend_principal(
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
    audit(&s, &caller.0, "principal_suspended", Some(&id), "ok");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn reinstate_principal(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator, "reinstate principals")?;
    if !crate::principal::set_suspended(&s.store, &id, false)? {
        return Err(ApiError::not_found("principal"));
    }
    audit(&s, &caller.0, "principal_reinstated", Some(&id), "ok");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A new token for a principal (operators for anyone; everyone for themself).
async fn rotate_token(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    if caller.0.role != Role::Operator && caller.0.id != id {
        return Err(ApiError::forbidden("rotate another principal's token"));
    }
    let token =
        crate::principal::rotate(&s.store, &id)?.ok_or_else(|| ApiError::not_found("principal"))?;
    audit(&s, &caller.0, "token_rotated", Some(&id), "ok");
    Ok(Json(json!({ "token": token.0 })))
}

async fn list_datasets(
    State(s): State<AppState>,
    _caller: Caller,
) -> Result<Json<Json_>, ApiError> {
    Ok(Json(json!({ "datasets": crate::catalog::list(&s.store)? })))
}

async fn get_dataset(
    State(s): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let d = crate::catalog::get(&s.store, &id)?.ok_or_else(|| ApiError::not_found("dataset"))?;
    Ok(Json(serde_json::to_value(d).map_err(ApiError::internal)?))
}

async fn upload_module(
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
            audit(&s, &caller.0, "module_refused", None, e.code());
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
        .map_err(|e| ApiError::internal(e))?;
    audit(
        &s,
        &caller.0,
        "module_uploaded",
        Some(&validated.hash),
        "ok",
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": validated.hash, "entries": validated.entries, "size": bytes.len() })),
    )
        .into_response())
}

async fn list_modules(State(s): State<AppState>, caller: Caller) -> Result<Json<Json_>, ApiError> {
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

async fn apply_scenario(
    State(s): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Developer, "apply for scenarios")?;
    let app = parse_json(body)?;
    let scenario = crate::scenario::apply(&s.store, &caller.0.id, app)?;
    audit(&s, &caller.0, "scenario_applied", Some(&scenario.id), "ok");
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

async fn list_scenarios(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Json_>, ApiError> {
    let own = (caller.0.role == Role::Developer).then_some(caller.0.id.as_str());
    Ok(Json(
        json!({ "scenarios": crate::scenario::list(&s.store, own)? }),
    ))
}

async fn get_scenario(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    Ok(Json(
        serde_json::to_value(visible_scenario(&s, &caller, &id)?).map_err(ApiError::internal)?,
    ))
}

async fn approve_scenario(
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
    let result = crate::scenario::approve(&s.store, &s.ledger, &id, &caller.0.id, &approval);
    audit(
        &s,
        &caller.0,
        "scenario_approved",
        Some(&id),
        if result.is_ok() { "ok" } else { "refused" },
    );
    Ok(Json(
        serde_json::to_value(result?).map_err(ApiError::internal)?,
    ))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Reason {
    reason: String,
}

async fn reject_scenario(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Operator, "reject scenarios")?;
    let Reason { reason } = parse_json(body)?;
    let result = crate::scenario::reject(&s.store, &id, &caller.0.id, &reason);
    audit(
        &s,
        &caller.0,
        "scenario_rejected",
        Some(&id),
        if result.is_ok() { "ok" } else { "refused" },
    );
    Ok(Json(
        serde_json::to_value(result?).map_err(ApiError::internal)?,
    ))
}

async fn suspend_scenario(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Operator, "suspend scenarios")?;
    let Reason { reason } = parse_json(body)?;
    let result = crate::scenario::suspend(&s.store, &s.ledger, &id, &caller.0.id, &reason);
    audit(
        &s,
        &caller.0,
        "scenario_suspended",
        Some(&id),
        if result.is_ok() { "ok" } else { "refused" },
    );
    Ok(Json(
        serde_json::to_value(result?).map_err(ApiError::internal)?,
    ))
}

async fn submit_job(
    State(s): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Developer, "submit jobs")?;
    let req: SubmitJob = parse_json(body)?;
    let job = s.runner.submit(&caller.0.id, req)?;
    audit(&s, &caller.0, "job_submitted", Some(&job.id), "ok");
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

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    status: Option<String>,
}

/// Jobs, newest first: a developer's own, or (operators) everyone's, e.g. `?status=awaiting_review`.
async fn list_jobs(
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

async fn get_job(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let (job, _) = visible_job(&s, &caller, &id)?;
    Ok(Json(serde_json::to_value(job).map_err(ApiError::internal)?))
}

async fn get_result(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
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

async fn release_job(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Operator, "release reports")?;
    visible_job(&s, &caller, &id)?;
    if !crate::jobs::decide_review(&s.store, &id, true, None)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_awaiting_review",
            "the job is not awaiting review",
        ));
    }
    audit(&s, &caller.0, "report_released", Some(&id), "ok");
    let (job, _) = visible_job(&s, &caller, &id)?;
    Ok(Json(serde_json::to_value(job).map_err(ApiError::internal)?))
}

async fn withhold_job(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Operator, "withhold reports")?;
    let Reason { reason } = parse_json(body)?;
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 4000 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "a reason of 1 to 4000 characters is required",
        ));
    }
    visible_job(&s, &caller, &id)?;
    if !crate::jobs::decide_review(&s.store, &id, false, Some(reason))? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_awaiting_review",
            "the job is not awaiting review",
        ));
    }
    audit(&s, &caller.0, "report_withheld", Some(&id), "ok");
    let (job, _) = visible_job(&s, &caller, &id)?;
    Ok(Json(serde_json::to_value(job).map_err(ApiError::internal)?))
}

async fn budget(State(s): State<AppState>, caller: Caller) -> Result<Json<Json_>, ApiError> {
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

fn query<T: DeserializeOwned>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!(
                "the query string does not fit this endpoint: {}",
                e.body_text()
            ),
        )
    })
}

/// Entries, filtered by kind, dataset, scenario, developer, job and time, paged by `after`.
async fn ledger_entries(
    State(s): State<AppState>,
    caller: Caller,
    q: Result<Query<crate::ledger::Filter>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Auditor, "read the ledger")?;
    let mut filter = query(q)?;
    filter.limit = Some(filter.limit.unwrap_or(1000).min(10_000));
    let entries = s.ledger.entries(&filter)?;
    Ok(Json(
        json!({ "entries": entries, "public_key": s.ledger.public_key_hex() }),
    ))
}

/// Every entry as JSON lines, closed by a signed checkpoint (which is also recorded).
async fn ledger_export(State(s): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Role::Auditor, "export the ledger")?;
    let checkpoint = s.ledger.checkpoint(true).map_err(ApiError::internal)?;
    let mut entries = s.ledger.all_entries()?;
    entries.truncate(checkpoint.tree_size as usize);
    let mut out = Vec::new();
    crate::ledger::export(&entries, Some(&checkpoint), &mut out).map_err(ApiError::internal)?;
    audit(&s, &caller.0, "ledger_exported", None, "ok");
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], out).into_response())
}

/// ε spent per scenario, dataset and developer against the caps granted, replayed from the ledger.
async fn ledger_totals(State(s): State<AppState>, caller: Caller) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Auditor, "read ledger totals")?;
    let entries = s.ledger.all_entries()?;
    let summary = crate::ledger::replay(&entries).map_err(|e| ApiError::internal(e))?;
    Ok(Json(
        serde_json::to_value(summary).map_err(ApiError::internal)?,
    ))
}

async fn ledger_checkpoint(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Auditor, "read ledger checkpoints")?;
    Ok(Json(
        serde_json::to_value(s.ledger.checkpoint(true).map_err(ApiError::internal)?)
            .map_err(ApiError::internal)?,
    ))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProofQuery {
    tree_size: Option<u64>,
}

/// The inclusion proof of one entry, under a given tree size or the current signed checkpoint.
async fn ledger_proof(
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
    Ok(Json(json!({ "proof": proof, "checkpoint": checkpoint })))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsistencyQuery {
    from: u64,
    to: Option<u64>,
}

/// Proof that the tree of size `to` (default: now) extends the tree of size `from`.
async fn ledger_consistency(
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
    Ok(Json(
        json!({ "proof": proof, "checkpoint": (to == checkpoint.tree_size).then_some(checkpoint) }),
    ))
}

async fn ledger_public_key(State(s): State<AppState>, _caller: Caller) -> Json<Json_> {
    Json(json!({ "algorithm": "ed25519", "public_key": s.ledger.public_key_hex() }))
}

async fn audit_log(State(s): State<AppState>, caller: Caller) -> Result<Json<Json_>, ApiError> {
    caller.require(Role::Auditor, "read the audit log")?;
    Ok(Json(
        json!({ "records": crate::audit::list(&s.store, 1000)? }),
    ))
}
