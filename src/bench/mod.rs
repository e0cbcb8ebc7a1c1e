//! `unseen bench`: the shared workloads of `shared/bench/WORKLOADS.md`, run in-process through
//! the real gate (planning, ledger reservation and commit, DataFusion, OpenDP noise) and as the
//! same aggregation in plain DataFusion with no gate, on any Parquet file with the trips
//! columns. One JSON line per (question, mode), with the field names issue 7 fixes, so other
//! tools can read them. Q5 runs its mean with a built-in expression and with the Q5 example's
//! wasm UDF per batch and per unit; Q6 runs the Q6 example's median by sample-and-aggregate.

pub mod http;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use serde_json::json;
use unseen_guest::contract::{BlockOutput, QueryRequest, SampleAggregate};

use crate::catalog::DatasetPolicy;
use crate::config::Limits;
use crate::gate::Gate;
use crate::ledger::Ledger;
use crate::principal::{NewPrincipal, Role};
use crate::scenario::{Application, Approval};
use crate::store::Store;

/// One question: the gate's SQL, the plain SQL computing the exact clamped answer, the key
/// columns and the measure columns (same order in both).
struct Question {
    id: &'static str,
    gate_sql: &'static str,
    plain_sql: &'static str,
    keys: usize,
    measures: &'static [&'static str],
    /// Protect persons (`person_id`, at most this many rows each) instead of rows.
    rows_per_person: Option<u64>,
    /// δ for questions whose keys are not public.
    delta: Option<f64>,
    /// Clamping bounds: the column (or UDF) and its range.
    bound: (&'static str, f64, f64),
    /// The modes run through the gate, each with the SQL it runs if not `gate_sql`.
    modes: &'static [(&'static str, Option<&'static str>)],
    /// Sample-and-aggregate with the Q6 example's `median` over this many blocks.
    blocks: Option<u32>,
}

const GATE: &[(&str, Option<&str>)] = &[("gate", None)];
/// Q5: the mean of fare per km with a built-in expression, then with the Q5 example's UDF per
/// batch (reviewed module), per unit (a state-free row function: one shared instance), and
/// per unit with a fresh instance for every row (what a UDF that writes state costs).
const Q5_MODES: &[(&str, Option<&str>)] = &[
    (
        "builtin",
        Some(
            "SELECT district, hour, AVG(r) AS fare_per_km FROM (SELECT district, hour, fare / distance_km AS r FROM trips) GROUP BY district, hour",
        ),
    ),
    ("wasm_batch", None),
    ("wasm_unit", None),
    ("wasm_unit_fresh", None),
];

const CLAMPED: &str = "CASE WHEN fare < 0 THEN 0.0 WHEN fare > 100 THEN 100.0 ELSE fare END";

