//! `kiln migrate --to-jetstream <url>`: copies an embedded log (offline) into
//! a JetStream stream, keeping order, versions, ids, metadata, tags and the
//! timestamps projections see; resumable, and refusing a target that holds
//! anything but a prefix of the log. The copy itself is
//! [`crate::store::migrate`]; this module opens both ends and reports.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::config::ServeConfig;
use crate::store::embedded::{EmbeddedConfig, EmbeddedStore};
use crate::store::jetstream::JetStreamStore;
use crate::store::migrate::{MigrateOptions, Progress, migrate};

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// NATS server URL(s) of the target, comma-separated.
    #[arg(long = "to-jetstream", value_delimiter = ',', required = true)]
    pub to_jetstream: Vec<String>,
    /// The data directory `kiln serve` ran the embedded store in (its log is
    /// `<data-dir>/log`); the daemon must be stopped [default: the config
    /// file's, else ./data].
    #[arg(long, env = "KILN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A `kiln serve` TOML file: its `[jetstream]` table (stream, subject
    /// prefix, replicas, auth, TLS, limits…) configures the target.
    #[arg(long, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// JetStream stream to copy into [default: KILN].
    #[arg(long, env = "KILN_NATS_STREAM")]
    pub nats_stream: Option<String>,
    /// Subject prefix of the events [default: kiln].
    #[arg(long)]
    pub subject_prefix: Option<String>,
    /// Replicas of the stream, if kiln creates it (1, 3 or 5) [default: 1].
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Stop after copying this many events (tests of an interrupted run).
    #[arg(long, hide = true)]
    pub limit: Option<u64>,
}

pub fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => ServeConfig::from_file(path)?,
        None => ServeConfig::default(),
    };
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    let mut js = config.jetstream.clone();
    js.servers = args.to_jetstream.clone();
    if let Some(s) = &args.nats_stream {
        js.stream = s.clone();
    }
    if let Some(p) = &args.subject_prefix {
        js.subject_prefix = p.clone();
    }
    if let Some(r) = args.replicas {
        js.replicas = r;
    }
    js.validate().context("the JetStream settings")?;
    let log = config.data_dir.join("log");
    anyhow::ensure!(
        log.join("CURRENT").is_file(),
        "no embedded log at {}: --data-dir must be the data directory `kiln serve` ran the \
         embedded store in",
        log.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let source = EmbeddedStore::open(EmbeddedConfig::new(&log)).map_err(|e| {
            if e.to_string().to_lowercase().contains("lock") {
                anyhow::anyhow!(
                    "the embedded log at {} is in use by another process (is `kiln serve` \
                     running on {}? stop it first: migrate reads the log offline): {e}",
                    log.display(),
                    config.data_dir.display()
                )
            } else {
                anyhow::anyhow!("opening the embedded log at {}: {e}", log.display())
            }
        })?;
        let target = JetStreamStore::connect(js.clone())
            .await
            .with_context(|| format!("connecting to JetStream at {}", js.servers.join(",")))?;
        let started = Instant::now();
        let options = MigrateOptions {
            limit: args.limit,
            report_every: Duration::from_secs(1),
        };
        let mut first = true;
        let report = |p: &Progress| {
            if std::mem::take(&mut first) {
                eprintln!(
                    "source {}: {} events; target stream '{}': {} of them already there \
                     (verified), copying the rest",
                    log.display(),
                    p.source_events,
                    js.stream,
                    p.already_copied
                );
                return;
            }
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            eprintln!(
                "copied {}/{} events ({:.0} events/s)",
                p.done(),
                p.source_events,
                p.copied as f64 / secs
            );
        };
        let p = migrate(&source, &target, target.limits(), options, report).await?;
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        println!(
            "migrated {}/{} events into stream '{}' ({} copied now, {} already there) in \
             {secs:.1} s: {:.0} events/s; target head {}",
            p.done(),
            p.source_events,
            js.stream,
            p.copied,
            p.already_copied,
            p.copied as f64 / secs,
            p.target_head
        );
        if p.done() < p.source_events {
            println!(
                "stopped early (--limit): run the same command again to copy the remaining {}",
                p.source_events - p.done()
            );
        }
        Ok(())
    })
}
