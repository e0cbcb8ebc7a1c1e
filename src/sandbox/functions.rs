//! Guest code over rows: a module's scalar UDFs, registered into the job's DataFusion session,
//! and its sample-and-aggregate block functions. Rows cross into the guest as frames (one bulk
//! copy per call, see [`unseen_guest::frame`]), into instances that can reach no host function
//! (the three imports trap here), with fuel, memory and table limits per call.
//!
//! Isolation, which the privacy guarantee rests on:
//! - **Unit mode** (the default): no state can carry one row's data into another row's result.
//!   Each row is evaluated in a fresh instance (pooled slots, copy-on-write memory), except
//!   when the UDF's per-row export provably writes no instance state ([`super::purity`]): then
//!   one instance serves every row, which is the same thing, with its fuel reset per row.
//! - **Batch mode**, for modules an operator reviewed: a batch of rows per call, into instances
//!   kept warm from batch to batch of the job (so state can cross rows and batches).
//!
//! A call that traps, runs out of fuel or memory, or answers a malformed frame yields the
//! declared default for its rows (in batch mode the batch is retried row by row first), so a
//! failure depends on one row at most and is never reported. Only a failure to instantiate
//! (the pool is full — independent of the data) fails the query.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, StringArray};
use arrow::buffer::{Buffer, NullBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::{Result as DfResult, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use unseen_guest::contract::{
    BLOCK_PREFIX, EXPORT_ALLOC, EXPORT_MEMORY, ROW_PREFIX, SIGNATURE_PREFIX, UDF_PREFIX,
    UdfSignature, UdfType, Value,
};
use unseen_guest::frame;
use wasmtime::{InstancePre, ResourceLimiter, Store, Val};

use crate::config::Limits;

/// What a guest function instance may hold.
pub struct FnState {
    max_memory: usize,
    max_table: usize,
}

impl ResourceLimiter for FnState {
    fn memory_growing(
        &mut self,
        _: usize,
        desired: usize,
        _: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.max_memory)
    }

    fn table_growing(
        &mut self,
        _: usize,
        desired: usize,
        _: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.max_table)
    }
}

/// How a module's UDFs run, recorded in the ledger with each release that used them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UdfMode {
    /// No state crosses rows (the default).
    Unit,
    /// One instance per batch: only for modules the scenario's operator marked reviewed.
    Batch,
}

impl UdfMode {
    pub fn as_str(self) -> &'static str {
        match self {
            UdfMode::Unit => "wasm_unit",
            UdfMode::Batch => "wasm_batch",
        }
    }
}

/// One exported UDF.
#[derive(Debug, Clone)]
pub struct UdfInfo {
    pub name: String,
    pub signature: UdfSignature,
    /// The per-row export (native arguments, no frame) exists with the declared types.
    pub row_export: bool,
    /// ... and writes no instance state, so one instance may serve every row.
    pub pure_row: bool,
}

/// Why a guest call gave no usable answer.
#[derive(Debug)]
pub(crate) enum CallError {
    /// No instance could be made (the pool is full): not the data's doing; the query fails.
    Instantiate,
    /// The guest trapped, ran out of fuel or memory, or answered garbage: the default.
    Guest,
}

/// An instance with its store.
struct Warm {
    store: Store<FnState>,
    instance: wasmtime::Instance,
}

impl Warm {
    /// Runs `export` over `input` with `fuel`. The frame is written straight into the guest's
    /// memory and its answer read where the guest left it, by `read` (`None`: malformed).
    fn call<T>(
        &mut self,
        export: &str,
        input: &FrameInput,
        fuel: u64,
        limits: &Limits,
        read: impl FnOnce(&[u8]) -> Option<T>,
    ) -> Result<T, CallError> {
        let Warm { store, instance } = self;
        let _ = store.set_fuel(fuel);
        let guest = |_| CallError::Guest;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut *store, EXPORT_ALLOC)
            .map_err(guest)?;
        let function = instance
            .get_typed_func::<(i32, i32), i32>(&mut *store, export)
            .map_err(guest)?;
        let memory = instance
            .get_memory(&mut *store, EXPORT_MEMORY)
            .ok_or(CallError::Guest)?;
        let len = i32::try_from(input.len()).map_err(|_| CallError::Guest)?;
        let ptr = alloc.call(&mut *store, len).map_err(guest)?;
        let at = ptr as u32 as usize;
        let buffer = memory
            .data_mut(&mut *store)
            .get_mut(at..at.saturating_add(input.len()))
            .ok_or(CallError::Guest)?;
        input.write(buffer);
        let out = function.call(&mut *store, (ptr, len)).map_err(guest)?;
        if out < 0 {
            return Err(CallError::Guest);
        }
        let data = memory.data(&*store);
        let at = out as u32 as usize;
        let n = data
            .get(at..at.saturating_add(4))
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or(CallError::Guest)?;
        if n > limits.max_message_bytes.max(input.len() * 2) {
            return Err(CallError::Guest);
        }
        data.get(at + 4..(at + 4).saturating_add(n))
            .and_then(read)
            .ok_or(CallError::Guest)
    }
}