fn questions() -> Vec<Question> {
    vec![
        Question {
            id: "Q1",
            gate_sql: "SELECT district, COUNT(*) AS trips, SUM(fare) AS fare_sum FROM trips GROUP BY district",
            plain_sql: "SELECT district, COUNT(*) AS trips, SUM(CLAMPED) AS fare_sum FROM trips GROUP BY district",
            keys: 1,
            measures: &["trips", "fare_sum"],
            rows_per_person: None,
            delta: None,
            bound: ("fare", 0.0, 100.0),
            modes: GATE,
            blocks: None,
        },
        // Plain DataFusion has no person bound to apply: its line is Q1's exact aggregation,
        // and the MAE counts the rows the bound drops as error.
        Question {
            id: "Q2",
            gate_sql: "SELECT district, COUNT(*) AS trips, SUM(fare) AS fare_sum FROM trips GROUP BY district",
            plain_sql: "SELECT district, COUNT(*) AS trips, SUM(CLAMPED) AS fare_sum FROM trips GROUP BY district",
            keys: 1,
            measures: &["trips", "fare_sum"],
            rows_per_person: Some(10),
            delta: None,
            bound: ("fare", 0.0, 100.0),
            modes: GATE,
            blocks: None,
        },
        Question {
            id: "Q3",
            gate_sql: "SELECT district, hour, AVG(fare) AS mean_fare FROM trips GROUP BY district, hour",
            plain_sql: "SELECT district, hour, AVG(CLAMPED) AS mean_fare FROM trips GROUP BY district, hour",
            keys: 2,
            measures: &["mean_fare"],
            rows_per_person: None,
            delta: None,
            bound: ("fare", 0.0, 100.0),
            modes: GATE,
            blocks: None,
        },
        // Cells are not public: the gate picks which to release (Laplace threshold, δ 1e-6).
        // Plain DataFusion releases every cell; MAE is over the cells the gate released.
        Question {
            id: "Q4",
            gate_sql: "SELECT cell, COUNT(*) AS trips FROM trips GROUP BY cell",
            plain_sql: "SELECT cell, COUNT(*) AS trips FROM trips GROUP BY cell",
            keys: 1,
            measures: &["trips"],
            rows_per_person: None,
            delta: Some(1e-6),
            bound: ("fare", 0.0, 100.0),
            modes: GATE,
            blocks: None,
        },
        Question {
            id: "Q5",
            gate_sql: "SELECT district, hour, AVG(fare_per_km(fare, distance_km)) AS fare_per_km FROM trips GROUP BY district, hour",
            plain_sql: "SELECT district, hour, AVG(CASE WHEN fare / distance_km < 0 THEN 0.0 WHEN fare / distance_km > 20 THEN 20.0 ELSE fare / distance_km END) AS fare_per_km FROM trips GROUP BY district, hour",
            keys: 2,
            measures: &["fare_per_km"],
            rows_per_person: None,
            delta: None,
            bound: ("fare_per_km", 0.0, 20.0),
            modes: Q5_MODES,
            blocks: None,
        },
        // The median of each of 1,000 blocks of persons, clamped to [0, 100], DP-averaged.
        Question {
            id: "Q6",
            gate_sql: "SELECT fare FROM trips",
            plain_sql: "SELECT median(CLAMPED) AS median_fare FROM trips",
            keys: 0,
            measures: &["median_fare"],
            rows_per_person: Some(20),
            delta: None,
            bound: ("fare", 0.0, 100.0),
            modes: GATE,
            blocks: Some(1000),
        },
    ]
}

pub struct BenchOptions {
    pub data: PathBuf,
    /// `Q1`, `Q3` or `all`.
    pub query: String,
    pub runs: usize,
    /// Only the runs that read the file (no table loaded into memory first): for files
    /// bigger than memory should hold. `wall_s` is then null.
    pub streaming: bool,
    /// The gate reads through the server's table cache (the served path's steady state: the
    /// table decoded once, group-key positions memoised); only its runs from memory.
    pub cached: bool,
}

/// Resets the kernel's peak-RSS mark for this process (Linux: `clear_refs` 5), so each
/// measurement reports its own peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The median, or NaN (printed as null) for no runs.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Group key → measure values.
type Answer = HashMap<Vec<String>, Vec<Option<f64>>>;

fn answer_from_batches(
    batches: &[arrow::record_batch::RecordBatch],
    keys: usize,
    measures: usize,
) -> anyhow::Result<Answer> {
    let mut out = Answer::new();
    for b in batches {
        let key_cols: Vec<_> = (0..keys)
            .map(|k| arrow::compute::cast(b.column(k), &DataType::Utf8))
            .collect::<Result<_, _>>()?;
        let val_cols: Vec<_> = (0..measures)
            .map(|m| arrow::compute::cast(b.column(keys + m), &DataType::Float64))
            .collect::<Result<_, _>>()?;
        for row in 0..b.num_rows() {
            let key = key_cols
                .iter()
                .map(|c| c.as_string::<i32>().value(row).to_string())
                .collect();
            let vals = val_cols
                .iter()
                .map(|c| (!c.is_null(row)).then(|| c.as_primitive::<Float64Type>().value(row)))
                .collect();
            out.insert(key, vals);
        }
    }
    Ok(out)
}

