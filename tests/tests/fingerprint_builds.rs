//! "Unchanged logic reuses the view", for modules built the way users build
//! them: real cargo builds of the `users` projection's source, never a
//! rewritten manifest.
//!
//! - Inside a workspace, built the way `scripts/build-projections` builds
//!   (release, fat LTO, one codegen unit; `tests/src/cargo_env.rs`), into the
//!   shared `target/wasm-projections`.
//! - A standalone crate outside any workspace, built with plain
//!   `cargo build --release --target wasm32-unknown-unknown` (cargo's default
//!   release profile), into `target/fingerprint-crates/target`.
//!
//! Each crate is built at 1.0.0 and 1.0.1 from the same source (an alias), and
//! with one line of logic changed: a constant, a match arm, a serialized field
//! name, a dependency's version, a dependency's feature (a new view each time).
//! Both crates carry the example projections' `build.rs` (`--emit-relocs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln::lifecycle::{DeployOutcome, Lifecycle, LifecycleConfig};
use kiln::runtime::fingerprint::{self, Form};
use kiln::runtime::{FingerprintReport, Runtime};
use kiln::store::EventStore;
use kiln::store::embedded::{EmbeddedConfig, EmbeddedStore};
use kiln::views::ViewId;
use kiln_tests::{cargo_env, differential, wasm};

const TARGET: &str = "wasm32-unknown-unknown";

/// The standalone crate's directory is shared: one test at a time edits it.
static STANDALONE: Mutex<()> = Mutex::new(());

fn standalone_lock() -> MutexGuard<'static, ()> {
    STANDALONE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf()
}

/// The `users` example's source, as it is in the repository.
fn users_source() -> String {
    std::fs::read_to_string(workspace().join("projections/users/src/lib.rs"))
        .expect("projections/users/src/lib.rs")
}

fn replace_once(source: &str, from: &str, to: &str) -> String {
    assert_eq!(
        source.matches(from).count(),
        1,
        "the users source should hold {from:?} exactly once"
    );
    source.replacen(from, to, 1)
}

/// A projection crate on disk that the test edits and builds with cargo.
struct Crate {
    /// The crate's directory.
    dir: PathBuf,
    /// The directory cargo runs in (the workspace root, or the crate).
    root: PathBuf,
    target_dir: PathBuf,
    /// Build with `scripts/build-projections`' profile (else cargo's default).
    projection_profile: bool,
    /// Give the crate the examples' `build.rs` (`--emit-relocs`).
    keep_relocations: bool,
    package: &'static str,
}

impl Crate {
    /// `users` as a member of a workspace (with `[workspace.package]` and a
    /// release profile like this repository's), built like the examples.
    fn inside_a_workspace() -> Crate {
        let root = workspace().join("target/fingerprint-crates/workspace");
        let dir = root.join("projections/users");
        std::fs::create_dir_all(dir.join("src")).expect("crate dir");
        let sdk = workspace().join("sdk");
        write(
            &root.join("Cargo.toml"),
            &format!(
                r#"[workspace]
resolver = "3"
members = ["projections/users"]

[workspace.package]
edition = "2024"

[workspace.dependencies]
kiln-sdk = {{ path = "{}" }}
serde = {{ version = "1", features = ["derive"] }}

[profile.release]
debug = "line-tables-only"
incremental = true
codegen-units = 16
"#,
                sdk.display()
            ),
        );
        Crate::lockfile(&root);
        let c = Crate {
            dir,
            root,
            target_dir: workspace().join("target/wasm-projections"),
            projection_profile: true,
            keep_relocations: true,
            package: "fp-workspace-users",
        };
        c.manifest("1.0.0", "");
        c.source(&users_source());
        c
    }

    /// `users` as a crate of its own (its own `[workspace]`), next to a small
    /// dependency `fp-rules` (a path dependency with a version of its own).
    fn standalone() -> Crate {
        let base = workspace().join("target/fingerprint-crates");
        let dir = base.join("standalone");
        std::fs::create_dir_all(dir.join("src")).expect("crate dir");
        std::fs::create_dir_all(base.join("rules/src")).expect("rules dir");
        Crate::lockfile(&dir);
        let c = Crate {
            root: dir.clone(),
            dir,
            target_dir: base.join("target"),
            projection_profile: false,
            keep_relocations: true,
            package: "fp-standalone-users",
        };
        c.rules("0.1.0", 1);
        c.manifest("1.0.0", "");
        c.source(&c.standalone_source());
        c
    }

