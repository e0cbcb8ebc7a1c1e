//! The public-data catalogue: each dataset's public metadata (title, source, open attribute,
//! version date) and its policy (privacy unit, public bounds and keys, total budget, minimum
//! group size). Policy files in `policies/` seed it at start-up; it lives in SQLite after that.
//! Nothing here ever reads a row: only the Parquet footer's schema.

pub mod objection;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::store::{Cached, Store, StoreError};

/// 无条件 / 有条件 / 不予开放.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OpenAttribute {
    Unconditional,
    Conditional,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Int32,
    Int64,
    Float64,
    String,
}

/// A public group key value.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(untagged)]
pub enum KeyValue {
    Int(i64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnPolicy {
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// Public clamping bounds `[lower, upper]` used when a query names none.
    #[serde(default)]
    pub bounds: Option<[f64; 2]>,
    /// The complete public set of values this column may be grouped by.
    #[serde(default)]
    pub public_keys: Option<Vec<KeyValue>>,
}

/// One dataset's catalogue entry and policy, as written in a policy file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetPolicy {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    /// The public body the data comes from (cited in every report).
    pub source: String,
    pub open_attribute: OpenAttribute,
    #[serde(default)]
    pub update_frequency: Option<String>,
    /// The version of the data (cited in every report).
    pub version_date: String,
    /// When the domain acquired this version from its source (cited in every report).
    #[serde(default)]
    pub acquisition_date: Option<String>,
    /// Parquet file; a relative path is taken from the data directory.
    pub path: PathBuf,
    /// The SQL table name guests use.
    pub table: String,
    /// `"row"` or the column that identifies a person.
    pub privacy_unit: String,
    /// For a person unit: the most rows of one person any query uses (chosen at random when a
    /// person has more). Scenarios and queries may only lower it. Required for a person unit,
    /// absent for `"row"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows_per_unit: Option<u64>,
    /// For a person unit: the most groups one person's rows may fall in, where that lowers a
    /// release's price (groups chosen from the data by partition selection); chosen at random
    /// when a person has more. Scenarios and queries may only lower it. Default: none (a
    /// person counts as reaching as many groups as they have rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_groups_per_unit: Option<u64>,
    /// Total ε the dataset may ever spend across all scenarios.
    pub total_epsilon: f64,
    /// Total δ the dataset may ever spend across all scenarios, on releases whose group keys
    /// are not public (DP partition selection). Default 0: such releases are refused.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub total_delta: f64,
    /// The most ε one developer may spend on this dataset across all their scenarios
    /// (default: the total).
    #[serde(default)]
    pub developer_epsilon: Option<f64>,
    /// Groups whose noisy count falls below this are suppressed.
    pub min_group_size: u64,
    pub columns: BTreeMap<String, ColumnPolicy>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("policy file {file}: {problem}")]
    BadPolicy { file: String, problem: String },
    #[error("{0}")]
    Invalid(String),
    #[error("a dataset with id {0:?} is already in the catalogue")]
    Exists(String),
    #[error("no dataset with that id")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for CatalogError {
    fn from(e: rusqlite::Error) -> Self {
        CatalogError::Store(e.into())
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The largest per-person row bound a catalogue may set: beyond it the noise drowns any answer.
pub const MAX_ROWS_PER_UNIT: u64 = 100_000;

/// The largest per-person group bound: pass 1 keeps this many hashes per person, and a bound
/// this wide is rarely below the row bound anyway.
pub const MAX_GROUPS_PER_UNIT: u64 = 64;

impl DatasetPolicy {
    /// Parses and checks a policy file's text; errors name the file, the field and the problem.
    pub fn parse(file: &str, text: &str) -> Result<Self, CatalogError> {
        let bad = |problem: String| CatalogError::BadPolicy {
            file: file.to_string(),
            problem,
        };
        let policy: DatasetPolicy = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        policy.check(file)
    }

    /// Checks a parsed policy; errors name the file (or `request`), the field and the problem.
    pub fn check(self, file: &str) -> Result<Self, CatalogError> {
        let bad = |problem: String| CatalogError::BadPolicy {
            file: file.to_string(),
            problem,
        };
        let policy = self;
        for (field, value) in [("id", &policy.id), ("table", &policy.table)] {
            if !is_identifier(value) {
                return Err(bad(format!(
                    "field `{field}`: {value:?} must be a lower-case identifier (a-z, 0-9, _)"
                )));
            }
        }
        if !(policy.total_epsilon.is_finite() && policy.total_epsilon > 0.0) {
            return Err(bad(
                "field `total_epsilon`: must be a positive number".into()
            ));
        }
        if !(policy.total_delta.is_finite()
            && (0.0..=crate::scenario::MAX_DELTA).contains(&policy.total_delta))
        {
            return Err(bad(format!(
                "field `total_delta`: must be between 0 and {:e}",
                crate::scenario::MAX_DELTA
            )));
        }
        if policy
            .developer_epsilon
            .is_some_and(|d| !(d.is_finite() && d > 0.0))
        {
            return Err(bad(
                "field `developer_epsilon`: must be a positive number".into()
            ));
        }
        if policy.privacy_unit != "row" && !policy.columns.contains_key(&policy.privacy_unit) {
            return Err(bad(format!(
                "field `privacy_unit`: {:?} is neither \"row\" nor a declared column",
                policy.privacy_unit
            )));
        }
        match (policy.privacy_unit.as_str(), policy.max_rows_per_unit) {
            ("row", None) => {}
            ("row", Some(_)) => {
                return Err(bad(
                    "field `max_rows_per_unit`: only for a person unit; with \"row\" each row is its own unit".into(),
                ));
            }
            (unit, None) => {
                return Err(bad(format!(
                    "field `max_rows_per_unit`: required with privacy_unit {unit:?} (the most rows of one person a query may use, e.g. 10)"
                )));
            }
            (unit, Some(k)) => {
                if !(1..=MAX_ROWS_PER_UNIT).contains(&k) {
                    return Err(bad(format!(
                        "field `max_rows_per_unit`: must be 1 to {MAX_ROWS_PER_UNIT}"
                    )));
                }
                if policy.columns[unit].ty == ColumnType::Float64 {
                    return Err(bad(format!(
                        "field `privacy_unit`: {unit:?} is a float column; a person is identified by an integer or a string"
                    )));
                }
            }
        }
        match (policy.privacy_unit.as_str(), policy.max_groups_per_unit) {
            (_, None) => {}
            ("row", Some(_)) => {
                return Err(bad(
                    "field `max_groups_per_unit`: only for a person unit; a row is in one group"
                        .into(),
                ));
            }
            (_, Some(g)) if !(1..=MAX_GROUPS_PER_UNIT).contains(&g) => {
                return Err(bad(format!(
                    "field `max_groups_per_unit`: must be 1 to {MAX_GROUPS_PER_UNIT}"
                )));
            }
            _ => {}
        }
        for (name, column) in &policy.columns {
            if !is_identifier(name) {
                return Err(bad(format!("column {name:?}: not a lower-case identifier")));
            }
            if let Some([lo, hi]) = column.bounds {
                if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                    return Err(bad(format!(
                        "field `columns.{name}.bounds`: need finite lower <= upper"
                    )));
                }
            }
            if let Some(keys) = &column.public_keys {
                if keys.is_empty() || keys.len() > 100_000 {
                    return Err(bad(format!(
                        "field `columns.{name}.public_keys`: need 1 to 100000 keys"
                    )));
                }
                let wants_text = column.ty == ColumnType::String;
                if keys
                    .iter()
                    .any(|k| matches!(k, KeyValue::Text(_)) != wants_text)
                {
                    return Err(bad(format!(
                        "field `columns.{name}.public_keys`: keys must match the column type"
                    )));
                }
            }
        }
        Ok(policy)
    }

    pub fn data_path(&self, data_dir: &Path) -> PathBuf {
        if self.path.is_absolute() {
            self.path.clone()
        } else {
            data_dir.join(&self.path)
        }
    }
}

/// A catalogue entry as every role may see it: metadata, schema, public bounds and keys,
/// and budget figures. Never rows.
#[derive(Debug, Clone, Serialize)]
pub struct Dataset {
    #[serde(flatten)]
    pub policy: DatasetPolicy,
    pub epsilon_reserved: f64,
    pub epsilon_spent: f64,
    pub epsilon_unreserved: f64,
}

/// Reads the Parquet footer and checks every declared column exists with the declared type.
fn check_against_file(
    policy: &DatasetPolicy,
    data_dir: &Path,
    file: &str,
) -> Result<(), CatalogError> {
    use arrow::datatypes::DataType;
    let bad = |problem: String| CatalogError::BadPolicy {
        file: file.to_string(),
        problem,
    };
    let path = policy.data_path(data_dir);
    let reader = std::fs::File::open(&path)
        .map_err(|e| bad(format!("field `path`: cannot open {}: {e}", path.display())))?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(reader)
        .map_err(|e| {
            bad(format!(
                "field `path`: {} is not a Parquet file: {e}",
                path.display()
            ))
        })?;
    // The gate's fixed-point sums are proven not to overflow for at most 2^32 rows.
    let rows = builder.metadata().file_metadata().num_rows();
    if rows > 1i64 << 32 {
        return Err(bad(format!(
            "field `path`: {} has {rows} rows; at most 2^32 are supported",
            path.display()
        )));
    }
    let schema = builder.schema();
    for (name, column) in &policy.columns {
        let field = schema
            .field_with_name(name)
            .map_err(|_| bad(format!("column {name:?} is not in {}", path.display())))?;
        let ok = matches!(
            (column.ty, field.data_type()),
            (ColumnType::Int32, DataType::Int32)
                | (ColumnType::Int64, DataType::Int64)
                | (ColumnType::Float64, DataType::Float64)
                | (
                    ColumnType::String,
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                )
        );
        if !ok {
            return Err(bad(format!(
                "field `columns.{name}.type`: declared {:?} but the file has {}",
                column.ty,
                field.data_type()
            )));
        }
    }
    Ok(())
}

/// Checks a policy against its data file and stores (or replaces) it in the catalogue.
pub fn register(
    store: &Store,
    data_dir: &Path,
    file: &str,
    policy: &DatasetPolicy,
) -> Result<(), CatalogError> {
    check_against_file(policy, data_dir, file)?;
    let policy_json =
        serde_json::to_string(policy).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.conn().execute_cached(
        "INSERT INTO datasets (id, policy, schema, updated_at) VALUES (?1, ?2, '', ?3)
         ON CONFLICT (id) DO UPDATE SET policy = excluded.policy, updated_at = excluded.updated_at",
        params![policy.id, policy_json, crate::now_rfc3339()],
    )?;
    Ok(())
}

/// Loads every `*.toml` in `dir` except `limits.toml` as a dataset policy. Stops at the first
/// bad file with a message naming it.
pub fn load_policies_dir(
    store: &Store,
    data_dir: &Path,
    dir: &Path,
) -> Result<usize, CatalogError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| CatalogError::BadPolicy {
            file: dir.display().to_string(),
            problem: format!("cannot read the policies directory: {e}"),
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && !p.ends_with("limits.toml"))
        .collect();
    files.sort();
    for path in &files {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| CatalogError::BadPolicy {
            file: file.clone(),
            problem: e.to_string(),
        })?;
        let policy = DatasetPolicy::parse(&file, &text)?;
        match self::policy(store, &policy.id)? {
            None => {
                register(store, data_dir, &file, &policy)?;
                crate::audit::append_logged(
                    store,
                    crate::audit::NewRecord::system("dataset_seeded", &policy.id, "ok")
                        .with("file", file.clone()),
                );
            }
            Some(stored) if stored == policy => {}
            Some(_) => tracing::warn!(
                "{file}: dataset {:?} is already in the catalogue with a different policy; the \
                 catalogue keeps its entry (change it with PATCH /v1/datasets/{})",
                policy.id,
                policy.id
            ),
        }
    }
    Ok(files.len())
}

