//! `unseen demo`: the whole path of a job, told as it happens, over a real HTTP socket.
//! Generates synthetic trips, seeds the catalogue from the shipped policy, registers the three
//! roles, uploads the `district_stats` example module, applies for and approves a scenario,
//! runs WORKLOADS.md's Q1 through the gate, prints the release, and verifies the ledger
//! offline as an auditor would.

pub mod trips;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::config::Config;
use crate::principal::{NewPrincipal, Role};

/// The shipped catalogue entry for the trips table.
pub const TRIPS_POLICY: &str = include_str!("../../policies/trips.toml");

pub struct DemoOptions {
    /// Keep state here (for `unseen serve --data-dir` and `unseen ledger export` afterwards);
    /// a temporary directory otherwise.
    pub data_dir: Option<PathBuf>,
    pub rows: usize,
}

/// A minimal JSON client for the demo's calls.
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Client {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    /// Sends a request and returns the JSON body, failing on a non-2xx status.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{method} {path} answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn upload(&self, token: &str, wasm: &[u8]) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(format!("{}/v1/modules", self.base))
            .bearer_auth(token)
            .header("content-type", "application/wasm")
            .body(wasm.to_vec())
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() {
            bail!("upload answered {status}: {body}");
        }
        Ok(body)
    }

    pub async fn text(&self, path: &str, token: &str) -> anyhow::Result<String> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("GET {path} answered {}", resp.status());
        }
        Ok(resp.text().await?)
    }
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

