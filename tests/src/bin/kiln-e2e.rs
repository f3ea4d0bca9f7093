//! The `kiln` binary under another name, built with this crate so that cargo
//! rebuilds it before the end-to-end tests run it (see `kiln_tests::daemon`).
//!
//! TEMPORARY: until `kiln serve` lands (issue 5), `serve` is wired here from the
//! same parts (store, lifecycle, api::serve).

use std::path::PathBuf;
use std::sync::Arc;

use kiln::api::{self, ApiConfig};
use kiln::lifecycle::{Lifecycle, LifecycleConfig};
use kiln::runtime::{Runtime, RuntimeConfig};
use kiln::store::EventStore;
use kiln::store::embedded::{EmbeddedConfig, EmbeddedStore};
use kiln::store::jetstream::{JetStreamConfig, JetStreamStore};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("serve") {
        return kiln::cli::main();
    }
    let _ = tracing_subscriber_init();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    match rt.block_on(serve(&args[2..])) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn tracing_subscriber_init() -> Option<()> {
    None
}

async fn serve(args: &[String]) -> anyhow::Result<()> {
    let mut data_dir = PathBuf::from("data");
    let mut projections = None;
    let mut config = ApiConfig::default();
    let mut nats = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--data-dir" => data_dir = PathBuf::from(val()?),
            "--listen" => config.listen = val()?.parse()?,
            "--projections" => projections = Some(PathBuf::from(val()?)),
            "--admin-token" => config.admin_token = Some(val()?),
            "--store" => {
                val()?;
            }
            "--nats-url" => nats = Some(val()?),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    std::fs::create_dir_all(&data_dir)?;
    let store: Arc<dyn EventStore> = match nats {
        Some(url) => Arc::new(JetStreamStore::connect(JetStreamConfig::new(url.as_str())).await?),
        None => Arc::new(EmbeddedStore::open(EmbeddedConfig::new(
            data_dir.join("log"),
        ))?),
    };
    let mut lc = LifecycleConfig::new(&data_dir);
    lc.projections_dir = projections;
    let lifecycle = Lifecycle::start(lc, store, Runtime::new(RuntimeConfig::default())?).await?;
    api::serve(lifecycle.clone(), &config, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    lifecycle.shutdown().await;
    Ok(())
}