/// Registers a new dataset from the API. Its file must lie inside the data directory.
pub fn create(store: &Store, data_dir: &Path, policy: &DatasetPolicy) -> Result<(), CatalogError> {
    policy.clone().check("request")?;
    check_relative("path", &policy.path)?;
    if self::policy(store, &policy.id)?.is_some() {
        return Err(CatalogError::Exists(policy.id.clone()));
    }
    // One scenario may name several datasets: their SQL table names must not collide.
    let taken: Option<String> = store
        .conn()
        .query_row_cached(
            "SELECT id FROM datasets WHERE json_extract(policy, '$.table') = ?1",
            params![policy.table],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(other) = taken {
        return Err(CatalogError::Invalid(format!(
            "field `table`: {:?} is already the table of dataset {other:?}",
            policy.table
        )));
    }
    register(store, data_dir, "request", policy)
}

/// Paths given over the API are relative and stay inside the data directory.
fn check_relative(field: &str, path: &Path) -> Result<(), CatalogError> {
    use std::path::Component;
    if path.as_os_str().is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(CatalogError::Invalid(format!(
            "field `{field}`: give a path relative to the data directory, without `..`"
        )));
    }
    Ok(())
}

/// What an operator may change in a catalogue entry. The privacy-relevant policy — table,
/// privacy unit, columns, bounds, keys, budgets — is fixed once registered: scenarios were
/// approved against it and the ledger's grants name it. A new policy is a new dataset.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetPatch {
    pub title: Option<String>,
    pub description: Option<String>,
    pub source: Option<String>,
    pub update_frequency: Option<String>,
    pub version_date: Option<String>,
    pub acquisition_date: Option<String>,
    /// A new version of the data (relative to the data directory), checked against the schema.
    pub path: Option<PathBuf>,
    /// Changing it needs a `reason`.
    pub open_attribute: Option<OpenAttribute>,
    /// Why; required when the open attribute changes, recorded in the audit log.
    pub reason: Option<String>,
}