/// Writes the trips policy and data into `data_dir` (if not there yet).
pub fn prepare_trips(data_dir: &Path, rows: usize) -> anyhow::Result<PathBuf> {
    let policies = data_dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::create_dir_all(data_dir.join("data"))?;
    std::fs::write(policies.join("trips.toml"), TRIPS_POLICY)?;
    let data = data_dir.join("data/trips.parquet");
    if !data.exists() {
        let started = std::time::Instant::now();
        trips::generate(rows, &data, 42)?;
        println!(
            "    wrote {rows} rows to {} in {:.1} s",
            data.display(),
            started.elapsed().as_secs_f64()
        );
    } else {
        println!("    {} already exists; reusing it", data.display());
    }
    Ok(policies)
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    use reqwest::Method;
    let temp;
    let data_dir = match &opts.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    println!("unseen demo — data directory {}", data_dir.display());

    step(
        1,
        "Generating the synthetic trips table (WORKLOADS.md's columns) inside the domain",
    );
    let policies = prepare_trips(&data_dir, opts.rows)?;

    step(
        2,
        "Starting the server on a loopback port; the catalogue is seeded from policies/trips.toml",
    );
    let mut config = Config::new(&data_dir);
    config.listen = "127.0.0.1:0".parse()?;
    config.policies_dir = Some(policies);
    let bootstrap = crate::store::Store::open(&data_dir)?;
    let (_, operator_token) = crate::principal::create(
        &bootstrap,
        &NewPrincipal {
            role: Role::Operator,
            name: "Demo Operator".into(),
            organisation: Some("Data Operating Agency".into()),
            licence_id: None,
        },
    )?;
    drop(bootstrap);
    let (addr, server) = crate::api::start(config).await?;
    let client = Client::new(addr);
    let op = operator_token.0;
    println!(
        "    listening on http://{addr}; an operator was bootstrapped (as `unseen principal add` does)"
    );

    step(
        3,
        "Operator registers a licensed developer and an auditor (real names, tokens shown once)",
    );
    let dev = client
        .call(Method::POST, "/v1/principals", &op, Some(json!({"role": "developer", "name": "Li Wei", "organisation": "Example Analytics Ltd", "licence_id": "LIC-2026-0042"})))
        .await?;
    let aud = client
        .call(
            Method::POST,
            "/v1/principals",
            &op,
            Some(json!({"role": "auditor", "name": "Zhang Min", "organisation": "Audit Office"})),
        )
        .await?;
    let dev_token = dev["token"]
        .as_str()
        .context("developer token")?
        .to_string();
    let aud_token = aud["token"].as_str().context("auditor token")?.to_string();
    println!(
        "    developer {} and auditor {}",
        dev["principal"]["id"], aud["principal"]["id"]
    );

    step(
        4,
        "Developer reads the catalogue: metadata, public keys and bounds — never rows",
    );
    let dataset = client
        .call(Method::GET, "/v1/datasets/trips", &dev_token, None)
        .await?;
    println!(
        "    {} — source: {}, version {}, open attribute: {}, {} public district keys, total ε {}",
        dataset["title"],
        dataset["source"],
        dataset["version_date"],
        dataset["open_attribute"],
        dataset["columns"]["district"]["public_keys"]
            .as_array()
            .map_or(0, Vec::len),
        dataset["total_epsilon"]
    );

    step(
        5,
        "Developer uploads the example module examples/district_stats (built to wasm by cargo)",
    );
    let module = client
        .upload(&dev_token, crate::examples::DISTRICT_STATS)
        .await?;
    let module_id = module["id"].as_str().context("module id")?.to_string();
    println!(
        "    {} bytes, SHA-256 {module_id}, entries {}",
        crate::examples::DISTRICT_STATS.len(),
        module["entries"]
    );

    step(
        6,
        "Developer applies for a scenario: purpose, columns, module, ε, review before release",
    );
    let scenario = client
        .call(
            Method::POST,
            "/v1/scenarios",
            &dev_token,
            Some(json!({
                "purpose": "Plan taxi stands: trips and fares per district",
                "columns": {"trips": ["district", "fare"]},
                "modules": [module_id],
                "epsilon": 3.0,
                "per_job_epsilon": 1.0,
                "min_group_size": 10,
                "requires_review": true
            })),
        )
        .await?;
    let scenario_id = scenario["id"].as_str().context("scenario id")?.to_string();
    println!(
        "    scenario {scenario_id}: {}, asking ε {} ({} per job)",
        scenario["status"],
        scenario["application"]["epsilon"],
        scenario["application"]["per_job_epsilon"]
    );

    step(
        7,
        "Operator reviews the application and approves it, tightening ε and setting a validity window",
    );
    let pending = client.call(Method::GET, "/v1/scenarios", &op, None).await?;
    for sc in pending["scenarios"].as_array().into_iter().flatten() {
        if sc["status"] == "submitted" {
            println!(
                "    pending: {} from {} — {:?}",
                sc["id"], sc["developer_id"], sc["application"]["purpose"]
            );
        }
    }
    let until = (time::OffsetDateTime::now_utc() + time::Duration::days(30))
        .format(&time::format_description::well_known::Rfc3339)?;
    let approved = client
        .call(
            Method::POST,
            &format!("/v1/scenarios/{scenario_id}/approve"),
            &op,
            Some(json!({"epsilon": 2.0, "valid_until": until})),
        )
        .await?;
    println!(
        "    {}: ε cap {} (asked 3.0), per job {}, valid until {}; the budget is reserved from the dataset's total",
        approved["status"],
        approved["epsilon_cap"],
        approved["per_job_epsilon"],
        approved["application"]["valid_until"]
    );

    step(
        8,
        "Developer prices the job with a dry run (no data read, nothing spent), then submits it: Q1 (trips and fare sums per district, ε = 1.0) through the gate",
    );
    let dry = client
        .call(Method::POST, "/v1/jobs", &dev_token, Some(json!({"scenario_id": scenario_id, "module": module_id, "entry": "main", "params": {"epsilon": 1.0}, "dry_run": true})))
        .await?;
    for answer in dry["answers"].as_array().into_iter().flatten() {
        let columns = answer["estimate"]["columns"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let accuracy: Vec<String> = columns
            .iter()
            .filter(|c| c["kind"] != "key")
            .map(|c| {
                format!(
                    "{} ±{:.1}",
                    c["name"].as_str().unwrap_or("?"),
                    c["ci95_half_width"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect();
        println!(
            "    dry run: would spend ε {:.3}; 95 % intervals {}",
            answer["estimate"]["epsilon"].as_f64().unwrap_or(f64::NAN),
            accuracy.join(", ")
        );
    }
    let submitted = std::time::Instant::now();
    let job = client
        .call(Method::POST, "/v1/jobs", &dev_token, Some(json!({"scenario_id": scenario_id, "module": module_id, "entry": "main", "params": {"epsilon": 1.0}})))
        .await?;
    let job_id = job["id"].as_str().context("job id")?.to_string();
    let status = loop {
        let j = client
            .call(Method::GET, &format!("/v1/jobs/{job_id}"), &dev_token, None)
            .await?;
        match j["status"].as_str() {
            Some("succeeded") | Some("failed") | Some("awaiting_review") => break j,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    if status["status"] != "awaiting_review" {
        bail!("the job did not finish for review: {status}");
    }
    let elapsed = submitted.elapsed();
    println!(
        "    job {job_id} finished in {:.0} ms from submission ({} rows scanned inside the domain); its report is held for review",
        elapsed.as_secs_f64() * 1000.0,
        opts.rows
    );

    step(
        9,
        "Operator reads the held report and releases it; the developer reads the result",
    );
    let held = client
        .call(Method::GET, "/v1/jobs?status=awaiting_review", &op, None)
        .await?;
    println!(
        "    {} report(s) awaiting review",
        held["jobs"].as_array().map_or(0, Vec::len)
    );
    client
        .call(Method::GET, &format!("/v1/jobs/{job_id}/result"), &op, None)
        .await?;
    client
        .call(
            Method::POST,
            &format!("/v1/jobs/{job_id}/release"),
            &op,
            None,
        )
        .await?;
    let report = client
        .call(
            Method::GET,
            &format!("/v1/jobs/{job_id}/result"),
            &dev_token,
            None,
        )
        .await?;
    print_report(&report);

    step(
        10,
        "Auditor exports the ledger and verifies it offline with the public key",
    );
    let export = client.text("/v1/ledger/export", &aud_token).await?;
    let key = client
        .call(Method::GET, "/v1/ledger/public-key", &aud_token, None)
        .await?;
    let export = crate::ledger::read_export(export.as_bytes())?;
    let summary = crate::ledger::verify(
        &export.entries,
        export.checkpoint.as_ref(),
        key["public_key"].as_str().unwrap_or_default(),
    )?;
    println!(
        "    {} entries verified: hash chain, Ed25519 signatures, Merkle root {} against the signed checkpoint",
        summary.entries,
        &summary.root[..16]
    );
    println!(
        "    replayed against the approval's grant: {} reservation(s), {} released, ε {:.4} charged in total",
        summary.reservations, summary.released, summary.total_epsilon
    );

    step(
        11,
        "Auditor reads the audit trail and verifies its hash chain and signed head",
    );
    let trail = client
        .call(Method::GET, "/v1/audit", &aud_token, None)
        .await?;
    for r in trail["records"].as_array().into_iter().flatten() {
        println!(
            "    #{:<4} {:<9} {:<20} {:<40} {}",
            r["seq"].as_u64().unwrap_or(0),
            r["role"].as_str().unwrap_or("system"),
            r["action"].as_str().unwrap_or("?"),
            r["target"].as_str().unwrap_or("-"),
            r["outcome"].as_str().unwrap_or("?")
        );
    }
    let audit_export = client.text("/v1/audit/export", &aud_token).await?;
    let (records, head) = crate::audit::read_export(audit_export.as_bytes())?;
    let n = crate::audit::verify(&records, head.as_ref(), key["public_key"].as_str())?;
    println!("    {n} records verified: hash chain intact, head signed with the ledger's key");

    server.abort();
    if let Some(d) = &opts.data_dir {
        println!(
            "\nState kept in {}. Try:\n    unseen serve --data-dir {0}\n    unseen ledger export --data-dir {0} --out ledger.jsonl\n    unseen audit verify --data-dir {0}",
            d.display()
        );
    }
    println!("\ndemo finished: every number above left the domain only through the gate.");
    Ok(())
}

fn print_report(report: &Value) {
    let Some(release) = report["releases"].get(0) else {
        println!("    (no release)");
        return;
    };
    let cols: Vec<&str> = release["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    println!("    released table (noisy; ±95 % half-widths below):");
    println!(
        "    {:<10} {:>12} {:>14} {:>10}",
        "district", "trips", "fare_sum", "mean fare"
    );
    let means: Vec<Option<f64>> = report["output"]["q1"]["districts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| d["mean_fare"].as_f64())
        .collect();
    for (i, row) in release["rows"].as_array().into_iter().flatten().enumerate() {
        let cell = |name: &str| {
            cols.iter()
                .position(|c| *c == name)
                .map(|p| row[p].clone())
                .unwrap_or(Value::Null)
        };
        let fmt = |v: Value| match v {
            Value::Null => "suppressed".to_string(),
            Value::Number(n) => format!("{:.0}", n.as_f64().unwrap_or(0.0)),
            other => other.to_string(),
        };
        let mean = means
            .get(i)
            .copied()
            .flatten()
            .map_or("—".into(), |m| format!("{m:.2}"));
        println!(
            "    {:<10} {:>12} {:>14} {:>10}",
            cell("district").as_str().unwrap_or("?"),
            fmt(cell("trips")),
            fmt(cell("fare_sum")),
            mean
        );
    }
    for c in release["columns"].as_array().into_iter().flatten() {
        if let Some(hw) = c["ci95_half_width"].as_f64() {
            println!(
                "    {:<10} Laplace scale {:.3}, 95 % within ±{:.1}",
                c["name"].as_str().unwrap_or("?"),
                c["noise_scale"].as_f64().unwrap_or(0.0),
                hw
            );
        }
    }
    println!(
        "    groups suppressed under the minimum group size: {}",
        release["suppressed_groups"]
    );
    println!(
        "    ε spent by this job: {:.4}; ε left in the scenario: {:.4}",
        report["epsilon_spent"].as_f64().unwrap_or(0.0),
        report["scenario_epsilon_left"].as_f64().unwrap_or(0.0)
    );
    for c in report["citations"].as_array().into_iter().flatten() {
        println!(
            "    data: {} — {}, version {}, acquired {}",
            c["title"], c["source"], c["version_date"], c["acquisition_date"]
        );
    }
}
