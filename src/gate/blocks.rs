//! Sample-and-aggregate: a guest function the gate does not trust, released under DP.
//!
//! The rows a plain `SELECT <columns> FROM <table> [WHERE …]` picks are split by privacy unit
//! into `m` disjoint blocks — a person's rows all go to the block HMAC-SHA-256(key, person) mod
//! m names, under a key drawn from ring for each query and never shown; for row-level data each
//! row goes to a block drawn uniformly from a ChaCha stream seeded the same way. The module's
//! block function runs on each block in a fresh instance (see `sandbox::functions`), each of its
//! outputs is clamped to the declared bounds (a failed block gets the declared defaults), and
//! each output's mean over the `m` blocks is released with OpenDP's `make_mean` (sized, bounded)
//! chained to `make_laplace`.
//!
//! # Privacy
//! Adding or removing one unit changes the rows of exactly one block, so at most one of the `m`
//! clamped outputs: a symmetric distance of 2 on a vector of known size `m`, which is what the
//! OpenDP chain is asked about. This holds for any partition that depends only on the unit, so
//! it needs no trust in the function, and none in the key's secrecy (the key only keeps the
//! guest from steering people into blocks). Each output's ε is `epsilon / outputs`.

use std::collections::HashMap;

use arrow::array::{Array, ArrayRef, AsArray, UInt32Array};
use arrow::datatypes::{DataType, Int64Type};
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder, col};
use opendp::core::Measurement;
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_laplace;
use opendp::measures::MaxDivergence;
use opendp::metrics::{AbsoluteDistance, SymmetricDistance};
use rand::{Rng, SeedableRng};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use unseen_guest::contract::{
    ColumnKind, QueryRequest, Release, ReleasedColumn, SampleAggregate, Value,
};

use super::bound::MixHasher;
use super::{GateError, JobGrant, Prepared, Work};
use crate::catalog::OpenAttribute;
use crate::config::Limits;
use crate::sandbox::functions::FrameInput;

type MeanMeasurement =
    Measurement<VectorDomain<AtomDomain<f64>>, SymmetricDistance, MaxDivergence, f64>;

/// At most this many outputs per block function.
const MAX_OUTPUTS: usize = 16;
/// Output bounds beyond this magnitude are refused (the mean's float error grows with them).
const MAX_BOUND: f64 = 1e9;

struct Output {
    name: String,
    lower: f64,
    upper: f64,
    default: f64,
    measurement: MeanMeasurement,
    scale: f64,
}

/// A priced sample-and-aggregate query.
pub(super) struct BlockPlan {
    function: String,
    blocks: u32,
    /// The guest's columns, then the unit column when the unit is a person.
    plan: LogicalPlan,
    columns: usize,
    unit: Option<String>,
    outputs: Vec<Output>,
}

fn refuse(code: &'static str, message: impl Into<String>) -> GateError {
    GateError::refused(code, message)
}

const SHAPE: &str =
    "sample-and-aggregate reads SELECT <columns> FROM <table> [WHERE …], with no aggregate";