/// Applies a patch; answers the entry before and after.
pub fn update(
    store: &Store,
    data_dir: &Path,
    id: &str,
    patch: &DatasetPatch,
) -> Result<(DatasetPolicy, DatasetPolicy), CatalogError> {
    let before = policy(store, id)?.ok_or(CatalogError::NotFound)?;
    let mut after = before.clone();
    for (field, value, target) in [
        ("title", &patch.title, &mut after.title),
        ("description", &patch.description, &mut after.description),
        ("source", &patch.source, &mut after.source),
        ("version_date", &patch.version_date, &mut after.version_date),
    ] {
        if let Some(v) = value {
            if v.trim().is_empty() && field != "description" || v.len() > 4000 {
                return Err(CatalogError::Invalid(format!(
                    "field `{field}`: 1 to 4000 characters"
                )));
            }
            *target = v.clone();
        }
    }
    if let Some(f) = &patch.update_frequency {
        after.update_frequency = Some(f.clone());
    }
    if let Some(d) = &patch.acquisition_date {
        after.acquisition_date = Some(d.clone());
    }
    if let Some(path) = &patch.path {
        check_relative("path", path)?;
        after.path = path.clone();
    }
    let reason = patch.reason.as_deref().map(str::trim).unwrap_or_default();
    if let Some(attr) = patch.open_attribute {
        if attr != before.open_attribute && (reason.is_empty() || reason.len() > 4000) {
            return Err(CatalogError::Invalid(
                "changing the open attribute needs a `reason` of 1 to 4000 characters".into(),
            ));
        }
        after.open_attribute = attr;
    }
    if after == before {
        return Ok((before, after));
    }
    check_against_file(&after, data_dir, "request")?;
    let text = serde_json::to_string(&after).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.conn().execute_cached(
        "UPDATE datasets SET policy = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, text, crate::now_rfc3339()],
    )?;
    Ok((before, after))
}

