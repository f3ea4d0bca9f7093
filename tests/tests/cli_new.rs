//! `kiln new`: a project scaffolded in a temporary directory (outside the
//! repository) builds as it is, passes its own unit test, and deploys to a
//! live daemon, which builds its view. Both languages. The nested builds share
//! caches so CI stays fast: Rust under `target/kiln-new` (offline, from the
//! crates the workspace already fetched), npm through its cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_tests::cargo_env;
use kiln_tests::daemon::{Api, Daemon, kiln_bin, kiln_cli};
use serde_json::json;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// Runs `cmd`, asserting success; returns its stdout.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kiln new <args>` in `parent`; returns the project's directory.
fn kiln_new(parent: &Path, name: &str, args: &[&str]) -> PathBuf {
    let stdout = run(
        Command::new(kiln_bin())
            .arg("new")
            .arg(name)
            .args(args)
            .env_remove("KILN_HOME")
            .current_dir(parent),
        "kiln new",
    );
    assert!(stdout.contains("kiln deploy"), "{stdout}");
    let dir = parent.join(name);
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for step in ["test", "build", "deploy"] {
        assert!(
            readme.contains(&format!("# {step}: ")),
            "README lacks {step}: {readme}"
        );
    }
    dir
}

/// Appends the scaffold's two event types, deploys `module` with
/// `kiln deploy --wait` and returns the daemon (with its view built).
async fn deploy(module: &Path, view: &str) -> (Daemon, Api) {
    let daemon = Daemon::start();
    let api = Api::new(&daemon);
    for (stream, ty, data) in [
        ("thing-1", "Created", json!({"title": "first"})),
        ("thing-1", "Touched", json!({})),
        ("thing-2", "Created", json!({"title": "second"})),
        ("thing-1", "Touched", json!({})),
    ] {
        let (s, b) = api.append(stream, json!("any"), ty, data).await;
        assert_eq!(s, 200, "{b}");
    }
    let (code, out, err) = kiln_cli(
        &daemon,
        &[
            "deploy",
            module.to_str().unwrap(),
            "--wait",
            "--timeout-secs",
            "60",
        ],
    );
    assert_eq!(code, 0, "kiln deploy: {out}\n{err}");
    api.wait_state(&format!("{view}-0_1_0"), "active", Duration::from_secs(60))
        .await;
    (daemon, api)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_rust_projection_builds_tests_and_deploys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = kiln_new(
        tmp.path(),
        "thing-states",
        &["--lang", "rust", "--per-stream"],
    );
    let target = root().join("target").join("kiln-new");
    let cargo = |args: &[&str]| {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo_env::clean_env(&mut cmd);
        cmd.args(args)
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", &target)
            .env("CARGO_NET_OFFLINE", "true");
        cmd
    };
    let tests = run(
        &mut cargo(&["test", "--release"]),
        "cargo test (the scaffold's)",
    );
    assert!(
        tests.contains("a_stream_is_created_then_touched ... ok"),
        "{tests}"
    );
    run(
        &mut cargo(&["build", "--release", "--target", "wasm32-unknown-unknown"]),
        "cargo build (the scaffold's module)",
    );
    let module = target.join("wasm32-unknown-unknown/release/thing_states.wasm");
    let (_daemon, api) = deploy(&module, "thing-states").await;
    let (s, b) = api.get("/views/thing-states/thing-1").await;
    assert_eq!(s, 200, "{b}");
    let doc = &b["doc"];
    assert_eq!(
        (doc["title"].as_str(), doc["touches"].as_u64()),
        (Some("first"), Some(2))
    );
    // The log's commit time of the last Touched, in ms since the epoch.
    assert!(
        doc["last_touched"].as_u64() > Some(1_600_000_000_000),
        "{b}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_assemblyscript_projection_builds_tests_and_deploys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = kiln_new(tmp.path(), "things", &["--lang", "assemblyscript"]);
    for file in [
        "package.json",
        "asconfig.json",
        "assembly/index.ts",
        "test/projection.test.mjs",
    ] {
        assert!(dir.join(file).is_file(), "no {file}");
    }
    let npm = |args: &[&str]| {
        let mut cmd = Command::new("npm");
        cmd.args(args).current_dir(&dir);
        cmd
    };
    run(
        &mut npm(&["install", "--prefer-offline", "--no-audit", "--no-fund"]),
        "npm install (the scaffold's)",
    );
    let tests = run(&mut npm(&["test"]), "npm test (the scaffold's)");
    assert!(
        tests.contains("# pass 1") && tests.contains("# fail 0"),
        "{tests}"
    );
    run(
        &mut npm(&["run", "build"]),
        "npm run build (the scaffold's)",
    );
    let (_daemon, api) = deploy(&dir.join("build/things.wasm"), "things").await;
    let (s, b) = api.get("/views/things/totals").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["doc"], json!({"created": 2, "touches": 2}));
    let (_, b) = api.get("/views/things/thing-1").await;
    assert_eq!(b["doc"], json!({"title": "first", "touches": 2}));
}
