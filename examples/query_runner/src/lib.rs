//! Example module: an ad-hoc query runner. `params` is
//! `{"queries": [{"sql": "...", "epsilon": 0.5, "bounds": {"fare": [0, 100]}}, ...]}`; the
//! output lists, per query, either its release or the gate's refusal (code and message).
//! Useful for exploring what the gate accepts; every answer is a DP release or a refusal.
//!
//! Each query is the contract's request as JSON (`sql`, `epsilon` — 0.5 if absent — and any
//! of `bounds`, `max_rows_per_unit`, `delta`, `dry_run`, `sample_aggregate`); unknown fields
//! are refused by name. The work is [`unseen_guest::run_queries`].

unseen_guest::entry!(main => unseen_guest::run_queries);
