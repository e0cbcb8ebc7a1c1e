//! The audit log (行为留痕): every state-changing request and every job outcome — who, what,
//! when, outcome, request id — appended to a hash chain. Record *n* carries the hash of
//! record *n − 1*; its own hash covers every field. An export ends with a head (size, last
//! hash) signed with the ledger's Ed25519 key, so an auditor holding the public key can check
//! a copy offline: any edited, removed, inserted or reordered record breaks the chain, and a
//! truncated or re-chained copy fails the signature.
//!
//! Records name ids, codes and reasons written by people — never data.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex, OnceLock};

use ring::digest::{SHA256, digest};
use ring::signature::{ED25519, UnparsedPublicKey};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::store::{Cached, Store, StoreError};

/// One record as stored, served and exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: String,
    /// The `x-request-id` of the HTTP request, if the record comes from one.
    pub request_id: Option<String>,
    /// Who acted; `None` for the system (expiry, start-up) or an unauthenticated caller.
    pub principal_id: Option<String>,
    pub role: Option<String>,
    /// A stable name: the endpoint's operation id (`approve_scenario`) or a system event
    /// (`job_finished`, `scenario_expired`).
    pub action: String,
    /// The object acted on (an id), when there is one.
    pub target: Option<String>,
    /// `ok`, or the refusal's stable error code.
    pub outcome: String,
    /// The HTTP status, for requests.
    pub status: Option<u16>,
    /// Reasons, decisions and changed values, as text.
    pub detail: BTreeMap<String, String>,
    pub prev_hash: String,
    pub hash: String,
}

/// What a caller records; the log adds sequence, time and the chain.
#[derive(Debug, Clone, Default)]
pub struct NewRecord {
    pub request_id: Option<String>,
    pub principal_id: Option<String>,
    pub role: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    pub status: Option<u16>,
    pub detail: BTreeMap<String, String>,
}

impl NewRecord {
    /// A record of something the system did by itself.
    pub fn system(action: &str, target: &str, outcome: &str) -> Self {
        NewRecord {
            action: action.into(),
            target: Some(target.into()),
            outcome: outcome.into(),
            ..Default::default()
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.detail.insert(key.into(), value.into());
        self
    }
}

fn genesis() -> String {
    hex::encode([0u8; 32])
}

/// The hash of a record: SHA-256 over a domain tag and the canonical JSON of every field but
/// the hash itself (struct fields in declaration order, detail keys sorted).
pub fn record_hash(r: &AuditRecord) -> String {
    #[derive(Serialize)]
    struct Body<'a> {
        seq: u64,
        at: &'a str,
        request_id: &'a Option<String>,
        principal_id: &'a Option<String>,
        role: &'a Option<String>,
        action: &'a str,
        target: &'a Option<String>,
        outcome: &'a str,
        status: Option<u16>,
        detail: &'a BTreeMap<String, String>,
        prev_hash: &'a str,
    }
    let body = serde_json::to_vec(&Body {
        seq: r.seq,
        at: &r.at,
        request_id: &r.request_id,
        principal_id: &r.principal_id,
        role: &r.role,
        action: &r.action,
        target: &r.target,
        outcome: &r.outcome,
        status: r.status,
        detail: &r.detail,
        prev_hash: &r.prev_hash,
    })
    .expect("audit records serialise");
    let mut msg = b"unseen-audit-record-v1\n".to_vec();
    msg.extend_from_slice(&body);
    hex::encode(digest(&SHA256, &msg).as_ref())
}

/// Appends one record to the chain. The store's single connection serialises appends, so the
/// previous hash read here is the one the new record follows.
pub fn append(store: &Store, new: NewRecord) -> Result<AuditRecord, StoreError> {
    let mut conn = store.conn();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let record = append_in(&tx, new)?;
    tx.commit()?;
    Ok(record)
}

/// Appends records for many threads at once, several to a commit (group commit): each caller
/// queues its record, then waits for the writing connection; whoever gets it writes every
/// record queued by then in one transaction, with one `fsync`, and hands each caller its
/// record. A caller returns only once its own record is durable, as with [`append`]: the
/// commit is made without fsync, and the sync after it ([`Store::sync_through`]) is shared
/// with the ledger's and the jobs' writes of that moment. Under concurrent requests this saves
/// an `fsync` per record that shares a commit or a sync. A commit that fails fails every
/// record in it, each caller getting the error.
#[derive(Clone)]
pub struct GroupAppender {
    store: Store,
    queue: Arc<Mutex<Vec<Queued>>>,
    commits: Arc<std::sync::atomic::AtomicU64>,
}

struct Queued {
    record: Option<NewRecord>,
    /// The record as written, with its commit's number for [`Store::sync_through`].
    done: Arc<OnceLock<Result<(AuditRecord, u64), String>>>,
}

