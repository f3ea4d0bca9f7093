//! kiln: tails an event log, runs WebAssembly projections, serves versioned views.
//!
//! Start reading at `ARCHITECTURE.md` in the repository root. Modules:
//! - [`store`]: the event log (embedded RocksDB or NATS JetStream).
//! - [`bench`]: benchmarks behind `kiln bench`, printing comparable figures.
//! - [`cli`]: the `kiln` command line.

pub mod bench;
pub mod cli;
pub mod store;
