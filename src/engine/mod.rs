//! DataFusion for one job: a session that holds only the scenario's tables (each narrowed to
//! the scenario's columns), no file formats, table factories, table functions or URL tables,
//! no scalar functions, a bounded memory pool and no spilling. SQL that would create, drop,
//! copy, insert or set anything is refused before planning finishes.
//!
//! Exact results leave this module only as [`ExactAggregate`], which cannot be serialised or
//! printed, and which only the gate reads.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
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

/// Exact aggregates, for the gate's eyes only.
pub struct ExactAggregate(pub(crate) Vec<RecordBatch>);

impl std::fmt::Debug for ExactAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExactAggregate(<{} batches hidden>)", self.0.len())
    }
}

pub struct JobSession {
    ctx: SessionContext,
}

impl JobSession {
    /// Builds a session holding exactly `tables`, with at most `memory_bytes` for execution.
    pub async fn new(tables: &[TableSpec], memory_bytes: usize) -> Result<Self, EngineError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(memory_bytes, 1.0)
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .map_err(|e| EngineError::Setup(e.to_string()))?;
        let config = SessionConfig::new()
            .with_information_schema(false)
            .with_target_partitions(2);
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_aggregate_functions(vec![
                datafusion::functions_aggregate::count::count_udaf(),
                datafusion::functions_aggregate::sum::sum_udaf(),
                datafusion::functions_aggregate::average::avg_udaf(),
            ])
            .build();
        let ctx = SessionContext::new_with_state(state);
        for spec in tables {
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
            let provider: Arc<dyn datafusion::catalog::TableProvider> = if spec.in_memory {
                let batches = ctx
                    .read_table(table)
                    .map_err(|e| EngineError::Setup(e.to_string()))?
                    .collect_partitioned()
                    .await
                    .map_err(|e| EngineError::Setup(e.to_string()))?;
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
        Ok(JobSession { ctx })
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
