//! Builds every projection crate under `projections/` for `wasm32-unknown-unknown`
//! (release, LTO) into `<workspace>/target/wasm-projections`, and tells the tests
//! where each module is through `KILN_WASM_<NAME>` (e.g. `KILN_WASM_USERS`).
//!
//! Modelled on wasmtime's `test-programs` build script: the nested cargo gets a
//! clean environment (no outer target dir, rustflags, wrappers or jobserver), so
//! it neither fights the outer build's lock nor inherits its host settings.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf();
    for watched in ["sdk", "projections", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    let projections = projection_dirs(&root.join("projections"));
    ensure_wasm_target();
    let target_dir = root.join("target").join("wasm-projections");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    for name in &projections {
        cmd.args(["-p", &format!("projection-{name}")]);
    }
    clean_env(&mut cmd);
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_INCREMENTAL", "false");
    let out = cmd
        .output()
        .expect("running cargo to build the projections for wasm32");
    if !out.status.success() {
        panic!(
            "building the projections for {TARGET} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for name in &projections {
        let wasm = target_dir
            .join(TARGET)
            .join("release")
            .join(format!("projection_{name}.wasm"));
        assert!(wasm.exists(), "{} was not built", wasm.display());
        println!(
            "cargo:rustc-env=KILN_WASM_{}={}",
            name.to_uppercase(),
            wasm.display()
        );
    }
}

/// Every `projections/<name>/` with a Cargo.toml, sorted.
fn projection_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("reading projections/")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("Cargo.toml").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Drops what the outer cargo set for its own build.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer = (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTC"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "RUSTDOC"
                    | "MAKEFLAGS"
                    | "MFLAGS"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
                    | "NUM_JOBS"
            );
        if outer {
            cmd.env_remove(key);
        }
    }
}

/// Installs the wasm32 target through rustup when it is missing.
fn ensure_wasm_target() {
    let Ok(out) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
    else {
        return; // No rustup: assume the toolchain was set up by other means.
    };
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return;
    }
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "`rustup target add {TARGET}` failed; install the target to build the projections"
    );
}
