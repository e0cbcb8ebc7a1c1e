//! The privacy-budget ledger. Every debit is one entry, checked against its caps and appended
//! in a single write transaction, hash-chained (SHA-256 over the previous hash and the entry's
//! canonical JSON) and signed (Ed25519, ring). The signing key lives in the data directory;
//! the public key is all an auditor needs to verify an export offline.
//! (Merkle checkpoints and inclusion proofs are not built yet.)

use std::io::{BufRead, Write};
use std::path::Path;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rusqlite::{TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Slack for float rounding when comparing sums of ε against a cap.
const CAP_TOLERANCE: f64 = 1e-9;

/// The signed content of one entry. Field order is the canonical order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryBody {
    pub seq: u64,
    pub prev_hash: String,
    pub at: String,
    pub job_id: String,
    pub scenario_id: String,
    pub dataset_id: String,
    pub developer_id: String,
    /// ε debited: the sum of the release's measurements' losses from OpenDP's privacy maps.
    pub epsilon: f64,
    /// What was released, e.g. `laplace:count,sum`.
    pub mechanism: String,
    /// How guest code ran for this release (`query`: no guest code over rows).
    pub mode: String,
}

/// An entry as exported: body, its hash and the signature over the hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub body: EntryBody,
    pub hash: String,
    pub signature: String,
}

fn body_hash(body: &EntryBody) -> [u8; 32] {
    // serde_json writes struct fields in declaration order and floats in shortest round-trip
    // form, so parse→serialise reproduces the signed bytes exactly.
    let bytes = serde_json::to_vec(body).expect("an entry body always serialises");
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
    out
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("the ledger signing key could not be loaded: {0}")]
    Key(String),
    #[error("this would spend ε {asked} with only {left} left at the {level} level")]
    Overspend {
        level: &'static str,
        asked: f64,
        left: f64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        LedgerError::Store(e.into())
    }
}

/// The ledger's signing key.
pub struct Signer {
    key: Ed25519KeyPair,
}

impl Signer {
    /// Loads `<data_dir>/ledger-key.pk8`, generating it (mode 0600) on first use.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, LedgerError> {
        let path = data_dir.join("ledger-key.pk8");
        let pkcs8 = if path.exists() {
            std::fs::read(&path).map_err(|e| LedgerError::Key(e.to_string()))?
        } else {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|e| LedgerError::Key(e.to_string()))?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts
                .open(&path)
                .map_err(|e| LedgerError::Key(e.to_string()))?;
            f.write_all(doc.as_ref())
                .and_then(|_| f.sync_all())
                .map_err(|e| LedgerError::Key(e.to_string()))?;
            doc.as_ref().to_vec()
        };
        let key =
            Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| LedgerError::Key(e.to_string()))?;
        Ok(Signer { key })
    }

    /// The public key, hex-encoded.
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.public_key().as_ref())
    }
}

/// One debit to append.
#[derive(Debug, Clone)]
pub struct Debit<'a> {
    pub job_id: &'a str,
    pub scenario_id: &'a str,
    pub dataset_id: &'a str,
    pub developer_id: &'a str,
    pub epsilon: f64,
    pub mechanism: String,
    pub mode: &'static str,
}

/// The caps a debit must fit under.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub scenario: f64,
    pub per_job: f64,
    pub dataset_total: f64,
}

