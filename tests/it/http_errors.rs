//! Bad input gets a 4xx with a stable code and a sentence, never a 500, and changes nothing.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_stable_codes_and_change_nothing() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::DISTRICT_STATS).await;
    let scenario = s
        .approved_scenario(&module, &["district", "fare"], 2.0, 1.0)
        .await;
    let other_dev = s.add_principal("developer", "Dev Two").await;
    let job = s
        .run_job(&scenario, &module, "main", json!({"epsilon": 0.5}))
        .await;
    let job_path = format!("/v1/jobs/{}", job["id"].as_str().unwrap());

    let raw = |method: Method, path: &str, token: &str, body: &'static str| {
        let mut req = s
            .http
            .request(method, format!("{}{path}", s.base))
            .header("content-type", "application/json")
            .body(body);
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        req
    };
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            raw(Method::GET, "/v1/datasets", "", ""),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        ),
        (
            raw(Method::GET, "/v1/datasets", "unseen_not_a_token", ""),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        ),
        (
            raw(Method::POST, "/v1/jobs", &s.developer, "{not json"),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            raw(
                Method::POST,
                "/v1/jobs",
                &s.developer,
                r#"{"scenario_id": 7, "module": "x", "entry": "main"}"#,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            raw(
                Method::POST,
                "/v1/jobs",
                &s.developer,
                r#"{"scenario_id": "a", "module": "x", "entry": "main", "sneaky": 1}"#,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            raw(
                Method::POST,
                "/v1/jobs",
                &s.developer,
                r#"{"scenario_id": "nope", "module": "x", "entry": "main"}"#,
            ),
            StatusCode::NOT_FOUND,
            "scenario_not_found",
        ),
        (
            raw(
                Method::POST,
                "/v1/jobs",
                &s.operator,
                r#"{"scenario_id": "a", "module": "x", "entry": "main"}"#,
            ),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            raw(
                Method::POST,
                &format!("/v1/scenarios/{scenario}/approve"),
                &s.developer,
                "{}",
            ),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            raw(
                Method::POST,
                &format!("/v1/scenarios/{scenario}/approve"),
                &s.operator,
                "{}",
            ),
            StatusCode::CONFLICT,
            "scenario_not_pending",
        ),
        (
            raw(
                Method::POST,
                "/v1/scenarios/scn_nope/approve",
                &s.operator,
                "{}",
            ),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            raw(Method::GET, "/v1/jobs/job_nope", &s.developer, ""),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            raw(Method::GET, &job_path, &other_dev, ""),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            raw(Method::GET, &format!("{job_path}/result"), &other_dev, ""),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            raw(
                Method::GET,
                &format!("/v1/scenarios/{scenario}"),
                &other_dev,
                "",
            ),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            raw(Method::GET, "/v1/ledger", &s.developer, ""),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            raw(
                Method::POST,
                "/v1/principals",
                &s.auditor,
                r#"{"role": "operator", "name": "x"}"#,
            ),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            raw(
                Method::POST,
                "/v1/principals",
                &s.operator,
                r#"{"role": "developer", "name": "No Licence"}"#,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            raw(Method::GET, "/v1/nowhere", &s.developer, ""),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            raw(Method::DELETE, "/v1/health", "", ""),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            raw(
                Method::PATCH,
                "/v1/datasets/trips",
                &s.operator,
                "{\"open_attribute\":",
            ),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            raw(
                Method::PATCH,
                "/v1/datasets/trips",
                &s.operator,
                r#"{"open_attribute": "secret", "reason": "r"}"#,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            raw(
                Method::PATCH,
                "/v1/datasets/nope",
                &s.operator,
                r#"{"description": "d"}"#,
            ),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            raw(
                Method::POST,
                "/v1/datasets/trips/objections",
                &s.developer,
                r#"{"text": "", "extra": 1}"#,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            raw(
                Method::POST,
                "/v1/objections/obj_nope/answer",
                &s.operator,
                r#"{"answer": "a"}"#,
            ),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            raw(
                Method::GET,
                &format!("{job_path}?wait=soon"),
                &s.developer,
                "",
            ),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            raw(Method::GET, "/v1/audit?limit=-1", &s.auditor, ""),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            raw(Method::DELETE, "/v1/jobs/job_nope", &s.developer, ""),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            raw(
                Method::POST,
                "/v1/scenarios",
                &s.developer,
                r#"{"purpose": "p", "columns": {"trips": ["district"]}, "modules": ["0000000000000000000000000000000000000000000000000000000000000000"], "epsilon": 1, "per_job_epsilon": 1, "valid_until": "next tuesday"}"#,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_scenario",
        ),
    ];
    for (req, status, code) in cases {
        let resp = req.send().await.unwrap();
        let got = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.len() > 10),
            "{body}"
        );
    }

    // An oversize body is refused whole. The server answers before reading it all and then
    // closes the connection; `Connection: close` keeps the client from handing that
    // connection to the next call (which then failed, now and then, with a broken pipe).
    let huge = "x".repeat(2 << 20);
    let resp = s
        .http
        .post(format!("{}/v1/scenarios", s.base))
        .bearer_auth(&s.developer)
        .header("connection", "close")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "body_too_large");

    // Nothing above changed the catalogue or filed an objection.
    let (_, trips) = s
        .call(Method::GET, "/v1/datasets/trips", &s.developer, None)
        .await;
    assert_eq!(trips["open_attribute"], "conditional");
    let (_, objections) = s
        .call(Method::GET, "/v1/objections", &s.operator, None)
        .await;
    assert_eq!(objections["objections"], json!([]));

    // Nothing above created a scenario or a job.
    let (_, scenarios) = s
        .call(Method::GET, "/v1/scenarios", &s.operator, None)
        .await;
    assert_eq!(scenarios["scenarios"].as_array().unwrap().len(), 1);

    // A revoked developer is refused at once, with the same answer as a bad token.
    let (status, created) = s
        .call(
            Method::POST,
            "/v1/principals",
            &s.operator,
            Some(json!({"role": "developer", "name": "Dev Three", "licence_id": "LIC-3"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = created["token"].as_str().unwrap();
    assert_eq!(
        s.call(Method::GET, "/v1/modules", token, None).await.0,
        StatusCode::OK
    );
    let id = created["principal"]["id"].as_str().unwrap();
    let (status, _) = s
        .call(
            Method::DELETE,
            &format!("/v1/principals/{id}"),
            &s.operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = s.call(Method::GET, "/v1/modules", token, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthenticated"))
    );

    let (_, list) = s.call(Method::GET, "/v1/audit", &s.auditor, None).await;
    assert!(
        list["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "revoke_principal" && r["outcome"] == "ok")
    );
}
