//! The operator's decisions: rejection with a reason, and suspension that stops queued and
//! running work at once while what was spent stays spent — recorded in the ledger.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::{Server, wat_module};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_needs_a_reason_and_the_developer_reads_it() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let (_, sc) = s
        .call(Method::POST, "/v1/scenarios", &s.developer, Some(json!({"purpose": "p", "columns": {"trips": ["district"]}, "modules": [module], "epsilon": 1.0, "per_job_epsilon": 1.0})))
        .await;
    let id = sc["id"].as_str().unwrap();
    let reject = format!("/v1/scenarios/{id}/reject");
    let (status, body) = s
        .call(Method::POST, &reject, &s.operator, Some(json!({})))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request"))
    );
    let (status, body) = s
        .call(
            Method::POST,
            &reject,
            &s.operator,
            Some(json!({"reason": "   "})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_scenario"))
    );
    let (status, body) = s
        .call(
            Method::POST,
            &reject,
            &s.developer,
            Some(json!({"reason": "mine"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    let (status, body) = s
        .call(
            Method::POST,
            &reject,
            &s.operator,
            Some(json!({"reason": "the purpose does not justify per-district fares"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, seen) = s
        .call(
            Method::GET,
            &format!("/v1/scenarios/{id}"),
            &s.developer,
            None,
        )
        .await;
    assert_eq!(seen["status"], "rejected");
    assert_eq!(
        seen["reason"],
        "the purpose does not justify per-district fares"
    );

    let (status, body) = s
        .call(
            Method::POST,
            &format!("/v1/scenarios/{id}/approve"),
            &s.operator,
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("scenario_not_pending"))
    );
    let (status, body) = s.call(Method::POST, "/v1/jobs", &s.developer, Some(json!({"scenario_id": id, "module": module, "entry": "main", "params": {"queries": []}}))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("scenario_not_approved"))
    );
    assert_eq!(s.reservations().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_stops_queued_jobs_and_freezes_the_grant_in_the_ledger() {
    // One job slot, and a spinning module to hold it while another job waits in the queue.
    let s = Server::start_with(|c| {
        c.limits.concurrent_jobs = 1;
        c.limits.fuel_per_job = 3_000_000_000;
    })
    .await;
    let runner = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let spin = s
        .upload_ok(&wat_module("", "(loop $l (br $l)) (i32.const 0)"))
        .await;
    let (_, sc) = s
        .call(Method::POST, "/v1/scenarios", &s.developer, Some(json!({"purpose": "p", "columns": {"trips": ["district"]}, "modules": [runner, spin], "epsilon": 2.0, "per_job_epsilon": 1.0})))
        .await;
    let id = sc["id"].as_str().unwrap().to_string();
    s.call(
        Method::POST,
        &format!("/v1/scenarios/{id}/approve"),
        &s.operator,
        None,
    )
    .await;
    let q = json!({"queries": [{"sql": "SELECT district, COUNT(*) FROM trips GROUP BY district", "epsilon": 0.5}]});
    let first = s.run_job(&id, &runner, "main", q.clone()).await;
    assert_eq!(first["status"], "succeeded");

    let submit = |module: &str, params: serde_json::Value| {
        s.call(
            Method::POST,
            "/v1/jobs",
            &s.developer,
            Some(json!({"scenario_id": id, "module": module, "entry": "main", "params": params})),
        )
    };
    let (_, spinning) = submit(&spin, json!({})).await;
    let (_, queued) = submit(&runner, q.clone()).await;
    let (status, body) = s
        .call(
            Method::POST,
            &format!("/v1/scenarios/{id}/suspend"),
            &s.operator,
            Some(json!({"reason": "licence under review"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "suspended");

    for job in [&spinning, &queued] {
        let path = format!("/v1/jobs/{}", job["id"].as_str().unwrap());
        let done = loop {
            let (_, j) = s.call(Method::GET, &path, &s.developer, None).await;
            if matches!(j["status"].as_str(), Some("succeeded" | "failed")) {
                break j;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert_eq!(done["status"], "failed", "{done}");
    }
    let (_, q_job) = s
        .call(
            Method::GET,
            &format!("/v1/jobs/{}", queued["id"].as_str().unwrap()),
            &s.developer,
            None,
        )
        .await;
    assert_eq!(
        q_job["error"]["code"], "scenario_not_approved",
        "the queued job must not run: {q_job}"
    );
    let (status, body) = submit(&runner, q).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("scenario_not_approved"))
    );

    // The ledger froze the grant at what was spent; the first job's ε stays spent.
    let (_, grants) = s
        .call(
            Method::GET,
            &format!("/v1/ledger?kind=grant&scenario={id}"),
            &s.auditor,
            None,
        )
        .await;
    let grants = grants["entries"].as_array().unwrap();
    assert_eq!(grants.len(), 2);
    let spent = first_spent(&s, &id).await;
    assert!(spent > 0.49);
    assert_eq!(grants[1]["body"]["epsilon"].as_f64().unwrap(), spent);
    assert_eq!(grants[1]["body"]["per_job_epsilon"], 0.0);
    assert_eq!(s.reservations().await, 1);
    let (_, totals) = s
        .call(Method::GET, "/v1/ledger/totals", &s.auditor, None)
        .await;
    assert_eq!(
        totals["per_scenario"][format!("{id}/trips")]["cap"]
            .as_f64()
            .unwrap(),
        spent
    );
}

async fn first_spent(s: &Server, scenario: &str) -> f64 {
    let (_, budget) = s.call(Method::GET, "/v1/budget", &s.developer, None).await;
    budget["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["scenario_id"] == scenario)
        .unwrap()["epsilon_spent"]
        .as_f64()
        .unwrap()
}
