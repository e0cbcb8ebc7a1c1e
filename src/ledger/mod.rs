//! The privacy-budget ledger: the part nobody has to take on faith.
//!
//! Three kinds of entry. A `grant` records an approval's caps (scenario allocation, per-job
//! cap, dataset total, developer cap) so that the ledger alone is enough to replay every
//! debit. A `reserve` charges ε *before* any data is read; a `commit` closes a reservation
//! once its release exists (or says it never will). A reservation left open by a crash stays
//! charged and is closed as `interrupted` at the next start.
//!
//! Each entry is appended in one SQLite `IMMEDIATE` transaction (WAL, `synchronous=FULL`) that
//! also checks every cap and moves the running totals, so no interleaving can overspend and a
//! returned entry is on disk. Entries are hash-chained (each names the previous entry's hash),
//! signed with Ed25519 (ring), and are the leaves of an RFC 6962 Merkle tree with signed
//! checkpoints, inclusion proofs and consistency proofs. [`verify`] checks all of it offline,
//! from an export and the public key, and replays every debit against the grants.

pub mod bench;
pub mod merkle;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Mutex;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::store::{Cached, Store, StoreError};
use merkle::{Hash, Tree};

/// Slack for float rounding when comparing sums of ε against a cap.
pub const CAP_TOLERANCE: f64 = 1e-9;

/// What an entry records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// An approval's caps for one dataset of a scenario. A later grant for the same pair
    /// replaces the earlier one.
    Grant {
        scenario_id: String,
        dataset_id: String,
        developer_id: String,
        /// The scenario's allocation on this dataset.
        epsilon: f64,
        per_job_epsilon: f64,
        dataset_total: f64,
        /// The most this developer may spend on this dataset across all scenarios.
        developer_epsilon: f64,
        /// δ the scenario may spend on this dataset (absent: 0, pure ε-DP releases only).
        #[serde(default, skip_serializing_if = "is_zero")]
        delta: f64,
        /// δ the dataset may spend across all scenarios (absent: 0).
        #[serde(default, skip_serializing_if = "is_zero")]
        dataset_delta: f64,
    },
    /// ε charged before any data is read, whether or not a release follows.
    Reserve {
        job_id: String,
        scenario_id: String,
        dataset_id: String,
        developer_id: String,
        epsilon: f64,
        /// δ charged with it (absent: 0).
        #[serde(default, skip_serializing_if = "is_zero")]
        delta: f64,
        /// What is released, e.g. `laplace:count,sum(fare in [0, 100])`.
        mechanism: String,
        /// How guest code ran for this release (`query`: no guest code over rows).
        mode: String,
    },
    /// Closes reservation `reservation`: `released` says whether its release was produced.
    Commit {
        job_id: String,
        reservation: u64,
        released: bool,
        note: String,
    },
}

/// The nearest double to a 6-significant-digit decimal that is at least `x`. δ values from
/// OpenDP's maps have 17 digits; serde_json's default parser could read such a number back
/// one unit in the last place off, which broke an entry's hash on verification. serde_json's
/// `float_roundtrip` (enabled since, for ε too) makes every double read back exactly; δ stays
/// a short decimal so that entries read as what an auditor expects. Rounding up charges at
/// most 10⁻⁵ of δ more than was spent.
pub(crate) fn short_decimal_at_least(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return x;
    }
    let nearest: f64 = format!("{x:.5e}").parse().unwrap_or(x);
    if nearest >= x {
        nearest
    } else {
        format!("{:.5e}", x * (1.0 + 1e-5)).parse().unwrap_or(x)
    }
}

/// Zero fields are left out of an entry's body, so entries written before δ existed keep their
/// exact bytes and hashes.
fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The columns stored beside each entry's signed body, for cap checks and filters. Writing
/// and reading both derive them here, so the two cannot disagree.
#[derive(Debug, PartialEq)]
struct Indexed<'a> {
    kind: &'a str,
    job: Option<&'a str>,
    scenario: Option<&'a str>,
    dataset: Option<&'a str>,
    developer: Option<&'a str>,
    /// ε this entry charges: a reservation's, else 0.
    charged: f64,
    reservation: Option<i64>,
}

impl Event {
    fn indexed(&self) -> Indexed<'_> {
        let none = Indexed {
            kind: "",
            job: None,
            scenario: None,
            dataset: None,
            developer: None,
            charged: 0.0,
            reservation: None,
        };
        match self {
            Event::Grant {
                scenario_id,
                dataset_id,
                developer_id,
                ..
            } => Indexed {
                kind: "grant",
                scenario: Some(scenario_id),
                dataset: Some(dataset_id),
                developer: Some(developer_id),
                ..none
            },
            Event::Reserve {
                job_id,
                scenario_id,
                dataset_id,
                developer_id,
                epsilon,
                ..
            } => Indexed {
                kind: "reserve",
                job: Some(job_id),
                scenario: Some(scenario_id),
                dataset: Some(dataset_id),
                developer: Some(developer_id),
                charged: *epsilon,
                ..none
            },
            Event::Commit {
                job_id,
                reservation,
                ..
            } => Indexed {
                kind: "commit",
                job: Some(job_id),
                reservation: Some(*reservation as i64),
                ..none
            },
        }
    }
}

