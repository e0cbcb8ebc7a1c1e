//! Guest code over rows: a module's UDFs inside the query and its block functions under
//! sample-and-aggregate, run by the examples (Q5, Q6) and by the hostile modules of
//! `tests/guests/hostile`, each attack asserting exactly what the attacker gets to see.
//!
//! Exact answers come from `unconditional` datasets (released without noise), so that what a
//! UDF computed per row can be checked to the unit.

use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, StringArray};
use arrow::datatypes::DataType;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::Server;

/// The fare that marks the hostile modules' target row.
const TARGET: f64 = 777.0;

/// 300 trips of 100 persons (3 each), alternating D01/D02, fares 10 + (i mod 50); with
/// `target`, one more: person 1000 in D01 at the target fare.
fn write_probe(path: &std::path::Path, target: bool) {
    let mut person: Vec<i64> = (0..300).map(|i| i / 3).collect();
    let mut district: Vec<&str> = (0..300)
        .map(|i| if i % 2 == 0 { "D01" } else { "D02" })
        .collect();
    let mut fare: Vec<f64> = (0..300).map(|i| 10.0 + (i % 50) as f64).collect();
    if target {
        person.push(1000);
        district.push("D01");
        fare.push(TARGET);
    }
    crate::support::write_parquet(
        path,
        vec![
            ("person_id", Arc::new(Int64Array::from(person))),
            ("district", Arc::new(StringArray::from(district))),
            ("fare", Arc::new(Float64Array::from(fare))),
        ],
    );
}

/// Registers `file` (under data/) as dataset and table `id`.
async fn register(s: &Server, id: &str, file: &str, open: &str, unit: &str, columns: Value) {
    let mut policy = json!({
        "id": id, "title": id, "source": "test", "open_attribute": open,
        "version_date": "2026-11-01", "path": format!("data/{file}"), "table": id,
        "privacy_unit": unit,
        "total_epsilon": 100000.0, "min_group_size": 0,
        "columns": columns,
    });
    if unit != "row" {
        policy["max_rows_per_unit"] = json!(20);
    }
    let (status, body) = s
        .call(Method::POST, "/v1/datasets", &s.operator, Some(policy))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

fn probe_columns() -> Value {
    json!({
        "person_id": {"type": "int64"},
        "district": {"type": "string", "public_keys": ["D01", "D02"]},
        "fare": {"type": "float64", "bounds": [0.0, 1000.0]},
    })
}

/// Two probe datasets, without and with the target row, at `open` and `unit`.
async fn probes(s: &Server, open: &str, unit: &str) -> (String, String) {
    let data = s.dir.path().join("data");
    let tag = format!("{}_{}", &open[..4], if unit == "row" { "r" } else { "p" });
    let (without, with) = (format!("without_{tag}"), format!("with_{tag}"));
    write_probe(&data.join(format!("{without}.parquet")), false);
    write_probe(&data.join(format!("{with}.parquet")), true);
    for id in [&without, &with] {
        register(s, id, &format!("{id}.parquet"), open, unit, probe_columns()).await;
    }
    (without, with)
}

/// The probes without and with the target row, and a unit-mode scenario over both.
async fn target_pair(s: &Server, module: &str, open: &str, unit: &str) -> (String, String, String) {
    let (without, with) = probes(s, open, unit).await;
    let cols: &[&str] = &["district", "fare"];
    let scn = scenario(
        s,
        module,
        &[(&without, cols), (&with, cols)],
        false,
        20000.0,
    )
    .await;
    (scn, without, with)
}

/// Runs `query` in a job of its own, which must succeed with no error; its one answer.
async fn only_answer(s: &Server, scenario: &str, module: &str, query: Value) -> Value {
    let job = s
        .run_job(scenario, module, "main", json!({"queries": [query]}))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job["error"].is_null(), "{job}");
    s.result(&job).await["output"]["answers"][0].clone()
}

