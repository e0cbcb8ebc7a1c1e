//! The ledger under stress: 32 clients racing one cap over HTTP, and SIGKILL at random moments
//! during a stream of jobs against the real `unseen serve` binary.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{ROWS, Server, wat_module};

/// A module whose entry asks one fixed DP query (ε = `epsilon`) and outputs `{}`.
fn one_query_module(epsilon: &str) -> Vec<u8> {
    let request = format!(
        r#"{{"sql":"SELECT district, COUNT(*) AS n FROM trips GROUP BY district","epsilon":{epsilon}}}"#
    );
    let len = request.len();
    let escaped = request.replace('"', "\\\"");
    wat_module(
        &format!(
            r#"(import "unseen" "query" (func $q (param i32 i32) (result i32)))
  (import "unseen" "take_response" (func $t (param i32 i32) (result i32)))
  (import "unseen" "set_output" (func $o (param i32 i32) (result i32)))
  (data (i32.const 16) "{escaped}")
  (data (i32.const 600) "{{}}")"#
        ),
        &format!(
            "(drop (call $t (i32.const 8192) (call $q (i32.const 16) (i32.const {len}))))
    (drop (call $o (i32.const 600) (i32.const 2)))
    (i32.const 0)"
        ),
    )
}

/// A released query's ledger commit is written without fsync (the sync that makes the job's
/// outcome durable covers it). An auditor who lists the ledger in between is answered only
/// after a sync (a commit with fsync of the `durability` row) has made what it shows durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_sees_ledger_entries_only_once_they_are_durable() {
    let s = Server::start().await;
    let module = s.upload_ok(&one_query_module("0.1")).await;
    // Padded: the job's outcome, and the sync with it, wait for the deadline, while its
    // ledger commit is written as soon as the query is released.
    let scenario = s
        .approved_application(json!({
            "purpose": "testing",
            "columns": {"trips": ["district"]},
            "modules": [module],
            "epsilon": 1.0,
            "per_job_epsilon": 1.0,
            "pad_to_seconds": 5,
        }))
        .await;
    let path = s.submit_job(&scenario, &module, "main", json!({})).await;
    // Read beside the server, so that reading syncs nothing.
    let db = rusqlite::Connection::open(s.dir.path().join("unseen.sqlite")).unwrap();
    let commits = || -> i64 {
        db.query_row(
            "SELECT COUNT(*) FROM ledger WHERE kind = 'commit'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    let synced_at = || -> Option<String> {
        db.query_row("SELECT synced_at FROM durability", [], |r| r.get(0))
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(4);
    while commits() == 0 {
        assert!(Instant::now() < deadline, "the commit was not written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, running) = s.call(Method::GET, &path, &s.developer, None).await;
    assert_eq!(running["status"], "running", "still padded: {running}");
    let before = synced_at();
    assert!(before.is_some(), "the reservation was synced");
    let (status, body) = s
        .call(Method::GET, "/v1/ledger?kind=commit", &s.auditor, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["entries"].as_array().unwrap().len(), 1, "{body}");
    assert_ne!(
        synced_at(),
        before,
        "the listing was made durable before it was answered"
    );
    let done = s
        .wait_job(&path, &s.developer, &["succeeded", "failed"])
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_clients_racing_one_cap_get_exactly_what_fits() {
    // Every job asks the same query: with reuse, later ones would take the first's release.
    // This test is about 32 debits racing one cap, so each is computed and charged.
    let s = Server::start_with(|c| {
        c.limits.concurrent_jobs = 32;
        c.limits.reuse_releases = false;
    })
    .await;
    let module = s.upload_ok(&one_query_module("0.1")).await;
    // 1.05, not 1.0: ten debits then leave 0.05, so the scenario never becomes `exhausted`
    // and all 32 jobs reach the ledger's check instead of being refused at submission.
    let scenario = s
        .approved_scenario(&module, &["district"], 1.05, 1.05)
        .await;
    let jobs = (0..32).map(|_| s.run_job(&scenario, &module, "main", json!({})));
    let finished = join_all(jobs).await;
    let mut released = 0;
    for job in &finished {
        assert_eq!(job["status"], "succeeded", "{job}");
        let report = s.result(job).await;
        released += report["releases"].as_array().unwrap().len();
    }
    assert_eq!(released, 10, "⌊1.05 / 0.1⌋ releases fit under the cap");
    assert_eq!(
        s.reservations().await,
        10,
        "refused queries reserve nothing"
    );
    let (_, totals) = s
        .call(Method::GET, "/v1/ledger/totals", &s.auditor, None)
        .await;
    let spent = totals["per_scenario"][format!("{scenario}/trips")]["spent"]
        .as_f64()
        .unwrap();
    assert!(spent <= 1.0 + 1e-9, "{spent}");
    let (_, sc) = s
        .call(
            Method::GET,
            &format!("/v1/scenarios/{scenario}"),
            &s.developer,
            None,
        )
        .await;
    assert_eq!(sc["status"], "approved", "0.05 is left: {sc}");
    assert_eq!(
        totals["released"], 10,
        "every charged reservation was committed with its release"
    );
    let (_, budget) = s.call(Method::GET, "/v1/budget", &s.developer, None).await;
    assert!((budget["scenarios"][0]["epsilon_spent"].as_f64().unwrap() - spent).abs() < 1e-12);
}

/// Polls every future until all are ready (they borrow the test's server, so no spawning).
async fn join_all<F: std::future::Future<Output = Value>>(
    futs: impl Iterator<Item = F>,
) -> Vec<Value> {
    use std::task::Poll;
    let mut futs: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<Value>> = vec![None; futs.len()];
    std::future::poll_fn(|cx| {
        for (f, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                if let Poll::Ready(v) = f.as_mut().poll(cx) {
                    *slot = Some(v);
                }
            }
        }
        if out.iter().all(Option::is_some) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// `unseen serve` as a child process; killed with SIGKILL when dropped.
struct Process {
    child: Child,
    base: String,
}

impl Process {
    /// Every job of these tests asks the same query; `limits.toml` turns reuse off so each is
    /// computed and charged (what is under test is the ledger across kills).
    fn start(dir: &std::path::Path) -> Process {
        let policies = dir.join("no-reuse");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("limits.toml"), "reuse_releases = false\n").unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_unseen"))
            .args(["serve", "--listen", "127.0.0.1:0", "--policies"])
            .arg(&policies)
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(addr) = line.strip_prefix("unseen listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server did not start");
        Process { child, base }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
    }
}

async fn call(
    http: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> Option<(StatusCode, Value)> {
    let mut req = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(30));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.ok()?;
    let status = resp.status();
    Some((status, resp.json().await.ok()?))
}

/// A job run to its end by one client; `None` if the server died before it answered.
async fn one_job(
    http: &reqwest::Client,
    base: &str,
    dev: &str,
    scenario: &str,
    module: &str,
) -> Option<Value> {
    let (status, job) = call(
        http,
        base,
        Method::POST,
        "/v1/jobs",
        dev,
        Some(json!({"scenario_id": scenario, "module": module, "entry": "main"})),
    )
    .await?;
    if status != StatusCode::ACCEPTED {
        return None;
    }
    let id = job["id"].as_str()?.to_string();
    loop {
        let (_, j) = call(
            http,
            base,
            Method::GET,
            &format!("/v1/jobs/{id}"),
            dev,
            None,
        )
        .await?;
        match j["status"].as_str() {
            Some("succeeded") => {
                return call(
                    http,
                    base,
                    Method::GET,
                    &format!("/v1/jobs/{id}/result"),
                    dev,
                    None,
                )
                .await
                .map(|(_, r)| r);
            }
            Some("failed") => return None,
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    // 20 rounds in CI; UNSEEN_KILL_ROUNDS=300 for the long run.
    let rounds: usize = std::env::var("UNSEEN_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let policies = unseen::demo::prepare_trips(dir.path(), ROWS).unwrap();
    let store = unseen::store::Store::open(dir.path()).unwrap();
    let new = |role, name: &str, licence: Option<&str>| unseen::principal::NewPrincipal {
        role,
        name: name.into(),
        organisation: None,
        licence_id: licence.map(String::from),
    };
    let (_, op) =
        unseen::principal::create(&store, &new(unseen::principal::Role::Operator, "Op", None))
            .unwrap();
    let (_, dev) = unseen::principal::create(
        &store,
        &new(unseen::principal::Role::Developer, "Dev", Some("LIC-1")),
    )
    .unwrap();
    let (_, aud) =
        unseen::principal::create(&store, &new(unseen::principal::Role::Auditor, "Aud", None))
            .unwrap();
    let ledger = unseen::ledger::Ledger::open(store.clone(), dir.path()).unwrap();
    unseen::catalog::load_policies_dir(&store, dir.path(), &policies).unwrap();
    let key = ledger.public_key_hex();
    drop((ledger, store));
    let (op, dev, aud) = (op.0, dev.0, aud.0);
    let http = reqwest::Client::new();

    let server = Process::start(dir.path());
    let wasm = one_query_module("0.001");
    let resp = http
        .post(format!("{}/v1/modules", server.base))
        .bearer_auth(&dev)
        .body(wasm)
        .send()
        .await
        .unwrap();
    let module = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, sc) = call(&http, &server.base, Method::POST, "/v1/scenarios", &dev, Some(json!({"purpose": "crash", "columns": {"trips": ["district"]}, "modules": [module], "epsilon": 15.0, "per_job_epsilon": 1.0}))).await.unwrap();
    let scenario = sc["id"].as_str().unwrap().to_string();
    call(
        &http,
        &server.base,
        Method::POST,
        &format!("/v1/scenarios/{scenario}/approve"),
        &op,
        None,
    )
    .await
    .unwrap();
    drop(server);

    let mut rng = rand::rngs::StdRng::seed_from_u64(6962);
    let mut acknowledged: Vec<Value> = Vec::new();
    for _ in 0..rounds {
        let server = Process::start(dir.path());
        let kill_after = Duration::from_millis(rng.random_range(50..1200));
        let started = Instant::now();
        // Four clients stream jobs until the kill.
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (http, base, dev, scenario, module) = (
                http.clone(),
                server.base.clone(),
                dev.clone(),
                scenario.clone(),
                module.clone(),
            );
            clients.spawn(async move {
                let mut done = Vec::new();
                loop {
                    match one_job(&http, &base, &dev, &scenario, &module).await {
                        Some(report) => done.push(report),
                        None => return done,
                    }
                }
            });
        }
        tokio::time::sleep(kill_after.saturating_sub(started.elapsed())).await;
        drop(server); // SIGKILL, mid-stream
        while let Some(done) = clients.join_next().await {
            acknowledged.extend(done.unwrap());
        }
    }

    // Restart once more and audit what survived.
    let server = Process::start(dir.path());
    let export = http
        .get(format!("{}/v1/ledger/export", server.base))
        .bearer_auth(&aud)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let parsed = unseen::ledger::read_export(export.as_bytes()).unwrap();
    let summary = unseen::ledger::verify(&parsed.entries, parsed.checkpoint.as_ref(), &key)
        .expect("chain, signatures, root and replay intact");
    assert_eq!(
        summary.open_reservations, 0,
        "every reservation left by a kill was closed at restart"
    );
    assert!(
        !acknowledged.is_empty(),
        "some jobs must have finished between kills"
    );

    // No acknowledged entry lost or altered: every report's proofs still hold, against the
    // entries now in the ledger, and its checkpoint is a prefix of today's tree.
    for report in &acknowledged {
        let evidence: unseen::jobs::LedgerEvidence =
            serde_json::from_value(report["ledger"].clone()).unwrap();
        assert!(unseen::ledger::verify_checkpoint(
            &evidence.checkpoint,
            &key
        ));
        for r in &evidence.releases {
            for proof in [&r.reservation, &r.commit] {
                let entry = &parsed.entries[proof.seq as usize - 1];
                assert_eq!(
                    entry.hash, proof.leaf_hash,
                    "entry {} changed after it was acknowledged",
                    proof.seq
                );
            }
            assert!(matches!(
                parsed.entries[r.commit.seq as usize - 1].body.event,
                unseen::ledger::Event::Commit { released: true, .. }
            ));
        }
        let (_, c) = call(
            &http,
            &server.base,
            Method::GET,
            &format!(
                "/v1/ledger/consistency?from={}",
                evidence.checkpoint.tree_size
            ),
            &aud,
            None,
        )
        .await
        .unwrap();
        let proof: unseen::ledger::ConsistencyProof =
            serde_json::from_value(c["proof"].clone()).unwrap();
        let now = parsed.checkpoint.as_ref().unwrap();
        assert_eq!(
            (proof.from_size, proof.to_size),
            (evidence.checkpoint.tree_size, now.tree_size)
        );
        assert!(unseen::ledger::verify_consistency(
            &proof,
            &evidence.checkpoint.root,
            &now.root
        ));
    }
    // Nothing counted twice: spent equals the sum of the reservations, and the running totals agree.
    let (_, budget) = call(&http, &server.base, Method::GET, "/v1/budget", &dev, None)
        .await
        .unwrap();
    let spent = budget["scenarios"][0]["epsilon_spent"].as_f64().unwrap();
    assert!(
        (spent - summary.total_epsilon).abs() < 1e-9,
        "{spent} vs {}",
        summary.total_epsilon
    );
    assert!(summary.released as usize >= acknowledged.len());
    eprintln!(
        "{rounds} kills: {} jobs acknowledged, {} reservations, {} released, {} closed without release",
        acknowledged.len(),
        summary.reservations,
        summary.released,
        summary.closed_without_release
    );
}
