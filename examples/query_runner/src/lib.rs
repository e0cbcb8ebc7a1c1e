//! Example module: an ad-hoc query runner. `params` is
//! `{"queries": [{"sql": "...", "epsilon": 0.5, "bounds": {"fare": [0, 100]}}, ...]}`; the
//! output lists, per query, either its release or the gate's refusal (code and message).
//! Useful for exploring what the gate accepts; every answer is a DP release or a refusal.

use serde_json::{Value as Json, json};
use unseen_guest::{QueryRequest, entry, query};

/// Each query is the contract's request as JSON (`sql`, `epsilon` — 0.5 if absent — and any
/// of `bounds`, `max_rows_per_unit`, `delta`); unknown fields are refused by name.
fn to_request(spec: &Json) -> Result<QueryRequest, String> {
    let mut spec = spec.clone();
    if let Some(fields) = spec.as_object_mut() {
        fields.entry("epsilon").or_insert(json!(0.5));
    }
    serde_json::from_value(spec).map_err(|e| format!("a query is not a valid request: {e}"))
}

fn run(params: Json) -> Result<Json, String> {
    let queries = params
        .get("queries")
        .and_then(Json::as_array)
        .ok_or("params need \"queries\": [...]")?;
    let answers = queries
        .iter()
        .map(|spec| {
            Ok(match query(&to_request(spec)?) {
                Ok(release) => json!({ "release": release }),
                Err(e) => json!({ "error": { "code": e.code, "message": e.message } }),
            })
        })
        .collect::<Result<Vec<Json>, String>>()?;
    Ok(json!({ "answers": answers }))
}

entry!(main => run);