pub async fn run(opts: BenchOptions) -> anyhow::Result<()> {
    let data = std::fs::canonicalize(&opts.data)
        .with_context(|| format!("no file {}", opts.data.display()))?;
    let wanted: Vec<Question> = match opts.query.to_ascii_uppercase().as_str() {
        "ALL" => questions(),
        q @ ("Q1" | "Q2" | "Q3" | "Q4" | "Q5" | "Q6") => {
            questions().into_iter().filter(|x| x.id == q).collect()
        }
        other => bail!("unknown question {other:?}: give Q1 … Q6 or all"),
    };
    let runs = opts.runs.max(1);
    let rows =
        parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&data)?).map(|r| {
            parquet::file::reader::FileReader::metadata(&r)
                .file_metadata()
                .num_rows()
        })?;
    // A served job's table cache, or none: then "with load" reads the file on every run.
    let cache = if opts.cached {
        Limits::default().table_cache_bytes
    } else {
        0
    };
    let rows_gate = GateFixture::new(&data, None, cache).await?;
    let person_gate = GateFixture::new(&data, Some(10), cache).await?;
    let person_gate_20 = GateFixture::new(&data, Some(20), cache).await?;
    let sandbox = crate::sandbox::Sandbox::new(Limits::default())?;
    let q5 = sandbox.validate(crate::examples::FARE_PER_KM)?;
    let q6 = sandbox.validate(crate::examples::MEDIAN)?;
    use crate::sandbox::functions::UdfMode;

    for q in wanted {
        let gate = match q.rows_per_person {
            Some(20) => &person_gate_20,
            Some(_) => &person_gate,
            None => &rows_gate,
        };
        // Plain DataFusion, default session: the ceiling.
        reset_peak_rss();
        let plain_sql = q.plain_sql.replace("CLAMPED", CLAMPED);
        let ctx = SessionContext::new();
        ctx.register_parquet(
            "trips",
            data.to_string_lossy().as_ref(),
            ParquetReadOptions::default(),
        )
        .await?;
        let mut with_load = Vec::new();
        let mut exact = Answer::new();
        for _ in 0..runs {
            let t = Instant::now();
            let batches = ctx.sql(&plain_sql).await?.collect().await?;
            with_load.push(t.elapsed().as_secs_f64());
            exact = answer_from_batches(&batches, q.keys, q.measures.len())?;
        }
        let mut without_load = Vec::new();
        if !opts.streaming {
            let mem = SessionContext::new();
            let table = ctx.table("trips").await?;
            let schema = table.schema().inner().clone();
            let loaded = table.collect_partitioned().await?;
            mem.register_table(
                "trips",
                std::sync::Arc::new(datafusion::datasource::MemTable::try_new(schema, loaded)?),
            )?;
            for _ in 0..runs {
                let t = Instant::now();
                mem.sql(&plain_sql).await?.collect().await?;
                without_load.push(t.elapsed().as_secs_f64());
            }
        }
        let plain = (median(without_load), median(with_load));
        line(
            q.id,
            "plain",
            rows,
            runs,
            plain,
            exact.len(),
            0.0,
            json!(null),
            false,
        );

        // Through the gate, from the Parquet file and from memory, in each of its modes.
        let mut per_mode = Vec::new();
        for (mode, sql) in q.modes {
            reset_peak_rss();
            let (name, lo, hi) = q.bound;
            let bound_name = if *mode == "builtin" { "r" } else { name };
            let request = QueryRequest {
                sql: sql.unwrap_or(q.gate_sql).into(),
                epsilon: 1.0,
                // Sample-and-aggregate bounds its outputs instead.
                bounds: if q.blocks.is_some() {
                    Default::default()
                } else {
                    [(bound_name.to_string(), [lo, hi])].into()
                },
                max_rows_per_unit: q.rows_per_person.filter(|_| q.blocks.is_none()),
                delta: q.delta,
                sample_aggregate: q.blocks.map(|blocks| SampleAggregate {
                    function: "median".into(),
                    blocks,
                    outputs: vec![BlockOutput {
                        name: "median_fare".into(),
                        lower: lo,
                        upper: hi,
                        default: None,
                    }],
                }),
                ..Default::default()
            };
            let guest = match *mode {
                "wasm_batch" => Some(sandbox.functions(&q5, UdfMode::Batch)),
                "wasm_unit" => Some(sandbox.functions(&q5, UdfMode::Unit)),
                "wasm_unit_fresh" => Some(std::sync::Arc::new(
                    (*sandbox.functions(&q5, UdfMode::Unit))
                        .clone()
                        .without_shared_instances(),
                )),
                _ if q.blocks.is_some() => Some(sandbox.functions(&q6, UdfMode::Unit)),
                _ => None,
            };
            // Every row in a fresh instance costs tens of microseconds a row: one run, from memory
            // only, and only on files of up to 2M rows.
            if *mode == "wasm_unit_fresh" && rows > 2_000_000 {
                println!(
                    "{}",
                    json!({"query": q.id, "mode": mode, "rows": rows, "skipped": "a fresh instance per row: run it on a file of at most 2M rows"})
                );
                continue;
            }
            let (runs, streaming) = if *mode == "wasm_unit_fresh" {
                (1, opts.streaming)
            } else {
                (runs, opts.streaming)
            };
            let mut with_load = Vec::new();
            let mut without_load = Vec::new();
            let mut errors: Vec<Vec<f64>> = vec![Vec::new(); q.measures.len()];
            let (mut groups, mut epsilon) = (0, 0.0);
            for (in_memory, times) in [(false, &mut with_load), (true, &mut without_load)] {
                if (in_memory && streaming)
                    || (!in_memory && (*mode == "wasm_unit_fresh" || opts.cached))
                {
                    continue;
                }
                let grant = gate
                    .gate
                    .open_job(
                        &crate::new_id("bench"),
                        &gate.developer,
                        &gate.scenario,
                        in_memory,
                        guest.clone(),
                    )
                    .await?;
                for _ in 0..runs {
                    let t = Instant::now();
                    let released = gate
                        .gate
                        .release(&grant, &request)
                        .await
                        .map_err(|e| anyhow::anyhow!("{}", e.to_query_error()))?;
                    times.push(t.elapsed().as_secs_f64());
                    let r = released.release;
                    epsilon = r.epsilon;
                    groups = r
                        .rows
                        .iter()
                        .filter(|row| row[q.keys].as_f64().is_some())
                        .count();
                    for row in &r.rows {
                        let key: Vec<String> = row[..q.keys]
                            .iter()
                            .map(|v| {
                                v.as_str()
                                    .map(String::from)
                                    .or(v.as_f64().map(|f| f.to_string()))
                                    .unwrap_or_default()
                            })
                            .collect();
                        let Some(truth) = exact.get(&key) else {
                            continue;
                        };
                        for (m, t) in truth.iter().enumerate() {
                            if let (Some(noisy), Some(t)) = (row[q.keys + m].as_f64(), t) {
                                errors[m].push((noisy - t).abs());
                            }
                        }
                    }
                }
            }
            let mae: serde_json::Map<String, serde_json::Value> = q
                .measures
                .iter()
                .zip(&errors)
                .map(|(name, e)| {
                    (
                        name.to_string(),
                        json!(e.iter().sum::<f64>() / e.len().max(1) as f64),
                    )
                })
                .collect();
            let gated = (median(without_load), median(with_load));
            line(
                q.id,
                mode,
                rows,
                runs,
                gated,
                groups,
                epsilon,
                json!(mae),
                opts.cached,
            );
            per_mode.push((*mode, gated));
        }
        let (_, base) = per_mode[0];
        if q.id == "Q5" {
            let ratios: serde_json::Map<String, serde_json::Value> = per_mode[1..]
                .iter()
                .map(|(m, t)| (m.to_string(), json!(t.0 / base.0)))
                .collect();
            println!(
                "{}",
                json!({"query": q.id, "wasm_overhead_vs_builtin": ratios})
            );
        } else {
            println!(
                "{}",
                json!({"query": q.id, "privacy_overhead": {"wall_s": base.0 / plain.0, "wall_with_load_s": base.1 / plain.1}})
            );
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn line(
    query: &str,
    mode: &str,
    rows: i64,
    runs: usize,
    (wall, with_load): (f64, f64),
    groups: usize,
    epsilon: f64,
    mae: serde_json::Value,
    table_cache: bool,
) {
    println!(
        "{}",
        json!({
            "query": query, "mode": mode, "rows": rows, "runs": runs,
            "wall_s": wall, "wall_with_load_s": with_load,
            "rows_per_s": rows as f64 / if wall.is_finite() { wall } else { with_load },
            "peak_rss_mib": peak_rss_mib(), "groups": groups, "epsilon": epsilon, "mae": mae,
            "table_cache": table_cache,
        })
    );
}

/// A gate over a temporary data directory: the trips policy pointed at the file, a developer,
/// and an approved scenario with room for every run.
struct GateFixture {
    _dir: tempfile::TempDir,
    gate: Gate,
    developer: String,
    scenario: crate::scenario::Scenario,
}

impl GateFixture {
    /// `rows_per_person`: register the file with `person_id` as its privacy unit.
    /// `table_cache_bytes`: the server's table cache, or 0 for none.
    async fn new(
        data: &Path,
        rows_per_person: Option<u64>,
        table_cache_bytes: usize,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let ledger = std::sync::Arc::new(Ledger::open(store.clone(), dir.path())?);
        let mut policy = DatasetPolicy::parse("policies/trips.toml", crate::demo::TRIPS_POLICY)?;
        policy.path = data.to_path_buf();
        policy.total_epsilon = 1e9;
        policy.total_delta = 1e-4;
        if let Some(k) = rows_per_person {
            policy.privacy_unit = "person_id".into();
            policy.max_rows_per_unit = Some(k);
        }
        crate::catalog::register(&store, dir.path(), "bench", &policy)?;
        let (dev, _) = crate::principal::create(
            &store,
            &NewPrincipal {
                role: Role::Developer,
                name: "bench".into(),
                organisation: None,
                licence_id: Some("bench".into()),
            },
        )?;
        let app = Application {
            purpose: "benchmark".into(),
            columns: [(
                "trips".to_string(),
                vec![
                    "district".into(),
                    "hour".into(),
                    "cell".into(),
                    "fare".into(),
                    "distance_km".into(),
                ],
            )]
            .into(),
            modules: vec!["0".repeat(64)],
            epsilon: 1e6,
            per_job_epsilon: 1e6,
            min_group_size: 0,
            requires_review: false,
            valid_from: None,
            valid_until: None,
            max_rows_per_unit: None,
            max_groups_per_unit: None,
            delta: crate::scenario::MAX_DELTA,
            reviewed_modules: Vec::new(),
            pad_to_seconds: None,
        };
        let s = crate::scenario::apply(&store, &dev.id, app)?;
        let scenario =
            crate::scenario::approve(&store, &ledger, &s.id, "bench", &Approval::default())?;
        // Every run computes its release: none is answered from an earlier identical one.
        let limits = Limits {
            table_cache_bytes,
            reuse_releases: false,
            ..Limits::default()
        };
        let gate = Gate::new(store, ledger, dir.path().to_path_buf(), limits);
        Ok(GateFixture {
            _dir: dir,
            gate,
            developer: dev.id,
            scenario,
        })
    }
}

/// `unseen bench --instantiate`: what every job pays before its entry runs — a fresh store
/// (fuel, limiter) and an instance of a module compiled and linked at upload — for each
/// example module. One JSON line per module.
pub fn instantiation(runs: usize) -> anyhow::Result<()> {
    let sandbox = crate::sandbox::Sandbox::new(Limits::default())?;
    for (name, wasm) in [
        ("district_stats", crate::examples::DISTRICT_STATS),
        ("query_runner", crate::examples::QUERY_RUNNER),
    ] {
        let module = sandbox.validate(wasm)?;
        sandbox.time_instantiation(&module, 10)?; // warm-up
        let mut us = sandbox.time_instantiation(&module, runs.max(1))?;
        us.sort_by(f64::total_cmp);
        println!(
            "{}",
            json!({
                "bench": "sandbox",
                "op": "instantiate",
                "module": name,
                "module_bytes": wasm.len(),
                "allocator": "pooling",
                "runs": us.len(),
                "p50_us": us[us.len() / 2],
                "p99_us": us[(us.len() * 99).div_ceil(100) - 1],
            })
        );
    }
    // What unit mode pays per row (for a UDF that writes state) and sample-and-aggregate per
    // block: a fresh instance from the pool, with no host functions linked.
    for (name, wasm) in [
        ("fare_per_km", crate::examples::FARE_PER_KM),
        ("median", crate::examples::MEDIAN),
    ] {
        let module = sandbox.validate(wasm)?;
        let functions = sandbox.functions(&module, crate::sandbox::functions::UdfMode::Unit);
        functions
            .time_instantiation(100)
            .map_err(|e| anyhow::anyhow!(e))?;
        let mut us = functions
            .time_instantiation(runs.max(1))
            .map_err(|e| anyhow::anyhow!(e))?;
        us.sort_by(f64::total_cmp);
        println!(
            "{}",
            json!({
                "bench": "sandbox",
                "op": "instantiate_function_instance",
                "module": name,
                "module_bytes": wasm.len(),
                "allocator": "pooling",
                "runs": us.len(),
                "p50_us": us[us.len() / 2],
                "p99_us": us[(us.len() * 99).div_ceil(100) - 1],
            })
        );
    }
    Ok(())
}
