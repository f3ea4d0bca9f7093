//! The container image (`Containerfile`, `scripts/image`), built and run here.
//!
//! `scripts/image` packs the kiln binary into the image with podman, pulling
//! nothing; here the binary under test (`kiln_bin()`: `kiln-e2e`, the `kiln`
//! binary built with the tests, or `$KILN_BIN`). podman cannot run a
//! container on this machine (it cannot set the container's resource limits),
//! so the test does what a runtime does with the image's own filesystem and
//! config: it copies the filesystem out (`podman image mount`), starts the
//! config's entrypoint and command under `chroot` as the config's user with
//! only the config's environment, in a network namespace of its own, and talks
//! to it from inside that namespace as the application container of a pod
//! does (loopback is shared in a pod).
//!
//! - the config: OCI labels (version = the crate's), ports 7070 and 7071,
//!   volumes `/data` and `/projections`, a numeric non-root user, the
//!   entrypoint and `kiln serve` with scripts/serve's defaults;
//! - the filesystem: the binary, the libraries it links, passwd/group,
//!   nsswitch.conf and the CA bundle, nothing else (no shell);
//! - the process: `/healthz` answers on both listeners, the ops listener
//!   serves nothing else, the `users` module placed in `/projections` warms,
//!   an append is read back from the log and through the view, the process
//!   runs as the image's user and writes only to `/data`, and SIGTERM ends it
//!   (with a follower open) within the default grace period.
//!
//! `the_deploy_examples_agree_with_the_image` runs in the default run: the
//! Kubernetes examples and the systemd unit use the Containerfile's version,
//! user, volumes, ports and command.
//!
//! Needs root and podman (`KILN_IMAGE=1 scripts/setup` installs it), so it is
//! ignored in the default run: `KILN_IMAGE=1 scripts/test` runs it.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::daemon::{Api, kiln_bin};
use kiln_tests::wasm::USERS;
use serde_json::{Value, json};

/// kiln's default `shutdown_grace_ms`, which the image keeps.
const GRACE: Duration = Duration::from_secs(10);
/// Longest wait for the daemon to start, or a view to warm.
const WAIT: Duration = Duration::from_secs(60);

