//! Running modules for the fingerprint's differential tests (issue 26):
//! the fingerprint the daemon computes, a module's outcome over a log
//! (documents and dead letters, as a worker parks them) and the corpus of
//! logs of each example projection.

use kiln::runtime::fingerprint::{self, FingerprintReport};
use kiln::runtime::{Instance, Module, ProjectionError, manifest_edit};
use kiln::store::RecordedEvent;
use kiln::views::SharedDocuments;
use kiln_sdk::Manifest;
use serde_json::json;

use crate::rng::Rng;
use crate::wasm::EventLog;

/// The fingerprint the daemon computes for `bytes` (`runtime::module`'s
/// load: the manifest without its version), or `None` if the module has no
/// readable manifest or does not parse.
pub fn fingerprint_of(bytes: &[u8]) -> Option<FingerprintReport> {
    let manifest = Manifest::parse(manifest_edit::manifest_bytes(bytes).ok()?).ok()?;
    fingerprint::fingerprint(bytes, &manifest.without_version()).ok()
}

/// What a module made of one log: documents in key order, dead letters.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub documents: Vec<(Vec<u8>, Vec<u8>)>,
    pub dead_letters: Vec<(u64, String)>,
}

/// Events per batch; a failed batch is retried event by event.
pub const BATCH: usize = 16;

pub fn run(module: &Module, log: &[RecordedEvent]) -> Outcome {
    let version = module.manifest().version.clone();
    let message = |e: &dyn std::fmt::Display| e.to_string().replace(&version, "<version>");
    let docs = SharedDocuments::default();
    let mut dead_letters = Vec::new();
    let mut instance = match Instance::new(module, Box::new(docs.clone())) {
        Ok(i) => i,
        Err(e) => {
            return Outcome {
                documents: Vec::new(),
                dead_letters: vec![(0, message(&e))],
            };
        }
    };
    'log: for batch in log.chunks(BATCH) {
        match instance.apply(batch) {
            Ok(writes) => docs.apply(writes),
            Err(_) => {
                for e in batch {
                    match instance.apply(std::slice::from_ref(e)) {
                        Ok(writes) => docs.apply(writes),
                        Err(err) => {
                            let deadline = matches!(err, ProjectionError::Deadline { .. });
                            dead_letters.push((e.position, message(&err)));
                            if deadline {
                                // A module that loops: the rest would only
                                // wait for the deadline again.
                                break 'log;
                            }
                        }
                    }
                }
            }
        }
    }
    Outcome {
        documents: docs.snapshot().into_iter().collect(),
        dead_letters,
    }
}

/// The corpus of logs of a module named `name`: handwritten edge cases and
/// seeded streams of its events, including events it does not want and
/// data it refuses.
pub fn corpus(name: &str) -> Vec<Vec<RecordedEvent>> {
    let mut rng = Rng(0x6b69_6c6e);
    let mut logs = Vec::new();
    match name {
        "users" => {
            let mut a = EventLog::new();
            a.push(
                "user-1",
                "UserRegistered",
                json!({"name": "Ada", "email": "ada@x.io"}),
            )
            .push("user-1", "UserLoggedIn", json!({}))
            .push("user-1", "LoginFailed", json!({}))
            .push("user-1", "UserRenamed", json!({"name": "Ada L."}))
            .push("user-1", "EmailChanged", json!({"email": "ada@l.io"}))
            .push("admin-1", "UserLoggedIn", json!({}))
            .push("user-2", "SomethingElse", json!({}))
            .push("user-2", "UserRenamed", json!({"nom": "x"}))
            .push("user-3", "UserRegistered", json!({"name": 7}));
            logs.push(a.events().to_vec());
            let mut b = EventLog::new();
            for i in 0..120u64 {
                let user = format!("user-{}", rng.below(7));
                match rng.below(6) {
                    0 => b.push(
                        &user,
                        "UserRegistered",
                        json!({"name": format!("n{i}"), "email": format!("e{i}@x")}),
                    ),
                    1 => b.push(&user, "UserRenamed", json!({"name": format!("r{i}")})),
                    2 => b.push(&user, "EmailChanged", json!({"email": format!("m{i}@y")})),
                    3 => b.push(&user, "LoginFailed", json!({})),
                    _ => b.push(&user, "UserLoggedIn", json!({})),
                };
            }
            logs.push(b.events().to_vec());
        }
        "orders" => {
            let mut a = EventLog::new();
            a.push(
                "order-1",
                "OrderPlaced",
                json!({"customer": "c1", "lines": [{"sku": "a", "qty": 2, "unit_cents": 150}]}),
            )
            .push("order-1", "OrderPaid", json!({}))
            .push("order-1", "OrderShipped", json!({}))
            .push("order-9", "OrderShipped", json!({}))
            .push(
                "order-2",
                "OrderPlaced",
                json!({"customer": "c1", "lines": []}),
            )
            .push("order-2", "OrderCancelled", json!({"reason": "late"}))
            .push("order-3", "OrderPlaced", json!({"customer": 1}));
            logs.push(a.events().to_vec());
            let mut b = EventLog::new();
            for i in 0..120u64 {
                let order = format!("order-{}", rng.below(9));
                match rng.below(5) {
                    0 | 1 => b.push(
                        &order,
                        "OrderPlaced",
                        json!({"customer": format!("c{}", rng.below(3)), "lines": [
                            {"sku": format!("s{}", rng.below(4)), "qty": rng.below(5), "unit_cents": i * 10}
                        ]}),
                    ),
                    2 => b.push(&order, "OrderPaid", json!({})),
                    3 => b.push(&order, "OrderShipped", json!({})),
                    _ => b.push(&order, "OrderCancelled", json!({"reason": format!("r{i}")})),
                };
            }
            logs.push(b.events().to_vec());
        }
        "inventory" => {
            let mut b = EventLog::new();
            for _ in 0..120u64 {
                let warehouse = format!("warehouse-{}", rng.below(3));
                let sku = format!("sku-{}", rng.below(5));
                match rng.below(7) {
                    0..=2 => b.push(
                        &warehouse,
                        "StockReceived",
                        json!({"sku": sku, "qty": rng.below(20)}),
                    ),
                    3..=5 => b.push(
                        &warehouse,
                        "StockShipped",
                        json!({"sku": sku, "qty": rng.below(20)}),
                    ),
                    _ => b.push(&warehouse, "WarehouseClosed", json!({})),
                };
            }
            b.push(
                "warehouse-1",
                "StockShipped",
                json!({"sku": "x", "qty": -1}),
            );
            logs.push(b.events().to_vec());
        }
        other => panic!("no corpus for {other}"),
    }
    logs
}