/// The signed content of one entry, in canonical field order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryBody {
    pub seq: u64,
    pub prev_hash: String,
    pub at: String,
    #[serde(flatten)]
    pub event: Event,
}

/// An entry: its body, its hash (the Merkle leaf hash of the body) and the signature over it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub body: EntryBody,
    pub hash: String,
    pub signature: String,
}

/// A signed statement of the tree's size and root at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub tree_size: u64,
    pub root: String,
    pub at: String,
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InclusionProof {
    pub seq: u64,
    pub leaf_hash: String,
    pub tree_size: u64,
    pub path: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsistencyProof {
    pub from_size: u64,
    pub to_size: u64,
    pub path: Vec<String>,
}

fn body_bytes(body: &EntryBody) -> Vec<u8> {
    // serde_json writes fields in declaration order and floats in shortest round-trip form,
    // so parse → serialise reproduces the signed bytes.
    serde_json::to_vec(body).expect("an entry body always serialises")
}

fn entry_hash(body: &EntryBody) -> Hash {
    merkle::leaf_hash(&body_bytes(body))
}

fn checkpoint_message(tree_size: u64, root: &str, at: &str) -> Vec<u8> {
    format!("unseen-ledger-checkpoint-v1\n{tree_size}\n{root}\n{at}\n").into_bytes()
}

fn genesis() -> String {
    hex::encode([0u8; 32])
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
    #[error("this would spend δ {asked:e} with only {left:e} left at the {level} level")]
    DeltaOverspend {
        level: &'static str,
        asked: f64,
        left: f64,
    },
    #[error("no approval grants this scenario the dataset {0:?}")]
    NoGrant(String),
    #[error("{0}")]
    Invalid(String),
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

    fn sign(&self, msg: &[u8]) -> String {
        hex::encode(self.key.sign(msg).as_ref())
    }
}

/// A debit to reserve.
#[derive(Debug, Clone)]
pub struct Reservation<'a> {
    pub job_id: &'a str,
    pub scenario_id: &'a str,
    pub dataset_id: &'a str,
    pub developer_id: &'a str,
    pub epsilon: f64,
    pub delta: f64,
    pub mechanism: String,
    pub mode: &'static str,
}

/// The caps of a grant, as [`Event::Grant`] records them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Caps {
    pub scenario: f64,
    pub per_job: f64,
    pub dataset_total: f64,
    pub developer: f64,
    pub scenario_delta: f64,
    pub dataset_delta: f64,
}

