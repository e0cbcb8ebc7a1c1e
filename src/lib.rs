//! unseen: compute on sensitive public data without seeing it.
//!
//! Licensed developers upload WebAssembly modules; the modules ask for differentially private
//! aggregates over tables held in the domain; an egress gate adds OpenDP noise, enforces the
//! scenario's whitelist and minimum group size, and debits a signed, hash-chained ledger before
//! anything leaves.
//!
//! # Layout
//!
//! One module per box of DESIGN.md's picture; dependencies point down the list.
//!
//! - [`api`] — HTTP (axum): the endpoint table (router, OpenAPI document and audit actions are
//!   built from it), authentication, roles, the JSON error table. Knows everything.
//! - [`client`] — the CLI's client for a running server (operator and auditor tasks).
//! - [`demo`] — the end-to-end walk-through behind `unseen demo`, and the synthetic trips data.
//! - [`bench`] — `unseen bench`: the shared workloads through the gate and in plain DataFusion.
//! - [`jobs`] — runs a job: a module in the [`sandbox`] whose queries go to the [`gate`].
//! - [`sandbox`] — wasmtime: validates modules, runs entries under fuel and memory limits.
//!   Knows nothing of HTTP, SQL or privacy; it calls a [`sandbox::Host`] for queries.
//! - [`gate`] — the only code that turns data into something a module may see. Checks a query
//!   against the scenario, computes exact aggregates through [`engine`], debits the [`ledger`],
//!   then adds OpenDP noise. Does not know `api` or `sandbox`.
//! - [`engine`] — DataFusion sessions holding only a scenario's tables, with no DDL, DML,
//!   files, URLs or table functions. Returns exact aggregates only to the gate.
//! - [`ledger`] — privacy-budget debits: atomic cap checks, SHA-256 chain, Ed25519 signatures.
//! - [`scenario`] — applications and approvals: who may compute what, with how much ε.
//! - [`catalog`] — datasets, their policies (bounds, public keys, budgets, open attribute),
//!   seeded from `policies/`; objections to them.
//! - [`principal`] — developers, operators, auditors and their hashed tokens.
//! - [`audit`] — who did what, when, with what outcome: a hash chain with signed heads.
//! - [`store`] — the SQLite file every module above keeps its state in.
//! - [`config`] — the server's settings and the typed [`config::Limits`].
//!
//! # Invariants held by construction
//!
//! - No type that holds raw rows is `Serialize`; exact aggregates live in
//!   `engine::ExactAggregate`, which only the gate reads. The only way data reaches a module
//!   is a [`unseen_guest::Release`], and only [`gate::Gate::release`] builds one with rows (a
//!   dry run's estimate has none; a reused release is an earlier one read back).
//! - A release exists only after its ledger debit is committed (WAL, `synchronous=FULL`).
//! - Noise and secure randomness come from OpenDP (with OpenSSL) and ring; nothing here samples
//!   noise. The one other random choice — which *k* rows of a person the gate keeps — draws
//!   from rand's `StdRng` seeded per query from ring (`gate/bound.rs`).
//! - Clients never see a DataFusion or wasmtime error string that ran over data: those become
//!   fixed messages with stable codes.

pub mod api;
pub mod audit;
pub mod bench;
pub mod catalog;
pub mod client;
pub mod config;
pub mod demo;
pub mod engine;
pub mod gate;
pub mod jobs;
pub mod ledger;
pub mod principal;
pub mod sandbox;
pub mod scenario;
pub mod store;

/// The example modules compiled by `build.rs` from `examples/`, embedded for the demo and tests.
pub mod examples {
    /// `examples/district_stats`: WORKLOADS.md's Q1, post-processed into a report.
    pub const DISTRICT_STATS: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/district_stats.wasm"));
    /// `examples/query_runner`: runs the queries named in its params; returns each release or refusal.
    pub const QUERY_RUNNER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/query_runner.wasm"));
    /// `examples/fare_per_km`: WORKLOADS.md's Q5, a mean of the module's own UDF per cell.
    pub const FARE_PER_KM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fare_per_km.wasm"));
    /// `examples/median`: WORKLOADS.md's Q6, a median (and a regression line) by
    /// sample-and-aggregate.
    pub const MEDIAN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/median.wasm"));
    /// `tests/guests/hostile`: UDFs and block functions written to leak, crash or stall (for
    /// the tests; never part of the demo).
    #[doc(hidden)]
    pub const HOSTILE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hostile.wasm"));
}

/// Seconds since the Unix epoch, as RFC 3339 text. The one place the wall clock is read for
/// records (never exposed to guests).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// A fresh random identifier with a readable prefix, e.g. `job_3f9c…` (128 bits from ring).
pub fn new_id(prefix: &str) -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random source failed");
    format!("{prefix}_{}", hex::encode(bytes))
}
