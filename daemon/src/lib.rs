//! kiln: tails an event log, runs WebAssembly projections, serves versioned views.
//!
//! Start reading at `ARCHITECTURE.md` in the repository root. Modules:
//! - [`store`]: the event log (embedded RocksDB or NATS JetStream).
//! - [`runtime`]: the WebAssembly projection runtime (wasmtime, kiln's host ABI).
//! - [`views`]: view documents and checkpoints, one RocksDB column family per view.
//! - [`lifecycle`]: versioned views: warm-up, cutover, standby, hot deploy.
//! - [`api`]: the HTTP API: queries, read-your-writes, appends, admin, probes, metrics.
//! - [`backup`]: consistent copies of an embedded data directory, and their restore.
//! - [`bench`]: benchmarks behind `kiln bench`, printing comparable figures.
//! - [`fleet`]: instances sharing a JetStream as one fleet: membership, fleet-wide
//!   cutover and rollback through KV compare-and-set, view digests compared.
//! - [`config`]: `kiln serve`'s configuration (TOML file, `KILN_*` variables, flags).
//! - [`cli`]: the `kiln` command line.

pub mod api;
pub mod background;
pub mod backup;
pub mod bench;
pub mod cli;
pub mod config;
pub mod fleet;
pub mod lifecycle;
pub mod runtime;
pub mod snapshots;
pub mod store;
pub mod views;
