//! `kiln new <name> [--lang rust|assemblyscript] [--per-stream]`: scaffolds a
//! projection project in a new directory, outside any kiln checkout, that
//! builds as it is, with a unit test and a README of three commands (test,
//! build, deploy).
//!
//! The project reaches kiln's SDK by path: `kiln-sdk` (Rust) or `kiln-sdk-as`
//! (AssemblyScript) in the kiln directory given by `--kiln` or `KILN_HOME`, by
//! default the checkout this binary was built from.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

/// The checkout this binary was built from (holds `sdk/` and `sdk-as/`).
const BUILT_FROM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    #[value(name = "assemblyscript", alias = "as")]
    AssemblyScript,
}

#[derive(Args, Debug, Clone)]
pub struct NewArgs {
    /// The projection's (view's) name: `-`-separated parts of ASCII letters,
    /// digits and `_`, each starting with a letter. Also the directory's name.
    pub name: String,
    /// The language of the projection.
    #[arg(long, value_enum, default_value = "rust")]
    pub lang: Lang,
    /// The per-stream form: one state document per stream, `apply(state, event)`.
    #[arg(long)]
    pub per_stream: bool,
    /// Where to create the project (default: ./<name>); must not exist or be empty.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The kiln directory holding the SDKs (`sdk/`, `sdk-as/`); default: the
    /// checkout this kiln was built from.
    #[arg(long, env = "KILN_HOME")]
    pub kiln: Option<PathBuf>,
}

pub fn run(args: NewArgs) -> anyhow::Result<()> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    let files = scaffold(&args)?;
    write_project(&dir, &files)?;
    let (test, build, deploy) = commands(&args);
    println!(
        "created {} ({} projection `{}`{})\n\n  cd {}\n{}  {test}\n  {build}\n  {deploy}",
        dir.display(),
        match args.lang {
            Lang::Rust => "Rust",
            Lang::AssemblyScript => "AssemblyScript",
        },
        args.name,
        if args.per_stream { ", per stream" } else { "" },
        dir.display(),
        if args.lang == Lang::AssemblyScript {
            "  npm install\n"
        } else {
            ""
        },
    );
    Ok(())
}

/// The project's files: (path relative to its directory, contents).
pub fn scaffold(args: &NewArgs) -> anyhow::Result<Vec<(&'static str, String)>> {
    check_name(&args.name)?;
    let kiln = match &args.kiln {
        Some(k) => k.clone(),
        None => PathBuf::from(BUILT_FROM),
    };
    let sdk_dir = kiln.join(match args.lang {
        Lang::Rust => "sdk",
        Lang::AssemblyScript => "sdk-as",
    });
    let manifest = sdk_dir.join(match args.lang {
        Lang::Rust => "Cargo.toml",
        Lang::AssemblyScript => "package.json",
    });
    if !manifest.is_file() {
        bail!(
            "the kiln SDK is not at {} (the kiln directory is {}): pass --kiln <your kiln checkout> or set KILN_HOME",
            sdk_dir.display(),
            kiln.display()
        );
    }
    let sdk = std::fs::canonicalize(&sdk_dir)
        .with_context(|| format!("resolving {}", sdk_dir.display()))?;
    let sdk = sdk
        .to_str()
        .context("the SDK's path is not UTF-8")?
        .replace('\\', "/");
    let vars = Vars {
        name: &args.name,
        ident: args.name.replace('-', "_"),
        type_name: type_name(&args.name),
        sdk: &sdk,
    };
    let (test, build, deploy) = commands(args);
    let readme = readme(args, &test, &build, &deploy);
    Ok(match args.lang {
        Lang::Rust => vec![
            ("Cargo.toml", vars.fill(RUST_CARGO)),
            ("build.rs", RUST_BUILD.to_string()),
            (
                "src/lib.rs",
                vars.fill(if args.per_stream {
                    RUST_PER_STREAM
                } else {
                    RUST_PROJECTION
                }),
            ),
            (".gitignore", "/target\n".to_string()),
            ("README.md", readme),
        ],
        Lang::AssemblyScript => vec![
            ("package.json", {
                let package = vars.fill(AS_PACKAGE);
                if args.per_stream {
                    // Warmed by stream partitions, as the Rust PerStream is.
                    package.replace(
                        "\"categories\": []",
                        "\"categories\": [],\n    \"per_stream\": true",
                    )
                } else {
                    package
                }
            }),
            (".npmrc", AS_NPMRC.to_string()),
            ("asconfig.json", AS_CONFIG.to_string()),
            ("assembly/tsconfig.json", AS_TSCONFIG.to_string()),
            (
                "assembly/index.ts",
                vars.fill(if args.per_stream {
                    AS_PER_STREAM
                } else {
                    AS_PROJECTION
                }),
            ),
            (
                "test/projection.test.mjs",
                vars.fill(if args.per_stream {
                    AS_PER_STREAM_TEST
                } else {
                    AS_PROJECTION_TEST
                }),
            ),
            (".gitignore", "node_modules/\nbuild/\n".to_string()),
            ("README.md", readme),
        ],
    })
}

