//! Which exported functions provably write no instance state.
//!
//! A function whose every reachable instruction is on an allow-list of pure ones — arithmetic,
//! locals, loads, `global.get`, `memory.size`, structured control and direct calls to functions
//! that are pure too — cannot change the instance's memory, globals, tables or segments, nor
//! reach the host. Calling it many times in one instance is then the same as calling it in a
//! fresh instance each time (its fuel is reset by the host before every call). Anything not on
//! the list (stores, `global.set`, `memory.grow`, bulk memory and table instructions,
//! `call_indirect`, calls to imports, atomics, exceptions, and every instruction added later)
//! makes a function impure: the check errs only towards fresh instances.

use std::collections::HashMap;

use wasmparser::{ExternalKind, Operator, Parser, Payload, TypeRef};

struct Function {
    pure: bool,
    calls: Vec<u32>,
}

/// Exported function names whose code is pure in the sense above.
pub fn pure_exports(bytes: &[u8]) -> HashMap<String, bool> {
    analyse(bytes).unwrap_or_default()
}

fn analyse(bytes: &[u8]) -> Result<HashMap<String, bool>, wasmparser::BinaryReaderError> {
    let mut imported = 0u32;
    let mut functions = Vec::new();
    let mut exports = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        match payload? {
            Payload::ImportSection(section) => {
                for import in section.into_imports() {
                    if matches!(import?.ty, TypeRef::Func(_) | TypeRef::FuncExact(_)) {
                        imported += 1;
                    }
                }
            }
            Payload::ExportSection(section) => {
                for export in section {
                    let export = export?;
                    if export.kind == ExternalKind::Func {
                        exports.push((export.name.to_string(), export.index));
                    }
                }
            }
            Payload::CodeSectionEntry(body) => {
                let mut f = Function {
                    pure: true,
                    calls: Vec::new(),
                };
                let mut ops = body.get_operators_reader()?;
                while !ops.eof() {
                    let op = ops.read()?;
                    match op {
                        Operator::Call { function_index }
                        | Operator::ReturnCall { function_index } => {
                            if function_index < imported {
                                f.pure = false;
                            } else {
                                f.calls.push(function_index);
                            }
                        }
                        op if !allowed(&op) => f.pure = false,
                        _ => {}
                    }
                    if !f.pure {
                        break;
                    }
                }
                functions.push(f);
            }
            _ => {}
        }
    }
    let mut verdict = HashMap::new();
    for (name, index) in exports {
        verdict.insert(name, reachable_pure(index, imported, &functions));
    }
    Ok(verdict)
}

fn reachable_pure(start: u32, imported: u32, functions: &[Function]) -> bool {
    let mut seen = vec![false; functions.len()];
    let mut stack = vec![start];
    while let Some(index) = stack.pop() {
        let Some(local) = index.checked_sub(imported) else {
            return false; // an import
        };
        let Some(f) = functions.get(local as usize) else {
            return false;
        };
        if std::mem::replace(&mut seen[local as usize], true) {
            continue;
        }
        if !f.pure {
            return false;
        }
        stack.extend(&f.calls);
    }
    true
}

/// The allow-list, by instruction name (so that an instruction this code has never heard of
/// is impure).
fn allowed(op: &Operator<'_>) -> bool {
    let text = format!("{op:?}");
    let name = text.split([' ', '{', '(']).next().unwrap_or("");
    let numeric = ["I32", "I64", "F32", "F64"]
        .iter()
        .any(|p| name.starts_with(p))
        && !name.contains("Store")
        && !name.contains("Atomic");
    numeric
        || matches!(
            name,
            "Unreachable"
                | "Nop"
                | "Block"
                | "Loop"
                | "If"
                | "Else"
                | "End"
                | "Br"
                | "BrIf"
                | "BrTable"
                | "Return"
                | "Drop"
                | "Select"
                | "TypedSelect"
                | "LocalGet"
                | "LocalSet"
                | "LocalTee"
                | "GlobalGet"
                | "MemorySize"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(wat: &str) -> HashMap<String, bool> {
        pure_exports(&wat::parse_str(wat).unwrap())
    }

    #[test]
    fn arithmetic_loads_and_pure_calls_are_pure_and_every_write_is_not() {
        let v = verdicts(
            r#"(module
                (import "unseen" "query" (func $q (param i32 i32) (result i32)))
                (memory 1) (global $g (mut i32) (i32.const 0)) (table 1 funcref)
                (func $helper (param f64) (result f64) (f64.mul (local.get 0) (f64.const 2)))
                (func (export "pure") (param f64 f64) (result f64)
                    (f64.div (call $helper (local.get 0)) (local.get 1)))
                (func (export "loads") (param i32) (result i64)
                    (i64.load (local.get 0)))
                (func (export "store") (param i32) (i32.store (local.get 0) (i32.const 1)))
                (func (export "global_set") (global.set $g (i32.const 1)))
                (func (export "grow") (result i32) (memory.grow (i32.const 1)))
                (func (export "fill") (memory.fill (i32.const 0) (i32.const 0) (i32.const 1)))
                (func (export "indirect") (result f64) (call_indirect (result f64) (i32.const 0)))
                (func (export "import") (result i32) (call $q (i32.const 0) (i32.const 0)))
                (func $writes (i32.store8 (i32.const 0) (i32.const 1)))
                (func $middle (call $writes))
                (func (export "deep") (call $middle))
                (func $rec (param i32) (result i32) (call $rec (local.get 0)))
                (func (export "recursive") (param i32) (result i32) (call $rec (local.get 0)))
            )"#,
        );
        assert_eq!(v["pure"], true);
        assert_eq!(v["loads"], true);
        assert_eq!(v["recursive"], true);
        for impure in [
            "store",
            "global_set",
            "grow",
            "fill",
            "indirect",
            "import",
            "deep",
        ] {
            assert_eq!(v[impure], false, "{impure}");
        }
    }

    #[test]
    fn unparseable_modules_have_no_pure_exports() {
        assert!(pure_exports(b"not wasm").is_empty());
    }
}
