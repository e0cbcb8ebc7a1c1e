//! Governance end to end: a scenario through every state with the audit log read back and
//! verified offline; the catalogue managed over HTTP, its open attribute governing what the
//! gate releases; objections; cancelling a job; a bad policy file stopping start-up.

use std::process::Command;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Server, exact_q1, wat_module};

const BIN: &str = env!("CARGO_BIN_EXE_unseen");

fn rfc3339_in(seconds: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

impl Server {
    async fn apply(&self, module: &str, dataset: &str, extra: Value) -> (StatusCode, Value) {
        let mut app = json!({"purpose": "lifecycle", "columns": {dataset: ["district"]}, "modules": [module], "epsilon": 1.0, "per_job_epsilon": 0.5});
        for (k, v) in extra.as_object().unwrap() {
            app[k] = v.clone();
        }
        self.call(Method::POST, "/v1/scenarios", &self.developer, Some(app))
            .await
    }

    async fn decide(&self, id: &str, verb: &str, body: Value) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            &format!("/v1/scenarios/{id}/{verb}"),
            &self.operator,
            Some(body),
        )
        .await
    }

    async fn status_of(&self, id: &str) -> Value {
        let (_, sc) = self
            .call(
                Method::GET,
                &format!("/v1/scenarios/{id}"),
                &self.developer,
                None,
            )
            .await;
        sc
    }

    async fn submit(&self, scenario: &str, module: &str) -> (StatusCode, Value) {
        self.call(Method::POST, "/v1/jobs", &self.developer, Some(json!({"scenario_id": scenario, "module": module, "entry": "main", "params": {"queries": []}})))
            .await
    }

    /// Audit records about one object, in order.
    async fn trail(&self, target: &str) -> Vec<Value> {
        let (status, body) = self
            .call(
                Method::GET,
                &format!("/v1/audit?target={target}"),
                &self.auditor,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["records"].as_array().unwrap().clone()
    }
}

