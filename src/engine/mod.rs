//! DataFusion for one job: a session that holds only the scenario's tables (each narrowed to
//! the scenario's columns), no file formats, table factories, table functions or URL tables,
//! no scalar functions, a bounded memory pool, and spill files (when allowed) only in the
//! domain's own spill directory. SQL that would create, drop, copy, insert or set anything is
//! refused before planning finishes.
//!
//! Exact results leave this module only as [`ExactAggregate`], which cannot be serialised or
//! printed, and which only the gate reads. Decoded tables may be kept between jobs in a
//! [`TableCache`] (in the server's memory, inside the domain; never printable either).

mod positions;

pub use positions::PositionMemo;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::disk_manager::{DiskManager, DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{FairSpillPool, MemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};

/// A table a job may read: its SQL name, its file, and the columns the scenario allows.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub table: String,
    pub path: PathBuf,
    pub columns: Vec<String>,
    /// Read the file into memory when the session opens, so queries scan Arrow batches
    /// instead of decoding Parquet (benchmarks use it to time queries without the load).
    pub in_memory: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A statement kind the domain never runs (DDL, DML, COPY, SET, …).
    #[error("{0}")]
    Refused(String),
    /// The SQL does not parse or plan against the scenario's tables. The text comes from the
    /// planner, which sees only the query and the scenario's public schema.
    #[error("{0}")]
    Invalid(String),
    /// Execution failed. Deliberately without detail: execution errors can carry data.
    #[error("the query failed while running")]
    Execution,
    #[error("the job's tables could not be opened")]
    Setup(String),
}

/// How much memory one job's session may use, and where (if anywhere) it may spill.
#[derive(Debug, Clone)]
pub struct Resources {
    pub memory_bytes: usize,
    /// Where a job may spill and how much; `None`: no spilling, so a sort or aggregation over
    /// its memory fails.
    pub spill: Option<Spill>,
    /// Rows per batch in the session's scans and operators (and in the tables it caches).
    pub batch_rows: usize,
}

/// DataFusion's own default, kept where no person is bounded: `unseen bench --http` at one
/// client, alternated, p50 7.5–8.4 ms with it against 8.9–9.0 ms with 32,768-row batches.
pub const BATCH_ROWS: usize = 8192;

/// For sessions that bound persons. Pass 2 (`gate::bound`) updates a table of every person
/// from both partitions; with 8,192 rows a batch each row touches a table line the other core
/// may hold; with 32,768 a line fetched serves about two rows. `unseen bench --query Q2` at
/// 10M, three rounds alternating the builds: gate from memory 0.148–0.152 s against
/// 0.172–0.180 s with 8,192; with load no change (0.249–0.258 s against 0.249–0.268 s).
pub const PERSON_BATCH_ROWS: usize = 32_768;

/// A spill directory inside the domain, the most bytes of spill files one job may hold at
/// once, and the spill areas of finished jobs, kept for the next.
///
/// A job spills through a disk manager into an area of its own (`area-*`), in which DataFusion
/// makes its own directory (`datafusion-*`) when the manager is built. Making and removing
/// those two directories per job cost ~7 % of a small job's CPU on this VM's file system, so
/// an area and its manager serve one job after another. An area is kept for the next job only
/// when nothing of the finished job holds its manager any more, so none of its spill files
/// exists (a spill file holds its manager until the file is deleted). Otherwise it is removed
/// with everything in it, as each job's directory was before. Start-up empties the spill
/// directory.
#[derive(Clone)]
pub struct Spill(Arc<SpillArea>);

struct SpillArea {
    dir: PathBuf,
    bytes: u64,
    idle: Mutex<Vec<Area>>,
}

/// One job's disk manager and the directory it spills into.
struct Area {
    manager: Arc<DiskManager>,
    /// Held to be removed, with whatever is in it, when the area is not kept.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Spill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spill")
            .field("dir", &self.0.dir)
            .field("bytes", &self.0.bytes)
            .finish_non_exhaustive()
    }
}

/// Idle spill areas kept at most (each is two empty directories).
const IDLE_SPILL_AREAS: usize = 16;