/// Instances kept between batches in batch mode: one per core.
const WARM_INSTANCES: usize = 2;

/// A module's guest functions as one job may run them.
#[derive(Clone)]
pub struct GuestFunctions {
    pre: InstancePre<FnState>,
    pub hash: String,
    pub udfs: Vec<UdfInfo>,
    pub blocks: Vec<String>,
    pub mode: UdfMode,
    limits: Limits,
    /// Batch mode only: instances reused from batch to batch of the job (a reviewed module's
    /// state may cross batches; see the module docs).
    warm: Arc<std::sync::Mutex<Vec<Warm>>>,
}

impl std::fmt::Debug for GuestFunctions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestFunctions")
            .field("hash", &self.hash)
            .field("udfs", &self.udfs)
            .field("blocks", &self.blocks)
            .field("mode", &self.mode)
            .finish()
    }
}

/// Fuel for reading a signature at upload.
const SIGNATURE_FUEL: u64 = 10_000_000;
/// Longest signature JSON.
const MAX_SIGNATURE_BYTES: usize = 64 << 10;

impl GuestFunctions {
    pub(crate) fn new(
        pre: InstancePre<FnState>,
        hash: String,
        udfs: Vec<UdfInfo>,
        blocks: Vec<String>,
        mode: UdfMode,
        limits: Limits,
    ) -> Self {
        GuestFunctions {
            pre,
            hash,
            udfs,
            blocks,
            mode,
            limits,
            warm: Arc::default(),
        }
    }

    fn store(&self, fuel: u64) -> Store<FnState> {
        let mut store = Store::new(
            self.pre.module().engine(),
            FnState {
                max_memory: self.limits.max_memory_bytes,
                max_table: self.limits.max_table_elements as usize,
            },
        );
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        // Fuel is on in the engine, so this cannot fail.
        let _ = store.set_fuel(fuel);
        store
    }

    /// Every row in a fresh instance, even for row functions proven state-free (to measure
    /// what the proof saves).
    pub fn without_shared_instances(mut self) -> Self {
        self.udfs.iter_mut().for_each(|u| u.pure_row = false);
        self
    }

