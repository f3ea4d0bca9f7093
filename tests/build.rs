//! Builds every projection crate under `projections/` for `wasm32-unknown-unknown`
//! (release, LTO) into `<workspace>/target/wasm-projections`, and tells the tests
//! where each module is through `KILN_WASM_<NAME>` (e.g. `KILN_WASM_USERS`).
//!
//! It also builds the AssemblyScript projections (every `projections/<dir>/`
//! with a package.json) and the AssemblyScript SDK's test fixture with
//! `sdk-as/bin/kiln-as.mjs` into `target/wasm-projections/assemblyscript`
//! (`KILN_WASM_USERS_AS`, `KILN_WASM_SDK_AS_FIXTURE`); `scripts/setup` installs
//! their npm packages (`npm ci` at the workspace root).
//!
//! Modelled on wasmtime's `test-programs` build script: the nested cargo gets a
//! clean environment (`src/cargo_env.rs`: no outer target dir, rustflags,
//! wrappers or jobserver), so it neither fights the outer build's lock nor
//! inherits its host settings.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "src/cargo_env.rs"]
mod cargo_env;

const TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf();
    for watched in [
        "sdk",
        "sdk-as/assembly",
        "sdk-as/bin",
        "sdk-as/test/fixture.ts",
        "projections",
        "Cargo.toml",
        "Cargo.lock",
        "package-lock.json",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    let projections = projection_dirs(&root.join("projections"), "Cargo.toml");
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
    cargo_env::clean_env(&mut cmd);
    cargo_env::projection_profile(&mut cmd);
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
    build_assemblyscript(&root, &target_dir);
}

/// Builds the AssemblyScript modules with the SDK's `kiln-as build`.
fn build_assemblyscript(root: &Path, target_dir: &Path) {
    assert!(
        root.join("node_modules/assemblyscript").is_dir(),
        "the AssemblyScript compiler is not installed: run `source scripts/setup` (npm ci at {})",
        root.display()
    );
    let out_dir = target_dir.join("assemblyscript");
    let kiln_as = root.join("sdk-as/bin/kiln-as.mjs");
    let mut modules: Vec<(String, PathBuf, Vec<String>)> =
        projection_dirs(&root.join("projections"), "package.json")
            .into_iter()
            .map(|dir| {
                let name = dir.to_uppercase().replace('-', "_");
                let wasm = out_dir.join(format!("{dir}.wasm"));
                (
                    name,
                    root.join("projections").join(&dir),
                    vec!["--out".into(), wasm.display().to_string()],
                )
            })
            .collect();
    let fixture = out_dir.join("sdk-as-fixture.wasm");
    modules.push((
        "SDK_AS_FIXTURE".into(),
        root.join("sdk-as"),
        [
            "--entry",
            "test/fixture.ts",
            "--name",
            "fixture",
            "--version",
            "0.1.0",
            "--out",
            &fixture.display().to_string(),
        ]
        .map(String::from)
        .to_vec(),
    ));
    for (name, dir, args) in modules {
        let out = Command::new("node")
            .arg(&kiln_as)
            .arg("build")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("running node (the AssemblyScript projections need Node.js)");
        if !out.status.success() {
            panic!(
                "building {} with kiln-as failed:\n{}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let wasm = &args[args.len() - 1];
        println!("cargo:rustc-env=KILN_WASM_{name}={wasm}");
    }
}

/// Every `projections/<name>/` holding `manifest` (Cargo.toml: Rust;
/// package.json: AssemblyScript), sorted.
fn projection_dirs(dir: &Path, manifest: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("reading projections/")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(manifest).exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
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