impl Spill {
    pub fn new(dir: PathBuf, bytes: u64) -> Self {
        Spill(Arc::new(SpillArea {
            dir,
            bytes,
            idle: Mutex::default(),
        }))
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Area>> {
        self.0.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A spill area for one job: a finished job's, or a new one.
    fn lease(&self) -> Result<SpillLease, EngineError> {
        let kept = self.idle().pop();
        let area = match kept {
            Some(area) => area,
            None => {
                let setup = |e: &dyn std::fmt::Display| EngineError::Setup(e.to_string());
                let dir = tempfile::Builder::new()
                    .prefix("area-")
                    .tempdir_in(&self.0.dir)
                    .map_err(|e| setup(&e))?;
                let manager = DiskManagerBuilder::default()
                    .with_mode(DiskManagerMode::Directories(vec![dir.path().to_path_buf()]))
                    .with_max_temp_directory_size(self.0.bytes)
                    .build()
                    .map_err(|e| setup(&e))?;
                Area {
                    manager: Arc::new(manager),
                    _dir: dir,
                }
            }
        };
        Ok(SpillLease {
            spill: self.clone(),
            area: Some(area),
        })
    }

    /// Spill areas kept for the next jobs now.
    pub fn idle_areas(&self) -> usize {
        self.idle().len()
    }
}

/// A job's spill area. Dropped after the job's session, it goes back to its [`Spill`] if
/// nothing else holds its manager (no spill file of the job is left); otherwise its directory
/// is removed with whatever is in it.
struct SpillLease {
    spill: Spill,
    area: Option<Area>,
}

impl SpillLease {
    fn manager(&self) -> Option<Arc<DiskManager>> {
        self.area.as_ref().map(|a| a.manager.clone())
    }
}

impl Drop for SpillLease {
    fn drop(&mut self) {
        let Some(area) = self.area.take() else {
            return;
        };
        if Arc::strong_count(&area.manager) == 1 && area.manager.used_disk_space() == 0 {
            let mut idle = self.spill.idle();
            if idle.len() < IDLE_SPILL_AREAS {
                idle.push(area);
            }
        }
        // Not kept: its directory is removed, with any file still in it, as it drops here.
    }
}

/// Exact aggregates, for the gate's eyes only.
pub struct ExactAggregate(pub(crate) Vec<RecordBatch>);

impl std::fmt::Debug for ExactAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExactAggregate(<{} batches hidden>)", self.0.len())
    }
}

pub struct JobSession {
    ctx: SessionContext,
    /// Each table's file as it was when the session opened (path, length, modification time).
    files: HashMap<String, (PathBuf, u64, Option<SystemTime>)>,
    /// The job's spill area, kept for another job or removed when the session ends (declared
    /// after `ctx`, so DataFusion lets go of it first). DataFusion removes each spill file as
    /// the operator that wrote it lets go of it, but one of a failed query can still be held.
    _spill: Option<SpillLease>,
    /// The group-key positions kept with each table that came from (or went into) the cache.
    memos: Vec<Arc<PositionMemo>>,
}

/// The identity of a decoded table: the file as it is now, and the columns read.
#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    columns: Vec<String>,
}

struct CachedTable {
    schema: SchemaRef,
    partitions: Vec<Vec<RecordBatch>>,
    memo: Arc<PositionMemo>,
    /// The batches' bytes and the memo's cap.
    bytes: usize,
    last_used: u64,
}

/// Tables decoded once and shared by later jobs: for small jobs, decoding Parquet is most of
/// the work. Keyed by the file's path, length and modification time (a new version of the
/// data is a new key) and the columns read; bounded in bytes, least recently used out first.
/// Each table's budget share includes a quarter of its size for the group-key positions kept
/// with it ([`PositionMemo`]).
#[derive(Clone)]
pub struct TableCache {
    budget: usize,
    inner: Arc<Mutex<CacheInner>>,
}

#[derive(Default)]
struct CacheInner {
    tables: HashMap<CacheKey, CachedTable>,
    used: usize,
    clock: u64,
}

