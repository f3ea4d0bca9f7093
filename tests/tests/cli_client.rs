//! The `kiln` client subcommands against a real daemon: `--help` everywhere,
//! `--json` output, and exit codes scripts can rely on (0 ok, 3 conflict,
//! 4 not found, 5 unreachable, 6 timeout, 8 unauthorized).

use std::io::BufRead;
use std::time::Duration;

use kiln_tests::daemon::{Api, Daemon, Options, kiln_bin, kiln_cli, projections_dir};
use kiln_tests::wasm::USERS;
use serde_json::Value;

const SUBCOMMANDS: [&str; 11] = [
    "status", "deploy", "promote", "rollback", "retire", "resume", "diff", "append", "get", "ls",
    "tail",
];

#[test]
fn every_client_subcommand_has_help_naming_the_url_flag() {
    for sub in SUBCOMMANDS {
        let out = std::process::Command::new(kiln_bin())
            .args([sub, "--help"])
            .output()
            .expect("kiln --help");
        assert!(out.status.success(), "kiln {sub} --help failed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("--url") && text.contains("KILN_URL"),
            "kiln {sub} --help:\n{text}"
        );
        assert!(text.contains("--json"), "kiln {sub} --help:\n{text}");
    }
    let out = std::process::Command::new(kiln_bin())
        .arg("--help")
        .output()
        .expect("kiln --help");
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in SUBCOMMANDS {
        assert!(text.contains(sub), "kiln --help lists {sub}:\n{text}");
    }
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_get_ls_status_tail_with_json_and_exit_codes() {
    let dir = projections_dir(&[USERS]);
    let d = Daemon::start_with(Options::default().projections(dir.path()));
    Api::new(&d)
        .wait_state("users-1_0_0", "active", Duration::from_secs(60))
        .await;

    let (code, out, err) = kiln_cli(
        &d,
        &[
            "append",
            "user-1",
            "UserRegistered",
            r#"{"name": "Ada", "email": "a@x"}"#,
            "--expect",
            "no_stream",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["version"], 1);
    let (code, out, _) = kiln_cli(
        &d,
        &[
            "append",
            "user-1",
            "UserRenamed",
            r#"{"name": "Ada L."}"#,
            "-e",
            "0",
            "--json",
        ],
    );
    assert_eq!(code, 3, "a version conflict exits 3");
    assert_eq!(json_of(&out)["error"]["current_version"], 1);
    let (code, out, _) = kiln_cli(
        &d,
        &[
            "append",
            "user-1",
            "UserRenamed",
            r#"{"name": "Ada L."}"#,
            "-e",
            "1",
        ],
    );
    assert_eq!(code, 0);
    assert!(out.contains("version 2"), "{out}");

    // get, with read-your-writes on the stream just written.
    let (code, out, err) = kiln_cli(
        &d,
        &[
            "get",
            "users",
            "user-1",
            "--after-stream",
            "user-1",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let doc = json_of(&out);
    assert_eq!(doc["doc"]["name"], "Ada L.");
    assert_eq!(doc["view"], "users-1_0_0");
    let (code, out, _) = kiln_cli(&d, &["get", "users@^1", "user-1"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"Ada L.\""), "pretty JSON document: {out}");
    let (code, _, err) = kiln_cli(&d, &["get", "users", "user-404"]);
    assert_eq!(code, 4, "unknown key exits 4: {err}");
    assert!(err.contains("user-404"), "{err}");
    let (code, _, _) = kiln_cli(&d, &["get", "nope", "k"]);
    assert_eq!(code, 4);
    let (code, _, err) = kiln_cli(
        &d,
        &[
            "get",
            "users",
            "user-1",
            "--after-position",
            "999999",
            "--wait-ms",
            "100",
        ],
    );
    assert_eq!(
        code, 1,
        "a position beyond the head is refused at once: {err}"
    );
    assert!(err.contains("beyond the log's head"), "{err}");

    // ls: pages followed with --all, keys only.
    for n in 2..=7 {
        let (code, _, err) = kiln_cli(
            &d,
            &[
                "append",
                &format!("user-{n}"),
                "UserRegistered",
                r#"{"name": "x", "email": "y"}"#,
            ],
        );
        assert_eq!(code, 0, "{err}");
    }
    let (code, out, err) = kiln_cli(
        &d,
        &[
            "ls",
            "users",
            "--prefix",
            "user-",
            "--limit",
            "2",
            "--all",
            "--keys",
            "--after-stream",
            "user-7",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let keys: Vec<&str> = out.lines().collect();
    assert_eq!(
        keys,
        [
            "user-1", "user-2", "user-3", "user-4", "user-5", "user-6", "user-7"
        ]
    );
    let (code, out, _) = kiln_cli(&d, &["ls", "users", "--limit", "3", "--json"]);
    assert_eq!(code, 0);
    let page = json_of(&out);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(3));
    assert_eq!(page["next"], "user-3");

    // status, human and JSON.
    let (code, out, _) = kiln_cli(&d, &["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("users-1_0_0") && out.contains("active"),
        "{out}"
    );
    let (code, out, _) = kiln_cli(&d, &["status", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(json_of(&out)["views"][0]["id"], "users-1_0_0");

    // tail up to the head: every event, in position order.
    let (code, out, err) = kiln_cli(&d, &["tail", "--no-follow", "--json"]);
    assert_eq!(code, 0, "{err}");
    let positions: Vec<u64> = out
        .lines()
        .map(|l| json_of(l)["position"].as_u64().expect("position"))
        .collect();
    assert_eq!(positions, (1..=8).collect::<Vec<u64>>());
    let (code, out, _) = kiln_cli(&d, &["tail", "--no-follow", "--from", "8"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().count() == 1 && out.contains("user-7@1") && out.contains("UserRegistered"),
        "{out}"
    );

    // tail (following): prints what is there, then each new event as it commits.
    let mut child = std::process::Command::new(kiln_bin())
        .args(["tail", "--from", "7", "--json"])
        .env("KILN_URL", d.url())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("kiln tail");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next_position = || {
        let line = lines
            .next()
            .expect("a line from kiln tail")
            .expect("reading kiln tail");
        json_of(&line)["position"].as_u64().expect("position")
    };
    assert_eq!((next_position(), next_position()), (7, 8));
    let (code, _, err) = kiln_cli(&d, &["append", "user-9", "UserRegistered", "{}"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(next_position(), 9, "the followed tail shows the new event");
    let _ = child.kill();
    let _ = child.wait();

    // ls by range, and a view's listing by exact id.
    let (code, out, _) = kiln_cli(
        &d,
        &[
            "ls",
            "users-1_0_0",
            "--from",
            "user-2",
            "--to",
            "user-4",
            "--keys",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["user-2", "user-3"]);
}

/// While a version warms, `kiln status` draws a progress bar with an ETA;
/// `status --wait` waits until nothing warms (exit 6 if it gives up first);
/// `retire` stops a version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_progress_with_eta_while_warming_and_waits_for_it() {
    let d = Daemon::start_with(kiln_tests::daemon::slow_warming_options());
    let id = kiln_tests::daemon::deploy_slow_warming_chaos(&Api::new(&d), 8).await;
    // `[#####...................]  21%  86/328  40 ev/s  ETA 7s`
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let line = loop {
        let (code, out, err) = kiln_cli(&d, &["status"]);
        assert_eq!(code, 0, "{err}");
        let line = out
            .lines()
            .find(|l| l.starts_with(&id))
            .unwrap_or_else(|| panic!("no line for {id}: {out}"))
            .to_string();
        assert!(line.contains("warming"), "{line}");
        let eta_known = line
            .split_once("ETA ")
            .is_some_and(|(_, t)| t.starts_with(|c: char| c.is_ascii_digit()));
        if eta_known {
            break line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ETA while warming: {line}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        line.contains("] ") && line.contains('%') && line.contains("ev/s"),
        "{line}"
    );
    assert!(
        line.contains("[#") || line.contains("[."),
        "a progress bar: {line}"
    );

    let (code, _, err) = kiln_cli(&d, &["status", "--wait", "--timeout-secs", "1"]);
    assert_eq!(code, 6, "still warming after 1 s: exit 6 ({err})");
    let (code, out, err) = kiln_cli(&d, &["status", "--wait", "--json"]);
    assert_eq!(code, 0, "{err}");
    let last = out.lines().last().map(json_of).expect("output");
    assert_eq!(last["views"][0]["state"], "active", "{last}");

    let (code, out, err) = kiln_cli(&d, &["retire", &id, "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["retired"], id.as_str());
    let (code, _, err) = kiln_cli(&d, &["get", &id, "note/chaos-0"]);
    assert_eq!(
        code, 3,
        "a retired version is a conflict (view_retired): {err}"
    );
}

/// A daemon watching `dir` with a debounce of `debounce_ms`.
fn watching(dir: &std::path::Path, debounce_ms: u64) -> Daemon {
    Daemon::start_with(
        Options::default()
            .projections(dir)
            .arg("--watch-debounce-ms")
            .arg(&debounce_ms.to_string()),
    )
}

/// Regression (found in a walk): `kiln status --wait` run right after a
/// module was copied into the watched directory returned at once, before the
/// watcher's debounce had passed and the version existed, so a deploy script
/// went on as if the new version were ready. It now waits for the files the
/// watcher has seen change, too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_wait_waits_for_a_module_just_copied_into_the_watched_directory() {
    let dir = tempfile::tempdir().expect("temp projections dir");
    // A long debounce: without the fix the CLI answers well inside it.
    let d = watching(dir.path(), 1500);
    let (code, out, err) = kiln_cli(&d, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["deploys_pending"], 0, "{out}");
    // As scripts/build-projections does: a hidden name, then a rename.
    let hidden = dir.path().join(".users.wasm");
    std::fs::copy(USERS, &hidden).expect("copy the module");
    std::fs::rename(&hidden, dir.path().join("users.wasm")).expect("rename it in");

    let (code, out, err) = kiln_cli(&d, &["status", "--wait", "--json"]);
    assert_eq!(code, 0, "{err}");
    let frames: Vec<Value> = out.lines().map(json_of).collect();
    let last = frames.last().expect("output");
    assert_eq!(last["deploys_pending"], 0, "{last}");
    let users = last["views"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["id"] == "users-1_0_0"))
        .unwrap_or_else(|| panic!("status --wait returned before users-1_0_0 was deployed: {out}"));
    assert_eq!(users["state"], "active", "{last}");
    assert!(
        frames.iter().any(|f| f["deploys_pending"] == 1),
        "the file was reported pending while the debounce ran: {out}"
    );
}

/// Regression (found in review): a FIFO named like a module in the watched
/// directory blocked the watcher on its read forever, so no later module
/// deployed and `kiln status --wait` waited for it until its timeout. A file
/// that is not a regular file is not loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_the_watched_directory_does_not_stop_the_watcher() {
    let dir = tempfile::tempdir().expect("temp projections dir");
    let d = watching(dir.path(), 100);
    let made = std::process::Command::new("mkfifo")
        .arg(dir.path().join("stuck.wasm"))
        .status()
        .expect("running mkfifo");
    assert!(made.success(), "mkfifo failed");
    std::fs::copy(USERS, dir.path().join("users.wasm")).expect("copy the module");
    let (code, out, err) = kiln_cli(&d, &["status", "--wait", "--json", "--timeout-secs", "20"]);
    assert_eq!(code, 0, "status --wait gave up: {err}");
    let last = out.lines().last().map(json_of).expect("output");
    assert_eq!(last["deploys_pending"], 0, "{last}");
    assert!(
        last["views"].as_array().is_some_and(|v| v
            .iter()
            .any(|v| v["id"] == "users-1_0_0" && v["state"] == "active")),
        "users-1_0_0 deployed next to the FIFO: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_wait_promote_rollback_from_the_command_line() {
    let d = Daemon::start_with(Options::default().admin_token("tok"));
    let modules = tempfile::tempdir().expect("temp dir");
    let v1 = modules.path().join("users-v1.wasm");
    std::fs::write(
        &v1,
        kiln_tests::daemon::module_version(USERS, "1.0.0", None),
    )
    .expect("write");
    let v2 = modules.path().join("users-v2.wasm");
    std::fs::write(
        &v2,
        kiln_tests::daemon::module_version(USERS, "2.0.0", Some("X")),
    )
    .expect("write");
    let v1s = v1.to_str().expect("utf-8 path");
    let v2s = v2.to_str().expect("utf-8 path");

    let (code, _, err) = kiln_cli(&d, &["deploy", v1s]);
    assert_eq!(code, 8, "no token: exit 8 ({err})");
    let (code, out, err) = kiln_cli(&d, &["deploy", v1s, "--wait", "--token", "tok"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("users-1_0_0"), "{out}");
    // It says why it warms: the first version of its name.
    assert!(
        out.contains("why: new view: fingerprint v3:") && out.contains("no other version"),
        "{out}"
    );
    let (code, out, err) = kiln_cli(
        &d,
        &["deploy", v2s, "--promote", "--token", "tok", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let last = out.lines().last().map(json_of).expect("output");
    assert_eq!(last["active"], "users-2_0_0");
    let (code, out, err) = kiln_cli(&d, &["rollback", "users", "--token", "tok", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["active"], "users-1_0_0");
    let (code, out, _) = kiln_cli(&d, &["promote", "users-2_0_0", "--token", "tok"]);
    assert_eq!(code, 0);
    assert!(out.contains("users-2_0_0"), "{out}");
    let (code, _, _) = kiln_cli(&d, &["promote", "users-7_0_0", "--token", "tok"]);
    assert_eq!(code, 4, "unknown version exits 4");

    // A version that fails while warming (default poison policy: stop): exit 7.
    let (code, _, err) = kiln_cli(
        &d,
        &["append", "chaos-1", "Fail", r#"{"message": "boom at one"}"#],
    );
    assert_eq!(code, 0, "{err}");
    let chaos = modules.path().join("chaos.wasm");
    std::fs::copy(kiln_tests::wasm::CHAOS, &chaos).expect("copy");
    let (code, out, err) = kiln_cli(
        &d,
        &[
            "deploy",
            chaos.to_str().expect("utf-8 path"),
            "--wait",
            "--json",
            "--token",
            "tok",
        ],
    );
    assert_eq!(code, 7, "a failed version exits 7: {err}");
    assert!(
        err.contains("failed") && err.contains("boom at one"),
        "{err}"
    );
    // --json prints the documented error object, the version's status in it.
    let last = out.lines().last().unwrap_or("");
    let answer: serde_json::Value = serde_json::from_str(last).expect("a JSON line");
    assert_eq!(answer["error"]["code"], "version_failed", "{out}");
    assert_eq!(answer["error"]["view"]["state"], "failed", "{out}");
}

#[test]
fn an_unreachable_daemon_exits_5_and_says_where_it_looked() {
    let port = kiln_tests::daemon::free_port();
    let out = std::process::Command::new(kiln_bin())
        .args(["status", "--url", &format!("http://127.0.0.1:{port}")])
        .output()
        .expect("kiln status");
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&port.to_string()), "{err}");
}

/// A read-your-writes wait that times out exits 6: a version still warming
/// past the position asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_your_writes_timeout_exits_6() {
    let d = Daemon::start_with(kiln_tests::daemon::slow_warming_options());
    let api = Api::new(&d);
    let id = kiln_tests::daemon::deploy_slow_warming_chaos(&api, 4).await;
    let (_, head) = api.get("/streams/chaos-3").await;
    let position = head["position"].as_u64().expect("position").to_string();
    let (code, _, err) = tokio::task::block_in_place(|| {
        kiln_cli(
            &d,
            &[
                "get",
                &id,
                "k",
                "--after-position",
                &position,
                "--wait-ms",
                "100",
            ],
        )
    });
    assert_eq!(code, 6, "a read-your-writes timeout exits 6: {err}");
}
