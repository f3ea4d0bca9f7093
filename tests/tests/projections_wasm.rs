//! The example projections end to end: built to wasm by `tests/build.rs`, run by
//! the runtime into a real view, and compared byte for byte with the same code
//! run natively through the SDK's harness.

use std::collections::BTreeMap;

use kiln::runtime::{Module, Projector};
use kiln::views::{ViewId, ViewStore};
use kiln_sdk::{Harness, PerStream, Projection};
use kiln_tests::wasm::{self, EventLog, INVENTORY, ORDERS, USERS};
use serde_json::{Value, json};

/// Every document of the module's view after applying `log` in batches of `batch`.
fn run_wasm(module: &Module, log: &EventLog, batch: usize) -> BTreeMap<String, Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let views = ViewStore::open(dir.path()).unwrap();
    let mut p = Projector::open(module, &views).unwrap();
    for chunk in log.events().chunks(batch) {
        p.apply(chunk).unwrap_or_else(|e| panic!("{e}"));
    }
    let last = log.events().last().map_or(0, |e| e.position);
    assert_eq!(views.checkpoint(p.view()).unwrap(), last);
    documents(&views, p.view())
}

fn documents(views: &ViewStore, view: &ViewId) -> BTreeMap<String, Vec<u8>> {
    views
        .scan(view, b"", None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (String::from_utf8(k).unwrap(), v))
        .collect()
}

fn run_native<P: Projection>(log: &EventLog) -> BTreeMap<String, Vec<u8>> {
    let mut h = Harness::<P>::new();
    for e in log.events() {
        let data: Value = serde_json::from_slice(&e.data).unwrap();
        h.event(e.stream.as_str(), &e.event_type, data).unwrap();
    }
    h.documents().clone()
}

/// wasm == native, byte for byte, whatever the batch size.
fn assert_same_as_native<P: Projection>(path: &str, log: &EventLog) -> BTreeMap<String, Vec<u8>> {
    let rt = wasm::runtime();
    let module = wasm::load(&rt, path);
    let native = run_native::<P>(log);
    assert!(!native.is_empty());
    for batch in [1, 3, usize::MAX] {
        let got = run_wasm(&module, log, batch);
        assert_eq!(
            got, native,
            "{path} in batches of {batch} differs from native"
        );
    }
    native
}

fn doc(docs: &BTreeMap<String, Vec<u8>>, key: &str) -> Value {
    serde_json::from_slice(docs.get(key).unwrap_or_else(|| panic!("no document {key}"))).unwrap()
}

fn users_log() -> EventLog {
    let mut log = EventLog::new();
    log.push(
        "user-1",
        "UserRegistered",
        json!({"name": "Ada", "email": "ada@x.io"}),
    )
    .push(
        "user-2",
        "UserRegistered",
        json!({"name": "Bob", "email": "bob@x.io"}),
    )
    .push("user-1", "UserLoggedIn", json!({}))
    .push("admin-1", "UserLoggedIn", json!({}))
    .push("user-1", "UserRenamed", json!({"name": "Ada Lovelace"}))
    .push("user-2", "LoginFailed", json!({}))
    .push("user-2", "EmailChanged", json!({"email": "robert@x.io"}))
    .push("user-1", "UserLoggedIn", json!({}))
    .push("user-2", "Unrelated", json!({"ignored": true}));
    log
}

#[test]
fn users_profiles_match_native_and_expectations() {
    let docs = assert_same_as_native::<PerStream<projection_users::Users>>(USERS, &users_log());
    assert_eq!(docs.keys().collect::<Vec<_>>(), ["user-1", "user-2"]);
    let ada = doc(&docs, "user-1");
    assert_eq!(ada["name"], "Ada Lovelace");
    assert_eq!(
        (
            ada["logins"].as_u64(),
            ada["renames"].as_u64(),
            ada["last_login"].as_u64()
        ),
        (Some(2), Some(1), Some(8))
    );
    let bob = doc(&docs, "user-2");
    assert_eq!(
        (bob["email"].as_str(), bob["failed_logins"].as_u64()),
        (Some("robert@x.io"), Some(1))
    );
}

#[test]
fn users_module_manifest_and_view_id() {
    let rt = wasm::runtime();
    let m = wasm::load(&rt, USERS);
    assert_eq!(m.view_id().to_string(), "users-1_0_0");
    assert_eq!(m.manifest().categories, ["user"]);
    assert!(
        m.wants("user-7", "UserRenamed")
            && !m.wants("user-7", "Unrelated")
            && !m.wants("admin-1", "UserRenamed")
    );
}

#[test]
fn orders_update_order_and_customer_documents_from_one_event() {
    let mut log = EventLog::new();
    let lines = |cents: u64| json!([{"sku": "tea", "qty": 2, "unit_cents": cents}]);
    log.push(
        "order-1",
        "OrderPlaced",
        json!({"customer": "c1", "lines": lines(150)}),
    )
    // Read-your-own-writes inside one batch: order-1 is placed above.
    .push("order-1", "OrderPaid", json!({}))
    .push(
        "order-2",
        "OrderPlaced",
        json!({"customer": "c1", "lines": lines(100)}),
    )
    .push(
        "order-3",
        "OrderPlaced",
        json!({"customer": "c2", "lines": lines(5)}),
    )
    .push("order-1", "OrderShipped", json!({}))
    .push("order-2", "OrderCancelled", json!({"reason": "duplicate"}));
    let docs = assert_same_as_native::<projection_orders::Orders>(ORDERS, &log);
    let c1 = doc(&docs, "customer/c1");
    assert_eq!(
        c1,
        json!({"orders": 2, "open_orders": 0, "cancelled": 1, "spent_cents": 300})
    );
    assert_eq!(doc(&docs, "order/1")["status"], "shipped");
    assert_eq!(doc(&docs, "order/2")["cancel_reason"], "duplicate");
    assert_eq!(doc(&docs, "customer/c2")["open_orders"], 1);
}

#[test]
fn inventory_closing_a_warehouse_uses_the_prefix_scan() {
    let mut log = EventLog::new();
    log.push(
        "warehouse-a",
        "StockReceived",
        json!({"sku": "tea", "qty": 3}),
    )
    .push(
        "warehouse-a",
        "StockReceived",
        json!({"sku": "cups", "qty": 4}),
    )
    .push(
        "warehouse-ab",
        "StockReceived",
        json!({"sku": "tea", "qty": 1}),
    )
    .push(
        "warehouse-b",
        "StockReceived",
        json!({"sku": "tea", "qty": 2}),
    )
    // The scan must see stock written earlier in the same batch, and
    // hide stock deleted earlier in it.
    .push(
        "warehouse-a",
        "StockShipped",
        json!({"sku": "cups", "qty": 4}),
    )
    .push("warehouse-a", "WarehouseClosed", json!({}));
    let docs = assert_same_as_native::<projection_inventory::Inventory>(INVENTORY, &log);
    assert_eq!(
        docs.keys().collect::<Vec<_>>(),
        ["sku/cups", "sku/tea", "stock/ab/tea", "stock/b/tea"]
    );
    assert_eq!(doc(&docs, "sku/tea")["qty"], 3);
    assert_eq!(doc(&docs, "sku/cups")["qty"], 0);
}

#[test]
fn replays_build_byte_identical_views() {
    let rt = wasm::runtime();
    let module = wasm::load(&rt, USERS);
    let log = users_log();
    assert_eq!(run_wasm(&module, &log, 4), run_wasm(&module, &log, 4));
}
