//! The AssemblyScript `users` (`projections/users-as`, 1.1.0) deployed to a
//! real daemon as the next version of the Rust `users` (1.0.0): a new
//! fingerprint, so it warms from the first event beside the active 1.0.0,
//! takes over at cutover, and serves the documents 1.0.0 built.

use std::time::Duration;

use kiln_tests::daemon::{Api, Daemon};
use kiln_tests::wasm::USERS;
use serde_json::{Value, json};

const USERS_AS: &str = env!("KILN_WASM_USERS_AS");
const WAIT: Duration = Duration::from_secs(60);

async fn append(api: &Api, stream: &str, event_type: &str, data: Value) {
    let (s, b) = api.append(stream, json!("any"), event_type, data).await;
    assert_eq!(s, 200, "appending to {stream}: {b}");
}

/// Every document of `view`, in key order, following the pages.
async fn documents(api: &Api, view: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/views/{view}?prefix=user-&after={a}"),
            None => format!("/views/{view}?prefix=user-"),
        };
        let (s, b) = api.get(&path).await;
        assert_eq!(s, 200, "{path}: {b}");
        docs.extend(b["items"].as_array().cloned().unwrap_or_default());
        match b["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return docs,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn users_as_takes_over_from_rust_users_with_the_same_documents() {
    let daemon = Daemon::start();
    let api = Api::new(&daemon);
    for i in 0..40 {
        let stream = format!("user-{i}");
        append(
            &api,
            &stream,
            "UserRegistered",
            json!({"name": format!("Zoë \"{i}\"\t😀"), "email": format!("{i}@x")}),
        )
        .await;
        for _ in 0..i % 4 {
            append(&api, &stream, "UserLoggedIn", json!({})).await;
        }
        if i % 3 == 0 {
            append(
                &api,
                &stream,
                "UserRenamed",
                json!({"name": format!("renamed {i}")}),
            )
            .await;
            append(&api, &stream, "LoginFailed", json!({})).await;
        }
    }
    append(&api, "admin-1", "UserLoggedIn", json!({})).await;

    let (s, b) = api.deploy(std::fs::read(USERS).unwrap()).await;
    assert_eq!(s, 202, "{b}");
    api.wait_state("users-1_0_0", "active", WAIT).await;

    let (s, b) = api.deploy(std::fs::read(USERS_AS).unwrap()).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(
        (b["id"].as_str(), b["outcome"].as_str()),
        (Some("users-1_1_0"), Some("warming")),
        "another language is another fingerprint: a rebuild, not an alias: {b}"
    );
    api.wait_state("users-1_1_0", "active", WAIT).await;
    api.wait_state("users-1_0_0", "standby", WAIT).await;

    let old = documents(&api, "users-1_0_0").await;
    let new = documents(&api, "users-1_1_0").await;
    assert_eq!(old.len(), 40);
    assert_eq!(
        new, old,
        "1.1.0 (AssemblyScript) built other documents than 1.0.0 (Rust)"
    );

    // A live event after the cutover reaches both; the bare name answers from 1.1.0.
    append(&api, "user-7", "UserLoggedIn", json!({})).await;
    let (s, b) = api.get("/views/users/user-7?stream=user-7").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["view"], "users-1_1_0");
    let (_, old7) = api.get("/views/users-1_0_0/user-7?stream=user-7").await;
    assert_eq!(b["doc"], old7["doc"]);
    assert_eq!(b["doc"]["logins"], 4);
}