/// A dataset's policy, read inside a caller's transaction.
pub(crate) fn policy_in(
    conn: &rusqlite::Connection,
    id: &str,
) -> Result<DatasetPolicy, StoreError> {
    let text: String = conn.query_row_cached(
        "SELECT policy FROM datasets WHERE id = ?1",
        params![id],
        |r| r.get(0),
    )?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub fn policy(store: &Store, id: &str) -> Result<Option<DatasetPolicy>, StoreError> {
    let text: Option<String> = store
        .read()
        .query_row_cached(
            "SELECT policy FROM datasets WHERE id = ?1",
            params![id],
            |r| r.get(0),
        )
        .optional()?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(e.to_string())))
        .transpose()
}

fn with_budget(store: &Store, policy: DatasetPolicy) -> Result<Dataset, StoreError> {
    let conn = store.conn();
    let spent: f64 = conn.query_row_cached(
        "SELECT COALESCE(SUM(charged), 0) FROM ledger WHERE dataset_id = ?1",
        params![policy.id],
        |r| r.get(0),
    )?;
    drop(conn);
    let reserved = crate::scenario::reserved_for_dataset(store, &policy.id)?;
    Ok(Dataset {
        epsilon_unreserved: (policy.total_epsilon - reserved).max(0.0),
        epsilon_reserved: reserved,
        epsilon_spent: spent,
        policy,
    })
}

