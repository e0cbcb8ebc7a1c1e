//! Group keys that are not public (grid cells): the gate chooses which groups to release with
//! OpenDP's Laplace threshold mechanism, spends δ as well as ε, and the ledger caps δ per
//! scenario and per dataset.

use std::collections::HashMap;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::Server;

/// Exact trips per cell, read from the Parquet file without privacy.
fn exact_cells(path: &std::path::Path) -> HashMap<String, i64> {
    use arrow::array::AsArray;
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = HashMap::new();
    for batch in reader {
        let batch = batch.unwrap();
        let cells = arrow::compute::cast(
            batch.column_by_name("cell").unwrap(),
            &arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        for c in cells.as_string::<i32>().iter().flatten() {
            *out.entry(c.to_string()).or_default() += 1;
        }
    }
    out
}

async fn scenario(s: &Server, module: &str, delta: f64) -> String {
    s.approved_application(
        json!({"purpose": "cells", "columns": {"trips": ["cell", "district"]},
        "modules": [module], "epsilon": 10.0, "per_job_epsilon": 10.0, "delta": delta}),
    )
    .await
}

fn code(answer: &Value) -> &str {
    answer["error"]["code"].as_str().unwrap_or("none")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_are_chosen_by_a_noisy_threshold_and_delta_is_capped() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let sc = scenario(&s, &module, 2e-6).await;
    let cells = "SELECT cell, COUNT(*) AS trips FROM trips GROUP BY cell";
    let (answers, report) = s
        .ask(
            &sc,
            &module,
            json!([
                // ε 5 on the count: Laplace scale 0.2, so small and large cells part clearly.
                {"sql": cells, "epsilon": 5.0, "delta": 1e-6},
                {"sql": cells, "epsilon": 0.5},
                // Public keys need no δ, and spend none.
                {"sql": "SELECT district, COUNT(*) AS trips FROM trips GROUP BY district", "epsilon": 0.5, "delta": 1e-6},
                // Then until δ runs out (each spends what OpenDP's map says, at most 1e-6); each a
                // little different, as the same query again would reuse its release.
                {"sql": cells, "epsilon": 0.51, "delta": 1e-6},
                {"sql": cells, "epsilon": 0.52, "delta": 1e-6},
                {"sql": cells, "epsilon": 0.53, "delta": 1e-6},
                {"sql": cells, "epsilon": 0.54, "delta": 1e-6},
                {"sql": cells, "epsilon": 0.55, "delta": 1e-6},
            ]),
        )
        .await;
    let answers = answers.as_array().unwrap();

    let (_, ledger) = s
        .call(Method::GET, "/v1/ledger?kind=reserve", &s.auditor, None)
        .await;
    let entries = ledger["entries"].as_array().unwrap();
    let first = &entries[0]["body"];
    let delta = first["delta"].as_f64().unwrap();
    assert!(delta > 0.0 && delta <= 1e-6, "{first}");
    let mechanism = first["mechanism"].as_str().unwrap();
    let threshold: i64 = mechanism
        .rsplit("≥ ")
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{mechanism}"));

    let exact = exact_cells(&s.data_path());
    let release = &answers[0]["release"];
    let released: HashMap<String, i64> = release["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", answers[0]))
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_i64().unwrap()))
        .collect();
    assert!(!released.is_empty());
    for (cell, n) in &released {
        assert!(
            *n >= threshold,
            "{cell}: {n} under the threshold {threshold}"
        );
        assert!(exact.contains_key(cell), "{cell} is not in the data");
    }
    // With scale 0.2, a cell is released when its count is well above the threshold and never
    // when well below (each miss has probability about e^-25 here).
    for (cell, n) in &exact {
        if *n >= threshold + 5 {
            assert!(
                released.contains_key(cell),
                "{cell} ({n} trips) was left out"
            );
        }
        if *n <= threshold - 5 {
            assert!(
                !released.contains_key(cell),
                "{cell} ({n} trips) was released"
            );
        }
    }
    assert!(
        exact.values().any(|n| *n <= threshold - 5),
        "the data has no small cells to leave out"
    );

    assert_eq!(code(&answers[1]), "key_not_public");
    assert!(
        answers[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("delta")
    );
    assert!(answers[2]["release"].is_object(), "{}", answers[2]);
    assert!(
        entries[1]["body"].get("delta").is_none(),
        "public keys spend no δ: {}",
        entries[1]
    );
    let refused = answers[3..]
        .iter()
        .position(|a| code(a) == "budget_exceeded")
        .unwrap_or_else(|| panic!("δ never ran out: {answers:?}"));
    assert!(
        answers[3..3 + refused]
            .iter()
            .all(|a| a["release"].is_object())
    );
    assert!(
        answers[3 + refused]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("δ")
    );
    let spent: f64 = entries
        .iter()
        .filter_map(|e| e["body"]["delta"].as_f64())
        .sum();
    assert!(spent <= 2e-6 * (1.0 + 1e-9), "{spent}");
    assert_eq!(
        report["delta_spent"].as_f64().unwrap(),
        spent,
        "{}",
        report["delta_spent"]
    );

    // A scenario granted no δ releases no private keys.
    let none = scenario(&s, &module, 0.0).await;
    let (answers, _) = s
        .ask(
            &none,
            &module,
            json!([{"sql": cells, "epsilon": 0.5, "delta": 1e-6}]),
        )
        .await;
    assert_eq!(code(&answers[0]), "budget_exceeded", "{answers}");

    // The ledger still verifies offline, δ included.
    let summary = s.verified_ledger().await;
    assert!(
        (summary.total_delta - spent).abs() < 1e-15,
        "{}",
        summary.total_delta
    );
}
