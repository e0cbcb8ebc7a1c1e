//! The SQLite file that holds metadata, the ledger and the audit log. WAL mode with
//! `synchronous=FULL`: a commit is on disk when it returns, which the ledger relies on. The
//! writes on a job's path are committed without fsync instead and then wait for a sync
//! ([`Store::write_durably`]), which concurrent writers share (group commit); and some changes
//! a crash may lose harmlessly are not waited for at all ([`Store::without_fsync`]).
//! One writing connection behind a mutex: writes are serialised, which is also what makes the
//! ledger's check-then-debit atomic. Reads on the request path (tokens, jobs, scenarios,
//! policies) go through a few read-only connections instead, so they never wait behind a
//! writer's `fsync`: in WAL mode a reader sees every transaction committed before its
//! statement began, so a revocation or a finished job is visible to the next read.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, Params, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// A commit made for several callers at once failed (its error, as text).
    #[error("database error: {0}")]
    Shared(String),
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    readers: Arc<[Mutex<Connection>]>,
    durability: Arc<Durability>,
}

/// Which commits without fsync are durable yet: each is numbered, and a sync records the
/// number up to which it made them durable.
#[derive(Default)]
struct Durability {
    /// Commits without fsync numbered so far. Taken, under the writing connection, by each
    /// [`WithoutFsync`] guard before it commits anything; read by a sync under that
    /// connection too, so a number a sync reads belongs to a finished commit.
    written: AtomicU64,
    /// The number up to which commits are durable. Its lock orders syncs, and is taken before
    /// the writing connection, never while holding it.
    synced: Mutex<u64>,
    /// Commits with fsync that syncs made (for tests and the numbers in the README).
    syncs: AtomicU64,
    /// Writers waiting for or holding the writing connection without fsync. A sync about to
    /// start lets them commit first, so that its fsync covers them too.
    writing: AtomicUsize,
}

/// How long a sync waits at most for the writers queued for the connection to commit (a
/// stream of them must not hold it up for ever).
const GATHER: std::time::Duration = std::time::Duration::from_millis(2);

/// Read-only connections: as many as there are threads likely to read at once.
const READERS: usize = 4;

/// Compiled statements kept per connection (rusqlite's cache; its default is 16, fewer than the
/// distinct statements of a job's path), each of which SQLite would otherwise parse and plan
/// on every call.
const STATEMENT_CACHE: usize = 64;

