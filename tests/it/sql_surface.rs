//! The domain's SQL surface is closed: a module's SQL cannot create, drop, copy, insert, set,
//! read files or URLs, call table functions, or name a table or column outside its scenario;
//! and what the gate cannot bound it refuses with a message that says how to fix it.
//! Refusals spend nothing.

use serde_json::json;

use crate::support::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_sql_outside_the_scenario_or_the_gate_is_refused() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    // person_id and distance_km exist in the dataset but are not in this scenario.
    let scenario = s
        .approved_scenario(
            &module,
            &["district", "hour", "cell", "fare", "trip_id"],
            5.0,
            5.0,
        )
        .await;
    let data = s.data_path().display().to_string();
    let stolen = s.dir.path().join("stolen.parquet");
    let stolen_text = stolen.display().to_string();

    let either = ["sql_refused", "sql_invalid"];
    let cases: Vec<(String, &[&str], &str)> = vec![
        ("CREATE TABLE t AS SELECT * FROM trips".into(), &either, ""),
        ("DROP TABLE trips".into(), &either, ""),
        (format!("COPY trips TO '{stolen_text}'"), &either, ""),
        (format!("COPY (SELECT * FROM trips) TO '{stolen_text}' STORED AS PARQUET"), &either, ""),
        (format!("CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '{data}'"), &either, ""),
        ("INSERT INTO trips (trip_id) VALUES (1)".into(), &either, ""),
        ("SET datafusion.execution.target_partitions = 1".into(), &either, ""),
        (format!("SELECT COUNT(*) FROM '{data}'"), &["sql_invalid"], ""),
        ("SELECT COUNT(*) FROM generate_series(1, 1000000000)".into(), &["sql_invalid"], ""),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r".into(), &["sql_invalid", "unsupported_query"], ""),
        ("SELECT district, COUNT(*) FROM secrets GROUP BY district".into(), &["sql_invalid"], "secrets"),
        ("SELECT district, SUM(distance_km) FROM trips GROUP BY district".into(), &["sql_invalid"], "distance_km"),
        ("SELECT person_id, COUNT(*) FROM trips GROUP BY person_id".into(), &["sql_invalid"], "person_id"),
        ("SELECT cell, COUNT(*) FROM trips GROUP BY cell".into(), &["key_not_public"], "cell"),
        ("SELECT district, SUM(trip_id) FROM trips GROUP BY district".into(), &["unbounded_column"], "bounds"),
        ("SELECT fare FROM trips".into(), &["unsupported_query"], "aggregate"),
        ("SELECT district, COUNT(*) FROM trips GROUP BY district HAVING COUNT(*) > 5".into(), &["unsupported_query"], "HAVING"),
        ("SELECT district, COUNT(*) FROM trips WHERE 1 / (hour - 3) > 0 GROUP BY district".into(), &["expression_not_allowed"], "comparisons"),
        // A join is bounded per person; trips here protects rows (joins.rs has the rest).
        ("SELECT t1.district, COUNT(*) FROM trips t1 JOIN trips t2 ON t1.trip_id = t2.trip_id GROUP BY t1.district".into(), &["unsupported_join"], "protects each row"),
        ("SELECT district, MAX(fare) FROM trips GROUP BY district".into(), &["unsupported_aggregate", "sql_invalid"], ""),
        ("SELECT district, SUM(DISTINCT fare) FROM trips GROUP BY district".into(), &["unsupported_aggregate"], "DISTINCT"),
    ];
    let queries: Vec<_> = cases
        .iter()
        .map(|(sql, _, _)| json!({"sql": sql, "epsilon": 0.1}))
        .collect();
    let (answers, report) = s.ask(&scenario, &module, json!(queries)).await;
    for ((sql, codes, mentions), answer) in cases.iter().zip(answers.as_array().unwrap()) {
        let code = answer["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("{sql} was not refused: {answer}"));
        assert!(codes.contains(&code), "{sql}: got {code}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            !message.is_empty() && message.contains(mentions),
            "{sql}: {message}"
        );
    }
    assert!(!stolen.exists(), "COPY wrote a file");
    assert_eq!(report["releases"], json!([]));
    assert_eq!(
        s.reservations().await,
        0,
        "refused queries must spend nothing"
    );

    // The session still answers a proper query after all that.
    let (answers, _) = s
        .ask(&scenario, &module, json!([{"sql": "SELECT district, COUNT(*) AS n FROM trips WHERE hour BETWEEN 7 AND 9 GROUP BY district", "epsilon": 0.5}]))
        .await;
    let release = &answers[0]["release"];
    assert_eq!(
        release["rows"].as_array().map(Vec::len),
        Some(16),
        "{answers}"
    );
    assert_eq!(s.reservations().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn means_and_two_key_groupings_release_every_public_key() {
    let (_server, answers) = ask_runner(5.0, json!([{"sql": "SELECT district, hour, AVG(fare) AS mean_fare FROM trips GROUP BY district, hour", "epsilon": 1.0, "bounds": {"fare": [0, 100]}}])).await;
    let release = &answers[0]["release"];
    let rows = release["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{answers}"));
    assert_eq!(rows.len(), 16 * 24, "all 384 public (district, hour) keys");
    assert_eq!(release["columns"][2]["kind"], "mean");
    // Means are clamped into the bounds; suppressed (small) groups are null.
    let mut released = 0;
    for row in rows {
        if let Some(m) = row[2].as_f64() {
            assert!((0.0..=100.0).contains(&m), "{m}");
            released += 1;
        }
    }
    assert_eq!(
        released + release["suppressed_groups"].as_u64().unwrap() as usize,
        384
    );
    assert!(released > 0);
}

/// Exact population variance of fare clamped to [0, 100], and trips, per district.
/// A server with the query runner in a scenario over district, hour and fare (ε `cap` for
/// the scenario and per job), asked `queries` in one job: the server and the answers.
async fn ask_runner(cap: f64, queries: serde_json::Value) -> (Server, serde_json::Value) {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let scenario = s
        .approved_scenario(&module, &["district", "hour", "fare"], cap, cap)
        .await;
    let (answers, _) = s.ask(&scenario, &module, queries).await;
    (s, answers)
}

/// Each district's fares, clamped to [0, 100].
fn clamped_fares(path: &std::path::Path) -> std::collections::HashMap<String, Vec<f64>> {
    use arrow::array::{AsArray, Float64Array};
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut fares: std::collections::HashMap<String, Vec<f64>> = Default::default();
    for batch in reader {
        let batch = batch.unwrap();
        let d = arrow::compute::cast(
            batch.column_by_name("district").unwrap(),
            &arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let f = batch.column_by_name("fare").unwrap();
        let f = f.as_any().downcast_ref::<Float64Array>().unwrap();
        for (d, f) in d.as_string::<i32>().iter().zip(f.iter()) {
            fares
                .entry(d.unwrap().to_string())
                .or_default()
                .push(f.unwrap().clamp(0.0, 100.0));
        }
    }
    fares
}

fn exact_spread(path: &std::path::Path) -> std::collections::HashMap<String, (f64, usize)> {
    clamped_fares(path)
        .into_iter()
        .map(|(d, v)| {
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
            (d, (var, v.len()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variances_deviations_and_distinct_counts_are_released_with_their_noise() {
    let (s, answers) = ask_runner(15.0, json!([
                {"sql": "SELECT district, VAR_POP(fare) AS v, STDDEV(fare) AS sd, AVG(fare) AS m FROM trips GROUP BY district", "epsilon": 12.0, "bounds": {"fare": [0, 100]}},
                {"sql": "SELECT district, COUNT(DISTINCT hour) AS hours FROM trips GROUP BY district", "epsilon": 2.0},
            ])).await;
    let release = &answers[0]["release"];
    let rows = release["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{answers}"));
    // Count, shifted sum and sum of squares: three measurements at ε 4 each; the squares'
    // noise is in squared units: a deviation of at most 50, squared, over ε 4.
    assert_eq!(release["columns"][1]["kind"], "variance");
    assert_eq!(release["columns"][2]["kind"], "std_dev");
    let scale = release["columns"][1]["noise_scale"].as_f64().unwrap();
    assert!((scale - 2500.0 / 4.0).abs() < 1e-3, "{scale}");
    let exact = exact_spread(&s.data_path());
    for row in rows {
        let district = row[0].as_str().unwrap();
        let (var, n) = exact[district];
        let (v, sd) = (row[1].as_f64().unwrap(), row[2].as_f64().unwrap());
        // Noise on the squares is Laplace(625) over n ≥ ~300 trips: off by 20 with
        // probability e^-10 or less.
        assert!((v - var).abs() < 20.0, "{district} (n = {n}): {v} vs {var}");
        assert!(
            (sd - var.sqrt()).abs() < 1.0,
            "{district}: {sd} vs {}",
            var.sqrt()
        );
        assert!(
            (sd * sd - v).abs() < 25.0,
            "the same measurements behind both"
        );
    }
    let hours = &answers[1]["release"];
    assert_eq!(hours["columns"][1]["kind"], "count");
    // ε 2 over the row count (always measured, for the minimum group size) and the distinct
    // count: scale 1 for each.
    assert!((hours["columns"][1]["noise_scale"].as_f64().unwrap() - 1.0).abs() < 1e-6);
    for row in hours["rows"].as_array().unwrap() {
        let h = row[1].as_i64().unwrap();
        assert!((12..=36).contains(&h), "{row}: 24 hours, noise of scale 1");
    }
}

/// MEDIAN and PERCENTILE_CONT (both spellings, and the APPROX_ ones) per district, by OpenDP's
/// private quantile: near the exact quantile of the clamped fares, priced like any
/// measurement, and refused with a reason when q is not a literal fraction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn medians_and_percentiles_are_released_by_the_private_quantile() {
    let bounds = json!({"fare": [0, 100]});
    let (s, answers) = ask_runner(20.0, json!([
                {"sql": "SELECT district, MEDIAN(fare) AS m, PERCENTILE_CONT(fare, 0.9) AS p90 FROM trips GROUP BY district", "epsilon": 9.0, "bounds": bounds},
                {"sql": "SELECT district, PERCENTILE_CONT(0.25) WITHIN GROUP (ORDER BY fare) AS p25 FROM trips GROUP BY district", "epsilon": 4.0, "bounds": bounds},
                {"sql": "SELECT district, PERCENTILE_CONT(fare, hour) AS p FROM trips GROUP BY district", "epsilon": 1.0, "bounds": bounds},
                {"sql": "SELECT district, PERCENTILE_CONT(fare, 1.5) AS p FROM trips GROUP BY district", "epsilon": 1.0, "bounds": bounds},
                {"sql": "SELECT district, APPROX_MEDIAN(fare) AS m, APPROX_PERCENTILE_CONT(fare, 0.9, 100) AS p90 FROM trips GROUP BY district", "epsilon": 7.0, "bounds": bounds},
            ])).await;
    let fares = clamped_fares(&s.data_path());
    // The values within `r` ranks of the q quantile (nearest rank), widened by one candidate
    // step: every candidate between two neighbouring values scores alike, so the release may
    // lie anywhere in such a gap — wide in a sparse tail.
    let near = |district: &str, q: f64, r: usize| {
        let mut v = fares[district].clone();
        v.sort_by(f64::total_cmp);
        let at = ((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1);
        let step = 100.0 / 1023.0;
        (
            v[at.saturating_sub(r)] - step,
            v[(at + r).min(v.len() - 1)] + step,
        )
    };
    let first = &answers[0]["release"];
    // ε 9 over three measurements (the row count, the median, the 90th percentile).
    assert!(
        (first["epsilon"].as_f64().unwrap() - 9.0).abs() < 1e-6,
        "{first}"
    );
    assert_eq!(first["columns"][1]["kind"], "quantile");
    // OpenDP's scale for a median at ε 3, one row per person: 2·1·½ / 3 = ⅓ of a rank.
    let scale = first["columns"][1]["noise_scale"].as_f64().unwrap();
    assert!((scale - 1.0 / 3.0).abs() < 1e-6, "{scale}");
    let second = &answers[1]["release"];
    // The approximate spellings get the same private quantile.
    let approx = &answers[4]["release"];
    assert_eq!(approx["columns"][2]["kind"], "quantile", "{approx}");
    // Ranks a release may stray: 8 at noise scales ≤ ½, 12 for the approximate spellings'
    // (ε 7 over three measurements: scale 0.77 for their 90th percentile).
    for (release, columns, reach) in [
        (first, vec![(1, 0.5), (2, 0.9)], 8),
        (second, vec![(1, 0.25)], 8),
        (approx, vec![(1, 0.5), (2, 0.9)], 12),
    ] {
        let rows = release["rows"]
            .as_array()
            .unwrap_or_else(|| panic!("{answers}"));
        assert_eq!(rows.len(), 16, "every public district");
        for row in rows {
            let district = row[0].as_str().unwrap();
            for (c, q) in &columns {
                let got = row[*c].as_f64().unwrap();
                // A candidate r ranks off is about e^{-r/scale} as likely as the best:
                // `reach` ranks is beyond reach.
                let (lo, hi) = near(district, *q, reach);
                assert!(
                    (lo..=hi).contains(&got),
                    "{district} q {q}: {got} not in [{lo}, {hi}] (n = {})",
                    fares[district].len()
                );
                assert!((0.0..=100.0).contains(&got));
            }
        }
    }
    for refused in &answers.as_array().unwrap()[2..4] {
        assert_eq!(
            refused["error"]["code"], "unsupported_aggregate",
            "{refused}"
        );
        assert!(
            refused["error"]["message"]
                .as_str()
                .unwrap()
                .contains("between 0 and 1"),
            "{refused}"
        );
    }
}

/// Histograms: a CASE whose every outcome is a literal has those literals as public keys —
/// grouped on directly or through a subquery — so every bin is released, empty ones included,
/// with noisy counts; a CASE with a computed outcome has no public keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_bins_are_public_keys_and_every_bin_is_released() {
    let (s, answers) = ask_runner(15.0, json!([
                {"sql": "SELECT CASE WHEN fare < 0 THEN 'negative' WHEN fare < 10 THEN 'under 10' WHEN fare < 30 THEN '10 to 30' WHEN fare < 100 THEN '30 to 100' ELSE '100 or more' END AS bin, COUNT(*) AS n FROM trips GROUP BY bin", "epsilon": 2.0},
                {"sql": "SELECT b, COUNT(*) AS n FROM (SELECT CASE WHEN fare < 20 THEN 0 WHEN fare < 40 THEN 1 ELSE 2 END AS b FROM trips WHERE hour < 12) GROUP BY b", "epsilon": 2.0},
                {"sql": "SELECT CASE WHEN fare < 10 THEN district ELSE 'other' END AS d, COUNT(*) AS n FROM trips GROUP BY d", "epsilon": 1.0},
            ])).await;
    let fares: Vec<f64> = clamped_fares(&s.data_path())
        .into_values()
        .flatten()
        .collect();
    let count = |f: &dyn Fn(f64) -> bool| fares.iter().filter(|x| f(**x)).count() as i64;
    let first = answers[0]["release"]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{answers}"));
    let want = [
        ("negative", 0),
        ("under 10", count(&|x| x < 10.0)),
        ("10 to 30", count(&|x| (10.0..30.0).contains(&x))),
        ("30 to 100", count(&|x| (30.0..100.0).contains(&x))),
        ("100 or more", count(&|x| x >= 100.0)),
    ];
    assert_eq!(
        first.len(),
        want.len(),
        "every bin, the empty one too: {first:?}"
    );
    for (row, (bin, n)) in first.iter().zip(want) {
        assert_eq!(row[0], bin, "in the order written");
        if n == 0 {
            // Under the minimum group size: released as a key with its measures nulled.
            assert!(row[1].is_null(), "{row}");
            continue;
        }
        // Laplace(1/2) on each count: off by 10 with probability e^-20.
        let got = row[1].as_i64().unwrap_or_else(|| panic!("{first:?}"));
        assert!((got - n).abs() <= 10, "{bin}: {row} vs {n}");
    }
    let second = answers[1]["release"]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{answers}"));
    let keys: Vec<i64> = second
        .iter()
        .map(|r| r[0].as_i64().unwrap_or_else(|| panic!("{second:?}")))
        .collect();
    assert_eq!(keys, [0, 1, 2], "integer bins from a subquery");
    let total: i64 = second.iter().map(|r| r[1].as_i64().unwrap()).sum();
    assert!(
        total > 0 && total < fares.len() as i64,
        "the WHERE applies: {total}"
    );
    assert_eq!(
        answers[2]["error"]["code"], "key_not_public",
        "{}",
        answers[2]
    );
}

/// A budget in ρ (zero-concentrated DP): Gaussian noise with σ from ρ, a release that states
/// ρ and the (ε, δ) it converts to, a ledger that debits exactly that, the same price in a dry
/// run, partition selection by the Gaussian threshold, and refusals that say what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rho_budgets_get_gaussian_noise_and_debit_the_epsilon_delta_they_convert_to() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let scenario = s
        .approved_application(json!({
            "purpose": "testing", "columns": {"trips": ["district", "hour", "cell", "fare"]},
            "modules": [module], "epsilon": 20.0, "per_job_epsilon": 20.0, "delta": 1e-5}))
        .await;
    let counts = "SELECT district, COUNT(*) AS trips FROM trips GROUP BY district";
    let (answers, _) = s
        .ask(
            &scenario,
            &module,
            json!([
                {"sql": counts, "rho": 0.5, "delta": 1e-6, "dry_run": true},
                {"sql": counts, "rho": 0.5, "delta": 1e-6},
                {"sql": counts, "rho": 0.5, "epsilon": 1.0, "delta": 1e-6},
                {"sql": counts, "rho": 0.5},
                {"sql": counts, "rho": -1.0, "delta": 1e-6},
                {"sql": "SELECT cell, COUNT(*) AS n FROM trips GROUP BY cell", "rho": 0.5, "delta": 1e-6},
            ]),
        )
        .await;
    let (dry, release) = (&answers[0]["release"], &answers[1]["release"]);
    let rows = release["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{answers}"));
    // One measurement at ρ 0.5, one row per person: σ = 1/√(2ρ) = 1.
    let column = &release["columns"][1];
    assert!(
        (column["noise_scale"].as_f64().unwrap() - 1.0).abs() < 1e-6,
        "{column}"
    );
    assert!((column["ci95_half_width"].as_f64().unwrap() - 1.96).abs() < 1e-3);
    let rho = release["rho"].as_f64().unwrap();
    assert!(rho <= 0.5 && rho > 0.4999, "{rho}");
    // OpenDP's conversion at δ 1e-6: above ρ, under the classic ρ + 2√(ρ·ln 1/δ).
    let epsilon = release["epsilon"].as_f64().unwrap();
    let classic = 0.5 + 2.0 * (0.5 * 1e6f64.ln()).sqrt();
    assert!(epsilon > 0.5 && epsilon < classic, "{epsilon}");
    assert_eq!(release["delta"].as_f64(), Some(1e-6));
    for key in ["epsilon", "delta", "rho"] {
        assert_eq!(dry[key], release[key], "the dry run prices {key} alike");
    }
    assert_eq!(dry["rows"].as_array().map(Vec::len), Some(0));
    // Gaussian(1) noise on each count: off by 8 has probability ~1e-15.
    let exact = crate::support::exact_q1(&s.data_path());
    assert_eq!(rows.len(), exact.len());
    for row in rows {
        let (n, _) = exact[row[0].as_str().unwrap()];
        assert!((row[1].as_i64().unwrap() - n).abs() <= 8, "{row} vs {n}");
    }
    // The ledger debits the converted ε and δ and names the mechanism and ρ.
    let export = s.ledger_export().await;
    let reserve = export
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e.to_string().contains("gaussian:count"))
        .unwrap_or_else(|| panic!("no gaussian reservation in {export}"));
    let entry = reserve.to_string();
    assert!(entry.contains(&format!("{epsilon}")), "{entry}");
    assert!(entry.contains("ρ="), "{entry}");
    // Cells have no public keys: OpenDP's Gaussian threshold chooses them with half of δ,
    // and the conversion of ρ gets the other half (so a larger ε than for the counts).
    let cells = &answers[5]["release"];
    let cells_epsilon = cells["epsilon"]
        .as_f64()
        .unwrap_or_else(|| panic!("{}", answers[5]));
    assert!(
        cells_epsilon > epsilon && cells_epsilon < 2.0 * classic,
        "{cells_epsilon}"
    );
    assert_eq!(cells["delta"].as_f64(), Some(1e-6));
    assert!(cells["rho"].as_f64().unwrap() <= 0.5);
    assert!(
        s.ledger_export().await.contains("gaussian-threshold:count"),
        "the ledger names the mechanism"
    );
    assert_eq!(
        s.reservations().await,
        2,
        "refusals and the dry run spend nothing"
    );
    for (i, code) in [
        (2, "invalid_budget"),
        (3, "invalid_delta"),
        (4, "invalid_rho"),
    ] {
        assert_eq!(answers[i]["error"]["code"], code, "{}", answers[i]);
    }
}
