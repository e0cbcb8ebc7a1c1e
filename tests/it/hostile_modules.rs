//! Hostile modules: each is refused at upload or ends in a clear error for its own job, while
//! the server keeps serving and no budget moves.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::{Server, wat_module};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_outside_the_contract_are_refused_at_upload() {
    let s = Server::start_with(|c| c.limits.max_module_bytes = 256 * 1024).await;
    let cases: Vec<(Vec<u8>, StatusCode, &str, &str)> = vec![
        (
            wat_module(r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#, "(i32.const 0)"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_import",
            "wasi_snapshot_preview1::fd_write",
        ),
        (
            wat_module(r#"(import "unseen" "query" (func (param i64) (result i32)))"#, "(i32.const 0)"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_import",
            "unseen::query",
        ),
        (b"(module)".to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_module", "not a valid"),
        (b"\0asm\x01\0\0\0garbage".to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_module", "not a valid"),
        (wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap(), StatusCode::UNPROCESSABLE_ENTITY, "missing_export", "unseen_alloc"),
        (
            wat::parse_str(r#"(module (memory (export "memory") 2000) (func (export "unseen_alloc") (param i32) (result i32) (i32.const 0)) (func (export "unseen_entry_main") (param i32 i32) (result i32) (i32.const 0)))"#).unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "module_over_limits",
            "memory",
        ),
        (vec![0u8; 300 * 1024], StatusCode::PAYLOAD_TOO_LARGE, "module_too_large", "limited"),
    ];
    for (bytes, status, code, says) in cases {
        let (got, body) = s.upload(&s.developer, &bytes).await;
        assert_eq!(got, status, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    }
    let (_, mine) = s.call(Method::GET, "/v1/modules", &s.developer, None).await;
    assert_eq!(
        mine["modules"],
        json!([]),
        "a refused upload must store nothing"
    );
}

/// Names are the module's to choose: exports and imports with names of 60,000 characters,
/// control characters, or by the thousand are refused with a short message that quotes at
/// most 64 characters of any name, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_hostile_names_are_refused_with_bounded_messages() {
    let s = Server::start_with(|c| c.limits.max_module_bytes = 1024 * 1024).await;
    // Under wasmparser's 100,000-byte limit on one name (a longer one makes the module invalid).
    let huge = "a".repeat(60_000);
    let frame_fn = |export: &str| {
        format!(r#"(func (export "{export}") (param i32 i32) (result i32) (i32.const 0))"#)
    };
    let many = |prefix: &str, n: usize| -> String {
        (0..n).map(|i| frame_fn(&format!("{prefix}f{i}"))).collect()
    };
    // A signature export answering (ptr 0, len 2^31 - 1).
    let lying_signature = r#"(func (export "unseen_udf_f") (param i32 i32) (result i32) (i32.const 0))
        (func (export "unseen_sig_f") (result i64) (i64.const 0x7fffffff))"#;
    let cases: Vec<(String, &str, &str)> = vec![
        (
            frame_fn(&format!("unseen_udf_{huge}")),
            "invalid_function",
            "aaaa…",
        ),
        (
            frame_fn(&format!("unseen_block_{huge}")),
            "invalid_function",
            "aaaa…",
        ),
        (
            frame_fn("unseen_udf_bell\\07\\1b[2Jname"),
            "invalid_function",
            "UDF export",
        ),
        (frame_fn("unseen_udf_Upper"), "invalid_function", "Upper"),
        (
            frame_fn("unseen_udf_no_signature"),
            "invalid_function",
            "no `unseen_sig_no_signature",
        ),
        (lying_signature.to_string(), "invalid_function", "too long"),
        (
            many("unseen_udf_", 2000),
            "module_over_limits",
            "more UDFs than allowed",
        ),
        (
            many("unseen_block_", 2000),
            "module_over_limits",
            "more block functions",
        ),
        (
            format!(r#"(import "{huge}" "{huge}" (func))"#),
            "unknown_import",
            "aaaa…",
        ),
        (
            frame_fn(&format!("unseen_udf_{}", "b".repeat(200_000))),
            "invalid_module",
            "not a valid",
        ),
    ];
    for (items, code, says) in cases {
        let bytes = wat_module(&items, "(i32.const 0)");
        let (got, body) = s.upload(&s.developer, &bytes).await;
        assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY, "{code}: {body:.300}");
        assert_eq!(body["error"]["code"], code, "{body:.300}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{code}: {message:.300}");
        assert!(
            message.len() < 400,
            "{code}: a {}-byte message",
            message.len()
        );
        assert!(!message.chars().any(char::is_control), "{message:?}");
    }
    // An entry point with a huge name is not an entry point: the module has none.
    let bytes = wat::parse_str(format!(
        r#"(module (memory (export "memory") 1)
            (func (export "unseen_alloc") (param i32) (result i32) (i32.const 0))
            (func (export "unseen_entry_{huge}") (param i32 i32) (result i32) (i32.const 0)))"#
    ))
    .unwrap();
    let (got, body) = s.upload(&s.developer, &bytes).await;
    assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "missing_export", "{body:.300}");
    assert!(body["error"]["message"].as_str().unwrap().len() < 400);
    let (_, mine) = s.call(Method::GET, "/v1/modules", &s.developer, None).await;
    assert_eq!(
        mine["modules"],
        json!([]),
        "a refused upload must store nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_modules_end_their_own_job_and_nothing_else() {
    let s = Server::start().await;
    let evil = [
        (
            "spin",
            wat_module("", "(loop $l (br $l)) (i32.const 0)"),
            "out_of_fuel",
        ),
        (
            "memory",
            wat_module(
                "",
                "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 64)) (i32.const -1)))) (i32.const 0)",
            ),
            "memory_limit",
        ),
        (
            "recursion",
            wat_module("", "(call $entry (local.get 0) (local.get 1))"),
            "stack_overflow",
        ),
        ("trap", wat_module("", "(unreachable)"), "guest_trap"),
    ];
    let good = s.upload_ok(unseen::examples::DISTRICT_STATS).await;
    let mut ids = vec![good.clone()];
    for (_, wasm, _) in &evil {
        ids.push(s.upload_ok(wasm).await);
    }
    let (status, body) = s
        .call(
            Method::POST,
            "/v1/scenarios",
            &s.developer,
            Some(json!({"purpose": "hostile", "columns": {"trips": ["district", "fare"]}, "modules": ids, "epsilon": 2.0, "per_job_epsilon": 1.0})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let scenario = body["id"].as_str().unwrap().to_string();
    s.call(
        Method::POST,
        &format!("/v1/scenarios/{scenario}/approve"),
        &s.operator,
        None,
    )
    .await;

    for (i, (name, _, code)) in evil.iter().enumerate() {
        let module = &ids[i + 1];
        let (status, job) = s
            .call(
                Method::POST,
                "/v1/jobs",
                &s.developer,
                Some(json!({"scenario_id": scenario, "module": module, "entry": "main"})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        // The server answers while the hostile job runs.
        assert!(s.health().await, "health check failed while {name} ran");
        let id = job["id"].as_str().unwrap();
        let done = s
            .wait_job(
                &format!("/v1/jobs/{id}"),
                &s.developer,
                &["succeeded", "failed"],
            )
            .await;
        assert_eq!(done["status"], "failed", "{name}: {done}");
        assert_eq!(done["error"]["code"], *code, "{name}: {done}");
        let (status, result) = s
            .call(
                Method::GET,
                &format!("/v1/jobs/{id}/result"),
                &s.developer,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(result["error"]["code"], "job_failed");
    }
    assert_eq!(s.reservations().await, 0, "no hostile job may spend budget");

    // And an honest job still runs afterwards.
    let job = s
        .run_job(&scenario, &good, "main", json!({"epsilon": 1.0}))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
}

/// A query whose execution needs more memory than `query_memory_bytes` fails with a clear code
/// for its own job; the server and the next job carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_its_memory_pool_fails_alone() {
    let s = Server::start_with(|c| {
        c.limits.query_memory_bytes = 1024;
        c.limits.table_cache_bytes = 0;
    })
    .await;
    let module = s.upload_ok(unseen::examples::QUERY_RUNNER).await;
    let scenario = s
        .approved_application(
            json!({"purpose": "memory", "columns": {"trips": ["district", "cell"]},
            "modules": [module], "epsilon": 5.0, "per_job_epsilon": 5.0, "delta": 1e-5}),
        )
        .await;
    let query = json!({"sql": "SELECT cell, COUNT(*) AS n FROM trips GROUP BY cell", "epsilon": 1.0, "delta": 1e-6});
    let (answers, _) = s.ask(&scenario, &module, json!([query.clone()])).await;
    assert_eq!(answers[0]["error"]["code"], "query_failed", "{answers}");
    // No DataFusion text reaches the module: the gate's own sentence.
    assert_eq!(
        answers[0]["error"]["message"],
        "the query failed while running; its budget stays spent"
    );
    assert!(s.health().await);
    // The debit was durable before the data was read, so it stays (and is closed).
    assert_eq!(s.reservations().await, 1);
    // The server runs the next job as usual.
    let job = s
        .run_job(&scenario, &module, "main", json!({"queries": []}))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
}