impl TableCache {
    pub fn new(budget_bytes: usize) -> Self {
        TableCache {
            budget: budget_bytes,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &CacheKey) -> Option<(SchemaRef, Vec<Vec<RecordBatch>>, Arc<PositionMemo>)> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let t = inner.tables.get_mut(key)?;
        t.last_used = now;
        // Record batches share their buffers: this clone copies pointers, not data.
        Some((t.schema.clone(), t.partitions.clone(), t.memo.clone()))
    }

    /// Keeps a decoded table, if it fits; returns the memo kept with it.
    fn put(
        &self,
        key: CacheKey,
        schema: SchemaRef,
        partitions: Vec<Vec<RecordBatch>>,
    ) -> Option<Arc<PositionMemo>> {
        let batches: usize = partitions
            .iter()
            .flatten()
            .map(RecordBatch::get_array_memory_size)
            .sum();
        let bytes = batches + batches / 4;
        if bytes > self.budget {
            return None;
        }
        let memo = Arc::new(PositionMemo::new(&partitions, batches / 4));
        let mut inner = self.lock();
        while inner.used + bytes > self.budget {
            let Some(oldest) = inner
                .tables
                .iter()
                .min_by_key(|(_, t)| t.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(t) = inner.tables.remove(&oldest) {
                inner.used -= t.bytes;
            }
        }
        inner.clock += 1;
        let last_used = inner.clock;
        if let Some(old) = inner.tables.insert(
            key,
            CachedTable {
                schema,
                partitions,
                memo: memo.clone(),
                bytes,
                last_used,
            },
        ) {
            inner.used -= old.bytes;
        }
        inner.used += bytes;
        Some(memo)
    }

    /// Bytes held now.
    pub fn used_bytes(&self) -> usize {
        self.lock().used
    }
}

impl JobSession {
    /// Builds a session holding exactly `tables`, with at most `memory_bytes` for execution.
    pub async fn new(
        tables: &[TableSpec],
        resources: &Resources,
        cache: Option<&TableCache>,
    ) -> Result<Self, EngineError> {
        let spill = resources.spill.as_ref().map(Spill::lease).transpose()?;
        // Fair shares: each spilling operator gets its part of the pool and spills beyond it,
        // rather than the first one taking everything and the next failing.
        let mut runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(resources.memory_bytes)));
        match spill.as_ref().and_then(SpillLease::manager) {
            Some(manager) => runtime.disk_manager = Some(manager),
            None => {
                runtime = runtime.with_disk_manager_builder(
                    DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
                )
            }
        }
        let runtime = runtime
            .build_arc()
            .map_err(|e| EngineError::Setup(e.to_string()))?;
        let mut config = SessionConfig::new()
            .with_information_schema(false)
            .with_target_partitions(2)
            .with_batch_size(resources.batch_rows.max(1));
        // A sort that spills sets aside memory for merging its runs (10 MiB by default): a
        // sixteenth of the pool, so spilling also works in small pools.
        config.options_mut().execution.sort_spill_reservation_bytes =
            (resources.memory_bytes / 16).min(10 << 20);
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_aggregate_functions(vec![
                datafusion::functions_aggregate::count::count_udaf(),
                datafusion::functions_aggregate::sum::sum_udaf(),
                datafusion::functions_aggregate::average::avg_udaf(),
                // Planned only: the gate answers these from noisy counts, sums and squares.
                datafusion::functions_aggregate::variance::var_samp_udaf(),
                datafusion::functions_aggregate::variance::var_pop_udaf(),
                datafusion::functions_aggregate::stddev::stddev_udaf(),
                datafusion::functions_aggregate::stddev::stddev_pop_udaf(),
                // Planned only: the gate answers these with OpenDP's private quantile.
                datafusion::functions_aggregate::median::median_udaf(),
                datafusion::functions_aggregate::percentile_cont::percentile_cont_udaf(),
                datafusion::functions_aggregate::approx_median::approx_median_udaf(),
                datafusion::functions_aggregate::approx_percentile_cont::approx_percentile_cont_udaf(),
            ])
            .build();
        let ctx = SessionContext::new_with_state(state);
        let mut files = HashMap::new();
        let mut memos = Vec::new();
        for spec in tables {
            if let Ok(meta) = std::fs::metadata(&spec.path) {
                files.insert(
                    spec.table.clone(),
                    (spec.path.clone(), meta.len(), meta.modified().ok()),
                );
            }
            let key = cache.filter(|c| c.budget > 0).and_then(|c| {
                // Decide before decoding: a table that would not fit is scanned from the file.
                if uncompressed_bytes(&spec.path, &spec.columns)?.saturating_mul(2) > c.budget {
                    return None;
                }
                let meta = std::fs::metadata(&spec.path).ok()?;
                let mut columns = spec.columns.clone();
                columns.sort();
                Some(CacheKey {
                    path: spec.path.clone(),
                    len: meta.len(),
                    modified: meta.modified().ok(),
                    columns,
                })
            });
            if let (Some(cache), Some(key)) = (cache, &key)
                && let Some((schema, partitions, memo)) = cache.get(key)
            {
                memos.push(memo);
                let table = MemTable::try_new(schema, partitions)
                    .map_err(|e| EngineError::Setup(e.to_string()))?;
                ctx.register_table(spec.table.as_str(), Arc::new(table))
                    .map_err(|e| EngineError::Setup(e.to_string()))?;
                continue;
            }
            let url = ListingTableUrl::parse(spec.path.to_string_lossy())
                .map_err(|e| EngineError::Setup(e.to_string()))?;
            let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
                .with_file_extension(".parquet");
            let file_schema = options
                .infer_schema(&ctx.state(), &url)
                .await
                .map_err(|e| EngineError::Setup(e.to_string()))?;
            let allowed: Vec<_> = file_schema
                .fields()
                .iter()
                .filter(|f| spec.columns.iter().any(|c| c == f.name()))
                .cloned()
                .collect();
            let schema: SchemaRef = Arc::new(Schema::new(allowed));
            let config = ListingTableConfig::new(url)
                .with_listing_options(options)
                .with_schema(schema.clone());
            let table = Arc::new(
                ListingTable::try_new(config).map_err(|e| EngineError::Setup(e.to_string()))?,
            );
            let provider: Arc<dyn datafusion::catalog::TableProvider> =
                if spec.in_memory || key.is_some() {
                    let batches = ctx
                        .read_table(table)
                        .map_err(|e| EngineError::Setup(e.to_string()))?
                        .collect_partitioned()
                        .await
                        .map_err(|e| EngineError::Setup(e.to_string()))?;
                    if let (Some(cache), Some(key)) = (cache, key) {
                        memos.extend(cache.put(key, schema.clone(), batches.clone()));
                    }
                    Arc::new(
                        MemTable::try_new(schema, batches)
                            .map_err(|e| EngineError::Setup(e.to_string()))?,
                    )
                } else {
                    table
                };
            ctx.register_table(spec.table.as_str(), provider)
                .map_err(|e| EngineError::Setup(e.to_string()))?;
        }
        Ok(JobSession {
            ctx,
            files,
            _spill: spill,
            memos,
        })
    }

    /// The group-key positions kept with the session's cached tables.
    pub fn position_memos(&self) -> &[Arc<PositionMemo>] {
        &self.memos
    }

    /// The session's memory pool, for the gate's own tables over rows.
    pub fn memory_pool(&self) -> Arc<dyn MemoryPool> {
        self.ctx.runtime_env().memory_pool.clone()
    }

    /// Adds a guest UDF (the module's; names were checked against the session's own at upload).
    pub fn register_udf(&self, udf: datafusion::logical_expr::ScalarUDF) {
        self.ctx.register_udf(udf);
    }

    /// Parses and plans guest SQL, refusing every statement but a query, then runs the
    /// analyzer (type coercion) so the gate checks the plan that will actually execute.
    pub async fn plan(&self, sql: &str) -> Result<LogicalPlan, EngineError> {
        let state = self.ctx.state();
        let plan = state
            .create_logical_plan(sql)
            .await
            .map_err(|e| EngineError::Invalid(bounded(e.strip_backtrace())))?;
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|_| {
                EngineError::Refused("only queries may run here: no DDL, DML, COPY or SET".into())
            })?;
        state
            .analyzer()
            .execute_and_check(plan, state.config_options(), |_, _| {})
            .map_err(|e| EngineError::Invalid(bounded(e.strip_backtrace())))
    }

    /// Executes a plan the gate built. Errors carry no text.
    pub async fn execute(&self, plan: LogicalPlan) -> Result<ExactAggregate, EngineError> {
        let df = self
            .ctx
            .execute_logical_plan(plan)
            .await
            .map_err(|_| EngineError::Execution)?;
        let batches = df.collect().await.map_err(|_| EngineError::Execution)?;
        Ok(ExactAggregate(batches))
    }

    /// The smallest and largest value of an integer column of `table` and the table's rows,
    /// from its Parquet file's statistics, if every row group has them and the file is the one
    /// the session opened. Bounds every value a scan of the table yields (with or without
    /// filters), so the gate can size tables by it without a pass over the rows.
    pub fn integer_range(&self, table: &str, column: &str) -> Option<(i64, i64, u64)> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        use parquet::file::statistics::Statistics;
        let (path, len, modified) = self.files.get(table)?;
        let same = |m: &std::fs::Metadata| m.len() == *len && m.modified().ok() == *modified;
        let file = std::fs::File::open(path).ok()?;
        if !same(&file.metadata().ok()?) {
            return None;
        }
        let reader = SerializedFileReader::new(file).ok()?;
        let (mut lo, mut hi, mut rows) = (i64::MAX, i64::MIN, 0u64);
        for rg in reader.metadata().row_groups() {
            rows += u64::try_from(rg.num_rows()).ok()?;
            let c = rg
                .columns()
                .iter()
                .find(|c| c.column_path().string() == column)?;
            let (min, max) = match c.statistics()? {
                Statistics::Int64(s) => (*s.min_opt()?, *s.max_opt()?),
                Statistics::Int32(s) => (i64::from(*s.min_opt()?), i64::from(*s.max_opt()?)),
                _ => return None,
            };
            lo = lo.min(min);
            hi = hi.max(max);
        }
        (lo <= hi).then_some((lo, hi, rows))
    }

    /// Runs `plan` with each of its output partitions on a task of its own, folding that
    /// partition's batches into a state `start` makes for it; returns the states (in no
    /// particular order). For the gate's own passes over rows that keep only a summary per
    /// partition. A failing partition stops the others.
    pub async fn fold_partitions<S, F>(
        &self,
        plan: LogicalPlan,
        mut start: impl FnMut() -> Result<S, EngineError>,
        fold: F,
    ) -> Result<Vec<S>, EngineError>
    where
        S: Send + 'static,
        F: Fn(&mut S, &RecordBatch) -> Result<(), EngineError> + Clone + Send + 'static,
    {
        use futures::StreamExt;
        let streams = self
            .ctx
            .execute_logical_plan(plan)
            .await
            .map_err(|_| EngineError::Execution)?
            .execute_stream_partitioned()
            .await
            .map_err(|_| EngineError::Execution)?;
        // Dropping the set (on an error below) aborts the partitions still running.
        let mut tasks = tokio::task::JoinSet::new();
        for mut stream in streams {
            let mut state = start()?;
            let fold = fold.clone();
            tasks.spawn(async move {
                while let Some(batch) = stream.next().await {
                    fold(&mut state, &batch.map_err(|_| EngineError::Execution)?)?;
                }
                Ok::<_, EngineError>(state)
            });
        }
        let mut out = Vec::with_capacity(tasks.len());
        while let Some(done) = tasks.join_next().await {
            out.push(done.map_err(|_| EngineError::Execution)??);
        }
        Ok(out)
    }
}