/// Checks and prices a sample-and-aggregate request (no data is read).
pub(super) fn prepare(
    grant: &JobGrant,
    plan: &LogicalPlan,
    request: &QueryRequest,
    sa: &SampleAggregate,
    limits: &Limits,
) -> Result<Prepared, GateError> {
    let guest = grant.guest.as_ref();
    if !guest.is_some_and(|g| g.blocks.iter().any(|b| *b == sa.function)) {
        return Err(refuse(
            "unknown_function",
            format!(
                "the module exports no block function {:?} (unseen_block_<name>; see unseen_guest::block!)",
                sa.function.chars().take(64).collect::<String>()
            ),
        ));
    }
    if request.rho.is_some() {
        return Err(refuse(
            "unsupported_mechanism",
            "sample-and-aggregate releases its mean with Laplace noise under ε: give \"epsilon\" instead of \"rho\"",
        ));
    }
    if request.max_rows_per_unit.is_some() || request.delta.is_some() || !request.bounds.is_empty()
    {
        return Err(refuse(
            "invalid_outputs",
            "sample-and-aggregate takes its bounds per output and needs no max_rows_per_unit or delta: each unit's rows go whole to one block",
        ));
    }
    if sa.blocks < 2 || sa.blocks > limits.max_blocks {
        return Err(refuse(
            "invalid_blocks",
            format!("blocks must be 2 to {}", limits.max_blocks),
        ));
    }
    if sa.outputs.is_empty() || sa.outputs.len() > MAX_OUTPUTS {
        return Err(refuse(
            "invalid_outputs",
            format!("give 1 to {MAX_OUTPUTS} outputs, each with a name and bounds"),
        ));
    }
    for (i, o) in sa.outputs.iter().enumerate() {
        let name_ok = !o.name.is_empty()
            && o.name.len() <= 64
            && o.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !sa.outputs[..i].iter().any(|p| p.name == o.name);
        let bounds_ok = o.lower.is_finite()
            && o.upper.is_finite()
            && o.lower < o.upper
            && o.lower.abs() <= MAX_BOUND
            && o.upper.abs() <= MAX_BOUND
            && o.default
                .is_none_or(|d| d.is_finite() && (o.lower..=o.upper).contains(&d));
        if !name_ok || !bounds_ok {
            return Err(refuse(
                "invalid_outputs",
                format!(
                    "output {i}: names are distinct letters, digits and _ (at most 64); bounds finite with lower < upper, within ±{MAX_BOUND:e}; a default inside them"
                ),
            ));
        }
    }

    // The rows: one table, filters and column selection only.
    let LogicalPlan::Projection(top) = plan else {
        return Err(refuse("unsupported_query", SHAPE));
    };
    let mut tables = Vec::new();
    super::plan::check_input(plan, grant, &mut tables)?;
    let [table] = tables.as_slice() else {
        return Err(refuse("unsupported_query", SHAPE));
    };
    let policy = &grant.datasets[table];
    if policy.open_attribute == OpenAttribute::Closed {
        return Err(super::closed(&policy.id));
    }
    let columns = top.expr.len();
    let unit = (policy.privacy_unit != "row").then(|| policy.privacy_unit.clone());
    let plan = match &unit {
        Some(unit) => {
            if top
                .input
                .schema()
                .index_of_column_by_name(None, unit)
                .is_none()
            {
                return Err(refuse("unsupported_query", SHAPE));
            }
            let mut exprs = top.expr.clone();
            exprs.push(col(unit.as_str()).alias("__unseen_unit"));
            LogicalPlanBuilder::from(top.input.as_ref().clone())
                .project(exprs)
                .and_then(|b| b.build())
                .map_err(|_| refuse("unsupported_query", SHAPE))?
        }
        None => plan.clone(),
    };

    let epsilon = request.epsilon / sa.outputs.len() as f64;
    let mut outputs = Vec::new();
    for o in &sa.outputs {
        let (measurement, scale) = calibrate(o.lower, o.upper, sa.blocks, epsilon)?;
        outputs.push(Output {
            name: o.name.clone(),
            lower: o.lower,
            upper: o.upper,
            default: o.default.unwrap_or((o.lower + o.upper) / 2.0),
            measurement,
            scale,
        });
    }
    let spent: f64 = outputs
        .iter()
        .map(|o| o.measurement.map(&2))
        .sum::<Result<f64, _>>()?;
    let mechanism = format!(
        "sample-aggregate:{}→{} over {} blocks of {}",
        sa.function,
        outputs
            .iter()
            .map(|o| format!("mean({} in [{}, {}])", o.name, o.lower, o.upper))
            .collect::<Vec<_>>()
            .join(","),
        sa.blocks,
        unit.as_deref().unwrap_or("rows"),
    );
    Ok(Prepared {
        work: Work::Blocks(BlockPlan {
            function: sa.function.clone(),
            blocks: sa.blocks,
            plan,
            columns,
            unit,
            outputs,
        }),
        charges: vec![super::Charge {
            dataset_id: policy.id.clone(),
            epsilon: spent,
            delta: 0.0,
        }],
        mechanism,
        mode: "wasm_block",
        epsilon: spent,
        delta: 0.0,
    })
}

/// OpenDP's bounded mean of `blocks` values chained to its Laplace mechanism, at the smallest
/// scale whose privacy map gives at most `epsilon` for one changed block (d_in = 2).
pub(super) fn calibrate(
    lower: f64,
    upper: f64,
    blocks: u32,
    epsilon: f64,
) -> Result<(MeanMeasurement, f64), GateError> {
    let mean = opendp::transformations::make_mean::<SymmetricDistance, f64>(
        VectorDomain::new(AtomDomain::new_closed((lower, upper))?).with_size(blocks as usize),
        SymmetricDistance,
    )?;
    let sensitivity = mean.map(&2)?;
    let mut scale = (sensitivity / epsilon).max(f64::MIN_POSITIVE);
    for _ in 0..64 {
        let chained = (mean.clone()
            >> make_laplace(
                AtomDomain::<f64>::new_non_nan(),
                AbsoluteDistance::<f64>::default(),
                scale,
                None,
            )?)?;
        if chained.map(&2)? <= epsilon {
            return Ok((chained, scale));
        }
        scale *= 1.0 + 1e-6;
    }
    Err(GateError::Mechanism(
        "could not fit the noise scale under the requested ε".into(),
    ))
}

impl BlockPlan {
    /// The released columns and their noise (the same for a release and its estimate).
    pub(super) fn columns(&self) -> Vec<ReleasedColumn> {
        self.outputs
            .iter()
            .map(|o| ReleasedColumn {
                name: o.name.clone(),
                kind: ColumnKind::BlockMean,
                noise_scale: Some(o.scale),
                ci95_half_width: Some(o.scale * 20f64.ln()),
            })
            .collect()
    }

