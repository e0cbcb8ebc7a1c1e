//! Cost and accuracy before spending: a dry-run job (`"dry_run": true` on `POST /v1/jobs`) and
//! a dry-run query inside a real job answer what a query would cost and how noisy each column
//! would be, refuse what the gate would refuse, and read no data and spend nothing. The
//! estimate matches what the real run then spends.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::Server;

fn queries() -> Value {
    json!([
        {"sql": "SELECT district, COUNT(*) AS trips, SUM(fare) AS fare_sum FROM trips GROUP BY district", "epsilon": 1.0, "bounds": {"fare": [0, 100]}},
        {"sql": "SELECT district, SUM(hour) AS h FROM trips GROUP BY district", "epsilon": 1.0},
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_price_queries_without_reading_or_spending_and_match_the_real_run() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let scenario = s
        .approved_scenario(&module, &["district", "hour", "fare"], 5.0, 5.0)
        .await;

    let (status, dry) = s
        .call(
            Method::POST,
            "/v1/jobs",
            &s.developer,
            Some(
                json!({"scenario_id": scenario, "module": module, "entry": "main",
                "params": {"queries": queries()}, "dry_run": true}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert_eq!(dry["dry_run"], true);
    let estimate = &dry["answers"][0]["estimate"];
    assert_eq!(estimate["dry_run"], true, "{dry}");
    assert_eq!(estimate["rows"], json!([]), "no data in an estimate");
    assert_eq!(estimate["ledger_entry"], 0);
    // ε 1 over two measurements: counts at scale 2, fare sums (bounded by 100) at scale 200.
    let scale = |release: &Value, column: usize| {
        release["columns"][column]["noise_scale"].as_f64().unwrap()
    };
    assert!((scale(estimate, 1) - 2.0).abs() < 1e-6, "{estimate}");
    assert!((scale(estimate, 2) - 200.0).abs() < 1e-3, "{estimate}");
    let half_width = estimate["columns"][1]["ci95_half_width"].as_f64().unwrap();
    assert!((half_width - 2.0 * 20f64.ln()).abs() < 1e-6);
    assert_eq!(dry["answers"][1]["error"]["code"], "unbounded_column");
    let epsilon = dry["epsilon"].as_f64().unwrap();
    assert!(epsilon > 0.999 && epsilon <= 1.0, "{dry}");
    // The module saw the estimates too (its output is its own post-processing).
    assert_eq!(dry["output"]["answers"][0]["release"]["dry_run"], true);

    // Nothing was spent, queued or recorded in the ledger.
    assert_eq!(s.reservations().await, 0);
    let (_, jobs) = s.call(Method::GET, "/v1/jobs", &s.developer, None).await;
    assert_eq!(jobs["jobs"], json!([]), "{jobs}");

    // The real run spends what the estimate said, with the noise it said.
    let (answers, report) = s.ask(&scenario, &module, queries()).await;
    let release = &answers[0]["release"];
    assert_eq!(release["dry_run"], Value::Null);
    assert_eq!(release["rows"].as_array().unwrap().len(), 16);
    assert_eq!(release["epsilon"].as_f64().unwrap(), epsilon);
    for column in [1, 2] {
        assert_eq!(scale(release, column), scale(estimate, column));
    }
    assert_eq!(report["epsilon_spent"].as_f64().unwrap(), epsilon);

    // A module may ask for an estimate itself (the host call with "dry_run": true) inside a
    // real job, and then decide: the estimate spends nothing.
    let before = s.reservations().await;
    let (answers, report) = s
        .ask(
            &scenario,
            &module,
            json!([{"sql": "SELECT district, COUNT(*) AS n FROM trips GROUP BY district", "epsilon": 0.5, "dry_run": true}]),
        )
        .await;
    assert_eq!(answers[0]["release"]["dry_run"], true, "{answers}");
    assert_eq!(report["epsilon_spent"], 0.0);
    assert_eq!(s.reservations().await, before);

    // Dry runs are checked like submissions: another developer's scenario is not found.
    let other = s.add_principal("developer", "Dev Two").await;
    let (status, body) = s
        .call(
            Method::POST,
            "/v1/jobs",
            &other,
            Some(
                json!({"scenario_id": scenario, "module": module, "entry": "main",
                "params": {"queries": queries()}, "dry_run": true}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}