    /// Times `runs` fresh instances (store, fuel, limiter, instance from the pool: what unit
    /// mode pays per row and sample-and-aggregate per block), in microseconds.
    pub fn time_instantiation(&self, runs: usize) -> Result<Vec<f64>, String> {
        let mut out = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = std::time::Instant::now();
            let mut store = self.store(1_000_000);
            self.pre
                .instantiate(&mut store)
                .map_err(|_| "no instance slot".to_string())?;
            drop(store);
            out.push(started.elapsed().as_secs_f64() * 1e6);
        }
        Ok(out)
    }

    /// Runs `export` over a frame in a fresh instance: what `read` makes of its answer.
    fn call_fresh<T>(
        &self,
        export: &str,
        input: &FrameInput,
        fuel: u64,
        read: impl FnOnce(&[u8]) -> Option<T>,
    ) -> Result<T, CallError> {
        self.instance()?
            .call(export, input, fuel, &self.limits, read)
    }

    /// A fresh instance from the pool.
    fn instance(&self) -> Result<Warm, CallError> {
        let mut store = self.store(0);
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|_| CallError::Instantiate)?;
        Ok(Warm { store, instance })
    }

    /// Reads a UDF's declared signature (at upload).
    pub(crate) fn read_signature(&self, name: &str) -> Result<UdfSignature, String> {
        let Warm {
            mut store,
            instance,
        } = self
            .instance()
            .map_err(|_| "the module could not be instantiated".to_string())?;
        let _ = store.set_fuel(SIGNATURE_FUEL);
        let sig = instance
            .get_typed_func::<(), i64>(&mut store, &format!("{SIGNATURE_PREFIX}{name}"))
            .map_err(|_| format!("it has no `{SIGNATURE_PREFIX}{name}() -> i64` export"))?;
        let packed = sig
            .call(&mut store, ())
            .map_err(|_| "its signature export failed".to_string())?;
        let (ptr, len) = ((packed >> 32) as u32 as usize, packed as u32 as usize);
        if len > MAX_SIGNATURE_BYTES {
            return Err("its signature is too long".into());
        }
        let memory = instance
            .get_memory(&mut store, EXPORT_MEMORY)
            .ok_or("the module exports no memory")?;
        let bytes = memory
            .data(&store)
            .get(ptr..ptr.saturating_add(len))
            .ok_or("its signature lies outside memory")?;
        serde_json::from_slice(bytes).map_err(|_| "its signature is not valid JSON".into())
    }

    /// The module's UDFs as DataFusion functions, for one job's session.
    pub fn scalar_udfs(self: &Arc<Self>) -> Vec<ScalarUDF> {
        (0..self.udfs.len())
            .map(|index| {
                let s = &self.udfs[index].signature;
                ScalarUDF::new_from_impl(WasmUdf {
                    functions: self.clone(),
                    index,
                    signature: Signature::exact(
                        s.args.iter().map(|t| arrow_type(*t)).collect(),
                        Volatility::Immutable,
                    ),
                })
            })
            .collect()
    }

    fn evaluate(&self, udf: &UdfInfo, args: &[ArrayRef], rows: usize) -> DfResult<ArrayRef> {
        if self.mode == UdfMode::Batch {
            match self.batch(udf, args, rows) {
                Ok(array) => return Ok(array),
                Err(CallError::Instantiate) => return exec_err!("no wasm instance slot"),
                // Retried row by row, so only the rows that fail get the default.
                Err(CallError::Guest) => {}
            }
        }
        self.per_row(udf, args, rows)
    }

    fn batch(&self, udf: &UdfInfo, args: &[ArrayRef], rows: usize) -> Result<ArrayRef, CallError> {
        let input = FrameInput::new(args, rows).map_err(|_| CallError::Guest)?;
        let fuel = self
            .limits
            .udf_fuel_per_row
            .saturating_mul(rows.max(1) as u64);
        let pooled = self.warm.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut warm = match pooled {
            Some(w) => w,
            None => self.instance()?,
        };
        let answer = warm.call(
            &format!("{UDF_PREFIX}{}", udf.name),
            &input,
            fuel,
            &self.limits,
            |out| decode_result(out, udf.signature.returns, rows),
        );
        // An instance that failed is not reused.
        if answer.is_ok() {
            let mut warm_list = self.warm.lock().unwrap_or_else(|p| p.into_inner());
            if warm_list.len() < WARM_INSTANCES {
                warm_list.push(warm);
            }
        }
        answer
    }

    /// The common shapes of a shared-instance UDF (one or two float arguments, a float
    /// result) through typed calls, a few ns each; `None` for any other shape.
    fn typed_floats(
        &self,
        udf: &UdfInfo,
        function: wasmtime::Func,
        store: &mut Store<FnState>,
        args: &[ArrayRef],
        rows: usize,
    ) -> DfResult<Option<ArrayRef>> {
        let floats: Vec<&Float64Array> = args
            .iter()
            .filter_map(|a| a.as_primitive_opt::<Float64Type>())
            .collect();
        let float_result = udf.signature.returns == UdfType::Float64;
        if !(float_result && floats.len() == args.len() && (1..=2).contains(&floats.len())) {
            return Ok(None);
        }
        let changed = |_| {
            datafusion::error::DataFusionError::Execution("the UDF's row export changed".into())
        };
        let mut call: Box<dyn FnMut(&mut Store<FnState>, usize) -> wasmtime::Result<f64>> =
            if let [x, y] = floats.as_slice() {
                let f = function
                    .typed::<(f64, f64), f64>(&*store)
                    .map_err(changed)?;
                let (x, y) = (*x, *y);
                Box::new(move |s, row| f.call(s, (x.value(row), y.value(row))))
            } else {
                let f = function.typed::<f64, f64>(&*store).map_err(changed)?;
                let x = floats[0];
                Box::new(move |s, row| f.call(s, x.value(row)))
            };
        let default = udf.signature.default.as_f64();
        let values: Vec<Option<f64>> = (0..rows)
            .map(|row| {
                if floats.iter().any(|a| a.is_null(row)) {
                    return None;
                }
                let _ = store.set_fuel(self.limits.udf_fuel_per_row);
                call(store, row).ok().or(default)
            })
            .collect();
        Ok(Some(Arc::new(Float64Array::from(values))))
    }

    fn per_row(&self, udf: &UdfInfo, args: &[ArrayRef], rows: usize) -> DfResult<ArrayRef> {
        let mut out = Results::new(udf.signature.returns, rows);
        if udf.row_export {
            let export = format!("{ROW_PREFIX}{}", udf.name);
            // A proven state-free function gets one instance for every row (see purity.rs);
            // any other a fresh one per row, called through the same native export.
            let mut shared = if udf.pure_row {
                let Ok(warm) = self.instance() else {
                    return exec_err!("no wasm instance slot");
                };
                Some(warm)
            } else {
                None
            };
            if let Some(Warm { store, instance }) = &mut shared {
                let Some(function) = instance.get_func(&mut *store, &export) else {
                    return exec_err!("the UDF's row export vanished");
                };
                if let Some(values) = self.typed_floats(udf, function, store, args, rows)? {
                    return Ok(values);
                }
            }
            let mut params = vec![Val::I32(0); args.len()];
            let mut result = [Val::I32(0)];
            'rows: for row in 0..rows {
                for (param, array) in params.iter_mut().zip(args) {
                    if array.is_null(row) {
                        out.push_null();
                        continue 'rows;
                    }
                    *param = wasm_value(array, row);
                }
                let mut fresh;
                let warm = match &mut shared {
                    Some(warm) => warm,
                    None => {
                        let Ok(warm) = self.instance() else {
                            return exec_err!("no wasm instance slot");
                        };
                        fresh = warm;
                        &mut fresh
                    }
                };
                let Warm { store, instance } = warm;
                let _ = store.set_fuel(self.limits.udf_fuel_per_row);
                let called = instance
                    .get_func(&mut *store, &export)
                    .map(|f| f.call(&mut *store, &params, &mut result));
                match called {
                    Some(Ok(())) => out.push_val(&result[0], &udf.signature.default),
                    _ => out.push_value(&udf.signature.default),
                }
            }
        } else {
            let export = format!("{UDF_PREFIX}{}", udf.name);
            for row in 0..rows {
                let one: Vec<ArrayRef> = args.iter().map(|a| a.slice(row, 1)).collect();
                let answer = FrameInput::new(&one, 1)
                    .map_err(|_| CallError::Guest)
                    .and_then(|input| {
                        self.call_fresh(&export, &input, self.limits.udf_fuel_per_row, |b| {
                            decode_result(b, udf.signature.returns, 1)
                        })
                    });
                match answer {
                    Ok(array) => out.push_array(&array),
                    Err(CallError::Guest) => out.push_value(&udf.signature.default),
                    Err(CallError::Instantiate) => return exec_err!("no wasm instance slot"),
                }
            }
        }
        Ok(out.finish())
    }

    /// Runs the block function `function` over each frame, each in a fresh instance, on two
    /// threads. `None` for a block whose call failed or answered other than `outputs` finite
    /// numbers.
    pub(crate) fn run_blocks(
        &self,
        function: &str,
        frames: &[FrameInput],
        outputs: usize,
    ) -> Result<Vec<Option<Vec<f64>>>, CallError> {
        let export = format!("{BLOCK_PREFIX}{function}");
        let run = |frames: &[FrameInput]| -> Result<Vec<Option<Vec<f64>>>, CallError> {
            frames
                .iter()
                .map(|f| {
                    let read = |bytes: &[u8]| Some(block_values(bytes, outputs));
                    match self.call_fresh(&export, f, self.limits.block_fuel, read) {
                        Ok(values) => Ok(values),
                        Err(CallError::Guest) => Ok(None),
                        Err(CallError::Instantiate) => Err(CallError::Instantiate),
                    }
                })
                .collect()
        };
        let (left, right) = frames.split_at(frames.len() / 2);
        let (mut a, b) = std::thread::scope(|scope| {
            let other = scope.spawn(|| run(right));
            let mine = run(left);
            (mine, other.join().unwrap_or(Err(CallError::Instantiate)))
        });
        if let (Ok(a), Ok(b)) = (&mut a, b) {
            a.extend(b);
        } else {
            return Err(CallError::Instantiate);
        }
        a
    }
}