/// The records one writer took from the queue. Dropped before each has its answer (a panic
/// mid-commit), the rest learn that their commit failed instead of waiting for nothing.
struct Batch(Vec<Queued>);

impl Drop for Batch {
    fn drop(&mut self) {
        for q in &self.0 {
            let _ = q.done.set(Err("the commit was abandoned".into()));
        }
    }
}

impl GroupAppender {
    pub fn new(store: Store) -> Self {
        GroupAppender {
            store,
            queue: Arc::default(),
            commits: Arc::default(),
        }
    }

    /// Commits made so far (each holding one or more records).
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Queued>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn append(&self, new: NewRecord) -> Result<AuditRecord, StoreError> {
        let done = Arc::new(OnceLock::new());
        self.queue().push(Queued {
            record: Some(new),
            done: done.clone(),
        });
        // Records leave the queue only under this lock, and get their answers before it is
        // let go: holding it, ours is either answered already or still queued.
        // Committed without fsync, then made durable by a sync shared with whoever else
        // writes at that moment (`Store::write_durably`).
        let mut conn = self.store.conn_without_fsync()?;
        if done.get().is_none() {
            let number = conn.number();
            let mut batch = Batch(std::mem::take(&mut *self.queue()));
            let written = (|| {
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let mut written = Vec::with_capacity(batch.0.len());
                for q in &mut batch.0 {
                    let record = q.record.take().expect("each queued record is written once");
                    written.push(append_in(&tx, record)?);
                }
                tx.commit()?;
                self.commits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok::<_, StoreError>(written)
            })();
            match written {
                Ok(written) => {
                    for (q, record) in batch.0.iter().zip(written) {
                        let _ = q.done.set(Ok((record, number)));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for q in &batch.0 {
                        let _ = q.done.set(Err(message.clone()));
                    }
                }
            }
        }
        drop(conn);
        match done.get() {
            Some(Ok((record, number))) => {
                self.store.sync_through(*number)?;
                Ok(record.clone())
            }
            Some(Err(message)) => Err(StoreError::Shared(message.clone())),
            None => Err(StoreError::Shared("the record was not written".into())),
        }
    }
}

/// Appends one record inside the caller's write transaction, so that the change it records
/// and the record commit together (and with one `fsync`). The transaction must be
/// `Immediate`: it then holds the write lock from its start, and the previous hash cannot
/// move under it.
pub fn append_in(
    tx: &rusqlite::Transaction<'_>,
    new: NewRecord,
) -> Result<AuditRecord, StoreError> {
    let last: Option<(i64, String)> = tx
        .query_row_cached(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev_hash) = match last {
        Some((seq, hash)) => (seq as u64 + 1, hash),
        None => (1, genesis()),
    };
    let mut record = AuditRecord {
        seq,
        at: crate::now_rfc3339(),
        request_id: new.request_id,
        principal_id: new.principal_id,
        role: new.role,
        action: new.action,
        target: new.target,
        outcome: new.outcome,
        status: new.status,
        detail: new.detail,
        prev_hash,
        hash: String::new(),
    };
    record.hash = record_hash(&record);
    tx.execute_cached(
        "INSERT INTO audit_log (seq, at, request_id, principal_id, role, action, target, outcome, status, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            record.seq as i64,
            record.at,
            record.request_id,
            record.principal_id,
            record.role,
            record.action,
            record.target,
            record.outcome,
            record.status,
            serde_json::to_string(&record.detail).expect("a string map serialises"),
            record.prev_hash,
            record.hash,
        ],
    )?;
    Ok(record)
}

/// Appends, logging instead of failing: for records written after the fact they describe.
pub fn append_logged(store: &Store, new: NewRecord) {
    let action = new.action.clone();
    if let Err(e) = append(store, new) {
        tracing::error!("could not append the audit record for {action}: {e}");
    }
}

/// Which records to read.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Only records after this sequence number (paging).
    pub after: Option<u64>,
    pub action: Option<String>,
    pub principal_id: Option<String>,
    pub target: Option<String>,
    pub request_id: Option<String>,
    /// At most this many (default 1000, at most 10000).
    pub limit: Option<u32>,
}

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
    let detail: String = r.get(9)?;
    Ok(AuditRecord {
        seq: r.get::<_, i64>(0)? as u64,
        at: r.get(1)?,
        request_id: r.get(2)?,
        principal_id: r.get(3)?,
        role: r.get(4)?,
        action: r.get(5)?,
        target: r.get(6)?,
        outcome: r.get(7)?,
        status: r.get(8)?,
        // An unparsable detail is kept visible as such; its hash will not match.
        detail: serde_json::from_str(&detail)
            .unwrap_or_else(|_| BTreeMap::from([("unparsable".to_string(), detail)])),
        prev_hash: r.get(10)?,
        hash: r.get(11)?,
    })
}

