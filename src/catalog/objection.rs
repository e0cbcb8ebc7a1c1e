//! Objections (异议): a developer reports a suspected error in a dataset; an operator answers.
//! Both sides read the thread; filing and answering are audited like every request.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Serialize)]
pub struct Objection {
    pub id: String,
    pub dataset_id: String,
    pub developer_id: String,
    pub text: String,
    /// `open` or `answered`.
    pub status: String,
    pub answer: Option<String>,
    pub answered_by: Option<String>,
    pub answered_at: Option<String>,
    pub created_at: String,
}

/// A developer's objection.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewObjection {
    /// What looks wrong, and where: 1 to 4000 characters.
    pub text: String,
}

/// An operator's answer.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// 1 to 4000 characters.
    pub answer: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectionError {
    #[error("{0}")]
    Invalid(String),
    #[error("no such dataset")]
    UnknownDataset,
    #[error("no such objection")]
    NotFound,
    #[error("the objection is already answered")]
    AlreadyAnswered,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for ObjectionError {
    fn from(e: rusqlite::Error) -> Self {
        ObjectionError::Store(e.into())
    }
}

fn text(field: &str, t: &str) -> Result<String, ObjectionError> {
    let t = t.trim();
    if t.is_empty() || t.len() > 4000 {
        return Err(ObjectionError::Invalid(format!(
            "`{field}` must be 1 to 4000 characters"
        )));
    }
    Ok(t.to_string())
}

pub fn file(
    store: &Store,
    dataset_id: &str,
    developer_id: &str,
    new: &NewObjection,
) -> Result<Objection, ObjectionError> {
    let body = text("text", &new.text)?;
    if super::policy(store, dataset_id)?.is_none() {
        return Err(ObjectionError::UnknownDataset);
    }
    let o = Objection {
        id: crate::new_id("obj"),
        dataset_id: dataset_id.into(),
        developer_id: developer_id.into(),
        text: body,
        status: "open".into(),
        answer: None,
        answered_by: None,
        answered_at: None,
        created_at: crate::now_rfc3339(),
    };
    store.conn().execute(
        "INSERT INTO objections (id, dataset_id, developer_id, body, status, created_at) VALUES (?1, ?2, ?3, ?4, 'open', ?5)",
        params![o.id, o.dataset_id, o.developer_id, o.text, o.created_at],
    )?;
    Ok(o)
}

pub fn answer(
    store: &Store,
    id: &str,
    operator_id: &str,
    a: &Answer,
) -> Result<Objection, ObjectionError> {
    let answer = text("answer", &a.answer)?;
    let changed = store.conn().execute(
        "UPDATE objections SET status = 'answered', answer = ?2, answered_by = ?3, answered_at = ?4 WHERE id = ?1 AND status = 'open'",
        params![id, answer, operator_id, crate::now_rfc3339()],
    )?;
    if changed == 0 {
        return Err(match get(store, id)? {
            Some(_) => ObjectionError::AlreadyAnswered,
            None => ObjectionError::NotFound,
        });
    }
    get(store, id)?.ok_or(ObjectionError::NotFound)
}

const COLUMNS: &str =
    "id, dataset_id, developer_id, body, status, answer, answered_by, answered_at, created_at";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Objection> {
    Ok(Objection {
        id: r.get(0)?,
        dataset_id: r.get(1)?,
        developer_id: r.get(2)?,
        text: r.get(3)?,
        status: r.get(4)?,
        answer: r.get(5)?,
        answered_by: r.get(6)?,
        answered_at: r.get(7)?,
        created_at: r.get(8)?,
    })
}

pub fn get(store: &Store, id: &str) -> Result<Option<Objection>, StoreError> {
    Ok(store
        .conn()
        .query_row(
            &format!("SELECT {COLUMNS} FROM objections WHERE id = ?1"),
            params![id],
            from_row,
        )
        .optional()?)
}

/// All objections, or one developer's, oldest first.
pub fn list(store: &Store, developer_id: Option<&str>) -> Result<Vec<Objection>, StoreError> {
    let conn = store.conn();
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM objections WHERE ?1 IS NULL OR developer_id = ?1 ORDER BY created_at, id"
    ))?;
    let rows = stmt
        .query_map(params![developer_id], from_row)?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}
