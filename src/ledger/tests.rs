//! The ledger's own guarantees: caps hold under races, every edit to an export or to the
//! database file is caught and named, interrupted reservations stay charged.

use std::sync::Arc;

use super::*;

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    ledger: Arc<Ledger>,
}

fn grant(scenario: &str, epsilon: f64, per_job: f64) -> Event {
    Event::Grant {
        scenario_id: scenario.into(),
        dataset_id: "trips".into(),
        developer_id: "dev".into(),
        epsilon,
        per_job_epsilon: per_job,
        dataset_total: 10.0,
        developer_epsilon: 10.0,
        delta: 0.0,
        dataset_delta: 0.0,
    }
}

fn fixture(grants: Vec<Event>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ledger = Arc::new(Ledger::open(store.clone(), dir.path()).unwrap());
    ledger
        .transact(|_| Ok::<_, LedgerError>(((), grants)))
        .unwrap();
    Fixture { dir, store, ledger }
}

fn reservation<'a>(job: &'a str, scenario: &'a str, epsilon: f64) -> Reservation<'a> {
    Reservation {
        job_id: job,
        scenario_id: scenario,
        dataset_id: "trips",
        developer_id: "dev",
        epsilon,
        delta: 0.0,
        mechanism: "laplace:count".into(),
        mode: "query",
    }
}

/// A grant, then `n` released reservations of ε 0.25 in separate jobs.
fn with_releases(n: usize) -> Fixture {
    let f = fixture(vec![grant("scn", 10.0, 1.0)]);
    for i in 0..n {
        let job = format!("job_{i}");
        let r = f.ledger.reserve(&reservation(&job, "scn", 0.25)).unwrap();
        f.ledger.commit(&r, true, "released").unwrap();
    }
    f
}

fn verify_db(f: &Fixture) -> Result<Summary, String> {
    // As `unseen ledger verify --data-dir` does, reopening the file from scratch.
    let ledger = Ledger::open(f.store.clone(), f.dir.path()).map_err(|e| e.to_string())?;
    let entries = ledger.all_entries().map_err(|e| e.to_string())?;
    verify(
        &entries,
        ledger.recorded_checkpoint().unwrap().as_ref(),
        &ledger.public_key_hex(),
    )
    .map_err(|e| e.to_string())
}

#[test]
fn an_intact_ledger_verifies_replays_and_sums() {
    let f = with_releases(4);
    let cp = f.ledger.checkpoint(true).unwrap();
    let s = verify(
        &f.ledger.all_entries().unwrap(),
        Some(&cp),
        &f.ledger.public_key_hex(),
    )
    .unwrap();
    assert_eq!(
        (
            s.entries,
            s.grants,
            s.reservations,
            s.released,
            s.open_reservations
        ),
        (9, 1, 4, 4, 0)
    );
    assert!((s.total_epsilon - 1.0).abs() < 1e-12);
    assert_eq!(
        s.per_scenario["scn/trips"],
        Level {
            spent: 1.0,
            cap: 10.0
        }
    );
    assert_eq!(s.checkpoint_size, Some(9));
    assert!((f.ledger.spent("scenario", "scn", "trips").unwrap() - 1.0).abs() < 1e-12);
}

#[test]
fn every_kind_of_edit_to_an_export_is_caught_and_named() {
    let f = with_releases(4);
    let good = f.ledger.all_entries().unwrap();
    let cp = f.ledger.checkpoint(false).unwrap();
    let key = f.ledger.public_key_hex();
    assert!(verify(&good, Some(&cp), &key).is_ok());
    let first_bad = |entries: &[Entry]| verify(entries, Some(&cp), &key).unwrap_err().seq;

    let mut edited = good.clone();
    if let Event::Reserve { epsilon, .. } = &mut edited[3].body.event {
        *epsilon = 0.0;
    }
    assert_eq!(first_bad(&edited), 4, "changed ε");

    let mut removed = good.clone();
    removed.remove(2);
    assert_eq!(first_bad(&removed), 3, "removed entry");

    let mut swapped = good.clone();
    swapped.swap(3, 4);
    assert_eq!(first_bad(&swapped), 4, "swapped entries");

    let mut inserted = good.clone();
    inserted.insert(5, good[3].clone());
    assert_eq!(first_bad(&inserted), 6, "inserted entry");

    let mut truncated = good.clone();
    truncated.pop();
    assert!(
        verify(&truncated, Some(&cp), &key)
            .unwrap_err()
            .problem
            .contains("removed from the end")
    );

    let other = Signer::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
    assert_eq!(
        verify(&good, None, &other.public_key_hex())
            .unwrap_err()
            .seq,
        1,
        "wrong key"
    );

    let mut forged_cp = cp.clone();
    forged_cp.tree_size -= 1;
    assert_eq!(
        verify(&good, Some(&forged_cp), &key).unwrap_err().seq,
        0,
        "edited checkpoint"
    );
}