/// The README's three commands: test, build, deploy.
fn commands(args: &NewArgs) -> (String, String, String) {
    match args.lang {
        Lang::Rust => (
            "cargo test".into(),
            "cargo build --release --target wasm32-unknown-unknown".into(),
            format!(
                "kiln deploy target/wasm32-unknown-unknown/release/{}.wasm --wait",
                args.name.replace('-', "_")
            ),
        ),
        Lang::AssemblyScript => (
            "npm test".into(),
            "npm run build".into(),
            format!("kiln deploy build/{}.wasm --wait", args.name),
        ),
    }
}

fn readme(args: &NewArgs, test: &str, build: &str, deploy: &str) -> String {
    let (lang, setup, edit, module) = match args.lang {
        Lang::Rust => (
            "Rust",
            "Needs Rust with the wasm32 target (`rustup target add wasm32-unknown-unknown`).\n",
            "`src/lib.rs`",
            format!(
                "target/wasm32-unknown-unknown/release/{}.wasm",
                args.name.replace('-', "_")
            ),
        ),
        Lang::AssemblyScript => (
            "AssemblyScript",
            "Needs Node.js 20 or later; run `npm install` once.\n",
            "`assembly/index.ts` (the view's name, event types and categories are in package.json's `kiln` field, the version is package.json's)",
            format!("build/{}.wasm", args.name),
        ),
    };
    format!(
        "# {name}\n\nA kiln projection in {lang}, made by `kiln new`. Its code is {edit}.\n{setup}\n\
         ```sh\n{test}    # test: the unit tests\n{build}    # build: the module, {module}\n{deploy}    # deploy: to the daemon at $KILN_URL (default {default_url})\n```\n\n\
         After a deploy the view warms from the first event; `kiln status` shows its progress and\n\
         `kiln get {name} <key>` reads a document. Bump the version to deploy a new one beside it\n\
         (blue-green). See kiln's README, \"Write a projection\".\n",
        name = args.name,
        default_url = super::client::DEFAULT_URL,
    )
}

fn write_project(dir: &Path, files: &[(&str, String)]) -> anyhow::Result<()> {
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        if entries.next().is_some() {
            bail!("{} exists and is not empty", dir.display());
        }
    }
    for (path, contents) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The manifest's name rule (sdk/ABI.md).
fn check_name(name: &str) -> anyhow::Result<()> {
    let part_ok = |p: &str| {
        p.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if !name.split('-').all(part_ok) {
        bail!(
            "{name:?} is not a projection name: '-'-separated parts of ASCII letters, digits and _, each starting with a letter"
        );
    }
    Ok(())
}

/// `order-totals` → `OrderTotals`.
fn type_name(name: &str) -> String {
    name.split(['-', '_'])
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

struct Vars<'a> {
    name: &'a str,
    ident: String,
    type_name: String,
    sdk: &'a str,
}

impl Vars<'_> {
    fn fill(&self, template: &str) -> String {
        template
            .replace("{{name}}", self.name)
            .replace("{{ident}}", &self.ident)
            .replace("{{Type}}", &self.type_name)
            .replace("{{sdk}}", self.sdk)
    }
}