fn block_values(bytes: &[u8], outputs: usize) -> Option<Vec<f64>> {
    let (rows, columns) = frame::view(bytes).ok()?;
    match columns.as_slice() {
        [c] if rows == outputs && !c.has_nulls() => {
            let values: Option<Vec<f64>> = (0..rows).map(|i| c.f64(i)).collect();
            values.filter(|v| v.iter().all(|x| x.is_finite()))
        }
        _ => None,
    }
}

pub fn arrow_type(t: UdfType) -> DataType {
    match t {
        UdfType::Float64 => DataType::Float64,
        UdfType::Int64 => DataType::Int64,
        UdfType::Boolean => DataType::Boolean,
        UdfType::Utf8 => DataType::Utf8,
    }
}

fn wasm_value(array: &ArrayRef, row: usize) -> Val {
    match array.data_type() {
        DataType::Float64 => Val::F64(array.as_primitive::<Float64Type>().value(row).to_bits()),
        DataType::Int64 => Val::I64(array.as_primitive::<Int64Type>().value(row)),
        DataType::Boolean => Val::I32(array.as_boolean().value(row) as i32),
        _ => Val::I32(0),
    }
}

/// Arrow arrays ready to be written as a frame: Float64/Int64 values are copied as they lie in
/// memory, other integer and float types widened, strings as offsets and bytes. The frame's
/// length is known before writing, so it can go straight into a guest's memory.
pub struct FrameInput {
    rows: usize,
    columns: Vec<(UdfType, ArrayRef)>,
    len: usize,
}

