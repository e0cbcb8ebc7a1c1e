//! Example module for Q6 of the shared workloads: the median fare, and a least-squares line of
//! fare on distance, computed by code the gate does not trust — by sample-and-aggregate. The
//! host splits the people into disjoint blocks, runs a block function on each in a fresh
//! instance, clamps its outputs to the declared bounds and releases their DP mean.

use serde_json::{Value as Json, json};
use unseen_guest::udf::Rows;
use unseen_guest::{Query, block, entry};

block! {
    /// The median of the block's first column (its lower middle value); nothing for an empty
    /// block, which the gate replaces with the output's default.
    pub fn median(rows: &Rows) -> Vec<f64> {
        let mut v: Vec<f64> = rows.column(0).map(|c| c.floats().collect()).unwrap_or_default();
        if v.is_empty() {
            return Vec::new();
        }
        let mid = (v.len() - 1) / 2;
        let (_, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
        vec![*m]
    }
}

block! {
    /// Least squares of the second column on the first: [slope, intercept].
    pub fn line(rows: &Rows) -> Vec<f64> {
        let (Some(x), Some(y)) = (rows.column(0), rows.column(1)) else { return Vec::new() };
        let pairs: Vec<(f64, f64)> = x.floats().zip(y.floats()).collect();
        let n = pairs.len() as f64;
        if n < 2.0 {
            return Vec::new();
        }
        let (mx, my) = pairs.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
        let (sxy, sxx) = pairs.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
            (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
        });
        if sxx <= 0.0 {
            return Vec::new();
        }
        let slope = sxy / sxx;
        vec![slope, my - slope * mx]
    }
}

/// Q6: the median fare of `table` over `blocks` blocks of people, clamped to [0, 100].
pub fn q6(table: &str, epsilon: f64, blocks: u32) -> Query {
    Query::sql(format!("SELECT fare FROM {table}"))
        .epsilon(epsilon)
        .sample_aggregate("median", blocks)
        .output("median_fare", 0.0, 100.0)
}

fn main_entry(params: Json) -> Result<Json, String> {
    let epsilon = params["epsilon"].as_f64().unwrap_or(1.0);
    let blocks = params["blocks"].as_u64().unwrap_or(200) as u32;
    let table = params["table"].as_str().unwrap_or("trips");
    let median = q6(table, epsilon, blocks)
        .run()
        .map_err(|e| e.to_string())?;
    let mut out = json!({ "median": median });
    if params["line"].as_bool().unwrap_or(false) {
        let line = Query::sql(format!("SELECT distance_km, fare FROM {table}"))
            .epsilon(epsilon)
            .sample_aggregate("line", blocks)
            .output("slope", 0.0, 20.0)
            .output("intercept", -20.0, 20.0)
            .run()
            .map_err(|e| e.to_string())?;
        out["line"] = json!(line);
    }
    Ok(out)
}
entry!(main => main_entry);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_line_on_small_blocks() {
        assert_eq!(median(&Rows::floats(vec![5.0, 1.0, 3.0, 2.0])), vec![2.0]);
        assert!(median(&Rows::floats(vec![])).is_empty());
        let rows = Rows {
            len: 3,
            columns: vec![
                Rows::floats(vec![1.0, 2.0, 3.0]).columns[0].clone(),
                Rows::floats(vec![3.0, 5.0, 7.0]).columns[0].clone(),
            ],
        };
        assert_eq!(line(&rows), vec![2.0, 1.0]);
    }
}
