//! The wasm sandbox (wasmtime). Validates uploaded modules against the host↔guest contract
//! and the limits, compiles them once and caches them by SHA-256, and runs an entry point in a
//! fresh store with fuel, a memory and table limiter, a stack limit, no WASI, no clock, no
//! randomness and no I/O. It knows nothing of HTTP, SQL or privacy: queries go to a [`Host`].

pub mod functions;
mod purity;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use unseen_guest::contract::{
    BLOCK_PREFIX, ENTRY_PREFIX, EXPORT_ALLOC, EXPORT_MEMORY, HOST_MODULE, IMPORT_QUERY,
    IMPORT_SET_OUTPUT, IMPORT_TAKE_RESPONSE, IMPORTS, QueryError, QueryRequest, QueryResponse,
    ROW_PREFIX, UDF_PREFIX, UdfType, Value,
};
use wasmtime::{
    Caller, Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, ResourceLimiter, Store, Trap, ValType,
};

use functions::{FnState, GuestFunctions, UdfInfo, UdfMode};

use crate::config::Limits;

/// What answers a module's queries (the gate, in a job).
pub trait Host: Send {
    fn query(&mut self, request: QueryRequest) -> QueryResponse;
}

/// Why an upload was refused. Names from the module are bounded before they are quoted.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("the module is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("not a valid WebAssembly binary (text format and components are not accepted)")]
    Invalid,
    #[error(
        "the module imports {0}, which the host does not provide (only `unseen` query, take_response, set_output)"
    )]
    UnknownImport(String),
    #[error("the module declares {what}, over the limit of {limit}")]
    OverLimit { what: &'static str, limit: String },
    #[error("the module must export {0}")]
    MissingExport(String),
    #[error("the module's function {0}")]
    InvalidFunction(String),
}

impl ModuleError {
    pub fn code(&self) -> &'static str {
        match self {
            ModuleError::TooLarge { .. } => "module_too_large",
            ModuleError::Invalid => "invalid_module",
            ModuleError::UnknownImport(_) => "unknown_import",
            ModuleError::OverLimit { .. } => "module_over_limits",
            ModuleError::MissingExport(_) => "missing_export",
            ModuleError::InvalidFunction(_) => "invalid_function",
        }
    }
}

/// How a run ended badly. Each is a function of the module and what it was given (params and
/// DP releases), never of raw data: host work is not charged fuel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    #[error("the module ran out of fuel (its instruction budget)")]
    OutOfFuel,
    #[error("the module tried to use more memory than allowed")]
    MemoryLimit,
    #[error("the module tried to grow a table beyond the limit")]
    TableLimit,
    #[error("the module overflowed its stack")]
    StackOverflow,
    #[error("the module trapped: {0}")]
    Trap(String),
    #[error("the module asked more queries than a job may")]
    TooManyQueries,
    #[error("the module's message or output exceeded the size limit")]
    OutputTooLarge,
    #[error("the module has no entry point {0:?}")]
    UnknownEntry(String),
    #[error("the module's entry failed: {0}")]
    GuestError(String),
    #[error("the module broke the host protocol: {0}")]
    Protocol(&'static str),
}

impl RunError {
    pub fn code(&self) -> &'static str {
        match self {
            RunError::OutOfFuel => "out_of_fuel",
            RunError::MemoryLimit => "memory_limit",
            RunError::TableLimit => "table_limit",
            RunError::StackOverflow => "stack_overflow",
            RunError::Trap(_) => "guest_trap",
            RunError::TooManyQueries => "too_many_queries",
            RunError::OutputTooLarge => "output_too_large",
            RunError::UnknownEntry(_) => "unknown_entry",
            RunError::GuestError(_) => "guest_error",
            RunError::Protocol(_) => "protocol_error",
        }
    }
}

/// A module that passed validation.
#[derive(Clone)]
pub struct ValidatedModule {
    pub hash: String,
    pub entries: Vec<String>,
    pub module: Module,
    /// Imports resolved once against the host's linker: a job only instantiates.
    pre: InstancePre<RunState>,
    /// The same module for guest functions over rows, whose host imports trap.
    functions_pre: InstancePre<FnState>,
    /// Scalar UDFs queries may call by name.
    pub udfs: Vec<UdfInfo>,
    /// Sample-and-aggregate block functions.
    pub blocks: Vec<String>,
}