impl FrameInput {
    /// Refuses types other than numbers, booleans and strings.
    pub fn new(arrays: &[ArrayRef], rows: usize) -> Result<Self, String> {
        let mut len = 8;
        let mut columns = Vec::with_capacity(arrays.len());
        for array in arrays {
            let array: ArrayRef = match array.data_type() {
                DataType::Float64 | DataType::Int64 | DataType::Boolean | DataType::Utf8 => {
                    array.clone()
                }
                DataType::Float32 => cast(array, &DataType::Float64)?,
                DataType::Utf8View | DataType::LargeUtf8 => cast(array, &DataType::Utf8)?,
                t if t.is_integer() => cast(array, &DataType::Int64)?,
                t => {
                    return Err(format!(
                        "columns of type {t} cannot be passed to guest code"
                    ));
                }
            };
            if array.len() != rows {
                return Err("a column of the wrong length".into());
            }
            let tag = match array.data_type() {
                DataType::Float64 => UdfType::Float64,
                DataType::Int64 => UdfType::Int64,
                DataType::Boolean => UdfType::Boolean,
                _ => UdfType::Utf8,
            };
            len += 2 + if array.null_count() > 0 { rows } else { 0 };
            len += match tag {
                UdfType::Float64 | UdfType::Int64 => rows * 8,
                UdfType::Boolean => rows,
                UdfType::Utf8 => {
                    let s = array.as_string::<i32>();
                    let o = s.value_offsets();
                    (rows + 1) * 4 + (o[rows] - o[0]) as usize
                }
            };
            columns.push((tag, array));
        }
        Ok(FrameInput { rows, columns, len })
    }

    /// The frame's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Writes the frame into `out`, which is exactly [`Self::len`] bytes.
    pub fn write(&self, out: &mut [u8]) {
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&(self.rows as u32).to_le_bytes());
        put(&(self.columns.len() as u32).to_le_bytes());
        let rows = self.rows;
        for (tag, array) in &self.columns {
            put(&[frame::type_tag(*tag), (array.null_count() > 0) as u8]);
            if array.null_count() > 0 {
                (0..rows).for_each(|i| put(&[array.is_valid(i) as u8]));
            }
            match tag {
                // Arrow keeps values little-endian on little-endian hosts: one copy of the buffer.
                UdfType::Float64 if cfg!(target_endian = "little") => {
                    put(array.as_primitive::<Float64Type>().values().inner());
                }
                UdfType::Int64 if cfg!(target_endian = "little") => {
                    put(array.as_primitive::<Int64Type>().values().inner());
                }
                UdfType::Float64 => {
                    for v in array.as_primitive::<Float64Type>().values().iter() {
                        put(&v.to_le_bytes());
                    }
                }
                UdfType::Int64 => {
                    for v in array.as_primitive::<Int64Type>().values().iter() {
                        put(&v.to_le_bytes());
                    }
                }
                UdfType::Boolean => {
                    let b = array.as_boolean();
                    (0..rows).for_each(|i| put(&[b.value(i) as u8]));
                }
                UdfType::Utf8 => {
                    let s = array.as_string::<i32>();
                    let offsets = s.value_offsets();
                    let base = offsets[0];
                    for o in offsets {
                        put(&((o - base) as u32).to_le_bytes());
                    }
                    put(&s.value_data()[base as usize..offsets[rows] as usize]);
                }
            }
        }
        debug_assert_eq!(at, self.len);
    }

    /// The frame as bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len];
        self.write(&mut out);
        out
    }
}

