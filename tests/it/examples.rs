//! Every example module in `examples/` is run by a test here; a new example without one fails.

use serde_json::json;

use crate::support::Server;

/// The examples these tests run. Adding a crate under examples/ without adding it here (and a
/// test) fails `every_example_has_a_test`.
const TESTED: &[&str] = &["district_stats", "fare_per_km", "median", "query_runner"];

#[test]
fn every_example_has_a_test() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("Cargo.toml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(found, TESTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_runner_returns_each_release_or_refusal() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let scenario = s
        .approved_scenario(&module, &["district", "hour"], 2.0, 2.0)
        .await;
    let (answers, report) = s
        .ask(
            &scenario,
            &module,
            json!([
                {"sql": "SELECT hour, COUNT(*) AS n FROM trips GROUP BY hour", "epsilon": 0.5},
                {"sql": "SELECT hour, COUNT(*) AS n FROM trips GROUP BY hour", "epsilon": -1.0}
            ]),
        )
        .await;
    assert_eq!(
        answers[0]["release"]["rows"].as_array().map(Vec::len),
        Some(24),
        "{answers}"
    );
    assert_eq!(answers[1]["error"]["code"], "invalid_epsilon");
    assert_eq!(report["releases"].as_array().unwrap().len(), 1);
}

// district_stats is run end to end in end_to_end.rs; fare_per_km (Q5) and median (Q6) in
// guest_functions.rs.
