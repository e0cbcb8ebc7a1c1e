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
        let done = s
            .wait_job(&path, &s.developer, &["succeeded", "failed"])
            .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_wait_for_review_and_a_withheld_report_stays_charged() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let (_, sc) = s
        .call(Method::POST, "/v1/scenarios", &s.developer, Some(json!({"purpose": "p", "columns": {"trips": ["district"]}, "modules": [module], "epsilon": 2.0, "per_job_epsilon": 1.0})))
        .await;
    let id = sc["id"].as_str().unwrap().to_string();
    // The operator adds review before release when approving.
    let (status, body) = s
        .call(
            Method::POST,
            &format!("/v1/scenarios/{id}/approve"),
            &s.operator,
            Some(json!({"requires_review": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["requires_review"], true);

    let mut jobs = Vec::new();
    for hour in 0..2 {
        // Two different queries (by their column's name): the same one again would get its earlier release, free.
        let q = json!({"queries": [{"sql": format!("SELECT district, COUNT(*) AS n{hour} FROM trips GROUP BY district"), "epsilon": 0.5}]});
        let (_, job) = s
            .call(
                Method::POST,
                "/v1/jobs",
                &s.developer,
                Some(json!({"scenario_id": id, "module": module, "entry": "main", "params": q})),
            )
            .await;
        let path = format!("/v1/jobs/{}", job["id"].as_str().unwrap());
        let j = s
            .wait_job(&path, &s.developer, &["awaiting_review", "failed"])
            .await;
        assert_eq!(j["status"], "awaiting_review", "{j}");
        let (status, body) = s
            .call(Method::GET, &format!("{path}/result"), &s.developer, None)
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("awaiting_review"))
        );
        jobs.push(path);
    }

    // The operator finds them, reads a report, releases one and withholds the other.
    let (_, waiting) = s
        .call(
            Method::GET,
            "/v1/jobs?status=awaiting_review",
            &s.operator,
            None,
        )
        .await;
    assert_eq!(waiting["jobs"].as_array().unwrap().len(), 2);
    let (status, report) = s
        .call(
            Method::GET,
            &format!("{}/result", jobs[0]),
            &s.operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["releases"].as_array().unwrap().len(), 1);
    let (status, _) = s
        .call(
            Method::POST,
            &format!("{}/release", jobs[0]),
            &s.developer,
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "developers cannot release their own reports"
    );
    let (status, body) = s
        .call(
            Method::POST,
            &format!("{}/release", jobs[0]),
            &s.operator,
            None,
        )
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("succeeded"))
    );
    let (status, body) = s
        .call(
            Method::POST,
            &format!("{}/release", jobs[0]),
            &s.operator,
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_awaiting_review"))
    );
    let (status, body) = s
        .call(
            Method::POST,
            &format!("{}/withhold", jobs[1]),
            &s.operator,
            Some(json!({"reason": "cells too fine for publication"})),
        )
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("withheld"))
    );

    let (status, released) = s
        .call(
            Method::GET,
            &format!("{}/result", jobs[0]),
            &s.developer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(released["releases"].as_array().unwrap().len(), 1);
    let (status, body) = s
        .call(
            Method::GET,
            &format!("{}/result", jobs[1]),
            &s.developer,
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("withheld"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cells too fine")
    );
    // Both releases were charged, the withheld one included.
    assert_eq!(s.reservations().await, 2);
    assert!((first_spent(&s, &id).await - 1.0).abs() < 1e-9);
    let (_, audit) = s.call(Method::GET, "/v1/audit", &s.auditor, None).await;
    let actions: Vec<_> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_string())
        .collect();
    assert!(
        actions.contains(&"release_job".to_string())
            && actions.contains(&"withhold_job".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_or_suspended_principals_are_refused_at_once_queued_jobs_included() {
    let s = Server::start_with(|c| {
        c.limits.concurrent_jobs = 1;
        c.limits.fuel_per_job = 3_000_000_000;
    })
    .await;
    let (_, created) = s
        .call(
            Method::POST,
            "/v1/principals",
            &s.operator,
            Some(json!({"role": "developer", "name": "Dev Two", "licence_id": "LIC-2"})),
        )
        .await;
    let (dev_id, dev) = (
        created["principal"]["id"].as_str().unwrap().to_string(),
        created["token"].as_str().unwrap().to_string(),
    );

    // Suspension and reinstatement; rotation by the principal themself.
    let (status, _) = s
        .call(
            Method::POST,
            &format!("/v1/principals/{dev_id}/suspend"),
            &s.operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        s.call(Method::GET, "/v1/modules", &dev, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    s.call(
        Method::POST,
        &format!("/v1/principals/{dev_id}/reinstate"),
        &s.operator,
        None,
    )
    .await;
    assert_eq!(
        s.call(Method::GET, "/v1/modules", &dev, None).await.0,
        StatusCode::OK
    );
    let (status, _) = s
        .call(
            Method::POST,
            &format!("/v1/principals/{dev_id}/rotate"),
            &s.developer,
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "another developer cannot rotate this token"
    );
    let (status, rotated) = s
        .call(
            Method::POST,
            &format!("/v1/principals/{dev_id}/rotate"),
            &dev,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        s.call(Method::GET, "/v1/modules", &dev, None).await.0,
        StatusCode::UNAUTHORIZED,
        "the old token is dead"
    );
    let dev = rotated["token"].as_str().unwrap().to_string();

    // A job queued behind a spinning one does not run once its developer is revoked.
    let upload = |wasm: Vec<u8>| {
        let (http, base, dev) = (s.http.clone(), s.base.clone(), dev.clone());
        async move {
            let r = http
                .post(format!("{base}/v1/modules"))
                .bearer_auth(dev)
                .body(wasm)
                .send()
                .await
                .unwrap();
            r.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let runner = upload(unseen::examples::QUERY_RUNNER.to_vec()).await;
    let spin = upload(wat_module("", "(loop $l (br $l)) (i32.const 0)")).await;
    let (_, sc) = s
        .call(Method::POST, "/v1/scenarios", &dev, Some(json!({"purpose": "p", "columns": {"trips": ["district"]}, "modules": [runner, spin], "epsilon": 1.0, "per_job_epsilon": 1.0})))
        .await;
    let id = sc["id"].as_str().unwrap().to_string();
    s.call(
        Method::POST,
        &format!("/v1/scenarios/{id}/approve"),
        &s.operator,
        None,
    )
    .await;
    let submit = |module: &str, params: serde_json::Value| {
        s.call(
            Method::POST,
            "/v1/jobs",
            &dev,
            Some(json!({"scenario_id": id, "module": module, "entry": "main", "params": params})),
        )
    };
    let (_, spinning) = submit(&spin, json!({})).await;
    let (_, queued) = submit(&runner, json!({"queries": [{"sql": "SELECT district, COUNT(*) FROM trips GROUP BY district", "epsilon": 0.5}]})).await;
    let (status, _) = s
        .call(
            Method::DELETE,
            &format!("/v1/principals/{dev_id}"),
            &s.operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        s.call(Method::GET, "/v1/modules", &dev, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    for job in [&spinning, &queued] {
        let path = format!("/v1/jobs/{}", job["id"].as_str().unwrap());
        s.wait_job(&path, &s.operator, &["succeeded", "failed"])
            .await;
    }
    let (_, q) = s
        .call(
            Method::GET,
            &format!("/v1/jobs/{}", queued["id"].as_str().unwrap()),
            &s.operator,
            None,
        )
        .await;
    assert_eq!(
        (q["status"].as_str(), q["error"]["code"].as_str()),
        (Some("failed"), Some("principal_inactive")),
        "{q}"
    );
    assert_eq!(s.reservations().await, 0);
}
