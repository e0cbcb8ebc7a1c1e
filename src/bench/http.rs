//! `unseen bench --http`: the HTTP path under load, and cold start. Spawns this binary as
//! `unseen serve` on a loopback port over a fresh data directory (so start-up is measured as a
//! deployment sees it), then drives it over real sockets:
//!
//! - `serve_to_health`: process spawn to the first answered health check;
//! - `upload`: module uploads of new modules (each compiled: a custom section makes every
//!   upload's bytes, and so its hash, new);
//! - `first_job`: upload-to-result for a new module (compile included) and submit-to-result
//!   for a module already compiled;
//! - `job`: small DP jobs (the `district_stats` example: Q1 at ε 1.0) from 1, 8 and 32
//!   concurrent clients, each submitting, long-polling `GET /v1/jobs/{id}?wait=30` and reading
//!   the result: jobs per second, and p50/p99 latency from submit to result.
//!
//! One JSON line per measurement.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Remote;
use crate::principal::{NewPrincipal, Role};

pub struct HttpBenchOptions {
    /// A trips Parquet file to serve; generated with `rows` rows if absent.
    pub data: Option<PathBuf>,
    pub rows: usize,
    /// Jobs per client at each concurrency.
    pub jobs: usize,
    /// New modules to upload (each compiled).
    pub uploads: usize,
    pub clients: Vec<usize>,
    /// The server's `concurrent_jobs` (its default when `None`).
    pub concurrent_jobs: Option<usize>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn latency_line(op: &str, mut ms: Vec<f64>, extra: Value) -> Value {
    ms.sort_by(f64::total_cmp);
    let mut line = json!({
        "bench": "http",
        "op": op,
        "runs": ms.len(),
        "p50_ms": percentile(&ms, 0.50),
        "p99_ms": percentile(&ms, 0.99),
        "max_ms": ms.last().copied().unwrap_or(f64::NAN),
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        line[k] = v.clone();
    }
    line
}

/// The module's bytes with a custom section appended: the same code under a new hash.
fn variant(wasm: &[u8], n: u64) -> Vec<u8> {
    let name = b"unseen-bench";
    let payload = n.to_le_bytes();
    let size = 1 + name.len() + payload.len();
    let mut out = wasm.to_vec();
    out.push(0); // custom section
    out.push(size as u8); // LEB128, < 128
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

/// A server process on loopback; killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(opts: HttpBenchOptions) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().to_path_buf();
    std::fs::create_dir_all(data_dir.join("data"))?;
    if let Some(file) = &opts.data {
        let file =
            std::fs::canonicalize(file).with_context(|| format!("no file {}", file.display()))?;
        std::os::unix::fs::symlink(&file, data_dir.join("data/trips.parquet"))?;
    }
    let data = data_dir.join("data/trips.parquet");
    if !data.exists() {
        crate::demo::trips::generate(opts.rows, &data, 42)?;
        eprintln!("wrote {} rows to {}", opts.rows, data.display());
    }
    let policies = data_dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    // A budget the benchmark cannot exhaust: thousands of jobs at ε 1.
    std::fs::write(
        policies.join("trips.toml"),
        crate::demo::TRIPS_POLICY.replace("total_epsilon = 20.0", "total_epsilon = 1e9"),
    )?;
    // Every job computes its release: none is answered from an earlier identical query (the
    // server's default, `reuse_releases`, would make every job after the first a cache hit).
    let mut limits = String::from("reuse_releases = false\n");
    if let Some(n) = opts.concurrent_jobs {
        limits.push_str(&format!("concurrent_jobs = {n}\n"));
    }
    std::fs::write(policies.join("limits.toml"), limits)?;
    let concurrent_jobs = opts
        .concurrent_jobs
        .unwrap_or(crate::config::Limits::default().concurrent_jobs);
    let rows = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(
        data_dir.join("data/trips.parquet"),
    )?)
    .map(|r| {
        parquet::file::reader::FileReader::metadata(&r)
            .file_metadata()
            .num_rows()
    })?;
    let operator = {
        let store = crate::store::Store::open(&data_dir)?;
        crate::principal::create(
            &store,
            &NewPrincipal {
                role: Role::Operator,
                name: "bench".into(),
                organisation: None,
                licence_id: None,
            },
        )?
        .1
        .0
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let base = format!("http://127.0.0.1:{port}");

    // Cold start: spawn to first health answer.
    let started = Instant::now();
    let _server = Child(
        std::process::Command::new(std::env::current_exe()?)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(&data_dir)
            .arg("--policies")
            .arg(&policies)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("{base}/v1/health")).send().await
            && r.status().is_success()
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the server did not answer its health check within a minute");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!(
        "{}",
        json!({"bench": "http", "op": "serve_to_health", "ms": started.elapsed().as_secs_f64() * 1e3})
    );

    let op = Remote::new(&base, &operator)?;
    let dev = op
        .json(
            Method::POST,
            "/v1/principals",
            Some(&json!({"role": "developer", "name": "bench", "licence_id": "BENCH"})),
        )
        .await?;
    let dev = Remote::new(&base, dev["token"].as_str().context("token")?)?;
    let wasm = crate::examples::DISTRICT_STATS;

    // Uploads of new modules (compiled each time).
    let mut upload_ms = Vec::new();
    let mut modules = Vec::new();
    for n in 0..opts.uploads.max(1) as u64 {
        let bytes = variant(wasm, n);
        let t = Instant::now();
        let m = dev.upload(&bytes).await?;
        upload_ms.push(t.elapsed().as_secs_f64() * 1e3);
        modules.push(m["id"].as_str().context("module id")?.to_string());
    }
    println!(
        "{}",
        latency_line("upload", upload_ms, json!({"module_bytes": wasm.len()}))
    );

    // One scenario allowing every module, including one not uploaded yet (hash known).
    let fresh = variant(wasm, 1_000_000);
    let fresh_id = crate::sandbox::Sandbox::module_hash(&fresh);
    let mut allowed = modules.clone();
    allowed.push(fresh_id.clone());
    let sc = dev
        .json(Method::POST, "/v1/scenarios", Some(&json!({"purpose": "benchmark", "columns": {"trips": ["district", "fare"]}, "modules": allowed, "epsilon": 1e8, "per_job_epsilon": 1.0})))
        .await?;
    let sc = sc["id"].as_str().context("scenario id")?.to_string();
    op.json(
        Method::POST,
        &format!("/v1/scenarios/{sc}/approve"),
        Some(&json!({})),
    )
    .await?;

    // First job of a new module: upload (compile) + submit + result.
    let t = Instant::now();
    dev.upload(&fresh).await?;
    run_job(&dev, &sc, &fresh_id).await?;
    let new_ms = t.elapsed().as_secs_f64() * 1e3;
    // And of a module compiled at upload but never run.
    let t = Instant::now();
    run_job(&dev, &sc, &modules[0]).await?;
    let cached_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "{}",
        json!({"bench": "http", "op": "first_job", "new_module_ms": new_ms, "cached_module_ms": cached_ms, "rows": rows})
    );