fn actions(trail: &[Value]) -> Vec<(String, String)> {
    trail
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_string(),
                r["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, o)| (a.to_string(), o.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_walks_every_state_and_the_audit_log_tells_it() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;

    // submitted → rejected, with the reason; a second decision is refused and audited too.
    let (_, rejected) = s.apply(&module, "trips", json!({})).await;
    let rejected = rejected["id"].as_str().unwrap().to_string();
    assert_eq!(s.status_of(&rejected).await["status"], "submitted");
    let (status, _) = s
        .decide(&rejected, "reject", json!({"reason": "purpose too broad"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = s.decide(&rejected, "approve", json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("scenario_not_pending"))
    );
    let sc = s.status_of(&rejected).await;
    assert_eq!(
        (sc["status"].as_str(), sc["reason"].as_str()),
        (Some("rejected"), Some("purpose too broad"))
    );
    let trail = s.trail(&rejected).await;
    assert_eq!(
        actions(&trail),
        pairs(&[
            ("apply_scenario", "ok"),
            ("reject_scenario", "ok"),
            ("approve_scenario", "scenario_not_pending"),
        ])
    );
    assert_eq!(trail[1]["detail"]["reason"], "purpose too broad");
    assert_eq!(trail[1]["role"], "operator");
    assert!(trail.iter().all(|r| {
        r["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("req_"))
    }));

    // submitted → approved (tightened, with a short window) → expired.
    let (_, expiring) = s
        .apply(&module, "trips", json!({"valid_until": rfc3339_in(3600)}))
        .await;
    let expiring = expiring["id"].as_str().unwrap().to_string();
    let (status, body) = s
        .decide(
            &expiring,
            "approve",
            json!({"valid_until": rfc3339_in(7200)}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_scenario")),
        "the window may only be shortened"
    );
    let until = rfc3339_in(3);
    let (status, approved) = s
        .decide(
            &expiring,
            "approve",
            json!({"epsilon": 0.5, "per_job_epsilon": 0.25, "valid_until": until}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    assert_eq!(
        (
            approved["status"].as_str(),
            approved["epsilon_cap"].as_f64()
        ),
        (Some("approved"), Some(0.5))
    );
    let (status, job) = s.submit(&expiring, &module).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let sc = s.status_of(&expiring).await;
    assert_eq!(sc["status"], "expired", "{sc}");
    let (status, body) = s.submit(&expiring, &module).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("scenario_not_approved"))
    );
    let trail = s.trail(&expiring).await;
    assert_eq!(
        actions(&trail),
        pairs(&[
            ("apply_scenario", "ok"),
            ("approve_scenario", "invalid_scenario"),
            ("approve_scenario", "ok"),
            ("scenario_expired", "ok"),
        ])
    );
    assert_eq!(trail[2]["detail"]["epsilon"], "0.5");
    assert_eq!(trail[2]["detail"]["valid_until"], until);
    assert_eq!(
        trail[3]["principal_id"],
        Value::Null,
        "expiry is the system's"
    );

    // submitted → approved → suspended, with the reason.
    let (_, suspended) = s.apply(&module, "trips", json!({})).await;
    let suspended = suspended["id"].as_str().unwrap().to_string();
    s.decide(&suspended, "approve", json!({})).await;
    let (status, _) = s
        .decide(
            &suspended,
            "suspend",
            json!({"reason": "licence under review"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.status_of(&suspended).await["status"], "suspended");
    assert_eq!(
        actions(&s.trail(&suspended).await),
        pairs(&[
            ("apply_scenario", "ok"),
            ("approve_scenario", "ok"),
            ("suspend_scenario", "ok"),
        ])
    );

    // A window that has not begun: approved, but no job may start yet.
    let (_, later) = s
        .apply(&module, "trips", json!({"valid_from": rfc3339_in(3600)}))
        .await;
    let later = later["id"].as_str().unwrap().to_string();
    s.decide(&later, "approve", json!({})).await;
    let (status, body) = s.submit(&later, &module).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("scenario_not_started"))
    );

    // The job that ran before expiry is in the trail with its outcome, as the developer's.
    let job_id = job["id"].as_str().unwrap();
    let done = s
        .wait_job(
            &format!("/v1/jobs/{job_id}"),
            &s.developer,
            &["succeeded", "failed"],
        )
        .await;
    let job_trail = s.trail(job_id).await;
    let finished = job_trail
        .iter()
        .find(|r| r["action"] == "job_finished")
        .expect("the job's outcome is audited");
    assert_eq!(finished["outcome"], done["status"]);
    assert_eq!(finished["role"], "developer");

    // The whole log exported with the CLI from the running server verifies offline; any edit
    // to the file is caught and named.
    let dir = s.dir.path();
    let export = dir.join("audit.jsonl");
    let out = Command::new(BIN)
        .args([
            "audit", "export", "--server", &s.base, "--token", &s.auditor, "--out",
        ])
        .arg(&export)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, key) = s
        .call(Method::GET, "/v1/ledger/public-key", &s.auditor, None)
        .await;
    let key = key["public_key"].as_str().unwrap();
    let verify = |file: &std::path::Path| {
        Command::new(BIN)
            .args(["audit", "verify", "--public-key", key, "--export"])
            .arg(file)
            .output()
            .unwrap()
    };
    let ok = verify(&export);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("hash chain intact"));

    let text = std::fs::read_to_string(&export).unwrap();
    let edited = dir.join("edited.jsonl");
    std::fs::write(
        &edited,
        text.replacen("\"purpose too broad\"", "\"purpose fine\"", 1),
    )
    .unwrap();
    let bad = verify(&edited);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    let n = trail_seq(&text, "reject_scenario");
    assert!(
        err.contains(&format!("audit record {n}:")) && err.contains("changed"),
        "{err}"
    );
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop(); // the signed head
    lines.pop(); // the last record: the chain still links, the head no longer matches
    let mut cut = lines.join("\n");
    cut.push('\n');
    cut.push_str(text.lines().last().unwrap());
    let cut_file = dir.join("cut.jsonl");
    std::fs::write(&cut_file, cut).unwrap();
    let bad = verify(&cut_file);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("signed head"));

    // And in place, from the data directory.
    let local = Command::new(BIN)
        .args(["audit", "verify", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        local.status.success(),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
}

/// The sequence number of the first record with `action` in an export.
fn trail_seq(export: &str, action: &str) -> u64 {
    export
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["action"] == action)
        .unwrap()["seq"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_is_managed_over_http_and_the_open_attribute_governs_release() {
    let s = Server::start().await;
    let (_, trips) = s
        .call(Method::GET, "/v1/datasets/trips", &s.operator, None)
        .await;
    let mut policy = trips.clone();
    for k in ["epsilon_reserved", "epsilon_spent", "epsilon_unreserved"] {
        policy.as_object_mut().unwrap().remove(k);
    }
    policy["id"] = json!("open_trips");
    policy["table"] = json!("open_trips");
    policy["open_attribute"] = json!("unconditional");

    let refused = [
        (
            json!({"path": "../unseen.sqlite"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dataset",
            "path",
        ),
        (
            json!({"path": "/etc/hostname"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dataset",
            "path",
        ),
        (
            json!({"total_epsilon": -1.0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dataset",
            "total_epsilon",
        ),
        (
            json!({"columns": {"fare": {"type": "string"}}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dataset",
            "columns.fare.type",
        ),
        (
            json!({"shoe_size": 3}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "shoe_size",
        ),
        (
            json!({"id": "trips"}),
            StatusCode::CONFLICT,
            "dataset_exists",
            "trips",
        ),
    ];
    for (change, want_status, want_code, named) in refused {
        let mut bad = policy.clone();
        for (k, v) in change.as_object().unwrap() {
            bad[k] = v.clone();
        }
        let (status, body) = s
            .call(Method::POST, "/v1/datasets", &s.operator, Some(bad))
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (want_status, Some(want_code)),
            "{change}: {body}"
        );
        assert!(
            body["error"]["message"].as_str().unwrap().contains(named),
            "{body}"
        );
    }
    let (_, list) = s
        .call(Method::GET, "/v1/datasets", &s.developer, None)
        .await;
    assert_eq!(
        list["datasets"].as_array().unwrap().len(),
        1,
        "refusals wrote nothing"
    );

    let (status, created) = s
        .call(
            Method::POST,
            "/v1/datasets",
            &s.operator,
            Some(policy.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["open_attribute"], "unconditional");

    // Unconditional data is released exactly, at ε 0, but still recorded as a use.
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let (_, sc) = s.apply(&module, "open_trips", json!({})).await;
    let sc = sc["id"].as_str().unwrap().to_string();
    s.decide(&sc, "approve", json!({})).await;
    let q = json!([{"sql": "SELECT district, COUNT(*) AS trips FROM open_trips GROUP BY district", "epsilon": 0.5}]);
    let (answers, report) = s.ask(&sc, &module, q.clone()).await;
    let release = &answers[0]["release"];
    assert_eq!(release["epsilon"], 0.0, "{answers}");
    assert_eq!(release["columns"][1]["noise_scale"], 0.0);
    let exact = exact_q1(&s.data_path());
    for row in release["rows"].as_array().unwrap() {
        let district = row[0].as_str().unwrap();
        assert_eq!(row[1].as_i64().unwrap(), exact[district].0, "{district}");
    }
    assert_eq!(report["epsilon_spent"], 0.0);
    assert_eq!(s.reservations().await, 1, "the use is in the ledger");

    // Changing the open attribute needs a reason, and is audited with it.
    let path = "/v1/datasets/open_trips";
    let (status, body) = s
        .call(
            Method::PATCH,
            path,
            &s.operator,
            Some(json!({"open_attribute": "closed"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_dataset"))
    );
    let (status, body) = s
        .call(
            Method::PATCH,
            path,
            &s.operator,
            Some(json!({"open_attribute": "closed", "reason": "the source withdrew it"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["open_attribute"], "closed");
    let (status, body) = s
        .call(
            Method::PATCH,
            path,
            &s.operator,
            Some(json!({"table": "renamed"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")),
        "the privacy policy is fixed once registered"
    );
    let trail = s.trail("open_trips").await;
    let change = trail
        .iter()
        .find(|r| r["action"] == "patch_dataset" && r["outcome"] == "ok")
        .unwrap();
    assert_eq!(change["detail"]["reason"], "the source withdrew it");
    assert_eq!(change["detail"]["open_attribute.from"], "\"unconditional\"");
    assert_eq!(change["detail"]["open_attribute.to"], "\"closed\"");

    // Closed data answers nothing, and takes no new scenarios.
    let (status, job) = s.submit(&sc, &module).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let job = s
        .wait_job(
            &format!("/v1/jobs/{}", job["id"].as_str().unwrap()),
            &s.developer,
            &["failed"],
        )
        .await;
    assert_eq!(job["error"]["code"], "dataset_closed", "{job}");
    let (status, body) = s.apply(&module, "open_trips", json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_scenario"))
    );
    assert_eq!(s.reservations().await, 1);

    // Objections: the developer files, the operator answers once, both read the thread.
    let (status, objection) = s
        .call(
            Method::POST,
            "/v1/datasets/trips/objections",
            &s.developer,
            Some(json!({"text": "district D07 fares look doubled"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{objection}");
    let oid = objection["id"].as_str().unwrap().to_string();
    let (status, _) = s
        .call(
            Method::POST,
            "/v1/datasets/nope/objections",
            &s.developer,
            Some(json!({"text": "x"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let answer = format!("/v1/objections/{oid}/answer");
    let (status, answered) = s
        .call(
            Method::POST,
            &answer,
            &s.operator,
            Some(json!({"answer": "confirmed; corrected in the next version"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answered}");
    let (status, body) = s
        .call(
            Method::POST,
            &answer,
            &s.operator,
            Some(json!({"answer": "again"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("already_answered"))
    );
    let (_, seen) = s
        .call(
            Method::GET,
            &format!("/v1/objections/{oid}"),
            &s.developer,
            None,
        )
        .await;
    assert_eq!(
        (seen["status"].as_str(), seen["answer"].as_str()),
        (
            Some("answered"),
            Some("confirmed; corrected in the next version")
        )
    );
    assert_eq!(
        actions(&s.trail(&oid).await),
        pairs(&[
            ("answer_objection", "ok"),
            ("answer_objection", "already_answered")
        ])
    );
    let filed = s.trail("trips").await;
    assert!(
        filed
            .iter()
            .any(|r| r["action"] == "file_objection" && r["detail"]["objection"] == oid.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_never_runs_and_a_cancelled_running_one_keeps_no_report() {
    let s = Server::start_with(|c| {
        c.limits.concurrent_jobs = 1;
        c.limits.fuel_per_job = 3_000_000_000;
    })
    .await;
    let spin = s
        .upload_ok(&wat_module("", "(loop $l (br $l)) (i32.const 0)"))
        .await;
    let runner = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let (_, sc) = s
        .call(Method::POST, "/v1/scenarios", &s.developer, Some(json!({"purpose": "p", "columns": {"trips": ["district"]}, "modules": [spin, runner], "epsilon": 1.0, "per_job_epsilon": 1.0})))
        .await;
    let sc = sc["id"].as_str().unwrap().to_string();
    s.decide(&sc, "approve", json!({})).await;

    let (_, busy) = s
        .call(
            Method::POST,
            "/v1/jobs",
            &s.developer,
            Some(json!({"scenario_id": sc, "module": spin, "entry": "main"})),
        )
        .await;
    // The slot is taken before the second job is submitted: it must wait in the queue.
    let busy = format!("/v1/jobs/{}", busy["id"].as_str().unwrap());
    s.wait_job(&busy, &s.developer, &["running"]).await;
    let (_, queued) = s
        .call(Method::POST, "/v1/jobs", &s.developer, Some(json!({"scenario_id": sc, "module": runner, "entry": "main", "params": {"queries": [{"sql": "SELECT district, COUNT(*) FROM trips GROUP BY district", "epsilon": 0.1}]}})))
        .await;
    let queued = format!("/v1/jobs/{}", queued["id"].as_str().unwrap());
    let (status, body) = s.call(Method::DELETE, &queued, &s.developer, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled");
    let (status, body) = s.call(Method::DELETE, &queued, &s.developer, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("job_finished"))
    );
    // The running job can be cancelled too: it keeps no report.
    let (status, _) = s.call(Method::DELETE, &busy, &s.developer, None).await;
    assert_eq!(status, StatusCode::OK);
    s.wait_job(&queued, &s.developer, &["cancelled"]).await;
    // Let the slot free and the queued job's task see its cancellation.
    for _ in 0..200 {
        let (_, trail) = s
            .call(
                Method::GET,
                "/v1/audit?action=job_finished",
                &s.auditor,
                None,
            )
            .await;
        if trail["records"].as_array().unwrap().len() == 2 {
            assert!(
                trail["records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r["outcome"] == "cancelled"),
                "{trail}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, job) = s.call(Method::GET, &queued, &s.developer, None).await;
    assert_eq!(job["status"], "cancelled");
    let (status, body) = s
        .call(Method::GET, &format!("{queued}/result"), &s.developer, None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("job_cancelled"))
    );
    assert_eq!(s.reservations().await, 0, "the cancelled job never queried");
}

#[test]
fn a_bad_policy_file_stops_start_up_naming_the_file_the_field_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let good = unseen::demo::TRIPS_POLICY;
    std::fs::write(
        policies.join("broken.toml"),
        good.replace("total_epsilon = ", "total_epsilon = -"),
    )
    .unwrap();
    assert!(
        std::fs::read_to_string(policies.join("broken.toml"))
            .unwrap()
            .contains("total_epsilon = -")
    );
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--policies")
        .arg(&policies)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.toml")
            && err.contains("total_epsilon")
            && err.contains("must be a positive number"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line for a person: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_the_bodies_the_server_takes() {
    let s = Server::start().await;
    let (status, doc) = s.call(Method::GET, "/v1/openapi.json", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let apply = &doc["paths"]["/v1/scenarios"]["post"];
    assert_eq!(apply["operationId"], "apply_scenario");
    let reference = apply["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        .as_str()
        .unwrap();
    let name = reference.strip_prefix("#/components/schemas/").unwrap();
    let schema = &doc["components"]["schemas"][name];
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for field in [
        "purpose",
        "columns",
        "modules",
        "epsilon",
        "per_job_epsilon",
    ] {
        assert!(required.contains(&field), "{field} in {schema}");
    }
    assert_eq!(
        schema["additionalProperties"], false,
        "unknown fields are refused"
    );
    assert!(schema["properties"]["valid_until"].is_object());
    // What the document says is required, the server requires.
    let (status, body) = s
        .call(
            Method::POST,
            "/v1/scenarios",
            &s.developer,
            Some(json!({"purpose": "p"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request"))
    );
    let upload = &doc["paths"]["/v1/modules"]["post"]["requestBody"]["content"];
    assert!(upload["application/wasm"].is_object());
    let audit = &doc["paths"]["/v1/audit"]["get"]["parameters"];
    let names: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"target") && names.contains(&"after"),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_and_auditor_script_their_work_with_the_cli() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let (_, sc) = s.apply(&module, "trips", json!({})).await;
    let sc = sc["id"].as_str().unwrap().to_string();
    let cli = |token: &str, args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env("UNSEEN_SERVER", &s.base)
            .env("UNSEEN_TOKEN", token)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let json_of = |text: &str| serde_json::from_str::<Value>(text).unwrap();

    let (ok, out, err) = cli(&s.operator, &["scenarios", "list"]);
    assert!(ok, "{err}");
    assert_eq!(json_of(&out)["scenarios"][0]["id"], sc.as_str());

    let (ok, out, err) = cli(
        &s.operator,
        &[
            "scenarios",
            "approve",
            &sc,
            "--epsilon",
            "0.5",
            "--require-review",
        ],
    );
    assert!(ok, "{err}");
    let approved = json_of(&out);
    assert_eq!(
        (
            approved["status"].as_str(),
            approved["epsilon_cap"].as_f64(),
            approved["requires_review"].as_bool()
        ),
        (Some("approved"), Some(0.5), Some(true))
    );
    let (ok, _, err) = cli(
        &s.operator,
        &["scenarios", "reject", &sc, "--reason", "late"],
    );
    assert!(!ok);
    assert!(err.contains("scenario_not_pending (409)"), "{err}");
    let (ok, _, err) = cli(&"0".repeat(64), &["scenarios", "list"]);
    assert!(!ok);
    assert!(err.contains("unauthenticated (401)"), "{err}");

    // The catalogue: a new dataset from a policy file, then an open-attribute change.
    let file = s.dir.path().join("second.toml");
    std::fs::write(
        &file,
        unseen::demo::TRIPS_POLICY
            .replace("id = \"trips\"", "id = \"trips_b\"")
            .replace("table = \"trips\"", "table = \"trips_b\""),
    )
    .unwrap();
    let (ok, out, err) = cli(
        &s.operator,
        &["datasets", "register", file.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert_eq!(json_of(&out)["id"], "trips_b");
    let (ok, out, err) = cli(
        &s.operator,
        &[
            "datasets",
            "set-open",
            "trips_b",
            "closed",
            "--reason",
            "withdrawn by the source",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(json_of(&out)["open_attribute"], "closed");

    let (ok, out, err) = cli(
        &s.operator,
        &[
            "principals",
            "add",
            "--role",
            "auditor",
            "--name",
            "Second Auditor",
        ],
    );
    assert!(ok, "{err}");
    let new_auditor = json_of(&out)["token"].as_str().unwrap().to_string();

    let (ok, out, err) = cli(&new_auditor, &["audit", "list", "--target", &sc]);
    assert!(ok, "{err}");
    let trail: Vec<String> = json_of(&out)["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["action"].as_str().unwrap(),
                r["outcome"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        trail,
        [
            "apply_scenario:ok",
            "approve_scenario:ok",
            "reject_scenario:scenario_not_pending"
        ]
    );
    let (ok, out, err) = cli(&new_auditor, &["budget"]);
    assert!(ok, "{err}");
    assert_eq!(json_of(&out)["scenarios"][0]["epsilon_cap"], 0.5);
}
