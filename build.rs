//! Builds the guest modules in `examples/` for `wasm32-unknown-unknown` and embeds them, so the
//! demo and the tests run real modules with no set-up step. Installs the wasm target through
//! rustup when it is missing.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-unknown-unknown";
/// Guest crates built and embedded; each becomes `$OUT_DIR/<name>.wasm`.
const GUESTS: &[&str] = &[
    "district_stats",
    "fare_per_km",
    "median",
    "query_runner",
    "hostile",
];
/// The guest workspaces: the examples, and the hostile modules the tests run.
const MANIFESTS: &[&str] = &["examples/Cargo.toml", "tests/guests/hostile/Cargo.toml"];

fn main() {
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    for watched in [
        "guest-sdk/src",
        "guest-sdk/Cargo.toml",
        "examples",
        "tests/guests",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // <target-dir>/<profile>/build/<pkg>/out → keep guest builds beside the host's, shared by
    // debug and release builds, so they are compiled once.
    let target_dir = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(|build| build.parent()?.parent())
        .map(|t| t.join("wasm-guests"))
        .unwrap_or_else(|| out_dir.join("wasm-guests"));

    ensure_wasm_target();

    for manifest in MANIFESTS {
        build_guests(&root.join(manifest), &target_dir);
    }
    for name in GUESTS {
        let built = target_dir
            .join(TARGET)
            .join("release")
            .join(format!("{name}.wasm"));
        let dest = out_dir.join(format!("{name}.wasm"));
        std::fs::copy(&built, &dest)
            .unwrap_or_else(|e| panic!("guest module {} missing: {e}", built.display()));
    }
}

/// Builds one guest workspace for wasm32 into `target_dir`.
fn build_guests(manifest: &Path, target_dir: &Path) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // The outer build's settings (target dir, flags, profile, clippy's wrapper) must not leak
    // into the guest build; the jobserver (CARGO_MAKEFLAGS) and CARGO_HOME should.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let keep = key == "CARGO_HOME" || key == "CARGO_MAKEFLAGS";
        if (key.starts_with("CARGO_") && !keep)
            || key == "RUSTFLAGS"
            || key == "RUSTC_WORKSPACE_WRAPPER"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.arg("build")
        .arg("--release")
        .arg("--target")
        .arg(TARGET)
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(target_dir);
    let status = cmd
        .status()
        .expect("could not run cargo to build the guest modules");
    assert!(
        status.success(),
        "building the guest modules of {} failed",
        manifest.display()
    );
}

fn ensure_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if libdir.as_deref().is_some_and(has_core) {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target with rustup");
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "the {TARGET} target is missing and `rustup target add {TARGET}` failed; install it by hand"
    );
}

fn has_core(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
    })
}