    /// The same lockfile as this repository: the same dependency versions,
    /// all in the local registry after the workspace's own build.
    fn lockfile(root: &Path) {
        std::fs::copy(workspace().join("Cargo.lock"), root.join("Cargo.lock"))
            .expect("copying Cargo.lock");
    }

    /// The users source, its rename counter stepping by `fp_rules::RENAME_STEP`.
    fn standalone_source(&self) -> String {
        replace_once(
            &users_source(),
            "p.renames += 1;",
            "p.renames += fp_rules::RENAME_STEP;",
        )
    }

    /// Writes the crate's Cargo.toml at `version`, with `extra` dependency lines.
    fn manifest(&self, version: &str, extra: &str) {
        let text = if self.projection_profile {
            format!(
                r#"[package]
name = "{}"
edition.workspace = true
version = "{version}"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
kiln-sdk.workspace = true
serde.workspace = true
{extra}"#,
                self.package
            )
        } else {
            format!(
                r#"[package]
name = "{}"
edition = "2024"
version = "{version}"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
kiln-sdk = {{ path = "{}" }}
serde = {{ version = "1", features = ["derive"] }}
fp-rules = {{ path = "../rules" }}
{extra}
[workspace]
"#,
                self.package,
                workspace().join("sdk").display()
            )
        };
        write(&self.dir.join("Cargo.toml"), &text);
        let build_rs = self.dir.join("build.rs");
        if self.keep_relocations {
            let example = std::fs::read_to_string(workspace().join("projections/users/build.rs"))
                .expect("the example's build.rs");
            write(&build_rs, &example);
        } else if build_rs.exists() {
            std::fs::remove_file(&build_rs).expect("removing build.rs");
        }
    }

    fn source(&self, text: &str) {
        write(&self.dir.join("src/lib.rs"), text);
    }

    /// The `fp-rules` dependency at `version`, with its one constant.
    fn rules(&self, version: &str, step: u32) {
        let dir = self.dir.with_file_name("rules");
        write(
            &dir.join("Cargo.toml"),
            &format!(
                "[package]\nname = \"fp-rules\"\nedition = \"2024\"\nversion = \"{version}\"\npublish = false\n"
            ),
        );
        write(
            &dir.join("src/lib.rs"),
            &format!(
                "//! How far one rename moves the counter.\npub const RENAME_STEP: u32 = {step};\n"
            ),
        );
    }

    /// Builds the crate for wasm32 and returns the module, checked to carry
    /// `version` (cargo may keep a hash-less output of another version as fresh).
    fn build(&self, version: &str) -> Vec<u8> {
        // A fresh mtime, as scripts/build-projections does for a stale module.
        let lib = self.dir.join("src/lib.rs");
        let text = std::fs::read(&lib).expect("lib.rs");
        std::fs::write(&lib, text).expect("touching lib.rs");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&self.root)
            .args(["build", "--offline", "--release", "--target", TARGET])
            .arg("--target-dir")
            .arg(&self.target_dir)
            .args(["-p", self.package]);
        cargo_env::clean_env(&mut cmd);
        if self.projection_profile {
            cargo_env::projection_profile(&mut cmd);
        }
        let out = cmd.output().expect("running cargo");
        assert!(
            out.status.success(),
            "cargo build of {} failed:\n{}",
            self.package,
            String::from_utf8_lossy(&out.stderr)
        );
        let wasm = self
            .target_dir
            .join(TARGET)
            .join("release")
            .join(format!("{}.wasm", self.package.replace('-', "_")));
        let bytes = std::fs::read(&wasm).expect("the built module");
        let manifest = wasm::manifest_of(&bytes);
        assert_eq!(
            manifest["version"],
            version,
            "{} holds another version's build",
            wasm.display()
        );
        bytes
    }
}

/// Copies directory `from` to `to`, files and subdirectories.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating a directory");
    for entry in std::fs::read_dir(from).expect("reading a directory") {
        let path = entry.expect("an entry").path();
        let target = to.join(path.file_name().expect("a name"));
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copying a file");
        }
    }
}

fn write(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("dir");
    }
    // Unchanged files keep their mtime, so cargo reuses what it built.
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).expect("write");
    }
}

