//! Integration tests: one binary, each test against a real server on a loopback socket with its
//! own data directory (real SQLite file, real Parquet data, real wasm modules).

mod bench;
mod budget;
mod dry_run;
mod end_to_end;
mod examples;
mod governance;
mod guest_functions;
mod hostile_modules;
mod http_errors;
mod joins;
mod ledger;
mod lifecycle;
mod privacy_units;
mod private_keys;
mod roles;
mod sql_surface;
mod support;