/// The running totals under `keys`, read inside `tx` (0 where none was written yet).
fn totals_in<const N: usize>(
    tx: &Transaction<'_>,
    keys: [(&'static str, String); N],
) -> Result<[f64; N], LedgerError> {
    let mut out = [0.0; N];
    for (slot, (level, key)) in out.iter_mut().zip(keys) {
        *slot = tx
            .query_row_cached(
                "SELECT spent FROM budget_totals WHERE level = ?1 AND key = ?2",
                params![level, key],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(0.0);
    }
    Ok(out)
}

/// The δ totals a reservation is checked against: scenario (within the dataset), dataset.
fn delta_keys(scenario: &str, dataset: &str) -> [(&'static str, String); 2] {
    [
        ("scenario_delta", format!("{scenario}\u{1f}{dataset}")),
        ("dataset_delta", dataset.to_string()),
    ]
}

/// δ is checked with a relative slack only, as δ values are tiny.
fn check_delta(caps: &Caps, spent: [f64; 2], delta: f64) -> Result<(), LedgerError> {
    if !(delta.is_finite() && delta >= 0.0) {
        return Err(LedgerError::Invalid(
            "δ must be a non-negative number".into(),
        ));
    }
    if delta == 0.0 {
        return Ok(());
    }
    for ((level, spent), cap) in ["scenario", "dataset"]
        .into_iter()
        .zip(spent)
        .zip([caps.scenario_delta, caps.dataset_delta])
    {
        if spent + delta > cap * (1.0 + 1e-9) {
            return Err(LedgerError::DeltaOverspend {
                level,
                asked: delta,
                left: (cap - spent).max(0.0),
            });
        }
    }
    Ok(())
}

/// The running totals a reservation is checked against: one rule, used by the server (over
/// SQLite) and by the offline verifier (over a replay).
fn check_caps(caps: &Caps, spent: [f64; 4], epsilon: f64) -> Result<(), LedgerError> {
    let levels = ["job", "scenario", "developer", "dataset"];
    let limits = [
        caps.per_job,
        caps.scenario,
        caps.developer,
        caps.dataset_total,
    ];
    for ((level, spent), cap) in levels.into_iter().zip(spent).zip(limits) {
        if !(epsilon.is_finite() && epsilon >= 0.0) {
            return Err(LedgerError::Invalid(
                "ε must be a non-negative number".into(),
            ));
        }
        if spent + epsilon > cap + CAP_TOLERANCE {
            return Err(LedgerError::Overspend {
                level,
                asked: epsilon,
                left: (cap - spent).max(0.0),
            });
        }
    }
    Ok(())
}

/// The commit events closing `reservations`.
fn commit_events(
    reservations: &[Entry],
    released: bool,
    note: &str,
) -> Result<Vec<Event>, LedgerError> {
    reservations
        .iter()
        .map(|reservation| match &reservation.body.event {
            Event::Reserve { job_id, .. } => Ok(Event::Commit {
                job_id: job_id.clone(),
                reservation: reservation.body.seq,
                released,
                note: note.into(),
            }),
            _ => Err(LedgerError::Invalid(
                "only a reservation can be committed".into(),
            )),
        })
        .collect()
}

/// Keys of the running totals for one reservation: job, scenario, developer, dataset (each
/// within the dataset).
fn total_keys(
    job: &str,
    scenario: &str,
    developer: &str,
    dataset: &str,
) -> [(&'static str, String); 4] {
    [
        ("job", format!("{job}\u{1f}{dataset}")),
        ("scenario", format!("{scenario}\u{1f}{dataset}")),
        ("developer", format!("{developer}\u{1f}{dataset}")),
        ("dataset", dataset.to_string()),
    ]
}

pub struct Ledger {
    store: Store,
    signer: Signer,
    tree: Mutex<Tree>,
}

impl Ledger {
    /// Opens the ledger in `data_dir`'s store, loading the signing key and the Merkle tree.
    pub fn open(store: Store, data_dir: &Path) -> Result<Self, LedgerError> {
        let signer = Signer::load_or_create(data_dir)?;
        let mut tree = Tree::default();
        {
            let conn = store.conn();
            let mut stmt = conn.prepare("SELECT seq, hash FROM ledger ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let seq: i64 = r.get(0)?;
                let hash: String = r.get(1)?;
                let h = merkle::parse_hash(&hash).ok_or_else(|| {
                    StoreError::Corrupt(format!("ledger entry {seq}: hash is not hex"))
                })?;
                if seq as u64 != tree.len() + 1 {
                    let expected = tree.len() + 1;
                    return Err(StoreError::Corrupt(format!(
                        "ledger entry {expected}: found sequence number {seq} where {expected} was expected (an entry was removed, inserted or moved)"
                    ))
                    .into());
                }
                tree.push(h);
            }
        }
        Ok(Ledger {
            store,
            signer,
            tree: Mutex::new(tree),
        })
    }

    pub fn public_key_hex(&self) -> String {
        self.signer.public_key_hex()
    }

    /// Signs another record's head with the ledger's key (the audit log's). Callers put their
    /// own domain tag first so that no such message can pass for a ledger checkpoint.
    pub(crate) fn sign_detached(&self, msg: &[u8]) -> String {
        assert!(!msg.starts_with(b"unseen-ledger-"), "reserved domain tag");
        self.signer.sign(msg)
    }

    fn tree(&self) -> std::sync::MutexGuard<'_, Tree> {
        self.tree.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in one write transaction and appends the events it returns, atomically with
    /// whatever else `f` wrote. Nothing is appended (or written) if `f` fails.
    pub fn transact<T, E>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<(T, Vec<Event>), E>,
    ) -> Result<(T, Vec<Entry>), E>
    where
        E: From<LedgerError>,
    {
        self.transact_then(f, |_, _| {}, true)
    }

    /// [`Ledger::transact`], running `then` after the entries are appended, before the commit.
    /// With `durable`, returns once the commit is durable, by a sync it may share with other
    /// writers ([`Store::write_durably`]); without, at once (see [`Store::conn_without_fsync`]).
    fn transact_then<T, E>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<(T, Vec<Event>), E>,
        then: impl FnOnce(&Transaction<'_>, &[Entry]),
        durable: bool,
    ) -> Result<(T, Vec<Entry>), E>
    where
        E: From<LedgerError>,
    {
        // Committed without fsync either way; a durable one then waits for a sync, which it
        // shares with the other writers of that moment (`Store::write_durably`).
        let mut conn = self.store.conn_without_fsync().map_err(LedgerError::from)?;
        let number = conn.number();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(LedgerError::from)?;
        let (value, events) = f(&tx)?;
        let entries = self.append_in(&tx, events)?;
        then(&tx, &entries);
        tx.commit().map_err(LedgerError::from)?;
        // Still under the connection lock: the tree grows in the same order as the table.
        {
            let mut tree = self.tree();
            for e in &entries {
                tree.push(
                    merkle::parse_hash(&e.hash)
                        .ok_or_else(|| LedgerError::Invalid("hash".into()))?,
                );
            }
        }
        drop(conn);
        if durable {
            self.store.sync_through(number).map_err(LedgerError::from)?;
        }
        Ok((value, entries))
    }

    fn append_in(
        &self,
        tx: &Transaction<'_>,
        events: Vec<Event>,
    ) -> Result<Vec<Entry>, LedgerError> {
        let (mut seq, mut prev): (u64, String) = tx
            .query_row_cached(
                "SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((0, genesis()));
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            seq += 1;
            let body = EntryBody {
                seq,
                prev_hash: prev,
                at: crate::now_rfc3339(),
                event,
            };
            let hash = entry_hash(&body);
            let entry = Entry {
                hash: hex::encode(hash),
                signature: self.signer.sign(&hash),
                body,
            };
            if let Event::Reserve {
                job_id,
                scenario_id,
                dataset_id,
                developer_id,
                epsilon,
                delta,
                ..
            } = &entry.body.event
            {
                let totals = total_keys(job_id, scenario_id, developer_id, dataset_id)
                    .into_iter()
                    .map(|k| (k, *epsilon))
                    .chain(
                        delta_keys(scenario_id, dataset_id)
                            .into_iter()
                            .map(|k| (k, *delta))
                            .filter(|(_, d)| *d > 0.0),
                    );
                for ((level, key), amount) in totals {
                    tx.execute_cached(
                        "INSERT INTO budget_totals (level, key, spent) VALUES (?1, ?2, ?3)
                         ON CONFLICT (level, key) DO UPDATE SET spent = spent + excluded.spent",
                        params![level, key, amount],
                    )?;
                }
            }
            let ix = entry.body.event.indexed();
            tx.execute_cached(
                "INSERT INTO ledger (seq, body, hash, signature, kind, job_id, scenario_id, dataset_id, developer_id, charged, reservation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    seq as i64,
                    String::from_utf8(body_bytes(&entry.body)).map_err(|e| LedgerError::Invalid(e.to_string()))?,
                    entry.hash,
                    entry.signature,
                    ix.kind,
                    ix.job,
                    ix.scenario,
                    ix.dataset,
                    ix.developer,
                    ix.charged,
                    ix.reservation
                ],
            )?;
            prev = entry.hash.clone();
            out.push(entry);
        }
        Ok(out)
    }

    /// The grant a reservation is checked against: by the partial index `ledger_grant`, one
    /// step however many entries the scenario has. Named (`INDEXED BY`) because without
    /// statistics SQLite rates `ledger_scenario` the same, and that one walks every reserve and
    /// commit of the scenario back to its grant.
    const GRANT_QUERY: &str = "SELECT body FROM ledger INDEXED BY ledger_grant WHERE kind = 'grant' AND scenario_id = ?1 AND dataset_id = ?2 ORDER BY seq DESC LIMIT 1";

    /// The latest grant for a scenario on a dataset, read inside `tx`.
    fn grant_in(
        tx: &Transaction<'_>,
        scenario_id: &str,
        dataset_id: &str,
    ) -> Result<Option<Caps>, LedgerError> {
        let body: Option<String> = tx
            .query_row_cached(Self::GRANT_QUERY, params![scenario_id, dataset_id], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(body) = body else { return Ok(None) };
        match serde_json::from_str::<EntryBody>(&body)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
            .event
        {
            Event::Grant {
                epsilon,
                per_job_epsilon,
                dataset_total,
                developer_epsilon,
                delta,
                dataset_delta,
                ..
            } => Ok(Some(Caps {
                scenario: epsilon,
                per_job: per_job_epsilon,
                dataset_total,
                developer: developer_epsilon,
                scenario_delta: delta,
                dataset_delta,
            })),
            _ => Err(StoreError::Corrupt("a grant row holds another kind of entry".into()).into()),
        }
    }

    /// Reserves ε for one release after checking it against every cap of the scenario's grant,
    /// all in one transaction.
    ///
    /// # Privacy
    /// Callers must read no data for this release before this returns `Ok`, and must
    /// [`commit`](Self::commit) before the release leaves the gate.
    pub fn reserve(&self, r: &Reservation<'_>) -> Result<Entry, LedgerError> {
        self.reserve_all(std::slice::from_ref(r))?
            .pop()
            .ok_or_else(|| LedgerError::Invalid("nothing appended".into()))
    }

    /// Reserves one release's debits on several datasets (a join's): one entry per dataset,
    /// each checked against that dataset's caps, all written in one transaction or none.
    ///
    /// # Privacy
    /// As [`reserve`](Self::reserve), for every entry.
    pub fn reserve_all(&self, all: &[Reservation<'_>]) -> Result<Vec<Entry>, LedgerError> {
        let ((), entries) = self.transact(|tx| {
            let mut events = Vec::with_capacity(all.len());
            for r in all {
                let delta = short_decimal_at_least(r.delta);
                let caps = Self::grant_in(tx, r.scenario_id, r.dataset_id)?
                    .ok_or_else(|| LedgerError::NoGrant(r.dataset_id.to_string()))?;
                let spent = totals_in(
                    tx,
                    total_keys(r.job_id, r.scenario_id, r.developer_id, r.dataset_id),
                )?;
                check_caps(&caps, spent, r.epsilon)?;
                let spent_delta = totals_in(tx, delta_keys(r.scenario_id, r.dataset_id))?;
                check_delta(&caps, spent_delta, delta)?;
                events.push(Event::Reserve {
                    job_id: r.job_id.into(),
                    scenario_id: r.scenario_id.into(),
                    dataset_id: r.dataset_id.into(),
                    developer_id: r.developer_id.into(),
                    epsilon: r.epsilon,
                    delta,
                    mechanism: r.mechanism.clone(),
                    mode: r.mode.into(),
                });
            }
            Ok::<_, LedgerError>(((), events))
        })?;
        if entries.len() != all.len() {
            return Err(LedgerError::Invalid("not every debit was appended".into()));
        }
        Ok(entries)
    }

    /// Closes a reservation.
    pub fn commit(
        &self,
        reservation: &Entry,
        released: bool,
        note: &str,
    ) -> Result<Entry, LedgerError> {
        self.commit_all(std::slice::from_ref(reservation), released, note)?
            .pop()
            .ok_or_else(|| LedgerError::Invalid("nothing appended".into()))
    }

    /// Closes the reservations of one release together.
    pub fn commit_all(
        &self,
        reservations: &[Entry],
        released: bool,
        note: &str,
    ) -> Result<Vec<Entry>, LedgerError> {
        let events = commit_events(reservations, released, note)?;
        let ((), entries) = self.transact(|_| Ok::<_, LedgerError>(((), events)))?;
        Ok(entries)
    }

    /// [`Ledger::commit_all`] for a job's release, with `also` run in the same transaction once
    /// the commits are appended (it gets them), so that what it writes commits with them.
    /// `also` cannot undo the commits: what it wants kept only if it succeeds, it writes under
    /// its own savepoint.
    ///
    /// Not fsynced: the debit is the reservation, durable before the data was read, and the
    /// release reaches only the job's module. Nothing of it leaves the domain before the job's
    /// outcome is durable, and the sync that makes it so makes these commits durable too. A crash in
    /// between loses them, and start-up closes the reservations as interrupted, still charged.
    pub fn commit_released(
        &self,
        reservations: &[Entry],
        also: impl FnOnce(&Transaction<'_>, &[Entry]),
    ) -> Result<Vec<Entry>, LedgerError> {
        let events = commit_events(reservations, true, "released")?;
        let ((), entries) =
            self.transact_then(|_| Ok::<_, LedgerError>(((), events)), also, false)?;
        Ok(entries)
    }

    /// Closes every reservation left open (by a crash): they stay charged, marked `interrupted`.
    /// Call at start-up, before any job runs.
    pub fn close_interrupted(&self) -> Result<usize, LedgerError> {
        let (n, _) = self.transact(|tx| {
            let mut stmt = tx.prepare(
                "SELECT r.seq, r.job_id FROM ledger r WHERE r.kind = 'reserve'
                 AND NOT EXISTS (SELECT 1 FROM ledger c WHERE c.kind = 'commit' AND c.reservation = r.seq) ORDER BY r.seq",
            )?;
            let open: Vec<(i64, String)> = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
            let events = open
                .iter()
                .map(|(seq, job)| Event::Commit {
                    job_id: job.clone(),
                    reservation: *seq as u64,
                    released: false,
                    note: "interrupted: the server stopped before the release was produced; the reservation stays charged".into(),
                })
                .collect();
            Ok::<_, LedgerError>((open.len(), events))
        })?;
        Ok(n)
    }

    /// A signed checkpoint of the tree as it is now; `record` also stores it, so that
    /// `ledger verify --data-dir` can detect entries removed from the end later.
    pub fn checkpoint(&self, record: bool) -> Result<Checkpoint, LedgerError> {
        // Only a recorded checkpoint writes; one for a report reads the tree alone and need
        // not wait behind another job's commit.
        let conn = record.then(|| self.store.conn());
        let tree = self.tree();
        let size = tree.len();
        let root = hex::encode(tree.root(size));
        drop(tree);
        let at = crate::now_rfc3339();
        let signature = self.signer.sign(&checkpoint_message(size, &root, &at));
        let cp = Checkpoint {
            tree_size: size,
            root,
            at,
            signature,
        };
        if let Some(conn) = conn {
            conn.execute_cached(
                "INSERT OR REPLACE INTO checkpoints (tree_size, root, at, signature) VALUES (?1, ?2, ?3, ?4)",
                params![cp.tree_size as i64, cp.root, cp.at, cp.signature],
            )?;
        }
        Ok(cp)
    }

    /// The latest recorded checkpoint.
    pub fn recorded_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self
            .store
            .conn()
            .query_row_cached("SELECT tree_size, root, at, signature FROM checkpoints ORDER BY tree_size DESC LIMIT 1", [], |r| {
                Ok(Checkpoint { tree_size: r.get::<_, i64>(0)? as u64, root: r.get(1)?, at: r.get(2)?, signature: r.get(3)? })
            })
            .optional()?)
    }

    /// The inclusion proof of entry `seq` in the tree of `tree_size` entries.
    pub fn inclusion_proof(&self, seq: u64, tree_size: u64) -> Result<InclusionProof, LedgerError> {
        let tree = self.tree();
        if seq == 0 || seq > tree_size || tree_size > tree.len() {
            return Err(LedgerError::Invalid(format!(
                "entry {seq} is not in a tree of {tree_size} (the ledger has {})",
                tree.len()
            )));
        }
        Ok(InclusionProof {
            seq,
            leaf_hash: hex::encode(tree.leaf(seq - 1)),
            tree_size,
            path: tree
                .inclusion_proof(seq - 1, tree_size)
                .iter()
                .map(hex::encode)
                .collect(),
        })
    }

    /// The consistency proof between two tree sizes.
    pub fn consistency_proof(&self, from: u64, to: u64) -> Result<ConsistencyProof, LedgerError> {
        let tree = self.tree();
        if from > to || to > tree.len() {
            return Err(LedgerError::Invalid(format!(
                "need from <= to <= {}",
                tree.len()
            )));
        }
        Ok(ConsistencyProof {
            from_size: from,
            to_size: to,
            path: tree
                .consistency_proof(from, to)
                .iter()
                .map(hex::encode)
                .collect(),
        })
    }

    pub fn len(&self) -> u64 {
        self.tree().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// ε charged so far at one level: `job`, `scenario` or `developer` (each on `dataset`), or
    /// `dataset`.
    pub fn spent(&self, level: &str, key: &str, dataset: &str) -> Result<f64, StoreError> {
        spent_in(&self.store.conn(), level, key, dataset)
    }

    /// Entries matching a filter, in order.
    pub fn entries(&self, filter: &Filter) -> Result<Vec<Entry>, StoreError> {
        read_entries(&self.store, filter)
    }

    /// Every entry, for export or verification.
    pub fn all_entries(&self) -> Result<Vec<Entry>, StoreError> {
        read_entries(&self.store, &Filter::default())
    }
}

/// [`Ledger::spent`], read on a caller's connection or transaction.
pub(crate) fn spent_in(
    conn: &rusqlite::Connection,
    level: &str,
    key: &str,
    dataset: &str,
) -> Result<f64, StoreError> {
    let key = if level == "dataset" {
        dataset.to_string()
    } else {
        format!("{key}\u{1f}{dataset}")
    };
    Ok(conn
        .query_row_cached(
            "SELECT spent FROM budget_totals WHERE level = ?1 AND key = ?2",
            params![level, key],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0.0))
}

/// Which entries to list.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub kind: Option<String>,
    pub dataset: Option<String>,
    pub scenario: Option<String>,
    pub developer: Option<String>,
    pub job: Option<String>,
    /// RFC 3339 bounds on the entry time.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Entries after this sequence number (for paging).
    pub after: Option<u64>,
    pub limit: Option<u32>,
}

fn read_entries(store: &Store, f: &Filter) -> Result<Vec<Entry>, StoreError> {
    let conn = store.conn();
    let mut stmt = conn.prepare(
        "SELECT seq, body, hash, signature, kind, job_id, scenario_id, dataset_id, developer_id, charged, reservation FROM ledger
         WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR dataset_id = ?2) AND (?3 IS NULL OR scenario_id = ?3)
           AND (?4 IS NULL OR developer_id = ?4) AND (?5 IS NULL OR job_id = ?5) AND seq > ?6
           AND (?7 IS NULL OR json_extract(body, '$.at') >= ?7) AND (?8 IS NULL OR json_extract(body, '$.at') <= ?8)
         ORDER BY seq LIMIT ?9",
    )?;
    let limit = f.limit.map_or(i64::MAX, i64::from);
    let mut rows = stmt.query(params![
        f.kind,
        f.dataset,
        f.scenario,
        f.developer,
        f.job,
        f.after.unwrap_or(0) as i64,
        f.since,
        f.until,
        limit
    ])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        let text: String = r.get(1)?;
        let body: EntryBody = serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("ledger entry {seq}: {e}")))?;
        // The indexed columns drive budget checks and filters: they must say what the signed body says.
        let kind: String = r.get(4)?;
        let text_cols: [Option<String>; 4] = [r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?];
        let stored = Indexed {
            kind: &kind,
            job: text_cols[0].as_deref(),
            scenario: text_cols[1].as_deref(),
            dataset: text_cols[2].as_deref(),
            developer: text_cols[3].as_deref(),
            charged: r.get(9)?,
            reservation: r.get(10)?,
        };
        if seq as u64 != body.seq || stored != body.event.indexed() {
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

/// Writes entries as JSON lines, then the checkpoint as a last line `{"checkpoint": …}`.
pub fn export(
    entries: &[Entry],
    checkpoint: Option<&Checkpoint>,
    mut out: impl Write,
) -> std::io::Result<()> {
    for e in entries {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    if let Some(cp) = checkpoint {
        serde_json::to_writer(&mut out, &serde_json::json!({ "checkpoint": cp }))?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// An export read back: entries and the checkpoint that closed it, if any.
pub struct Export {
    pub entries: Vec<Entry>,
    pub checkpoint: Option<Checkpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointLine {
    checkpoint: Checkpoint,
}

/// Reads a JSON-lines export.
pub fn read_export(input: impl BufRead) -> Result<Export, VerifyError> {
    let mut entries = Vec::new();
    let mut checkpoint = None;
    for (i, line) in input.lines().enumerate() {
        let bad = |problem: String| VerifyError {
            seq: entries.len() as u64 + 1,
            problem,
        };
        let line = line.map_err(|e| bad(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        if checkpoint.is_some() {
            return Err(bad(format!(
                "line {} follows the closing checkpoint",
                i + 1
            )));
        }
        if line.starts_with("{\"checkpoint\"") {
            let cp: CheckpointLine = serde_json::from_str(&line)
                .map_err(|e| bad(format!("line {} is not a checkpoint: {e}", i + 1)))?;
            checkpoint = Some(cp.checkpoint);
            continue;
        }
        let entry: Entry = serde_json::from_str(&line)
            .map_err(|e| bad(format!("line {} is not a ledger entry: {e}", i + 1)))?;
        entries.push(entry);
    }
    Ok(Export {
        entries,
        checkpoint,
    })
}

/// The first problem found, naming the entry (0: the key or the checkpoint).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("ledger entry {seq}: {problem}")]
pub struct VerifyError {
    pub seq: u64,
    pub problem: String,
}

/// ε charged against a cap at one level.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Level {
    pub spent: f64,
    pub cap: f64,
}

/// What a successful verification establishes, with the totals an auditor files.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub entries: u64,
    pub grants: u64,
    pub reservations: u64,
    pub released: u64,
    /// Reservations closed without a release (failed queries, interrupted jobs): still charged.
    pub closed_without_release: u64,
    /// Reservations with no commit yet (jobs running when the export was taken, or a crash
    /// before restart): charged.
    pub open_reservations: u64,
    pub total_epsilon: f64,
    /// δ charged in all (0 unless some release chose keys that are not public).
    pub total_delta: f64,
    pub head_hash: String,
    pub root: String,
    /// The size of the signed checkpoint that was checked, if the export carried one.
    pub checkpoint_size: Option<u64>,
    /// ε per (scenario, dataset) against the scenario's allocation.
    pub per_scenario: BTreeMap<String, Level>,
    /// ε per dataset against its total.
    pub per_dataset: BTreeMap<String, Level>,
    /// ε per (developer, dataset) against the developer cap.
    pub per_developer: BTreeMap<String, Level>,
    #[serde(skip)]
    tree: Tree,
}

/// Verifies sequence numbers, the hash chain, every hash and signature, the Merkle root against
/// the checkpoint (if given, with its signature), that every commit closes exactly one earlier
/// reservation, and replays every reservation against the caps of the grant before it — the
/// same rule the server enforces. Signatures are checked on all cores.
pub fn verify(
    entries: &[Entry],
    checkpoint: Option<&Checkpoint>,
    public_key_hex: &str,
) -> Result<Summary, VerifyError> {
    let key_bytes = hex::decode(public_key_hex.trim()).map_err(|_| VerifyError {
        seq: 0,
        problem: "the public key is not hex".into(),
    })?;
    let key = UnparsedPublicKey::new(&ED25519, key_bytes);

    // Pass 1, parallel: each entry's hash and signature. Keep the first failure.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .max(1);
    let chunk = entries.len().div_ceil(threads).max(1);
    let first_bad_signature: Option<VerifyError> = std::thread::scope(|s| {
        let handles: Vec<_> = entries
            .chunks(chunk)
            .map(|part| {
                let key = &key;
                s.spawn(move || {
                    for e in part {
                        let bad = |problem: &str| {
                            Some(VerifyError {
                                seq: e.body.seq,
                                problem: problem.into(),
                            })
                        };
                        let hash = entry_hash(&e.body);
                        if hex::encode(hash) != e.hash {
                            return bad(
                                "its content does not match its hash (the entry was edited)",
                            );
                        }
                        let Ok(sig) = hex::decode(&e.signature) else {
                            return bad("its signature is not hex");
                        };
                        if key.verify(&hash, &sig).is_err() {
                            return bad("its signature does not verify under this public key");
                        }
                    }
                    None
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok().flatten())
            .min_by_key(|e| e.seq)
    });

    let mut summary = replay_checked(entries, first_bad_signature.as_ref())?;
    if let Some(cp) = checkpoint {
        check_checkpoint(entries, cp, &key, &mut summary)?;
    }
    Ok(summary)
}

/// Replays entries in order — sequence, chain, Merkle tree, commits, every reservation against
/// its grant's caps — without checking signatures: the totals an auditor reads.
pub fn replay(entries: &[Entry]) -> Result<Summary, VerifyError> {
    replay_checked(entries, None)
}

fn replay_checked(
    entries: &[Entry],
    first_bad_signature: Option<&VerifyError>,
) -> Result<Summary, VerifyError> {
    let mut summary = Summary::default();
    let mut tree = Tree::default();
    let mut prev = genesis();
    let mut grants: HashMap<(String, String), Caps> = HashMap::new();
    let mut totals: HashMap<(&'static str, String), f64> = HashMap::new();
    let mut open: HashMap<u64, String> = HashMap::new();
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
            return Err(bad("it does not chain to the entry before it (an entry was removed, inserted or moved)".into()));
        }
        if let Some(sig) = first_bad_signature.filter(|s| s.seq == expected_seq) {
            return Err(sig.clone());
        }
        match &e.body.event {
            Event::Grant {
                scenario_id,
                dataset_id,
                developer_id,
                epsilon,
                per_job_epsilon,
                dataset_total,
                developer_epsilon,
                delta,
                dataset_delta,
            } => {
                summary.grants += 1;
                let caps = Caps {
                    scenario: *epsilon,
                    per_job: *per_job_epsilon,
                    dataset_total: *dataset_total,
                    developer: *developer_epsilon,
                    scenario_delta: *delta,
                    dataset_delta: *dataset_delta,
                };
                grants.insert((scenario_id.clone(), dataset_id.clone()), caps);
                summary
                    .per_scenario
                    .entry(format!("{scenario_id}/{dataset_id}"))
                    .or_default()
                    .cap = *epsilon;
                summary
                    .per_dataset
                    .entry(dataset_id.clone())
                    .or_default()
                    .cap = *dataset_total;
                summary
                    .per_developer
                    .entry(format!("{developer_id}/{dataset_id}"))
                    .or_default()
                    .cap = *developer_epsilon;
            }
            Event::Reserve {
                job_id,
                scenario_id,
                dataset_id,
                developer_id,
                epsilon,
                delta,
                ..
            } => {
                summary.reservations += 1;
                let caps = grants
                    .get(&(scenario_id.clone(), dataset_id.clone()))
                    .ok_or_else(|| bad(format!("it debits scenario {scenario_id} on {dataset_id}, which no earlier grant allows")))?;
                let keys = total_keys(job_id, scenario_id, developer_id, dataset_id);
                let spent = keys.clone().map(|k| totals.get(&k).copied().unwrap_or(0.0));
                check_caps(caps, spent, *epsilon)
                    .map_err(|err| bad(format!("replaying it overspends: {err}")))?;
                let dkeys = delta_keys(scenario_id, dataset_id);
                let spent_delta = dkeys
                    .clone()
                    .map(|k| totals.get(&k).copied().unwrap_or(0.0));
                check_delta(caps, spent_delta, *delta)
                    .map_err(|err| bad(format!("replaying it overspends: {err}")))?;
                for k in keys {
                    *totals.entry(k).or_default() += epsilon;
                }
                for k in dkeys {
                    *totals.entry(k).or_default() += delta;
                }
                summary.total_epsilon += epsilon;
                summary.total_delta += delta;
                summary
                    .per_scenario
                    .entry(format!("{scenario_id}/{dataset_id}"))
                    .or_default()
                    .spent += epsilon;
                summary
                    .per_dataset
                    .entry(dataset_id.clone())
                    .or_default()
                    .spent += epsilon;
                summary
                    .per_developer
                    .entry(format!("{developer_id}/{dataset_id}"))
                    .or_default()
                    .spent += epsilon;
                open.insert(expected_seq, job_id.clone());
            }
            Event::Commit {
                job_id,
                reservation,
                released,
                ..
            } => {
                match open.remove(reservation) {
                    Some(job) if job == *job_id => {}
                    Some(_) => {
                        return Err(bad(format!(
                            "it commits reservation {reservation} for another job"
                        )));
                    }
                    None => {
                        return Err(bad(format!(
                            "it commits reservation {reservation}, which is not an open reservation (a commit was duplicated or invented)"
                        )));
                    }
                }
                if *released {
                    summary.released += 1
                } else {
                    summary.closed_without_release += 1
                }
            }
        }
        tree.push(merkle::parse_hash(&e.hash).ok_or_else(|| bad("its hash is not hex".into()))?);
        prev = e.hash.clone();
        summary.entries += 1;
    }
    summary.open_reservations = open.len() as u64;
    summary.head_hash = prev;
    summary.root = hex::encode(tree.root(tree.len()));
    summary.tree = tree;
    Ok(summary)
}

fn check_checkpoint(
    entries: &[Entry],
    cp: &Checkpoint,
    key: &UnparsedPublicKey<Vec<u8>>,
    summary: &mut Summary,
) -> Result<(), VerifyError> {
    let tree = &summary.tree;
    {
        let bad = |problem: String| VerifyError { seq: 0, problem };
        let sig = hex::decode(&cp.signature)
            .map_err(|_| bad("the checkpoint's signature is not hex".into()))?;
        key.verify(&checkpoint_message(cp.tree_size, &cp.root, &cp.at), &sig)
            .map_err(|_| bad("the checkpoint's signature does not verify".into()))?;
        if cp.tree_size > entries.len() as u64 {
            return Err(VerifyError {
                seq: entries.len() as u64 + 1,
                problem: format!(
                    "the signed checkpoint covers {} entries but only {} are present (entries were removed from the end)",
                    cp.tree_size,
                    tree.len()
                ),
            });
        }
        if hex::encode(tree.root(cp.tree_size)) != cp.root {
            return Err(bad(format!(
                "the Merkle root of the first {} entries differs from the signed checkpoint's",
                cp.tree_size
            )));
        }
        summary.checkpoint_size = Some(cp.tree_size);
    }
    Ok(())
}

/// Checks a signed checkpoint against the public key.
pub fn verify_checkpoint(cp: &Checkpoint, public_key_hex: &str) -> bool {
    let (Ok(key), Ok(sig)) = (
        hex::decode(public_key_hex.trim()),
        hex::decode(&cp.signature),
    ) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&checkpoint_message(cp.tree_size, &cp.root, &cp.at), &sig)
        .is_ok()
}

/// Checks an inclusion proof against a checkpoint's root.
pub fn verify_inclusion(proof: &InclusionProof, root_hex: &str) -> bool {
    let (Some(leaf), Some(root), Some(path)) = (
        merkle::parse_hash(&proof.leaf_hash),
        merkle::parse_hash(root_hex),
        proof
            .path
            .iter()
            .map(|p| merkle::parse_hash(p))
            .collect::<Option<Vec<_>>>(),
    ) else {
        return false;
    };
    proof.seq >= 1 && merkle::verify_inclusion(proof.seq - 1, proof.tree_size, &leaf, &path, &root)
}

/// Checks that the tree with root `new_root_hex` extends the one with `old_root_hex` (their
/// sizes are the proof's): what an auditor holding an old checkpoint asks of a new one.
pub fn verify_consistency(
    proof: &ConsistencyProof,
    old_root_hex: &str,
    new_root_hex: &str,
) -> bool {
    let (Some(old), Some(new), Some(path)) = (
        merkle::parse_hash(old_root_hex),
        merkle::parse_hash(new_root_hex),
        proof
            .path
            .iter()
            .map(|p| merkle::parse_hash(p))
            .collect::<Option<Vec<_>>>(),
    ) else {
        return false;
    };
    merkle::verify_consistency(proof.from_size, proof.to_size, &old, &new, &path)
}

#[cfg(test)]
mod tests;