fn report(rt: &Runtime, label: &str, bytes: &[u8]) -> FingerprintReport {
    rt.load(label, bytes)
        .unwrap_or_else(|e| panic!("loading {label}: {e}"))
        .fingerprint_report()
        .clone()
}

fn differing(a: &FingerprintReport, b: &FingerprintReport) -> Vec<&'static str> {
    a.parts
        .iter()
        .zip(&b.parts)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.0)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn inside_a_workspace_a_version_bump_aliases_and_a_changed_line_warms() {
    let started = Instant::now();
    let c = Crate::inside_a_workspace();
    let base = c.build("1.0.0");
    c.manifest("1.0.1", "");
    let bumped = c.build("1.0.1");
    c.manifest("1.0.2", "");
    c.source(&replace_once(
        &users_source(),
        "UserEvent::LoginFailed {} => p.failed_logins += 1,",
        "UserEvent::LoginFailed {} => p.failed_logins += 2,",
    ));
    let changed = c.build("1.0.2");
    c.source(&users_source());
    eprintln!("workspace crate: 3 builds in {:?}", started.elapsed());

    let rt = wasm::runtime();
    let (a, b, x) = (
        report(&rt, "1.0.0", &base),
        report(&rt, "1.0.1", &bumped),
        report(&rt, "1.0.2", &changed),
    );
    assert_eq!(
        a.form,
        Form::Relocated,
        "the example build.rs keeps relocations"
    );
    assert_eq!(
        a.fingerprint, b.fingerprint,
        "a version bump keeps the logic"
    );
    assert_ne!(
        a.fingerprint, x.fingerprint,
        "a changed match arm is new logic"
    );
    assert_eq!(differing(&a, &x), ["code"]);

    // Deployed in that order: 1.0.1 aliases 1.0.0, 1.0.2 warms, and each says why.
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn EventStore> =
        Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir.path().join("log"))).expect("store"));
    let mut config = LifecycleConfig::new(dir.path().join("data"));
    config.standby_grace = Duration::from_secs(3600);
    let lifecycle = Lifecycle::start(config, store, rt)
        .await
        .expect("lifecycle");
    let id = |s: &str| s.parse::<ViewId>().expect("view id");
    let first = lifecycle
        .deploy(&base, "users-1.0.0.wasm")
        .await
        .expect("deploy");
    assert_eq!(first, DeployOutcome::Warming(id("users-1_0_0")));
    let second = lifecycle
        .deploy(&bumped, "users-1.0.1.wasm")
        .await
        .expect("deploy");
    assert_eq!(
        second,
        DeployOutcome::Alias {
            id: id("users-1_0_1"),
            of: id("users-1_0_0")
        }
    );
    let third = lifecycle
        .deploy(&changed, "users-1.0.2.wasm")
        .await
        .expect("deploy");
    assert_eq!(third, DeployOutcome::Warming(id("users-1_0_2")));

    let note = |v: &str| {
        lifecycle
            .status_of(&id(v))
            .and_then(|s| s.deploy_note)
            .expect("a deploy note")
    };
    let aliased = note("users-1_0_1");
    assert!(aliased.contains("alias of users-1_0_0"), "{aliased}");
    assert!(aliased.contains(&a.fingerprint.to_string()), "{aliased}");
    let warmed = note("users-1_0_2");
    assert!(warmed.contains("differs from users-1_0_1"), "{warmed}");
    assert!(warmed.contains("in: code"), "{warmed}");
    assert!(!warmed.contains("data"), "{warmed}");
    lifecycle.shutdown().await;
}

#[test]
fn a_standalone_crate_keeps_its_fingerprint_across_versions_and_comments_only() {
    let _only = standalone_lock();
    let started = Instant::now();
    let c = Crate::standalone();
    let rt = wasm::runtime();
    let base = report(&rt, "1.0.0", &c.build("1.0.0"));
    assert_eq!(
        base.form,
        Form::Relocated,
        "the example build.rs keeps relocations"
    );

    c.manifest("1.0.1", "");
    let bumped = report(&rt, "1.0.1", &c.build("1.0.1"));
    assert_eq!(bumped.fingerprint, base.fingerprint, "a version bump");

    // Comments, a blank line and a dependency's version bump without a change
    // of its code keep the fingerprint too.
    c.manifest("1.0.2", "");
    c.source(&replace_once(
        &c.standalone_source(),
        "    fn apply(mut p: Profile",
        "\n    // Folds one event into a profile.\n    fn apply(mut p: Profile",
    ));
    c.rules("0.2.0", 1);
    let commented = report(&rt, "1.0.2", &c.build("1.0.2"));
    assert_eq!(
        commented.fingerprint, base.fingerprint,
        "comments and a dependency bump"
    );
    c.source(&c.standalone_source());
    c.rules("0.1.0", 1);
    eprintln!("standalone crate: 3 builds in {:?}", started.elapsed());
}