/// `execute` and `query_row` through the connection's statement cache: the statement is
/// compiled once per connection and reused, instead of parsed and planned on every call.
pub trait Cached {
    fn execute_cached<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn query_row_cached<T, P: Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn execute_cached<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn query_row_cached<T, P: Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS principals (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    organisation TEXT,
    licence_id TEXT,
    token_hash BLOB NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    suspended_at TEXT
);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    schema TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS modules (
    hash TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    entries TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (hash, owner_id)
);
CREATE TABLE IF NOT EXISTS scenarios (
    id TEXT PRIMARY KEY,
    developer_id TEXT NOT NULL,
    status TEXT NOT NULL,
    application TEXT NOT NULL,
    epsilon_cap REAL,
    per_job_epsilon REAL,
    min_group_size INTEGER,
    requires_review INTEGER NOT NULL DEFAULT 0,
    decided_by TEXT,
    decided_at TEXT,
    reason TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    developer_id TEXT NOT NULL,
    scenario_id TEXT NOT NULL,
    module_hash TEXT NOT NULL,
    entry TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    error_code TEXT,
    error_message TEXT,
    report TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY,
    body TEXT NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    kind TEXT NOT NULL,
    job_id TEXT,
    scenario_id TEXT,
    dataset_id TEXT,
    developer_id TEXT,
    charged REAL NOT NULL,
    reservation INTEGER
);
CREATE INDEX IF NOT EXISTS ledger_scenario ON ledger (scenario_id, dataset_id);
CREATE INDEX IF NOT EXISTS ledger_job ON ledger (job_id);
CREATE INDEX IF NOT EXISTS ledger_dataset ON ledger (dataset_id);
CREATE INDEX IF NOT EXISTS ledger_developer ON ledger (developer_id);
CREATE UNIQUE INDEX IF NOT EXISTS ledger_commit ON ledger (reservation) WHERE kind = 'commit';
-- A scenario's latest grant on a dataset, read by every reservation: without it the lookup walks
-- the scenario's reserves and commits back to its grant, so it grows with the scenario's jobs.
CREATE INDEX IF NOT EXISTS ledger_grant ON ledger (scenario_id, dataset_id, seq) WHERE kind = 'grant';
-- Running ε per level, moved in the same transaction as each reservation (O(1) cap checks).
CREATE TABLE IF NOT EXISTS budget_totals (
    level TEXT NOT NULL,
    key TEXT NOT NULL,
    spent REAL NOT NULL,
    PRIMARY KEY (level, key)
);
-- Releases already paid for, by scenario and request (with the data file's version): the same
-- query asked again in the same scenario gets the same release and spends nothing.
CREATE TABLE IF NOT EXISTS release_cache (
    scenario_id TEXT NOT NULL,
    request_key TEXT NOT NULL,
    release TEXT NOT NULL,
    reservation INTEGER NOT NULL,
    commit_seq INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (scenario_id, request_key)
);
-- A kept release's ledger entries on its other datasets (a join's), as JSON pairs of
-- (reservation, commit); the first dataset's are in release_cache itself.
CREATE TABLE IF NOT EXISTS release_cache_joint (
    scenario_id TEXT NOT NULL,
    request_key TEXT NOT NULL,
    entries TEXT NOT NULL,
    PRIMARY KEY (scenario_id, request_key)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    tree_size INTEGER PRIMARY KEY,
    root TEXT NOT NULL,
    at TEXT NOT NULL,
    signature TEXT NOT NULL
);
-- The hash-chained audit log (see src/audit). The pre-chain `audit` table of early data
-- directories is left in place, unused.
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    request_id TEXT,
    principal_id TEXT,
    role TEXT,
    action TEXT NOT NULL,
    target TEXT,
    outcome TEXT NOT NULL,
    status INTEGER,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_target ON audit_log (target);
-- One row, rewritten by `Store::sync`: a commit with fsync that makes every commit before it
-- durable, those made without fsync included.
CREATE TABLE IF NOT EXISTS durability (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    synced_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS objections (
    id TEXT PRIMARY KEY,
    dataset_id TEXT NOT NULL,
    developer_id TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    answer TEXT,
    answered_by TEXT,
    answered_at TEXT,
    created_at TEXT NOT NULL
);
"#;

impl Store {
    /// Opens (creating if needed) `<data_dir>/unseen.sqlite`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(data_dir.join("unseen.sqlite"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let readers = (0..READERS)
            .map(|_| {
                let r = Connection::open_with_flags(
                    data_dir.join("unseen.sqlite"),
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                r.busy_timeout(std::time::Duration::from_secs(5))?;
                r.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
                Ok(Mutex::new(r))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            readers: readers.into(),
            durability: Arc::default(),
        })
    }

    /// The connection. Hold it only for short, non-async work.
    pub fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back on drop), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the writing connection with `synchronous=NORMAL`, then restores `FULL`
    /// (whatever `f` returned). Its commits are not fsynced: see [`Store::conn_without_fsync`].
    pub fn without_fsync<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let conn = self.conn_without_fsync()?;
        f(&conn)
    }

