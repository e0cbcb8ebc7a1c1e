//! Ledger measurements behind `unseen ledger bench` and `unseen ledger bench-verify`: durable
//! reservations per second on a real SQLite file, and offline verification time of a large
//! signed export. They print JSON lines; nothing here is timed inside a test.

use std::sync::Arc;
use std::time::Instant;

use super::{Entry, EntryBody, Event, Ledger, Reservation, Signer, entry_hash, genesis};

/// One grant with room for any benchmark.
fn unlimited_grant() -> Event {
    Event::Grant {
        scenario_id: "scn".into(),
        dataset_id: "trips".into(),
        developer_id: "dev".into(),
        epsilon: 1e12,
        per_job_epsilon: 1e12,
        dataset_total: 1e12,
        developer_epsilon: 1e12,
        delta: 0.0,
        dataset_delta: 0.0,
    }
}

/// Appends `debits` reservations from `clients` threads against one generous grant.
pub fn durable_debits(clients: usize, debits: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = crate::store::Store::open(dir.path())?;
    let ledger = Arc::new(Ledger::open(store, dir.path())?);
    ledger.transact(|_| Ok::<_, super::LedgerError>(((), vec![unlimited_grant()])))?;
    let clients = clients.max(1);
    let per_client = debits.div_ceil(clients);
    let started = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            let ledger = ledger.clone();
            s.spawn(move || {
                for i in 0..per_client {
                    let job = format!("job_{c}_{i}");
                    let r = Reservation {
                        job_id: &job,
                        scenario_id: "scn",
                        dataset_id: "trips",
                        developer_id: "dev",
                        epsilon: 0.001,
                        delta: 0.0,
                        mechanism: "laplace:count".into(),
                        mode: "query",
                    };
                    if let Err(e) = ledger.reserve(&r) {
                        eprintln!("reserve failed: {e}");
                        return;
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let n = ledger.len() - 1;
    println!(
        "{}",
        serde_json::json!({"bench": "ledger_durable_debits", "clients": clients, "debits": n, "seconds": secs, "debits_per_s": n as f64 / secs, "synchronous": "FULL", "journal": "WAL"})
    );
    Ok(())
}

/// Signs `n` synthetic entries (a grant, then reserve/commit pairs), writes them to a file,
/// and times reading and verifying that file as `unseen ledger verify --export` does.
pub fn verify_entries(n: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let signer = Signer::load_or_create(dir.path())?;
    let started = Instant::now();
    let mut entries: Vec<Entry> = Vec::with_capacity(n as usize);
    let mut tree = super::merkle::Tree::default();
    let mut prev = genesis();
    for seq in 1..=n {
        let event = if seq == 1 {
            unlimited_grant()
        } else if seq % 2 == 0 {
            Event::Reserve {
                job_id: format!("job_{seq}"),
                scenario_id: "scn".into(),
                dataset_id: "trips".into(),
                developer_id: "dev".into(),
                epsilon: 0.001,
                delta: 0.0,
                mechanism: "laplace:count".into(),
                mode: "query".into(),
            }
        } else {
            Event::Commit {
                job_id: format!("job_{}", seq - 1),
                reservation: seq - 1,
                released: true,
                note: "released".into(),
            }
        };
        let body = EntryBody {
            seq,
            prev_hash: prev,
            at: "2026-11-23T00:00:00Z".into(),
            event,
        };
        let hash = entry_hash(&body);
        tree.push(hash);
        prev = hex::encode(hash);
        entries.push(Entry {
            signature: signer.sign(&hash),
            hash: prev.clone(),
            body,
        });
    }
    let root = hex::encode(tree.root(n));
    let at = crate::now_rfc3339();
    let checkpoint = super::Checkpoint {
        tree_size: n,
        signature: signer.sign(&super::checkpoint_message(n, &root, &at)),
        root,
        at,
    };
    let path = dir.path().join("export.jsonl");
    super::export(
        &entries,
        Some(&checkpoint),
        std::io::BufWriter::new(std::fs::File::create(&path)?),
    )?;
    drop(entries);
    let build_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let export = super::read_export(std::io::BufReader::new(std::fs::File::open(&path)?))?;
    let read_s = started.elapsed().as_secs_f64();
    let summary = super::verify(
        &export.entries,
        export.checkpoint.as_ref(),
        &signer.public_key_hex(),
    )?;
    let total_s = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bench": "ledger_verify_offline", "entries": summary.entries, "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "file_mib": std::fs::metadata(&path)?.len() as f64 / (1 << 20) as f64,
            "build_s": build_s, "read_s": read_s, "verify_s": total_s - read_s, "total_s": total_s
        })
    );
    Ok(())
}