#[test]
fn a_standalone_crate_with_one_changed_line_of_logic_gets_a_new_fingerprint() {
    let _only = standalone_lock();
    let started = Instant::now();
    let c = Crate::standalone();
    let rt = wasm::runtime();
    let base = report(&rt, "base", &c.build("1.0.0"));
    let source = c.standalone_source();
    let edits: [(&str, &str, &str); 4] = [
        ("a constant", "p.logins += 1;", "p.logins += 3;"),
        (
            "a match arm",
            "UserEvent::EmailChanged { email } => p.email.clone_from(email),",
            "UserEvent::EmailChanged { email } => p.name.clone_from(email),",
        ),
        (
            "a serialized field name",
            "    pub email: String,\n    pub registered_at",
            "    #[serde(rename = \"mail\")]\n    pub email: String,\n    pub registered_at",
        ),
        (
            "a field read",
            "p.registered_at = e.timestamp;",
            "p.registered_at = e.position;",
        ),
    ];
    let mut seen = vec![(String::from("base"), base.fingerprint)];
    for (what, from, to) in edits {
        c.source(&replace_once(&source, from, to));
        let r = report(&rt, what, &c.build("1.0.0"));
        assert_eq!(r.form, Form::Relocated);
        for (other, fp) in &seen {
            assert_ne!(
                r.fingerprint, *fp,
                "{what} must not share {other}'s fingerprint"
            );
        }
        seen.push((what.to_string(), r.fingerprint));
    }
    c.source(&source);

    // A dependency's new version with another constant.
    c.rules("0.3.0", 2);
    let dep = report(&rt, "fp-rules 0.3.0", &c.build("1.0.0"));
    assert!(
        seen.iter().all(|(_, fp)| *fp != dep.fingerprint),
        "a dependency's version"
    );
    c.rules("0.1.0", 1);

    // A dependency's feature: serde_json's float parsing.
    c.manifest(
        "1.0.0",
        "serde_json = { version = \"1\", features = [\"float_roundtrip\"] }\n",
    );
    let feature = report(&rt, "float_roundtrip", &c.build("1.0.0"));
    assert!(
        seen.iter().all(|(_, fp)| *fp != feature.fingerprint)
            && feature.fingerprint != dep.fingerprint,
        "a dependency's feature"
    );
    c.manifest("1.0.0", "");
    eprintln!("standalone crate: 7 builds in {:?}", started.elapsed());
}

#[test]
fn a_standalone_crate_without_relocations_is_compared_as_laid_out_and_says_so() {
    let _only = standalone_lock();
    let mut c = Crate::standalone();
    c.keep_relocations = false;
    let rt = wasm::runtime();
    c.manifest("1.0.0", "");
    let base = report(&rt, "1.0.0", &c.build("1.0.0"));
    c.manifest("1.0.1", "");
    let bumped = report(&rt, "1.0.1", &c.build("1.0.1"));
    for r in [&base, &bumped] {
        match &r.form {
            Form::LaidOut { reason } => assert!(reason.contains("--emit-relocs"), "{reason}"),
            other => panic!("no relocations, yet {other:?}"),
        }
    }
    // Whether the layout happened to match or not, the note says what to do.
    let note = fingerprint::explain_new_view(
        &bumped,
        Some((
            "users-1_0_0",
            &base.fingerprint.to_string(),
            &base.part_map(),
        )),
    );
    assert!(note.contains("build with --emit-relocs"), "{note}");
    eprintln!(
        "without relocations, 1.0.0 and 1.0.1 {} (parts differing: {:?})",
        if base.fingerprint == bumped.fingerprint {
            "matched"
        } else {
            "differed"
        },
        differing(&base, &bumped)
    );
    c.keep_relocations = true;
    c.manifest("1.0.0", "");
}