    /// Reads the rows, runs the blocks and draws the noise. Only after the debit is durable.
    pub(super) async fn produce(
        &self,
        grant: &JobGrant,
        epsilon: f64,
        reservation: u64,
    ) -> Result<Release, GateError> {
        let failed = || {
            GateError::refused(
                "query_failed",
                "the query failed while running; its budget stays spent",
            )
        };
        let guest = grant.guest.as_ref().ok_or_else(failed)?;
        let batches = grant.session.execute(self.plan.clone()).await?.0;
        let schema = self.plan.schema().inner().clone();
        let all = arrow::compute::concat_batches(&schema, &batches).map_err(|_| failed())?;
        drop(batches);
        let block_of = self.assign(&all).ok_or_else(failed)?;

        // Rows of each block, in table order.
        let m = self.blocks as usize;
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); m];
        for (row, b) in block_of.iter().enumerate() {
            members[*b as usize].push(row as u32);
        }
        let data: Vec<ArrayRef> = (0..self.columns).map(|c| all.column(c).clone()).collect();
        let frames = members
            .iter()
            .map(|rows| {
                let idx = UInt32Array::from(rows.clone());
                let taken = data
                    .iter()
                    .map(|a| arrow::compute::take(a, &idx, None))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| failed())?;
                FrameInput::new(&taken, rows.len()).map_err(|m| refuse("unsupported_query", m))
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop((all, data, members));

        let answers = guest
            .run_blocks(&self.function, &frames, self.outputs.len())
            .map_err(|_| failed())?;
        let mut row = Vec::new();
        for (j, o) in self.outputs.iter().enumerate() {
            let values: Vec<f64> = answers
                .iter()
                .map(|a| {
                    a.as_ref()
                        .map_or(o.default, |v| v[j].clamp(o.lower, o.upper))
                })
                .collect();
            let noisy = o.measurement.invoke(&values)?;
            row.push(Value::Float(noisy.clamp(o.lower, o.upper)));
        }
        Ok(Release {
            columns: self.columns(),
            rows: vec![row],
            epsilon,
            ledger_entry: reservation,
            suppressed_groups: 0,
            delta: 0.0,
            rho: None,
            dry_run: false,
            reused: false,
        })
    }

    /// Each row's block, under a key drawn for this query alone.
    fn assign(&self, all: &arrow::record_batch::RecordBatch) -> Option<Vec<u32>> {
        let mut secret = [0u8; 32];
        SystemRandom::new().fill(&mut secret).ok()?;
        let m = self.blocks as u64;
        let rows = all.num_rows();
        if self.unit.is_none() {
            let mut stream = rand::rngs::StdRng::from_seed(secret);
            return Some(
                (0..rows)
                    .map(|_| stream.random_range(0..m) as u32)
                    .collect(),
            );
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        // Each distinct unit once, then its block by HMAC on two threads.
        let unit = all.column(self.columns);
        let mut of_row = Vec::with_capacity(rows);
        let blocks = match unit.data_type() {
            t if t.is_integer() => {
                let ints = arrow::compute::cast(unit, &DataType::Int64).ok()?;
                let ints = ints.as_primitive::<Int64Type>();
                let mut seen: HashMap<i64, u32, MixHasher> = HashMap::default();
                let mut distinct: Vec<[u8; 8]> = Vec::new();
                for i in 0..rows {
                    // A null unit is one more unit of its own: all null rows share a block.
                    let v = if ints.is_null(i) {
                        i64::MIN
                    } else {
                        ints.value(i)
                    };
                    of_row.push(*seen.entry(v).or_insert_with(|| {
                        distinct.push(v.to_le_bytes());
                        distinct.len() as u32 - 1
                    }));
                }
                keyed_blocks(&key, &distinct, m)
            }
            _ => {
                let text = arrow::compute::cast(unit, &DataType::Utf8).ok()?;
                let text = text.as_string::<i32>();
                let mut seen: HashMap<&str, u32> = HashMap::new();
                let mut distinct: Vec<&str> = Vec::new();
                for i in 0..rows {
                    let v = if text.is_null(i) { "" } else { text.value(i) };
                    of_row.push(*seen.entry(v).or_insert_with(|| {
                        distinct.push(v);
                        distinct.len() as u32 - 1
                    }));
                }
                keyed_blocks(&key, &distinct, m)
            }
        };
        let out = of_row
            .iter()
            .map(|&d| blocks[d as usize])
            .collect::<Vec<u32>>();
        Some(out)
    }
}

/// HMAC-SHA-256(key, unit) mod m for each unit, on two threads.
fn keyed_blocks<K: AsRef<[u8]> + Sync>(key: &hmac::Key, units: &[K], m: u64) -> Vec<u32> {
    let block = |unit: &K| {
        let tag = hmac::sign(key, unit.as_ref());
        (u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("8 bytes")) % m) as u32
    };
    let (left, right) = units.split_at(units.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| right.iter().map(block).collect::<Vec<u32>>());
        let mut mine: Vec<u32> = left.iter().map(block).collect();
        // A panicked thread cannot happen here (no code in it can panic); were it to, its units
        // would fall to block 0, still a function of the unit alone.
        mine.extend(other.join().unwrap_or_else(|_| vec![0; right.len()]));
        mine
    })
}
