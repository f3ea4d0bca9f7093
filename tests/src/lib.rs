//! Harnesses shared by kiln's integration and end-to-end tests.
//!
//! - [`cargo_env`]: a clean environment for a nested cargo (projection builds).
//! - [`daemon`]: a real `kiln serve` process over HTTP, with kill -9 and restart.
//! - [`conformance`]: the store core's contract, run against every backend.
//! - [`embedded`]: a [`conformance::Harness`] for the embedded RocksDB store.
//! - [`lifecycle`]: an in-process lifecycle on the embedded store, and helpers.
//! - [`rng`]: a seeded generator for generated tests (SplitMix64).
//! - [`nats`]: a real `nats-server` per test, and the JetStream store's harness.
//! - [`wasm`]: the example projections built for wasm32, and event-log helpers.

pub mod browser;
pub mod cargo_env;
pub mod conformance;
pub mod daemon;
pub mod differential;
pub mod embedded;
pub mod lifecycle;
pub mod nats;
pub mod proxy;
pub mod rng;
pub mod wasm;
