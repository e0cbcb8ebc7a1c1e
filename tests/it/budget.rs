//! No overspend: a query beyond a cap releases nothing and debits nothing; approvals cannot
//! reserve more than a dataset has.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::Server;

const Q1: &str =
    "SELECT district, COUNT(*) AS trips, SUM(fare) AS fare_sum FROM trips GROUP BY district";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_beyond_the_scenario_budget_releases_and_debits_nothing() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let scenario = s
        .approved_scenario(&module, &["district", "fare"], 1.0, 1.0)
        .await;
    let q = |eps: f64| json!([{"sql": Q1, "epsilon": eps, "bounds": {"fare": [0, 100]}}]);

    let (answers, first) = s.ask(&scenario, &module, q(0.7)).await;
    assert!(answers[0]["release"].is_object(), "{answers}");
    assert_eq!(s.reservations().await, 1);

    let (answers, second) = s.ask(&scenario, &module, q(0.5)).await;
    assert_eq!(answers[0]["error"]["code"], "budget_exceeded", "{answers}");
    assert!(
        answers[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing was released")
    );
    assert_eq!(second["releases"], json!([]));
    assert_eq!(second["epsilon_spent"], 0.0);
    assert_eq!(s.reservations().await, 1, "the refused job must not debit");

    let (_, budget) = s.call(Method::GET, "/v1/budget", &s.developer, None).await;
    let spent = budget["scenarios"][0]["epsilon_spent"].as_f64().unwrap();
    assert_eq!(spent, first["epsilon_spent"].as_f64().unwrap());
    let left = budget["scenarios"][0]["epsilon_left"].as_f64().unwrap();
    assert!((left - 0.3).abs() < 1e-6, "{left}");

    // Spending the rest exhausts the scenario: it says so, and takes no more jobs.
    let (answers, _) = s.ask(&scenario, &module, q(0.3)).await;
    assert!(answers[0]["release"].is_object(), "{answers}");
    let (_, sc) = s
        .call(
            Method::GET,
            &format!("/v1/scenarios/{scenario}"),
            &s.developer,
            None,
        )
        .await;
    assert_eq!(sc["status"], "exhausted", "{sc}");
    let (status, body) = s
        .call(Method::POST, "/v1/jobs", &s.developer, Some(json!({"scenario_id": scenario, "module": module, "entry": "main", "params": {"queries": q(0.1)}})))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("scenario_not_approved")),
        "{body}"
    );
    assert_eq!(s.reservations().await, 2);
    let (_, audit) = s
        .call(
            Method::GET,
            &format!("/v1/audit?target={scenario}&action=scenario_exhausted"),
            &s.auditor,
            None,
        )
        .await;
    assert_eq!(audit["records"].as_array().unwrap().len(), 1, "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_job_cap_stops_the_query_that_would_cross_it() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let scenario = s
        .approved_scenario(&module, &["district", "fare"], 5.0, 0.6)
        .await;
    let one =
        json!({"sql": "SELECT district, COUNT(*) FROM trips GROUP BY district", "epsilon": 0.4});
    let other =
        json!({"sql": "SELECT district, COUNT(fare) FROM trips GROUP BY district", "epsilon": 0.4});
    let (answers, report) = s.ask(&scenario, &module, json!([one, other])).await;
    assert!(answers[0]["release"].is_object(), "{answers}");
    assert_eq!(answers[1]["error"]["code"], "budget_exceeded", "{answers}");
    assert!(
        answers[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("job level")
    );
    assert_eq!(report["releases"].as_array().unwrap().len(), 1);
    assert_eq!(s.reservations().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_cannot_reserve_more_than_the_dataset_has() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    // The trips policy gives the dataset ε 20 in total.
    s.approved_scenario(&module, &["district"], 15.0, 1.0).await;
    let (status, body) = s
        .call(
            Method::POST,
            "/v1/scenarios",
            &s.developer,
            Some(json!({"purpose": "second", "columns": {"trips": ["district"]}, "modules": [module], "epsilon": 10.0, "per_job_epsilon": 1.0})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = body["id"].as_str().unwrap();
    let (status, body) = s
        .call(
            Method::POST,
            &format!("/v1/scenarios/{id}/approve"),
            &s.operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "budget_over_reserved");
    // Approving with a tighter cap that fits is allowed.
    let (status, body) = s
        .call(
            Method::POST,
            &format!("/v1/scenarios/{id}/approve"),
            &s.operator,
            Some(json!({"epsilon": 5.0})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["epsilon_cap"], 5.0);

    // An unapproved scenario runs nothing.
    let (_, pending) = s
        .call(
            Method::POST,
            "/v1/scenarios",
            &s.developer,
            Some(json!({"purpose": "third", "columns": {"trips": ["district"]}, "modules": [module], "epsilon": 0.5, "per_job_epsilon": 0.5})),
        )
        .await;
    let (status, body) = s
        .call(Method::POST, "/v1/jobs", &s.developer, Some(json!({"scenario_id": pending["id"], "module": module, "entry": "main", "params": {"queries": []}})))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "scenario_not_approved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_query_again_in_a_scenario_gets_its_release_back_for_nothing() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let scenario = s
        .approved_scenario(&module, &["district", "fare"], 4.0, 2.0)
        .await;
    let q = json!({"sql": "SELECT district, COUNT(*) AS n FROM trips GROUP BY district", "epsilon": 0.5});
    let (first, report) = s.ask(&scenario, &module, json!([q])).await;
    assert_eq!(report["epsilon_spent"], 0.5);
    let (again, report) = s.ask(&scenario, &module, json!([q])).await;
    let (a, b) = (&first[0]["release"], &again[0]["release"]);
    assert_eq!(a["rows"], b["rows"], "the same noisy values");
    assert_eq!(a["ledger_entry"], b["ledger_entry"], "the same debit");
    assert_eq!(b["reused"], true);
    assert_eq!(report["epsilon_spent"], 0.0, "{report}");
    assert_eq!(s.reservations().await, 1);

    // Any other option, another scenario, or a new version of the data file is a new query.
    let bounded = json!({"sql": "SELECT district, COUNT(*) AS n FROM trips GROUP BY district", "epsilon": 0.5, "bounds": {"fare": [0, 50]}});
    let (answers, _) = s.ask(&scenario, &module, json!([bounded])).await;
    assert_eq!(answers[0]["release"]["reused"], Value::Null);
    assert_eq!(s.reservations().await, 2);
    let other = s
        .approved_scenario(&module, &["district", "fare"], 4.0, 2.0)
        .await;
    let (answers, _) = s.ask(&other, &module, json!([q])).await;
    assert_eq!(answers[0]["release"]["reused"], Value::Null);
    assert_eq!(s.reservations().await, 3);
    let file = std::fs::File::options()
        .write(true)
        .open(s.data_path())
        .unwrap();
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(file);
    let (answers, _) = s.ask(&scenario, &module, json!([q])).await;
    assert_eq!(answers[0]["release"]["reused"], Value::Null, "{answers}");
    assert_eq!(s.reservations().await, 4);
}