const RUST_CARGO: &str = r#"[package]
name = "{{ident}}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
# kiln's Rust SDK, from the kiln checkout `kiln new` was run with.
kiln-sdk = { path = "{{sdk}}" }
serde = { version = "1", features = ["derive"] }

[dev-dependencies]
serde_json = "1"

[profile.release]
lto = true
codegen-units = 1
debug = false

# A project of its own, even when created inside another workspace.
[workspace]
"#;

const RUST_BUILD: &str = r#"//! Keeps the linker's relocations in the wasm module (`--emit-relocs`): with
//! them kiln tells a rebuild at another version (same logic) from a change of
//! logic, and the new version reuses the view.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo::rustc-cdylib-link-arg=--emit-relocs");
    }
}
"#;

const RUST_PER_STREAM: &str = r#"//! `{{name}}`: one document per stream, in the SDK's per-stream form:
//! `apply(state, event) -> state`.

use kiln_sdk::{Event, PerStream, StreamProjection};
use serde::{Deserialize, Serialize};

/// The events handled: each variant is an event type, its fields the event's data.
#[derive(Debug, Deserialize)]
pub enum {{Type}}Event {
    Created { title: String },
    Touched {},
}

/// The document kept per stream.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub title: String,
    pub touches: u64,
    pub last_touched: Option<u64>,
}

pub struct {{Type}};

impl StreamProjection for {{Type}} {
    const NAME: &'static str = "{{name}}";
    const EVENTS: &'static [&'static str] = &["Created", "Touched"];
    type Event = {{Type}}Event;
    type State = State;

    fn apply(mut s: State, e: &Event<'_, {{Type}}Event>) -> State {
        match &e.data {
            {{Type}}Event::Created { title } => s.title.clone_from(title),
            {{Type}}Event::Touched {} => {
                s.touches += 1;
                s.last_touched = Some(e.timestamp);
            }
        }
        s
    }
}

kiln_sdk::export!(PerStream<{{Type}}>);

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_sdk::Harness;
    use serde_json::json;

    #[test]
    fn a_stream_is_created_then_touched() {
        let mut h = Harness::<PerStream<{{Type}}>>::new();
        h.event("thing-1", "Created", json!({"title": "first"}))
            .unwrap()
            .event("thing-1", "Touched", json!({}))
            .unwrap();
        let s: State = h.doc("thing-1").unwrap();
        assert_eq!((s.title.as_str(), s.touches, s.last_touched), ("first", 1, Some(2)));
    }
}
"#;

const RUST_PROJECTION: &str = r#"//! `{{name}}`: events in, documents out; one event may write several documents.

use kiln_sdk::{Event, Projection, View};
use serde::{Deserialize, Serialize};

/// The events handled: each variant is an event type, its fields the event's data.
#[derive(Debug, Deserialize)]
pub enum {{Type}}Event {
    Created { title: String },
    Touched {},
}

/// The document kept per stream.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub title: String,
    pub touches: u64,
}

/// Totals over every stream, at the key `totals`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub created: u64,
    pub touches: u64,
}

pub struct {{Type}};

impl Projection for {{Type}} {
    const NAME: &'static str = "{{name}}";
    const EVENTS: &'static [&'static str] = &["Created", "Touched"];
    type Event = {{Type}}Event;

    fn handle(e: &Event<'_, {{Type}}Event>, view: &mut View<'_>) -> kiln_sdk::Result<()> {
        match &e.data {
            {{Type}}Event::Created { title } => {
                view.put(e.stream, &Item { title: title.clone(), touches: 0 })?;
                view.update("totals", |t: &mut Totals| t.created += 1)
            }
            {{Type}}Event::Touched {} => {
                let Some(mut item) = view.get::<Item>(e.stream)? else {
                    return Err(kiln_sdk::Error::msg(format!("{} was never created", e.stream)));
                };
                item.touches += 1;
                view.put(e.stream, &item)?;
                view.update("totals", |t: &mut Totals| t.touches += 1)
            }
        }
    }
}