/// Checks the debit against every cap and appends it, in one `IMMEDIATE` transaction: no
/// other writer can interleave between the check and the append, and the entry is on disk
/// (WAL, `synchronous=FULL`) when this returns `Ok`.
///
/// # Privacy
/// Callers must not let anything computed from data leave the gate before this returns `Ok`.
pub fn debit(
    store: &Store,
    signer: &Signer,
    debit: &Debit<'_>,
    caps: Caps,
) -> Result<Entry, LedgerError> {
    let mut conn = store.conn();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let sum = |column: &str, value: &str| -> rusqlite::Result<f64> {
        tx.query_row(
            &format!("SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE {column} = ?1"),
            params![value],
            |r| r.get(0),
        )
    };
    for (level, spent, cap) in [
        ("job", sum("job_id", debit.job_id)?, caps.per_job),
        (
            "scenario",
            sum("scenario_id", debit.scenario_id)?,
            caps.scenario,
        ),
        (
            "dataset",
            sum("dataset_id", debit.dataset_id)?,
            caps.dataset_total,
        ),
    ] {
        if spent + debit.epsilon > cap + CAP_TOLERANCE {
            return Err(LedgerError::Overspend {
                level,
                asked: debit.epsilon,
                left: (cap - spent).max(0.0),
            });
        }
    }
    let (last_seq, prev_hash): (u64, String) = tx
        .query_row(
            "SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
        )
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok((0, GENESIS.to_string())),
            e => Err(e),
        })?;
    let body = EntryBody {
        seq: last_seq + 1,
        prev_hash,
        at: crate::now_rfc3339(),
        job_id: debit.job_id.into(),
        scenario_id: debit.scenario_id.into(),
        dataset_id: debit.dataset_id.into(),
        developer_id: debit.developer_id.into(),
        epsilon: debit.epsilon,
        mechanism: debit.mechanism.clone(),
        mode: debit.mode.into(),
    };
    let hash = body_hash(&body);
    let signature = signer.key.sign(&hash);
    let entry = Entry {
        hash: hex::encode(hash),
        signature: hex::encode(signature.as_ref()),
        body,
    };
    tx.execute(
        "INSERT INTO ledger (seq, body, hash, signature, job_id, scenario_id, dataset_id, developer_id, epsilon)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            entry.body.seq as i64,
            serde_json::to_string(&entry.body).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            entry.hash,
            entry.signature,
            entry.body.job_id,
            entry.body.scenario_id,
            entry.body.dataset_id,
            entry.body.developer_id,
            entry.body.epsilon,
        ],
    )?;
    tx.commit()?;
    Ok(entry)
}

/// ε spent so far under a scenario, a job or a dataset.
pub fn spent(
    store: &Store,
    scenario_id: Option<&str>,
    job_id: Option<&str>,
    dataset_id: Option<&str>,
) -> Result<f64, StoreError> {
    Ok(store.conn().query_row(
        "SELECT COALESCE(SUM(epsilon), 0) FROM ledger
         WHERE (?1 IS NULL OR scenario_id = ?1) AND (?2 IS NULL OR job_id = ?2) AND (?3 IS NULL OR dataset_id = ?3)",
        params![scenario_id, job_id, dataset_id],
        |r| r.get(0),
    )?)
}

/// Every entry in order, as stored. A row whose indexed columns disagree with its signed body
/// is reported as corrupt rather than silently trusted.
pub fn entries(store: &Store) -> Result<Vec<Entry>, StoreError> {
    let conn = store.conn();
    let mut stmt = conn.prepare(
        "SELECT seq, body, hash, signature, job_id, scenario_id, dataset_id, developer_id, epsilon FROM ledger ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        let text: String = r.get(1)?;
        let body: EntryBody = serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("ledger entry {seq}: {e}")))?;
        let indexed = (
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, String>(6)?,
            r.get::<_, String>(7)?,
            r.get::<_, f64>(8)?,
        );
        if seq as u64 != body.seq
            || indexed
                != (
                    body.job_id.clone(),
                    body.scenario_id.clone(),
                    body.dataset_id.clone(),
                    body.developer_id.clone(),
                    body.epsilon,
                )
        {
            return Err(StoreError::Corrupt(format!(
                "ledger entry {seq}: its indexed columns disagree with its signed body"
            )));
        }
        out.push(Entry {
            body,
            hash: r.get(2)?,
            signature: r.get(3)?,
        });
    }
    Ok(out)
}

