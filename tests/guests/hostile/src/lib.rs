//! Guest functions written by an attacker who wants to learn whether one row — the target, a
//! fare of exactly 777.0 — is in the data, or to carry one row's data into another's result.
//! `tests/it/hostile_functions.rs` asserts what each one achieves: nothing beyond the DP
//! release, and the same visible outcome whether or not the target row exists.

use std::sync::atomic::{AtomicU64, Ordering};

use unseen_guest::udf::Rows;
use unseen_guest::{block, entry, udf};

/// The fare that marks the target row.
pub const TARGET: f64 = 777.0;

static SEEN: AtomicU64 = AtomicU64::new(0);

udf! {
    default = -1.0;
    /// Counts the rows its instance has seen: state carried from row to row.
    pub fn rows_seen(_fare: f64) -> f64 {
        SEEN.fetch_add(1, Ordering::Relaxed) as f64 + 1.0
    }
}

udf! {
    default = 0.0;
    /// Spins forever on the target row (to stall the job or its timing), 1 elsewhere.
    pub fn spin_on_target(fare: f64) -> f64 {
        if fare == TARGET {
            let mut x = 0u64;
            loop {
                x = x.wrapping_add(1);
                std::hint::black_box(x);
            }
        }
        1.0
    }
}

udf! {
    default = 0.0;
    /// Traps on the target row, 1 elsewhere.
    pub fn trap_on_target(fare: f64) -> f64 {
        if fare == TARGET {
            std::process::abort();
        }
        1.0
    }
}

udf! {
    default = 0.0;
    /// Asks for a gigabyte on the target row, 1 elsewhere.
    pub fn bomb_on_target(fare: f64) -> f64 {
        if fare == TARGET {
            let v = vec![1u8; 1 << 30];
            return std::hint::black_box(v)[12345] as f64;
        }
        1.0
    }
}

fn depth(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        1 + std::hint::black_box(depth(n - 1))
    }
}

udf! {
    default = 0.0;
    /// Recurses without end on the target row, 1 elsewhere.
    pub fn recurse_on_target(fare: f64) -> f64 {
        if fare == TARGET {
            return depth(u64::MAX) as f64;
        }
        1.0
    }
}

/// Whether the block holds the target fare.
fn has_target(rows: &Rows) -> bool {
    rows.column(0)
        .is_some_and(|c| c.floats().any(|f| f == TARGET))
}

block! {
    /// 1 for every block, except that it traps in the target's block.
    pub fn block_trap(rows: &Rows) -> Vec<f64> {
        if has_target(rows) {
            std::process::abort();
        }
        vec![1.0]
    }
}

block! {
    /// 1 for every block, except that it spins in the target's block.
    pub fn block_spin(rows: &Rows) -> Vec<f64> {
        if has_target(rows) {
            let mut x = 0u64;
            loop {
                x = x.wrapping_add(1);
                std::hint::black_box(x);
            }
        }
        vec![1.0]
    }
}

block! {
    /// 1 for every block, except that the target's block answers a million values.
    pub fn block_huge(rows: &Rows) -> Vec<f64> {
        if has_target(rows) {
            return vec![1.0; 1_000_000];
        }
        vec![1.0]
    }
}

block! {
    /// Remembers every block it has seen (state across blocks, which fresh instances defeat),
    /// answering how many.
    pub fn block_memory(_rows: &Rows) -> Vec<f64> {
        vec![SEEN.fetch_add(1, Ordering::Relaxed) as f64 + 1.0]
    }
}

entry!(main => unseen_guest::run_queries);
