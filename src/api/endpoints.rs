//! The endpoint table: every route of the v1 contract with its handler, the roles that may
//! call it, its body and query types and whether it is audited. The router, the OpenAPI
//! document and the audit layer's action names are built from this one list.

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::routing::{MethodFilter, MethodRouter, on};
use schemars::{JsonSchema, Schema, SchemaGenerator};

use super::AppState;
use super::handlers as h;
use crate::config::Limits;
use crate::principal::Role::{self, Auditor as A, Developer as D, Operator as O};

/// A request body as documented.
#[derive(Clone, Copy)]
pub enum Body {
    None,
    Json {
        schema: fn(&mut SchemaGenerator) -> Schema,
        required: bool,
    },
    Wasm,
}

pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    /// Stable name: the OpenAPI operationId and the audit log's action.
    pub operation: &'static str,
    pub summary: &'static str,
    /// Who may call it (subject to ownership); empty: anyone, without a token.
    pub roles: &'static [Role],
    pub body: Body,
    pub query: Option<fn(&mut SchemaGenerator) -> Schema>,
    pub success: StatusCode,
    /// Recorded in the audit log: every state-changing request, and exports.
    pub audited: bool,
    pub handler: MethodRouter<AppState>,
}

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

fn ep<H, T>(
    method: Method,
    path: &'static str,
    operation: &'static str,
    roles: &'static [Role],
    summary: &'static str,
    handler: H,
) -> Endpoint
where
    H: Handler<T, AppState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a routable method");
    Endpoint {
        audited: method != Method::GET,
        method,
        path,
        operation,
        summary,
        roles,
        body: Body::None,
        query: None,
        success: StatusCode::OK,
        handler: on(filter, handler),
    }
}

impl Endpoint {
    fn json<B: JsonSchema>(mut self) -> Self {
        self.body = Body::Json {
            schema: schema::<B>,
            required: true,
        };
        self
    }
    fn optional_json<B: JsonSchema>(mut self) -> Self {
        self.body = Body::Json {
            schema: schema::<B>,
            required: false,
        };
        self
    }
    fn query<Q: JsonSchema>(mut self) -> Self {
        self.query = Some(schema::<Q>);
        self
    }
    fn answers(mut self, status: StatusCode) -> Self {
        self.success = status;
        self
    }
    fn audited(mut self) -> Self {
        self.audited = true;
        self
    }
}

const ALL: &[Role] = &[D, O, A];
const ANYONE: &[Role] = &[];

