//! Principals (developers, operators, auditors) and their bearer tokens. Tokens are 256 random
//! bits from ring, shown once, stored only as their SHA-256.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::store::{Cached, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Developer,
    Operator,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Developer => "developer",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "developer" => Some(Role::Developer),
            "operator" => Some(Role::Operator),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Principal {
    pub id: String,
    pub role: Role,
    pub name: String,
    pub organisation: Option<String>,
    pub licence_id: Option<String>,
    pub created_at: String,
}

/// A token in the clear: returned once at creation, never stored.
pub struct NewToken(pub String);

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPrincipal {
    pub role: Role,
    pub name: String,
    #[serde(default)]
    pub organisation: Option<String>,
    #[serde(default)]
    pub licence_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrincipalError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for PrincipalError {
    fn from(e: rusqlite::Error) -> Self {
        PrincipalError::Store(e.into())
    }
}

/// `unseen_` followed by 256 random bits (ring's system random) in hex.
fn new_token() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random source failed");
    format!("unseen_{}", hex::encode(bytes))
}

fn token_hash(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

/// Registers a principal and returns it with its token (shown once).
pub fn create(store: &Store, new: &NewPrincipal) -> Result<(Principal, NewToken), PrincipalError> {
    let name = new.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(PrincipalError::Invalid(
            "name must be between 1 and 200 characters".into(),
        ));
    }
    for (field, value) in [
        ("organisation", &new.organisation),
        ("licence_id", &new.licence_id),
    ] {
        if value.as_ref().is_some_and(|v| v.len() > 200) {
            return Err(PrincipalError::Invalid(format!(
                "{field} must be at most 200 characters"
            )));
        }
    }
    if new.role == Role::Developer
        && new
            .licence_id
            .as_deref()
            .is_none_or(|l| l.trim().is_empty())
    {
        return Err(PrincipalError::Invalid(
            "developers are registered under their real name with a licence_id".into(),
        ));
    }
    let id = crate::new_id(new.role.as_str());
    let token = NewToken(new_token());
    let created_at = crate::now_rfc3339();
    store.conn().execute_cached(
        "INSERT INTO principals (id, role, name, organisation, licence_id, token_hash, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            id,
            new.role.as_str(),
            name,
            new.organisation,
            new.licence_id,
            token_hash(&token.0),
            created_at
        ],
    )?;
    Ok((
        Principal {
            id,
            role: new.role,
            name: name.to_string(),
            organisation: new.organisation.clone(),
            licence_id: new.licence_id.clone(),
            created_at,
        },
        token,
    ))
}

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Principal, Option<String>)> {
    let role: String = row.get(1)?;
    Ok((
        Principal {
            id: row.get(0)?,
            role: Role::parse(&role).unwrap_or(Role::Auditor),
            name: row.get(2)?,
            organisation: row.get(3)?,
            licence_id: row.get(4)?,
            created_at: row.get(5)?,
        },
        row.get(6)?,
    ))
}

/// The active principal a token belongs to, if any (revoked principals are not returned).
pub fn authenticate(store: &Store, token: &str) -> Result<Option<Principal>, StoreError> {
    if token.len() > 200 {
        return Ok(None);
    }
    let found = store
        .read()
        .query_row_cached(
            // Revoked or suspended: inactive either way.
            "SELECT id, role, name, organisation, licence_id, created_at, COALESCE(revoked_at, suspended_at)
             FROM principals WHERE token_hash = ?1",
            params![token_hash(token)],
            from_row,
        )
        .optional()?;
    Ok(found.and_then(|(p, revoked)| revoked.is_none().then_some(p)))
}

pub fn get(store: &Store, id: &str) -> Result<Option<Principal>, StoreError> {
    Ok(store
        .read()
        .query_row_cached(
            "SELECT id, role, name, organisation, licence_id, created_at, COALESCE(revoked_at, suspended_at)
             FROM principals WHERE id = ?1",
            params![id],
            from_row,
        )
        .optional()?
        .and_then(|(p, revoked)| revoked.is_none().then_some(p)))
}

/// Revokes a principal; returns false if there was no active principal with that id.
pub fn revoke(store: &Store, id: &str) -> Result<bool, StoreError> {
    let n = store.conn().execute_cached(
        "UPDATE principals SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, crate::now_rfc3339()],
    )?;
    Ok(n == 1)
}

/// Suspends (or reinstates) a principal that is not revoked; returns false if there is none.
/// A suspended principal is refused at once, like a revoked one, but can be reinstated.
pub fn set_suspended(store: &Store, id: &str, suspended: bool) -> Result<bool, StoreError> {
    let at = suspended.then(crate::now_rfc3339);
    let n = store.conn().execute_cached(
        "UPDATE principals SET suspended_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, at],
    )?;
    Ok(n == 1)
}

/// Replaces an active principal's token; the old one stops working at once. Returns the new
/// token (shown once), or None if there is no active principal with that id.
pub fn rotate(store: &Store, id: &str) -> Result<Option<NewToken>, StoreError> {
    let token = new_token();
    let n = store.conn().execute_cached(
        "UPDATE principals SET token_hash = ?2 WHERE id = ?1 AND revoked_at IS NULL AND suspended_at IS NULL",
        params![id, token_hash(&token)],
    )?;
    Ok((n == 1).then_some(NewToken(token)))
}
