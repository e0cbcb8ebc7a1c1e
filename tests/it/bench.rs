//! `unseen bench` prints one JSON line per (question, mode) with the agreed field names, for
//! all six shared questions.

/// Runs `unseen <args>`, fails the test if it fails, and parses its standard output as JSON lines.
fn json_lines(args: &[&std::ffi::OsStr]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_unseen"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `json_lines` for plain string arguments.
fn json_lines_of(args: &[&str]) -> Vec<serde_json::Value> {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    json_lines(&args)
}

#[test]
fn bench_prints_the_agreed_fields_for_every_question_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    unseen::demo::prepare_trips(dir.path(), 20_000).unwrap();
    let data = dir.path().join("data/trips.parquet");
    let lines = json_lines(&[
        "bench".as_ref(),
        "--query".as_ref(),
        "all".as_ref(),
        "--runs".as_ref(),
        "1".as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
    ]);
    let measured: Vec<_> = lines.iter().filter(|l| l.get("mode").is_some()).collect();
    let modes: Vec<(&str, &str)> = measured
        .iter()
        .map(|l| (l["query"].as_str().unwrap(), l["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        modes,
        [
            ("Q1", "plain"),
            ("Q1", "gate"),
            ("Q2", "plain"),
            ("Q2", "gate"),
            ("Q3", "plain"),
            ("Q3", "gate"),
            ("Q4", "plain"),
            ("Q4", "gate"),
            ("Q5", "plain"),
            ("Q5", "builtin"),
            ("Q5", "wasm_batch"),
            ("Q5", "wasm_unit"),
            ("Q5", "wasm_unit_fresh"),
            ("Q6", "plain"),
            ("Q6", "gate"),
        ]
    );
    for l in &measured {
        for field in [
            "query",
            "mode",
            "rows",
            "runs",
            "wall_s",
            "wall_with_load_s",
            "rows_per_s",
            "peak_rss_mib",
            "groups",
            "epsilon",
            "mae",
        ] {
            assert!(l.get(field).is_some(), "{field} missing in {l}");
        }
        assert_eq!(l["rows"], 20_000);
        if l["mode"] != "plain" {
            assert!((l["epsilon"].as_f64().unwrap() - 1.0).abs() < 1e-9);
            assert!(
                l["mae"]
                    .as_object()
                    .unwrap()
                    .values()
                    .all(|v| v.as_f64().is_some_and(f64::is_finite))
            );
        }
    }
    // Q5's wasm overhead against the built-in expression, per mode.
    let overhead = lines
        .iter()
        .find_map(|l| l.get("wasm_overhead_vs_builtin"))
        .expect("a Q5 overhead line");
    for mode in ["wasm_batch", "wasm_unit", "wasm_unit_fresh"] {
        assert!(
            overhead[mode].as_f64().is_some_and(|r| r > 0.0),
            "{overhead}"
        );
    }
    let q7 = std::process::Command::new(env!("CARGO_BIN_EXE_unseen"))
        .args(["bench", "--query", "Q7", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!q7.status.success());
    assert!(String::from_utf8_lossy(&q7.stderr).contains("Q1 … Q6"));
}

#[test]
fn gen_trips_writes_into_a_new_directory_with_the_workload_columns() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("new/data/trips.parquet");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_unseen"))
        .args(["gen-trips", "--rows", "500", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&out).unwrap(),
    )
    .unwrap();
    assert_eq!(reader.metadata().file_metadata().num_rows(), 500);
    let names: Vec<_> = reader
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "trip_id",
            "person_id",
            "district",
            "hour",
            "cell",
            "fare",
            "distance_km"
        ]
    );
}

#[test]
fn the_http_bench_measures_cold_start_uploads_and_jobs_under_load() {
    let lines = json_lines_of(&[
        "bench",
        "--http",
        "--rows",
        "20000",
        "--jobs",
        "3",
        "--clients",
        "1,4",
        "--uploads",
        "1",
    ]);
    let op = |name: &'static str| lines.iter().filter(move |l| l["op"] == name);
    let start = op("serve_to_health").next().expect("cold start line");
    assert!(start["ms"].as_f64().unwrap() > 0.0);
    let upload = op("upload").next().expect("upload line");
    assert_eq!(upload["runs"], 1);
    let first = op("first_job").next().expect("first job line");
    assert!(first["new_module_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(first["rows"], 20000);
    for kind in ["job", "dry_run"] {
        let measured: Vec<_> = op(kind).collect();
        assert_eq!(measured.len(), 2, "{kind}");
        for (line, clients) in measured.iter().zip([1, 4]) {
            assert_eq!(line["clients"], clients);
            assert_eq!(line["jobs"], 3 * clients);
            let (p50, p99) = (
                line["p50_ms"].as_f64().unwrap(),
                line["p99_ms"].as_f64().unwrap(),
            );
            assert!(p50 > 0.0 && p50 <= p99, "{line}");
            assert!(line["jobs_per_s"].as_f64().unwrap() > 0.0);
        }
    }
}

#[test]
fn the_instantiation_bench_times_every_example_module() {
    let lines = json_lines_of(&["bench", "--instantiate"]);
    let modules: Vec<&str> = lines
        .iter()
        .map(|l| l["module"].as_str().unwrap())
        .collect();
    assert_eq!(
        modules,
        ["district_stats", "query_runner", "fare_per_km", "median"]
    );
    for l in &lines {
        assert_eq!(l["runs"], 1000);
        let (p50, p99) = (l["p50_us"].as_f64().unwrap(), l["p99_us"].as_f64().unwrap());
        assert!(p50 > 0.0 && p50 <= p99, "{l}");
    }
}

#[test]
fn streaming_bench_reads_the_file_every_run_and_reports_no_in_memory_time() {
    let dir = tempfile::tempdir().unwrap();
    unseen::demo::prepare_trips(dir.path(), 5_000).unwrap();
    let data = dir.path().join("data/trips.parquet");
    let mut args: Vec<&std::ffi::OsStr> = [
        "bench",
        "--query",
        "Q1",
        "--runs",
        "1",
        "--streaming",
        "--data",
    ]
    .map(std::ffi::OsStr::new)
    .to_vec();
    args.push(data.as_os_str());
    let lines = json_lines(&args);
    let modes: Vec<_> = lines.iter().filter(|l| l["mode"].is_string()).collect();
    assert_eq!(modes.len(), 2);
    for l in modes {
        assert!(l["wall_s"].is_null(), "{l}");
        assert!(l["wall_with_load_s"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["rows_per_s"].as_f64().unwrap() > 0.0, "{l}");
    }
}