/// The deploy examples run what the Containerfile builds: its version, user,
/// volumes and command (checked on the text; the default run has no podman).
#[test]
fn the_deploy_examples_agree_with_the_image() {
    let root = repo_root();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let containerfile = read("Containerfile");
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        containerfile.contains(&format!("\nARG KILN_VERSION={version}\n")),
        "the Containerfile's default version label is not the workspace's ({version})"
    );
    for line in [
        "USER 65532:65532",
        r#"VOLUME ["/data", "/projections"]"#,
        "EXPOSE 7070 7071",
        r#"CMD ["serve", "--data-dir=/data", "--projections=/projections", "--ops-listen=0.0.0.0:7071"]"#,
    ] {
        assert!(
            containerfile.lines().any(|l| l == line),
            "the Containerfile has no `{line}`"
        );
    }
    for example in [
        "deploy/kubernetes/kiln-sidecar.yaml",
        "deploy/kubernetes/kiln-fleet.yaml",
    ] {
        let yaml = read(example);
        for needed in [
            format!("image: registry.example.com/kiln:{version}"),
            "fsGroup: 65532".to_string(),
            "runAsNonRoot: true".to_string(),
            "mountPath: /data }".to_string(),
            "mountPath: /projections, readOnly: true }".to_string(),
        ] {
            assert!(yaml.contains(&needed), "{example} has no `{needed}`");
        }
        assert!(
            !yaml.contains("exec: { command:"),
            "{example}: the image has no shell or other binary to exec"
        );
    }
    let sidecar = read("deploy/kubernetes/kiln-sidecar.yaml");
    for arg in [
        "serve",
        "--data-dir=/data",
        "--projections=/projections",
        "--ops-listen=0.0.0.0:7071",
    ] {
        assert!(
            sidecar.contains(&format!("- {arg}\n")),
            "the sidecar's args leave out the image's {arg}"
        );
    }
    let fleet = read("deploy/kubernetes/kiln-fleet.yaml");
    assert!(
        fleet.contains(r#"data_dir = "/data""#)
            && fleet.contains(r#"projections_dir = "/projections""#)
    );
    let unit = read("deploy/systemd/kiln.service");
    for needed in [
        "--uid 65532",
        "--gid 65532",
        "ExecStart=/usr/local/bin/kiln serve",
        "--listen 127.0.0.1:7070",
        "--ops-listen 0.0.0.0:7071",
    ] {
        assert!(unit.contains(needed), "the systemd unit has no `{needed}`");
    }
}

#[test]
#[ignore = "needs root and podman: KILN_IMAGE=1 scripts/test runs it"]
fn the_image_runs_kiln_from_its_own_filesystem_as_its_own_user() {
    assert!(
        is_root(),
        "the image test needs root (podman image mount, chroot, unshare)"
    );
    let started = Instant::now();
    let image = build_image();
    let built = started.elapsed();
    let config = inspect(&image.0);
    let c = &config["Config"];

    // The config a platform team reads before putting it next to every pod.
    let labels = &c["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION"),
        "{labels}"
    );
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert_eq!(labels["org.opencontainers.image.title"], "kiln");
    assert!(
        !labels["org.opencontainers.image.source"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{labels}"
    );
    assert_eq!(keys(&c["ExposedPorts"]), ["7070/tcp", "7071/tcp"], "{c}");
    assert_eq!(keys(&c["Volumes"]), ["/data", "/projections"], "{c}");
    let user = c["User"].as_str().unwrap_or_default();
    let (uid, gid) = user
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
        .unwrap_or_else(|| panic!("the user is numeric uid:gid (runAsNonRoot checks it): {c}"));
    assert!(uid != 0 && gid != 0, "the image runs as root: {c}");
    let entrypoint = strings(&c["Entrypoint"]);
    let cmd = strings(&c["Cmd"]);
    assert_eq!(entrypoint, ["/usr/local/bin/kiln"], "{c}");
    assert_eq!(
        cmd,
        [
            "serve",
            "--data-dir=/data",
            "--projections=/projections",
            "--ops-listen=0.0.0.0:7071"
        ],
        "kiln serve as scripts/serve runs it, on the image's volumes, with probes on :7071"
    );
    assert_eq!(c["StopSignal"], "SIGTERM", "{c}");
    let env = strings(&c["Env"]);
    assert!(env.iter().any(|e| e == "NO_COLOR=1"), "plain logs: {env:?}");
    let size = config["Size"].as_u64().expect("the image's size");
    assert!(
        size < 64 << 20,
        "the image grew to {} MiB",
        size as f64 / (1 << 20) as f64
    );

    // The filesystem: the binary, what it links, a few files in /etc; no shell.
    let tmp = tempfile::tempdir().expect("temp dir");
    let rootfs = tmp.path().join("rootfs");
    copy_filesystem(&image.0, &rootfs);
    let files = files_under(&rootfs);
    let (libs, others): (Vec<&String>, Vec<&String>) = files
        .iter()
        .partition(|f| (f.starts_with("lib") || f.starts_with("usr/lib")) && f.contains(".so"));
    assert_eq!(
        others,
        [
            "etc/group",
            "etc/nsswitch.conf",
            "etc/passwd",
            "etc/ssl/certs/ca-certificates.crt",
            "usr/local/bin/kiln"
        ],
        "besides libraries, the image holds only these files"
    );
    assert!(
        libs.iter().any(|l| l.contains("ld-linux")) && libs.iter().any(|l| l.contains("libc.so")),
        "the loader and libc: {libs:?}"
    );
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd.contains(&format!(":x:{uid}:{gid}:")),
        "the user has a passwd entry: {passwd}"
    );
    let data = rootfs.join("data");
    assert_eq!(
        (
            data.metadata().unwrap().uid(),
            data.metadata().unwrap().gid()
        ),
        (uid, gid),
        "/data belongs to the image's user"
    );

    // A module in /projections, as the init container of the examples puts it.
    std::fs::copy(USERS, rootfs.join("projections/users.wasm")).expect("copying users.wasm");

    let started_run = Instant::now();
    let mut kiln = Chrooted::start(
        &rootfs,
        &tmp.path().join("kiln.log"),
        &env,
        user,
        &entrypoint,
        &cmd,
    );
    let pid = kiln.wait_exec();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for field in ["Uid:", "Gid:"] {
        let want = if field == "Uid:" { uid } else { gid };
        let ids: Vec<u32> = status
            .lines()
            .find(|l| l.starts_with(field))
            .map(|l| {
                l[field.len()..]
                    .split_whitespace()
                    .map(|v| v.parse().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(ids, [want; 4], "{field} of kiln in the image:\n{status}");
    }
    let groups = status.lines().find(|l| l.starts_with("Groups:"));
    assert!(
        groups.is_some_and(|g| !g.split_whitespace().any(|id| id == "0")),
        "kiln in the image is in the root group: {groups:?}"
    );

    // Everything below talks to kiln from inside its network namespace.
    let log = kiln.log_path.clone();
    let (follower, exit, stopped_in) = std::thread::scope(|s| {
        s.spawn(|| {
            enter_network_namespace(pid);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(talk_to(&mut kiln, pid))
        })
        .join()
        .unwrap_or_else(|_| panic!("kiln in the image; its log:\n{}", read(&log)))
    });
    let logged = read(&log);
    assert!(
        logged.contains("kiln serving") && !logged.contains('\x1b'),
        "kiln logs plain text in the image: {logged}"
    );
    assert!(
        exit.success(),
        "kiln exited with {exit} on SIGTERM; its log:\n{logged}"
    );
    assert!(
        stopped_in < GRACE,
        "SIGTERM took {stopped_in:?} (grace {GRACE:?}); its log:\n{logged}"
    );
    assert!(
        follower.contains("\"UserRegistered\"") && follower.ends_with("\r\n0\r\n\r\n"),
        "the follower's stream, ended by kiln on SIGTERM: {follower:?}"
    );
    // It wrote as its user, and only to /data (readOnlyRootFilesystem holds).
    assert!(
        std::fs::metadata(rootfs.join("data/registry.json")).is_ok_and(|m| m.uid() == uid),
        "kiln wrote its registry in /data as its user"
    );
    let outside: Vec<String> = files_under(&rootfs)
        .into_iter()
        .filter(|f| {
            !f.starts_with("data/") && rootfs.join(f).symlink_metadata().unwrap().uid() == uid
        })
        .collect();
    assert!(outside.is_empty(), "kiln wrote outside /data: {outside:?}");
    eprintln!(
        "image: {}, {:.1} MiB, {} libraries; built in {built:.1?}, ran and stopped in {:.1?} \
         (SIGTERM to exit {stopped_in:.1?}); {:.1?} in all",
        image.0,
        size as f64 / (1 << 20) as f64,
        libs.len(),
        started_run.elapsed(),
        started.elapsed()
    );
}

/// The checks against the running daemon, from inside its network namespace;
/// ends with SIGTERM. Returns what a follower of the log received, the exit
/// status and how long the stop took.
async fn talk_to(kiln: &mut Chrooted, pid: u32) -> (String, ExitStatus, Duration) {
    let api = |port: u16| Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        base: format!("http://127.0.0.1:{port}"),
        token: None,
    };
    // The data API on the binary's default (loopback), probes on :7071.
    let (data, ops) = (api(7070), api(7071));
    let deadline = Instant::now() + WAIT;
    loop {
        kiln.assert_running();
        if let Ok(r) = ops.http.get(format!("{}/healthz", ops.base)).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no /healthz on :7071 within {WAIT:?}; kiln's log:\n{}",
            read(&kiln.log_path)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(data.get("/healthz").await.0, 200);
    assert_eq!(
        ops.get("/views").await.0,
        404,
        "the ops listener serves probes and metrics only"
    );

    // The module in /projections warms and serves `users`.
    let deadline = Instant::now() + WAIT;
    while ops.get("/readyz/users@%5E1").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "users did not warm from /projections: {}; kiln's log:\n{}",
            data.get("/views").await.1,
            read(&kiln.log_path)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let appended = data.register_user("user-1").await;
    let (s, b) = data.get("/streams/user-1/events").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (
            &b["events"][0]["type"],
            &b["events"][0]["data"]["name"],
            &b["events"][0]["position"]
        ),
        (&json!("UserRegistered"), &json!("a"), &appended["position"]),
        "{b}"
    );
    let (s, b) = data.get("/views/users/user-1?stream=user-1").await;
    assert_eq!((s, &b["doc"]["name"]), (200, &json!("a")), "{b}");
    let metrics = ops
        .http
        .get(format!("{}/metrics", ops.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("kiln_log_head 1"), "{metrics}");

    // A follower of the log stays connected while SIGTERM arrives.
    let mut follower = TcpStream::connect("127.0.0.1:7070").expect("connecting a follower");
    write!(
        follower,
        "GET /events?from=1&follow=true HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )
    .unwrap();
    follower
        .set_read_timeout(Some(GRACE + Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(follower);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    let sent = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(killed.is_ok_and(|s| s.success()));
    let exit = loop {
        if let Some(status) = kiln.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < GRACE + Duration::from_secs(5),
            "kiln still runs {:?} after SIGTERM",
            sent.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let stopped_in = sent.elapsed();
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    (first + &rest, exit, stopped_in)
}

/// An image this test built, removed (untagged) when dropped.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rmi", "--force", &self.0])
            .output();
    }
}

/// `scripts/image` on the kiln binary under test ([`kiln_bin`]: built with
/// the tests, so the test builds no second copy of wasmtime with other
/// features), under a name of this test's own; its last line is that name.
fn build_image() -> Image {
    let name = format!("localhost/kiln-image-test:{}", std::process::id());
    let out = Command::new(repo_root().join("scripts/image"))
        .arg(&name)
        .current_dir(repo_root())
        .env("KILN_BIN", kiln_bin())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("running scripts/image");
    let image = Image(name);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "scripts/image failed: {stdout}");
    assert_eq!(
        stdout.lines().last(),
        Some(image.0.as_str()),
        "scripts/image prints the image's name last"
    );
    image
}

/// `podman image inspect`'s object for `image`.
fn inspect(image: &str) -> Value {
    let out = podman(&["image", "inspect", image]);
    let mut all: Value = serde_json::from_str(&out).expect("podman's JSON");
    all[0].take()
}

/// Copies the image's filesystem into `to`, owners and modes kept.
fn copy_filesystem(image: &str, to: &Path) {
    let mounted = podman(&["image", "mount", image]);
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", mounted.trim()))
        .arg(to)
        .status();
    podman(&["image", "unmount", image]);
    assert!(copied.is_ok_and(|s| s.success()), "copying {mounted}");
}

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running podman (KILN_IMAGE=1 scripts/setup installs it)");
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image's entrypoint and command as a runtime would start them: in a new
/// network namespace (loopback up), with only the image's environment, chrooted
/// into `rootfs` as `user`. The process keeps its pid through every exec, so
/// the child's pid is kiln's once [`Chrooted::wait_exec`] returns.
struct Chrooted {
    child: Child,
    log_path: PathBuf,
}

impl Chrooted {
    fn start(
        rootfs: &Path,
        log_path: &Path,
        env: &[String],
        user: &str,
        entrypoint: &[String],
        cmd: &[String],
    ) -> Chrooted {
        let log = File::create(log_path).expect("kiln's log file");
        let child = Command::new("unshare")
            .args([
                "--net",
                "--",
                "sh",
                "-c",
                r#"ip link set lo up && exec "$@""#,
            ])
            .args(["sh", "env", "-i"])
            .args(env)
            .arg(which("chroot"))
            .arg(format!("--userspec={user}"))
            .arg(rootfs)
            .args(entrypoint)
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting unshare (util-linux) to run the image");
        Chrooted {
            child,
            log_path: log_path.to_path_buf(),
        }
    }

    /// Waits until the child is kiln (every exec done); its pid.
    fn wait_exec(&mut self) -> u32 {
        let pid = self.child.id();
        let deadline = Instant::now() + WAIT;
        loop {
            self.assert_running();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "kiln" {
                return pid;
            }
            assert!(Instant::now() < deadline, "the entrypoint did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Panics, with kiln's log, if the process has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "the image's entrypoint exited with {status}; its log:\n{}",
                read(&self.log_path)
            );
        }
    }
}

impl Drop for Chrooted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Moves the calling thread into the network namespace of process `pid`
/// (setns(2)): the sockets it opens from then on are that namespace's.
fn enter_network_namespace(pid: u32) {
    unsafe extern "C" {
        fn setns(fd: i32, nstype: i32) -> i32;
    }
    const CLONE_NEWNET: i32 = 0x4000_0000;
    let ns = File::open(format!("/proc/{pid}/ns/net")).expect("kiln's network namespace");
    // SAFETY: setns takes a descriptor that stays open across the call and
    // changes only the calling thread's namespace.
    let rc = unsafe { setns(ns.as_raw_fd(), CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Every file (not directory) under `root`, as paths relative to it, sorted.
fn files_under(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                dirs.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                files.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    files
}

fn keys(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `name`'s absolute path on PATH (`env -i` drops PATH before running it).
fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
        .unwrap_or_else(|| panic!("{name} is not on PATH"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
