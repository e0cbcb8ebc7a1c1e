//! The audit log: every state-changing action with who, what, when and outcome.
//! (Hash-chaining it like the ledger, and the auditor's API over it, are not built yet.)

use rusqlite::params;
use serde::Serialize;

use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub seq: i64,
    pub at: String,
    pub principal_id: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
}

/// Appends one record. Actions are fixed snake_case names; targets are ids, never data.
pub fn record(
    store: &Store,
    principal_id: Option<&str>,
    action: &str,
    target: Option<&str>,
    outcome: &str,
) -> Result<(), StoreError> {
    store.conn().execute(
        "INSERT INTO audit (at, principal_id, action, target, outcome) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![crate::now_rfc3339(), principal_id, action, target, outcome],
    )?;
    Ok(())
}

pub fn list(store: &Store, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
    let conn = store.conn();
    let mut stmt = conn.prepare(
        "SELECT seq, at, principal_id, action, target, outcome FROM audit ORDER BY seq DESC LIMIT ?1",
    )?;
    let rows = stmt
        .query_map(params![limit], |r| {
            Ok(AuditRecord {
                seq: r.get(0)?,
                at: r.get(1)?,
                principal_id: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                outcome: r.get(5)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}