/// The uncompressed size of `columns` in a Parquet file, from its footer.
fn uncompressed_bytes(path: &std::path::Path, columns: &[String]) -> Option<usize> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(std::fs::File::open(path).ok()?).ok()?;
    let mut total = 0i64;
    for rg in reader.metadata().row_groups() {
        for c in rg.columns() {
            if columns.iter().any(|name| c.column_path().string() == *name) {
                total += c.uncompressed_size();
            }
        }
    }
    usize::try_from(total).ok()
}

fn bounded(mut s: String) -> String {
    if s.len() > 300 {
        let mut cut = 300;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Float64Type, Int64Type};

    async fn count(spec: &TableSpec, cache: &TableCache) -> i64 {
        let resources = Resources {
            memory_bytes: 1 << 28,
            spill: None,
            batch_rows: BATCH_ROWS,
        };
        let s = JobSession::new(std::slice::from_ref(spec), &resources, Some(cache))
            .await
            .unwrap();
        let plan = s.plan("SELECT COUNT(district) FROM trips").await.unwrap();
        let out = s.execute(plan).await.unwrap();
        out.0[0].column(0).as_primitive::<Int64Type>().value(0)
    }

    /// The ids' range comes from the file's statistics while the file is the one the session
    /// opened, and not at all from a file without statistics or one replaced since.
    #[tokio::test]
    async fn integer_ranges_come_from_statistics_of_the_file_opened() {
        use arrow::array::Int64Array;
        use parquet::file::properties::{EnabledStatistics, WriterProperties};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, ids: Vec<i64>, stats: EnabledStatistics| {
            let path = dir.path().join(name);
            let batch =
                RecordBatch::try_from_iter([("person_id", Arc::new(Int64Array::from(ids)) as _)])
                    .unwrap();
            let props = WriterProperties::builder()
                .set_statistics_enabled(stats)
                .set_max_row_group_row_count(Some(100))
                .build();
            let mut w = parquet::arrow::ArrowWriter::try_new(
                std::fs::File::create(&path).unwrap(),
                batch.schema(),
                Some(props),
            )
            .unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            path
        };
        let ids: Vec<i64> = (0..250).map(|i| 1000 + (i * 37) % 250).collect();
        let with = write("with.parquet", ids.clone(), EnabledStatistics::Chunk);
        let without = write("without.parquet", ids, EnabledStatistics::None);
        let spec = |table: &str, path: &std::path::Path| TableSpec {
            table: table.into(),
            path: path.to_path_buf(),
            columns: vec!["person_id".into()],
            in_memory: false,
        };
        let resources = Resources {
            memory_bytes: 1 << 26,
            spill: None,
            batch_rows: BATCH_ROWS,
        };
        let s = JobSession::new(&[spec("a", &with), spec("b", &without)], &resources, None)
            .await
            .unwrap();
        // Three row groups, their minima and maxima combined.
        assert_eq!(s.integer_range("a", "person_id"), Some((1000, 1249, 250)));
        assert_eq!(s.integer_range("b", "person_id"), None);
        assert_eq!(s.integer_range("a", "fare"), None);
        // The file replaced after the session opened: its statistics are not the table's.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write("with.parquet", vec![5, 6, 7], EnabledStatistics::Chunk);
        assert_eq!(s.integer_range("a", "person_id"), None);
    }

    /// A session's scans hand its operators batches of its `batch_rows` (the gate asks for
    /// larger ones where it bounds persons), and no batch is longer.
    #[tokio::test]
    async fn scans_yield_batches_of_the_sessions_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trips.parquet");
        crate::demo::trips::generate(100_000, &path, 1).unwrap();
        let spec = TableSpec {
            table: "trips".into(),
            path,
            columns: vec!["fare".into()],
            in_memory: false,
        };
        for rows in [BATCH_ROWS, PERSON_BATCH_ROWS] {
            let resources = Resources {
                memory_bytes: 1 << 28,
                spill: None,
                batch_rows: rows,
            };
            let s = JobSession::new(std::slice::from_ref(&spec), &resources, None)
                .await
                .unwrap();
            let plan = s.plan("SELECT fare FROM trips").await.unwrap();
            let batches = s.execute(plan).await.unwrap().0;
            let longest = batches.iter().map(|b| b.num_rows()).max().unwrap();
            let total: usize = batches.iter().map(|b| b.num_rows()).sum();
            assert_eq!(total, 100_000);
            assert_eq!(longest, rows, "batches of {rows} rows asked for");
        }
    }

    #[tokio::test]
    async fn decoded_tables_are_shared_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trips.parquet");
        crate::demo::trips::generate(1000, &path, 1).unwrap();
        let spec = TableSpec {
            table: "trips".into(),
            path: path.clone(),
            columns: vec!["district".into(), "fare".into()],
            in_memory: false,
        };
        let cache = TableCache::new(64 << 20);
        assert_eq!(count(&spec, &cache).await, 1000);
        let held = cache.used_bytes();
        assert!(held > 0, "the first job decoded and kept the table");
        assert_eq!(count(&spec, &cache).await, 1000);
        assert_eq!(cache.used_bytes(), held, "the second job reused it");

        // A new version of the data is a new key: the next job sees it.
        crate::demo::trips::generate(1500, &path, 2).unwrap();
        assert_eq!(count(&spec, &cache).await, 1500);

        // A budget too small for the table keeps nothing, and the job still runs.
        let tiny = TableCache::new(1024);
        assert_eq!(count(&spec, &tiny).await, 1500);
        assert_eq!(tiny.used_bytes(), 0);
    }

    /// A grouping that outgrows its memory spills to the spill directory and gives the same
    /// answer; without a spill directory the same query fails; the spill files are gone after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aggregations_over_their_memory_spill_inside_the_domain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trips.parquet");
        crate::demo::trips::generate(20_000, &path, 1).unwrap();
        let spill_dir = dir.path().join("spill");
        std::fs::create_dir(&spill_dir).unwrap();
        let area = Spill::new(spill_dir.clone(), 1 << 30);
        let spec = TableSpec {
            table: "trips".into(),
            path,
            columns: vec!["cell".into(), "fare".into()],
            in_memory: false,
        };
        let sql = "SELECT cell, COUNT(fare) AS n, SUM(fare) AS f FROM trips GROUP BY cell";
        let run = |memory_bytes: usize, spill: bool| {
            let resources = Resources {
                memory_bytes,
                spill: spill.then(|| area.clone()),
                batch_rows: BATCH_ROWS,
            };
            let spec = spec.clone();
            async move {
                let s = JobSession::new(std::slice::from_ref(&spec), &resources, None)
                    .await
                    .unwrap();
                let plan = s.plan(sql).await.unwrap();
                s.execute(plan).await.map(|out| {
                    let mut groups = HashMap::new();
                    for b in &out.0 {
                        let cells = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
                        for i in 0..b.num_rows() {
                            let fresh = groups.insert(
                                cells.as_string::<i32>().value(i).to_string(),
                                (
                                    b.column(1).as_primitive::<Int64Type>().value(i),
                                    b.column(2).as_primitive::<Float64Type>().value(i),
                                ),
                            );
                            assert!(fresh.is_none(), "a cell came out twice");
                        }
                    }
                    groups
                })
            }
        };
        // Cells and counts exactly; fare sums up to summation order.
        let same = |a: &HashMap<String, (i64, f64)>, b: &HashMap<String, (i64, f64)>| {
            a.len() == b.len()
                && a.iter().all(|(cell, (n, f))| {
                    b.get(cell)
                        .is_some_and(|(m, g)| n == m && (f - g).abs() <= 1e-9 * f.abs())
                })
        };
        let roomy = run(256 << 20, false).await.unwrap();
        assert!(roomy.len() > 1000, "{} cells", roomy.len());
        let spilled = run(1 << 20, true).await.unwrap();
        assert!(same(&roomy, &spilled));
        assert!(
            run(1 << 20, false).await.is_err(),
            "without spilling, the same pool is too small"
        );
        assert!(
            run(16 << 10, true).await.is_err(),
            "a pool too small even to spill from fails"
        );
        // No spill file outlives its query, failed ones included.
        fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .flat_map(|p| if p.is_dir() { files(&p) } else { vec![p] })
                .collect()
        }
        let left = files(&spill_dir);
        assert!(
            left.is_empty(),
            "spill files outlived their queries: {left:?}"
        );
        // At most the one area both spilling runs used is kept (the failed run's is removed if
        // a spill file of it was still held), and nothing else is in the spill directory.
        let kept = area.idle_areas();
        assert!(kept <= 1, "{kept} areas kept");
        let dirs = std::fs::read_dir(&spill_dir).unwrap().count();
        assert_eq!(
            dirs, kept,
            "only kept areas' directories, and they are empty"
        );
        // A query that spills and succeeds leaves its area to the next job.
        let again = run(1 << 20, true).await.unwrap();
        assert!(same(&roomy, &again));
        assert_eq!(area.idle_areas(), 1, "the area of a finished job is kept");
        assert!(files(&spill_dir).is_empty());
    }
}