kiln_sdk::export!({{Type}});

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_sdk::Harness;
    use serde_json::json;

    #[test]
    fn items_and_totals_follow_the_events() {
        let mut h = Harness::<{{Type}}>::new();
        h.event("thing-1", "Created", json!({"title": "first"}))
            .unwrap()
            .event("thing-1", "Touched", json!({}))
            .unwrap();
        assert_eq!(h.doc::<Item>("thing-1").unwrap().touches, 1);
        assert_eq!(h.doc::<Totals>("totals").unwrap(), Totals { created: 1, touches: 1 });
        let err = h.event("thing-2", "Touched", json!({})).unwrap_err();
        assert_eq!(err.position, 3);
    }
}
"#;

const AS_PACKAGE: &str = r#"{
  "name": "{{name}}",
  "version": "0.1.0",
  "private": true,
  "type": "module",
  "kiln": {
    "name": "{{name}}",
    "events": ["Created", "Touched"],
    "categories": []
  },
  "scripts": {
    "build": "kiln-as build",
    "test": "kiln-as build && node --test test/"
  },
  "dependencies": {
    "kiln-sdk-as": "file:{{sdk}}"
  }
}
"#;

/// Installs the SDK as a copy (not a link into the kiln checkout), with its
/// own dependencies (the pinned AssemblyScript compiler) in this project.
const AS_NPMRC: &str = "install-links=true\n";

/// For editors and plain `asc`; `kiln-as build` passes the same options.
const AS_CONFIG: &str = r#"{
  "options": {
    "runtime": "stub",
    "optimizeLevel": 3,
    "shrinkLevel": 0,
    "use": ["abort=~lib/kiln-sdk-as/assembly/failure/kilnAbort"]
  }
}
"#;

const AS_TSCONFIG: &str = r#"{
  "extends": "assemblyscript/std/assembly.json",
  "include": ["./**/*.ts"]
}
"#;

const AS_PER_STREAM: &str = r#"// `{{name}}`: one document per stream, in the SDK's per-stream form:
// `apply(state, event) -> state`.

import { Document, Event, JsonObject, JsonWriter, PerStream, register } from "kiln-sdk-as/assembly";
export { kiln_alloc, kiln_apply } from "kiln-sdk-as/assembly";

/** The document kept per stream. */
class State extends Document {
  title: string = "";
  touches: u64 = 0;
  last_touched: u64 = 0;
  has_last_touched: bool = false;

  readJson(o: JsonObject): void {
    this.title = o.string("title");
    this.touches = o.u64("touches");
    this.has_last_touched = !o.isNull("last_touched");
    if (this.has_last_touched) this.last_touched = o.u64("last_touched");
  }

  writeJson(w: JsonWriter): void {
    w.beginObject()
      .key("title").string(this.title)
      .key("touches").u64(this.touches)
      .key("last_touched").u64OrNull(this.has_last_touched, this.last_touched)
      .endObject();
  }
}

class {{Type}} extends PerStream<State> {
  apply(s: State, e: Event): State {
    if (e.type == "Created") {
      s.title = e.data.string("title");
    } else if (e.type == "Touched") {
      s.touches += 1;
      s.last_touched = e.timestamp;
      s.has_last_touched = true;
    }
    return s;
  }
}

register(new {{Type}}());
"#;

const AS_PROJECTION: &str = r#"// `{{name}}`: events in, documents out; one event may write several documents.

import { Document, Event, JsonObject, JsonWriter, Projection, View, fail, register } from "kiln-sdk-as/assembly";
export { kiln_alloc, kiln_apply } from "kiln-sdk-as/assembly";

/** The document kept per stream. */
class Item extends Document {
  title: string = "";
  touches: u64 = 0;

  readJson(o: JsonObject): void {
    this.title = o.string("title");
    this.touches = o.u64("touches");
  }

  writeJson(w: JsonWriter): void {
    w.beginObject().key("title").string(this.title).key("touches").u64(this.touches).endObject();
  }
}

/** Totals over every stream, at the key `totals`. */
class Totals extends Document {
  created: u64 = 0;
  touches: u64 = 0;

  readJson(o: JsonObject): void {
    this.created = o.u64("created");
    this.touches = o.u64("touches");
  }