/// Issue 26, behind `KILN_FINGERPRINT_SOURCE=1` (a cargo build each): source
/// mutations of `users` built for real at another version. A pair that
/// shares the base's fingerprint must build byte-identical documents and
/// dead letters on the `users` corpus; every pair is run, so the misses
/// (other fingerprint, the same runs) are counted too.
#[test]
fn source_mutations_that_share_a_fingerprint_build_the_same_documents() {
    if std::env::var("KILN_FINGERPRINT_SOURCE").as_deref() != Ok("1") {
        eprintln!("skipped: KILN_FINGERPRINT_SOURCE=1 builds source mutations with cargo");
        return;
    }
    let _only = standalone_lock();
    let started = Instant::now();
    let c = Crate::standalone();
    let rt = wasm::runtime();
    c.manifest("1.0.0", "");
    let base = rt.load("base", &c.build("1.0.0")).expect("base");
    let logs = differential::corpus("users");
    let outcomes: Vec<_> = logs.iter().map(|l| differential::run(&base, l)).collect();
    let source = c.standalone_source();
    let mutations: [(&str, &str, &str); 7] = [
        ("the version only", "", ""),
        (
            "a comment",
            "    fn apply(mut p: Profile",
            "    // Folds one event into a profile.\n    fn apply(mut p: Profile",
        ),
        (
            "a local's name",
            "UserEvent::EmailChanged { email } => p.email.clone_from(email),",
            "UserEvent::EmailChanged { email: m } => p.email.clone_from(m),",
        ),
        ("a constant", "p.logins += 1;", "p.logins += 2;"),
        (
            "a match arm",
            "UserEvent::EmailChanged { email } => p.email.clone_from(email),",
            "UserEvent::EmailChanged { email } => p.name.clone_from(email),",
        ),
        (
            "a string literal",
            "p.id = e.stream_key().to_string();",
            "p.id = format!(\"{}!\", e.stream_key());",
        ),
        (
            "a serialized field name",
            "    pub email: String,\n    pub registered_at",
            "    #[serde(rename = \"mail\")]\n    pub email: String,\n    pub registered_at",
        ),
    ];
    c.manifest("1.0.1", "");
    let mut tally = Mutants::default();
    for (what, from, to) in mutations {
        let text = if from.is_empty() {
            source.clone()
        } else {
            replace_once(&source, from, to)
        };
        c.source(&text);
        let module = rt.load(what, &c.build("1.0.1")).expect("mutant");
        tally.judge("source mutation", what, &base, &module, &logs, &outcomes);
    }
    // A dependency's version: the same code, then another constant.
    c.source(&source);
    let deps = [
        ("a dependency's version (same code)", "0.2.0", 1),
        ("a dependency's version (another constant)", "0.3.0", 2),
    ];
    for (what, version, step) in deps {
        c.rules(version, step);
        let module = rt.load(what, &c.build("1.0.1")).expect("mutant");
        tally.judge("source mutation", what, &base, &module, &logs, &outcomes);
    }
    c.rules("0.1.0", 1);
    // per_stream dropped, the code the same: a sequential run builds the
    // same documents, so the judge alone would let an alias pass; a split
    // warm-up of the old view would not (issue 26, item 1). Never an alias.
    c.source(&replace_once(
        &source,
        "kiln_sdk::export!(PerStream<Users>);",
        WHOLE_USERS,
    ));
    let bytes = c.build("1.0.1");
    // `per_stream` is left out of a manifest when false.
    assert_ne!(wasm::manifest_of(&bytes)["per_stream"], true);
    let whole = rt.load("per_stream dropped", &bytes).expect("mutant");
    assert_ne!(
        whole.fingerprint(),
        base.fingerprint(),
        "per_stream dropped from the source must not alias the per-stream view"
    );
    tally.judge(
        "source mutation",
        "per_stream dropped",
        &base,
        &whole,
        &logs,
        &outcomes,
    );
    let Mutants { aliased, misses } = tally;
    c.source(&source);
    c.manifest("1.0.0", "");
    eprintln!(
        "source mutations: {} built with cargo in {:?}: {aliased} aliased (and ran alike), \
         {misses} misses",
        mutations.len() + deps.len() + 2,
        started.elapsed()
    );
    assert!(aliased >= 2, "the version and a comment alone alias");
}

