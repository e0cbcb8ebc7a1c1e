//! Joins on the privacy unit between datasets of one scenario: the gate bounds each person's
//! rows of the join (not of each side), charges every dataset the join reads in one atomic
//! debit, and refuses joins it cannot bound with the reason.
//!
//! As in `privacy_units.rs`, the bound is checked exactly on `unconditional` copies (released
//! without noise) and the pricing and the ledger on `conditional` ones.

use std::sync::Arc;

use arrow::array::{Int64Array, StringArray};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::Server;

/// Trips (`support::write_people`): person 1 takes 200 trips in D01 at fares 1..=200; persons
/// 2–101 one trip each in D02 at fare 10. Riders: one row per person 1–101 (1–60 "young",
/// 61–101 "old"), and rider 500, who took no trip.
fn write_data(dir: &std::path::Path) {
    crate::support::write_people(&dir.join("data/jtrips.parquet"));
    let riders: Vec<i64> = (1..=101).chain([500]).collect();
    let band: Vec<&str> = riders
        .iter()
        .map(|p| if *p <= 60 { "young" } else { "old" })
        .collect();
    crate::support::write_parquet(
        &dir.join("data/riders.parquet"),
        vec![
            ("rider_id", Arc::new(Int64Array::from(riders))),
            ("age_band", Arc::new(StringArray::from(band))),
        ],
    );
}