    /// The writing connection with `synchronous=NORMAL` until the guard is dropped, which
    /// restores `FULL` (after an error or a panic too). Its commits are not fsynced: a crash
    /// may lose them, but never corrupts the file, and the next `FULL` commit (a sync) makes
    /// them durable too, since it fsyncs the whole write-ahead log. Either the caller then
    /// waits for that sync ([`Store::sync_through`] with the guard's [`WithoutFsync::number`],
    /// as [`Store::write_durably`] does), or the change is one whose loss in a crash recovery
    /// already handles, and which a durable write follows before anything that depends on it
    /// is shown: a job's move from `queued` to `running` (both are failed as interrupted at
    /// start-up), a job's submission (its request's audit record is durable before the answer
    /// leaves), a ledger commit (the job's outcome is).
    ///
    /// Readers see such a commit at once, before it is durable. So what is shown from them
    /// that must not change after a crash is shown only once durable: the ledger's entries and
    /// proofs after [`Store::sync`], a job's report once its outcome's sync has returned
    /// (`Runner::settled`).
    pub fn conn_without_fsync(&self) -> rusqlite::Result<WithoutFsync<'_>> {
        let writing = Writing::new(&self.durability.writing);
        let conn = self.conn();
        conn.execute_cached("PRAGMA synchronous = NORMAL", [])?;
        // Numbered before anything is committed, under the connection: a sync that reads this
        // number reads it after the guard is gone, so after its commits.
        let number = self.durability.written.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(WithoutFsync {
            conn,
            number,
            _writing: writing,
        })
    }

    /// Runs `f` (which commits its own transactions) on the writing connection without fsync,
    /// lets the connection go, then waits until what `f` committed is durable
    /// ([`Store::sync_through`]). The same promise as a commit with fsync, but writers that
    /// overlap share one fsync (group commit): while one sync holds the connection for its
    /// fsync, the commits queued behind it are written, and the next sync covers all of them.
    /// Readers may see the commit before it is durable; what must not be shown before then
    /// waits for this call to return (see [`Store::conn_without_fsync`]).
    pub fn write_durably<T, E: From<rusqlite::Error>>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let (value, number) = {
            let mut conn = self.conn_without_fsync()?;
            let value = f(&mut conn)?;
            (value, conn.number)
        };
        self.sync_through(number)?;
        Ok(value)
    }

    /// Makes every commit so far durable: if one was made without fsync since the last sync,
    /// a commit with fsync (of the `durability` row), which fsyncs the whole write-ahead log.
    /// Call it after reading what is about to be shown, before showing it. Returns whether it
    /// had to write.
    pub fn sync(&self) -> rusqlite::Result<bool> {
        // A commit seen by the caller's read took its number before that read began.
        self.sync_through(self.durability.written.load(Ordering::SeqCst))
    }

    /// Makes the commits without fsync numbered up to `number` durable, and any others
    /// finished by then: nothing if a sync already has, else one commit with fsync. Returns
    /// whether it wrote.
    pub fn sync_through(&self, number: u64) -> rusqlite::Result<bool> {
        let mut synced = self
            .durability
            .synced
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *synced >= number {
            return Ok(false);
        }
        // Writers queued for the connection now would otherwise wait behind this fsync and
        // then need one of their own: let them commit first.
        let until = std::time::Instant::now() + GATHER;
        while self.durability.writing.load(Ordering::SeqCst) > 0
            && std::time::Instant::now() < until
        {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        let conn = self.conn();
        // Every number taken so far belongs to a guard that has let the connection go, so to
        // commits that are finished: this fsync covers them all.
        let upto = self.durability.written.load(Ordering::SeqCst);
        conn.execute_cached(
            "INSERT INTO durability (id, synced_at) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET synced_at = excluded.synced_at",
            [crate::now_rfc3339()],
        )?;
        drop(conn);
        *synced = upto;
        self.durability.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Commits with fsync made by syncs so far.
    pub fn syncs(&self) -> u64 {
        self.durability.syncs.load(Ordering::Relaxed)
    }

    /// A read-only connection, for a read that need not see the caller's own uncommitted
    /// writes: the first free one, or else the caller waits for one (never for the writer).
    pub fn read(&self) -> MutexGuard<'_, Connection> {
        for r in self.readers.iter() {
            match r.try_lock() {
                Ok(guard) => return guard,
                Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        // All busy: wait on one, taken in turn so that waiters spread out.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.readers.len();
        self.readers[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writing connection without fsync at commit; restores `FULL` when dropped. (Failing
/// to restore is logged: returning the error would not put the connection back either.)
pub struct WithoutFsync<'a> {
    conn: MutexGuard<'a, Connection>,
    /// This guard's number among commits without fsync (whether or not it commits anything:
    /// a sync then writes once more at most).
    number: u64,
    /// Dropped after `conn` (fields drop in order): the writer counts as writing until the
    /// connection is free.
    _writing: Writing<'a>,
}

/// Counts a writer in [`Durability::writing`] for as long as it lives.
struct Writing<'a>(&'a AtomicUsize);

impl<'a> Writing<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Writing(count)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WithoutFsync<'_> {
    /// The number to pass to [`Store::sync_through`], once the guard is dropped, to make its
    /// commits durable.
    pub fn number(&self) -> u64 {
        self.number
    }
}

impl Drop for WithoutFsync<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.conn.execute_cached("PRAGMA synchronous = FULL", []) {
            tracing::error!("could not restore synchronous=FULL: {e}");
        }
    }
}

impl std::ops::Deref for WithoutFsync<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for WithoutFsync<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(conn: &Connection) -> i64 {
        conn.query_row("SELECT COUNT(*) FROM modules", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn reads_see_every_commit_and_never_wait_for_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let insert = |conn: &Connection, hash: &str| {
            conn.execute(
                "INSERT INTO modules (hash, owner_id, size, entries, created_at) VALUES (?1, 'dev', 1, '[]', 'now')",
                [hash],
            )
            .unwrap();
        };
        insert(&store.conn(), "a");
        assert_eq!(
            count(&store.read()),
            1,
            "a committed write is seen by the next read"
        );

        // The writer holds its lock, inside an open write transaction: a read from another
        // thread still answers, from the last commit.
        let mut writer = store.conn();
        let tx = writer
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        insert(&tx, "b");
        let reader = store.clone();
        let (send, answer) = std::sync::mpsc::channel();
        std::thread::spawn(move || send.send(count(&reader.read())));
        let seen = answer
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the read waited for the writer");
        assert_eq!(seen, 1, "an uncommitted write is not seen");
        tx.commit().unwrap();
        drop(writer);
        assert_eq!(count(&store.read()), 2);

        // Every reader, busy or not, is read-only.
        let held: Vec<_> = (0..READERS).map(|_| store.read()).collect();
        for r in &held {
            let refused = r.execute("DELETE FROM modules", []);
            assert!(refused.is_err(), "a reader wrote");
        }
        drop(held);
        assert_eq!(count(&store.conn()), 2);
    }

    #[test]
    fn a_sync_writes_only_after_a_commit_without_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let synced_at = |store: &Store| -> Option<String> {
            store
                .read()
                .query_row("SELECT synced_at FROM durability", [], |r| r.get(0))
                .ok()
        };
        store
            .conn()
            .execute(
                "INSERT INTO modules VALUES ('a', 'dev', 1, '[]', 'now')",
                [],
            )
            .unwrap();
        assert!(!store.sync().unwrap(), "a FULL commit needs no sync");
        assert_eq!(synced_at(&store), None);
        store
            .conn_without_fsync()
            .unwrap()
            .execute(
                "INSERT INTO modules VALUES ('b', 'dev', 1, '[]', 'now')",
                [],
            )
            .unwrap();
        assert!(
            store.sync().unwrap(),
            "after one without fsync, a sync commits"
        );
        assert!(synced_at(&store).is_some());
        assert!(!store.sync().unwrap(), "once");
        assert_eq!(count(&store.read()), 2);
    }

    /// Eight writers commit while a sync holds the lock that orders syncs: when it lets go,
    /// one commit with fsync makes all eight durable, and each returns only after it.
    #[test]
    fn durable_writes_that_overlap_share_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let held = store.durability.synced.lock().unwrap();
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    store.write_durably(|conn| {
                        conn.execute(
                            "INSERT INTO modules VALUES (?1, 'dev', 1, '[]', 'now')",
                            [format!("m{i}")],
                        )
                    })
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while count(&store.read()) < 8 {
            assert!(
                std::time::Instant::now() < deadline,
                "the writers did not commit"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "a writer returned before its commit was durable"
        );
        assert_eq!(store.syncs(), 0);
        drop(held);
        for w in writers {
            assert_eq!(w.join().unwrap().unwrap(), 1);
        }
        assert_eq!(store.syncs(), 1, "one fsync for the eight");
        assert!(!store.sync().unwrap(), "nothing is left to make durable");
        assert_eq!(store.syncs(), 1);
    }

    #[test]
    fn a_commit_without_fsync_is_seen_and_full_durability_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let synchronous = |conn: &Connection| -> i64 {
            conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(synchronous(&store.conn()), 2, "FULL");
        let inserted = store
            .without_fsync(|conn| {
                assert_eq!(synchronous(conn), 1, "NORMAL inside");
                conn.execute(
                    "INSERT INTO modules (hash, owner_id, size, entries, created_at) VALUES ('a', 'dev', 1, '[]', 'now')",
                    [],
                )
            })
            .unwrap();
        assert_eq!(inserted, 1);
        assert_eq!(synchronous(&store.conn()), 2, "FULL again");
        assert_eq!(count(&store.read()), 1);
        // A failing statement inside still restores FULL.
        let failed =
            store.without_fsync(|conn| conn.execute("INSERT INTO no_such_table VALUES (1)", []));
        assert!(failed.is_err());
        assert_eq!(synchronous(&store.conn()), 2, "FULL after a failure");
        // And a panic inside.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.without_fsync(|_| -> rusqlite::Result<()> { panic!("inside") })
        }));
        assert!(panicked.is_err());
        assert_eq!(synchronous(&store.conn()), 2, "FULL after a panic");
    }
}
