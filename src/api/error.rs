//! The one table from failures to HTTP status and stable `code`. Clients get
//! `{"error": {"code", "message"}}`; internal detail goes to the server log, never the body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {what} with that id is visible to you"),
        )
    }
    pub fn forbidden(what: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("your role may not {what}"),
        )
    }
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {detail}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server could not complete the request; nothing was changed",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response();
        response
            .extensions_mut()
            .insert(super::ErrorCode(self.code));
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl From<crate::principal::PrincipalError> for ApiError {
    fn from(e: crate::principal::PrincipalError) -> Self {
        match e {
            crate::principal::PrincipalError::Invalid(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", m)
            }
            crate::principal::PrincipalError::Store(e) => e.into(),
        }
    }
}

impl From<crate::scenario::ScenarioError> for ApiError {
    fn from(e: crate::scenario::ScenarioError) -> Self {
        use crate::scenario::ScenarioError as E;
        match e {
            E::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_scenario", m),
            E::NotFound => ApiError::not_found("scenario"),
            e @ E::NotPending(_) => {
                ApiError::new(StatusCode::CONFLICT, "scenario_not_pending", e.to_string())
            }
            e @ E::NotApproved(_) => {
                ApiError::new(StatusCode::CONFLICT, "scenario_not_approved", e.to_string())
            }
            e @ E::OverReserved { .. } => {
                ApiError::new(StatusCode::CONFLICT, "budget_over_reserved", e.to_string())
            }
            E::Store(e) => e.into(),
            E::Ledger(e) => ApiError::internal(e),
        }
    }
}

impl From<crate::catalog::CatalogError> for ApiError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        use crate::catalog::CatalogError as E;
        match e {
            E::BadPolicy { problem, .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_dataset", problem)
            }
            E::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_dataset", m),
            e @ E::Exists(_) => {
                ApiError::new(StatusCode::CONFLICT, "dataset_exists", e.to_string())
            }
            E::NotFound => ApiError::not_found("dataset"),
            E::Store(e) => e.into(),
        }
    }
}

impl From<crate::catalog::objection::ObjectionError> for ApiError {
    fn from(e: crate::catalog::objection::ObjectionError) -> Self {
        use crate::catalog::objection::ObjectionError as E;
        match e {
            E::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", m),
            E::UnknownDataset => ApiError::not_found("dataset"),
            E::NotFound => ApiError::not_found("objection"),
            e @ E::AlreadyAnswered => {
                ApiError::new(StatusCode::CONFLICT, "already_answered", e.to_string())
            }
            E::Store(e) => e.into(),
        }
    }
}

impl From<crate::sandbox::ModuleError> for ApiError {
    fn from(e: crate::sandbox::ModuleError) -> Self {
        let status = match e {
            crate::sandbox::ModuleError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<crate::jobs::SubmitError> for ApiError {
    fn from(e: crate::jobs::SubmitError) -> Self {
        match e {
            crate::jobs::SubmitError::Refused { code, message } => {
                let status = match code {
                    "scenario_not_found" | "module_not_found" => StatusCode::NOT_FOUND,
                    "scenario_not_approved" | "scenario_not_started" => StatusCode::CONFLICT,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                };
                ApiError::new(status, code, message)
            }
            crate::jobs::SubmitError::Store(e) => e.into(),
        }
    }
}
