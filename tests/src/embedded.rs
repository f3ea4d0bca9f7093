//! Harness for the embedded store: a RocksDB log in a temp dir of its own.

use std::sync::Arc;

use async_trait::async_trait;
use kiln::store::EventStore;
use kiln::store::embedded::{Durability, EmbeddedConfig, EmbeddedStore};

use crate::conformance::Harness;

pub struct EmbeddedHarness {
    dir: tempfile::TempDir,
    store: Option<EmbeddedStore>,
}

impl EmbeddedHarness {
    fn config(&self) -> EmbeddedConfig {
        let mut config = EmbeddedConfig::new(self.dir.path().join("log"));
        // Tests care about semantics, not power-loss durability.
        config.durability = Durability::Buffered;
        config
    }

    pub fn embedded(&self) -> &EmbeddedStore {
        self.store.as_ref().expect("store is open")
    }
}

#[async_trait]
impl Harness for EmbeddedHarness {
    async fn start() -> Self {
        let mut h = EmbeddedHarness {
            dir: tempfile::tempdir().expect("temp dir"),
            store: None,
        };
        h.store = Some(EmbeddedStore::open(h.config()).expect("open embedded store"));
        h
    }

    fn store(&self) -> Arc<dyn EventStore> {
        Arc::new(self.embedded().clone())
    }

    async fn reopen(&mut self) {
        drop(self.store.take());
        self.store = Some(EmbeddedStore::open(self.config()).expect("reopen embedded store"));
    }
}
