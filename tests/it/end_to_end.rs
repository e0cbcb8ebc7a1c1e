//! The demo's path as a test: upload, scenario, approval, a Q1 job, the release, the budget,
//! and the ledger verified offline — including by the `unseen` binary.

use reqwest::Method;
use serde_json::json;

use crate::support::{Server, exact_q1};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_q1_job_goes_from_upload_to_a_verified_dp_release() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::DISTRICT_STATS).await;
    let (_, mine) = s.call(Method::GET, "/v1/modules", &s.developer, None).await;
    assert_eq!(mine["modules"][0]["id"], module);
    assert_eq!(mine["modules"][0]["entries"], json!(["main"]));

    let scenario = s
        .approved_scenario(&module, &["district", "fare"], 3.0, 1.0)
        .await;
    let job = s
        .run_job(&scenario, &module, "main", json!({"epsilon": 1.0}))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let report = s.result(&job).await;

    // One release: the 16 public districts in catalogue order, every one present.
    let release = &report["releases"][0];
    let names: Vec<_> = release["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let kinds: Vec<_> = release["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["district", "trips", "fare_sum"]);
    assert_eq!(kinds, ["key", "count", "sum"]);
    let rows = release["rows"].as_array().unwrap();
    let keys: Vec<_> = rows
        .iter()
        .map(|r| r[0].as_str().unwrap().to_string())
        .collect();
    let expected_keys: Vec<_> = (1..=16).map(|k| format!("D{k:02}")).collect();
    assert_eq!(keys, expected_keys);

    // Noisy, but close: Laplace scale 2 on counts and 200 on sums (ε = 0.5 each). Forty scales
    // is a bound the noise exceeds with probability e^-40 per cell.
    let count_scale = release["columns"][1]["noise_scale"].as_f64().unwrap();
    let sum_scale = release["columns"][2]["noise_scale"].as_f64().unwrap();
    assert!(
        (count_scale - 2.0).abs() < 1e-6 && (sum_scale - 200.0).abs() < 1e-3,
        "{count_scale} {sum_scale}"
    );
    let exact = exact_q1(&s.data_path());
    let mut differs = false;
    for row in rows {
        let (n, sum) = exact[row[0].as_str().unwrap()];
        let noisy_n = row[1].as_i64().unwrap();
        let noisy_sum = row[2].as_f64().unwrap();
        assert!(
            (noisy_n - n).abs() as f64 <= 40.0 * count_scale,
            "count {noisy_n} vs {n}"
        );
        assert!(
            (noisy_sum - sum).abs() <= 40.0 * sum_scale,
            "sum {noisy_sum} vs {sum}"
        );
        differs |= noisy_n != n;
    }
    // P(all 16 discrete-Laplace draws are 0) is about 1e-10: a gate that adds no noise fails here.
    assert!(differs, "every count was exact: no noise was added");

    // The module's post-processing is in the report, computed from the release.
    let districts = report["output"]["q1"]["districts"].as_array().unwrap();
    let first = &districts[0];
    let mean = rows[0][2].as_f64().unwrap() / rows[0][1].as_f64().unwrap();
    assert!((first["mean_fare"].as_f64().unwrap() - mean).abs() < 1e-9);

    // Budget: spent what OpenDP's maps say, no more than asked; the rest is left.
    let spent = report["epsilon_spent"].as_f64().unwrap();
    assert!(spent <= 1.0 + 1e-12 && spent > 0.999, "{spent}");
    assert_eq!(release["epsilon"].as_f64().unwrap(), spent);
    assert!((report["scenario_epsilon_left"].as_f64().unwrap() - (3.0 - spent)).abs() < 1e-9);
    let (_, budget) = s.call(Method::GET, "/v1/budget", &s.developer, None).await;
    assert!((budget["scenarios"][0]["epsilon_spent"].as_f64().unwrap() - spent).abs() < 1e-12);

    // Citations: source and version date of the data.
    assert_eq!(report["citations"][0]["dataset"], "trips");
    assert_eq!(report["citations"][0]["version_date"], "2026-11-01");
    assert_eq!(report["citations"][0]["acquisition_date"], "2026-11-05");

    // The report proves its debit: a signed checkpoint and inclusion proofs of the release's
    // reserve and commit entries under it.
    let (_, key) = s
        .call(Method::GET, "/v1/ledger/public-key", &s.developer, None)
        .await;
    let key = key["public_key"].as_str().unwrap().to_string();
    let evidence: unseen::jobs::LedgerEvidence =
        serde_json::from_value(report["ledger"].clone()).unwrap();
    assert!(unseen::ledger::verify_checkpoint(
        &evidence.checkpoint,
        &key
    ));
    let proofs = &evidence.releases[0];
    assert_eq!(
        proofs.reservation.seq,
        release["ledger_entry"].as_u64().unwrap()
    );
    assert!(unseen::ledger::verify_inclusion(
        &proofs.reservation,
        &evidence.checkpoint.root
    ));
    assert!(unseen::ledger::verify_inclusion(
        &proofs.commit,
        &evidence.checkpoint.root
    ));
    assert!(!unseen::ledger::verify_inclusion(
        &proofs.commit,
        &"00".repeat(32)
    ));

    // The auditor's export verifies with the public key — grant, reserve, commit — and a copy
    // with the reservation's ε edited does not.
    let export = s.ledger_export().await;
    let parsed = unseen::ledger::read_export(export.as_bytes()).unwrap();
    let summary =
        unseen::ledger::verify(&parsed.entries, parsed.checkpoint.as_ref(), &key).unwrap();
    assert_eq!(
        (
            summary.entries,
            summary.grants,
            summary.reservations,
            summary.released
        ),
        (3, 1, 1, 1)
    );
    assert_eq!(summary.checkpoint_size, Some(3));
    let mut lines: Vec<String> = export.lines().map(String::from).collect();
    let mut reserve: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(reserve["body"]["kind"], "reserve");
    reserve["body"]["epsilon"] = json!(0.1);
    lines[1] = reserve.to_string();
    let tampered = unseen::ledger::read_export(lines.join("\n").as_bytes()).unwrap();
    let err =
        unseen::ledger::verify(&tampered.entries, tampered.checkpoint.as_ref(), &key).unwrap_err();
    assert_eq!(err.seq, 2);
    assert!(err.problem.contains("edited"), "{err}");

    // The auditor's totals replay the ledger against the grant.
    let (_, totals) = s
        .call(Method::GET, "/v1/ledger/totals", &s.auditor, None)
        .await;
    let key_name = format!("{scenario}/trips");
    assert_eq!(totals["per_scenario"][&key_name]["cap"], 3.0);
    assert!((totals["per_scenario"][&key_name]["spent"].as_f64().unwrap() - spent).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_exports_and_verifies_the_ledger_offline() {
    let s = Server::start().await;
    let module = s.upload_ok(unseen::examples::DISTRICT_STATS).await;
    let scenario = s
        .approved_scenario(&module, &["district", "fare"], 3.0, 1.0)
        .await;
    // Two different ε: the same job again would get its earlier release, free.
    for epsilon in [0.5, 0.25] {
        let job = s
            .run_job(&scenario, &module, "main", json!({ "epsilon": epsilon }))
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    let bin = env!("CARGO_BIN_EXE_unseen");
    let dir = s.dir.path();
    let export = dir.join("ledger.jsonl");
    let out = std::process::Command::new(bin)
        .args(["ledger", "export", "--data-dir"])
        .arg(dir)
        .arg("--out")
        .arg(&export)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = std::process::Command::new(bin)
        .args(["ledger", "public-key", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(key.status.success());
    let key = String::from_utf8(key.stdout).unwrap();

    let verify = |file: &std::path::Path| {
        std::process::Command::new(bin)
            .args(["ledger", "verify", "--export"])
            .arg(file)
            .args(["--public-key", key.trim()])
            .output()
            .unwrap()
    };
    let ok = verify(&export);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // A grant and two (reserve, commit) pairs.
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("\"entries\": 5"),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    // Any one entry changed, removed or swapped: the verifier must refuse and name it.
    let text = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let mut changed = lines.clone();
    let mut reserve: serde_json::Value = serde_json::from_str(&changed[3]).unwrap();
    reserve["body"]["epsilon"] = json!(0.01);
    changed[3] = reserve.to_string();
    let mut removed = lines.clone();
    removed.remove(0);
    let mut swapped = lines.clone();
    swapped.swap(1, 3);
    for (name, copy, seq) in [
        ("changed", changed, 4),
        ("removed", removed, 1),
        ("swapped", swapped, 2),
    ] {
        let file = dir.join(format!("{name}.jsonl"));
        std::fs::write(&file, copy.join("\n")).unwrap();
        let bad = verify(&file);
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success(), "{name} copy verified");
        assert!(
            stderr.contains(&format!("ledger entry {seq}:")),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn the_demo_walks_all_three_roles_and_verifies_both_logs() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_unseen"))
        .args(["demo", "--rows", "20000", "--data-dir"])
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "approves it, tightening ε",
        "1 report(s) awaiting review",
        "release_job",
        "records verified: hash chain intact",
        "entries verified",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}