const COLUMNS: &str = "seq, at, request_id, principal_id, role, action, target, outcome, status, detail, prev_hash, hash";

/// Records in sequence order, filtered.
pub fn list(store: &Store, f: &Filter) -> Result<Vec<AuditRecord>, StoreError> {
    let conn = store.conn();
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM audit_log
         WHERE seq > ?1
           AND (?2 IS NULL OR action = ?2)
           AND (?3 IS NULL OR principal_id = ?3)
           AND (?4 IS NULL OR target = ?4)
           AND (?5 IS NULL OR request_id = ?5)
         ORDER BY seq LIMIT ?6"
    ))?;
    let rows = stmt
        .query_map(
            params![
                f.after.unwrap_or(0) as i64,
                f.action,
                f.principal_id,
                f.target,
                f.request_id,
                f.limit.unwrap_or(1000).min(10_000),
            ],
            from_row,
        )?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Every record, in order.
pub fn all(store: &Store) -> Result<Vec<AuditRecord>, StoreError> {
    let conn = store.conn();
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM audit_log ORDER BY seq"))?;
    let rows = stmt
        .query_map([], from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The signed head that closes an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub size: u64,
    pub hash: String,
    pub at: String,
    pub signature: String,
}

fn head_message(size: u64, hash: &str, at: &str) -> Vec<u8> {
    format!("unseen-audit-head-v1\n{size}\n{hash}\n{at}\n").into_bytes()
}

/// Signs the head of `records` with the ledger's key.
pub fn sign_head(records: &[AuditRecord], ledger: &crate::ledger::Ledger) -> Head {
    let size = records.len() as u64;
    let hash = records
        .last()
        .map(|r| r.hash.clone())
        .unwrap_or_else(genesis);
    let at = crate::now_rfc3339();
    let signature = ledger.sign_detached(&head_message(size, &hash, &at));
    Head {
        size,
        hash,
        at,
        signature,
    }
}

/// Writes records as JSON lines, closed by `{"head": …}`.
pub fn export(records: &[AuditRecord], head: &Head, mut out: impl Write) -> std::io::Result<()> {
    for r in records {
        serde_json::to_writer(&mut out, r)?;
        out.write_all(b"\n")?;
    }
    serde_json::to_writer(&mut out, &serde_json::json!({ "head": head }))?;
    out.write_all(b"\n")?;
    out.flush()
}

/// The first problem found, naming the record (0: the head or the file).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("audit record {seq}: {problem}")]
pub struct VerifyError {
    pub seq: u64,
    pub problem: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadLine {
    head: Head,
}

/// Reads an export back.
pub fn read_export(input: impl BufRead) -> Result<(Vec<AuditRecord>, Option<Head>), VerifyError> {
    let mut records = Vec::new();
    let mut head = None;
    for (i, line) in input.lines().enumerate() {
        let bad = |problem: String| VerifyError {
            seq: records.len() as u64 + 1,
            problem,
        };
        let line = line.map_err(|e| bad(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        if head.is_some() {
            return Err(bad(format!("line {} follows the closing head", i + 1)));
        }
        if line.starts_with("{\"head\"") {
            let h: HeadLine = serde_json::from_str(&line)
                .map_err(|e| bad(format!("line {} is not a head: {e}", i + 1)))?;
            head = Some(h.head);
            continue;
        }
        records.push(
            serde_json::from_str(&line)
                .map_err(|e| bad(format!("line {} is not an audit record: {e}", i + 1)))?,
        );
    }
    Ok((records, head))
}

/// Checks the chain: sequence numbers 1, 2, …; each record's hash over its fields; each
/// record's `prev_hash` equal to the previous record's hash. With a head, also that the head
/// covers exactly these records and is signed by `public_key_hex`.
pub fn verify(
    records: &[AuditRecord],
    head: Option<&Head>,
    public_key_hex: Option<&str>,
) -> Result<u64, VerifyError> {
    let mut prev = genesis();
    for (i, r) in records.iter().enumerate() {
        let expected = i as u64 + 1;
        let bad = |problem: String| VerifyError {
            seq: expected,
            problem,
        };
        if r.seq != expected {
            return Err(bad(format!(
                "found sequence number {} where {expected} was expected (a record was removed, inserted or moved)",
                r.seq
            )));
        }
        if r.prev_hash != prev {
            return Err(bad(
                "its previous-hash does not match the record before it".into()
            ));
        }
        if record_hash(r) != r.hash {
            return Err(bad(
                "its contents do not match its hash (the record was changed)".into(),
            ));
        }
        prev = r.hash.clone();
    }
    if let Some(h) = head {
        let bad = |problem: String| VerifyError { seq: 0, problem };
        if h.size != records.len() as u64 || h.hash != prev {
            return Err(bad(format!(
                "the signed head covers {} records ending in {}, but the file has {} ending in {}",
                h.size,
                h.hash,
                records.len(),
                prev
            )));
        }
        let key = public_key_hex.ok_or_else(|| bad("no public key to check the head".into()))?;
        let (Ok(key), Ok(sig)) = (hex::decode(key.trim()), hex::decode(&h.signature)) else {
            return Err(bad("the public key or the signature is not hex".into()));
        };
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&head_message(h.size, &h.hash, &h.at), &sig)
            .map_err(|_| bad("the head's signature does not verify under the public key".into()))?;
    }
    Ok(records.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store, crate::ledger::Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ledger = crate::ledger::Ledger::open(store.clone(), dir.path()).unwrap();
        (dir, store, ledger)
    }

    #[test]
    fn records_queued_while_the_log_is_busy_share_one_commit_and_keep_the_chain() {
        let (_dir, store, _ledger) = store();
        append(&store, NewRecord::system("first", "x", "ok")).unwrap();
        let appender = GroupAppender::new(store.clone());
        // Hold the writing connection: every append below queues and waits for it.
        let busy = store.conn();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let a = appender.clone();
                std::thread::spawn(move || {
                    a.append(NewRecord::system("queued", &format!("t{i}"), "ok"))
                })
            })
            .collect();
        let started = std::time::Instant::now();
        while appender.queue().len() < 8 {
            assert!(started.elapsed().as_secs() < 30, "the appends never queued");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(busy);
        let mut written: Vec<AuditRecord> = threads
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        assert_eq!(appender.commits(), 1, "eight queued records, one commit");
        // Each caller got its own record back, as stored, and the chain holds.
        written.sort_by_key(|r| r.seq);
        let records = all(&store).unwrap();
        assert_eq!(&records[1..], &written[..]);
        let mut targets: Vec<_> = written.iter().filter_map(|r| r.target.clone()).collect();
        targets.sort();
        assert_eq!(targets, (0..8).map(|i| format!("t{i}")).collect::<Vec<_>>());
        assert_eq!(verify(&records, None, None), Ok(9));
        // Alone, a record still commits at once.
        let alone = appender
            .append(NewRecord::system("alone", "y", "ok"))
            .unwrap();
        assert_eq!((alone.seq, appender.commits()), (10, 2));
    }

    #[test]
    fn the_chain_verifies_and_every_kind_of_tampering_is_named() {
        let (_dir, store, ledger) = store();
        for i in 0..5 {
            append(
                &store,
                NewRecord::system("scenario_expired", &format!("scn_{i}"), "ok").with("why", "t"),
            )
            .unwrap();
        }
        let records = all(&store).unwrap();
        let head = sign_head(&records, &ledger);
        let key = ledger.public_key_hex();
        assert_eq!(verify(&records, Some(&head), Some(&key)), Ok(5));

        // Through the export format and back.
        let mut out = Vec::new();
        export(&records, &head, &mut out).unwrap();
        let (back, back_head) = read_export(&out[..]).unwrap();
        assert_eq!(verify(&back, back_head.as_ref(), Some(&key)), Ok(5));

        let mut changed = records.clone();
        changed[2].outcome = "refused".into();
        assert_eq!(verify(&changed, None, None).unwrap_err().seq, 3);

        let mut removed = records.clone();
        removed.remove(1);
        assert_eq!(verify(&removed, None, None).unwrap_err().seq, 2);

        let mut swapped = records.clone();
        swapped.swap(1, 2);
        assert_eq!(verify(&swapped, None, None).unwrap_err().seq, 2);

        // Cutting the tail keeps a valid chain: only the signed head catches it.
        let cut = &records[..4];
        assert_eq!(verify(cut, None, None), Ok(4));
        assert_eq!(verify(cut, Some(&head), Some(&key)).unwrap_err().seq, 0);

        // A re-chained rewrite (every hash recomputed) fails the signature of a forged head.
        let mut rewritten = records.clone();
        rewritten[0].principal_id = Some("someone_else".into());
        let mut prev = genesis();
        for r in &mut rewritten {
            r.prev_hash = prev;
            r.hash = record_hash(r);
            prev = r.hash.clone();
        }
        let forged = Head {
            hash: prev,
            ..head.clone()
        };
        assert_eq!(
            verify(&rewritten, Some(&forged), Some(&key))
                .unwrap_err()
                .seq,
            0
        );
    }
}