/// Registers the trips (k = 5) and the riders (k = 1, its unit named differently) under
/// `suffix`, with the given open attribute and total ε.
async fn register(s: &Server, suffix: &str, open: &str, riders_epsilon: f64) {
    let trips = json!({
        "id": format!("jtrips{suffix}"), "title": "Trips by person", "source": "test",
        "open_attribute": open, "version_date": "2026-11-01", "path": "data/jtrips.parquet",
        "table": format!("jtrips{suffix}"), "privacy_unit": "person_id", "max_rows_per_unit": 5,
        "total_epsilon": 100.0, "min_group_size": 0,
        "columns": {
            "person_id": {"type": "int64"},
            "district": {"type": "string", "public_keys": ["D01", "D02"]},
            "fare": {"type": "float64", "bounds": [0.0, 1000.0]},
        },
    });
    let riders = json!({
        "id": format!("riders{suffix}"), "title": "Rider register", "source": "test",
        "open_attribute": open, "version_date": "2026-11-01", "path": "data/riders.parquet",
        "table": format!("riders{suffix}"), "privacy_unit": "rider_id", "max_rows_per_unit": 1,
        "total_epsilon": riders_epsilon, "min_group_size": 0,
        "columns": {
            "rider_id": {"type": "int64"},
            "age_band": {"type": "string", "public_keys": ["young", "old"]},
        },
    });
    for policy in [trips, riders] {
        let (status, body) = s
            .call(Method::POST, "/v1/datasets", &s.operator, Some(policy))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}

async fn scenario(s: &Server, module: &str, suffix: &str, epsilon: f64) -> String {
    s.approved_application(json!({
        "purpose": "joins",
        "columns": {
            format!("jtrips{suffix}"): ["person_id", "district", "fare"],
            format!("riders{suffix}"): ["rider_id", "age_band"],
            // A row-level dataset in the same scenario, to be refused in a join.
            "trips": ["person_id", "district"],
        },
        "modules": [module], "epsilon": epsilon, "per_job_epsilon": epsilon,
    }))
    .await
}

/// The rows of a release as (key, count[, sum]) for keys in `order`.
/// A server with both datasets registered (`open` access, the riders' total ε), the query
/// runner uploaded, and a scenario over both with ε `epsilon` on each: (server, module, scenario).
async fn joined(
    suffix: &str,
    open: &str,
    riders_epsilon: f64,
    epsilon: f64,
) -> (Server, String, String) {
    let s = Server::start().await;
    write_data(s.dir.path());
    register(&s, suffix, open, riders_epsilon).await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let sc = scenario(&s, &module, suffix, epsilon).await;
    (s, module, sc)
}

fn counts(answer: &Value, order: &[&str]) -> Vec<(i64, Option<f64>)> {
    let rows = answer["release"]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"));
    order
        .iter()
        .map(|k| {
            let r = rows
                .iter()
                .find(|r| r[0] == *k)
                .unwrap_or_else(|| panic!("{k}: {answer}"));
            (r[1].as_i64().unwrap(), r.get(2).and_then(Value::as_f64))
        })
        .collect()
}

const BY_BAND: &str = "SELECT r.age_band, COUNT(*) AS n, SUM(t.fare) AS f FROM jtrips{} t JOIN riders{} r ON t.person_id = r.rider_id GROUP BY r.age_band";

fn by_band(suffix: &str) -> String {
    BY_BAND.replace("{}", suffix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_person_keeps_at_most_k_rows_of_the_join() {
    let (s, module, sc) = joined("", "unconditional", 100.0, 10.0).await;
    let runs = 12;
    let mut queries: Vec<Value> = (0..runs)
        .map(|i| json!({"sql": by_band(""), "epsilon": 0.5 + i as f64 * 1e-3}))
        .collect();
    queries.extend([
        // A WHERE on both sides (the condition written the other way round); the bound
        // lowered by the query.
        json!({"sql": "SELECT r.age_band, COUNT(*) AS n FROM jtrips t JOIN riders r ON r.rider_id = t.person_id WHERE t.fare > 100 AND r.age_band = 'young' GROUP BY r.age_band", "epsilon": 0.5}),
        json!({"sql": by_band(""), "epsilon": 0.5, "max_rows_per_unit": 2}),
        // A self-join: person 1's 200 × 200 pairs of trips are one person's, bounded to 5.
        json!({"sql": "SELECT a.district, COUNT(*) AS n FROM jtrips a JOIN jtrips b ON a.person_id = b.person_id GROUP BY a.district", "epsilon": 0.5}),
        // Keys of the joined table grouped on, by another name, through a subquery.
        json!({"sql": "SELECT band, COUNT(*) AS n FROM (SELECT r.age_band AS band, t.fare FROM jtrips t JOIN riders r ON t.person_id = r.rider_id) x GROUP BY band", "epsilon": 0.5}),
    ]);
    let (answers, report) = s.ask(&sc, &module, json!(queries)).await;
    let answers = answers.as_array().unwrap();

    // Person 1 ("young") keeps 5 of 200 joined rows; persons 2–60 one each; 61–101 one each;
    // rider 500 has no trip and adds nothing.
    let mut sums = Vec::new();
    for a in &answers[..runs] {
        let rows = counts(a, &["young", "old"]);
        assert_eq!((rows[0].0, rows[1].0), (5 + 59, 41), "{a}");
        assert_eq!(rows[1].1, Some(410.0));
        sums.push(rows[0].1.unwrap() - 590.0);
    }
    // The 5 kept are drawn at random: not the same five trips every time.
    let mut distinct = sums.clone();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    assert!(distinct.len() >= runs / 2, "{sums:?}");

    // WHERE before the bound: every kept row is one of person 1's trips over 100.
    assert_eq!(counts(&answers[runs], &["young"])[0].0, 5);
    assert_eq!(counts(&answers[runs], &["old"])[0].0, 0);
    assert_eq!(counts(&answers[runs + 1], &["young"])[0].0, 2 + 59);
    let selfjoin = counts(&answers[runs + 2], &["D01", "D02"]);
    assert_eq!(
        (selfjoin[0].0, selfjoin[1].0),
        (5, 100),
        "{}",
        answers[runs + 2]
    );
    let renamed = counts(&answers[runs + 3], &["young", "old"]);
    assert_eq!(
        (renamed[0].0, renamed[1].0),
        (64, 41),
        "{}",
        answers[runs + 3]
    );

    // Every release of the join was metered on both datasets; the self-join on one.
    let (_, ledger) = s
        .call(Method::GET, "/v1/ledger?kind=reserve", &s.auditor, None)
        .await;
    let entries = ledger["entries"].as_array().unwrap();
    let on = |d: &str| {
        entries
            .iter()
            .filter(|e| e["body"]["dataset_id"] == d)
            .count()
    };
    assert_eq!(on("jtrips"), runs + 4);
    assert_eq!(on("riders"), runs + 3);
    assert!(
        entries.iter().all(|e| e["body"]["epsilon"] == 0.0
            && e["body"]["mechanism"]
                .as_str()
                .unwrap()
                .starts_with("exact:")),
        "unconditional data is metered at ε 0"
    );
    assert!(
        report["ledger"]["releases"][0]["joint"]
            .as_array()
            .is_some_and(|j| j.len() == 1),
        "{}",
        report["ledger"]["releases"][0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_is_charged_to_every_dataset_at_once_or_to_none() {
    // The scenario may spend ε 1 on each dataset.
    let (s, module, sc) = joined("_dp", "conditional", 10.0, 1.0).await;
    let q = by_band("_dp");
    let (answers, report) = s
        .ask(
            &sc,
            &module,
            json!([
                {"sql": q, "epsilon": 0.5, "dry_run": true},
                {"sql": q, "epsilon": 0.5},
                // The riders alone: their ε is now all spent, the trips' half.
                {"sql": "SELECT age_band, COUNT(*) AS n FROM riders_dp GROUP BY age_band", "epsilon": 0.5},
                // Refused on the riders, so not charged on the trips either.
                {"sql": q, "epsilon": 0.25},
                // Asked again: the same release, spending nothing, on either dataset.
                {"sql": q, "epsilon": 0.5},
            ]),
        )
        .await;
    let answers = answers.as_array().unwrap();
    // The join's k is the larger of the two (5): count noise 5 / 0.25.
    for a in &answers[..2] {
        let scale = a["release"]["columns"][1]["noise_scale"]
            .as_f64()
            .unwrap_or_else(|| panic!("{a}"));
        assert!((scale - 20.0).abs() < 1e-6, "{scale}: {a}");
    }
    assert_eq!(answers[0]["release"]["dry_run"], true);
    // Laplace scale 20: 10 scales from the exact count is 1 in 22,000. A noisy count below the
    // minimum group size (0 here) has its measures nulled, the count included.
    let rows = answers[1]["release"]["rows"].as_array().unwrap();
    for (band, exact) in [("young", 64), ("old", 41)] {
        let row = rows
            .iter()
            .find(|r| r[0] == band)
            .unwrap_or_else(|| panic!("{band}"));
        match row[1].as_i64() {
            Some(n) => assert!((n - exact).abs() < 200, "{band}: {n}"),
            None => assert!(row[1].is_null() && row[2].is_null(), "{row}"),
        }
    }
    assert!(answers[2]["release"].is_object(), "{}", answers[2]);
    let refused = &answers[3]["error"];
    assert_eq!(refused["code"], "budget_exceeded", "{refused}");

    // One reservation per dataset for the join's release, none for the refusal: the trips
    // keep what the one release cost although they had room for the second.
    let (_, budget) = s.call(Method::GET, "/v1/budget", &s.auditor, None).await;
    let spent = |d: &str| -> f64 {
        budget["datasets"]
            .as_array()
            .unwrap_or_else(|| panic!("{budget}"))
            .iter()
            .find(|x| x["dataset_id"] == d)
            .and_then(|x| x["epsilon_spent"].as_f64())
            .unwrap_or_else(|| panic!("{d}: {budget}"))
    };
    assert!((spent("jtrips_dp") - 0.5).abs() < 1e-9, "{budget}");
    assert!((spent("riders_dp") - 1.0).abs() < 1e-9, "{budget}");
    let (_, ledger) = s
        .call(Method::GET, "/v1/ledger?kind=reserve", &s.auditor, None)
        .await;
    let entries = ledger["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3, "{ledger}");
    assert_eq!(answers[4]["release"]["reused"], true, "{}", answers[4]);
    assert_eq!(answers[4]["release"]["rows"], answers[1]["release"]["rows"]);
    assert_eq!(
        report["ledger"]["releases"][2]["joint"][0]["reservation"]["seq"],
        report["ledger"]["releases"][0]["joint"][0]["reservation"]["seq"],
        "the reused release proves the same two debits"
    );
    for e in &entries[..2] {
        let m = e["body"]["mechanism"].as_str().unwrap();
        assert!(
            m.contains("≤5 rows per person_id=rider_id")
                && m.ends_with("join of jtrips_dp, riders_dp"),
            "{m}"
        );
    }
    assert!((report["epsilon_spent"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    // The report proves both debits: the joint entry is under the same checkpoint.
    let evidence = &report["ledger"]["releases"][0];
    let joint = &evidence["joint"][0];
    assert_ne!(
        evidence["reservation"]["seq"], joint["reservation"]["seq"],
        "{evidence}"
    );
    assert_eq!(
        joint["reservation"]["tree_size"],
        report["ledger"]["checkpoint"]["tree_size"]
    );

    // The export verifies offline, the join's two debits included.
    let summary = s.verified_ledger().await;
    assert_eq!(summary.reservations, 3);
    assert!((summary.per_dataset["riders_dp"].spent - 1.0).abs() < 1e-9);
    assert!((summary.per_dataset["jtrips_dp"].spent - 0.5).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_the_gate_cannot_bound_are_refused_with_the_reason() {
    let (s, module, sc) = joined("", "conditional", 100.0, 10.0).await;
    let refusals = [
        // Not on the privacy units.
        (
            "SELECT r.age_band, COUNT(*) AS n FROM jtrips t JOIN riders r ON t.district = r.age_band GROUP BY r.age_band",
            "unsupported_join",
            "privacy-unit",
        ),
        // An outer join adds rows for persons missing on one side.
        (
            "SELECT r.age_band, COUNT(*) AS n FROM jtrips t LEFT JOIN riders r ON t.person_id = r.rider_id GROUP BY r.age_band",
            "unsupported_join",
            "inner",
        ),
        // Another column renamed into the unit's place below the join.
        (
            "SELECT r.age_band, COUNT(*) AS n FROM (SELECT fare AS person_id FROM jtrips) t JOIN riders r ON t.person_id = r.rider_id GROUP BY r.age_band",
            "unsupported_join",
            "not renamed",
        ),
        // A comma join with the condition in WHERE is not a join on the units.
        (
            "SELECT r.age_band, COUNT(*) AS n FROM jtrips t, riders r WHERE t.person_id = r.rider_id GROUP BY r.age_band",
            "unsupported_join",
            "JOIN riders",
        ),
        // A row-level dataset has no person to bound.
        (
            "SELECT t.district, COUNT(*) AS n FROM trips t JOIN riders r ON t.person_id = r.rider_id GROUP BY t.district",
            "unsupported_join",
            "protects each row",
        ),
    ];
    let mut queries: Vec<Value> = refusals
        .iter()
        .map(|(sql, ..)| json!({"sql": sql, "epsilon": 0.5}))
        .collect();
    queries.push(json!({"sql": by_band(""), "epsilon": 0.5, "max_groups_per_unit": 1}));
    queries.push(json!({"sql": by_band(""), "epsilon": 0.5, "max_rows_per_unit": 6}));
    let (answers, _) = s.ask(&sc, &module, json!(queries)).await;
    let answers = answers.as_array().unwrap();
    for ((sql, code, says), a) in refusals.iter().zip(answers) {
        let e = &a["error"];
        assert_eq!(e["code"], *code, "{sql}: {a}");
        assert!(e["message"].as_str().unwrap().contains(says), "{sql}: {e}");
    }
    assert_eq!(
        answers[5]["error"]["code"], "invalid_group_bound",
        "{}",
        answers[5]
    );
    assert_eq!(
        answers[6]["error"]["code"], "invalid_row_bound",
        "{}",
        answers[6]
    );
    assert!(
        answers[6]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 to 5")
    );
    assert_eq!(s.reservations().await, 0, "nothing refused was charged");
}
