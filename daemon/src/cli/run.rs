//! `kiln run <module.wasm> <events.jsonl>`: runs a projection module offline over
//! a file of events and prints the resulting documents as JSONL, in key order.
//!
//! Each input line is one event: `{"stream": "user-1", "type": "UserRegistered",
//! "data": {...}}`, optionally with `"metadata": {"k": "v"}` and `"timestamp"`
//! (milliseconds; defaults to the event's position so runs are reproducible).
//! Positions count lines with events from 1; versions count per stream. Each
//! output line is `{"key": "...", "doc": {...}}`.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use crate::runtime::{Instance, Runtime, RuntimeConfig};
use crate::store::{RecordedEvent, StreamId};
use crate::views::SharedDocuments;

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The projection module (.wasm).
    pub module: PathBuf,
    /// Events, one JSON object per line ("-" for standard input).
    pub events: PathBuf,
    /// Events per batch handed to the module.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// Memory cap of the module's instance, in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: usize,
    /// Deadline of each batch, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub deadline_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputEvent {
    stream: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    data: serde_json::Value,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    timestamp: Option<u64>,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = RuntimeConfig {
        memory_cap: args.memory_mib << 20,
        batch_deadline: Duration::from_millis(args.deadline_ms),
        cache_dir: None,
        limits: Default::default(),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.events == Path::new("-") {
        let stdin = std::io::stdin();
        run_offline(
            &args.module,
            stdin.lock(),
            "<stdin>",
            args.batch,
            config,
            &mut out,
        )?;
    } else {
        let file = std::fs::File::open(&args.events)
            .with_context(|| format!("opening {}", args.events.display()))?;
        let label = args.events.display().to_string();
        run_offline(
            &args.module,
            std::io::BufReader::new(file),
            &label,
            args.batch,
            config,
            &mut out,
        )?;
    }
    out.flush()?;
    Ok(())
}

/// Runs `module` over the events read from `events` (named `label` in errors)
/// and writes every resulting document to `out`. Returns the number of events.
pub fn run_offline(
    module: &Path,
    events: impl BufRead,
    label: &str,
    batch: usize,
    config: RuntimeConfig,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let rt = Runtime::new(config)?;
    let module = rt.load_file(module)?;
    let docs = SharedDocuments::default();
    let mut instance = Instance::new(&module, Box::new(docs.clone()))?;
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut pending = Vec::with_capacity(batch.max(1));
    let mut position = 0u64;
    for (n, line) in events.lines().enumerate() {
        let line = line.with_context(|| format!("reading {label}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{label} line {}", n + 1);
        let input: InputEvent = serde_json::from_str(&line).with_context(at)?;
        let stream = StreamId::new(input.stream).with_context(at)?;
        position += 1;
        let version = versions.entry(stream.as_str().to_string()).or_insert(0);
        *version += 1;
        pending.push(RecordedEvent {
            id: uuid::Uuid::nil(),
            stream,
            event_type: input.event_type,
            version: *version,
            position,
            timestamp: input.timestamp.unwrap_or(position),
            metadata: input.metadata,
            tags: Vec::new(),
            data: input.data.to_string().into(),
        });
        if pending.len() >= batch.max(1) {
            docs.apply(instance.apply(&pending)?);
            pending.clear();
        }
    }
    if !pending.is_empty() {
        docs.apply(instance.apply(&pending)?);
    }
    for (key, doc) in docs.snapshot() {
        let key = String::from_utf8_lossy(&key);
        let doc: serde_json::Value = serde_json::from_slice(&doc)
            .with_context(|| format!("document {key:?} is not JSON"))?;
        // Written by hand so "key" comes first on every line.
        out.write_all(b"{\"key\":")?;
        serde_json::to_writer(&mut *out, &key)?;
        out.write_all(b",\"doc\":")?;
        serde_json::to_writer(&mut *out, &doc)?;
        out.write_all(b"}\n")?;
    }
    Ok(position)
}
