//! Server settings (`--config FILE` or flags) and the one typed struct of resource limits.
//! Limit defaults live in `policies/limits.toml`; the values in [`Limits::default`] are the
//! fall-back when no such file is given and must match it (a test checks).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the SQLite file, the ledger key, modules and datasets live.
    pub data_dir: PathBuf,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Policy files (`*.toml`) that seed the catalogue at start-up.
    #[serde(default)]
    pub policies_dir: Option<PathBuf>,
    #[serde(default)]
    pub limits: Limits,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            listen: default_listen(),
            policies_dir: None,
            limits: Limits::default(),
        }
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }
}

/// Every resource limit a job or upload is held to. One refusal code per limit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest module upload, bytes (`module_too_large`).
    pub max_module_bytes: usize,
    /// Largest linear memory a module may declare or grow to, bytes (`memory_limit`).
    pub max_memory_bytes: usize,
    /// Largest table a module may declare or grow to, elements (`table_limit`).
    pub max_table_elements: u32,
    /// Most wasm stack a call may use, bytes (`stack_overflow`).
    pub max_stack_bytes: usize,
    /// Fuel (roughly, wasm instructions) for one job's guest code (`out_of_fuel`). Host work
    /// done for queries is not charged: fuel then depends only on the guest's own inputs.
    pub fuel_per_job: u64,
    /// Queries one job may ask (`too_many_queries`).
    pub max_queries_per_job: u32,
    /// Largest query request or job output, bytes (`output_too_large`).
    pub max_message_bytes: usize,
    /// Largest JSON request body to the API, bytes (`body_too_large`).
    pub max_request_body_bytes: usize,
    /// Longest guest SQL text, bytes.
    pub max_sql_bytes: usize,
    /// Memory one job's queries may use, bytes: DataFusion's pool, which the gate's own
    /// per-person tables draw on too. Sorts and aggregations spill beyond it (see
    /// `spill_bytes`); what cannot spill fails the query (`query_failed`).
    pub query_memory_bytes: usize,
    /// Disk one job's queries may spill to, bytes, in `spill/` under the data directory
    /// (inside the domain; files removed as soon as the operator is done, and the directory
    /// emptied at start-up). 0 turns spilling off.
    pub spill_bytes: u64,
    /// Jobs running at once; the rest wait in the queue. More than the cores: much of a job
    /// runs on one thread or waits (loading and instantiating its module, planning, the
    /// ledger's commits, noise, the result), and other jobs' scans fill those gaps. On 2 cores
    /// with small jobs, 8 answered 9–37 % more jobs a second than 2 at 8 clients, 18–28 % more
    /// at 32 (`unseen bench --http --concurrent-jobs N`, README). Each running job may hold `query_memory_bytes` and
    /// `spill_bytes`, so lower this on a machine with less memory than 8 of those.
    pub concurrent_jobs: usize,
    /// Compiled modules kept in memory; the least recently used is dropped first and compiled
    /// again from its file when next needed.
    pub max_cached_modules: usize,
    /// Memory for tables kept decoded between jobs, bytes (0: read the Parquet file for every
    /// job). Least recently used tables leave first; a table larger than this is never kept.
    /// Each table is counted at 1¼ its size: the quarter holds the group-key slots kept with it
    /// (`engine::PositionMemo`).
    pub table_cache_bytes: usize,
    /// A query asked again with the same options in the same scenario, over the same data file,
    /// gets its earlier release back and spends nothing (false: every query is computed and
    /// charged afresh).
    pub reuse_releases: bool,
    /// UDFs one module may export, and separately block functions (`module_over_limits`).
    pub max_udfs: u32,
    /// Fuel for one row of a wasm UDF; a row that runs out gets the UDF's declared default.
    pub udf_fuel_per_row: u64,
    /// Fuel for one sample-and-aggregate block; a block that runs out gets the outputs'
    /// defaults.
    pub block_fuel: u64,
    /// Most blocks one sample-and-aggregate query may ask for (`invalid_blocks`).
    pub max_blocks: u32,
    /// Wasm instances alive at once across the server (pooled slots with copy-on-write memory;
    /// beyond it a query fails rather than waiting).
    pub instance_slots: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_module_bytes: 8 << 20,
            max_memory_bytes: 64 << 20,
            max_table_elements: 10_000,
            max_stack_bytes: 512 << 10,
            fuel_per_job: 2_000_000_000,
            max_queries_per_job: 64,
            max_message_bytes: 4 << 20,
            max_request_body_bytes: 1 << 20,
            max_sql_bytes: 16 << 10,
            query_memory_bytes: 1 << 30,
            spill_bytes: 8 << 30,
            concurrent_jobs: 8,
            max_cached_modules: 256,
            table_cache_bytes: 2 << 30,
            reuse_releases: true,
            max_udfs: 32,
            udf_fuel_per_row: 1_000_000,
            block_fuel: 200_000_000,
            max_blocks: 10_000,
            instance_slots: 128,
        }
    }
}

impl Limits {
    /// Reads `limits.toml` from a policies directory, if present.
    pub fn from_policies_dir(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = dir.join("limits.toml");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)?;
        let limits = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("policy file {}: {e}", path.display()))?;
        Ok(Some(limits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_limits_file_matches_the_defaults() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let shipped = Limits::from_policies_dir(&dir)
            .unwrap()
            .expect("policies/limits.toml exists");
        assert_eq!(shipped, Limits::default());
    }
}