#[test]
fn every_kind_of_edit_to_the_database_file_is_caught_and_named() {
    let edits: [(&str, &str); 5] = [
        ("UPDATE ledger SET body = replace(body, '\"epsilon\":0.25', '\"epsilon\":0.0') WHERE seq = 4", "ledger entry 4"),
        ("UPDATE ledger SET charged = 0 WHERE seq = 4", "ledger entry 4"),
        ("DELETE FROM ledger WHERE seq = 3", "ledger entry 3"),
        ("DELETE FROM ledger WHERE seq = (SELECT MAX(seq) FROM ledger)", "removed from the end"),
        // Reorder: swap the bodies (and signatures) of two entries.
        (
            "UPDATE ledger SET body = (SELECT body FROM ledger l WHERE l.seq = 9 - ledger.seq), hash = (SELECT hash FROM ledger l WHERE l.seq = 9 - ledger.seq),
             signature = (SELECT signature FROM ledger l WHERE l.seq = 9 - ledger.seq) WHERE seq IN (4, 5)",
            "",
        ),
    ];
    for (sql, names) in edits {
        let f = with_releases(4);
        f.ledger.checkpoint(true).unwrap();
        assert!(verify_db(&f).is_ok());
        f.store.conn().execute_batch(sql).unwrap();
        let err = verify_db(&f).expect_err(sql);
        assert!(err.contains(names), "{sql}: {err}");
    }
    // Insert: a copy of a reservation appended with the next sequence number.
    let f = with_releases(2);
    f.store
        .conn()
        .execute_batch(
            "INSERT INTO ledger (seq, body, hash, signature, kind, job_id, scenario_id, dataset_id, developer_id, charged, reservation)
             SELECT 6, replace(body, '\"seq\":2', '\"seq\":6'), hash, signature, kind, job_id, scenario_id, dataset_id, developer_id, charged, reservation FROM ledger WHERE seq = 2",
        )
        .unwrap();
    assert!(verify_db(&f).unwrap_err().contains("ledger entry 6"));
}

#[test]
fn a_reservation_beyond_any_cap_appends_nothing() {
    let f = fixture(vec![grant("scn", 1.0, 0.6)]);
    let r = f.ledger.reserve(&reservation("job_a", "scn", 0.5)).unwrap();
    f.ledger.commit(&r, true, "released").unwrap();
    let before = f.ledger.len();
    // Job level: 0.5 + 0.2 > 0.6.
    let e = f
        .ledger
        .reserve(&reservation("job_a", "scn", 0.2))
        .unwrap_err();
    assert!(
        matches!(e, LedgerError::Overspend { level: "job", .. }),
        "{e}"
    );
    // Scenario level: 0.5 + 0.6 > 1.0.
    let e = f
        .ledger
        .reserve(&reservation("job_b", "scn", 0.6))
        .unwrap_err();
    assert!(
        matches!(
            e,
            LedgerError::Overspend {
                level: "scenario",
                ..
            }
        ),
        "{e}"
    );
    // No grant at all.
    let e = f
        .ledger
        .reserve(&reservation("job_c", "other", 0.1))
        .unwrap_err();
    assert!(matches!(e, LedgerError::NoGrant(_)), "{e}");
    assert_eq!(f.ledger.len(), before);
    assert!((f.ledger.spent("scenario", "scn", "trips").unwrap() - 0.5).abs() < 1e-12);
}

