//! The host↔guest contract: import and export names, their signatures, and the JSON messages
//! that cross the boundary. The host validates uploaded modules against these constants, and
//! the guest side of this crate calls them, so both compile against one definition.
//!
//! Memory protocol: the host writes inputs into buffers the guest hands out from
//! [`EXPORT_ALLOC`]; the guest passes `(ptr, len)` pairs into its own memory to the host.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The only module name a guest may import from.
pub const HOST_MODULE: &str = "unseen";

/// `query(req_ptr: i32, req_len: i32) -> i32`: runs the [`QueryRequest`] JSON at
/// `req_ptr..req_ptr+req_len` through the gate and stages a [`QueryResponse`]; returns its
/// length in bytes.
pub const IMPORT_QUERY: &str = "query";
/// `take_response(dst_ptr: i32, dst_len: i32) -> i32`: copies the staged response into guest
/// memory; returns the number of bytes written, or a negative value if nothing is staged or
/// `dst_len` is too small.
pub const IMPORT_TAKE_RESPONSE: &str = "take_response";
/// `set_output(ptr: i32, len: i32) -> i32`: sets the job's output (JSON; on a failed entry,
/// the error message). Returns 0, or a negative value if it is too large.
pub const IMPORT_SET_OUTPUT: &str = "set_output";

/// Every host import with its `(params, results)` as wasm value types (all `i32`).
pub const IMPORTS: [(&str, usize, usize); 3] = [
    (IMPORT_QUERY, 2, 1),
    (IMPORT_TAKE_RESPONSE, 2, 1),
    (IMPORT_SET_OUTPUT, 2, 1),
];

/// The guest's linear memory.
pub const EXPORT_MEMORY: &str = "memory";
/// `unseen_alloc(len: i32) -> i32`: a buffer of `len` bytes the host may fill; ownership
/// passes back to the guest with the call that names it.
pub const EXPORT_ALLOC: &str = "unseen_alloc";
/// Entry points are exported as `unseen_entry_<name>(params_ptr: i32, params_len: i32) -> i32`
/// and return 0 on success.
pub const ENTRY_PREFIX: &str = "unseen_entry_";

/// Scalar UDFs are exported as `unseen_udf_<name>(frame_ptr: i32, frame_len: i32) -> i32`: the
/// host writes a [`crate::frame`] of the argument columns into a buffer from [`EXPORT_ALLOC`]
/// and the guest answers the address of a frame it owns (`u32` length, then the frame) holding
/// one column of results, one per row; a negative value means the call failed.
pub const UDF_PREFIX: &str = "unseen_udf_";
/// `unseen_sig_<name>() -> i64`: where the UDF's [`UdfSignature`] JSON lies in the guest's
/// memory (`ptr << 32 | len`). Read once, at upload, in a fresh instance.
pub const SIGNATURE_PREFIX: &str = "unseen_sig_";
/// `unseen_row_<name>(args…) -> ret`: the same UDF for one row, over plain wasm numbers (`f64`,
/// `i64`, `i32` for booleans). Exported by the SDK for every UDF; the host uses it only when
/// the signature says `row_abi` and the function provably writes no state (see the host's
/// sandbox), so that one instance may serve every row as if each had a fresh one.
pub const ROW_PREFIX: &str = "unseen_row_";
/// Sample-and-aggregate functions: `unseen_block_<name>(frame_ptr: i32, frame_len: i32) -> i32`
/// over a frame of one block's rows, answering the address of a frame (`u32` length, then the
/// frame) with one `Float64` column of the block's outputs.
pub const BLOCK_PREFIX: &str = "unseen_block_";

/// Types a UDF may take and return (SQL `DOUBLE`, `BIGINT`, `BOOLEAN`, `VARCHAR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UdfType {
    Float64,
    Int64,
    Boolean,
    Utf8,
}

/// What a guest declares about one of its UDFs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdfSignature {
    pub args: Vec<UdfType>,
    pub returns: UdfType,
    /// The function takes `Option`s and sees nulls; otherwise a null argument gives a null
    /// result without calling it.
    pub takes_nulls: bool,
    /// The result for a row on which the function traps, runs out of fuel or memory, or
    /// answers malformed output (`Null` for SQL NULL). Declared, so a failure tells nothing.
    pub default: Value,
    /// A [`ROW_PREFIX`] export over plain wasm numbers exists for this function.
    pub row_abi: bool,
}

/// Sample-and-aggregate: run the module's block function over disjoint blocks of privacy
/// units and release the DP mean of its clamped outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleAggregate {
    /// The block function, exported as `unseen_block_<function>`.
    pub function: String,
    /// How many blocks the units are split into (more: less noise, smaller blocks).
    pub blocks: u32,
    /// One per value the function returns, in order.
    pub outputs: Vec<BlockOutput>,
}

/// One value of a block function's output, clamped to `[lower, upper]` before averaging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockOutput {
    pub name: String,
    pub lower: f64,
    pub upper: f64,
    /// Used for a block whose function traps, runs out of fuel or memory, or answers the wrong
    /// number of values; default: the midpoint of the bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<f64>,
}