/// Every endpoint, in the order the OpenAPI document lists them.
pub fn endpoints(limits: &Limits) -> Vec<Endpoint> {
    use Method as M;
    let mut upload = ep(
        M::POST,
        "/v1/modules",
        "upload_module",
        &[D],
        "Upload a wasm module (application/wasm); answers its SHA-256 id and entry points.",
        h::upload_module,
    )
    .answers(StatusCode::CREATED);
    upload.body = Body::Wasm;
    upload.handler = upload
        .handler
        .layer(DefaultBodyLimit::max(limits.max_module_bytes));
    vec![
        ep(M::GET, "/v1/health", "health", ANYONE, "Liveness and version.", h::health),
        ep(M::GET, "/v1/openapi.json", "openapi", ANYONE, "This document.", h::openapi),
        ep(M::POST, "/v1/principals", "create_principal", &[O], "Register a developer (name, organisation, licence id), operator or auditor; the token is shown once.", h::create_principal).json::<crate::principal::NewPrincipal>().answers(StatusCode::CREATED),
        ep(M::DELETE, "/v1/principals/{id}", "revoke_principal", &[O], "Revoke a principal: refused at once, queued jobs included.", h::revoke_principal).answers(StatusCode::NO_CONTENT),
        ep(M::POST, "/v1/principals/{id}/suspend", "suspend_principal", &[O], "Suspend a principal until reinstated.", h::suspend_principal).answers(StatusCode::NO_CONTENT),
        ep(M::POST, "/v1/principals/{id}/reinstate", "reinstate_principal", &[O], "Reinstate a suspended principal.", h::reinstate_principal).answers(StatusCode::NO_CONTENT),
        ep(M::POST, "/v1/principals/{id}/rotate", "rotate_token", ALL, "A new token (operators: anyone's; others: their own); the old one stops working.", h::rotate_token),
        ep(M::GET, "/v1/datasets", "list_datasets", ALL, "Catalogue entries: metadata, schema, public bounds and keys, open attribute, source, version date, budget — never rows.", h::list_datasets),
        ep(M::POST, "/v1/datasets", "create_dataset", &[O], "Register a dataset and its policy (its Parquet file must be in the data directory).", h::create_dataset).json::<crate::catalog::DatasetPolicy>().answers(StatusCode::CREATED),
        ep(M::GET, "/v1/datasets/{id}", "get_dataset", ALL, "One catalogue entry.", h::get_dataset),
        ep(M::PATCH, "/v1/datasets/{id}", "patch_dataset", &[O], "Change public metadata, the data file, or the open attribute (with a reason).", h::patch_dataset).json::<crate::catalog::DatasetPatch>(),
        ep(M::POST, "/v1/datasets/{id}/objections", "file_objection", &[D], "Object to a dataset (a suspected error).", h::file_objection).json::<crate::catalog::objection::NewObjection>().answers(StatusCode::CREATED),
        ep(M::GET, "/v1/objections", "list_objections", ALL, "Objections: a developer's own, or all.", h::list_objections),
        ep(M::GET, "/v1/objections/{id}", "get_objection", ALL, "One objection and its answer.", h::get_objection),
        ep(M::POST, "/v1/objections/{id}/answer", "answer_objection", &[O], "Answer an objection.", h::answer_objection).json::<crate::catalog::objection::Answer>(),
        upload,
        ep(M::GET, "/v1/modules", "list_modules", &[D], "The caller's modules.", h::list_modules),
        ep(M::POST, "/v1/scenarios", "apply_scenario", &[D], "Apply for a scenario: purpose, datasets and columns, modules, ε, per-job cap, minimum group size, validity window, review.", h::apply_scenario).json::<crate::scenario::Application>().answers(StatusCode::CREATED),
        ep(M::GET, "/v1/scenarios", "list_scenarios", ALL, "Scenarios: a developer's own, or all.", h::list_scenarios),
        ep(M::GET, "/v1/scenarios/{id}", "get_scenario", ALL, "One scenario and its decision.", h::get_scenario),
        ep(M::POST, "/v1/scenarios/{id}/approve", "approve_scenario", &[O], "Approve, optionally tightening any limit; reserves the budget from each dataset's total.", h::approve_scenario).optional_json::<crate::scenario::Approval>(),
        ep(M::POST, "/v1/scenarios/{id}/reject", "reject_scenario", &[O], "Reject, with a reason.", h::reject_scenario).json::<h::Reason>(),
        ep(M::POST, "/v1/scenarios/{id}/suspend", "suspend_scenario", &[O], "Suspend, with a reason: no job may start or spend; what was spent stays spent.", h::suspend_scenario).json::<h::Reason>(),
        ep(M::POST, "/v1/jobs", "submit_job", &[D], "Submit a job: scenario, module, entry, params. With `\"dry_run\": true` the module runs at once with every query only priced (ε, δ, each column's noise and 95 % interval) and the answer is 200 with the estimates: no data read, nothing queued or spent.", h::submit_job).json::<crate::jobs::SubmitJob>().answers(StatusCode::ACCEPTED),
        ep(M::GET, "/v1/jobs", "list_jobs", &[D, O], "Jobs, newest first: a developer's own, or (operators) all; `?status=awaiting_review`.", h::list_jobs).query::<h::JobsQuery>(),
        ep(M::GET, "/v1/jobs/{id}", "get_job", &[D, O], "Poll a job; `?wait=N` answers as soon as it finishes (long poll, at most 30 s).", h::get_job).query::<h::WaitQuery>(),
        ep(M::DELETE, "/v1/jobs/{id}", "cancel_job", &[D], "Cancel a queued or running job; budget already spent stays spent.", h::cancel_job),
        ep(M::GET, "/v1/jobs/{id}/result", "get_result", &[D, O], "The report: released tables, ε spent, accuracy, citations, ledger evidence.", h::get_result),
        ep(M::POST, "/v1/jobs/{id}/release", "release_job", &[O], "Release a report held for review.", h::release_job),
        ep(M::POST, "/v1/jobs/{id}/withhold", "withhold_job", &[O], "Withhold a report held for review, with a reason; its budget stays spent.", h::withhold_job).json::<h::Reason>(),
        ep(M::GET, "/v1/budget", "budget", ALL, "ε spent, reserved and left per scenario (and, for operators and auditors, per dataset).", h::budget),
        ep(M::GET, "/v1/ledger", "ledger_entries", &[A], "Ledger entries, filtered and paged.", h::ledger_entries).query::<crate::ledger::Filter>(),
        ep(M::GET, "/v1/ledger/export", "ledger_export", &[A], "Every ledger entry as JSON lines, closed by a signed checkpoint.", h::ledger_export).audited(),
        ep(M::GET, "/v1/ledger/totals", "ledger_totals", &[A], "ε per scenario, dataset and developer against the grants, replayed from the ledger.", h::ledger_totals),
        ep(M::GET, "/v1/ledger/checkpoint", "ledger_checkpoint", &[A], "A signed checkpoint of the ledger's Merkle tree.", h::ledger_checkpoint),
        ep(M::GET, "/v1/ledger/proof/{seq}", "ledger_proof", &[D, A], "Inclusion proof of one entry (developers: their own).", h::ledger_proof).query::<h::ProofQuery>(),
        ep(M::GET, "/v1/ledger/consistency", "ledger_consistency", &[A], "Proof that a later tree extends an earlier one.", h::ledger_consistency).query::<h::ConsistencyQuery>(),
        ep(M::GET, "/v1/ledger/public-key", "ledger_public_key", ALL, "The ledger's Ed25519 public key.", h::ledger_public_key),
        ep(M::GET, "/v1/audit", "audit_log", &[A], "Audit records in order, filtered and paged.", h::audit_log).query::<crate::audit::Filter>(),
        ep(M::GET, "/v1/audit/export", "audit_export", &[A], "Every audit record as JSON lines, closed by a signed head.", h::audit_export).audited(),
    ]
}
