//! Example module for Q5 of the shared workloads: the mean of `fare / distance_km`, clamped to
//! [0, 20], per (district, hour), where the ratio is computed by this module's own UDF inside
//! the query. The UDF sees rows; its results reach the world only through the DP mean.

use serde_json::{Value as Json, json};
use unseen_guest::{Query, entry, udf};

udf! {
    default = 0.0;
    /// Fare per kilometre; 0 where the distance is not positive.
    pub fn fare_per_km(fare: f64, distance_km: f64) -> f64 {
        if distance_km > 0.0 { fare / distance_km } else { 0.0 }
    }
}

/// Q5: the UDF's mean per (district, hour), clamped to [0, 20] by the gate.
pub fn q5(epsilon: f64) -> Query {
    Query::sql(
        "SELECT district, hour, AVG(fare_per_km(fare, distance_km)) AS fare_per_km \
         FROM trips GROUP BY district, hour",
    )
    .epsilon(epsilon)
    .bound("fare_per_km", 0.0, 20.0)
}

fn main_entry(params: Json) -> Result<Json, String> {
    let epsilon = params["epsilon"].as_f64().unwrap_or(1.0);
    let release = q5(epsilon).run().map_err(|e| e.to_string())?;
    let (Some(d), Some(h), Some(v)) = (
        release.column("district"),
        release.column("hour"),
        release.column("fare_per_km"),
    ) else {
        return Err("unexpected columns".into());
    };
    // Post-processing of the release: the five dearest (district, hour) cells per km.
    let mut cells: Vec<(String, i64, f64)> = release
        .rows
        .iter()
        .filter_map(|r| {
            Some((
                r[d].as_str()?.to_string(),
                r[h].as_f64()? as i64,
                r[v].as_f64()?,
            ))
        })
        .collect();
    cells.sort_by(|a, b| b.2.total_cmp(&a.2));
    Ok(json!({
        "cells": release.rows.len(),
        "epsilon": release.epsilon,
        "dearest": cells.iter().take(5).map(|(d, h, v)| json!({"district": d, "hour": h, "fare_per_km": v})).collect::<Vec<_>>(),
        "release": release,
    }))
}
entry!(main => main_entry);
// Ad-hoc queries that may call the UDF (`{"queries": [...]}`, see `unseen_guest::run_queries`).
entry!(queries => unseen_guest::run_queries);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_udf_divides_and_guards_zero_distances() {
        assert_eq!(fare_per_km(30.0, 6.0), 5.0);
        assert_eq!(fare_per_km(30.0, 0.0), 0.0);
        assert!(fare_per_km::signature().row_abi);
    }
}
