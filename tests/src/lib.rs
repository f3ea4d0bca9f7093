//! Harnesses shared by kiln's integration and end-to-end tests.
//!
//! - [`conformance`]: the store core's contract, run against every backend.
//! - [`embedded`]: a [`conformance::Harness`] for the embedded RocksDB store.
//! - [`wasm`]: the example projections built for wasm32, and event-log helpers.

pub mod conformance;
pub mod embedded;
pub mod wasm;
