//! The role matrix: every endpoint of the OpenAPI document, called by each role (a developer
//! on their own objects, another developer on them, an operator, an auditor), with no token
//! and with a bad token. Each cell must match the table below; the table must list exactly the
//! operations the server documents, and the roles it documents must be the roles let in.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::Server;

/// A: let in (any answer but 401/403/404); F: 403; N: 404 (another's object is invisible);
/// U: 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    A,
    F,
    N,
    U,
}
use Cell::*;

/// operation → [developer (owner), other developer, operator, auditor, no token, bad token]
const MATRIX: &[(&str, [Cell; 6])] = &[
    ("health", [A, A, A, A, A, A]),
    ("openapi", [A, A, A, A, A, A]),
    ("create_principal", [F, F, A, F, U, U]),
    ("revoke_principal", [F, F, A, F, U, U]),
    ("suspend_principal", [F, F, A, F, U, U]),
    ("reinstate_principal", [F, F, A, F, U, U]),
    ("rotate_token", [F, F, A, F, U, U]),
    ("list_datasets", [A, A, A, A, U, U]),
    ("create_dataset", [F, F, A, F, U, U]),
    ("get_dataset", [A, A, A, A, U, U]),
    ("patch_dataset", [F, F, A, F, U, U]),
    ("file_objection", [A, A, F, F, U, U]),
    ("list_objections", [A, A, A, A, U, U]),
    ("get_objection", [A, N, A, A, U, U]),
    ("answer_objection", [F, F, A, F, U, U]),
    ("upload_module", [A, A, F, F, U, U]),
    ("list_modules", [A, A, F, F, U, U]),
    ("apply_scenario", [A, A, F, F, U, U]),
    ("list_scenarios", [A, A, A, A, U, U]),
    ("get_scenario", [A, N, A, A, U, U]),
    ("approve_scenario", [F, F, A, F, U, U]),
    ("reject_scenario", [F, F, A, F, U, U]),
    ("suspend_scenario", [F, F, A, F, U, U]),
    ("submit_job", [A, N, F, F, U, U]),
    ("list_jobs", [A, A, A, F, U, U]),
    ("get_job", [A, N, A, F, U, U]),
    ("cancel_job", [A, N, F, F, U, U]),
    ("get_result", [A, N, A, F, U, U]),
    ("release_job", [F, F, A, F, U, U]),
    ("withhold_job", [F, F, A, F, U, U]),
    ("budget", [A, A, A, A, U, U]),
    ("ledger_entries", [F, F, F, A, U, U]),
    ("ledger_export", [F, F, F, A, U, U]),
    ("ledger_totals", [F, F, F, A, U, U]),
    ("ledger_checkpoint", [F, F, F, A, U, U]),
    ("ledger_proof", [A, N, F, A, U, U]),
    ("ledger_consistency", [F, F, F, A, U, U]),
    ("ledger_public_key", [A, A, A, A, U, U]),
    ("audit_log", [F, F, F, A, U, U]),
    ("audit_export", [F, F, F, A, U, U]),
];

struct Fixtures {
    module: String,
    scenario: String,
    job: String,
    objection: String,
    datasets: std::cell::Cell<u32>,
}

enum Body {
    None,
    Json(Value),
    Wasm,
}

impl Server {
    async fn call_as(&self, method: Method, path: &str, token: &str, body: Body) -> StatusCode {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        req = match body {
            Body::None => req,
            Body::Json(v) => req.json(&v),
            Body::Wasm => req
                .header("content-type", "application/wasm")
                .body(unseen::examples::QUERY_RUNNER.to_vec()),
        };
        req.send().await.unwrap().status()
    }