/// A scenario over `datasets` (all their columns but trip ids) for `module`; `reviewed`: the
/// operator marks the module reviewed, so its UDFs run per batch.
async fn scenario(
    s: &Server,
    module: &str,
    datasets: &[(&str, &[&str])],
    reviewed: bool,
    epsilon: f64,
) -> String {
    let columns: serde_json::Map<String, Value> = datasets
        .iter()
        .map(|(d, c)| (d.to_string(), json!(c)))
        .collect();
    let (status, body) = s
        .call(
            Method::POST,
            "/v1/scenarios",
            &s.developer,
            Some(json!({"purpose": "guest functions", "columns": columns,
                "modules": [module], "epsilon": epsilon, "per_job_epsilon": epsilon})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let approval = if reviewed {
        json!({"reviewed_modules": [module]})
    } else {
        json!({})
    };
    let (status, body) = s
        .call(
            Method::POST,
            &format!("/v1/scenarios/{id}/approve"),
            &s.operator,
            Some(approval),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    id
}

/// `{district: (udf sum, count)}` from a release of `SELECT district, SUM(..) AS s, COUNT(*) AS n`.
fn sums(answer: &Value) -> Vec<(String, f64, i64)> {
    let release = &answer["release"];
    assert!(release.is_object(), "{answer}");
    release["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_f64().unwrap(),
                r[2].as_i64().unwrap(),
            )
        })
        .collect()
}

fn sum_query(udf: &str, table: &str) -> Value {
    json!({
        "sql": format!("SELECT district, SUM({udf}(fare)) AS s, COUNT(*) AS n FROM {table} GROUP BY district"),
        "epsilon": 1.0,
        "bounds": {udf: [0.0, 1000000.0]},
    })
}

/// The `mode` of every reserve entry in the ledger export, in order.
async fn ledger_modes(s: &Server) -> Vec<String> {
    s.ledger_export()
        .await
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| {
            let body = &e["body"];
            (body["kind"] == "reserve").then(|| body["mode"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_mode_keeps_state_from_crossing_rows_and_the_reviewed_batch_mode_does_not() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::HOSTILE).await;
    let (probe, _) = probes(&s, "unconditional", "row").await;
    let cols: &[&str] = &["district", "fare"];
    let unit = scenario(&s, &module, &[(&probe, cols)], false, 20000.0).await;
    let batch = scenario(&s, &module, &[(&probe, cols)], true, 20000.0).await;

    let (answers, _) = s
        .ask(&unit, &module, json!([sum_query("rows_seen", &probe)]))
        .await;
    // Every row was the first its instance saw: the UDF's counter never crossed rows.
    for (district, seen, rows) in sums(&answers[0]) {
        assert_eq!(seen, rows as f64, "{district}: {answers}");
    }
    let (answers, _) = s
        .ask(&batch, &module, json!([sum_query("rows_seen", &probe)]))
        .await;
    // Per batch (reviewed modules only), the counter runs on across the batch's rows.
    let total: f64 = sums(&answers[0]).iter().map(|r| r.1).sum();
    let rows: i64 = sums(&answers[0]).iter().map(|r| r.2).sum();
    assert!(total > rows as f64, "{answers}");

    // The ledger says which mode each release used.
    assert_eq!(ledger_modes(&s).await, ["wasm_unit", "wasm_batch"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udf_failing_on_the_target_row_looks_like_its_default_and_nothing_else() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::HOSTILE).await;
    let (scn, without, with) = target_pair(&s, &module, "unconditional", "row").await;
    for udf in [
        "spin_on_target",
        "trap_on_target",
        "bomb_on_target",
        "recurse_on_target",
    ] {
        let mut seen = Vec::new();
        for table in [&without, &with] {
            // The job succeeds either way; no error, code or count of failed rows exists.
            let answer = &only_answer(&s, &scn, &module, sum_query(udf, table)).await;
            let columns: Vec<String> = answer["release"]["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(columns, ["district", "s", "n"], "{udf}: {answer}");
            seen.push(sums(answer));
        }
        // Without the target every row gives 1. With it, the target row counts in n but
        // gives the declared default 0: exactly what an honest UDF returning 0 there would
        // release. The failure itself is not visible.
        for (district, s_, n) in &seen[0] {
            assert_eq!(*s_, *n as f64, "{udf} {district}");
        }
        for (district, s_, n) in &seen[1] {
            let target_rows = if district == "D01" { 1.0 } else { 0.0 };
            assert_eq!(*s_, *n as f64 - target_rows, "{udf} {district}");
        }
    }
    // The server is still serving.
    assert!(s.health().await);
}

fn block_query(function: &str, table: &str, default: f64) -> Value {
    json!({
        "sql": format!("SELECT fare FROM {table}"),
        "epsilon": 1000.0,
        "sample_aggregate": {"function": function, "blocks": 10,
            "outputs": [{"name": "v", "lower": 0.0, "upper": 2.0, "default": default}]},
    })
}

fn block_value(answer: &Value) -> f64 {
    assert_eq!(
        answer["release"]["columns"][0]["kind"], "block_mean",
        "{answer}"
    );
    answer["release"]["rows"][0][0].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_functions_get_fresh_instances_and_a_failing_block_gets_the_default() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::HOSTILE).await;
    let (scn, without, with) = target_pair(&s, &module, "conditional", "person_id").await;

    // State across blocks: each block's instance is fresh, so every block answers 1.
    let (answers, _) = s
        .ask(
            &scn,
            &module,
            json!([block_query("block_memory", &without, 0.0)]),
        )
        .await;
    let v = block_value(&answers[0]);
    assert!((v - 1.0).abs() < 0.01, "{answers}");

    // Without the target each of the 10 blocks answers 1; with it, the target's block traps,
    // spins or answers a million values and is replaced by the declared default 0.5, the other
    // nine answer 1: a mean of 0.95 — a DP release like any other, the job and its columns
    // the same either way.
    for function in ["block_trap", "block_spin", "block_huge"] {
        let mut values = Vec::new();
        for table in [&without, &with] {
            values.push(block_value(
                &only_answer(&s, &scn, &module, block_query(function, table, 0.5)).await,
            ));
        }
        assert!((values[0] - 1.0).abs() < 0.01, "{function}: {values:?}");
        assert!((values[1] - 0.95).abs() < 0.01, "{function}: {values:?}");
    }
    assert!(ledger_modes(&s).await.iter().all(|m| m == "wasm_block"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q5_fare_per_km_runs_inside_the_query_and_equals_the_exact_mean_in_both_modes() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::FARE_PER_KM).await;
    let columns = json!({
        "district": {"type": "string", "public_keys": ["D01", "D02", "D03", "D04", "D05", "D06", "D07", "D08", "D09", "D10", "D11", "D12", "D13", "D14", "D15", "D16"]},
        "hour": {"type": "int32", "public_keys": (0..24).collect::<Vec<i32>>()},
        "fare": {"type": "float64"},
        "distance_km": {"type": "float64"},
    });
    register(
        &s,
        "trips_open",
        "trips.parquet",
        "unconditional",
        "row",
        columns,
    )
    .await;
    let cols: &[&str] = &["district", "hour", "fare", "distance_km"];

    // The exact answer, computed here from the file.
    let exact = exact_fare_per_km(&s.data_path());
    let query = json!({
        "sql": "SELECT district, hour, AVG(fare_per_km(fare, distance_km)) AS v FROM trips_open GROUP BY district, hour",
        "epsilon": 1.0,
        "bounds": {"fare_per_km": [0.0, 20.0]},
    });
    for reviewed in [false, true] {
        let scn = scenario(
            &s,
            &module,
            &[("trips_open", cols), ("trips", cols)],
            reviewed,
            5.0,
        )
        .await;
        let job = s
            .run_job(&scn, &module, "queries", json!({"queries": [query]}))
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let report = s.result(&job).await;
        let rows = report["output"]["answers"][0]["release"]["rows"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(rows.len(), 384);
        for r in rows {
            let key = (r[0].as_str().unwrap().to_string(), r[1].as_i64().unwrap());
            let Some(want) = exact.get(&key) else {
                continue;
            };
            let got = r[2].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-6,
                "{key:?} reviewed={reviewed}: {got} vs {want}"
            );
        }

        // Q5 itself, on the conditional table: a noisy mean per cell, within the bounds.
        let job = s
            .run_job(&scn, &module, "main", json!({"epsilon": 1.0}))
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let report = s.result(&job).await;
        assert_eq!(report["output"]["cells"], 384, "{report}");
        for r in report["output"]["release"]["rows"].as_array().unwrap() {
            if let Some(v) = r[2].as_f64() {
                assert!((0.0..=20.0).contains(&v), "{r}");
            }
        }
    }
    assert_eq!(
        ledger_modes(&s).await,
        ["wasm_unit", "wasm_unit", "wasm_batch", "wasm_batch"]
    );
}

/// Mean of clamp(fare / distance_km, 0, 20) per (district, hour), from the file.
fn exact_fare_per_km(path: &std::path::Path) -> std::collections::HashMap<(String, i64), f64> {
    use arrow::array::AsArray;
    use arrow::datatypes::{Float64Type, Int32Type};
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut acc: std::collections::HashMap<(String, i64), (f64, f64)> = Default::default();
    for batch in reader {
        let b = batch.unwrap();
        let col = |n: &str| b.column(b.schema().index_of(n).unwrap()).clone();
        let district = arrow::compute::cast(&col("district"), &DataType::Utf8).unwrap();
        let district = district.as_string::<i32>();
        let hour = col("hour");
        let hour = hour.as_primitive::<Int32Type>();
        let fare = col("fare");
        let fare = fare.as_primitive::<Float64Type>();
        let km = col("distance_km");
        let km = km.as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let v = if km.value(i) > 0.0 {
                fare.value(i) / km.value(i)
            } else {
                0.0
            };
            let e = acc
                .entry((district.value(i).to_string(), hour.value(i) as i64))
                .or_default();
            e.0 += v.clamp(0.0, 20.0);
            e.1 += 1.0;
        }
    }
    acc.into_iter().map(|(k, (s, n))| (k, s / n)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q6_median_by_sample_and_aggregate_lands_near_the_true_median() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::MEDIAN).await;
    let columns = json!({
        "person_id": {"type": "int64"},
        "fare": {"type": "float64"},
        "distance_km": {"type": "float64"},
    });
    register(
        &s,
        "trips_people",
        "trips.parquet",
        "conditional",
        "person_id",
        columns,
    )
    .await;
    let scn = scenario(
        &s,
        &module,
        &[("trips_people", &["fare", "distance_km"])],
        false,
        20000.0,
    )
    .await;

    let mut fares: Vec<f64> = exact_fares(&s.data_path());
    fares.sort_by(f64::total_cmp);
    let median = fares[fares.len() / 2];

    // The example's entry, pointed at this scenario's person-level table.
    let job = s
        .run_job(
            &scn,
            &module,
            "main",
            json!({"epsilon": 4.0, "blocks": 50, "line": true, "table": "trips_people"}),
        )
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let report = s.result(&job).await;
    let released = report["output"]["median"]["rows"][0][0].as_f64().unwrap();
    // 50 blocks of ~400 rows: block medians sit close to the true one; the noise scale is
    // 100 / 50 / 4 = 0.5 per unit of sensitivity. The bounds' midpoint (what failed blocks
    // would give) is 50, far from the true median.
    assert!((released - median).abs() < 6.0, "{released} vs {median}");
    let noise = report["output"]["median"]["columns"][0]["noise_scale"]
        .as_f64()
        .unwrap();
    assert!(noise > 0.0 && noise < 1.0, "{report}");
    let slope = report["output"]["line"]["rows"][0][0].as_f64().unwrap();
    assert!((0.0..=20.0).contains(&slope), "{report}");
    assert_eq!(
        report["epsilon_spent"]
            .as_f64()
            .map(|e| (e - 8.0).abs() < 1e-6),
        Some(true),
        "{report}"
    );
    assert_eq!(ledger_modes(&s).await, ["wasm_block", "wasm_block"]);
}

fn exact_fares(path: &std::path::Path) -> Vec<f64> {
    use arrow::array::AsArray;
    use arrow::datatypes::Float64Type;
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for batch in reader {
        let b = batch.unwrap();
        let fare = b.column(b.schema().index_of("fare").unwrap()).clone();
        out.extend(fare.as_primitive::<Float64Type>().values().iter().copied());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_function_requests_outside_the_rules_are_refused_by_name() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::HOSTILE).await;
    let (probe, _) = probes(&s, "conditional", "person_id").await;
    let scn = scenario(
        &s,
        &module,
        &[(&probe, &["district", "fare"])],
        false,
        20000.0,
    )
    .await;
    let sa = |function: &str, blocks: u32, sql: &str| {
        json!({"sql": sql, "epsilon": 1.0, "sample_aggregate": {"function": function,
            "blocks": blocks, "outputs": [{"name": "v", "lower": 0.0, "upper": 1.0}]}})
    };
    let plain = format!("SELECT fare FROM {probe}");
    let (answers, report) = s
        .ask(
            &scn,
            &module,
            json!([
                sa("no_such_block", 10, &plain),
                sa("block_memory", 1, &plain),
                sa("block_memory", 10, &format!("SELECT COUNT(*) AS n FROM {probe}")),
                sa("block_memory", 10, "SELECT fare FROM trips"),
                {"sql": format!("SELECT district, SUM(no_such_udf(fare)) AS s FROM {probe} GROUP BY district"), "epsilon": 1.0},
                {"sql": format!("SELECT district, SUM(rows_seen(fare)) AS s FROM {probe} GROUP BY district"), "epsilon": 1.0},
                {"sql": plain, "epsilon": 1.0, "delta": 1e-6, "sample_aggregate": {"function": "block_memory",
                    "blocks": 10, "outputs": [{"name": "v", "lower": 0.0, "upper": 1.0}]}},
                // A dry run prices it without running anything.
                {"sql": plain, "epsilon": 1.0, "dry_run": true, "sample_aggregate": {"function": "block_memory",
                    "blocks": 10, "outputs": [{"name": "v", "lower": 0.0, "upper": 1.0}]}},
            ]),
        )
        .await;
    let codes: Vec<&str> = answers
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["error"]["code"].as_str().unwrap_or("released"))
        .collect();
    assert_eq!(
        codes,
        [
            "unknown_function",
            "invalid_blocks",
            "unsupported_query",
            "sql_invalid",
            "sql_invalid",
            "unbounded_column",
            "invalid_outputs",
            "released",
        ],
        "{answers}"
    );
    // Bounds [0, 1] over 10 blocks at ε 1: OpenDP's scale is about 1 / 10 / 1.
    let estimate = &answers[7]["release"];
    assert_eq!(estimate["dry_run"], true, "{estimate}");
    let scale = estimate["columns"][0]["noise_scale"].as_f64().unwrap();
    assert!((0.09..0.2).contains(&scale), "{estimate}");
    assert!(report["releases"].as_array().unwrap().is_empty());
    assert_eq!(s.reservations().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udf_exports_outside_the_contract_are_refused_at_upload() {
    let s = Server::start().await;
    let module = |extra: &str| {
        crate::support::wat_module("", &format!("(i32.const 0)) {extra} (func $unused"))
    };
    for (extra, says) in [
        (
            r#"(func (export "unseen_udf_Bad") (param i32 i32) (result i32) (i32.const 0))"#,
            "lowercase",
        ),
        (
            r#"(func (export "unseen_udf_f") (param i64) (result i32) (i32.const 0))"#,
            "unseen_udf_<name>(i32, i32)",
        ),
        (
            r#"(func (export "unseen_udf_f") (param i32 i32) (result i32) (i32.const 0))"#,
            "unseen_sig_f",
        ),
        (
            r#"(func (export "unseen_udf_count") (param i32 i32) (result i32) (i32.const 0))"#,
            "built-in",
        ),
        (
            r#"(func (export "unseen_block_f") (param f64) (result i32) (i32.const 0))"#,
            "unseen_block_<name>",
        ),
    ] {
        let (status, body) = s.upload(&s.developer, &module(extra)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{extra}: {body}");
        assert_eq!(body["error"]["code"], "invalid_function", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_padded_scenario_finishes_jobs_no_sooner_than_its_deadline() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let (status, body) = s
        .call(
            Method::POST,
            "/v1/scenarios",
            &s.developer,
            Some(
                json!({"purpose": "padded", "columns": {"trips": ["district"]},
                "modules": [module], "epsilon": 1.0, "per_job_epsilon": 1.0, "pad_to_seconds": 2}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let (status, body) = s
        .call(
            Method::POST,
            &format!("/v1/scenarios/{id}/approve"),
            &s.operator,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let started = std::time::Instant::now();
    let job = s
        .run_job(&id, &module, "main", json!({"queries": []}))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // The job itself takes milliseconds; its outcome appears at the deadline.
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
