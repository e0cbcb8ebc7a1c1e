//! Person-level privacy units: the gate keeps at most k rows of each person, picked at random
//! inside the DataFusion plan, before any aggregate; the noise is calibrated to k rows.
//!
//! The bounding itself is checked exactly on an `unconditional` copy of the data (released
//! without noise, so every count shows what the plan kept); the calibration on a `conditional`
//! copy of the same file.

use std::sync::Arc;

use arrow::array::{Int64Array, StringArray};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::Server;

async fn register(s: &Server, id: &str, open: &str) {
    let policy = json!({
        "id": id, "title": "People", "source": "test", "open_attribute": open,
        "version_date": "2026-11-01", "path": "data/people.parquet", "table": id,
        "privacy_unit": "person_id", "max_rows_per_unit": 5,
        "total_epsilon": 100.0, "min_group_size": 0,
        "columns": {
            "person_id": {"type": "int64"},
            "district": {"type": "string", "public_keys": ["D01", "D02"]},
            "fare": {"type": "float64", "bounds": [0.0, 1000.0]},
        },
    });
    let (status, body) = s
        .call(Method::POST, "/v1/datasets", &s.operator, Some(policy))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// A scenario over `district` and `fare` only: the guest never names person_id.
async fn scenario(s: &Server, module: &str, dataset: &str) -> String {
    s.approved_application(
        json!({"purpose": "units", "columns": {dataset: ["district", "fare"]},
        "modules": [module], "epsilon": 50.0, "per_job_epsilon": 50.0}),
    )
    .await
}

/// (count, sum) of D01 and D02 from one exact release of `SELECT district, COUNT(*), SUM(fare)`.
fn per_district(answer: &Value) -> [(i64, f64); 2] {
    let rows = answer["release"]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"));
    let get = |d: &str| {
        let r = rows.iter().find(|r| r[0] == d).unwrap();
        (r[1].as_i64().unwrap(), r[2].as_f64().unwrap())
    };
    [get("D01"), get("D02")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_person_contributes_at_most_k_rows_picked_at_random() {
    let s = Server::start().await;
    crate::support::write_people(&s.dir.path().join("data/people.parquet"));
    register(&s, "people", "unconditional").await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let sc = scenario(&s, &module, "people").await;

    let q1 = "SELECT district, COUNT(*) AS n, SUM(fare) AS s FROM people GROUP BY district";
    let runs = 40;
    // Different ε each (released exactly here, so ε changes nothing): the same query again would
    // get its earlier release back.
    let mut queries: Vec<Value> = (0..runs)
        .map(|i| json!({"sql": q1, "epsilon": 0.5 + i as f64 * 1e-3}))
        .collect();
    queries.extend([
        // Tighter per query.
        json!({"sql": q1, "epsilon": 0.5, "max_rows_per_unit": 2}),
        // Filters run before the bound: person 1 keeps 5 of their trips over 100.
        json!({"sql": "SELECT district, COUNT(*) AS n, SUM(fare) AS s FROM people WHERE fare > 100 GROUP BY district", "epsilon": 0.5}),
        // Renaming another column to person_id in a subquery bounds nothing differently: the
        // bound sits on the scan, below every guest projection.
        json!({"sql": "SELECT district, COUNT(*) AS n, SUM(fare) AS s FROM (SELECT fare AS person_id, district, fare FROM people) t GROUP BY district", "epsilon": 0.5}),
        // Raising the bound is refused.
        json!({"sql": q1, "epsilon": 0.5, "max_rows_per_unit": 6}),
        // Distinct persons per district.
        json!({"sql": "SELECT district, COUNT(DISTINCT person_id) AS people, COUNT(*) AS n FROM people GROUP BY district", "epsilon": 0.5}),
    ]);
    let (answers, _) = s.ask(&sc, &module, json!(queries)).await;
    let answers = answers.as_array().unwrap();

    let mut sums = Vec::new();
    for a in &answers[..runs] {
        let [(n1, s1), (n2, s2)] = per_district(a);
        assert_eq!((n1, n2), (5, 100), "{a}");
        assert_eq!(s2, 1000.0);
        sums.push(s1);
    }
    // Not "the first 5" (sum 15 every time): the kept trips change from query to query …
    let mut distinct = sums.clone();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    assert!(distinct.len() >= runs / 2, "{sums:?}");
    // … and are unbiased: 5 trips drawn from fares 1..=200 average 100.5 (the mean of 40
    // draws has a standard deviation of about 4; 25 is over 5 of them).
    let mean = sums.iter().sum::<f64>() / (5.0 * runs as f64);
    assert!(
        (mean - 100.5).abs() < 25.0,
        "mean kept fare {mean}: {sums:?}"
    );

    assert_eq!(per_district(&answers[runs])[0].0, 2);
    let [(n1, s1), _] = per_district(&answers[runs + 1]);
    assert_eq!(n1, 5);
    assert!(s1 > 500.0, "every kept fare is over 100: {s1}");
    assert_eq!(per_district(&answers[runs + 2])[0].0, 5);
    let refused = &answers[runs + 3]["error"];
    assert_eq!(refused["code"], "invalid_row_bound", "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("1 to 5"));
    let [(people1, n1), (people2, _)] = per_district(&answers[runs + 4]);
    assert_eq!((people1, people2), (1, 100), "{}", answers[runs + 4]);
    assert_eq!(n1, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_is_calibrated_to_k_rows_and_the_ledger_says_so() {
    let s = Server::start().await;
    crate::support::write_people(&s.dir.path().join("data/people.parquet"));
    register(&s, "people_dp", "conditional").await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let sc = scenario(&s, &module, "people_dp").await;
    let (answers, _) = s
        .ask(
            &sc,
            &module,
            json!([
                {"sql": "SELECT district, COUNT(*) AS n FROM people_dp GROUP BY district", "epsilon": 1.0},
                {"sql": "SELECT district, COUNT(*) AS n FROM people_dp GROUP BY district", "epsilon": 1.0, "max_rows_per_unit": 1},
            ]),
        )
        .await;
    // One person moves a count by up to k rows: Laplace scale k / ε.
    for (answer, k) in answers.as_array().unwrap().iter().zip([5.0, 1.0]) {
        let scale = answer["release"]["columns"][1]["noise_scale"]
            .as_f64()
            .unwrap_or_else(|| panic!("{answer}"));
        assert!((scale - k).abs() < 1e-6, "k = {k}: scale {scale}");
    }
    let (_, ledger) = s
        .call(Method::GET, "/v1/ledger?kind=reserve", &s.auditor, None)
        .await;
    let mechanisms: Vec<&str> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["body"]["mechanism"].as_str().unwrap())
        .collect();
    assert!(
        mechanisms[0].ends_with("≤5 rows per person_id")
            && mechanisms[1].ends_with("≤1 rows per person_id"),
        "{mechanisms:?}"
    );
}

/// Person 1 takes 200 trips spread over 20 cells (10 each); persons 2–101 one trip each in
/// cell "zz". Cells have no public keys: they are chosen by partition selection.
fn write_cells(path: &std::path::Path) {
    let mut person = vec![1i64; 200];
    let mut cell: Vec<String> = (0..200).map(|i| format!("c{:02}", i % 20)).collect();
    for p in 2..=101 {
        person.push(p);
        cell.push("zz".into());
    }
    crate::support::write_parquet(
        path,
        vec![
            ("person_id", Arc::new(Int64Array::from(person))),
            ("cell", Arc::new(StringArray::from(cell))),
        ],
    );
}

/// At most g groups per person: the exact (unconditional) release shows person 1 in at most
/// g cells, k rows in all; on conditional data partition selection pays for g groups instead
/// of k (a lower threshold), and the ledger says so. Asking for g where it changes nothing
/// is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_person_reaches_at_most_g_groups_and_partition_selection_pays_for_g() {
    let s = Server::start().await;
    write_cells(&s.dir.path().join("data/cells.parquet"));
    for (id, open) in [
        ("cells_exact", "unconditional"),
        ("cells_dp", "conditional"),
    ] {
        let policy = json!({
            "id": id, "title": "Cells", "source": "test", "open_attribute": open,
            "version_date": "2026-11-01", "path": "data/cells.parquet", "table": id,
            "privacy_unit": "person_id", "max_rows_per_unit": 5, "max_groups_per_unit": 3,
            "total_epsilon": 100.0, "total_delta": 1e-4, "min_group_size": 0,
            "columns": {"person_id": {"type": "int64"}, "cell": {"type": "string"}},
        });
        let (status, body) = s
            .call(Method::POST, "/v1/datasets", &s.operator, Some(policy))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let sc = s
        .approved_application(json!({"purpose": "groups",
            "columns": {"cells_exact": ["cell"], "cells_dp": ["cell"]},
            "modules": [module], "epsilon": 50.0, "per_job_epsilon": 50.0, "delta": 1e-4}))
        .await;
    let count = |table: &str, g: Option<u64>| {
        let mut q = json!({"sql": format!("SELECT cell, COUNT(*) AS n FROM {table} GROUP BY cell"),
            "epsilon": 1.0, "delta": 1e-6});
        if let Some(g) = g {
            q["max_groups_per_unit"] = json!(g);
        }
        q
    };
    let (answers, _) = s
        .ask(
            &sc,
            &module,
            json!([
                count("cells_exact", Some(2)),
                count("cells_exact", Some(1)),
                count("cells_dp", None),
                count("cells_dp", Some(1)),
                count("cells_dp", Some(5)),
                count("cells_dp", Some(4)),
            ]),
        )
        .await;
    for (answer, g) in [(&answers[0], 2), (&answers[1], 1)] {
        let rows = answer["release"]["rows"]
            .as_array()
            .unwrap_or_else(|| panic!("{answer}"));
        let mine: Vec<i64> = rows
            .iter()
            .filter(|r| r[0] != "zz")
            .map(|r| r[1].as_i64().unwrap())
            .filter(|n| *n > 0)
            .collect();
        assert!(mine.len() <= g, "g = {g}: person 1 in {mine:?}");
        assert_eq!(mine.iter().sum::<i64>(), 5, "k rows of the chosen cells");
        let zz = rows.iter().find(|r| r[0] == "zz").unwrap();
        assert_eq!(zz[1], 100, "one row each: nobody else loses a row");
    }
    // The catalogue's g (3) is below k (5): it applies by default; the query lowers it.
    let (_, ledger) = s
        .call(Method::GET, "/v1/ledger?kind=reserve", &s.auditor, None)
        .await;
    let mechanisms: Vec<String> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["body"]["mechanism"].as_str().unwrap().to_string())
        .filter(|m| m.starts_with("laplace-threshold"))
        .collect();
    assert_eq!(mechanisms.len(), 2, "{mechanisms:?}");
    let threshold = |m: &str| -> i64 { m.rsplit("≥ ").next().unwrap().parse().unwrap() };
    assert!(
        mechanisms[0].contains("≤5 rows in ≤3 groups per person_id"),
        "{mechanisms:?}"
    );
    assert!(
        mechanisms[1].contains("≤5 rows in ≤1 groups per person_id"),
        "{mechanisms:?}"
    );
    assert!(
        threshold(&mechanisms[1]) < threshold(&mechanisms[0]),
        "{mechanisms:?}"
    );
    // g above what the catalogue allows, or no lower than k: refused, nothing spent.
    for answer in &answers.as_array().unwrap()[4..] {
        assert_eq!(answer["error"]["code"], "invalid_group_bound", "{answer}");
    }
}
