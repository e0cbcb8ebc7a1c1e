//! `unseen-guest`: write analysis modules for unseen.
//!
//! A module is a `wasm32-unknown-unknown` `cdylib`. It never sees raw rows: it asks the host
//! for differentially private queries and post-processes the released tables into a report.
//!
//! - [`contract`] is the one definition of the host↔guest ABI; the server compiles against it
//!   too, so the two sides cannot drift apart.
//! - [`query`] / [`Query`] run a DP query (wasm32 only).
//! - [`entry!`] exports a function as an entry point a job can name.
//!
//! ```
//! use unseen_guest::{entry, Query, Json};
//!
//! fn main_entry(params: Json) -> Result<Json, String> {
//!     let eps = params["epsilon"].as_f64().unwrap_or(1.0);
//!     let release = Query::sql("SELECT district, COUNT(*) AS n FROM trips GROUP BY district")
//!         .epsilon(eps)
//!         .run()
//!         .map_err(|e| e.message)?;
//!     Ok(serde_json::json!({ "rows": release.rows.len() }))
//! }
//! entry!(main => main_entry);
//!
//! // Built natively (as here) there is no host to ask: queries answer `no_host`.
//! assert!(main_entry(serde_json::json!({})).unwrap_err().contains("only inside unseen"));
//! ```

pub mod contract;

pub use contract::{ColumnKind, QueryError, QueryRequest, Release, ReleasedColumn, Value};
pub use serde_json::Value as Json;

#[cfg(target_arch = "wasm32")]
mod guest;
#[cfg(target_arch = "wasm32")]
pub use guest::{__run_entry, query};

/// Outside wasm there is no host to ask: every query answers `no_host`.
#[cfg(not(target_arch = "wasm32"))]
pub fn query(_request: &QueryRequest) -> Result<Release, QueryError> {
    Err(QueryError {
        code: "no_host".into(),
        message: "queries run only inside unseen; this build is not a wasm module".into(),
    })
}

/// A DP query under construction: SQL, the privacy budget to spend on it, and clamping bounds.
#[derive(Debug, Clone)]
pub struct Query {
    request: QueryRequest,
}

impl Query {
    /// Starts a query. Its top must be an aggregate (`COUNT`, `SUM`, `AVG`) grouped by public keys.
    pub fn sql(sql: impl Into<String>) -> Self {
        Query {
            request: QueryRequest {
                sql: sql.into(),
                epsilon: 0.0,
                ..Default::default()
            },
        }
    }

    /// The ε this query may spend, split evenly across the measurements it needs.
    pub fn epsilon(mut self, epsilon: f64) -> Self {
        self.request.epsilon = epsilon;
        self
    }

    /// Clamps `column` to `[lower, upper]` before summing or averaging it (overrides the
    /// catalogue's public bounds for this query).
    pub fn bound(mut self, column: impl Into<String>, lower: f64, upper: f64) -> Self {
        self.request.bounds.insert(column.into(), [lower, upper]);
        self
    }

    /// For person-level datasets: use at most `rows` rows of each person (picked at random),
    /// tighter than the catalogue's bound, for less noise.
    pub fn max_rows_per_unit(mut self, rows: u64) -> Self {
        self.request.max_rows_per_unit = Some(rows);
        self
    }

    /// δ for choosing group keys that are not public (DP partition selection).
    pub fn delta(mut self, delta: f64) -> Self {
        self.request.delta = Some(delta);
        self
    }

    /// The request this builder describes.
    pub fn request(&self) -> &QueryRequest {
        &self.request
    }

    /// Runs the query through the host's gate.
    pub fn run(&self) -> Result<Release, QueryError> {
        query(&self.request)
    }

    /// Asks the gate what the query would cost and how noisy each column would be, without
    /// reading data or spending budget: a [`Release`] with `dry_run` set and no rows.
    pub fn estimate(&self) -> Result<Release, QueryError> {
        query(&QueryRequest {
            dry_run: true,
            ..self.request.clone()
        })
    }
}

/// Exports `function` (a `fn(Json) -> Result<Json, String>`) as the entry point `name`.
///
/// The job's `params` arrive as the argument; the returned JSON becomes the report's
/// `output`. An `Err` fails the job with code `guest_error` and the message.
#[macro_export]
macro_rules! entry {
    ($name:ident => $function:path) => {
        const _: () = {
            #[cfg(target_arch = "wasm32")]
            #[unsafe(export_name = concat!("unseen_entry_", stringify!($name)))]
            extern "C" fn __unseen_entry(params_ptr: i32, params_len: i32) -> i32 {
                $crate::__run_entry(params_ptr, params_len, $function)
            }
        };
    };
}
