//! Example module: an ad-hoc query runner. `params` is
//! `{"queries": [{"sql": "...", "epsilon": 0.5, "bounds": {"fare": [0, 100]}}, ...]}`; the
//! output lists, per query, either its release or the gate's refusal (code and message).
//! Useful for exploring what the gate accepts; every answer is a DP release or a refusal.

use serde_json::{Value as Json, json};
use unseen_guest::{Query, entry};

fn to_query(spec: &Json) -> Result<Query, String> {
    let sql = spec
        .get("sql")
        .and_then(Json::as_str)
        .ok_or("each query needs \"sql\"")?;
    let epsilon = spec.get("epsilon").and_then(Json::as_f64).unwrap_or(0.5);
    let mut query = Query::sql(sql).epsilon(epsilon);
    if let Some(bounds) = spec.get("bounds").and_then(Json::as_object) {
        for (column, pair) in bounds {
            let lo = pair
                .get(0)
                .and_then(Json::as_f64)
                .ok_or("bounds are [lower, upper]")?;
            let hi = pair
                .get(1)
                .and_then(Json::as_f64)
                .ok_or("bounds are [lower, upper]")?;
            query = query.bound(column.clone(), lo, hi);
        }
    }
    Ok(query)
}

fn run(params: Json) -> Result<Json, String> {
    let queries = params
        .get("queries")
        .and_then(Json::as_array)
        .ok_or("params need \"queries\": [...]")?;
    let answers = queries
        .iter()
        .map(|spec| {
            Ok(match to_query(spec)?.run() {
                Ok(release) => json!({ "release": release }),
                Err(e) => json!({ "error": { "code": e.code, "message": e.message } }),
            })
        })
        .collect::<Result<Vec<Json>, String>>()?;
    Ok(json!({ "answers": answers }))
}

entry!(main => run);
