//! The HTTP API (DESIGN.md, "The HTTP contract"). Every handler authenticates, checks role and
//! ownership, and answers JSON; bad input is a 4xx with a stable code and changes nothing.
//!
//! One table ([`endpoints`]) lists every route with its handler, roles and body type: the
//! router, the OpenAPI document at `/v1/openapi.json` and the audit layer's action names are
//! all built from it. The audit layer records every state-changing request (and every export)
//! — who, what, target, outcome, request id — whatever the handler did or refused.

mod endpoints;
mod error;
mod handlers;
mod openapi;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::Value as Json_;

pub use endpoints::{Endpoint, endpoints};
pub use error::ApiError;
pub use openapi::document as openapi_document;

use crate::config::Config;
use crate::gate::Gate;
use crate::jobs::Runner;
use crate::ledger::Ledger;
use crate::principal::{Principal, Role};
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

/// The router: every endpoint of [`endpoints`], the audit layer, and JSON 404/405 answers.
pub fn router(state: AppState) -> Router {
    let json_limit = state.config.limits.max_request_body_bytes;
    let table = endpoints(&state.config.limits);
    let actions: Actions = table
        .iter()
        .map(|e| ((e.method.clone(), e.path), (e.operation, e.audited)))
        .collect();
    let mut router = Router::new();
    for e in table {
        router = router.route(e.path, e.handler);
    }
    let audit = AuditLayer {
        appender: crate::audit::GroupAppender::new(state.store.clone()),
        actions: Arc::new(actions),
    };
    router
        .route_layer(axum::middleware::from_fn_with_state(audit, audit_layer))
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

/// What one request's audit record gathers while the handler runs.
struct RequestContext {
    id: String,
    inner: Mutex<ContextInner>,
}

#[derive(Default)]
struct ContextInner {
    principal: Option<(String, Role)>,
    target: Option<String>,
    detail: BTreeMap<String, String>,
}

tokio::task_local! {
    static REQUEST: Arc<RequestContext>;
}

fn with_context(f: impl FnOnce(&mut ContextInner)) {
    let _ = REQUEST.try_with(|c| f(&mut c.inner.lock().unwrap_or_else(|p| p.into_inner())));
}

/// Adds a detail (a reason, a decision, a changed value) to this request's audit record.
pub(crate) fn note(key: &str, value: impl Into<String>) {
    let value = value.into();
    with_context(|c| {
        c.detail.insert(key.into(), value);
    });
}

/// Names the object a request created, for its audit record.
pub(crate) fn note_target(id: &str) {
    with_context(|c| c.target = Some(id.into()));
}

/// (method, route template) → (operation name, audited?).
type Actions = HashMap<(Method, &'static str), (&'static str, bool)>;

#[derive(Clone)]
struct AuditLayer {
    appender: crate::audit::GroupAppender,
    actions: Arc<Actions>,
}

/// The stable error code of a refusal, carried from [`ApiError`] to the audit layer.
#[derive(Clone, Copy)]
pub(crate) struct ErrorCode(pub &'static str);

fn request_id(req: &Request) -> String {
    // A caller's own id is kept if it is short and plain, so that records can be correlated
    // with the caller's logs; otherwise (and by default) a fresh random one.
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| crate::new_id("req"))
}

async fn audit_layer(State(layer): State<AuditLayer>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let path = req.uri().path().to_owned();
    let context = Arc::new(RequestContext {
        id: request_id(&req),
        inner: Mutex::default(),
    });
    let mut response = REQUEST.scope(context.clone(), next.run(req)).await;
    if let Ok(v) = HeaderValue::from_str(&context.id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let Some(&(action, audited)) = layer.actions.get(&(method, template.as_str())) else {
        return response;
    };
    if !audited {
        return response;
    }
    let inner = std::mem::take(&mut *context.inner.lock().unwrap_or_else(|p| p.into_inner()));
    // The target: the id in the path, else what the handler created.
    let from_path = template
        .split('/')
        .zip(path.split('/'))
        .find(|(t, _)| t.starts_with('{'))
        .map(|(_, p)| p.to_owned());
    let status = response.status();
    let outcome = if status.is_success() {
        "ok".to_string()
    } else {
        response
            .extensions()
            .get::<ErrorCode>()
            .map_or_else(|| status.as_u16().to_string(), |c| c.0.to_string())
    };
    let record = crate::audit::NewRecord {
        request_id: Some(context.id.clone()),
        principal_id: inner.principal.as_ref().map(|(id, _)| id.clone()),
        role: inner
            .principal
            .as_ref()
            .map(|(_, r)| r.as_str().to_string()),
        action: action.to_string(),
        target: from_path.or(inner.target),
        outcome,
        status: Some(status.as_u16()),
        detail: inner.detail,
    };
    // Written before the response leaves: a caller who saw an answer can find its record.
    // Records of requests answered at once share a commit.
    let appender = layer.appender.clone();
    match tokio::task::spawn_blocking(move || appender.append(record)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!("could not append the audit record for {action}: {e}"),
        Err(e) => tracing::error!("audit task failed for {action}: {e}"),
    }
    response
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
        let principal = crate::principal::authenticate(&state.store, token.trim())?
            .ok_or_else(unauthenticated)?;
        with_context(|c| c.principal = Some((principal.id.clone(), principal.role)));
        Ok(Caller(principal))
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

fn to_json(v: impl serde::Serialize) -> Result<Json<Json_>, ApiError> {
    Ok(Json(serde_json::to_value(v).map_err(ApiError::internal)?))
}
