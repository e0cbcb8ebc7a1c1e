//! A running server with the three roles registered and the trips table loaded.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use unseen::config::Config;
use unseen::principal::{NewPrincipal, Role};

pub const ROWS: usize = 20_000;

pub struct Server {
    pub base: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub operator: String,
    pub developer: String,
    pub auditor: String,
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after letting the test adjust its config (limits, say).
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let policies = unseen::demo::prepare_trips(dir.path(), ROWS).unwrap();
        let store = unseen::store::Store::open(dir.path()).unwrap();
        let (_, op) = unseen::principal::create(
            &store,
            &NewPrincipal {
                role: Role::Operator,
                name: "Op".into(),
                organisation: None,
                licence_id: None,
            },
        )
        .unwrap();
        drop(store);
        let mut config = Config::new(dir.path());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.policies_dir = Some(policies);
        // A smaller instruction budget keeps the runaway-module tests quick.
        config.limits.fuel_per_job = 300_000_000;
        adjust(&mut config);
        let (addr, handle) = unseen::api::start(config).await.unwrap();
        let mut server = Server {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            dir,
            operator: op.0,
            developer: String::new(),
            auditor: String::new(),
            handle,
        };
        server.developer = server.add_principal("developer", "Dev One").await;
        server.auditor = server.add_principal("auditor", "Aud One").await;
        server
    }

    pub async fn add_principal(&self, role: &str, name: &str) -> String {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/principals",
                &self.operator,
                Some(json!({"role": role, "name": name, "licence_id": "LIC-1"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["token"].as_str().unwrap().to_string()
    }

    pub fn data_path(&self) -> PathBuf {
        self.dir.path().join("data/trips.parquet")
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn upload(&self, token: &str, wasm: &[u8]) -> (StatusCode, Value) {
        // An upload refused for its size is answered before its body is read, and the server
        // closes that connection: `Connection: close` keeps the client from handing it to the
        // next call (the broken pipe mended in `http_errors`).
        let resp = self
            .http
            .post(format!("{}/v1/modules", self.base))
            .bearer_auth(token)
            .header("content-type", "application/wasm")
            .header("connection", "close")
            .body(wasm.to_vec())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    /// Uploads a module as the developer and returns its id, failing the test if refused.
    pub async fn upload_ok(&self, wasm: &[u8]) -> String {
        let (status, body) = self.upload(&self.developer, wasm).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// Applies for a scenario over `columns` of trips as the developer; the operator approves.
    pub async fn approved_scenario(
        &self,
        module: &str,
        columns: &[&str],
        epsilon: f64,
        per_job: f64,
    ) -> String {
        self.approved_application(json!({
            "purpose": "testing",
            "columns": {"trips": columns},
            "modules": [module],
            "epsilon": epsilon,
            "per_job_epsilon": per_job,
        }))
        .await
    }

    /// Applies with `application` as the developer; the operator approves it as it is.
    pub async fn approved_application(&self, application: Value) -> String {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/scenarios",
                &self.developer,
                Some(application),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/v1/scenarios/{id}/approve"),
                &self.operator,
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        id
    }

    /// Submits a job as the developer and waits for it to end; returns the job's final JSON.
    pub async fn run_job(&self, scenario: &str, module: &str, entry: &str, params: Value) -> Value {
        let path = self.submit_job(scenario, module, entry, params).await;
        self.wait_job(&path, &self.developer, &["succeeded", "failed"])
            .await
    }

    /// Submits a job as the developer; returns its path, `/v1/jobs/{id}`.
    pub async fn submit_job(
        &self,
        scenario: &str,
        module: &str,
        entry: &str,
        params: Value,
    ) -> String {
        let (status, job) = self
            .call(Method::POST, "/v1/jobs", &self.developer, Some(json!({"scenario_id": scenario, "module": module, "entry": entry, "params": params})))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        format!("/v1/jobs/{}", job["id"].as_str().unwrap())
    }

    /// Polls `GET {path}` (a job) as `token` until its status is one of `statuses`; at most a minute.
    pub async fn wait_job(&self, path: &str, token: &str, statuses: &[&str]) -> Value {
        for _ in 0..1200 {
            let (_, j) = self.call(Method::GET, path, token, None).await;
            if j["status"]
                .as_str()
                .is_some_and(|st| statuses.contains(&st))
            {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{path} did not reach {statuses:?} within a minute");
    }

    pub async fn result(&self, job: &Value) -> Value {
        let (status, report) = self
            .call(
                Method::GET,
                &format!("/v1/jobs/{}/result", job["id"].as_str().unwrap()),
                &self.developer,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{report}");
        report
    }

    /// Runs the query_runner module with `queries` and returns its answers.
    pub async fn ask(&self, scenario: &str, module: &str, queries: Value) -> (Value, Value) {
        let job = self
            .run_job(scenario, module, "main", json!({ "queries": queries }))
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let report = self.result(&job).await;
        (report["output"]["answers"].clone(), report)
    }

    /// Reservations in the ledger: every debit, released or not.
    pub async fn reservations(&self) -> usize {
        let (status, body) = self
            .call(Method::GET, "/v1/ledger?kind=reserve", &self.auditor, None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["entries"].as_array().unwrap().len()
    }

    /// The auditor's ledger export (JSON lines), as text.
    pub async fn ledger_export(&self) -> String {
        self.http
            .get(format!("{}/v1/ledger/export", self.base))
            .bearer_auth(&self.auditor)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The auditor's export verified offline with the ledger's public key, as an auditor would.
    pub async fn verified_ledger(&self) -> unseen::ledger::Summary {
        let (_, key) = self
            .call(Method::GET, "/v1/ledger/public-key", &self.auditor, None)
            .await;
        let export = self.ledger_export().await;
        let parsed = unseen::ledger::read_export(export.as_bytes()).unwrap();
        unseen::ledger::verify(
            &parsed.entries,
            parsed.checkpoint.as_ref(),
            key["public_key"].as_str().unwrap(),
        )
        .unwrap_or_else(|e| panic!("{e:?}"))
    }

    pub async fn health(&self) -> bool {
        self.call(Method::GET, "/v1/health", "", None).await.0 == StatusCode::OK
    }
}

/// Person 1 takes 200 trips in D01 with fares 1, 2, …, 200; persons 2–101 one trip each in
/// D02 at fare 10 (columns person_id, district, fare).
pub fn write_people(path: &std::path::Path) {
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use std::sync::Arc;
    let mut person = vec![1i64; 200];
    let mut district = vec!["D01"; 200];
    let mut fare: Vec<f64> = (1..=200).map(f64::from).collect();
    for p in 2..=101 {
        person.push(p);
        district.push("D02");
        fare.push(10.0);
    }
    write_parquet(
        path,
        vec![
            ("person_id", Arc::new(Int64Array::from(person))),
            ("district", Arc::new(StringArray::from(district))),
            ("fare", Arc::new(Float64Array::from(fare))),
        ],
    );
}

/// Writes `columns` (none nullable) as one Parquet file at `path`.
pub fn write_parquet(path: &std::path::Path, columns: Vec<(&str, arrow::array::ArrayRef)>) {
    use arrow::datatypes::{Field, Schema};
    let schema = std::sync::Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, a)| Field::new(*name, a.data_type().clone(), false))
            .collect::<Vec<_>>(),
    ));
    let batch = arrow::record_batch::RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// Exact trips and fare sums per district (fare clamped to [0, 100]) from the Parquet file,
/// computed here without privacy to judge the noisy release.
pub fn exact_q1(path: &std::path::Path) -> std::collections::BTreeMap<String, (i64, f64)> {
    use arrow::array::{AsArray, Float64Array};
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = std::collections::BTreeMap::new();
    for batch in reader {
        let batch = batch.unwrap();
        let d = batch
            .column_by_name("district")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let f = batch
            .column_by_name("fare")
            .unwrap()
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .clone();
        for i in 0..batch.num_rows() {
            let e: &mut (i64, f64) = out.entry(d.value(i).to_string()).or_default();
            e.0 += 1;
            e.1 += f.value(i).clamp(0.0, 100.0);
        }
    }
    out
}

/// A module in the text format around the contract's exports, with `body` as the entry's code.
pub fn wat_module(imports: &str, body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  {imports}
  (memory (export "memory") 1)
  (global $bump (mut i32) (i32.const 1024))
  (func (export "unseen_alloc") (param i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get 0)))
    (local.get $p))
  (func $entry (export "unseen_entry_main") (param i32 i32) (result i32)
    {body}))"#
    ))
    .unwrap()
}
