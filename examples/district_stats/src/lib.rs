//! Example module: trips and fares per district (WORKLOADS.md Q1), then post-processing of the
//! released table into a report — shares of trips and mean fare per district. Post-processing
//! DP releases costs no further privacy.

use serde_json::{Value as Json, json};
use unseen_guest::{Query, Release, entry};

/// Q1: per district, count of trips and sum of fare clamped to [0, 100]; ε split evenly.
pub fn q1(epsilon: f64) -> Query {
    Query::sql(
        "SELECT district, COUNT(*) AS trips, SUM(fare) AS fare_sum \
         FROM trips GROUP BY district ORDER BY district",
    )
    .epsilon(epsilon)
    .bound("fare", 0.0, 100.0)
}

/// Turns the released Q1 table into per-district shares and mean fares.
pub fn summarise(release: &Release) -> Json {
    let (Some(k), Some(n), Some(s)) = (
        release.column("district"),
        release.column("trips"),
        release.column("fare_sum"),
    ) else {
        return json!({ "error": "unexpected columns" });
    };
    let total: f64 = release
        .rows
        .iter()
        .filter_map(|r| r[n].as_f64())
        .map(|v| v.max(0.0))
        .sum();
    let districts: Vec<Json> = release
        .rows
        .iter()
        .map(|row| {
            let trips = row[n].as_f64();
            let fare_sum = row[s].as_f64();
            let mean_fare = match (trips, fare_sum) {
                (Some(t), Some(f)) if t >= 1.0 => Some(f / t),
                _ => None,
            };
            json!({
                "district": row[k].as_str(),
                "trips": trips,
                "share": trips.map(|t| if total > 0.0 { t.max(0.0) / total } else { 0.0 }),
                "mean_fare": mean_fare,
            })
        })
        .collect();
    json!({ "total_trips": total, "districts": districts })
}

fn main_entry(params: Json) -> Result<Json, String> {
    let epsilon = params.get("epsilon").and_then(Json::as_f64).unwrap_or(1.0);
    let release = q1(epsilon).run().map_err(|e| e.to_string())?;
    Ok(json!({ "q1": summarise(&release), "epsilon": release.epsilon }))
}

entry!(main => main_entry);