fn cast(array: &ArrayRef, to: &DataType) -> Result<ArrayRef, String> {
    arrow::compute::cast(array, to).map_err(|_| format!("cannot pass a column as {to}"))
}

/// A UDF's answer frame, read where it lies, as an Arrow array: exactly `rows` values of the
/// declared type. Numbers are copied once, in bulk, into the array's buffer.
fn decode_result(bytes: &[u8], returns: UdfType, rows: usize) -> Option<ArrayRef> {
    let (n, columns) = frame::view(bytes).ok()?;
    let [column] = columns.as_slice() else {
        return None;
    };
    if n != rows || column.ty != returns {
        return None;
    }
    let nulls = column
        .valid_bytes()
        .map(|v| NullBuffer::from_iter(v.iter().map(|&b| b != 0)));
    let fixed = || -> Buffer {
        if cfg!(target_endian = "little") {
            Buffer::from_slice_ref(column.fixed_bytes())
        } else {
            let words = column.fixed_bytes().chunks_exact(8);
            Buffer::from_iter(words.map(|w| u64::from_le_bytes(w.try_into().expect("8"))))
        }
    };
    Some(match returns {
        UdfType::Float64 => Arc::new(Float64Array::new(
            ScalarBuffer::new(fixed(), 0, rows),
            nulls,
        )),
        UdfType::Int64 => Arc::new(Int64Array::new(ScalarBuffer::new(fixed(), 0, rows), nulls)),
        UdfType::Boolean => Arc::new(BooleanArray::new(
            (0..rows).map(|i| column.bool(i).unwrap_or(false)).collect(),
            nulls,
        )),
        UdfType::Utf8 => Arc::new(StringArray::from_iter((0..rows).map(|i| column.str(i)))),
    })
}

/// A UDF's results, row by row.
enum Results {
    Float64(Vec<Option<f64>>),
    Int64(Vec<Option<i64>>),
    Boolean(Vec<Option<bool>>),
    Utf8(Vec<Option<String>>),
}

impl Results {
    fn new(t: UdfType, rows: usize) -> Self {
        match t {
            UdfType::Float64 => Results::Float64(Vec::with_capacity(rows)),
            UdfType::Int64 => Results::Int64(Vec::with_capacity(rows)),
            UdfType::Boolean => Results::Boolean(Vec::with_capacity(rows)),
            UdfType::Utf8 => Results::Utf8(Vec::with_capacity(rows)),
        }
    }

    fn push_null(&mut self) {
        match self {
            Results::Float64(v) => v.push(None),
            Results::Int64(v) => v.push(None),
            Results::Boolean(v) => v.push(None),
            Results::Utf8(v) => v.push(None),
        }
    }

    /// A declared value (a default), already checked against the type at upload.
    fn push_value(&mut self, value: &Value) {
        match (self, value) {
            (Results::Float64(v), x) => v.push(x.as_f64()),
            (Results::Int64(v), Value::Int(i)) => v.push(Some(*i)),
            (Results::Boolean(v), Value::Bool(b)) => v.push(Some(*b)),
            (Results::Utf8(v), Value::Text(s)) => v.push(Some(s.clone())),
            (this, _) => this.push_null(),
        }
    }

    fn push_val(&mut self, val: &Val, default: &Value) {
        match (&mut *self, val) {
            (Results::Float64(v), Val::F64(bits)) => v.push(Some(f64::from_bits(*bits))),
            (Results::Int64(v), Val::I64(i)) => v.push(Some(*i)),
            (Results::Boolean(v), Val::I32(i)) => v.push(Some(*i != 0)),
            _ => self.push_value(default),
        }
    }

