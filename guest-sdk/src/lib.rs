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
pub mod frame;
pub mod udf;

pub use contract::{ColumnKind, QueryError, QueryRequest, Release, ReleasedColumn, Value};
pub use serde_json::Value as Json;

#[cfg(target_arch = "wasm32")]
mod guest;
#[cfg(target_arch = "wasm32")]
pub use guest::{__frame_call, __leak_json, __run_entry, query};

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

    /// The budget under zero-concentrated DP instead of ε (Gaussian noise), split evenly
    /// across the measurements it needs; needs [`Query::delta`] to convert it to the (ε, δ)
    /// the ledger debits.
    pub fn rho(mut self, rho: f64) -> Self {
        self.request.rho = Some(rho);
        self.request.epsilon = 0.0;
        self
    }

    /// The ε this query may spend, split evenly across the measurements it needs.
    pub fn epsilon(mut self, epsilon: f64) -> Self {
        self.request.epsilon = epsilon;
        self.request.rho = None;
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

    /// For person-level datasets whose groups are chosen from the data: use each person's
    /// rows in at most `groups` groups (picked at random), for a lower threshold.
    pub fn max_groups_per_unit(mut self, groups: u64) -> Self {
        self.request.max_groups_per_unit = Some(groups);
        self
    }

    /// δ for choosing group keys that are not public (DP partition selection), and for
    /// converting a ρ budget to (ε, δ).
    pub fn delta(mut self, delta: f64) -> Self {
        self.request.delta = Some(delta);
        self
    }

    /// Runs the module's block function `function` (see [`block!`]) by sample-and-aggregate
    /// over the rows this query's SQL selects (`SELECT <columns> FROM <table> [WHERE …]`): the
    /// privacy units are split into `blocks` disjoint blocks, the function runs on each in a
    /// fresh instance, and each output is clamped to its bounds and released as a DP mean.
    /// Add outputs with [`Query::output`].
    pub fn sample_aggregate(mut self, function: impl Into<String>, blocks: u32) -> Self {
        self.request.sample_aggregate = Some(contract::SampleAggregate {
            function: function.into(),
            blocks,
            outputs: Vec::new(),
        });
        self
    }

    /// One output of the block function (in order), clamped to `[lower, upper]`.
    pub fn output(mut self, name: impl Into<String>, lower: f64, upper: f64) -> Self {
        if let Some(sa) = &mut self.request.sample_aggregate {
            sa.outputs.push(contract::BlockOutput {
                name: name.into(),
                lower,
                upper,
                default: None,
            });
        }
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

/// An entry body that runs the queries its params name: `{"queries": [request, …]}`, each the
/// contract's [`QueryRequest`] as JSON (`epsilon` 0.5 if neither it nor `rho` is given; unknown fields refused by
/// name). Answers `{"answers": [{"release": …} | {"error": {"code", "message"}}, …]}`.
///
/// ```
/// let out = unseen_guest::run_queries(serde_json::json!({"queries": [{"sql": "SELECT 1"}]}));
/// // Natively there is no host: the answer is the refusal.
/// assert_eq!(out.unwrap()["answers"][0]["error"]["code"], "no_host");
/// ```
pub fn run_queries(params: Json) -> Result<Json, String> {
    let queries = params
        .get("queries")
        .and_then(Json::as_array)
        .ok_or("params need \"queries\": [...]")?;
    let answers = queries
        .iter()
        .map(|spec| {
            let mut spec = spec.clone();
            if let Some(fields) = spec.as_object_mut()
                && !fields.contains_key("rho")
            {
                fields.entry("epsilon").or_insert(serde_json::json!(0.5));
            }
            let request: QueryRequest = serde_json::from_value(spec)
                .map_err(|e| format!("a query is not a valid request: {e}"))?;
            Ok(match query(&request) {
                Ok(release) => serde_json::json!({ "release": release }),
                Err(e) => serde_json::json!({ "error": { "code": e.code, "message": e.message } }),
            })
        })
        .collect::<Result<Vec<Json>, String>>()?;
    Ok(serde_json::json!({ "answers": answers }))
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