    async fn scenario_as(&self, token: &str, module: &str, approve: bool) -> String {
        let (status, body) = self
            .call(Method::POST, "/v1/scenarios", token, Some(json!({"purpose": "matrix", "columns": {"trips": ["district"]}, "modules": [module], "epsilon": 0.5, "per_job_epsilon": 0.5})))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        if approve {
            let (status, body) = self
                .call(
                    Method::POST,
                    &format!("/v1/scenarios/{id}/approve"),
                    &self.operator,
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        id
    }

    async fn throwaway_principal(&self) -> String {
        let (_, body) = self
            .call(
                Method::POST,
                "/v1/principals",
                &self.operator,
                Some(json!({"role": "developer", "name": "T", "licence_id": "L"})),
            )
            .await;
        body["principal"]["id"].as_str().unwrap().to_string()
    }

    async fn objection(&self) -> String {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/datasets/trips/objections",
                &self.developer,
                Some(json!({"text": "fares look doubled in March"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    async fn job(&self, f: &Fixtures) -> String {
        let (status, body) = self
            .call(Method::POST, "/v1/jobs", &self.developer, Some(json!({"scenario_id": f.scenario, "module": f.module, "entry": "main", "params": {"queries": []}})))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// The request for one cell: fresh objects where the call would change them.
    async fn request_for(&self, op: &str, f: &Fixtures) -> (String, Body) {
        let dev_module = &f.module;
        match op {
            "health" => ("/v1/health".into(), Body::None),
            "openapi" => ("/v1/openapi.json".into(), Body::None),
            "create_principal" => (
                "/v1/principals".into(),
                Body::Json(json!({"role": "auditor", "name": "New"})),
            ),
            "revoke_principal" => (
                format!("/v1/principals/{}", self.throwaway_principal().await),
                Body::None,
            ),
            "suspend_principal" | "reinstate_principal" | "rotate_token" => {
                let verb = match op {
                    "suspend_principal" => "suspend",
                    "reinstate_principal" => "reinstate",
                    _ => "rotate",
                };
                (
                    format!("/v1/principals/{}/{verb}", self.throwaway_principal().await),
                    Body::None,
                )
            }
            "list_datasets" => ("/v1/datasets".into(), Body::None),
            "create_dataset" => {
                let n = f.datasets.get() + 1;
                f.datasets.set(n);
                let (_, trips) = self
                    .call(Method::GET, "/v1/datasets/trips", &self.operator, None)
                    .await;
                let mut policy = trips.clone();
                for k in ["epsilon_reserved", "epsilon_spent", "epsilon_unreserved"] {
                    policy.as_object_mut().unwrap().remove(k);
                }
                policy["id"] = json!(format!("trips_copy_{n}"));
                policy["table"] = json!(format!("trips_copy_{n}"));
                ("/v1/datasets".into(), Body::Json(policy))
            }
            "get_dataset" => ("/v1/datasets/trips".into(), Body::None),
            "patch_dataset" => (
                "/v1/datasets/trips".into(),
                Body::Json(json!({"description": "edited"})),
            ),
            "file_objection" => (
                "/v1/datasets/trips/objections".into(),
                Body::Json(json!({"text": "a suspected error"})),
            ),
            "list_objections" => ("/v1/objections".into(), Body::None),
            "get_objection" => (format!("/v1/objections/{}", f.objection), Body::None),
            "answer_objection" => (
                format!("/v1/objections/{}/answer", self.objection().await),
                Body::Json(json!({"answer": "checked; the source confirms the values"})),
            ),
            "upload_module" => ("/v1/modules".into(), Body::Wasm),
            "list_modules" => ("/v1/modules".into(), Body::None),
            "apply_scenario" => (
                "/v1/scenarios".into(),
                Body::Json(
                    json!({"purpose": "p", "columns": {"trips": ["district"]}, "modules": [dev_module], "epsilon": 0.1, "per_job_epsilon": 0.1}),
                ),
            ),
            "list_scenarios" => ("/v1/scenarios".into(), Body::None),
            "get_scenario" => (format!("/v1/scenarios/{}", f.scenario), Body::None),
            "approve_scenario" => (
                format!(
                    "/v1/scenarios/{}/approve",
                    self.scenario_as(&self.developer, dev_module, false).await
                ),
                Body::Json(json!({})),
            ),
            "reject_scenario" => (
                format!(
                    "/v1/scenarios/{}/reject",
                    self.scenario_as(&self.developer, dev_module, false).await
                ),
                Body::Json(json!({"reason": "no"})),
            ),
            "suspend_scenario" => (
                format!(
                    "/v1/scenarios/{}/suspend",
                    self.scenario_as(&self.developer, dev_module, true).await
                ),
                Body::Json(json!({"reason": "paused"})),
            ),
            "submit_job" => (
                "/v1/jobs".into(),
                Body::Json(
                    json!({"scenario_id": f.scenario, "module": f.module, "entry": "main", "params": {"queries": []}}),
                ),
            ),
            "list_jobs" => ("/v1/jobs".into(), Body::None),
            "get_job" => (format!("/v1/jobs/{}", f.job), Body::None),
            "cancel_job" => (format!("/v1/jobs/{}", self.job(f).await), Body::None),
            "get_result" => (format!("/v1/jobs/{}/result", f.job), Body::None),
            "release_job" => (format!("/v1/jobs/{}/release", f.job), Body::None),
            "withhold_job" => (
                format!("/v1/jobs/{}/withhold", f.job),
                Body::Json(json!({"reason": "r"})),
            ),
            "budget" => ("/v1/budget".into(), Body::None),
            "ledger_entries" => ("/v1/ledger".into(), Body::None),
            "ledger_export" => ("/v1/ledger/export".into(), Body::None),
            "ledger_totals" => ("/v1/ledger/totals".into(), Body::None),
            "ledger_checkpoint" => ("/v1/ledger/checkpoint".into(), Body::None),
            // Entry 1 is the grant of the owner's first approved scenario.
            "ledger_proof" => ("/v1/ledger/proof/1".into(), Body::None),
            "ledger_consistency" => ("/v1/ledger/consistency?from=1".into(), Body::None),
            "ledger_public_key" => ("/v1/ledger/public-key".into(), Body::None),
            "audit_log" => ("/v1/audit".into(), Body::None),
            "audit_export" => ("/v1/audit/export".into(), Body::None),
            other => panic!("the matrix has no request for {other}"),
        }
    }
}

fn classify(status: StatusCode) -> Cell {
    match status {
        StatusCode::UNAUTHORIZED => U,
        StatusCode::FORBIDDEN => F,
        StatusCode::NOT_FOUND => N,
        _ => A,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_endpoint_matches_the_table() {
    let s = Server::start().await;
    let other = s.add_principal("developer", "Dev Two").await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let scenario = s.scenario_as(&s.developer, &module, true).await;
    let mut f = Fixtures {
        module,
        scenario,
        job: String::new(),
        objection: String::new(),
        datasets: std::cell::Cell::new(0),
    };
    f.job = s.job(&f).await;
    s.wait_job(&format!("/v1/jobs/{}", f.job), &s.developer, &["succeeded"])
        .await;
    f.objection = s.objection().await;

    // The table lists exactly the documented operations, and the documented roles are the
    // roles the table lets in.
    let (_, doc) = s.call(Method::GET, "/v1/openapi.json", "", None).await;
    let mut documented = BTreeSet::new();
    let mut methods = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let name = op["operationId"].as_str().unwrap().to_string();
            let roles: BTreeSet<String> = op["x-roles"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_string())
                .collect();
            let row = MATRIX
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("{method} {path} ({name}) is not in the matrix"));
            let admitted = |i: usize| matches!(row.1[i], A | N);
            let mut expected = BTreeSet::new();
            if row.1[4] != A {
                for (i, role) in [(0, "developer"), (2, "operator"), (3, "auditor")] {
                    if admitted(i) {
                        expected.insert(role.to_string());
                    }
                }
            }
            if name == "rotate_token" {
                // Every principal may rotate their own token (checked below); the matrix
                // calls it on someone else's.
                expected.extend(["developer", "auditor"].map(String::from));
            }
            assert_eq!(roles, expected, "documented roles of {name}");
            methods.push((method.to_uppercase(), name.clone()));
            documented.insert(name);
        }
    }
    let tabled: BTreeSet<String> = MATRIX.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(documented, tabled);

    let bad = "0".repeat(64);
    let mut differences = Vec::new();
    for (method, name) in &methods {
        let row = MATRIX.iter().find(|(n, _)| n == name).unwrap().1;
        let callers = [
            s.developer.as_str(),
            other.as_str(),
            s.operator.as_str(),
            s.auditor.as_str(),
            "",
            bad.as_str(),
        ];
        for (i, token) in callers.iter().enumerate() {
            let (path, body) = s.request_for(name, &f).await;
            let status = s
                .call_as(
                    Method::from_bytes(method.as_bytes()).unwrap(),
                    &path,
                    token,
                    body,
                )
                .await;
            if classify(status) != row[i] {
                differences.push(format!(
                    "{method} {path} as {}: {status}, expected {:?}",
                    [
                        "owner",
                        "other developer",
                        "operator",
                        "auditor",
                        "no token",
                        "bad token"
                    ][i],
                    row[i]
                ));
            }
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));

    // Anyone may rotate their own token; the old one stops working at once.
    let (_, created) = s
        .call(
            Method::POST,
            "/v1/principals",
            &s.operator,
            Some(json!({"role": "auditor", "name": "Self"})),
        )
        .await;
    let (id, old) = (
        created["principal"]["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    let (status, rotated) = s
        .call(
            Method::POST,
            &format!("/v1/principals/{id}/rotate"),
            old,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new = rotated["token"].as_str().unwrap();
    assert_eq!(
        s.call(Method::GET, "/v1/audit", old, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.call(Method::GET, "/v1/audit", new, None).await.0,
        StatusCode::OK
    );

    // Listings are let in for another developer, but show nothing of the owner's.
    for path in [
        "/v1/scenarios",
        "/v1/jobs",
        "/v1/modules",
        "/v1/objections",
        "/v1/budget",
    ] {
        let (status, body) = s.call(Method::GET, path, &other, None).await;
        assert_eq!(status, StatusCode::OK);
        let text = body.to_string();
        for id in [&f.scenario, &f.job, &f.objection] {
            assert!(
                !text.contains(id.as_str()),
                "{path} shows {id} to another developer"
            );
        }
        if path == "/v1/modules" {
            // Only the upload it made itself in the matrix (the same bytes, so the same id:
            // ownership is per developer, not per hash).
            assert_eq!(body["modules"].as_array().unwrap().len(), 1, "{body}");
        }
    }
}