/// A DP query a guest asks the host to run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// SQL whose top is an aggregate grouped by public keys.
    pub sql: String,
    /// Privacy budget for this query under pure ε-DP (Laplace noise). Give this or `rho`.
    #[serde(default)]
    pub epsilon: f64,
    /// Privacy budget under zero-concentrated DP instead (ρ-zCDP, Gaussian noise), which
    /// needs `delta`: the ledger records the (ε, δ) that ρ converts to at that δ. Better than
    /// ε for releases of many measures or for many queries' worth of small noise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rho: Option<f64>,
    /// Clamping bounds per column, `[lower, upper]`, overriding the catalogue's.
    #[serde(default)]
    pub bounds: BTreeMap<String, [f64; 2]>,
    /// For datasets whose privacy unit is a person: keep at most this many rows per person
    /// (chosen at random), tighter than the catalogue's and the scenario's bound. Smaller
    /// means less noise but more rows dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows_per_unit: Option<u64>,
    /// For datasets whose privacy unit is a person, when the groups are chosen from the data
    /// (partition selection): use each person's rows in at most this many groups (chosen at
    /// random), tighter than the catalogue's and the scenario's bound. Smaller means a lower
    /// threshold (more groups released) but more rows dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_groups_per_unit: Option<u64>,
    /// δ for mechanisms that need one (choosing group keys that are not public; converting
    /// `rho` to (ε, δ)). Default: none, and such queries are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// Only price the query: the answer is a [`Release`] with `dry_run` set, no rows, and the
    /// ε, δ and per-column noise a real run would have, read from no data and spending nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Run the module's block function by sample-and-aggregate over the rows `sql` selects
    /// (`SELECT <columns> FROM <table> [WHERE …]`, no aggregate) instead of a SQL aggregate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_aggregate: Option<SampleAggregate>,
}

/// What the host answers to a [`QueryRequest`].
pub type QueryResponse = Result<Release, QueryError>;

/// A refused or failed query. Messages are written by the gate and never carry data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryError {
    /// Stable, snake_case.
    pub code: String,
    /// A sentence for the analyst.
    pub message: String,
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// A table that passed the gate: differentially private, safe to post-process and show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub columns: Vec<ReleasedColumn>,
    pub rows: Vec<Vec<Value>>,
    /// ε this release spent (sum of its measurements' privacy losses from OpenDP's maps).
    pub epsilon: f64,
    /// The ledger entry that recorded the debit.
    pub ledger_entry: u64,
    /// Groups whose noisy count fell below the minimum group size; their measures are null.
    pub suppressed_groups: u64,
    /// δ this release spent (non-zero only when its group keys were chosen from the data, or
    /// under zCDP).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delta: f64,
    /// Under zCDP: the ρ this release spent; `epsilon` and `delta` are what it converts to
    /// (by OpenDP), and what the ledger debits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rho: Option<f64>,
    /// An estimate from a dry run: no rows, nothing spent (`ledger_entry` is 0), and `epsilon`,
    /// `delta` and the columns' noise are what the real query would have.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The same query with the same options was answered before in this scenario: this is
    /// that release again (same values, same `ledger_entry`), and nothing was spent now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl Release {
    /// Index of the column called `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// One released column and, for measures, the noise it carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleasedColumn {
    pub name: String,
    pub kind: ColumnKind,
    /// Laplace scale of the noise added, in the column's units (measures only).
    pub noise_scale: Option<f64>,
    /// Half-width of a 95 % interval around the true value (counts and sums; for means, the
    /// interval of the noisy numerator over the true count, an approximation).
    pub ci95_half_width: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnKind {
    /// A public group key, released as it is.
    Key,
    Count,
    Sum,
    Mean,
    /// `VAR_POP`/`VAR_SAMP`/`VARIANCE` of a clamped column: the population variance.
    Variance,
    /// `STDDEV_POP`/`STDDEV_SAMP`/`STDDEV` of a clamped column: the population deviation.
    StdDev,
    /// `MEDIAN` / `PERCENTILE_CONT(x, q)` of a clamped column: one of 1,024 values evenly
    /// spaced over its bounds.
    Quantile,
    /// The DP mean over blocks of a guest function's clamped output (sample-and-aggregate).
    BlockMean,
}

/// A cell of a released table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_as_plain_json() {
        let row = vec![
            Value::Text("D01".into()),
            Value::Int(12),
            Value::Float(3.5),
            Value::Null,
        ];
        let json = serde_json::to_string(&row).unwrap();
        assert_eq!(json, r#"["D01",12,3.5,null]"#);
        let back: Vec<Value> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, row);
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let err = serde_json::from_str::<QueryRequest>(r#"{"sql":"x","epsilon":1,"sigma":0}"#);
        assert!(err.is_err());
        // A ρ budget needs no ε.
        let zcdp: QueryRequest =
            serde_json::from_str(r#"{"sql":"x","rho":0.5,"delta":1e-6}"#).unwrap();
        assert_eq!((zcdp.epsilon, zcdp.rho), (0.0, Some(0.5)));
    }
}