#[test]
fn developer_and_dataset_caps_hold_across_scenarios() {
    let mut g1 = grant("s1", 5.0, 5.0);
    let mut g2 = grant("s2", 5.0, 5.0);
    for g in [&mut g1, &mut g2] {
        if let Event::Grant {
            developer_epsilon,
            dataset_total,
            ..
        } = g
        {
            *developer_epsilon = 1.0;
            *dataset_total = 10.0;
        }
    }
    let f = fixture(vec![g1, g2]);
    f.ledger.reserve(&reservation("j1", "s1", 0.7)).unwrap();
    let e = f.ledger.reserve(&reservation("j2", "s2", 0.7)).unwrap_err();
    assert!(
        matches!(
            e,
            LedgerError::Overspend {
                level: "developer",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn thirty_two_racing_clients_never_overspend() {
    let f = fixture(vec![grant("scn", 1.0, 1.0)]);
    let granted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let ledger = f.ledger.clone();
                s.spawn(move || {
                    let job = format!("job_{i}");
                    ledger.reserve(&reservation(&job, "scn", 0.1)).is_ok() as usize
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(granted, 10, "exactly ⌊1.0 / 0.1⌋ reservations fit");
    let s = verify(
        &f.ledger.all_entries().unwrap(),
        None,
        &f.ledger.public_key_hex(),
    )
    .unwrap();
    assert_eq!(s.reservations, 10);
    assert!(s.total_epsilon <= 1.0 + CAP_TOLERANCE);
    assert!((f.ledger.spent("scenario", "scn", "trips").unwrap() - s.total_epsilon).abs() < 1e-12);
}

#[test]
fn an_interrupted_reservation_stays_charged_and_is_closed_once() {
    let f = fixture(vec![grant("scn", 1.0, 1.0)]);
    let r = f.ledger.reserve(&reservation("job_x", "scn", 0.4)).unwrap();
    drop(r); // the "crash": no commit
    let reopened = Ledger::open(f.store.clone(), f.dir.path()).unwrap();
    assert_eq!(reopened.close_interrupted().unwrap(), 1);
    assert_eq!(reopened.close_interrupted().unwrap(), 0, "closed once only");
    let s = verify(
        &reopened.all_entries().unwrap(),
        None,
        &reopened.public_key_hex(),
    )
    .unwrap();
    assert_eq!(
        (
            s.reservations,
            s.closed_without_release,
            s.open_reservations
        ),
        (1, 1, 0)
    );
    assert!((s.total_epsilon - 0.4).abs() < 1e-12);
    assert!((reopened.spent("scenario", "scn", "trips").unwrap() - 0.4).abs() < 1e-12);
}

#[test]
fn a_commit_cannot_be_duplicated() {
    let f = fixture(vec![grant("scn", 1.0, 1.0)]);
    let r = f.ledger.reserve(&reservation("job_x", "scn", 0.4)).unwrap();
    f.ledger.commit(&r, true, "released").unwrap();
    assert!(
        f.ledger.commit(&r, true, "again").is_err(),
        "the database refuses a second commit"
    );
    // And a duplicated commit in an export is named by the verifier.
    let mut entries = f.ledger.all_entries().unwrap();
    let mut dup = entries[2].clone();
    dup.body.seq = 4;
    dup.body.prev_hash = entries[2].hash.clone();
    entries.push(dup);
    let err = replay(&entries).unwrap_err();
    assert_eq!(err.seq, 4);
    assert!(err.problem.contains("not an open reservation"), "{err}");
}

#[test]
fn inclusion_and_consistency_proofs_check_out_against_checkpoints() {
    let f = with_releases(3);
    let key = f.ledger.public_key_hex();
    let old = f.ledger.checkpoint(false).unwrap();
    for i in 3..6 {
        let job = format!("job_{i}");
        let r = f.ledger.reserve(&reservation(&job, "scn", 0.25)).unwrap();
        f.ledger.commit(&r, true, "released").unwrap();
    }
    let new = f.ledger.checkpoint(false).unwrap();
    assert!(verify_checkpoint(&old, &key) && verify_checkpoint(&new, &key));
    for seq in 1..=new.tree_size {
        let proof = f.ledger.inclusion_proof(seq, new.tree_size).unwrap();
        assert!(verify_inclusion(&proof, &new.root), "entry {seq}");
        assert!(!verify_inclusion(&proof, &old.root));
    }
    let c = f
        .ledger
        .consistency_proof(old.tree_size, new.tree_size)
        .unwrap();
    assert!(verify_consistency(&c, &old.root, &new.root));
    assert!(!verify_consistency(&c, &new.root, &old.root));
}

#[test]
fn delta_is_recorded_as_a_short_decimal_never_below_what_was_spent() {
    for x in [
        9.999_999_999_999_98e-7,
        1e-6,
        3.141_592_653_589_793e-9,
        2.5e-7,
    ] {
        let v = short_decimal_at_least(x);
        assert!(v >= x && v <= x * (1.0 + 2e-5), "{x} -> {v}");
        let text = serde_json::to_string(&v).unwrap();
        assert!(text.len() <= 12, "{text}");
        assert_eq!(serde_json::from_str::<f64>(&text).unwrap(), v);
    }
}

#[test]
fn delta_is_capped_per_scenario_and_replays_the_same_offline() {
    let mut g = grant("scn", 10.0, 10.0);
    if let Event::Grant {
        delta,
        dataset_delta,
        ..
    } = &mut g
    {
        *delta = 2e-6;
        *dataset_delta = 1e-5;
    }
    let f = fixture(vec![g]);
    let with_delta = |job: &'static str, d: f64| Reservation {
        delta: d,
        ..reservation(job, "scn", 0.1)
    };
    f.ledger.reserve(&with_delta("j1", 9.99e-7)).unwrap();
    f.ledger.reserve(&with_delta("j2", 9.99e-7)).unwrap();
    let err = f.ledger.reserve(&with_delta("j3", 9.99e-7)).unwrap_err();
    assert!(
        matches!(
            err,
            LedgerError::DeltaOverspend {
                level: "scenario",
                ..
            }
        ),
        "{err}"
    );
    // Pure ε releases still fit.
    f.ledger.reserve(&reservation("j4", "scn", 0.1)).unwrap();
    let summary = replay(&f.ledger.all_entries().unwrap()).unwrap();
    assert!(
        (summary.total_delta - 1.998e-6).abs() < 1e-15,
        "{}",
        summary.total_delta
    );
}

/// ε as OpenDP's maps give it has up to 17 significant digits (0.49999999999999994,
/// 1.9999999999999998, k/3 …). Every such value must read back to the same double, or the
/// entry's hash would not verify: many awkward values, reserved, then the file verified.
#[test]
fn epsilons_with_seventeen_digits_read_back_exactly_and_verify() {
    let mut g = grant("scn", 1e6, 1e6);
    if let Event::Grant {
        dataset_total,
        developer_epsilon,
        ..
    } = &mut g
    {
        (*dataset_total, *developer_epsilon) = (1e6, 1e6);
    }
    let f = fixture(vec![g]);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut values = vec![
        0.49999999999999994,
        1.9999999999999998,
        1.0 / 3.0,
        0.1 + 0.2,
    ];
    for _ in 0..300 {
        // A deterministic spread of doubles in (0, 2) with full 53-bit mantissas.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        values.push((x >> 11) as f64 / (1u64 << 52) as f64);
    }
    for (i, eps) in values.iter().enumerate() {
        let job = format!("job_{i}");
        let r = f.ledger.reserve(&reservation(&job, "scn", *eps)).unwrap();
        let text = serde_json::to_string(eps).unwrap();
        assert_eq!(serde_json::from_str::<f64>(&text).unwrap(), *eps, "{text}");
        f.ledger.commit(&r, true, "released").unwrap();
    }
    let summary = verify_db(&f).unwrap();
    assert_eq!(summary.reservations, values.len() as u64);
}

/// Every reservation reads its scenario's latest grant. That lookup must be one index step,
/// not a walk back over the scenario's reserves and commits (which grow with every job), and
/// it must still find the latest grant after many jobs and a new one.
#[test]
fn the_grant_lookup_is_indexed_and_finds_the_latest_grant() {
    let f = fixture(vec![grant("scn", 100.0, 1.0)]);
    for i in 0..50 {
        let job = format!("job_{i}");
        let r = f.ledger.reserve(&reservation(&job, "scn", 0.1)).unwrap();
        f.ledger.commit(&r, true, "released").unwrap();
    }
    let plan: Vec<String> = {
        let conn = f.store.conn();
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", Ledger::GRANT_QUERY))
            .unwrap();
        stmt.query_map(params!["scn", "trips"], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert!(
        plan.iter()
            .any(|step| step.contains("USING INDEX ledger_grant")),
        "{plan:?}"
    );
    // A later grant with a per-job cap of 0.2 is the one a reservation is checked against.
    f.ledger
        .transact(|_| Ok::<_, LedgerError>(((), vec![grant("scn", 100.0, 0.2)])))
        .unwrap();
    assert!(f.ledger.reserve(&reservation("late", "scn", 0.5)).is_err());
    assert!(f.ledger.reserve(&reservation("small", "scn", 0.1)).is_ok());
}

#[test]
fn released_commits_carry_their_companion_write_and_wait_for_a_sync() {
    let f = fixture(vec![grant("scn", 10.0, 1.0)]);
    assert!(!f.store.sync().unwrap(), "nothing to make durable yet");
    let r = f.ledger.reserve(&reservation("job_a", "scn", 0.5)).unwrap();
    assert!(!f.store.sync().unwrap(), "a reservation is fsynced itself");
    f.store
        .conn()
        .execute_batch("CREATE TABLE companion (commit_seq INTEGER NOT NULL)")
        .unwrap();
    let commits = f
        .ledger
        .commit_released(std::slice::from_ref(&r), |tx, commits| {
            tx.execute(
                "INSERT INTO companion (commit_seq) VALUES (?1)",
                params![commits[0].body.seq as i64],
            )
            .unwrap();
        })
        .unwrap();
    assert_eq!(commits.len(), 1);
    let seq: i64 = f
        .store
        .read()
        .query_row("SELECT commit_seq FROM companion", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        seq as u64, commits[0].body.seq,
        "written in the commit's transaction"
    );
    let synchronous: i64 = f
        .store
        .conn()
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(synchronous, 2, "FULL again after the commit");
    assert!(
        f.store.sync().unwrap(),
        "the commit was not fsynced: a sync writes"
    );
    assert!(!f.store.sync().unwrap(), "and only once");
    let s = verify_db(&f).unwrap();
    assert_eq!((s.reservations, s.released, s.open_reservations), (1, 1, 0));
}