/// `users` exported through a projection of its own that forwards to
/// `PerStream<Users>` but declares `PER_STREAM = false`: the same code, the
/// manifest alone differs.
const WHOLE_USERS: &str = r#"/// The same projection, not declared per-stream.
pub struct Whole;

impl kiln_sdk::Projection for Whole {
    const NAME: &'static str = <PerStream<Users> as kiln_sdk::Projection>::NAME;
    const EVENTS: &'static [&'static str] = <PerStream<Users> as kiln_sdk::Projection>::EVENTS;
    const CATEGORIES: &'static [&'static str] =
        <PerStream<Users> as kiln_sdk::Projection>::CATEGORIES;
    const PER_STREAM: bool = false;
    type Event = <PerStream<Users> as kiln_sdk::Projection>::Event;

    fn handle(event: &Event<'_, Self::Event>, view: &mut kiln_sdk::View<'_>) -> kiln_sdk::Result<()> {
        <PerStream<Users> as kiln_sdk::Projection>::handle(event, view)
    }

    fn apply_batch(
        input: &[u8],
        view: &mut kiln_sdk::View<'_>,
        on_event: &mut dyn FnMut(u32),
    ) -> Result<(), kiln_sdk::BatchError> {
        <PerStream<Users> as kiln_sdk::Projection>::apply_batch(input, view, on_event)
    }
}

kiln_sdk::export!(Whole);
"#;

