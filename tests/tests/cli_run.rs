//! `kiln run`: a module over a JSONL file of events, documents out as JSONL.

use std::path::Path;

use kiln::cli::run::run_offline;
use kiln::runtime::RuntimeConfig;
use kiln_tests::wasm::{ORDERS, USERS};
use serde_json::{Value, json};

fn run(module: &str, input: &str, batch: usize) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    run_offline(
        Path::new(module),
        input.as_bytes(),
        "events.jsonl",
        batch,
        RuntimeConfig::default(),
        &mut out,
    )?;
    Ok(String::from_utf8(out)?
        .lines()
        .map(|l| {
            assert!(l.starts_with(r#"{"key":"#), "key first: {l}");
            serde_json::from_str(l).expect("each output line is JSON")
        })
        .collect())
}

const USERS_EVENTS: &str = r#"
{"stream": "user-2", "type": "UserRegistered", "data": {"name": "Bob", "email": "b@x"}}
{"stream": "user-1", "type": "UserRegistered", "data": {"name": "Ada", "email": "a@x"}, "timestamp": 1700000000000}
{"stream": "user-1", "type": "UserLoggedIn", "data": {}, "metadata": {"ip": "10.0.0.1"}}

{"stream": "user-1", "type": "UserRenamed", "data": {"name": "Ada L."}}
"#;

#[test]
fn prints_every_document_in_key_order() {
    let docs = run(USERS, USERS_EVENTS, 2).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0]["key"], "user-1");
    assert_eq!(docs[0]["doc"]["name"], "Ada L.");
    assert_eq!(docs[0]["doc"]["registered_at"], json!(1_700_000_000_000u64));
    // Without a timestamp an event's is its position (line 4 → position 3).
    assert_eq!(docs[0]["doc"]["last_login"], 3);
    assert_eq!(docs[1]["key"], "user-2");
    assert_eq!(
        run(USERS, USERS_EVENTS, 1000).unwrap(),
        docs,
        "batch size changes nothing"
    );
}

#[test]
fn bad_input_names_the_line() {
    let e = run(USERS, "{\"stream\": \"user-1\"}\n", 10).unwrap_err();
    assert!(format!("{e:#}").contains("events.jsonl line 1"), "{e:#}");
    let e = run(USERS, "\n{\"stream\": \"bad id\", \"type\": \"X\"}\n", 10).unwrap_err();
    assert!(format!("{e:#}").contains("events.jsonl line 2"), "{e:#}");
}

#[test]
fn projection_failures_name_the_projection_and_position() {
    let input = r#"{"stream": "order-9", "type": "OrderShipped", "data": {}}"#;
    let e = run(ORDERS, input, 10).unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.contains("orders 1.0.0 failed at event position 1"),
        "{text}"
    );
    assert!(text.contains("never placed"), "{text}");
}