    // Small jobs under load, then dry runs of the same job (priced, not run over data).
    for op in ["job", "dry_run"] {
        for &clients in &opts.clients {
            let started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..clients {
                let dev = Remote::new(&base, dev.token())?;
                let (sc, module) = (sc.clone(), modules[c % modules.len()].clone());
                let jobs = opts.jobs;
                tasks.push(tokio::spawn(async move {
                    let mut ms = Vec::with_capacity(jobs);
                    for _ in 0..jobs {
                        let t = Instant::now();
                        if op == "job" {
                            run_job(&dev, &sc, &module).await?;
                        } else {
                            dry_run(&dev, &sc, &module).await?;
                        }
                        ms.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    anyhow::Ok(ms)
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await??);
            }
            let wall = started.elapsed().as_secs_f64();
            let n = all.len();
            println!(
                "{}",
                latency_line(
                    op,
                    all,
                    json!({"clients": clients, "jobs": n, "jobs_per_s": n as f64 / wall, "wall_s": wall, "rows": rows, "epsilon_per_job": 1.0, "concurrent_jobs": concurrent_jobs})
                )
            );
        }
    }
    Ok(())
}

/// Prices a district_stats job with a dry run (answered at once; nothing spent).
async fn dry_run(dev: &Remote, scenario: &str, module: &str) -> anyhow::Result<Value> {
    let answer = dev
        .json(Method::POST, "/v1/jobs", Some(&json!({"scenario_id": scenario, "module": module, "entry": "main", "params": {"epsilon": 1.0}, "dry_run": true})))
        .await?;
    if answer["epsilon"].as_f64().is_none() {
        bail!("the dry run answered {answer}");
    }
    Ok(answer)
}

/// Submits a district_stats job, long-polls it and reads its result.
async fn run_job(dev: &Remote, scenario: &str, module: &str) -> anyhow::Result<Value> {
    let job = dev
        .json(Method::POST, "/v1/jobs", Some(&json!({"scenario_id": scenario, "module": module, "entry": "main", "params": {"epsilon": 1.0}})))
        .await?;
    let id = job["id"].as_str().context("job id")?;
    loop {
        let j = dev
            .json(Method::GET, &format!("/v1/jobs/{id}?wait=30"), None)
            .await?;
        match j["status"].as_str() {
            Some("succeeded") => break,
            Some("queued" | "running") => continue,
            _ => bail!("job {id} ended {j}"),
        }
    }
    dev.json(Method::GET, &format!("/v1/jobs/{id}/result"), None)
        .await
}
