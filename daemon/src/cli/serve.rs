//! `kiln serve`: runs the daemon. Opens the event store (embedded or
//! JetStream), the WebAssembly runtime and the view [`Lifecycle`], serves the
//! HTTP API, and on SIGTERM or Ctrl-C stops taking requests, lets every view
//! finish its current batch and writes the registry a last time.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::{ServeArgs, ServeConfig, StoreBackend};
use crate::fleet::Fleet;
use crate::lifecycle::Lifecycle;
use crate::runtime::Runtime;
use crate::snapshots::dir::DirStore;
use crate::snapshots::object::ObjectStore;
use crate::snapshots::{SnapshotConfig, SnapshotStore, Snapshots};
use crate::store::EventStore;
use crate::store::embedded::{EmbeddedConfig, EmbeddedStore};
use crate::store::jetstream::JetStreamStore;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig::load(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(config))
}

/// Runs the daemon until SIGTERM or Ctrl-C.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let mut bucket = None;
    let mut fleet_js = None;
    let store: Arc<dyn EventStore> = match config.store {
        StoreBackend::Embedded => {
            let path = config.data_dir.join("log");
            let mut embedded = EmbeddedConfig::new(&path);
            embedded.durability = config.embedded.durability;
            Arc::new(
                EmbeddedStore::open(embedded)
                    .with_context(|| format!("opening the embedded store at {}", path.display()))?,
            )
        }
        StoreBackend::Jetstream => {
            let js = JetStreamStore::connect(config.jetstream.clone())
                .await
                .with_context(|| {
                    format!(
                        "connecting to JetStream at {}",
                        config.jetstream.servers.join(",")
                    )
                })?;
            if let Some(warning) = js.durability_warning() {
                tracing::warn!("{warning}");
            }
            if let Some(name) = &config.snapshots.bucket {
                let s = &config.snapshots;
                bucket = Some(
                    ObjectStore::open(
                        js.context(),
                        name,
                        config.jetstream.replicas,
                        Duration::from_secs(s.lease_ttl_secs),
                    )
                    .await
                    .with_context(|| format!("opening the snapshot bucket {name}"))?,
                );
            }
            fleet_js = Some(js.context().clone());
            Arc::new(js)
        }
    };
    let runtime = Runtime::new(config.runtime())?;
    let mut lifecycle_config = config.lifecycle();
    lifecycle_config.snapshots = snapshots(&config, bucket)?;
    let lifecycle = Lifecycle::start(lifecycle_config, store, runtime)
        .await
        .context("starting the view lifecycle")?;
    // The fleet's decisions are read before the API answers a read.
    let fleet = match (config.fleet.enabled(), fleet_js) {
        (true, Some(js)) => Some(
            Fleet::start(
                config.fleet.clone(),
                &js,
                config.jetstream.memory_storage,
                lifecycle.clone(),
                config.api.listen.to_string(),
            )
            .await
            .context("joining the fleet")?,
        ),
        _ => None,
    };
    tracing::info!(
        data_dir = %config.data_dir.display(),
        store = ?config.store,
        projections = ?config.projections_dir,
        "kiln serving"
    );
    let served = crate::api::serve_with_fleet(
        lifecycle.clone(),
        fleet.clone(),
        &config.api,
        shutdown_signal(),
    )
    .await;
    tracing::info!("shutting down");
    if let Some(f) = fleet {
        // Its tasks hold the lifecycle: gone before the lifecycle stops.
        f.leave().await;
    }
    lifecycle.shutdown().await;
    served
}

/// The snapshot service `[snapshots]` asks for, if any.
fn snapshots(
    config: &ServeConfig,
    bucket: Option<ObjectStore>,
) -> anyhow::Result<Option<Arc<Snapshots>>> {
    let s = &config.snapshots;
    let store: Box<dyn SnapshotStore> = match (&s.dir, bucket) {
        (Some(dir), _) => Box::new(
            DirStore::open(dir, Duration::from_secs(s.lease_ttl_secs))
                .with_context(|| format!("opening the snapshot directory {}", dir.display()))?,
        ),
        (None, Some(bucket)) => Box::new(bucket),
        (None, None) => return Ok(None),
    };
    // Staged downloads and exports: on the views' file system, emptied at start.
    let work = config.data_dir.join("snapshots-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let mut c = SnapshotConfig::new(work);
    c.every = config.snapshot_every()?;
    c.keep = s.keep;
    c.bootstrap = s.bootstrap;
    c.max_file_bytes = s.max_file_mib << 20;
    c.max_bytes_per_sec = s.max_mib_per_sec << 20;
    if let Some(i) = config.snapshot_instance() {
        c.instance = i;
    }
    tracing::info!(store = %store.describe(), every = ?c.every, keep = c.keep, bootstrap = c.bootstrap, "view snapshots on");
    Ok(Some(Arc::new(Snapshots::new(store, c))))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
