//! A Rust port of `shared/bench/gen_trips.py`: the same columns and distributions (not
//! byte-identical), so the demo needs no Python. Synthetic data only: its randomness is a
//! seeded PRNG from `rand`, never privacy noise.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int32Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::LogNormal;

pub const DISTRICTS: usize = 16;
const HEAD_CELLS: usize = 4000;
const TAIL_CELLS: usize = 1000;
const BATCH: usize = 65_536;

/// Writes `n` synthetic trips to `out` (Parquet, snappy).
pub fn generate(n: usize, out: &Path, seed: u64) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // Persons with 1..=20 trips each, cut to exactly n rows, scattered across the file.
    let mut person_id = Vec::with_capacity(n);
    let mut pid = 1_000_000i64;
    while person_id.len() < n {
        let k = rng.random_range(1..=20).min(n - person_id.len());
        person_id.extend(std::iter::repeat_n(pid, k));
        pid += 1;
    }
    person_id.shuffle(&mut rng);

    let district_w: Vec<f64> = (1..=DISTRICTS)
        .map(|k| 1.0 / (k as f64).powf(1.1))
        .collect();
    let district_d = WeightedIndex::new(&district_w)?;
    let hour_w: Vec<f64> = (0..24)
        .map(|h| {
            let h = h as f64;
            let w = 1.0
                + 3.0 * (-0.5 * ((h - 8.0) / 1.5f64).powi(2)).exp()
                + 4.0 * (-0.5 * ((h - 18.0) / 2.0f64).powi(2)).exp();
            if (1.0..5.0).contains(&h) { w * 0.3 } else { w }
        })
        .collect();
    let hour_d = WeightedIndex::new(&hour_w)?;

    let mut grid: Vec<usize> = (0..10_000).collect();
    grid.shuffle(&mut rng);
    let cell_names: Vec<String> = grid[..HEAD_CELLS + TAIL_CELLS]
        .iter()
        .map(|g| format!("r{:03}c{:03}", g / 100, g % 100))
        .collect();
    let mut cells: Vec<u32> = Vec::with_capacity(n);
    for t in 0..TAIL_CELLS {
        let k = rng.random_range(1..10usize);
        cells.extend(std::iter::repeat_n((HEAD_CELLS + t) as u32, k));
    }
    cells.truncate(n / 2);
    let head_w: Vec<f64> = (1..=HEAD_CELLS).map(|k| 1.0 / k as f64).collect();
    let head_d = WeightedIndex::new(&head_w)?;
    while cells.len() < n {
        cells.push(head_d.sample(&mut rng) as u32);
    }
    cells.shuffle(&mut rng);

    let sigma = 0.6f64;
    let fare_d = LogNormal::new(30f64.ln() - sigma * sigma / 2.0, sigma)?;
    let dist_noise = LogNormal::new(0.0, 0.15)?;
    let district_names: Vec<String> = (1..=DISTRICTS).map(|k| format!("D{k:02}")).collect();

    let schema = Arc::new(Schema::new(vec![
        Field::new("trip_id", DataType::Int64, false),
        Field::new("person_id", DataType::Int64, false),
        Field::new("district", DataType::Utf8, false),
        Field::new("hour", DataType::Int32, false),
        Field::new("cell", DataType::Utf8, false),
        Field::new("fare", DataType::Float64, false),
        Field::new("distance_km", DataType::Float64, false),
    ]));
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let file = std::fs::File::create(out)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props))?;
    let mut start = 0;
    while start < n {
        let end = (start + BATCH).min(n);
        let len = end - start;
        let mut fares = Vec::with_capacity(len);
        let mut dists = Vec::with_capacity(len);
        for _ in 0..len {
            let fare: f64 = fare_d.sample(&mut rng).clamp(2.5, 500.0);
            let dist = ((fare - 2.5) / 2.2 * dist_noise.sample(&mut rng)).max(0.1);
            fares.push((fare * 100.0).round() / 100.0);
            dists.push((dist * 1000.0).round() / 1000.0);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(
                (start as i64 + 1)..=(end as i64),
            )),
            Arc::new(Int64Array::from(person_id[start..end].to_vec())),
            Arc::new(StringArray::from_iter_values(
                (0..len).map(|_| district_names[district_d.sample(&mut rng)].as_str()),
            )),
            Arc::new(Int32Array::from_iter_values(
                (0..len).map(|_| hour_d.sample(&mut rng) as i32),
            )),
            Arc::new(StringArray::from_iter_values(
                cells[start..end]
                    .iter()
                    .map(|&c| cell_names[c as usize].as_str()),
            )),
            Arc::new(Float64Array::from(fares)),
            Arc::new(Float64Array::from(dists)),
        ];
        writer.write(&RecordBatch::try_new(schema.clone(), columns)?)?;
        start = end;
    }
    writer.close()?;
    Ok(())
}