pub fn get(store: &Store, id: &str) -> Result<Option<Dataset>, StoreError> {
    policy(store, id)?
        .map(|p| with_budget(store, p))
        .transpose()
}

pub fn list(store: &Store) -> Result<Vec<Dataset>, StoreError> {
    let texts: Vec<String> = {
        let conn = store.conn();
        let mut stmt = conn.prepare("SELECT policy FROM datasets ORDER BY id")?;
        stmt.query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?
    };
    texts
        .into_iter()
        .map(|t| {
            let p: DatasetPolicy =
                serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            with_budget(store, p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = "t"
title = "T"
source = "S"
open_attribute = "conditional"
version_date = "2026-11-01"
path = "t.parquet"
table = "t"
privacy_unit = "row"
total_epsilon = 1.0
min_group_size = 5
[columns.k]
type = "string"
public_keys = ["a", "b"]
"#;

    #[test]
    fn a_good_policy_parses() {
        let p = DatasetPolicy::parse("good.toml", GOOD).unwrap();
        assert_eq!(p.columns["k"].public_keys.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn a_person_unit_with_its_row_bound_parses() {
        let text = GOOD.replace(
            "privacy_unit = \"row\"",
            "privacy_unit = \"k\"\nmax_rows_per_unit = 10",
        );
        let p = DatasetPolicy::parse("good.toml", &text).unwrap();
        assert_eq!(
            (p.privacy_unit.as_str(), p.max_rows_per_unit),
            ("k", Some(10))
        );
    }

    #[test]
    fn bad_policies_name_file_and_field() {
        let cases = [
            (
                GOOD.replace("total_epsilon = 1.0", "total_epsilon = -1.0"),
                "total_epsilon",
            ),
            (
                GOOD.replace("public_keys = [\"a\", \"b\"]", "public_keys = [1, 2]"),
                "columns.k.public_keys",
            ),
            (
                GOOD.replace("min_group_size = 5", "min_group_size = 5\nshoe_size = 3"),
                "shoe_size",
            ),
            (
                GOOD.replace("privacy_unit = \"row\"", "privacy_unit = \"person\""),
                "privacy_unit",
            ),
            // A person unit needs its row bound, within range; a row unit takes none.
            (
                GOOD.replace("privacy_unit = \"row\"", "privacy_unit = \"k\""),
                "max_rows_per_unit",
            ),
            (
                GOOD.replace(
                    "privacy_unit = \"row\"",
                    "privacy_unit = \"k\"\nmax_rows_per_unit = 0",
                ),
                "max_rows_per_unit",
            ),
            (
                GOOD.replace(
                    "privacy_unit = \"row\"",
                    "privacy_unit = \"row\"\nmax_rows_per_unit = 3",
                ),
                "max_rows_per_unit",
            ),
        ];
        for (text, field) in cases {
            let err = DatasetPolicy::parse("bad.toml", &text)
                .unwrap_err()
                .to_string();
            assert!(err.contains("bad.toml") && err.contains(field), "{err}");
        }
    }
}