/// Writes entries as JSON lines.
pub fn export(entries: &[Entry], mut out: impl Write) -> std::io::Result<()> {
    for e in entries {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads a JSON-lines export.
pub fn read_export(input: impl BufRead) -> Result<Vec<Entry>, VerifyError> {
    let mut entries = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| VerifyError {
            seq: i as u64 + 1,
            problem: e.to_string(),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let entry = serde_json::from_str(&line).map_err(|e| VerifyError {
            seq: i as u64 + 1,
            problem: format!("line {} is not a ledger entry: {e}", i + 1),
        })?;
        entries.push(entry);
    }
    Ok(entries)
}

/// The first problem found, naming the entry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("ledger entry {seq}: {problem}")]
pub struct VerifyError {
    pub seq: u64,
    pub problem: String,
}

/// What a successful verification establishes.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub entries: u64,
    pub head_hash: String,
    pub total_epsilon: f64,
    /// ε per scenario, from the verified entries.
    pub per_scenario: std::collections::BTreeMap<String, f64>,
}

/// Verifies sequence numbers, the hash chain, every hash and every signature.
pub fn verify(entries: &[Entry], public_key_hex: &str) -> Result<Summary, VerifyError> {
    let key_bytes = hex::decode(public_key_hex.trim()).map_err(|_| VerifyError {
        seq: 0,
        problem: "the public key is not hex".into(),
    })?;
    let key = UnparsedPublicKey::new(&ED25519, key_bytes);
    let mut prev = GENESIS.to_string();
    let mut summary = Summary {
        entries: 0,
        head_hash: GENESIS.into(),
        total_epsilon: 0.0,
        per_scenario: Default::default(),
    };
    for (i, e) in entries.iter().enumerate() {
        let expected_seq = i as u64 + 1;
        let bad = |problem: String| VerifyError {
            seq: expected_seq,
            problem,
        };
        if e.body.seq != expected_seq {
            return Err(bad(format!(
                "sequence number {} where {expected_seq} was expected (an entry was removed, inserted or moved)",
                e.body.seq
            )));
        }
        if e.body.prev_hash != prev {
            return Err(bad("it does not chain to the entry before it".into()));
        }
        let hash = body_hash(&e.body);
        if hex::encode(hash) != e.hash {
            return Err(bad(
                "its content does not match its hash (the entry was edited)".into(),
            ));
        }
        let sig = hex::decode(&e.signature).map_err(|_| bad("its signature is not hex".into()))?;
        key.verify(&hash, &sig)
            .map_err(|_| bad("its signature does not verify under this public key".into()))?;
        if !(e.body.epsilon.is_finite() && e.body.epsilon >= 0.0) {
            return Err(bad("its ε is not a non-negative number".into()));
        }
        summary.entries += 1;
        summary.total_epsilon += e.body.epsilon;
        *summary
            .per_scenario
            .entry(e.body.scenario_id.clone())
            .or_default() += e.body.epsilon;
        prev = e.hash.clone();
    }
    summary.head_hash = prev;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger_with(n: usize) -> (tempfile::TempDir, Store, Signer) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let signer = Signer::load_or_create(dir.path()).unwrap();
        for i in 0..n {
            let job = format!("job_{i}");
            debit(
                &store,
                &signer,
                &Debit {
                    job_id: &job,
                    scenario_id: "scn",
                    dataset_id: "trips",
                    developer_id: "dev",
                    epsilon: 0.25,
                    mechanism: "laplace:count".into(),
                    mode: "query",
                },
                Caps {
                    scenario: 10.0,
                    per_job: 1.0,
                    dataset_total: 10.0,
                },
            )
            .unwrap();
        }
        (dir, store, signer)
    }

    #[test]
    fn an_intact_ledger_verifies_and_sums() {
        let (_d, store, signer) = ledger_with(4);
        let s = verify(&entries(&store).unwrap(), &signer.public_key_hex()).unwrap();
        assert_eq!(s.entries, 4);
        assert!((s.total_epsilon - 1.0).abs() < 1e-12);
    }

    #[test]
    fn every_kind_of_edit_is_caught_and_named() {
        let (_d, store, signer) = ledger_with(4);
        let good = entries(&store).unwrap();
        let key = signer.public_key_hex();

        let mut edited = good.clone();
        edited[2].body.epsilon = 0.0;
        assert_eq!(verify(&edited, &key).unwrap_err().seq, 3);

        let mut removed = good.clone();
        removed.remove(1);
        assert_eq!(verify(&removed, &key).unwrap_err().seq, 2);

        let mut swapped = good.clone();
        swapped.swap(1, 2);
        assert_eq!(verify(&swapped, &key).unwrap_err().seq, 2);

        let other = Signer::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert_eq!(verify(&good, &other.public_key_hex()).unwrap_err().seq, 1);
    }

    #[test]
    fn a_debit_beyond_a_cap_appends_nothing() {
        let (_d, store, signer) = ledger_with(3);
        let err = debit(
            &store,
            &signer,
            &Debit {
                job_id: "job_big",
                scenario_id: "scn",
                dataset_id: "trips",
                developer_id: "dev",
                epsilon: 0.5,
                mechanism: "laplace:count".into(),
                mode: "query",
            },
            Caps {
                scenario: 1.0,
                per_job: 1.0,
                dataset_total: 10.0,
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                LedgerError::Overspend {
                    level: "scenario",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(entries(&store).unwrap().len(), 3);
    }

    #[test]
    fn the_database_columns_cannot_drift_from_the_signed_body() {
        let (_d, store, _signer) = ledger_with(2);
        store
            .conn()
            .execute("UPDATE ledger SET epsilon = 0 WHERE seq = 2", [])
            .unwrap();
        assert!(entries(&store).is_err());
    }
}