    fn push_array(&mut self, array: &ArrayRef) {
        if array.is_null(0) {
            return self.push_null();
        }
        match self {
            Results::Float64(v) => v.push(Some(array.as_primitive::<Float64Type>().value(0))),
            Results::Int64(v) => v.push(Some(array.as_primitive::<Int64Type>().value(0))),
            Results::Boolean(v) => v.push(Some(array.as_boolean().value(0))),
            Results::Utf8(v) => v.push(Some(array.as_string::<i32>().value(0).to_string())),
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Results::Float64(v) => Arc::new(Float64Array::from(v)),
            Results::Int64(v) => Arc::new(Int64Array::from(v)),
            Results::Boolean(v) => Arc::new(BooleanArray::from(v)),
            Results::Utf8(v) => Arc::new(StringArray::from(v)),
        }
    }
}

/// A guest UDF in a DataFusion session.
#[derive(Debug)]
pub struct WasmUdf {
    functions: Arc<GuestFunctions>,
    index: usize,
    signature: Signature,
}

impl WasmUdf {
    /// The mode this UDF runs in (what the ledger records).
    pub fn mode(&self) -> UdfMode {
        self.functions.mode
    }

    fn info(&self) -> &UdfInfo {
        &self.functions.udfs[self.index]
    }
}

impl PartialEq for WasmUdf {
    fn eq(&self, other: &Self) -> bool {
        self.functions.hash == other.functions.hash
            && self.index == other.index
            && self.functions.mode == other.functions.mode
    }
}

impl Eq for WasmUdf {}

impl Hash for WasmUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.functions.hash.hash(state);
        self.index.hash(state);
        self.functions.mode.hash(state);
    }
}

impl ScalarUDFImpl for WasmUdf {
    fn name(&self) -> &str {
        &self.info().name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(arrow_type(self.info().signature.returns))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let arrays: Vec<ArrayRef> = arrays
            .into_iter()
            .map(|a| {
                if a.len() == rows {
                    a
                } else {
                    // A scalar argument expanded to one row: repeat it.
                    let idx = arrow::array::UInt32Array::from(vec![0u32; rows]);
                    arrow::compute::take(&a, &idx, None).unwrap_or(a)
                }
            })
            .collect();
        Ok(ColumnarValue::Array(self.functions.evaluate(
            self.info(),
            &arrays,
            rows,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unseen_guest::frame::Data;

    fn encode_arrays(arrays: &[ArrayRef], rows: usize) -> Result<Vec<u8>, String> {
        Ok(FrameInput::new(arrays, rows)?.to_vec())
    }

    #[test]
    fn arrow_columns_encode_to_frames_the_guest_decodes_exactly() {
        let f: ArrayRef = Arc::new(Float64Array::from(vec![Some(1.5), None, Some(-2.0)]));
        let i: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
        let s: ArrayRef = Arc::new(StringArray::from(vec!["a", "bc", "d"]));
        // A slice: offsets no longer start at zero.
        let s = s.slice(0, 3);
        let b: ArrayRef = Arc::new(BooleanArray::from(vec![true, false, true]));
        let bytes = encode_arrays(&[f, i, s.slice(0, 3), b], 3).unwrap();
        let (rows, columns) = frame::decode(&bytes).unwrap();
        assert_eq!(rows, 3);
        assert_eq!(columns[0].data, Data::Float64(vec![1.5, 0.0, -2.0]));
        assert_eq!(columns[0].valid, Some(vec![true, false, true]));
        assert_eq!(columns[1].data, Data::Int64(vec![1, 2, 3]));
        assert_eq!(
            columns[2].data,
            Data::Utf8(vec!["a".into(), "bc".into(), "d".into()])
        );
        assert_eq!(columns[3].data, Data::Boolean(vec![true, false, true]));
        let sliced: ArrayRef = Arc::new(StringArray::from(vec!["x", "yy", "zzz"]));
        let bytes = encode_arrays(&[sliced.slice(1, 2)], 2).unwrap();
        let (_, columns) = frame::decode(&bytes).unwrap();
        assert_eq!(columns[0].data, Data::Utf8(vec!["yy".into(), "zzz".into()]));
    }
}