pub struct Sandbox {
    engine: Engine,
    linker: Linker<RunState>,
    functions_linker: Linker<FnState>,
    limits: Limits,
    /// Compiled modules by hash, with the tick each was last used (bounded by
    /// `limits.max_cached_modules`; an evicted module is compiled again from its file).
    compiled: Mutex<HashMap<String, (ValidatedModule, u64)>>,
    tick: std::sync::atomic::AtomicU64,
}

struct RunState {
    host: Box<dyn Host>,
    limits: Limits,
    memory_denied: bool,
    table_denied: bool,
    failure: Option<RunError>,
    response: Option<Vec<u8>>,
    output: Option<Vec<u8>>,
    queries: u32,
}

impl ResourceLimiter for RunState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limits.max_memory_bytes {
            self.memory_denied = true;
            return Err(wasmtime::Error::msg("memory limit"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limits.max_table_elements as usize {
            self.table_denied = true;
            return Err(wasmtime::Error::msg("table limit"));
        }
        Ok(true)
    }
}

/// Names a UDF may not take: the session's own functions (SQL names are case-insensitive).
const RESERVED_FUNCTIONS: &[&str] = &[
    "count",
    "sum",
    "avg",
    "mean",
    "var",
    "var_pop",
    "var_samp",
    "variance",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "unseen_keep",
];

fn function_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

/// The largest initial memory (bytes) and table (elements) a module declares, defined or
/// imported; (0, 0) for bytes that do not parse (compilation refuses those).
fn declared_sizes(bytes: &[u8]) -> (u64, u64) {
    use wasmparser::{Parser, Payload, TypeRef};
    let (mut memory, mut table) = (0u64, 0u64);
    for payload in Parser::new(0).parse_all(bytes) {
        match payload {
            Ok(Payload::MemorySection(section)) => {
                for m in section.into_iter().flatten() {
                    memory = memory.max(m.initial.saturating_mul(65536));
                }
            }
            Ok(Payload::TableSection(section)) => {
                for t in section.into_iter().flatten() {
                    table = table.max(t.ty.initial);
                }
            }
            Ok(Payload::ImportSection(section)) => {
                for import in section.into_imports().flatten() {
                    match import.ty {
                        TypeRef::Memory(m) => memory = memory.max(m.initial.saturating_mul(65536)),
                        TypeRef::Table(t) => table = table.max(t.initial),
                        _ => {}
                    }
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    (memory, table)
}

/// Bounds a guest-chosen name before it is quoted anywhere.
fn bounded_name(s: &str) -> String {
    let cut: String = s.chars().take(64).filter(|c| !c.is_control()).collect();
    if s.chars().count() > 64 {
        format!("{cut}…")
    } else {
        cut
    }
}

fn guest_slice(
    caller: &mut Caller<'_, RunState>,
    ptr: i32,
    len: i32,
    limit: usize,
) -> Result<Vec<u8>, RunError> {
    let memory = caller
        .get_export(EXPORT_MEMORY)
        .and_then(|e| e.into_memory())
        .ok_or(RunError::Protocol("no exported memory"))?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    if len > limit {
        return Err(RunError::OutputTooLarge);
    }
    memory
        .data(&*caller)
        .get(ptr..ptr.saturating_add(len))
        .map(<[u8]>::to_vec)
        .ok_or(RunError::Protocol("a pointer outside the module's memory"))
}

/// Records why a host call ends the run, and traps.
fn fail(caller: &mut Caller<'_, RunState>, e: RunError) -> wasmtime::Error {
    let msg = e.to_string();
    caller.data_mut().failure = Some(e);
    wasmtime::Error::msg(msg)
}

impl Sandbox {
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .max_wasm_stack(limits.max_stack_bytes)
            // Threads are compiled out (no `threads` feature), so no shared memories.
            .wasm_multi_memory(false)
            .wasm_memory64(false)
            .cranelift_opt_level(wasmtime::OptLevel::Speed);
        // Pre-reserved instance slots whose memories start as copy-on-write images of the
        // module's data: a fresh instance per privacy unit costs microseconds.
        let mut pooling = PoolingAllocationConfig::new();
        pooling
            .total_core_instances(limits.instance_slots)
            .total_memories(limits.instance_slots)
            .total_tables(limits.instance_slots)
            .max_memory_size(limits.max_memory_bytes)
            .table_elements(limits.max_table_elements as usize);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("wasmtime engine: {e}"))?;
        let mut linker = Linker::<RunState>::new(&engine);
        linker
            .func_wrap(
                HOST_MODULE,
                IMPORT_QUERY,
                |mut caller: Caller<'_, RunState>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
                    let state = caller.data_mut();
                    if state.queries >= state.limits.max_queries_per_job {
                        return Err(fail(&mut caller, RunError::TooManyQueries));
                    }
                    state.queries += 1;
                    let limit = state.limits.max_message_bytes;
                    let bytes = guest_slice(&mut caller, ptr, len, limit)
                        .map_err(|e| fail(&mut caller, e))?;
                    let response: QueryResponse = match serde_json::from_slice::<QueryRequest>(
                        &bytes,
                    ) {
                        Ok(request) => caller.data_mut().host.query(request),
                        Err(_) => Err(QueryError {
                            code: "bad_request".into(),
                            message:
                                "the query request is not valid JSON of the contract's QueryRequest"
                                    .into(),
                        }),
                    };
                    let encoded = serde_json::to_vec(&response).map_err(|_| {
                        fail(&mut caller, RunError::Protocol("unencodable response"))
                    })?;
                    let len = encoded.len() as i32;
                    caller.data_mut().response = Some(encoded);
                    Ok(len)
                },
            )
            .and_then(|l| {
                l.func_wrap(
                    HOST_MODULE,
                    IMPORT_TAKE_RESPONSE,
                    |mut caller: Caller<'_, RunState>,
                     ptr: i32,
                     len: i32|
                     -> wasmtime::Result<i32> {
                        let Some(response) = caller.data_mut().response.take() else {
                            return Ok(-1);
                        };
                        if (len as u32 as usize) < response.len() {
                            caller.data_mut().response = Some(response);
                            return Ok(-1);
                        }
                        let memory = caller
                            .get_export(EXPORT_MEMORY)
                            .and_then(|e| e.into_memory())
                            .ok_or_else(|| {
                                fail(&mut caller, RunError::Protocol("no exported memory"))
                            })?;
                        let start = ptr as u32 as usize;
                        let n = response.len();
                        match memory
                            .data_mut(&mut caller)
                            .get_mut(start..start.saturating_add(n))
                        {
                            Some(dst) => dst.copy_from_slice(&response),
                            None => {
                                return Err(fail(
                                    &mut caller,
                                    RunError::Protocol("a pointer outside the module's memory"),
                                ));
                            }
                        }
                        Ok(n as i32)
                    },
                )
            })
            .and_then(|l| {
                l.func_wrap(
                    HOST_MODULE,
                    IMPORT_SET_OUTPUT,
                    |mut caller: Caller<'_, RunState>,
                     ptr: i32,
                     len: i32|
                     -> wasmtime::Result<i32> {
                        let limit = caller.data().limits.max_message_bytes;
                        let bytes = guest_slice(&mut caller, ptr, len, limit)
                            .map_err(|e| fail(&mut caller, e))?;
                        caller.data_mut().output = Some(bytes);
                        Ok(0)
                    },
                )
            })
            .map_err(|e| anyhow::anyhow!("linking host functions: {e}"))?;
        // Guest functions over rows reach no host function: every import traps.
        let mut functions_linker = Linker::<FnState>::new(&engine);
        for (name, _, _) in IMPORTS {
            functions_linker
                .func_wrap(
                    HOST_MODULE,
                    name,
                    |_: Caller<'_, FnState>, _: i32, _: i32| -> wasmtime::Result<i32> {
                        Err(wasmtime::Error::msg(
                            "host calls are not available to functions over rows",
                        ))
                    },
                )
                .map_err(|e| anyhow::anyhow!("linking host functions: {e}"))?;
        }
        Ok(Sandbox {
            engine,
            linker,
            functions_linker,
            limits,
            compiled: Mutex::new(HashMap::new()),
            tick: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// SHA-256 of a module, hex: its id.
    pub fn module_hash(bytes: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    }

    /// Validates and compiles a module, caching it by hash.
    pub fn validate(&self, bytes: &[u8]) -> Result<ValidatedModule, ModuleError> {
        if bytes.len() > self.limits.max_module_bytes {
            return Err(ModuleError::TooLarge {
                size: bytes.len(),
                limit: self.limits.max_module_bytes,
            });
        }
        let hash = Self::module_hash(bytes);
        if let Some(v) = self.compiled(&hash) {
            return Ok(v);
        }
        let now = self.tick.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Declared sizes first: the pooling allocator refuses to compile a module whose memory
        // or table could not fit a slot, and the limit is the clearer refusal.
        let (memory_bytes, table_elements) = declared_sizes(bytes);
        if memory_bytes > self.limits.max_memory_bytes as u64 {
            return Err(ModuleError::OverLimit {
                what: "a memory",
                limit: format!("{} bytes", self.limits.max_memory_bytes),
            });
        }
        if table_elements > self.limits.max_table_elements as u64 {
            return Err(ModuleError::OverLimit {
                what: "a table",
                limit: format!("{} elements", self.limits.max_table_elements),
            });
        }
        // Binary only: the `wat` feature is off, so text never parses. Validation happens here.
        let module = Module::from_binary(&self.engine, bytes).map_err(|_| ModuleError::Invalid)?;
        let all_i32 = |tys: &mut dyn Iterator<Item = ValType>, n: usize| {
            let v: Vec<_> = tys.collect();
            v.len() == n && v.iter().all(|t| matches!(t, ValType::I32))
        };
        for import in module.imports() {
            let expected = IMPORTS
                .iter()
                .find(|(name, _, _)| import.module() == HOST_MODULE && import.name() == *name);
            let ok = match (expected, import.ty()) {
                (Some((_, p, r)), ExternType::Func(f)) => {
                    all_i32(&mut f.params(), *p) && all_i32(&mut f.results(), *r)
                }
                _ => false,
            };
            if !ok {
                return Err(ModuleError::UnknownImport(format!(
                    "{}::{}",
                    bounded_name(import.module()),
                    bounded_name(import.name())
                )));
            }
        }
        let mut has_memory = false;
        let mut has_alloc = false;
        let mut entries = Vec::new();
        let mut udf_names = Vec::new();
        let mut blocks = Vec::new();
        let i32_frame_call =
            |f: &wasmtime::FuncType| all_i32(&mut f.params(), 2) && all_i32(&mut f.results(), 1);
        for export in module.exports() {
            match export.ty() {
                ExternType::Memory(m) if export.name() == EXPORT_MEMORY => {
                    let min_bytes = m.minimum().saturating_mul(65536);
                    if m.is_64() || m.is_shared() || min_bytes > self.limits.max_memory_bytes as u64
                    {
                        return Err(ModuleError::OverLimit {
                            what: "a memory",
                            limit: format!("{} bytes", self.limits.max_memory_bytes),
                        });
                    }
                    has_memory = true;
                }
                ExternType::Table(t) if t.minimum() > self.limits.max_table_elements as u64 => {
                    return Err(ModuleError::OverLimit {
                        what: "a table",
                        limit: format!("{} elements", self.limits.max_table_elements),
                    });
                }
                ExternType::Func(f) if export.name() == EXPORT_ALLOC => {
                    has_alloc = all_i32(&mut f.params(), 1) && all_i32(&mut f.results(), 1);
                }
                ExternType::Func(f) if export.name().starts_with(UDF_PREFIX) => {
                    let name = &export.name()[UDF_PREFIX.len()..];
                    if !function_name_ok(name) || !i32_frame_call(&f) {
                        return Err(ModuleError::InvalidFunction(format!(
                            "{:?}: a UDF export is `{UDF_PREFIX}<name>(i32, i32) -> i32`, its name lowercase letters, digits and _ (at most 64)",
                            bounded_name(name)
                        )));
                    }
                    udf_names.push(name.to_string());
                }
                ExternType::Func(f) if export.name().starts_with(BLOCK_PREFIX) => {
                    let name = &export.name()[BLOCK_PREFIX.len()..];
                    if !function_name_ok(name) || !i32_frame_call(&f) {
                        return Err(ModuleError::InvalidFunction(format!(
                            "{:?}: a block export is `{BLOCK_PREFIX}<name>(i32, i32) -> i32`, its name lowercase letters, digits and _ (at most 64)",
                            bounded_name(name)
                        )));
                    }
                    blocks.push(name.to_string());
                }
                ExternType::Func(f) => {
                    if let Some(name) = export.name().strip_prefix(ENTRY_PREFIX) {
                        let valid_name = !name.is_empty()
                            && name.len() <= 64
                            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                        if valid_name && all_i32(&mut f.params(), 2) && all_i32(&mut f.results(), 1)
                        {
                            entries.push(name.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        if !has_memory {
            return Err(ModuleError::MissingExport(format!(
                "its linear memory as `{EXPORT_MEMORY}`"
            )));
        }
        if !has_alloc {
            return Err(ModuleError::MissingExport(format!(
                "`{EXPORT_ALLOC}(i32) -> i32`"
            )));
        }
        if entries.is_empty() {
            return Err(ModuleError::MissingExport(format!(
                "at least one entry point `{ENTRY_PREFIX}<name>(i32, i32) -> i32`"
            )));
        }
        entries.sort();
        if udf_names.len() > self.limits.max_udfs as usize {
            return Err(ModuleError::OverLimit {
                what: "more UDFs than allowed",
                limit: self.limits.max_udfs.to_string(),
            });
        }
        if blocks.len() > self.limits.max_udfs as usize {
            return Err(ModuleError::OverLimit {
                what: "more block functions than allowed",
                limit: self.limits.max_udfs.to_string(),
            });
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|_| ModuleError::Invalid)?;
        let functions_pre = self
            .functions_linker
            .instantiate_pre(&module)
            .map_err(|_| ModuleError::Invalid)?;
        let udfs = self.read_udfs(&module, bytes, &functions_pre, &hash, udf_names)?;
        blocks.sort();
        let validated = ValidatedModule {
            hash: hash.clone(),
            entries,
            module,
            pre,
            functions_pre,
            udfs,
            blocks,
        };
        let mut cache = self.cache();
        while cache.len() >= self.limits.max_cached_modules.max(1) {
            let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, (_, last))| *last)
                .map(|(h, _)| h.clone())
            else {
                break;
            };
            cache.remove(&oldest);
        }
        cache.insert(hash, (validated.clone(), now));
        Ok(validated)
    }

    /// Each UDF's declared signature (read in a fresh instance), checked against its exports,
    /// and whether its per-row export writes no state.
    fn read_udfs(
        &self,
        module: &Module,
        bytes: &[u8],
        pre: &InstancePre<FnState>,
        hash: &str,
        mut names: Vec<String>,
    ) -> Result<Vec<UdfInfo>, ModuleError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        names.sort();
        let reader = GuestFunctions::new(
            pre.clone(),
            hash.to_string(),
            Vec::new(),
            Vec::new(),
            UdfMode::Unit,
            self.limits.clone(),
        );
        let pure = purity::pure_exports(bytes);
        let mut udfs = Vec::new();
        for name in names {
            let invalid = |why: String| {
                ModuleError::InvalidFunction(format!("{:?}: {why}", bounded_name(&name)))
            };
            if RESERVED_FUNCTIONS.contains(&name.as_str()) {
                return Err(invalid(
                    "is the name of a built-in function; choose another".into(),
                ));
            }
            let signature = reader.read_signature(&name).map_err(invalid)?;
            if signature.args.len() > 16 {
                return Err(invalid("takes more than 16 arguments".into()));
            }
            let default_ok = match (signature.returns, &signature.default) {
                (_, Value::Null) => true,
                (UdfType::Float64, Value::Float(_) | Value::Int(_)) => true,
                (UdfType::Int64, Value::Int(_)) => true,
                (UdfType::Boolean, Value::Bool(_)) => true,
                (UdfType::Utf8, Value::Text(t)) => t.len() <= 1024,
                _ => false,
            };
            if !default_ok {
                return Err(invalid(
                    "declares a default that is not of its return type".into(),
                ));
            }
            let row_export = format!("{ROW_PREFIX}{name}");
            let row_ok = signature.row_abi
                && !signature.takes_nulls
                && module
                    .get_export(&row_export)
                    .and_then(|e| e.func().cloned())
                    .is_some_and(|f| {
                        let wasm = |t: &UdfType| match t {
                            UdfType::Float64 => Some(ValType::F64),
                            UdfType::Int64 => Some(ValType::I64),
                            UdfType::Boolean => Some(ValType::I32),
                            UdfType::Utf8 => None,
                        };
                        let params: Vec<_> = f.params().collect();
                        let results: Vec<_> = f.results().collect();
                        params.len() == signature.args.len()
                            && params
                                .iter()
                                .zip(&signature.args)
                                .all(|(p, a)| wasm(a).is_some_and(|w| ValType::eq(p, &w)))
                            && results.len() == 1
                            && wasm(&signature.returns)
                                .is_some_and(|w| ValType::eq(&results[0], &w))
                    });
            udfs.push(UdfInfo {
                row_export: row_ok,
                pure_row: row_ok && pure.get(&row_export).copied().unwrap_or(false),
                name,
                signature,
            });
        }
        Ok(udfs)
    }

    /// The module's functions over rows, as one job runs them.
    pub fn functions(&self, module: &ValidatedModule, mode: UdfMode) -> Arc<GuestFunctions> {
        Arc::new(GuestFunctions::new(
            module.functions_pre.clone(),
            module.hash.clone(),
            module.udfs.clone(),
            module.blocks.clone(),
            mode,
            self.limits.clone(),
        ))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ValidatedModule, u64)>> {
        self.compiled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The module of content hash `hash` if it is compiled and held: validated when it was
    /// compiled, so a job of a held module neither reads its file nor hashes it again.
    pub fn compiled(&self, hash: &str) -> Option<ValidatedModule> {
        let now = self.tick.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut cache = self.cache();
        let (v, last) = cache.get_mut(hash)?;
        *last = now;
        Some(v.clone())
    }

    /// Compiled modules held now.
    pub fn cached_modules(&self) -> usize {
        self.cache().len()
    }

    /// A fresh store for one run: its own fuel, its own limiter.
    fn store(&self, host: Box<dyn Host>) -> Result<Store<RunState>, RunError> {
        let state = RunState {
            host,
            limits: self.limits.clone(),
            memory_denied: false,
            table_denied: false,
            failure: None,
            response: None,
            output: None,
            queries: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        store
            .set_fuel(self.limits.fuel_per_job)
            .map_err(|_| RunError::Protocol("fuel"))?;
        Ok(store)
    }

    /// Times `runs` fresh instantiations of a module (store, limiter, fuel, instance — what
    /// every job pays before its entry runs), in microseconds.
    pub fn time_instantiation(
        &self,
        module: &ValidatedModule,
        runs: usize,
    ) -> Result<Vec<f64>, RunError> {
        struct NoHost;
        impl Host for NoHost {
            fn query(&mut self, _: QueryRequest) -> QueryResponse {
                Err(QueryError {
                    code: "no_host".into(),
                    message: "timing only".into(),
                })
            }
        }
        let mut out = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = std::time::Instant::now();
            let mut store = self.store(Box::new(NoHost))?;
            module
                .pre
                .instantiate(&mut store)
                .map_err(|_| RunError::Protocol("instantiation failed"))?;
            out.push(started.elapsed().as_secs_f64() * 1e6);
        }
        Ok(out)
    }

    /// Runs `entry` with `params` (JSON bytes) in a fresh store; returns the module's output.
    pub fn run(
        &self,
        module: &ValidatedModule,
        entry: &str,
        params: &[u8],
        host: Box<dyn Host>,
    ) -> Result<Vec<u8>, RunError> {
        if !module.entries.iter().any(|e| e == entry) {
            return Err(RunError::UnknownEntry(bounded_name(entry)));
        }
        let mut store = self.store(host)?;
        let result = (|| -> wasmtime::Result<i32> {
            let instance = module.pre.instantiate(&mut store)?;
            let alloc = instance.get_typed_func::<i32, i32>(&mut store, EXPORT_ALLOC)?;
            let entry_fn = instance
                .get_typed_func::<(i32, i32), i32>(&mut store, &format!("{ENTRY_PREFIX}{entry}"))?;
            let memory = instance
                .get_memory(&mut store, EXPORT_MEMORY)
                .ok_or_else(|| wasmtime::Error::msg("no memory"))?;
            let len = params.len() as i32;
            let ptr = alloc.call(&mut store, len)?;
            memory.write(&mut store, ptr as u32 as usize, params)?;
            entry_fn.call(&mut store, (ptr, len))
        })();

        let state = store.data_mut();
        match result {
            Ok(rc) => {
                let output = state.output.take().unwrap_or_default();
                if rc == 0 {
                    Ok(output)
                } else {
                    let text = String::from_utf8_lossy(&output);
                    Err(RunError::GuestError(text.chars().take(1000).collect()))
                }
            }
            Err(e) => Err(if let Some(f) = state.failure.take() {
                f
            } else if state.memory_denied {
                RunError::MemoryLimit
            } else if state.table_denied {
                RunError::TableLimit
            } else {
                match e.downcast_ref::<Trap>() {
                    Some(Trap::OutOfFuel) => RunError::OutOfFuel,
                    Some(Trap::StackOverflow) => RunError::StackOverflow,
                    Some(t) => RunError::Trap(t.to_string()),
                    None => RunError::Trap("the module could not be instantiated or called".into()),
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same code under a new hash: a custom section appended.
    fn variant(n: u8) -> Vec<u8> {
        let mut wasm = crate::examples::QUERY_RUNNER.to_vec();
        wasm.extend_from_slice(&[0, 3, 1, b'v', n]);
        wasm
    }

    #[test]
    fn udfs_are_read_at_upload_and_only_state_free_row_functions_share_an_instance() {
        let sandbox = Sandbox::new(Limits::default()).unwrap();
        let q5 = sandbox.validate(crate::examples::FARE_PER_KM).unwrap();
        assert_eq!(q5.udfs.len(), 1);
        let udf = &q5.udfs[0];
        assert_eq!(udf.name, "fare_per_km");
        assert_eq!(udf.signature.args, [UdfType::Float64, UdfType::Float64]);
        assert_eq!(udf.signature.default, Value::Float(0.0));
        // Compiled by rustc from a plain division: no store, no global.set is reachable.
        assert!(udf.pure_row);
        // The hostile counter writes its static: never shared across rows.
        let hostile = sandbox.validate(crate::examples::HOSTILE).unwrap();
        let seen = hostile.udfs.iter().find(|u| u.name == "rows_seen").unwrap();
        assert!(!seen.pure_row);
        assert_eq!(
            hostile.blocks,
            ["block_huge", "block_memory", "block_spin", "block_trap"]
        );
    }

    #[test]
    fn the_compiled_module_cache_is_bounded_and_evicts_the_least_recently_used() {
        let sandbox = Sandbox::new(Limits {
            max_cached_modules: 2,
            ..Limits::default()
        })
        .unwrap();
        let (a, b, c) = (variant(1), variant(2), variant(3));
        sandbox.validate(&a).unwrap();
        sandbox.validate(&b).unwrap();
        sandbox.validate(&a).unwrap(); // a is now more recent than b
        sandbox.validate(&c).unwrap(); // evicts b
        assert_eq!(sandbox.cached_modules(), 2);
        let cached: Vec<String> = sandbox.cache().keys().cloned().collect();
        assert!(cached.contains(&Sandbox::module_hash(&a)));
        assert!(cached.contains(&Sandbox::module_hash(&c)));
        // An evicted module compiles again, to the same id and entries.
        let again = sandbox.validate(&b).unwrap();
        assert_eq!(again.hash, Sandbox::module_hash(&b));
        assert_eq!(again.entries, ["main"]);
        assert_eq!(sandbox.cached_modules(), 2);
    }
}