/// The same for AssemblyScript (behind `KILN_FINGERPRINT_SOURCE=1`): source
/// mutations of `projections/users-as` built for real with `kiln-as` (the
/// AssemblyScript compiler) at another version, each in a directory of its
/// own under `target/` (so `kiln-sdk-as` resolves from the npm workspace). A
/// pair sharing the base's fingerprint must run alike on the corpus.
#[test]
fn assemblyscript_source_mutations_that_share_a_fingerprint_build_the_same_documents() {
    if std::env::var("KILN_FINGERPRINT_SOURCE").as_deref() != Ok("1") {
        eprintln!("skipped: KILN_FINGERPRINT_SOURCE=1 builds source mutations with kiln-as");
        return;
    }
    let started = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let project = root.join("projections/users-as");
    let source = std::fs::read_to_string(project.join("assembly/index.ts")).expect("users-as");
    let work = root.join("target/as-mutants");
    let _ = std::fs::remove_dir_all(&work);
    let rt = wasm::runtime();
    // `entry` (under `work`) built at `version`, with the package.json of
    // `package` (the "kiln" field: name, events, per_stream).
    let build_in = |entry: PathBuf, package: &Path, text: &str, version: &str| {
        std::fs::create_dir_all(entry.parent().expect("dir")).expect("mutant dir");
        std::fs::write(&entry, text).expect("mutant source");
        let out = entry.with_extension("wasm");
        let built = Command::new("node")
            .arg(root.join("sdk-as/bin/kiln-as.mjs"))
            .args(["build", "--version", version, "--entry"])
            .arg(&entry)
            .arg("--out")
            .arg(&out)
            .current_dir(package)
            .output()
            .expect("running node");
        assert!(
            built.status.success(),
            "kiln-as build of {}: {}",
            entry.display(),
            String::from_utf8_lossy(&built.stderr)
        );
        rt.load("as-mutant", &std::fs::read(&out).expect("mutant module"))
            .expect("mutant loads")
    };
    let build = |n: usize, text: &str, version: &str| {
        build_in(work.join(format!("m{n}/index.ts")), &project, text, version)
    };
    let base = build(0, &source, "1.0.0");
    let logs = differential::corpus("users");
    let outcomes: Vec<_> = logs.iter().map(|l| differential::run(&base, l)).collect();
    let mutations: [(&str, &str, &str); 7] = [
        ("the version only", "", ""),
        (
            "a comment",
            "  apply(p: Profile, e: Event): Profile {",
            "  // Folds one event into a profile.\n  apply(p: Profile, e: Event): Profile {",
        ),
        (
            "a local's name",
            "      const email = data.string(\"email\");\n      p.id = e.streamKey;\n      p.name = name;\n      p.email = email;",
            "      const mail = data.string(\"email\");\n      p.id = e.streamKey;\n      p.name = name;\n      p.email = mail;",
        ),
        ("a constant", "p.logins += 1;", "p.logins += 2;"),
        (
            "a branch",
            "p.email = data.string(\"email\");",
            "p.name = data.string(\"email\");",
        ),
        (
            "a string literal",
            "p.id = e.streamKey;",
            "p.id = e.streamKey + \"!\";",
        ),
        (
            "a serialized field name",
            ".key(\"email\").string(this.email)",
            ".key(\"mail\").string(this.email)",
        ),
    ];
    let mut tally = Mutants::default();
    let mut judge = |what: &str, module: &kiln::runtime::Module| {
        tally.judge(
            "AssemblyScript source mutation",
            what,
            &base,
            module,
            &logs,
            &outcomes,
        )
    };
    for (n, (what, from, to)) in mutations.iter().enumerate() {
        let text = if from.is_empty() {
            source.clone()
        } else {
            replace_once(&source, from, to)
        };
        judge(what, &build(n + 1, &text, "1.0.1"));
    }
    // The SDK at another version, the same code: a copy under `dep/`,
    // which the compiler finds from its working directory (checked by hand:
    // a syntax error put in the copy fails this build).
    let sdk = work.join("dep/node_modules/kiln-sdk-as");
    std::fs::create_dir_all(work.join("dep")).expect("dep dir");
    std::fs::copy(project.join("package.json"), work.join("dep/package.json"))
        .expect("package.json");
    copy_dir(&root.join("sdk-as/assembly"), &sdk.join("assembly"));
    let manifest = std::fs::read_to_string(root.join("sdk-as/package.json")).expect("sdk");
    write(
        &sdk.join("package.json"),
        &replace_once(
            &manifest,
            "\"version\": \"0.1.0\"",
            "\"version\": \"0.2.0\"",
        ),
    );
    let module = build_in(
        work.join("dep/m/index.ts"),
        &work.join("dep"),
        &source,
        "1.0.1",
    );
    judge("kiln-sdk-as's version (same code)", &module);
    // per_stream dropped from package.json, the code the same: never an
    // alias (a sequential run cannot tell; a split warm-up of the old view
    // could).
    let package = work.join("whole");
    let json = std::fs::read_to_string(project.join("package.json")).expect("package.json");
    write(
        &package.join("package.json"),
        &replace_once(&json, "\"per_stream\": true", "\"per_stream\": false"),
    );
    let whole = build_in(work.join("whole/m/index.ts"), &package, &source, "1.0.1");
    assert_ne!(
        whole.fingerprint(),
        base.fingerprint(),
        "per_stream dropped must not alias the per-stream view"
    );
    judge("per_stream dropped", &whole);
    let Mutants { aliased, misses } = tally;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "AssemblyScript source mutations: {} built with kiln-as in {:?}: {aliased} aliased (and ran alike), {misses} misses",
        mutations.len() + 3,
        started.elapsed()
    );
    assert!(aliased >= 2, "the version and a comment alone alias");
}

/// Counts of source mutants judged against their base.
#[derive(Default)]
struct Mutants {
    /// Shared the base's fingerprint (and ran alike: asserted).
    aliased: usize,
    /// Another fingerprint, yet the same runs: a warm-up for nothing.
    misses: usize,
}

impl Mutants {
    /// Runs `module` (mutation `what` of `base`) over `logs`: a mutant with
    /// the base's fingerprint must give the base's `outcomes`.
    fn judge(
        &mut self,
        kind: &str,
        what: &str,
        base: &kiln::runtime::Module,
        module: &kiln::runtime::Module,
        logs: &[Vec<kiln::store::RecordedEvent>],
        outcomes: &[differential::Outcome],
    ) {
        let same = logs
            .iter()
            .zip(outcomes)
            .all(|(log, outcome)| differential::run(module, log) == *outcome);
        let alias = module.fingerprint() == base.fingerprint();
        if alias {
            self.aliased += 1;
            assert!(
                same,
                "{what}: the same fingerprint as the base, other documents or dead letters"
            );
        } else if same {
            self.misses += 1;
        }
        eprintln!(
            "{kind} {what}: {}, {}",
            if alias { "aliases" } else { "a new view" },
            if same { "the same runs" } else { "other runs" }
        );
    }
}