  writeJson(w: JsonWriter): void {
    w.beginObject().key("created").u64(this.created).key("touches").u64(this.touches).endObject();
  }
}

class {{Type}} extends Projection {
  handle(e: Event, view: View): void {
    if (e.type == "Created") {
      const item = new Item();
      item.title = e.data.string("title");
      view.put<Item>(e.stream, item);
      view.update<Totals>("totals", (t: Totals): void => {
        t.created += 1;
      });
    } else if (e.type == "Touched") {
      const item = view.get<Item>(e.stream);
      if (item === null) {
        fail(e.stream + " was never created");
        return;
      }
      item.touches += 1;
      view.put<Item>(e.stream, item);
      view.update<Totals>("totals", (t: Totals): void => {
        t.touches += 1;
      });
    }
  }
}

register(new {{Type}}());
"#;

const AS_PER_STREAM_TEST: &str = r#"// Unit tests, run in Node by the SDK's harness (`npm test` builds the module first).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Harness } from "kiln-sdk-as/harness";

test("a stream is created then touched", async () => {
  const h = await Harness.load(new URL("../build/{{name}}.wasm", import.meta.url));
  h.event("thing-1", "Created", { title: "first" }).event("thing-1", "Touched", {});
  assert.equal(h.raw("thing-1"), '{"title":"first","touches":1,"last_touched":2}');
});
"#;

const AS_PROJECTION_TEST: &str = r#"// Unit tests, run in Node by the SDK's harness (`npm test` builds the module first).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Harness } from "kiln-sdk-as/harness";

test("items and totals follow the events", async () => {
  const h = await Harness.load(new URL("../build/{{name}}.wasm", import.meta.url));
  h.event("thing-1", "Created", { title: "first" }).event("thing-1", "Touched", {});
  assert.equal(h.doc("thing-1").touches, 1);
  assert.deepEqual(h.doc("totals"), { created: 1, touches: 1 });
  assert.throws(
    () => h.event("thing-2", "Touched", {}),
    (e) => e.kind === "failed" && e.position === 3 && e.detail === "thing-2 was never created",
  );
});
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn args(name: &str, lang: Lang, per_stream: bool) -> NewArgs {
        NewArgs {
            name: name.into(),
            lang,
            per_stream,
            dir: None,
            kiln: None,
        }
    }

    #[test]
    fn names_follow_the_manifest_rule() {
        assert!(scaffold(&args("order-totals", Lang::Rust, false)).is_ok());
        let e = scaffold(&args("9lives", Lang::Rust, false)).unwrap_err();
        assert!(e.to_string().contains("not a projection name"), "{e}");
        assert_eq!(type_name("order-totals_v2"), "OrderTotalsV2");
    }

    #[test]
    fn a_missing_sdk_names_the_flag() {
        let mut a = args("things", Lang::AssemblyScript, true);
        a.kiln = Some(PathBuf::from("/nonexistent/kiln"));
        let e = scaffold(&a).unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent/kiln/sdk-as") && e.contains("--kiln"),
            "{e}"
        );
    }

    #[test]
    fn the_readme_names_the_url_the_daemon_listens_on() {
        let listen = crate::config::ServeConfig::load(&Default::default())
            .unwrap()
            .api
            .listen;
        assert_eq!(
            super::super::client::DEFAULT_URL,
            format!("http://{listen}")
        );
        for lang in [Lang::Rust, Lang::AssemblyScript] {
            let files = scaffold(&args("things", lang, false)).unwrap();
            let readme = &files.iter().find(|(p, _)| *p == "README.md").unwrap().1;
            assert!(
                readme.contains(&format!("(default http://{listen})")),
                "{readme}"
            );
        }
    }

    #[test]
    fn every_placeholder_is_filled() {
        for lang in [Lang::Rust, Lang::AssemblyScript] {
            for per_stream in [false, true] {
                for (path, text) in scaffold(&args("things", lang, per_stream)).unwrap() {
                    assert!(!text.contains("{{"), "{path} keeps a placeholder");
                }
            }
        }
    }
}
